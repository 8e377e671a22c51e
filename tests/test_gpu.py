"""The CUDA paths on a real GPU: device placement, autocast and GradScaler, exact resume,
a GPU checkpoint loaded on a CPU-only process, NCCL under torchrun, pinned-memory copies.

    python -m pytest -m gpu tests/test_gpu.py            # scripts/gpu-check.sh runs this
    HPCTRAIN_GPU_CHECK_DRY=1 python -m pytest -m gpu tests/test_gpu.py   # same bodies on the CPU
    python tests/test_gpu.py                              # where pytest is not installed

Without a GPU every test skips ("no CUDA GPU on this machine") unless
HPCTRAIN_GPU_CHECK_DRY=1, which runs the same bodies on the CPU: device "cpu", Gloo for
NCCL, no stream stall. The GPU machine gets one short run, so everything but the
device-specific expectations is proven there first.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import yaml

try:
    import pytest
except ImportError:  # the GPU machine may lack it; __main__ below runs the tests without it
    pytest = None

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mpi_scripts.launch import clean_env  # noqa: E402

PYTHON = sys.executable
HELPER = HERE / "mpi_scripts" / "gpu_run.py"
HAS_CUDA = torch.cuda.is_available()
DRY = os.environ.get("HPCTRAIN_GPU_CHECK_DRY") == "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"
SKIP_REASON = "no CUDA GPU on this machine"
EPOCHS = 3

if pytest is not None:
    pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (HAS_CUDA or DRY), reason=SKIP_REASON)]


def parametrize(name: str, values: list):
    """pytest's parametrize, remembered for the runner below when pytest is absent."""
    def mark(fn):
        fn.gpu_check_params = (name, list(values))
        return pytest.mark.parametrize(name, values)(fn) if pytest is not None else fn
    return mark


# ---------------------------------------------------------------------------- shared data and runs

_SESSION: dict = {}


def session_dir() -> Path:
    if "dir" not in _SESSION:
        path = Path(tempfile.mkdtemp(prefix="hpctrain-gpu-check-"))
        atexit.register(shutil.rmtree, path, True)
        _SESSION["dir"] = path
    return _SESSION["dir"]


def dataset() -> Path:
    """16,000 train rows (62 batches of 256), 2,000 val, 2,000 test, binary, 16 features, 4 shards."""
    if "data" not in _SESSION:
        from hpctrain.data.synthetic import make_synthetic

        _SESSION["data"] = make_synthetic(session_dir() / "data", rows=20000, features=16, task="binary",
                                          shards=4, seed=0)
    return _SESSION["data"]


def write_config(folder: Path, precision: str, *, name: str = "gpucheck", backend: str = "none",
                 **train) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"name": name, "seed": 0,
           "data": {"path": str(dataset()), "task": "binary", "batch_size": 256},
           "model": {"hidden": [64, 64], "dropout": 0.1},
           "optim": {"name": "adam", "lr": 3e-3},
           # train.device cuda, not auto: a run that silently fell back to the CPU must fail here
           "train": {"epochs": EPOCHS, "precision": precision, "device": DEVICE, **train},
           "dist": {"backend": backend, "timeout_s": 120}}
    path = folder / f"{name}-{precision}-{backend}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def expected_device() -> torch.device:
    """cuda:(local rank mod visible GPUs), the rule of hpctrain.dist.select_device."""
    from hpctrain.dist import discover

    if not HAS_CUDA:
        return torch.device("cpu")
    return torch.device("cuda", discover().local_rank % torch.cuda.device_count())


