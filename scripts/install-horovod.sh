#!/usr/bin/env bash
# Build (once) and install Horovod 0.28.1 with PyTorch, MPI and Gloo support into a Python
# environment that already has torch.
#
# Usage: scripts/install-horovod.sh [PYTHON]
#   PYTHON  the interpreter whose environment receives Horovod. Default: $VIRTUAL_ENV/bin/python,
#           else the repository's .venv/bin/python, else python3 on PATH.
#
# Why a build script: the 0.28.1 release asks CMake for C++14, and torch >= 2.1 headers need
# C++17, so `pip install horovod==0.28.1` fails. We build its source distribution with both
# `set(CMAKE_CXX_STANDARD 14)` lines raised to 17, against the torch already installed
# (--no-build-isolation, so the extension links that torch and no other).
#
# The built wheel is kept in ${HPCTRAIN_CACHE:-$HOME/.cache/hpctrain}/wheels/<key>/, the key
# naming the Horovod, torch and Python versions; a later run with the same key installs that
# wheel without building. If `import horovod.torch` already works, the script does nothing.
#
# Environment:
#   HPCTRAIN_CACHE        cache root (default $HOME/.cache/hpctrain)
#   HOROVOD_BUILD_JOBS    parallel compile jobs (default: number of cores)
#   HOROVOD_FORCE_BUILD=1 rebuild even when a cached wheel exists
set -euo pipefail

HOROVOD_VERSION=0.28.1
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { echo "install-horovod: $*" >&2; }
die() { log "error: $*"; exit 1; }

pick_python() {
    if [[ $# -ge 1 && -n "$1" ]]; then
        echo "$1"
    elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
        echo "$VIRTUAL_ENV/bin/python"
    elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
        echo "$REPO_ROOT/.venv/bin/python"
    else
        command -v python3 || command -v python || die "no python found; pass one as argument"
    fi
}

PYTHON="$(pick_python "${1:-}")"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v "$PYTHON" || true)"
[[ -n "$PYTHON" && -x "$PYTHON" ]] || die "python '${1:-}' is not an executable"
PY_BIN_DIR="$(dirname "$PYTHON")"

horovod_works() {
    "$PYTHON" -c "import horovod.torch" >/dev/null 2>&1
}

verify() {
    "$PYTHON" - <<'EOF'
import horovod, horovod.torch as hvd
missing = [name for name, built in (("MPI", hvd.mpi_built()), ("Gloo", hvd.gloo_built())) if not built]
if missing:
    raise SystemExit(f"install-horovod: error: horovod {horovod.__version__} lacks {', '.join(missing)}")
print(f"install-horovod: horovod {horovod.__version__} with PyTorch, MPI and Gloo is importable")
EOF
    if [[ -x "$PY_BIN_DIR/horovodrun" ]]; then
        "$PY_BIN_DIR/horovodrun" --check-build >&2 || true
    fi
}

if horovod_works; then
    log "horovod.torch already imports with $PYTHON; nothing to do"
    verify
    exit 0
fi

"$PYTHON" -c "import torch" 2>/dev/null \
    || die "torch is not importable with $PYTHON; install torch first (Horovod builds against it)"

read -r TORCH_VERSION PY_VERSION PLATFORM < <("$PYTHON" - <<'EOF'
import sys, sysconfig, torch
print(torch.__version__, f"{sys.version_info[0]}.{sys.version_info[1]}", sysconfig.get_platform())
EOF
)
CACHE_ROOT="${HPCTRAIN_CACHE:-$HOME/.cache/hpctrain}"
CACHE_KEY="horovod-${HOROVOD_VERSION}_torch-${TORCH_VERSION}_py${PY_VERSION}_${PLATFORM}"
WHEEL_DIR="$CACHE_ROOT/wheels/$CACHE_KEY"
mkdir -p "$CACHE_ROOT/wheels"

# Two concurrent runs (e.g. CI jobs sharing a cache) must not both build or read a half-copied wheel.
exec 9>"$CACHE_ROOT/wheels/.horovod.lock"
if command -v flock >/dev/null; then
    flock -n 9 || { log "another install holds $CACHE_ROOT/wheels/.horovod.lock; waiting"; flock 9; }
fi

cached_wheel() {
    compgen -G "$WHEEL_DIR/horovod-${HOROVOD_VERSION}-*.whl" | head -n 1 || true
}

ensure_build_tools() {
    local missing_pkgs=()
    command -v c++ >/dev/null || command -v g++ >/dev/null || missing_pkgs+=(g++)
    command -v mpicxx >/dev/null || missing_pkgs+=(libopenmpi-dev openmpi-bin)
    command -v make >/dev/null || missing_pkgs+=(make)
    if [[ ${#missing_pkgs[@]} -gt 0 ]]; then
        if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
            log "installing ${missing_pkgs[*]} with apt-get"
            apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing_pkgs[@]}"
        else
            die "missing build tools (${missing_pkgs[*]}); install them (Debian: apt-get install ${missing_pkgs[*]})"
        fi
    fi
    if ! command -v cmake >/dev/null && [[ ! -x "$PY_BIN_DIR/cmake" ]]; then
        log "cmake not found; installing it with pip into $PY_BIN_DIR"
        "$PYTHON" -m pip install -q "cmake>=3.13"
    fi
}

build_wheel() {
    ensure_build_tools
    local work
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    log "downloading the horovod $HOROVOD_VERSION source distribution"
    "$PYTHON" -m pip download -q --no-binary :all: --no-deps -d "$work/sdist" "horovod==$HOROVOD_VERSION"
    tar -xzf "$work"/sdist/horovod-"$HOROVOD_VERSION".tar.gz -C "$work"
    local src="$work/horovod-$HOROVOD_VERSION"
    local f
    for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
        sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
        grep -q 'set(CMAKE_CXX_STANDARD 17)' "$f" || die "could not raise the C++ standard to 17 in $f"
    done
    log "building horovod $HOROVOD_VERSION against torch $TORCH_VERSION (several minutes)"
    mkdir -p "$work/wheel"
    PATH="$PY_BIN_DIR:$PATH" \
    MAKEFLAGS="-j${HOROVOD_BUILD_JOBS:-$(nproc)}" \
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
        "$PYTHON" -m pip wheel --no-build-isolation --no-deps -w "$work/wheel" "$src"
    # Copy next to the cache folder, then rename: a reader never sees a partial wheel.
    rm -rf "$WHEEL_DIR.tmp" && mkdir -p "$WHEEL_DIR.tmp"
    cp "$work"/wheel/horovod-*.whl "$WHEEL_DIR.tmp/"
    rm -rf "$WHEEL_DIR" && mv "$WHEEL_DIR.tmp" "$WHEEL_DIR"
    rm -rf "$work"
    trap - EXIT
}

WHEEL="$(cached_wheel)"
if [[ -z "$WHEEL" || "${HOROVOD_FORCE_BUILD:-0}" == 1 ]]; then
    build_wheel
    WHEEL="$(cached_wheel)"
    [[ -n "$WHEEL" ]] || die "the build produced no wheel in $WHEEL_DIR"
    log "cached $WHEEL"
else
    log "using the cached wheel $WHEEL"
fi

# With dependencies: Horovod's small runtime requirements (cloudpickle, psutil, pyyaml, packaging)
# come from the index; torch is not among them, so the installed torch stays.
"$PYTHON" -m pip install -q "$WHEEL"
horovod_works || die "horovod.torch does not import after installing $WHEEL"
verify
