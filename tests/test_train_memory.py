"""TensorLoader: rank partition, per-epoch shuffling, equal batch counts, mid-epoch resume."""
from __future__ import annotations

import torch

from hpctrain.data.memory import TensorLoader


def rows(loader):
    return torch.cat([b.x[:, 0] for b in loader]).long().tolist()


def make(n=103, **kw):
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    return x, torch.arange(n) % 2


def test_train_partition_drop_and_pad():
    x, y = make()
    for remainder, per in (("drop", 34), ("pad", 35)):
        seen = []
        for r in range(3):
            loader = TensorLoader(x, y, batch_size=8, rank=r, world_size=3, seed=5, remainder=remainder)
            loader.set_epoch(1)
            got = rows(loader)
            assert len(got) == per and len(loader) == 5
            seen += got
        if remainder == "drop":
            assert len(set(seen)) == 102                 # every row once, one dropped
        else:
            assert set(seen) == set(range(103)) and len(seen) == 105


def test_order_depends_on_seed_and_epoch_only():
    x, y = make()
    a = TensorLoader(x, y, batch_size=10, seed=1)
    b = TensorLoader(x, y, batch_size=10, seed=1)
    a.set_epoch(2), b.set_epoch(2)
    assert rows(a) == rows(b)
    b.set_epoch(3)
    assert rows(a) != rows(b) and sorted(rows(b)) == list(range(103))


def test_eval_split_covers_all_rows_in_order():
    x, y = make()
    got = []
    for r in range(2):
        got += rows(TensorLoader(x, y, batch_size=16, split="val", rank=r, world_size=2))
    assert got == list(range(103))


def test_mid_epoch_resume():
    x, y = make()
    a = TensorLoader(x, y, batch_size=10, seed=4)
    a.set_epoch(3)
    full = rows(a)
    a.set_epoch(3)
    it = iter(a)
    first = [next(it) for _ in range(4)]
    state = a.state_dict()
    assert state["epoch"] == 3 and state["batches_done"] == 4
    b = TensorLoader(x, y, batch_size=10, seed=4)
    b.load_state_dict(state)
    rest = rows(b)
    assert torch.cat([f.x[:, 0] for f in first]).long().tolist() + rest == full
    assert rows(b) == full      # the next iteration is a whole epoch again
    c = TensorLoader(x, y, batch_size=10, seed=4)
    c.load_state_dict({**state, "batches_done": len(c)})
    assert list(c) == []        # stopped after the last batch: nothing left of that epoch