def read_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Every row of a split straight from its HDF5 shards, in file order."""
    import h5py

    from hpctrain.data.shards import open_dataset

    ds = open_dataset(dataset())
    xs, ys = [], []
    for info in ds.shards(split):
        with h5py.File(info.path, "r") as f:
            xs.append(f["x"][:])
            ys.append(f["y"][:])
    return np.concatenate(xs), np.concatenate(ys)


def metrics_rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, map(float, line.split(",")))) for line in lines[1:]]


def check_learning(run_dir: Path) -> list[dict]:
    rows = metrics_rows(run_dir)
    assert len(rows) == EPOCHS, rows
    losses = [r["train_loss"] for r in rows]
    assert all(math.isfinite(v) for r in rows for v in r.values()), rows
    assert losses[-1] < losses[0], f"train_loss did not decrease: {losses}"
    assert rows[-1]["val_accuracy"] > 0.7, rows[-1]
    return rows


def run_cli(config: Path, sweep: Path, *args: str, env: dict | None = None, timeout: float = 240):
    """`python -m hpctrain run`, from the repository root with PYTHONPATH=. and no install."""
    return subprocess.run([PYTHON, "-m", "hpctrain", "run", str(config), "--sweep-dir", str(sweep), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env or clean_env())


def cli_run() -> Path:
    """One bf16 run through `hpctrain run`, shared by the tests that read its results."""
    if "cli" not in _SESSION:
        folder = session_dir() / "cli"
        out = run_cli(write_config(folder, "bf16"), folder / "sweep")
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        (run_dir,) = (folder / "sweep" / "runs").iterdir()
        _SESSION["cli"] = run_dir
    return _SESSION["cli"]


def tail(out: subprocess.CompletedProcess) -> str:
    return f"exit {out.returncode}\n--- stdout ---\n{out.stdout[-3000:]}\n--- stderr ---\n{out.stderr[-3000:]}"


# ---------------------------------------------------------------------------- device placement


def test_select_device_takes_the_local_rank_modulo_the_visible_gpus():
    from hpctrain.dist import select_device

    for local_rank in range(4):
        device = select_device(DEVICE, local_rank)
        if HAS_CUDA:
            assert device == torch.device("cuda", local_rank % torch.cuda.device_count())
            assert torch.cuda.current_device() == device.index  # NCCL and new tensors go there
        else:
            assert device == torch.device("cpu")
    select_device(DEVICE, 0)


@parametrize("precision", ["bf16", "fp16"])
def test_runner_trains_on_the_device_with_autocast(precision):
    """prepare_sweep + run_spec: model, batches and outputs on cuda:<local_rank>, the autocast
    dtype, a GradScaler for fp16 on CUDA only, a finite loss that falls."""
    from hpctrain.runner import pick, prepare_sweep, run_spec
    from hpctrain.train.step import TrainStep

    folder = session_dir() / f"runner-{precision}"
    sweep, _, specs = prepare_sweep(write_config(folder, precision), [], folder / "sweep")
    seen: list[dict] = []
    original = TrainStep.__call__

    def recording(self, x, y, w):
        result = original(self, x, y, w)
        if len(seen) < 3:
            seen.append({"x": x.device, "y": y.device, "param": next(self.raw_model.parameters()).device,
                         "out": result.out.device, "out_dtype": result.out.dtype, "scaler": self.scaler})
        return result

    with mock.patch.object(TrainStep, "__call__", recording):
        state = run_spec(sweep, pick(specs, 0), log=lambda m: None)
    assert state.status == "done", state.message
    want = expected_device()
    assert seen, "TrainStep was never called"
    for s in seen:
        assert (s["x"], s["y"], s["param"], s["out"]) == (want, want, want, want), s
        assert s["out_dtype"] == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision], s
    scaler = seen[0]["scaler"]
    if precision == "fp16" and HAS_CUDA:
        assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
        assert math.isfinite(scaler.get_scale()) and scaler.get_scale() > 0
    else:
        assert not scaler.is_enabled()  # bf16 needs no loss scaling; CPU fp16 autocast has no scaler
    run_dir = sweep.run_dir(pick(specs, 0).run_id)
    check_learning(run_dir)
    last = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ("scaler" in last) == (precision == "fp16" and HAS_CUDA)


# ---------------------------------------------------------------------------- checkpoints


def test_cli_run_writes_gpu_checkpoints_that_load_best_reads_on_a_cpu_only_process(tmp_path):
    run_dir = cli_run()
    check_learning(run_dir)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "done", state
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True,
                      map_location=None if HAS_CUDA else "cpu")
    assert {t.device.type for t in best["model"].values()} == {DEVICE}, "best.pt was not written from the device"

    x, y = read_split("val")
    np.save(tmp_path / "x.npy", x[:512])
    child = ("import json, sys, numpy as np, torch, hpctrain\n"
             "assert not torch.cuda.is_available(), 'CUDA_VISIBLE_DEVICES= should hide every GPU'\n"
             "m = hpctrain.load_best(sys.argv[1], device='cpu')\n"
             "out = m(torch.from_numpy(np.load(sys.argv[2])))\n"
             "tensors = list(m.parameters()) + list(m.buffers())\n"
             "print(json.dumps({'devices': sorted({str(t.device) for t in tensors}), 'out': out.tolist(),\n"
             "                  'run_id': m.info.get('run_id')}))\n")
    out = subprocess.run([PYTHON, "-c", child, str(run_dir.parent.parent), str(tmp_path / "x.npy")],
                         capture_output=True, text=True, timeout=120, cwd=REPO,
                         env=clean_env(CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, tail(out)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["devices"] == ["cpu"], got["devices"]
    assert got["run_id"] == run_dir.name

    import hpctrain

    here = hpctrain.load_best(run_dir.parent.parent, device=DEVICE)
    with torch.no_grad():
        ref = here(torch.from_numpy(x[:512])).float().cpu()
    cpu_out = torch.tensor(got["out"])
    assert torch.allclose(cpu_out, ref, rtol=1e-3, atol=1e-3), (cpu_out - ref).abs().max()
    accuracy = ((cpu_out > 0).long().numpy() == y[:512]).mean()
    assert accuracy > 0.7, accuracy


@parametrize("precision", ["bf16", "fp16"])
def test_exact_resume_of_a_device_run(tmp_path, precision):
    """Stopped mid-epoch twice and resumed: the same metrics.csv (bytes) and weights as one run,
    with deterministic algorithms (CUBLAS_WORKSPACE_CONFIG=:4096:8), dropout and shuffling on."""
    config = write_config(tmp_path, precision)
    # 62 steps an epoch: the first stop is in epoch 1, the second 45 steps later in epoch 2
    out = subprocess.run([PYTHON, str(HELPER), "resume", str(config), str(tmp_path), "40", "45"],
                         capture_output=True, text=True, timeout=300, cwd=REPO,
                         env=clean_env(CUBLAS_WORKSPACE_CONFIG=":4096:8"))
    assert out.returncode == 0, tail(out)
    result = json.loads((tmp_path / "resume.json").read_text())
    assert result["deterministic"]
    assert result["ref"]["status"] == "done"
    attempts = result["attempts"]
    assert [a["status"] for a in attempts] == ["preempted", "preempted", "done"], attempts
    assert 0 < attempts[0]["step"] < attempts[1]["step"] < result["ref"]["step"] == attempts[2]["step"], attempts
    assert "resumed from last.pt" in out.stdout
    ref_dir, cut_dir = Path(result["ref_dir"]), Path(result["cut_dir"])
    assert (cut_dir / "metrics.csv").read_bytes() == (ref_dir / "metrics.csv").read_bytes(), \
        (ref_dir / "metrics.csv").read_text() + "\n---\n" + (cut_dir / "metrics.csv").read_text()
    check_learning(ref_dir)
    for name in ("last.pt", "best.pt"):
        a = torch.load(ref_dir / "checkpoints" / name, map_location="cpu", weights_only=True)
        b = torch.load(cut_dir / "checkpoints" / name, map_location="cpu", weights_only=True)
        differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
        assert not differ, f"{name}: {differ}"
        if precision == "fp16" and HAS_CUDA:
            assert a["scaler"] == b["scaler"], (a["scaler"], b["scaler"])


# ---------------------------------------------------------------------------- torch.distributed


def test_torch_backend_under_torchrun_uses_nccl_and_exits_cleanly(tmp_path):
    config = write_config(tmp_path, "bf16", backend="torch", max_steps=5)
    out_json = tmp_path / "record.json"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(HELPER), "record", str(config), str(tmp_path / "sweep"), str(out_json)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO, env=clean_env())
    assert out.returncode == 0, tail(out)
    seen = json.loads(out_json.read_text())
    assert seen["env"]["LOCAL_RANK"] == "0" and seen["env"]["MASTER_ADDR"], seen
    assert seen["backend"] == "torch", seen
    want_group = "nccl" if HAS_CUDA else "gloo"
    assert seen["pg_backend"] == want_group and seen["group_backend"] == want_group, seen
    device = str(torch.device("cuda", 0)) if HAS_CUDA else "cpu"
    assert seen["backend_device"] == seen["x_device"] == seen["y_device"] == seen["param_device"] == device, seen
    assert seen["model_type"] == "DistributedDataParallel", seen
    assert seen["status"] == "done" and seen["step"] == 5, seen
    assert seen["group_left"], "the process group was still initialised after the run"
    for bad in ("destroy_process_group() was not called", "terminate called", "Traceback"):
        assert bad not in out.stderr, tail(out)


# ---------------------------------------------------------------------------- the loader


@contextlib.contextmanager
def stalled_stream():
    """Hold the device's stream busy (about a second) so that every copy the loader enqueues
    is still pending while it goes on reading into its buffers: a buffer reused before its
    copy ran shows up as wrong values. On the CPU there is nothing to stall."""
    if not HAS_CUDA:
        yield lambda: None
        return
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # GPU clock cycles
    yield lambda: not torch.cuda.current_stream().query()
    torch.cuda.synchronize()


def epoch_on_device(loader, stall: bool) -> tuple[list, bool]:
    """One epoch's batches, kept; whether the stream was still busy after the first batch."""
    if stall:
        # an epoch first, so that the pinned buffers come from torch's host cache and not
        # from a fresh cudaHostAlloc while the stream is held
        for _ in loader:
            pass
    batches, busy = [], None
    context = stalled_stream() if stall else contextlib.nullcontext(lambda: None)
    with context as still_busy:
        for i, batch in enumerate(loader):
            batches.append(batch)
            if i == 0:
                busy = still_busy()
    return batches, bool(busy)


