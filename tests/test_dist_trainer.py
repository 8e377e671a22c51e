"""The Trainer over real ranks: 2 ranks with batch B end where 1 rank with batch 2B ends.

A unit test of the trainer and the backends alone: the rows are hand-arranged in memory
(TensorLoader, no shuffling) so that the ranks' batches make up the single process's.
tests/test_elastic.py checks the same through `hpctrain run`, the real ShardLoader's order
and shuffling, several world sizes and weighted losses."""
import pytest
import torch

import subprocess

from mpi_scripts.launch import HERE, PYTHON, clean_env, run_mpi


def single(tmp_path, accumulate=1, name="one.pt"):
    out = tmp_path / name
    proc = subprocess.run([PYTHON, str(HERE / "trainer_equivalence.py"), "none", str(out), "64", str(accumulate)],
                          capture_output=True, text=True, timeout=120, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def two_ranks(tmp_path, backend, accumulate=1):
    out = tmp_path / f"{backend}.pt"
    proc = run_mpi("trainer_equivalence.py", backend, str(out), "64", str(accumulate), np=2, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.mpi
@pytest.mark.parametrize("backend", ["horovod", "torch", "mpi"])
def test_two_ranks_match_one_rank_with_double_batch(tmp_path, backend):
    one, two = single(tmp_path), two_ranks(tmp_path, backend)
    assert two["size"] == 2 and one["size"] == 1
    assert one["status"] == two["status"] == "done"
    assert one["step"] == two["step"] == 16  # 2 epochs x 512 rows / 64 rows per step
    for key, value in one["params"].items():
        assert torch.allclose(value, two["params"][key], atol=2e-5, rtol=1e-4), key
    # the validation metric is averaged over both ranks' shares, not taken from rank 0 alone
    assert two["best_metric"] == pytest.approx(one["best_metric"], rel=1e-4)
    # and training did move the parameters away from their initial values
    fresh = build_fresh()
    assert all(not torch.allclose(fresh[k], one["params"][k]) for k in fresh if k.endswith("weight"))


def build_fresh():
    from hpctrain.config import ModelConfig
    from hpctrain.model import build_model
    torch.manual_seed(0)
    return build_model(ModelConfig(hidden=[16, 16]), "binary", 8).state_dict()
