#!/usr/bin/env bash
# The demo sweep end to end on this machine: a synthetic dataset, the 6 grid points
# trained as local processes (2 MPI ranks each where Open MPI is installed), then the
# collected summary, leaderboard, plots and best model.
# (`make demo` sets up .venv first; on a Slurm cluster use `hpctrain submit configs/demo.yaml`.)
#
#   scripts/demo.sh [KEY=VALUE ...]     config overrides, e.g. dist.backend=torch
#   SWEEP=/tmp/demo scripts/demo.sh     another sweep folder (default sweeps/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
SWEEP=${SWEEP:-sweeps/demo}

overrides=("$@")
if ! command -v mpirun >/dev/null; then
  echo "[demo] mpirun not found: each grid point trains as one process (install Open MPI for 2 ranks)"
  overrides+=(slurm.tasks_per_node=1)
  SWEEP=${SWEEP}-1rank
fi
hpctrain submit configs/demo.yaml "${overrides[@]}" --executor local --sweep-dir "$SWEEP"
hpctrain status "$SWEEP" --no-slurm
echo
echo "[demo] results in $SWEEP: summary.csv, leaderboard.md, plots/, best/ (hpctrain.load_best(\"$SWEEP\"))"
