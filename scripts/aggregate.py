#!/usr/bin/env python
"""Merge several sweeps into one comparison table.

    python scripts/aggregate.py sweeps/a sweeps/b [--out all.csv] [--metric val_loss] [--sort]

Each sweep is read the way ``hpctrain collect`` reads it (nothing is written into the
sweeps); the table has the columns of every sweep's summary.csv, a leading ``sweep``
column, and an empty cell where a sweep lacks a column (a hyperparameter it did not sweep).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from hpctrain.errors import HpctrainError
from hpctrain.fsutil import atomic_write_text
from hpctrain.monitor import better_mode
from hpctrain.report.ranking import score_runs
from hpctrain.report.runs import read_sweep
from hpctrain.report.tables import csv_text, summary_rows


def aggregate(sweep_dirs: list[str | Path], metric: str = "val_loss", mode: str = "auto",
              sort: bool = False) -> tuple[list[str], list[dict], list[str]]:
    """(columns, rows, problems) of all sweeps together, in the order given (or best first)."""
    mode = better_mode(metric, mode)
    datas = [read_sweep(d) for d in sweep_dirs]
    names = [d.name for d in datas]
    if len(set(names)) != len(names):  # two folders of the same name: tell them apart by path
        names = [str(Path(d)) for d in sweep_dirs]
    columns, rows, problems = ["sweep"], [], []
    for name, data in zip(names, datas):
        score_runs(data, metric, mode)
        cols, sweep_rows = summary_rows(data, metric)
        columns.extend(c for c in cols if c not in columns)
        rows.extend({"sweep": name, **row} for row in sweep_rows)
        problems.extend(data.problems)
    if sort:
        rows.sort(key=lambda r: _sort_key(r.get(f"best_{metric}"), mode))
    return columns, rows, problems


def _sort_key(value, mode: str) -> tuple:
    if value is None or not math.isfinite(value):
        return (1, 0.0)
    return (0, value if mode == "min" else -value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR")
    p.add_argument("--out", default=None, metavar="FILE", help="CSV file to write (default: standard output)")
    p.add_argument("--metric", default="val_loss")
    p.add_argument("--mode", choices=("auto", "min", "max"), default="auto")
    p.add_argument("--sort", action="store_true", help="best runs of all sweeps first (stable otherwise)")
    args = p.parse_args(argv)
    try:
        columns, rows, problems = aggregate(args.sweep_dirs, args.metric, args.mode, args.sort)
    except HpctrainError as e:
        print(f"aggregate: error: {e}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"aggregate: warning: {problem}", file=sys.stderr)
    text = csv_text(columns, rows)
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {len(rows)} runs of {len(args.sweep_dirs)} sweeps to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
