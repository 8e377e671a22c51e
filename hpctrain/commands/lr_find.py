"""``hpctrain lr-find CONFIG [a.b=c ...]``: learning-rate range test for one grid point.

Prints loss against an exponentially increasing learning rate and two suggested LRs
(steepest descent; a tenth of divergence), and writes ``lr_find.png``, ``lr_find.csv`` and
``lr_find.json`` (both suggestions) to ``--out`` (default
``sweeps/<name>/lr_find/<run_id>``). The model is the grid point's model as ``hpctrain
run`` would build it; nothing of the sweep's runs is touched.

Under ``mpirun``/``srun`` every rank takes part. Each rank reads the batches a single
process with the global batch (ranks x data.batch_size) would read and trains on its
share of each, so the curve and the suggestion are those of that global batch, the same
whatever the number of ranks that computes them.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides such as optim.name=sgd")
    p.add_argument("--index", type=int, default=0, help="grid point whose model and optimizer to test (default 0)")
    p.add_argument("--steps", type=int, default=100, help="steps of the test (default 100)")
    p.add_argument("--start-lr", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    p.add_argument("--end-lr", type=float, default=10.0, help="last learning rate (default 10)")
    p.add_argument("--out", default=None, help="folder for lr_find.png, lr_find.csv and lr_find.json")


def main(args: argparse.Namespace) -> int:
    from ..errors import HpctrainError
    from ..runner import build_parts, make_run_backend, pick, prepare_sweep
    from ..train.lr_find import lr_range_test

    if args.steps < 2:
        raise HpctrainError(f"--steps {args.steps}: expected at least 2")
    if not 0 < args.start_lr < args.end_lr:
        raise HpctrainError(f"--start-lr {args.start_lr:g} --end-lr {args.end_lr:g}: expected 0 < start < end")
    _, _, specs = prepare_sweep(args.config, list(args.overrides), write=False)
    spec = pick(specs, args.index, args.config)
    cfg = spec.config
    log = lambda m: print(m, flush=True)  # noqa: E731
    backend = make_run_backend(cfg, log)
    try:
        parts = build_parts(cfg, log=log, backend=backend)
        result = lr_range_test(parts.cfg, parts.model, _shared_batches(parts.cfg, parts.backend), parts.backend,
                               start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps)
        if parts.backend.is_root:
            out = Path(args.out) if args.out else Path("sweeps") / cfg.name / "lr_find" / spec.run_id
            out.mkdir(parents=True, exist_ok=True)
            result.write_csv(out / "lr_find.csv")
            result.write_json(out / "lr_find.json")
            result.plot(out / "lr_find.png")
            print(f"lr-find: grid point {spec.index} ({spec.run_id}), optimizer {cfg.optim.name}, "
                  f"{len(result.lrs)} steps")
            print(result.table())
            print(result.summary())
            print(f"wrote {out / 'lr_find.png'}, {out / 'lr_find.csv'} and {out / 'lr_find.json'}")
    finally:
        backend.shutdown()
    return 0


def _shared_batches(cfg, backend):
    """Train batches of the global batch size for one process, each shared out among the ranks."""
    import dataclasses

    from ..data.loader import ShardLoader
    from ..errors import DataError
    from ..train.lr_find import BatchShares

    data = dataclasses.replace(cfg.data, batch_size=cfg.data.batch_size * backend.size)
    loader = ShardLoader.from_config(data, "train", rank=0, world_size=1, seed=cfg.seed, device=backend.device)
    if loader.rows < data.batch_size:
        raise DataError(f"{cfg.data.path}: the train split has {loader.rows} rows, fewer than one global batch of "
                        f"{backend.size} x {cfg.data.batch_size}; use a smaller data.batch_size")
    return BatchShares(loader, backend.rank, backend.size)