def loader_for(split: str, device, **kw):
    from hpctrain.data.loader import ShardLoader

    # small blocks and buffers: many rounds, so the loader's few buffers are reused many times
    kw.setdefault("standardize", False)
    return ShardLoader(dataset(), split=split, device=device, block_rows=64, buffer_blocks=2, prefetch=4, **kw)


@parametrize("stall", [False, True])
def test_loader_copies_to_the_device_give_the_hdf5_rows(stall):
    device = expected_device()
    x_ref, y_ref = read_split("val")
    batches, busy = epoch_on_device(loader_for("val", device, batch_size=64, shuffle=False), stall)
    assert batches and all(b.x.device == device and b.y.device == device for b in batches)
    if stall and HAS_CUDA:
        # the first batches came back while the stream was still held: the copies did not
        # wait for it, so they come from page-locked memory
        assert busy, "the loader's copies to the GPU blocked: its buffers are not pinned"
    x = torch.cat([b.x for b in batches]).cpu().numpy()
    y = torch.cat([b.y for b in batches]).cpu().numpy()
    assert x.shape == x_ref.shape
    bad = np.flatnonzero((x != x_ref).any(axis=1))
    assert len(bad) == 0, f"{len(bad)} of {len(x)} val rows differ from the HDF5 rows, first at row {bad[0]}"
    assert np.array_equal(y, y_ref)

    # the train split: shuffled and gathered into batches; the same batches as on the CPU
    train = loader_for("train", device, batch_size=256, shuffle=True, seed=3)
    train.set_epoch(1)
    batches, _ = epoch_on_device(train, stall)
    cpu = loader_for("train", "cpu", batch_size=256, shuffle=True, seed=3)
    cpu.set_epoch(1)
    ref = list(cpu)
    assert len(batches) == len(ref) > 0
    wrong = [i for i, (a, b) in enumerate(zip(batches, ref))
             if not (torch.equal(a.x.cpu(), b.x) and torch.equal(a.y.cpu(), b.y))]
    assert not wrong, f"{len(wrong)} of {len(ref)} train batches differ from the CPU loader's, first {wrong[0]}"
    # read and gathered in pieces on several threads (a GPU loader's default): the same batches
    from hpctrain.data import loader as loader_module

    with mock.patch.object(loader_module._Pieces, "MIN_PIECE_BYTES", 1):  # rows this short: cut anyway
        threaded = loader_for("train", device, batch_size=256, shuffle=True, seed=3, threads=4)
        threaded.set_epoch(1)
        pieces, _ = epoch_on_device(threaded, stall)
    assert len(pieces) == len(ref)
    wrong = [i for i, (a, b) in enumerate(zip(pieces, ref))
             if not (torch.equal(a.x.cpu(), b.x) and torch.equal(a.y.cpu(), b.y))]
    assert not wrong, f"{len(wrong)} of {len(ref)} batches read on 4 threads differ, first {wrong[0]}"
    # standardised on the device after the copy: the CPU loader's values, up to rounding
    on_device = loader_for("train", device, batch_size=256, shuffle=True, seed=3, standardize=True)
    on_cpu = loader_for("train", "cpu", batch_size=256, shuffle=True, seed=3, standardize=True)
    on_device.set_epoch(1)
    on_cpu.set_epoch(1)
    for a, b, raw in zip(on_device, on_cpu, ref):
        assert a.x.device == device and not torch.allclose(b.x, raw.x)  # really standardised
        assert torch.allclose(a.x.cpu(), b.x, rtol=1e-5, atol=1e-5) and torch.equal(a.y.cpu(), b.y)
    xt, yt = read_split("train")
    rows = {r.tobytes(): int(label) for r, label in zip(xt, yt)}
    got = torch.cat([b.x for b in batches]).cpu().numpy()
    labels = torch.cat([b.y for b in batches]).cpu().numpy()
    assert all(rows.get(r.tobytes()) == int(label) for r, label in zip(got, labels))


