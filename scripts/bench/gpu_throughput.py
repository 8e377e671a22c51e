"""GPU throughput: hpctrain's Trainer against a plain PyTorch loop, and the loader against the GPU.

MLP 256-2048-2048-2048-1 (binary), bf16 autocast, Adam, batch 8192, on a synthetic dataset in
HDF5 shards read by the real ShardLoader. In one process, on one device:

- loader: ShardLoader epochs (shuffled, standardised, pinned buffers, copies to the
  device), rows/s, against the rows/s the plain loop's GPU steps consume. Goal >= 1.5x:
  the loader must never be what the GPU waits for.
- trainer overhead: one epoch of the loader's batches is kept on the device, and both
  loops train on exactly those batches: the plain loop (zero_grad, forward under autocast,
  BCE, backward, step) and ``Trainer.fit()`` (TensorLoader over the same tensors, the
  single-process backend, per-epoch metrics with exact AUC, a one-batch validation, the
  per-step boundary; no files). Repeats are interleaved; the headline is the median of the
  ratios of adjacent pairs. Goal >= 0.95.
- for information: ``Trainer.fit()`` reading the ShardLoader live, against the plain loop.

    python scripts/bench/gpu_throughput.py [--json OUT.json]          # the GPU figures
    python scripts/bench/gpu_throughput.py --quick --device cpu      # the harness, small, on the CPU
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hpctrain.config import build_config  # noqa: E402
from hpctrain.data.loader import ShardLoader  # noqa: E402
from hpctrain.data.memory import TensorLoader  # noqa: E402
from hpctrain.data.synthetic import make_synthetic  # noqa: E402
from hpctrain.dist.backends import NoneBackend  # noqa: E402
from hpctrain.model import build_model  # noqa: E402
from hpctrain.train.loop import Trainer  # noqa: E402

TRAINER_GOAL = 0.95
LOADER_GOAL = 1.5
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--rows", type=int, default=None, help="train rows (default 64 batches)")
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--hidden", default=None, help="hidden widths (default 2048,2048,2048)")
    p.add_argument("--batch", type=int, default=None, help="rows per step (default 8192)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per timed repeat (default 6: a fit's setup counts against the trainer, "
                        "spread over about a second of steps)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved pairs of timed runs (default 7)")
    p.add_argument("--loader-epochs", type=int, default=None, help="timed loader epochs (default 3)")
    p.add_argument("--data", default=None, help="dataset folder (made when missing; default: a temporary one)")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--quick", action="store_true",
                   help="a small model and dataset: proves the harness, measures nothing worth quoting")
    args = p.parse_args(argv)
    defaults = {"hidden": "2048,2048,2048", "batch": 8192, "epochs": 6, "repeats": 7, "loader_epochs": 3}
    if args.quick:
        defaults = {"hidden": "64,64,64", "batch": 1024, "epochs": 1, "repeats": 2, "loader_epochs": 1}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.rows = args.rows or (16 if args.quick else 64) * args.batch
    args.hidden = [int(h) for h in args.hidden.split(",")]
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(folder: Path, args) -> Path:
    if (folder / "meta.json").exists():
        return folder
    val = args.batch
    total = args.rows + val
    t0 = time.perf_counter()
    make_synthetic(folder, rows=total, features=args.features, task="binary", shards=8, seed=0,
                   split=(args.rows / total, val / total, 0.0))
    print(f"dataset: {args.rows:,} train + {val:,} val rows x {args.features} features in 8 shards, "
          f"made in {time.perf_counter() - t0:.1f} s", flush=True)
    return folder


def shard_loader(data: Path, split: str, args, device: torch.device, threads: int = 0) -> ShardLoader:
    return ShardLoader(data, split=split, batch_size=args.batch, shuffle=split == "train", seed=0, device=device,
                       threads=threads)


def loader_rate(data: Path, args, device: torch.device, threads: int = 0) -> float:
    """Rows/s of one epoch of the loader, batches on ``device`` (the last copy included);
    ``threads`` 0: the loader's automatic choice for that device."""
    loader = shard_loader(data, "train", args, device, threads)
    sync(device)
    t0 = time.perf_counter()
    rows = 0
    for batch in loader:
        rows += len(batch.x)
    sync(device)
    return rows / (time.perf_counter() - t0)


