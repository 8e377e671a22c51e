#!/usr/bin/env python
"""How steady this machine is: the same fixed work timed again and again, in one thread.

    python scripts/bench/steadiness.py [--repeats 15] [--json OUT]

Every other benchmark prints a ratio against a baseline measured in the same run, which
cancels a machine that is uniformly slow, but not one whose speed moves while it runs.
This one measures that movement, so that a run's ratios can be read against it. Three
kinds of fixed work, each repeated --repeats times, interleaved:

  compute   a 1-thread float32 matmul loop (256 x 256), cache-resident;
  memory    a copy of a 64 MiB array into another (bandwidth, out of cache);
  python    a pure-Python loop (the interpreter's own speed).

For each it prints the fastest, median and slowest repeat and the spread (slowest /
fastest). It also prints the CPU time stolen by the hypervisor over the whole run (from
/proc/stat) and the load average. A goal closer than the spread (a 3 % goal under a 1.3x
spread, say) cannot be told apart from noise on this machine by one run; the spread says
how many repeats a benchmark needs, or that it needs a quieter machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def steal_jiffies() -> tuple[int, int]:
    """(stolen, total) CPU jiffies of all CPUs since boot; (0, 0) where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def compute_work():
    import torch

    a = torch.randn(256, 256)

    def work() -> None:
        b = a
        for _ in range(200):
            b = torch.mm(a, b).clamp_(-1, 1)
    return work


def memory_work():
    import numpy as np

    src = np.ones(16 << 20, np.float32)  # 64 MiB: far beyond any cache
    dst = np.empty_like(src)

    def work() -> None:
        for _ in range(4):
            np.copyto(dst, src)
    return work


def python_work():
    def work() -> None:
        total = 0
        for i in range(400_000):
            total += i * i % 7
    return work


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", help="write the figures to this file as well")
    args = p.parse_args(argv)
    if args.repeats < 2:
        p.error(f"--repeats: {args.repeats}; expected at least 2 (a spread needs two repeats)")
    import torch

    torch.set_num_threads(1)
    works = {"compute": compute_work(), "memory": memory_work(), "python": python_work()}
    for work in works.values():
        work()  # first touch: page faults and lazy initialisation are not the machine's noise
    times: dict[str, list[float]] = {name: [] for name in works}
    stolen0, total0 = steal_jiffies()
    load0 = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, work in works.items():  # interleaved, so a slow moment hits every kind
            times[name].append(timed(work))
    stolen1, total1 = steal_jiffies()
    steal = (stolen1 - stolen0) / (total1 - total0) if total1 > total0 else 0.0

    figures = {"repeats": args.repeats, "cpus": os.cpu_count(), "load_average_start": load0,
               "load_average_end": os.getloadavg()[0], "steal_fraction": round(steal, 4)}
    print(f"machine: {os.cpu_count()} CPUs, load average {load0:.2f} at start, "
          f"{figures['load_average_end']:.2f} at end; {args.repeats} repeats of each")
    for name, ts in times.items():
        fast, mid, slow = min(ts), statistics.median(ts), max(ts)
        figures[name] = {"fastest_s": round(fast, 5), "median_s": round(mid, 5), "slowest_s": round(slow, 5),
                         "spread": round(slow / fast, 3), "median_over_fastest": round(mid / fast, 3)}
        print(f"{name:8s} fastest {fast * 1e3:8.2f} ms  median {mid * 1e3:8.2f} ms  slowest {slow * 1e3:8.2f} ms  "
              f"spread {slow / fast:.2f}x (median {mid / fast:.2f}x the fastest)")
    worst = max(figures[name]["spread"] for name in works)
    figures["worst_spread"] = worst
    print(f"CPU time stolen by the hypervisor during the run: {100 * steal:.1f} %")
    print(f"worst spread {worst:.2f}x: ratios closer to their goal than this need more repeats or a quieter machine")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
