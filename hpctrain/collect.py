"""``hpctrain collect SWEEP_DIR``: one sweep's runs gathered into tables, curves, plots and the best model.

Writes into the sweep folder (or ``--out DIR``)::

    summary.csv      one row per run: grid values, state, epochs, best and final metrics, test, timing
    curves.h5        every run's per-epoch curves aligned by epoch, NaN padded (report/curves.py)
    leaderboard.md   the ranked runs; the top ``--top`` are also printed
    plots/           loss.png, by_<key>.png (every run per value) per swept key, heatmap.png for two keys
    best/            config.yaml, best.pt and best.json of the best run: ``hpctrain.load_best``
    tensorboard/     with --tensorboard: one sub-folder of event files per run

Partial sweeps are fine: every run appears with its state; a file that cannot be read is
reported on one line and skipped. Each input file is read once, so the outputs describe
one snapshot, and every output is written atomically and without timestamps, so an
unchanged sweep gives the same files on every collect.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import HpctrainError

DEFAULT_TOP = 5


@dataclass
class Collection:
    """What one collect found and wrote."""
    data: Any  # report.runs.SweepData
    ranked: list
    metric: str
    mode: str
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    best: Optional[dict] = None

    @property
    def problems(self) -> list[str]:
        return self.data.problems


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="sweep folder (sweeps/<name>)")
    p.add_argument("--metric", default=None,
                   help="metric that ranks the runs: a metrics.csv column (val_loss, val_accuracy, ...) "
                        "or a test metric from state.json (test_loss, ...); default the sweep's "
                        "train.monitor, which its best checkpoints track")
    p.add_argument("--mode", choices=("auto", "min", "max"), default="auto",
                   help="min or max is better; auto: train.mode for the monitor, else min for "
                        "loss/rmse/mae, max for accuracy/auc/f1")
    p.add_argument("--out", default=None, metavar="DIR", help="write the reports here (default SWEEP_DIR)")
    p.add_argument("--top", type=int, default=DEFAULT_TOP, metavar="K",
                   help=f"runs shown in the terminal table and highlighted in plots (default {DEFAULT_TOP})")
    p.add_argument("--log-scale", action="store_true", help="log y axis for the curve plots")
    p.add_argument("--no-plots", action="store_true", help="skip plots/ (the slowest part for big sweeps)")
    p.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                   help="also write TensorBoard event files, one sub-folder per run "
                        "(default DIR: OUT/tensorboard)")


def collect(sweep_dir: str | Path, *, metric: Optional[str] = None, mode: str = "auto",
            out: str | Path | None = None, top: int = DEFAULT_TOP, log_scale: bool = False,
            plots: bool = True, tensorboard: str | Path | None = None) -> Collection:
    """Read the sweep once and write every report; returns what was found and written.

    ``metric``: None ranks by the sweep's train.monitor (see monitor.py).
    ``tensorboard``: None for no event files, "" for OUT/tensorboard, or a folder."""
    from .monitor import choose
    from .report.ranking import score_runs
    from .report.runs import read_sweep

    if top < 0:
        raise HpctrainError(f"--top: {top} is negative; expected 0 or more runs")
    root = Path(sweep_dir)
    if not root.is_dir():
        raise HpctrainError(f"{root}: not a folder; expected a sweep folder such as sweeps/<name>")
    chosen = choose(root, metric, mode)
    data = read_sweep(root)
    ranked = score_runs(data, chosen.metric, chosen.mode)
    result = Collection(data, ranked, chosen.metric, chosen.mode, Path(out) if out is not None else root)
    _write_reports(result, top, log_scale, plots)
    if tensorboard is not None:
        from .report.tensorboard import write_sweep_events

        folder = Path(tensorboard) if str(tensorboard) else result.out_dir / "tensorboard"
        result.files += write_sweep_events(data, folder, result.metric)
    return result


def _write_reports(result: Collection, top: int, log_scale: bool, plots: bool) -> None:
    from .fsutil import atomic_write_text
    from .report.best import export_best
    from .report.curves import write_curves_h5
    from .report.tables import leaderboard_markdown, write_summary

    data, out = result.data, result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    write_summary(out / "summary.csv", data, result.metric)
    write_curves_h5(out / "curves.h5", data, result.metric, result.mode)
    atomic_write_text(out / "leaderboard.md", leaderboard_markdown(data, result.ranked, result.metric, result.mode))
    result.files += [out / "summary.csv", out / "curves.h5", out / "leaderboard.md"]
    if plots:
        from .report.plots import write_plots

        result.files += write_plots(data, result.ranked, out / "plots", result.metric, result.mode,
                                    top=top, log_scale=log_scale)
    result.best = export_best(result.ranked, out / "best", result.metric, result.mode, data.root,
                              data.problems)
    if result.best is not None:
        result.files += [out / "best" / name for name in ("best.json", "best.pt")]


def main(args: argparse.Namespace) -> int:
    from .report.tables import mixed_scale_note, state_counts, terminal_table

    started = time.perf_counter()
    result = collect(args.sweep_dir, metric=args.metric, mode=args.mode, out=args.out, top=args.top,
                     log_scale=args.log_scale, plots=not args.no_plots, tensorboard=args.tensorboard)
    for problem in result.problems:
        print(f"hpctrain collect: warning: {problem}", file=sys.stderr)
    data = result.data
    print(f"{data.name}: {len(data.runs)} runs ({state_counts(data.runs)}); "
          f"{len(result.ranked)} ranked by {result.metric} ({result.mode})")
    if result.ranked and args.top > 0:
        print(terminal_table(data, result.ranked, result.metric, args.top))
    note = mixed_scale_note(result.ranked)
    if note:
        print(f"note: {note}")
    best = result.best
    if best is not None:
        rank = next(i for i, r in enumerate(result.ranked, 1) if r.run_id == best["run_id"])
        note = "" if rank == 1 else f" (rank {rank}: better runs have no complete checkpoint)"
        print(f"best: {best['run_id']} {result.metric}={best['value']:.6g} at epoch {best['best_epoch']}"
              f"{note} -> {result.out_dir / 'best'}")
    print(f"wrote {len(result.files)} files to {result.out_dir} in {time.perf_counter() - started:.2f} s")
    return 0


def load_best(sweep_dir: str | Path, device: str = "cpu", metric: Optional[str] = None,
              mode: str = "auto"):
    """The best model of a sweep in eval mode, behind its input standardisation.

    With no ``metric``, uses best/best.json that ``hpctrain collect`` wrote in ``sweep_dir``
    (a sweep folder or a collect ``--out`` folder); otherwise, or when the sweep was never
    collected, ranks the runs now (default: the sweep's train.monitor) without writing anything. Returns a
    ``report.loading.StandardizedModel``: call it on raw features to get logits (binary,
    multiclass) or predictions (regression); ``predict_proba``/``predict`` give
    probabilities and labels; ``.info`` holds the run id, metric, value and params."""
    from .fsutil import read_json
    from .report.best import BEST_JSON, best_record, pick_checkpoint
    from .report.loading import load_checkpoint_model

    root = Path(sweep_dir)
    best_json = root / "best" / BEST_JSON
    if metric is None and best_json.is_file():
        try:
            info = read_json(best_json)
            checkpoint = root / "best" / info["checkpoint"]
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise HpctrainError(f"{best_json}: unreadable ({e}); run hpctrain collect {root} again") from None
        return load_checkpoint_model(checkpoint, device, info)
    from .monitor import choose
    from .report.ranking import score_runs
    from .report.runs import read_sweep

    chosen = choose(root, metric, mode)
    metric, mode = chosen.metric, chosen.mode
    data = read_sweep(root)
    run, _ = pick_checkpoint(score_runs(data, metric, mode), data.problems)
    if run is None:
        raise HpctrainError(f"{root}: no run has a finite {metric} and a complete checkpoints/best.pt yet "
                            f"({len(data.runs)} runs)")
    return load_checkpoint_model(run.run_dir / "checkpoints" / "best.pt", device,
                                 best_record(run, metric, mode, data.root))
