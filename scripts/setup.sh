#!/usr/bin/env bash
# Set up hpctrain on a fresh machine: a virtual environment in .venv with hpctrain installed.
#
#   scripts/setup.sh            runtime: venv, torch (CPU build 2.13.0 unless a torch exists), hpctrain
#   scripts/setup.sh --test     also what the tests need: Open MPI, Slurm, munge, MariaDB (Debian
#                               packages, when run as root), pytest, and Horovod built by
#                               scripts/install-horovod.sh (cached wheel, built once per machine)
#
# An interpreter that already has torch (e.g. a CUDA build on a cluster) keeps it: the venv
# then sees its site-packages instead of installing another torch.
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_TEST=0
[ "${1:-}" = "--test" ] && WITH_TEST=1
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}

say() { printf '[setup] %s\n' "$*"; }

install_system_packages() {
  local missing=()
  command -v mpirun >/dev/null || missing+=(openmpi-bin)
  dpkg -s libopenmpi-dev >/dev/null 2>&1 || missing+=(libopenmpi-dev)
  if [ "$WITH_TEST" = 0 ]; then
    # the demo needs only MPI, and only to run 2 ranks per grid point
    if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt_install "${missing[@]}"
    fi
    return 0
  fi
  command -v slurmctld >/dev/null || missing+=(slurm-wlm)
  command -v munged >/dev/null || missing+=(munge)
  command -v slurmdbd >/dev/null || missing+=(slurmdbd)
  command -v mariadbd >/dev/null || command -v mysqld >/dev/null || missing+=(mariadb-server)
  command -v cmake >/dev/null || missing+=(cmake)
  command -v g++ >/dev/null || missing+=(g++)
  [ ${#missing[@]} -eq 0 ] && { say "system packages present"; return; }
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "missing system packages: ${missing[*]} (install them as root, e.g. apt-get install ${missing[*]})"
    return 1
  fi
  apt_install "${missing[@]}"
}

apt_install() {
  say "installing system packages: $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "$@" >/dev/null
}

make_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    if "$PYTHON" -c "import torch" 2>/dev/null; then
      say "using the torch of $PYTHON ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
      "$PYTHON" -m venv --system-site-packages "$VENV"
    else
      "$PYTHON" -m venv "$VENV"
    fi
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    say "installing $TORCH_PIN (CPU build)"
    "$VENV/bin/python" -m pip install -q "$TORCH_PIN"
  fi
}

install_system_packages
make_venv
extras=""
[ $WITH_TEST = 1 ] && extras="[test]"
say "installing hpctrain$extras"
"$VENV/bin/python" -m pip install -q -e ".$extras"
if [ $WITH_TEST = 1 ]; then
  scripts/install-horovod.sh "$VENV/bin/python"
fi
say "done: $("$VENV/bin/python" -c 'import torch, hpctrain; print("hpctrain", hpctrain.__version__, "torch", torch.__version__)')"
