#!/usr/bin/env bash
# The GPU check: the CUDA paths tested and the GPU throughput measured in one short run.
#
#   scripts/gpu-check.sh OUTDIR          # from a copy of the repository, no install needed
#
# Runs from the repository root with PYTHONPATH=. and the python on PATH (PYTHON=... to pick
# another), in under 8 minutes on one H100/H200:
#   1. the card, driver and versions;
#   2. an import check: hpctrain.runner, hpctrain.cli and load_best's modules import
#      without submitit and horovod (the GPU machine has neither);
#   3. python -m pytest -m gpu tests/test_gpu.py (python tests/test_gpu.py without pytest);
#   4. scripts/bench/gpu_throughput.py: Trainer vs a plain loop, loader vs the GPU's steps;
#   5. for information, the CPU loader benchmark and the steadiness probe on this node's
#      cores (scripts/bench/loader.py, steadiness.py): the loader's goal against raw h5py
#      reads, measured on real cores where the 2-core development VM cannot show it.
# Writes OUTDIR/gpu-check.txt and OUTDIR/gpu-check.json (the summary), and the logs,
# test report and benchmark figures beside them. Exit 0 when every part passed; the
# benchmark's goals are reported, not enforced.
#
# Without a GPU it says so in one line, runs the import check, the tests (they skip, or run
# on the CPU with HPCTRAIN_GPU_CHECK_DRY=1) and the benchmark harness small on the CPU.
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: scripts/gpu-check.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
PY=${PYTHON:-$(command -v python || command -v python3)}
T0=$(date +%s)

# The GPU machine lacks these: stand-ins that fail to import as a missing package does, so
# that a machine which has them (this project's CPU machines) runs the check as it runs there.
STUBS=$(mktemp -d)
trap 'rm -rf "$STUBS"' EXIT
for name in submitit horovod tensorboard; do
    mkdir -p "$STUBS/$name"
    echo "raise ModuleNotFoundError(\"No module named '$name' (left out by scripts/gpu-check.sh)\", name='$name')" \
        > "$STUBS/$name/__init__.py"
done
export PYTHONPATH="$STUBS:$REPO"
export PYTHONUNBUFFERED=1

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    HAS_GPU=1
else
    HAS_GPU=0
    echo "gpu-check: no CUDA GPU on this machine: the GPU tests skip$([ "${HPCTRAIN_GPU_CHECK_DRY:-}" = 1 ] && echo ' (run on the CPU: HPCTRAIN_GPU_CHECK_DRY=1)') and the benchmark runs small on the CPU"
fi

elapsed() { echo $(( $(date +%s) - T0 )); }

