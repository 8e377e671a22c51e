"""``hpctrain status SWEEP_DIR [--watch [SECONDS]]``: every run's state, reconciled with Slurm's.

Safe while jobs write: state files are replaced atomically, and a missing or unreadable
one shows as ``?`` instead of stopping the table. Slurm is asked once per table for every
job of the sweep (launch/queue.py). Where Slurm says a job ended badly while state.json
still says ``running`` (a rank or node lost before the run could record it), the row shows
``failed`` with Slurm's reason; state.json itself is left to its one writer.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import Any, Optional

# Slurm states that end a job whose run was still running: it will not record anything now.
BAD_END = ("FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "CANCELLED", "BOOT_FAIL", "DEADLINE", "PREEMPTED")
LIVE = ("pending", "running", "preempted")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_dir", help="sweep folder (sweeps/<name>)")
    p.add_argument("--no-slurm", action="store_true", help="do not ask squeue/sacct")
    p.add_argument("--json", action="store_true", help="one JSON object per run instead of the table")
    p.add_argument("--watch", nargs="?", type=float, const=10.0, default=None, metavar="SECONDS",
                   help="redraw the table every SECONDS (default 10) until no run is pending or running")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "x".join(_fmt(v) for v in value) or "[]"
    return str(value)


def _row(rec: dict, state) -> dict:
    row = {"index": rec["index"], "run_id": rec["run_id"], "params": rec.get("params", {}),
           "status": state.status if state else "?", "epoch": state.epoch if state else None,
           "total_epochs": state.total_epochs if state else None,
           "best_metric": state.best_metric if state else None,
           "monitor": state.monitor if state else None,
           "requeues": state.requeues if state else 0,
           "slurm_job_id": state.slurm_job_id if state else None,
           "message": (state.message if state else "state.json missing or unreadable"),
           "slurm_state": None, "slurm_reason": None}
    row["epochs_per_min"], row["eta_min"] = rate_and_eta(state)
    return row


def rate_and_eta(state) -> tuple[Optional[float], Optional[float]]:
    """Epochs per minute of training time so far, and minutes left at that rate (running runs)."""
    if state is None or state.status != "running" or state.epoch <= 0 or state.wall_time_s <= 0:
        return None, None
    rate = state.epoch / (state.wall_time_s / 60.0)
    return rate, max(state.total_epochs - state.epoch, 0) / rate


def rows(sweep_dir: str, slurm_states: bool = True) -> list[dict]:
    return table(sweep_dir, slurm_states)[0]


def table(sweep_dir: str, slurm_states: bool = True) -> tuple[list[dict], list[str]]:
    """Every run's row, and what Slurm could not tell (accounting off, a client that failed)."""
    from ..sweep import SweepDir, iter_runs

    sweep = SweepDir(sweep_dir)
    out = [_row(rec, state) for rec, state in iter_runs(sweep)]
    if not slurm_states:
        return out, []
    from .queue import cached_query

    view = cached_query(sweep.root / "slurm", (r["slurm_job_id"] for r in out))
    for r in out:
        job = view.jobs.get(r["slurm_job_id"] or "")
        if job is not None:
            reconcile(r, job)
    return out, view.unseen


def reconcile(row: dict, job) -> None:
    """Slurm's state beside the on-disk one; a live on-disk state of a job that ended badly loses."""
    row["slurm_state"], row["slurm_reason"] = job.state, job.why()
    if row["status"] not in LIVE or job.state not in BAD_END + ("COMPLETED",):
        return
    said = f"slurm {job.why()}"
    if row["status"] == "preempted":  # checkpoint saved: Slurm did not requeue it (PreemptMode=CANCEL ...)
        row["message"] = (f"{said}: not requeued by Slurm; `hpctrain submit` resumes it from its checkpoint. "
                          + (row["message"] or ""))
    elif row["status"] == "pending":  # the element ended before the run started
        row["message"] = f"{said} before the run started; `hpctrain submit` submits it again"
    else:
        row["status"] = "failed"
        row["message"] = (f"{said} while state.json said running; `hpctrain submit` resumes it from its "
                          "last checkpoint")


def render(rows_: list[dict], unseen: Optional[list[str]] = None, monitor: Optional[str] = None) -> str:
    """The table; ``monitor``: what "best" is (the sweep's train.monitor), else the runs' own."""
    keys = sorted({k for r in rows_ for k in r["params"]})
    headers = ["idx", "run_id", *[k.split(".")[-1] for k in keys], "state", "epoch", "best", "ep/min", "eta",
               "requeues", "slurm job", "slurm state", "message"]
    lines = []
    for r in rows_:
        epoch = f"{_fmt(r['epoch'])}/{_fmt(r['total_epochs'])}"
        eta = None if r.get("eta_min") is None else f"{r['eta_min']:.1f}m"
        lines.append([str(r["index"]), r["run_id"], *[_fmt(r["params"].get(k)) for k in keys], r["status"],
                      epoch, _fmt(r["best_metric"]), _fmt(r.get("epochs_per_min")), _fmt(eta), str(r["requeues"]),
                      _fmt(r["slurm_job_id"]), _fmt(r.get("slurm_reason") or r["slurm_state"]),
                      _one_line(r["message"])])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [fmt(headers)] + [fmt(l) for l in lines]
    monitor = monitor or next((r["monitor"] for r in rows_ if r["monitor"] and r["status"] != "pending"), None)
    counts = Counter(r["status"] for r in rows_)
    out.append("")
    out.append(f"{len(rows_)} run(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
               + (f"   (best = {monitor})" if monitor else ""))
    out += [f"not seen: {line}" for line in unseen or []]
    return "\n".join(out)


def _one_line(text: Optional[str], limit: int = 100) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def show(args: argparse.Namespace) -> list[dict]:
    from ..monitor import sweep_monitor

    rows_, unseen = table(args.sweep_dir, slurm_states=not args.no_slurm)
    if args.json:
        for r in rows_:
            print(json.dumps(r, sort_keys=True))
    else:
        found = sweep_monitor(args.sweep_dir)
        print(render(rows_, unseen, found.metric if found else None))
    return rows_


def main(args: argparse.Namespace) -> int:
    if args.watch is None:
        show(args)
        return 0
    interval = max(args.watch, 1.0)
    while True:
        if sys.stdout.isatty():
            print("\033[H\033[2J", end="")  # clear the screen: one table in view, redrawn
        print(f"hpctrain status {args.sweep_dir}   every {interval:g}s   {time.strftime('%H:%M:%S')}")
        rows_ = show(args)
        sys.stdout.flush()
        if not any(r["status"] in ("pending", "running") for r in rows_):
            return 0
        time.sleep(interval)