def test_epoch_metrics_reduced_on_the_device_equal_those_reduced_on_the_cpu():
    from hpctrain.dist.backends import NoneBackend
    from hpctrain.train.losses import MetricSums

    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(4096, generator=g).to(torch.bfloat16) for _ in range(6)]  # ties, as bf16 logits have
    labels = [(torch.rand(4096, generator=g) > 0.4).long() for _ in range(6)]
    losses = [torch.rand((), generator=g) for _ in range(6)]
    results = []
    for where in ("cpu", expected_device()):
        sums = MetricSums("binary", where)
        for out, y, loss in zip(outs, labels, losses):
            sums.add(out.to(where), y.to(where), loss.to(where), len(y))
        results.append(sums.compute(NoneBackend(device_preference="cpu"), "train"))
    cpu, device = results
    assert cpu.keys() == device.keys() == {"train_loss", "train_accuracy", "train_auc"}
    assert device["train_accuracy"] == cpu["train_accuracy"] and device["train_auc"] == cpu["train_auc"]
    assert math.isclose(device["train_loss"], cpu["train_loss"], rel_tol=1e-12)
    assert 0.45 < cpu["train_auc"] < 0.55  # random scores


# ---------------------------------------------------------------------------- without pytest


def _main() -> int:
    """Run every test of this file in order (the GPU machine may have no pytest)."""
    if not (HAS_CUDA or DRY):
        print(f"SKIPPED: {SKIP_REASON}")
        return 0
    failed = 0
    for name, fn in list(globals().items()):
        if not (name.startswith("test_") and callable(fn)):
            continue
        param = getattr(fn, "gpu_check_params", None)
        cases = [{param[0]: v} for v in param[1]] if param else [{}]
        for case in cases:
            label = name + (f"[{next(iter(case.values()))}]" if case else "")
            kwargs = dict(case)
            if "tmp_path" in fn.__code__.co_varnames[:fn.__code__.co_argcount]:
                kwargs["tmp_path"] = Path(tempfile.mkdtemp(dir=session_dir()))
            try:
                fn(**kwargs)
                print(f"PASSED {label}", flush=True)
            except Exception:
                import traceback

                failed += 1
                print(f"FAILED {label}\n{traceback.format_exc()}", flush=True)
    print(f"{failed} failed" if failed else "all passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main())