# ------------------------------------------------------------------ 1. the machine
"$PY" - "$OUT/device.json" <<'EOF'
import json, platform, shutil, subprocess, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "gpu": torch.cuda.is_available(), "host": platform.node()}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(card=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                capability=f"{props.major}.{props.minor}", devices=torch.cuda.device_count())
    try:  # a tuple in recent torch, an int in older ones
        version = torch.cuda.nccl.version()
        info["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        info["cudnn"] = torch.backends.cudnn.version()
    except Exception as exc:
        info["nccl"] = f"unknown ({type(exc).__name__})"
if shutil.which("nvidia-smi"):
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        info["driver"] = out.stdout.strip().splitlines()[0].split(",")[-1].strip()
if "driver" not in info:
    try:  # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.86.15  ..."
        words = open("/proc/driver/nvidia/version").readline().split()
        info["driver"] = next(w for w in words if w[:1].isdigit() and "." in w)
    except (OSError, StopIteration):
        pass
try:
    import numpy, h5py
    info.update(numpy=numpy.__version__, h5py=h5py.__version__)
except ImportError as exc:
    info["missing"] = str(exc)
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(f"card {info.get('card', 'none (CPU only)')}, driver {info.get('driver', '-')}, torch {info['torch']} "
      f"(CUDA {info['cuda_runtime']}), python {info['python']}")
EOF

# ------------------------------------------------------------------ 2. imports without submitit/horovod
"$PY" - "$OUT/imports.json" <<'EOF' 2>&1 | tee "$OUT/imports.log"
import json, sys, traceback

BLOCKED = ("submitit", "horovod")
attempts = []

class Block:
    """Refuses submitit and horovod and remembers who asked, so an import at module level is named."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            stack = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()[:-1]
                     if "/hpctrain/" in f.filename.replace("\\", "/")]
            attempts.append({"module": name, "from": stack[-3:]})
            raise ImportError(f"{name} is blocked by the import check")
        return None

sys.meta_path.insert(0, Block())
errors = {}
for module in ("hpctrain.runner", "hpctrain.cli", "hpctrain.commands.run", "hpctrain.launch.element",
               "hpctrain.collect", "hpctrain.report.loading", "hpctrain.dist.backends", "hpctrain"):
    try:
        __import__(module)
    except Exception as exc:
        errors[module] = f"{type(exc).__name__}: {exc}"
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
ok = not attempts and not errors and not loaded
json.dump({"ok": ok, "attempts": attempts, "errors": errors, "loaded": loaded}, open(sys.argv[1], "w"), indent=1)
if ok:
    print("import check: ok (hpctrain.runner, hpctrain.cli and load_best's modules import without submitit/horovod)")
else:
    print(f"import check: FAILED: attempts {attempts}, errors {errors}, loaded {loaded}")
sys.exit(0 if ok else 1)
EOF
IMPORTS_RC=${PIPESTATUS[0]}

# ------------------------------------------------------------------ 3. the GPU tests
echo "gpu-check: tests ($(elapsed) s)"
if "$PY" -c "import pytest" 2>/dev/null; then
    timeout -k 10 300 "$PY" -m pytest -m gpu tests/test_gpu.py -v -rs -p no:cacheprovider --durations=0 \
        --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"
    TESTS_RC=${PIPESTATUS[0]}
else
    echo "gpu-check: pytest is not installed: running tests/test_gpu.py on its own"
    timeout -k 10 300 "$PY" tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log"
    TESTS_RC=${PIPESTATUS[0]}
fi

# ------------------------------------------------------------------ 4. the throughput benchmark
echo "gpu-check: benchmark ($(elapsed) s)"
if [ "$HAS_GPU" = 1 ]; then
    BENCH_ARGS=(--device cuda)
else
    BENCH_ARGS=(--device cpu --quick)
fi
timeout -k 10 150 "$PY" scripts/bench/gpu_throughput.py "${BENCH_ARGS[@]}" --json "$OUT/gpu_throughput.json" 2>&1 \
    | tee "$OUT/gpu_throughput.log"
BENCH_RC=${PIPESTATUS[0]}

# ------------------------------------------------------------------ 5. the CPU loader, for information
echo "gpu-check: CPU loader and steadiness ($(elapsed) s)"
timeout -k 10 60 "$PY" scripts/bench/steadiness.py --json "$OUT/steadiness.json" > "$OUT/steadiness.log" 2>&1
timeout -k 10 180 "$PY" scripts/bench/loader.py --rounds 3 > "$OUT/loader.log" 2>&1
LOADER_RC=$?
grep -E '^\(b\)/\(a\)|^\(b\)/\(c\)|^one thread' "$OUT/loader.log"

# ------------------------------------------------------------------ summary
"$PY" - "$OUT" "$IMPORTS_RC" "$TESTS_RC" "$BENCH_RC" "$(elapsed)" "$LOADER_RC" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, imports_rc, tests_rc, bench_rc, seconds, loader_rc = Path(sys.argv[1]), *map(int, sys.argv[2:7])

def read_json(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None

device = read_json("device.json") or {}
bench = read_json("gpu_throughput.json")
tests = {"exit": tests_rc}
try:
    suite = ET.parse(out / "gpu-tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    tests["cases"] = {f"{c.get('name')}": ("failed" if c.find("failure") is not None or c.find("error") is not None
                                         else "skipped" if c.find("skipped") is not None else "passed")
                      for c in suite.iter("testcase")}
except (OSError, ET.ParseError, AttributeError):
    # tests/test_gpu.py run without pytest prints one PASSED/FAILED line per case
    try:
        log = (out / "gpu-tests.log").read_text(errors="replace").splitlines()
    except OSError:
        log = []
    cases = {ln.split(" ", 1)[1]: ln.split(" ", 1)[0].lower() for ln in log
             if ln.startswith(("PASSED ", "FAILED ")) and " " in ln}
    if cases:
        failed = sum(v == "failed" for v in cases.values())
        tests.update(tests=len(cases), failures=failed, errors=0, skipped=0, cases=cases)
try:
    loader_lines = [" ".join(ln.split()) for ln in (out / "loader.log").read_text(errors="replace").splitlines()
                    if ln.startswith(("(b)/(a)", "(b)/(c)"))]
except OSError:
    loader_lines = []
summary = {"device": device, "imports_ok": imports_rc == 0, "imports": read_json("imports.json"), "tests": tests,
           "benchmark": bench, "benchmark_exit": bench_rc, "seconds": seconds,
           "cpu_loader": {"exit": loader_rc, "lines": loader_lines}, "steadiness": read_json("steadiness.json")}
summary["ok"] = imports_rc == 0 and tests_rc == 0 and bench_rc == 0 and bench is not None
(out / "gpu-check.json").write_text(json.dumps(summary, indent=1) + "\n")

lines = [f"card: {device.get('card', 'none (no CUDA GPU on this machine)')}",
         f"driver: {device.get('driver', '-')}",
         f"torch: {device.get('torch')} (CUDA {device.get('cuda_runtime')}, NCCL {device.get('nccl', '-')}), "
         f"python {device.get('python')}",
         f"import check (no submitit/horovod): {'ok' if imports_rc == 0 else 'FAILED'}"]
if "tests" in tests:
    lines.append(f"gpu tests: {tests['tests']} run, {tests['failures'] + tests['errors']} failed, "
                 f"{tests['skipped']} skipped (exit {tests_rc})")
    lines += [f"  {state:7} {name}" for name, state in tests.get("cases", {}).items()]
else:
    lines.append(f"gpu tests: exit {tests_rc} (see gpu-tests.log)")
if bench:
    lines += [f"benchmark: {bench['card']}, MLP {bench['model']}, {bench['precision']}, batch {bench['batch']}"
              + (" (--quick: harness check, not a measurement)" if bench.get("quick") else ""),
              f"  trainer / plain loop: {bench['trainer_vs_plain']:.3f} (goal >= {bench['trainer_goal']}: "
              f"{'met' if bench['trainer_goal_met'] else 'not met'})",
              f"  loader / GPU step: {bench['loader_vs_step']:.2f}x (goal >= {bench['loader_goal']}: "
              f"{'met' if bench['loader_goal_met'] else 'not met'}); loader {bench['loader_rows_per_s']:,.0f} rows/s, "
              f"steps {bench['gpu_step_rows_per_s']:,.0f} rows/s",
              f"  trainer on the live loader / plain loop: {bench['trainer_live_vs_plain']:.3f}"]
else:
    lines.append(f"benchmark: FAILED (exit {bench_rc}, see gpu_throughput.log)")
lines.append(f"CPU loader (for information, exit {loader_rc}): " + ("; ".join(loader_lines) or "no figures"))
lines.append(f"result: {'ok' if summary['ok'] else 'FAILED'} in {seconds} s")
text = "\n".join(lines) + "\n"
(out / "gpu-check.txt").write_text(text)
print("\n" + text, end="")
sys.exit(0 if summary["ok"] else 1)
EOF
exit $?
