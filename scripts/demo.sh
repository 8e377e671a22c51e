#!/usr/bin/env bash
# The demo sweep end to end on this machine: synthetic data, 6 grid points trained as
# local processes, then the collected summary, leaderboard and plots.
# (`make demo` sets up .venv first; on a Slurm cluster use `hpctrain submit configs/demo.yaml`.)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
SWEEP=${SWEEP:-sweeps/demo}

hpctrain submit configs/demo.yaml --executor local --sweep-dir "$SWEEP" --wait
hpctrain status "$SWEEP"
hpctrain collect "$SWEEP"
echo
echo "Results: $SWEEP/summary.csv, $SWEEP/leaderboard.md, $SWEEP/plots/, best model in $SWEEP/best/"
