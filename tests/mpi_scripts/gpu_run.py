"""Whole runs for tests/test_gpu.py that need a process of their own, through the real runner
(prepare_sweep + run_spec, as `hpctrain run` calls them).

    gpu_run.py resume CONFIG OUT_DIR STOP [STOP ...]   # OUT_DIR/ref uninterrupted, OUT_DIR/cut stopped and resumed
    gpu_run.py record CONFIG SWEEP_DIR OUT_JSON         # one run; backend, devices and status to OUT_JSON

``resume`` turns on deterministic algorithms before torch touches the GPU: cuBLAS reads
CUBLAS_WORKSPACE_CONFIG when its handle is created, so it must be set in this process
before the first matmul, which an in-process test cannot promise. ``record`` is what
tests/test_gpu.py starts under torchrun.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class StopAfter:
    """Reads as requested from the n-th read on: the trainer reads it once per step boundary,
    so a one-process run stops after its n-th step of this attempt, at the same step every time."""

    signal_name = "gpu-check stop"

    def __init__(self, n: int):
        self.n, self.reads = n, 0

    @property
    def requested(self) -> bool:
        self.reads += 1
        return self.reads >= self.n


def run(config: str, sweep_dir: Path, stop_flag=None):
    from hpctrain.runner import pick, prepare_sweep, run_spec

    sweep, _, specs = prepare_sweep(config, [], sweep_dir)
    spec = pick(specs, 0)
    state = run_spec(sweep, spec, stop_flag=stop_flag, log=lambda m: print(m, flush=True))
    return sweep.run_dir(spec.run_id), state


def resume(config: str, out: Path, stops: list[int]) -> int:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    torch.use_deterministic_algorithms(True)
    ref_dir, ref = run(config, out / "ref")
    attempts = []
    for n in stops:
        cut_dir, state = run(config, out / "cut", StopAfter(n))
        attempts.append({"status": state.status, "step": state.step, "message": state.message})
    cut_dir, final = run(config, out / "cut")
    attempts.append({"status": final.status, "step": final.step, "message": final.message})
    result = {"ref_dir": str(ref_dir), "cut_dir": str(cut_dir), "ref": {"status": ref.status, "step": ref.step},
              "attempts": attempts, "deterministic": torch.are_deterministic_algorithms_enabled()}
    (out / "resume.json").write_text(json.dumps(result, indent=1))
    return 0


def record(config: str, sweep_dir: Path, out_json: Path) -> int:
    import torch
    import torch.distributed as dist

    import hpctrain.runner as runner
    from hpctrain.dist import discover
    from hpctrain.train.step import TrainStep

    seen: dict = {"env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}}
    make_backend = runner.make_run_backend
    step = TrainStep.__call__

    def recording_backend(cfg, log=print):
        backend = make_backend(cfg, log)
        seen.update(backend=backend.name, pg_backend=getattr(backend, "pg_backend", None),
                    backend_device=str(backend.device),
                    group_backend=dist.get_backend() if dist.is_available() and dist.is_initialized() else None)
        return backend

    def recording_step(self, x, y, w):
        result = step(self, x, y, w)
        if "x_device" not in seen:
            seen.update(x_device=str(x.device), y_device=str(y.device),
                        param_device=str(next(self.raw_model.parameters()).device),
                        model_type=type(self.model).__name__, out_dtype=str(result.out.dtype))
        return result

    with mock.patch.object(runner, "make_run_backend", recording_backend), \
            mock.patch.object(TrainStep, "__call__", recording_step):
        run_dir, state = run(config, sweep_dir)
    seen.update(status=state.status, step=state.step, message=state.message, run_dir=str(run_dir),
                local_rank=discover().local_rank, cuda_devices=torch.cuda.device_count(),
                group_left=not (dist.is_available() and dist.is_initialized()))
    out_json.write_text(json.dumps(seen, indent=1))
    return 0 if state.status == "done" else 1


def main(argv: list[str]) -> int:
    mode, *rest = argv
    if mode == "resume":
        return resume(rest[0], Path(rest[1]), [int(n) for n in rest[2:]])
    if mode == "record":
        return record(rest[0], Path(rest[1]), Path(rest[2]))
    raise SystemExit(f"unknown mode {mode!r}; expected resume or record")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
