"""Small data, many epochs: `hpctrain run` against a plain PyTorch loop, as whole processes.

The seeds' kind of problem: 569 rows of 30 features (341 train, 114 val, 114 test, the size
of breast_cancer), MLP 30-100-1, Adam 1e-3, batch 32, 200 epochs, validation (loss,
accuracy, exact AUC) every epoch. hpctrain runs as a user runs it (`python -m hpctrain run`,
every file it writes); the plain loop is one Python process that reads the same HDF5 shards
into memory, trains the same model on the same batches and validates every epoch, writing
nothing. Runs are interleaved, each repeat starting with the next of them in turn, so the
machine's drift hits both alike; medians of the per-pair ratios are printed. Goal: hpctrain
<= 1.15x the plain loop at 200 epochs.

    .venv/bin/python scripts/bench/small_data.py [--epochs 200] [--repeats 5] [--baseline DIR]

``--baseline DIR`` adds a third process to each pair: ``hpctrain run`` imported from the
source tree DIR (e.g. ``git archive HEAD | tar -x -C DIR``), so a change is measured
against the code before it in the same run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

PLAIN = textwrap.dedent('''
    import sys, glob, h5py, numpy as np, torch
    from torch import nn
    torch.set_num_threads(1)
    data, epochs = sys.argv[1], int(sys.argv[2])
    def split(name):
        xs, ys = [], []
        for f in sorted(glob.glob(f"{data}/{name}/*.h5")):
            with h5py.File(f) as h:
                xs.append(h["x"][:]); ys.append(h["y"][:])
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)).float()
    (xt, yt), (xv, yv) = split("train"), split("val")
    mean, std = xt.mean(0), xt.std(0)
    xt, xv = (xt - mean) / std, (xv - mean) / std
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 100), nn.ReLU(), nn.Linear(100, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    lossf = nn.BCEWithLogitsLoss()
    g = torch.Generator().manual_seed(0)
    def auc(s, y):
        order = torch.argsort(s); r = torch.empty_like(s); r[order] = torch.arange(1, len(s) + 1, dtype=s.dtype)
        p = y.sum(); n = len(y) - p
        return float((r[y > 0].sum() - p * (p + 1) / 2) / (p * n))
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 32):
            idx = perm[i:i + 32]
            opt.zero_grad(set_to_none=True)
            loss = lossf(model(xt[idx]).squeeze(-1), yt[idx])
            loss.backward(); opt.step()
        model.eval()
        with torch.no_grad():
            out = model(xv).squeeze(-1)
            vl, va, vauc = float(lossf(out, yv)), float(((out > 0).float() == yv).float().mean()), auc(out, yv)
        print(f"epoch {epoch + 1} val_loss {vl:.4f} val_accuracy {va:.4f} val_auc {vauc:.4f}")
''')


def make_data(folder: Path) -> Path:
    data = folder / "data"
    subprocess.run([sys.executable, "-m", "hpctrain", "data", "synth", str(data), "--rows", "569", "--features", "30",
                    "--task", "binary", "--shards", "1", "--split", "0.6,0.2,0.2", "--noise", "0.5"],
                   check=True, capture_output=True)
    return data


def write_config(folder: Path, data: Path, epochs: int) -> Path:
    config = folder / "small.yaml"
    config.write_text(textwrap.dedent(f"""
        name: small
        data: {{path: {data}, task: binary, batch_size: 32}}
        model: {{hidden: [100]}}
        optim: {{name: adam, lr: 1e-3}}
        train: {{epochs: {epochs}, threads: 1, evaluate_test: false, tensorboard: false}}
    """))
    return config


def timed(cmd: list[str], cwd: Path, source: str | None = None) -> float:
    env = dict(os.environ, PYTHONPATH=source) if source else None
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=cwd, env=env)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--baseline", help="a source tree of hpctrain to time as well (interleaved)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="hpctrain-small-") as tmp:
        folder = Path(tmp)
        data = make_data(folder)
        (folder / "plain.py").write_text(PLAIN)
        ratios, hp_times, plain_times, base_ratios, base_times = [], [], [], [], []
        one_base = 0.0
        for epochs in (1, args.epochs):
            config = write_config(folder, data, epochs)
            for repeat in range(args.repeats):
                sweep = folder / f"sweep-{epochs}-{repeat}"
                runs = {"hp": lambda: timed([sys.executable, "-m", "hpctrain", "run", str(config), "--sweep-dir",
                                             str(sweep)], folder),
                        "plain": lambda: timed([sys.executable, str(folder / "plain.py"), str(data), str(epochs)], folder)}
                if args.baseline:
                    runs["base"] = lambda: timed([sys.executable, "-m", "hpctrain", "run", str(config), "--sweep-dir",
                                                  str(sweep) + "-base"], folder, source=str(Path(args.baseline).resolve()))
                # Each repeat starts with the next process of the rotation, so that drift of the
                # machine within a repeat favours none of them.
                names = list(runs)
                names = names[repeat % len(names):] + names[:repeat % len(names)]
                took = {name: runs[name]() for name in names}
                hp, plain, base = took["hp"], took["plain"], took.get("base", 0.0)
                if epochs == args.epochs:
                    hp_times.append(hp), plain_times.append(plain), ratios.append(hp / plain)
                    base_times.append(base), base_ratios.append(base / plain)
                else:
                    one_hp, one_plain, one_base = hp, plain, base
        hp_med, plain_med = statistics.median(hp_times), statistics.median(plain_times)
        per_epoch_hp = (hp_med - one_hp) / (args.epochs - 1) * 1000
        per_epoch_plain = (plain_med - one_plain) / (args.epochs - 1) * 1000
        print(f"{args.epochs} epochs, median of {args.repeats}: hpctrain run {hp_med:.2f} s, plain loop "
              f"{plain_med:.2f} s; ratio {statistics.median(ratios):.3f} (goal <= 1.15)")
        print(f"per epoch (from the 1-epoch runs): hpctrain {per_epoch_hp:.1f} ms, plain {per_epoch_plain:.1f} ms")
        if args.baseline:
            base_med = statistics.median(base_times)
            per_epoch_base = (base_med - one_base) / (args.epochs - 1) * 1000
            print(f"baseline {args.baseline}: {base_med:.2f} s, ratio {statistics.median(base_ratios):.3f}, "
                  f"per epoch {per_epoch_base:.1f} ms")


if __name__ == "__main__":
    main()
