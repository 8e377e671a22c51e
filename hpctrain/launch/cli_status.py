"""``hpctrain status SWEEP_DIR``: every run's state, counts by state, and Slurm's view.

Safe while jobs write: state files are replaced atomically, and a missing or unreadable
one shows as ``?`` instead of stopping the table.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any, Optional


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_dir", help="sweep folder (sweeps/<name>)")
    p.add_argument("--no-slurm", action="store_true", help="do not ask squeue/sacct")
    p.add_argument("--json", action="store_true", help="one JSON object per run instead of the table")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "x".join(_fmt(v) for v in value) or "[]"
    return str(value)


def rows(sweep_dir: str, slurm_states: bool = True) -> list[dict]:
    from ..sweep import SweepDir, iter_runs

    sweep = SweepDir(sweep_dir)
    out = []
    for rec, state in iter_runs(sweep):
        row = {"index": rec["index"], "run_id": rec["run_id"], "params": rec.get("params", {}),
               "status": state.status if state else "?", "epoch": state.epoch if state else None,
               "total_epochs": state.total_epochs if state else None,
               "best_metric": state.best_metric if state else None,
               "monitor": state.monitor if state else None,
               "requeues": state.requeues if state else 0,
               "slurm_job_id": state.slurm_job_id if state else None,
               "message": (state.message if state else "state.json missing or unreadable"),
               "slurm_state": None}
        out.append(row)
    if slurm_states:
        from .slurm import slurm_states as query

        states = query(r["slurm_job_id"] for r in out)
        for r in out:
            r["slurm_state"] = states.get(r["slurm_job_id"] or "")
    return out


def render(table: list[dict]) -> str:
    keys = sorted({k for r in table for k in r["params"]})
    headers = ["idx", "run_id", *[k.split(".")[-1] for k in keys], "state", "epoch", "best", "requeues",
               "slurm job", "slurm state", "message"]
    lines = []
    for r in table:
        epoch = f"{_fmt(r['epoch'])}/{_fmt(r['total_epochs'])}"
        lines.append([str(r["index"]), r["run_id"], *[_fmt(r["params"].get(k)) for k in keys], r["status"],
                      epoch, _fmt(r["best_metric"]), str(r["requeues"]), _fmt(r["slurm_job_id"]),
                      _fmt(r["slurm_state"]), _one_line(r["message"])])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [fmt(headers)] + [fmt(l) for l in lines]
    monitor = next((r["monitor"] for r in table if r["monitor"]), None)
    counts = Counter(r["status"] for r in table)
    out.append("")
    out.append(f"{len(table)} run(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
               + (f"   (best = {monitor})" if monitor else ""))
    return "\n".join(out)


def _one_line(text: Optional[str], limit: int = 80) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def main(args: argparse.Namespace) -> int:
    table = rows(args.sweep_dir, slurm_states=not args.no_slurm)
    if args.json:
        for r in table:
            print(json.dumps(r, sort_keys=True))
    else:
        print(render(table))
    return 0
