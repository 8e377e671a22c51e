"""Trainer overhead: hpctrain's training loop against a minimal hand-written PyTorch loop.

Both train the same model (MLP 28-256-256-256-1, binary), on the same in-memory batches
(batch 1024), with the same Adam. The Trainer runs as in a real run - TensorLoader,
single-process backend, per-epoch metrics (loss, accuracy, exact AUC), validation on a
tiny split, divergence and stop checks every step - but writes no files. Repeats are
interleaved, each pair in the other order from the one before, so drift of the shared
machine hits both alike; the median of the per-pair ratios is the headline figure.

    .venv/bin/python scripts/bench/trainer_overhead.py [--rows 65536] [--epochs 2] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from hpctrain.config import build_config
from hpctrain.data.memory import TensorLoader
from hpctrain.dist.backends import NoneBackend
from hpctrain.model import build_model
from hpctrain.train.loop import Trainer


def make_data(rows: int, features: int = 28):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, features, generator=g)
    y = (x[:, :4].sum(1) + 0.5 * torch.randn(rows, generator=g) > 0).long()
    return x, y


def config(args, device: str):
    return build_config({"seed": 0, "data": {"task": "binary", "batch_size": args.batch},
                         "model": {"hidden": [256, 256, 256]}, "optim": {"name": "adam", "lr": 1e-3},
                         "train": {"epochs": args.epochs, "device": device, "evaluate_test": False}})


def plain_loop(cfg, x, y, epochs: int, device) -> tuple[float, float]:
    """The minimal loop: zero_grad, forward, loss, backward, step. Returns samples/s
    by the wall clock and by this process's CPU time."""
    torch.manual_seed(0)
    model = build_model(cfg.model, "binary", x.shape[1]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    bs = cfg.data.batch_size
    batches = [(x[i:i + bs].to(device), y[i:i + bs].to(device)) for i in range(0, len(x), bs)]
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        for xb, yb in batches:
            opt.zero_grad(set_to_none=True)
            loss = F.binary_cross_entropy_with_logits(model(xb), yb.float())
            loss.backward()
            opt.step()
    _sync(device)
    return _rates(epochs * len(x), t0, c0)


def trainer_loop(cfg, x, y, xv, yv, epochs: int, device) -> tuple[float, float]:
    """fit(), validation and metrics included. Returns samples/s (wall clock, CPU time)."""
    torch.manual_seed(0)
    model = build_model(cfg.model, "binary", x.shape[1])
    backend = NoneBackend(device_preference=str(device.type))
    train = TensorLoader(x.to(device), y.to(device), batch_size=cfg.data.batch_size, shuffle=False, device=device)
    val = TensorLoader(xv.to(device), yv.to(device), batch_size=cfg.data.batch_size, split="val", device=device)
    trainer = Trainer(cfg, model, train, val, backend, log=lambda m: None)
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    result = trainer.fit()
    _sync(device)
    assert result.status == "done", result
    return _rates(epochs * len(x), t0, c0)


def _rates(samples: int, t0: float, c0: float) -> tuple[float, float]:
    return samples / (time.perf_counter() - t0), samples / (time.process_time() - c0)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=65536)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = config(args, args.device)
    x, y = make_data(args.rows)
    xv, yv = make_data(1024)
    plain_loop(cfg, x[:8 * args.batch], y[:8 * args.batch], 1, device)    # warm-up of both paths
    trainer_loop(cfg, x[:8 * args.batch], y[:8 * args.batch], xv, yv, 1, device)
    wall: dict[str, list] = {"plain": [], "ours": []}
    cpu: dict[str, list] = {"plain": [], "ours": []}
    runs = (("plain", lambda: plain_loop(cfg, x, y, args.epochs, device)),
            ("ours", lambda: trainer_loop(cfg, x, y, xv, yv, args.epochs, device)))
    for i in range(args.repeats):
        # Alternate which loop goes first, so that a machine speeding up or slowing down over
        # the run favours neither.
        for name, run in (runs if i % 2 == 0 else runs[::-1]):
            w, c = run()
            wall[name].append(w)
            cpu[name].append(c)
        print(f"repeat {i + 1}: plain {wall['plain'][-1]:,.0f}  hpctrain {wall['ours'][-1]:,.0f} samples/s "
              f"(wall); ratio wall {wall['ours'][-1] / wall['plain'][-1]:.3f}, "
              f"cpu-time {cpu['ours'][-1] / cpu['plain'][-1]:.3f}", flush=True)
    print(f"device {device}, threads {torch.get_num_threads()}, rows {args.rows}, batch {args.batch}, "
          f"epochs {args.epochs}, repeats {args.repeats}")
    for clock, rates in (("wall clock", wall), ("process CPU time", cpu)):
        # On a shared machine the load drifts between repeats; the ratio within each adjacent
        # pair cancels most of that drift, so the median pair ratio is the headline figure.
        pair = statistics.median(o / q for o, q in zip(rates["ours"], rates["plain"]))
        print(f"{clock:>16}: plain median {statistics.median(rates['plain']):,.0f} best {max(rates['plain']):,.0f}; "
              f"hpctrain median {statistics.median(rates['ours']):,.0f} best {max(rates['ours']):,.0f} samples/s; "
              f"ratio (median of pairs) {pair:.3f}, (of bests) {max(rates['ours']) / max(rates['plain']):.3f}")
    print("goal: ratio >= 0.97")

if __name__ == "__main__":
    main()
