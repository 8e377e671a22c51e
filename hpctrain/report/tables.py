"""summary.csv, leaderboard.md and the terminal table of a collected sweep.

Values are written the same way on every collect (floats with repr, lists as JSON, no
timestamps) so that collecting an unchanged sweep twice gives identical files.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from typing import Any, Optional

from ..fsutil import atomic_write_text
from .runs import RunRecord, SweepData

TRAILING_COLUMNS = ("wall_time_s", "samples_per_s", "slurm_job_id", "message")


def format_value(value: Any) -> str:
    """Exact, stable text for a CSV cell: '' for missing, repr for floats, JSON for lists."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(value, sort_keys=True)


def short_value(value: Any) -> str:
    """Compact text for tables people read: 6 significant digits."""
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, list):
        return "x".join(short_value(v) for v in value) or "[]"
    return format_value(value)


def metric_columns(data: SweepData) -> list[str]:
    """Per-epoch train_/val_ columns in the order runs list them (lr and step left out)."""
    names: list[str] = []
    for run in data.runs:
        if run.curves is not None:
            names.extend(c for c in run.curves.columns if c.startswith(("train_", "val_")) and c not in names)
    return names


def test_columns(data: SweepData) -> list[str]:
    names = set()
    for run in data.runs:
        if run.state is not None and isinstance(run.state.test, dict):
            names.update(k if k.startswith("test_") else f"test_{k}" for k in run.state.test)
    return sorted(names)


def summary_columns(data: SweepData, metric: str) -> list[str]:
    return (["index", "run_id", *data.param_keys, "state", "epochs", "total_epochs", "ranks", "global_batch",
             "best_epoch", f"best_{metric}"]
            + [f"final_{c}" for c in metric_columns(data)]
            + test_columns(data) + list(TRAILING_COLUMNS))


def summary_row(run: RunRecord, metric: str, finals: list[str], tests: list[str]) -> dict[str, Any]:
    s = run.state
    row: dict[str, Any] = {"index": run.index, "run_id": run.run_id, **run.params,
                           "state": run.status, "epochs": run.epochs_run,
                           "total_epochs": s.total_epochs if s else None, **_scale(run),
                           "best_epoch": run.best_epoch, f"best_{metric}": run.best_value}
    for name in finals:
        row[f"final_{name}"] = run.curves.last(name) if run.curves is not None else None
    test = s.test if s is not None and isinstance(s.test, dict) else {}
    for name in tests:
        row[name] = test.get(name, test.get(name[len("test_"):]))
    if s is not None:
        row.update(wall_time_s=s.wall_time_s, samples_per_s=s.samples_per_s,
                   slurm_job_id=s.slurm_job_id, message=s.message)
    return row


def _scale(run: RunRecord) -> dict[str, Any]:
    """Ranks and global batch of a run that has started: runs compare only at equal global batch."""
    s = run.state
    started = s is not None and s.status != "pending"
    return {"ranks": s.world_size if started else None, "global_batch": s.global_batch if started else None}


def summary_rows(data: SweepData, metric: str) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, one row per run in grid order); call ranking.score_runs first."""
    finals, tests = metric_columns(data), test_columns(data)
    rows = [summary_row(run, metric, finals, tests) for run in data.runs]
    return summary_columns(data, metric), rows


def csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([format_value(row.get(c)) for c in columns])
    return buf.getvalue()


def write_summary(path, data: SweepData, metric: str) -> None:
    columns, rows = summary_rows(data, metric)
    atomic_write_text(path, csv_text(columns, rows))


# --------------------------------------------------------------------------- leaderboard


def state_counts(runs: list[RunRecord]) -> str:
    counts = Counter(r.status for r in runs)
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def _leaderboard_rows(data: SweepData, ranked: list[RunRecord], metric: str) -> tuple[list[str], list[list[str]]]:
    tests = [t for t in test_columns(data) if t != metric]
    header = ["rank", "run", *data.param_keys, "state", f"best {metric}", "best epoch", "epochs",
              "ranks", "global batch", *tests]
    rows = []
    for rank, run in enumerate(ranked, 1):
        test = run.state.test if run.state is not None and isinstance(run.state.test, dict) else {}
        scale = _scale(run)
        rows.append([str(rank), run.run_id, *[short_value(run.params.get(k)) for k in data.param_keys],
                     run.status, short_value(run.best_value), format_value(run.best_epoch),
                     str(run.epochs_run), format_value(scale["ranks"]), format_value(scale["global_batch"]),
                     *[short_value(test.get(t, test.get(t[5:]))) for t in tests]])
    return header, rows


def mixed_scale_note(runs: list[RunRecord]) -> Optional[str]:
    """A warning when ranked runs trained at different global batches (or rank counts)."""
    batches = sorted({r.state.global_batch for r in runs if r.state is not None and r.state.global_batch})
    ranks = sorted({r.state.world_size for r in runs if r.state is not None and r.state.status != "pending"})
    if len(batches) > 1:
        return (f"runs trained at different global batches ({', '.join(map(str, batches))} rows per step): "
                "their metrics are not directly comparable")
    if len(ranks) > 1:
        return f"runs trained on different numbers of ranks ({', '.join(map(str, ranks))})"
    return None


def leaderboard_markdown(data: SweepData, ranked: list[RunRecord], metric: str, mode: str) -> str:
    better = "lower" if mode == "min" else "higher"
    header, rows = _leaderboard_rows(data, ranked, metric)
    lines = [f"# Leaderboard: {data.name}", "",
             f"Ranked by `{metric}` ({better} is better): {len(ranked)} of {len(data.runs)} runs "
             f"have a value. States: {state_counts(data.runs)}.", ""]
    note = mixed_scale_note(ranked)
    if note:
        lines += [f"**Note:** {note}.", ""]
    if not ranked:
        return "\n".join(lines + [f"No run has a finite `{metric}` yet.", ""])
    aligns = ["---:" if h in ("rank", "best epoch", "epochs", "ranks", "global batch") else "---" for h in header]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join(aligns) + " |")
    lines.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows)
    unranked = [r for r in data.runs if r.best_value is None]
    if unranked:
        lines += ["", f"Not ranked (no `{metric}` yet): "
                  + ", ".join(f"{r.run_id} ({r.status})" for r in unranked)]
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def terminal_table(data: SweepData, ranked: list[RunRecord], metric: str, top: int,
                   width: Optional[int] = None) -> str:
    """The top ``top`` runs as fixed-width text."""
    header, rows = _leaderboard_rows(data, ranked[:top], metric)
    if not rows:
        return f"no run has a finite {metric} yet ({state_counts(data.runs)})"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    numeric = [all(_is_number(r[i]) for r in rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        text = "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(cells, widths, numeric)).rstrip()
        return text[:width] if width else text
    return "\n".join([line(header), line(["-" * w for w in widths]), *[line(r) for r in rows]])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == ""
    return True
