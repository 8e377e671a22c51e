"""The Trainer over a real backend: R ranks with per-rank batch B, or 1 rank with batch R*B.

The data are arranged by hand so that step k of the single process sees exactly the rows
that the R ranks see together at step k: this checks the trainer and the backend alone,
not the loader's order (tests/test_elastic.py does that through the CLI). Rank 0 saves the final parameters to argv[2].
usage: trainer_equivalence.py BACKEND OUT [BATCH] [ACCUMULATE]
"""
import sys

import torch

from hpctrain.config import build_config
from hpctrain.data.memory import TensorLoader
from hpctrain.dist import discover, make_backend
from hpctrain.model import build_model
from hpctrain.train.loop import Trainer

ROWS, FEATURES, STEPS_PER_EPOCH = 512, 8, 8


def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, FEATURES, generator=gen)
    y = (x[:, 0] * 1.5 - x[:, 1] + 0.3 * torch.randn(ROWS, generator=gen) > 0).long()
    return x, y


def rows_for(rank: int, world: int, batch: int) -> torch.Tensor:
    """Row indices rank `rank` reads, in order, when the global batch of every step is
    split into `world` consecutive pieces of `batch` rows."""
    global_batch = batch * world
    steps = ROWS // global_batch
    return torch.cat([torch.arange(s * global_batch + rank * batch, s * global_batch + (rank + 1) * batch)
                      for s in range(steps)])


def main() -> None:
    backend_name, out = sys.argv[1], sys.argv[2]
    env = discover()
    total_batch = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    accumulate = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    cfg = build_config({
        "seed": 0, "data": {"task": "binary", "batch_size": total_batch // env.world_size},
        "model": {"hidden": [16, 16]}, "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 2, "evaluate_test": False},
        "dist": {"backend": backend_name, "timeout_s": 60, "backward_passes_per_step": accumulate},
    })
    backend = make_backend(cfg.dist, device_preference="cpu", log=lambda m: None)
    x, y = data()
    mine = rows_for(backend.rank, backend.size, cfg.data.batch_size)
    train = TensorLoader(x[mine], y[mine], batch_size=cfg.data.batch_size, split="train", shuffle=False)
    val = TensorLoader(x[:128], y[:128], batch_size=64, split="val", rank=backend.rank, world_size=backend.size)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, "binary", FEATURES)
    result = Trainer(cfg, model, train, val, backend, run_dir=None, log=lambda m: None).fit()
    if backend.is_root:
        params = {k: v.detach().cpu() for k, v in backend.unwrap(model).state_dict().items()}
        torch.save({"params": params, "status": result.status, "step": result.step,
                    "best_metric": result.best_metric, "size": backend.size}, out)
    backend.shutdown()


if __name__ == "__main__":
    main()