def config(args, device: torch.device, epochs: int):
    return build_config({"seed": 0, "data": {"task": "binary", "batch_size": args.batch},
                         "model": {"hidden": args.hidden}, "optim": {"name": "adam", "lr": 1e-4},
                         "train": {"epochs": epochs, "precision": args.precision, "device": device.type,
                                   "evaluate_test": False, "tensorboard": False}})


def plain_loop(cfg, loader, n_features: int, device: torch.device, precision: str) -> float:
    """The minimal loop over the same batches; rows/s."""
    torch.manual_seed(0)
    model = build_model(cfg.model, "binary", n_features).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    dtype = DTYPES.get(precision)
    rows = 0
    sync(device)
    t0 = time.perf_counter()
    for epoch in range(cfg.train.epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = model(batch.x)
            loss = F.binary_cross_entropy_with_logits(out.float(), batch.y.float())
            loss.backward()
            opt.step()
            rows += len(batch.x)
    sync(device)
    return rows / (time.perf_counter() - t0)


def trainer_loop(cfg, train, val, n_features: int, device: torch.device) -> tuple[float, float]:
    """``Trainer.fit()``; (rows/s of the whole fit, rows/s the trainer counts for its steps)."""
    torch.manual_seed(0)
    model = build_model(cfg.model, "binary", n_features)
    trainer = Trainer(cfg, model, train, val, NoneBackend(device_preference=device.type), log=lambda m: None)
    rows = cfg.train.epochs * len(train) * cfg.data.batch_size
    sync(device)
    t0 = time.perf_counter()
    result = trainer.fit()
    sync(device)
    elapsed = time.perf_counter() - t0
    assert result.status == "done", result
    return rows / elapsed, result.samples_per_s or 0.0


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(card=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}")
    else:
        info.update(card=f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads")
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    temp = None
    if args.data is None:
        temp = Path(tempfile.mkdtemp(prefix="hpctrain-gpu-bench-"))
    data = make_data(Path(args.data) if args.data else temp / "data", args)
    try:
        figures = run(args, data, device)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


def run(args, data: Path, device: torch.device) -> dict:
    info = device_info(device)
    model_desc = "-".join(map(str, [args.features, *args.hidden, 1]))
    print(f"{info['card']}, torch {info['torch']}, MLP {model_desc}, {args.precision}, batch {args.batch}, "
          f"{args.rows:,} train rows, {args.epochs} epochs x {args.repeats} repeats", flush=True)

    # The loader, first to the CPU (what reading and shuffling cost) then to the device.
    loader_rate(data, args, device)  # warms the page cache
    cpu_rates = [loader_rate(data, args, torch.device("cpu")) for _ in range(args.loader_epochs)]
    dev_rates = [loader_rate(data, args, device) for _ in range(args.loader_epochs)]
    by_threads = {n: max(loader_rate(data, args, device, n) for _ in range(args.loader_epochs)) for n in (1, 4, 8)}
    print("loader to the " + device.type + " by threads: "
          + ", ".join(f"{n}: {rate:,.0f}" for n, rate in by_threads.items()) + " rows/s "
          + f"(automatic: {ShardLoader(data, device=device).threads})", flush=True)

    # One epoch of the loader's batches, kept on the device: both loops train on exactly these.
    epoch = list(shard_loader(data, "train", args, device))
    x = torch.cat([b.x for b in epoch])
    y = torch.cat([b.y for b in epoch])
    val_batches = list(shard_loader(data, "val", args, device))
    xv, yv = torch.cat([b.x for b in val_batches]), torch.cat([b.y for b in val_batches])
    del epoch, val_batches
    train = TensorLoader(x, y, batch_size=args.batch, shuffle=False, device=device)
    val = TensorLoader(xv, yv, batch_size=args.batch, split="val", device=device)
    cfg = config(args, device, args.epochs)

    warm = config(args, device, 1)
    few = TensorLoader(x[:4 * args.batch], y[:4 * args.batch], batch_size=args.batch, shuffle=False, device=device)
    plain_loop(warm, few, args.features, device, args.precision)  # kernels, cuBLAS handles, allocator
    trainer_loop(warm, few, val, args.features, device)

    plain, ours, steps = [], [], []
    for i in range(args.repeats):
        plain.append(plain_loop(cfg, train, args.features, device, args.precision))
        fit_rate, step_rate = trainer_loop(cfg, train, val, args.features, device)
        ours.append(fit_rate)
        steps.append(step_rate)
        print(f"repeat {i + 1}: plain {plain[-1]:,.0f}  hpctrain {ours[-1]:,.0f} rows/s; "
              f"ratio {ours[-1] / plain[-1]:.3f}", flush=True)

    live_cfg = config(args, device, 1)
    live_rate, _ = trainer_loop(live_cfg, shard_loader(data, "train", args, device), val, args.features, device)
    # What the reading threads cost the training step that shares the process with them.
    live_by_threads = {n: 0.0 for n in (1, 4, 8)}
    for _ in range(2):
        for n in live_by_threads:
            rate, _ = trainer_loop(live_cfg, shard_loader(data, "train", args, device, n), val, args.features, device)
            live_by_threads[n] = max(live_by_threads[n], rate)

    # Adjacent pairs saw the same state of the machine; their ratio cancels drift between repeats.
    ratio = statistics.median(o / p for o, p in zip(ours, plain))
    step_rows = statistics.median(plain)
    loader_rows = max(dev_rates)
    figures = {
        **info, "model": model_desc, "precision": args.precision, "batch": args.batch, "train_rows": args.rows,
        "epochs_per_repeat": args.epochs, "repeats": args.repeats, "quick": bool(args.quick),
        "plain_rows_per_s": plain, "trainer_rows_per_s": ours, "trainer_step_rows_per_s": steps,
        "trainer_vs_plain": round(ratio, 4), "trainer_vs_plain_best": round(max(ours) / max(plain), 4),
        "trainer_goal": TRAINER_GOAL, "trainer_goal_met": ratio >= TRAINER_GOAL,
        "loader_rows_per_s": loader_rows, "loader_cpu_rows_per_s": max(cpu_rates),
        "loader_rows_per_s_by_threads": by_threads,
        "gpu_step_rows_per_s": step_rows, "loader_vs_step": round(loader_rows / step_rows, 4),
        "loader_goal": LOADER_GOAL, "loader_goal_met": loader_rows / step_rows >= LOADER_GOAL,
        "trainer_live_loader_rows_per_s": live_rate, "trainer_live_vs_plain": round(live_rate / step_rows, 4),
        "trainer_live_rows_per_s_by_threads": live_by_threads,
    }
    print(f"trainer vs plain loop (median of pairs): {ratio:.3f} (goal >= {TRAINER_GOAL}: "
          f"{'met' if figures['trainer_goal_met'] else 'NOT met'}); plain {step_rows:,.0f} rows/s, "
          f"hpctrain {statistics.median(ours):,.0f} rows/s (its steps alone {statistics.median(steps):,.0f})")
    print(f"loader vs GPU step: {figures['loader_vs_step']:.2f}x (goal >= {LOADER_GOAL}: "
          f"{'met' if figures['loader_goal_met'] else 'NOT met'}); loader {loader_rows:,.0f} rows/s to "
          f"{device.type} ({max(cpu_rates):,.0f} to the CPU), steps consume {step_rows:,.0f} rows/s")
    print(f"trainer reading the loader live: {live_rate:,.0f} rows/s, {figures['trainer_live_vs_plain']:.3f} "
          f"of the plain loop on kept batches; by reading threads: "
          + ", ".join(f"{n}: {rate:,.0f}" for n, rate in live_by_threads.items()) + " rows/s", flush=True)
    return figures


if __name__ == "__main__":
    sys.exit(main())
