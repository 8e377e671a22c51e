"""What one epoch-end checkpoint costs, part by part, for the small-data model of small_data.py.

Trains MLP 30-100-1 for a few epochs on 341 rows (so the payload has real optimizer state and
metrics rows), then times, as medians over ``--repeats`` calls: building the payload, its
digest, ``torch.save`` of it, writing ``last.pt`` (temp file, fsync, rename, fsync of the
folder, with the rotation to previous.pt) and the trainer's whole save as the training
thread sees it when the previous write has finished (an epoch apart, as in training):
building and serialising, the write left to the background thread.

    .venv/bin/python scripts/bench/checkpoint_cost.py [--repeats 50]
"""
from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from hpctrain.config import build_config, load_raw
from hpctrain.runner import build_parts, make_run_backend
from hpctrain.train import checkpoint as ckpt
from hpctrain.train.loop import Trainer


def median_ms(fn, repeats: int, before=lambda: None) -> float:
    times = []
    for _ in range(repeats):
        before()  # not timed
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def trained(folder: Path) -> Trainer:
    data = folder / "data"
    subprocess.run([sys.executable, "-m", "hpctrain", "data", "synth", str(data), "--rows", "569", "--features", "30",
                    "--task", "binary", "--shards", "1", "--split", "0.6,0.2,0.2"], check=True, capture_output=True)
    config = folder / "small.yaml"
    config.write_text(textwrap.dedent(f"""
        data: {{path: {data}, task: binary, batch_size: 32}}
        model: {{hidden: [100]}}
        optim: {{name: adam, lr: 1e-3}}
        train: {{epochs: 5, threads: 1, evaluate_test: false, tensorboard: false}}
    """))
    cfg = build_config(load_raw(config))
    backend = make_run_backend(cfg, lambda m: None)
    parts = build_parts(cfg, log=lambda m: None, backend=backend)
    trainer = Trainer(parts.cfg, parts.model, parts.train_loader, parts.val_loader, backend,
                      run_dir=folder / "run", log=lambda m: None)
    trainer.fit()
    return trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="hpctrain-ckpt-") as tmp:
        trainer = trained(Path(tmp))
        body = dict(trainer._payload(), format=ckpt.FORMAT)
        data = ckpt.serialize(body)
        last = Path(tmp) / "run" / "checkpoints" / ckpt.LAST
        parts = {
            "payload": trainer._payload,
            "digest": lambda: ckpt.content_digest(body),
            "torch.save": lambda: torch.save(body, io.BytesIO()),
            "write last.pt (fsyncs, rotation)": lambda: ckpt.write_checkpoint(last, data, keep_previous=True),
        }
        print(f"checkpoint of {len(data):,} bytes, medians of {args.repeats}:")
        for name, fn in parts.items():
            print(f"  {name:34s} {median_ms(fn, args.repeats):7.2f} ms")
        save = median_ms(lambda: trainer._save(last=True), args.repeats, before=trainer.checkpoints.wait)
        print(f"  {'trainer save, training thread':34s} {save:7.2f} ms")
        trainer.checkpoints.wait()


if __name__ == "__main__":
    main()
