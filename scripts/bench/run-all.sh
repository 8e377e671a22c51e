#!/usr/bin/env bash
# Every CPU benchmark of docs/benchmarks.md, one after the other, in one run: each prints
# its ratios against a baseline measured in the same run. Run it on a machine with nothing
# else running (the figures are ratios, but contention still moves them).
#
#   scripts/bench/run-all.sh [OUTDIR]            # default: bench-results/<date>
#   SLURM_CONF=... scripts/bench/run-all.sh      # adds the Slurm ones (scripts/local-slurm.sh start)
#
# OUTDIR gets one log per benchmark (the command on its first line) and summary.txt with
# the load average before and after each; steadiness.py runs first and last.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-bench-results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
failed=0

bench() {  # NAME ARGS...
    local name=$1; shift
    local log="$OUT/$name.log"
    echo "\$ $PY $*" > "$log"
    echo "[$(date +%H:%M:%S)] $name: $* (load $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$OUT/summary.txt"
    if ! "$PY" "$@" >> "$log" 2>&1; then
        echo "  FAILED, see $log" | tee -a "$OUT/summary.txt"
        failed=1
    fi
    tail -n 6 "$log" | sed 's/^/  /' | tee -a "$OUT/summary.txt"
}

git rev-parse --short HEAD > "$OUT/commit.txt" 2>/dev/null || true
# How much the machine's own speed moves, before and after: a ratio closer to its goal than
# this spread is not told apart from noise by one run.
bench steadiness_before scripts/bench/steadiness.py --json "$OUT/steadiness_before.json"
bench small_data scripts/bench/small_data.py --repeats 5
bench trainer_overhead scripts/bench/trainer_overhead.py --threads 1
bench loader scripts/bench/loader.py
bench scaling scripts/bench/scaling.py --backends mpi torch horovod
bench scaling_1024 scripts/bench/scaling.py --backends mpi torch horovod --batch 1024
bench allreduce scripts/bench/allreduce.py
bench checkpoint_cost scripts/bench/checkpoint_cost.py
bench collect scripts/bench/collect.py
bench large_grid scripts/bench/large_grid.py --executor local
if [ -n "${SLURM_CONF:-}" ]; then
    bench submit scripts/bench/submit.py
    bench large_grid_slurm scripts/bench/large_grid.py --executor slurm
fi
bench steadiness_after scripts/bench/steadiness.py --json "$OUT/steadiness_after.json"
echo "results in $OUT"
exit $failed
