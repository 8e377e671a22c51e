"""Backends with real ranks: mpirun -np 2 for horovod and torch, torchrun-style processes for torch.

tests/mpi_scripts/check_backend.py runs every check in one launch per backend and prints a
RESULT line per rank; each test below asserts one part of it.
"""
import os

import pytest
import torch

from hpctrain.config import DistConfig
from hpctrain.dist import NoneBackend, make_backend
from hpctrain.dist.backends import collective_failure_message, horovod_stall_settings
from hpctrain.errors import ConfigError
from conftest import require
from mpi_scripts.launch import mpirun_available, results, run_mpi, run_srun, run_torchrun_style

# Float32 round-off of a few steps on a tiny MLP; a wrong average (sum, or one rank's gradient) is > 1e-2.
TOL = 1e-5


def _launch_mpi(backend: str) -> dict:
    require(mpirun_available(), "mpirun is not installed")
    out = run_mpi("check_backend.py", backend, np=2, timeout=90)
    assert out.returncode == 0, f"{backend} ranks failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    found = results(out.stdout)
    assert sorted(found) == [0, 1], out.stdout
    return found


@pytest.fixture(scope="module")
def horovod_run():
    return _launch_mpi("horovod")  # no skip: CI builds Horovod first (scripts/install-horovod.sh)


@pytest.fixture(scope="module")
def torch_run():
    return _launch_mpi("torch")


def _launch_torchrun_style(backend: str) -> dict:
    outs = run_torchrun_style("check_backend.py", backend, np=2, timeout=90)
    for rc, out, err in outs:
        assert rc == 0, f"{out[-2000:]}\n{err[-3000:]}"
    return results("".join(out for _, out, _ in outs))


@pytest.fixture(scope="module")
def torchrun_style_run():
    return _launch_torchrun_style("torch")


@pytest.fixture(scope="module")
def auto_mpirun_run():
    return _launch_mpi("auto")


@pytest.fixture(scope="module")
def auto_torchrun_style_run():
    return _launch_torchrun_style("auto")


RUNS = ["horovod_run", "torch_run", "torchrun_style_run", "auto_mpirun_run", "auto_torchrun_style_run"]


@pytest.mark.mpi
@pytest.mark.parametrize("run", RUNS)
def test_ranks_and_backend(run, request):
    found = request.getfixturevalue(run)
    expected = {"horovod_run": ("horovod", "openmpi"), "torch_run": ("torch", "openmpi"),
                "torchrun_style_run": ("torch", "torchrun"), "auto_mpirun_run": ("mpi", "openmpi"),
                "auto_torchrun_style_run": ("torch", "torchrun")}[run]
    for rank, r in found.items():
        assert (r["backend"]["name"], r["env"]["source"]) == expected
        assert (r["backend"]["rank"], r["backend"]["size"], r["backend"]["local_rank"]) == (rank, 2, rank)
        assert r["env"]["world_size"] == 2 and r["backend"]["device"] == "cpu"


@pytest.mark.mpi
@pytest.mark.parametrize("run", RUNS)
def test_collectives(run, request):
    for r in request.getfixturevalue(run).values():
        assert r["sum"] == [3.0, 4.0]  # (0+1) + (1+1), 2 + 2
        assert r["max"] == 7.0  # max(-3, 7)
        assert r["object"] == {"from": 0, "list": [1, "two"]}


@pytest.mark.mpi
@pytest.mark.parametrize("run", RUNS)
def test_broadcast_state_copies_parameters_and_optimizer_state(run, request):
    found = request.getfixturevalue(run)
    assert found[1]["broadcast"]["differs_before"] > 0.1  # the ranks really started apart
    for r in found.values():
        b = r["broadcast"]
        assert b["params_diff"] == 0.0 and b["opt_diff"] == 0.0 and b["opt_keys_match"]
        assert b["opt_steps"] == [1.0]  # rank 1's fresh Adam took rank 0's step count, no extra step


@pytest.mark.mpi
@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("variant", ["sgd", "adam_accumulate"])
def test_two_ranks_of_batch_b_match_one_process_of_batch_2b(run, variant, request):
    """SGD with momentum; Adam with 2 accumulated micro-batches (no_sync / backward_passes_per_step)."""
    for r in request.getfixturevalue(run).values():
        e = r[variant]
        assert e["moved"] > 1e-2  # training changed the parameters, so agreement means something
        assert e["vs_single"] < TOL, e
        assert e["across_ranks"] == 0.0


@pytest.mark.mpi
def test_a_named_backend_logs_itself(horovod_run):
    # check_backend.py names the backend; the log line says which, for every rank.
    assert horovod_run[0]["backend"]["log"][0].startswith("dist.backend horovod (rank 0/2")


@pytest.mark.mpi
def test_auto_picks_mpi_for_cpu_ranks_that_mpirun_started_and_says_why(auto_mpirun_run):
    for rank, r in auto_mpirun_run.items():
        assert r["backend"]["log"][0] == (
            "dist.backend auto -> mpi (CPU ranks started by MPI: one fused MPI Allreduce a step, microseconds where "
            f"Gloo and Horovod pay about a millisecond a collective; rank {rank}/2 (local {rank}/2) from openmpi)")


@pytest.mark.mpi
def test_auto_picks_gloo_for_cpu_ranks_without_mpi(auto_torchrun_style_run):
    assert auto_torchrun_style_run[0]["backend"]["log"][0].startswith(
        "dist.backend auto -> torch (CPU ranks not started by MPI: Gloo; rank 0/2")


def test_auto_picks_nccl_where_cuda_is_there_and_mpi_on_cpu(monkeypatch):
    from hpctrain.dist.backends import choose_backend
    from hpctrain.dist.env import RankEnv

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    mpirun = RankEnv(rank=0, world_size=4, source="openmpi")
    assert choose_backend(mpirun, "auto")[0] == "torch"
    assert choose_backend(mpirun, "cpu")[0] == "mpi"  # train.device: cpu on a GPU node
    assert choose_backend(RankEnv(world_size=4, source="slurm"), "cpu")[0] == "torch"
    assert choose_backend(RankEnv(), "auto") == ("none", "a single process")


@pytest.mark.slurm
@pytest.mark.parametrize("asked, mpi, source, backend", [
    ("horovod", "pmix", "pmix", "horovod"), ("torch", "pmix", "pmix", "torch"), ("torch", "none", "slurm", "torch"),
    ("auto", "pmix", "pmix", "mpi"), ("auto", "none", "slurm", "torch")])
def test_under_srun(asked, mpi, source, backend, slurm_cluster):
    """srun --mpi=pmix (MPI wiring) and a plain srun step (torch rendezvous from the node list)."""
    out = run_srun("check_backend.py", asked, np=2, mpi=mpi)
    assert out.returncode == 0, f"{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    found = results(out.stdout)
    assert sorted(found) == [0, 1]
    for r in found.values():
        assert (r["backend"]["name"], r["env"]["source"], r["backend"]["size"]) == (backend, source, 2)
        assert r["sum"] == [3.0, 4.0] and r["broadcast"]["params_diff"] == 0.0
        assert r["sgd"]["vs_single"] < TOL and r["adam_accumulate"]["vs_single"] < TOL


# --------------------------------------------------------------------------- single process


def test_none_backend_is_identity():
    backend = make_backend(DistConfig(backend="auto"), device_preference="cpu", log=lambda m: None)
    assert isinstance(backend, NoneBackend) and (backend.rank, backend.size, backend.is_root) == (0, 1, True)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped, opt = backend.wrap(model, optimizer)
    assert wrapped is model and opt is optimizer and backend.unwrap(wrapped) is model
    t = torch.tensor([1.5, 2.0], dtype=torch.float64)
    assert torch.equal(backend.allreduce_sum(t), t) and backend.allreduce_max(2.5) == 2.5
    assert backend.broadcast_object({"a": 1}) == {"a": 1}
    backend.broadcast_state(model, optimizer)
    backend.barrier()
    backend.shutdown()


def test_auto_logs_none_for_one_process(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("OMPI_COMM_WORLD", "PMIX_RANK", "PMI_RANK", "SLURM_")) or key in ("RANK", "WORLD_SIZE"):
            monkeypatch.delenv(key)
    logs = []
    backend = make_backend(DistConfig(backend="auto"), device_preference="cpu", log=logs.append)
    assert backend.name == "none" and logs == ["dist.backend auto -> none (a single process; rank 0/1 "
                                               "(local 0/1) from single)"]


def test_backend_none_refuses_a_multi_rank_world(monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="dist.backend: 'none' but this process is rank 0/2"):
        make_backend(DistConfig(backend="none"), device_preference="cpu", log=lambda m: None)


def test_cuda_preference_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from hpctrain.errors import HpctrainError
    with pytest.raises(HpctrainError, match="train.device: 'cuda' but torch sees no CUDA device"):
        NoneBackend(DistConfig(), device_preference="cuda")


def test_stall_settings_follow_the_timeout():
    assert horovod_stall_settings(300) == {"HOROVOD_STALL_CHECK_TIME_SECONDS": "60",
                                           "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "300"}
    small = horovod_stall_settings(4)
    assert int(small["HOROVOD_STALL_CHECK_TIME_SECONDS"]) <= int(small["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"]) == 4


def test_failure_messages_name_the_rank_and_the_timeout():
    gloo_timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 4000ms for recv "
                                "operation to complete")
    msg = collective_failure_message(gloo_timeout, rank=0, size=2, timeout_s=4, backend="torch")
    assert "rank 0 of 2 timed out after 4 s (dist.timeout_s): rank 1 stopped" in msg
    closed = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5321")
    msg = collective_failure_message(closed, rank=1, size=2, timeout_s=300, backend="torch")
    assert "failed: rank 0 failed" in msg
    assert collective_failure_message(ValueError("shape mismatch"), rank=0, size=2, timeout_s=1,
                                      backend="torch") is None


def test_mpi_backend_refuses_sparse_gradients_by_name():
    from hpctrain.dist.mpi import _refuse_sparse_gradients

    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    _refuse_sparse_gradients(model)  # dense: fine
    model.add_module("words", torch.nn.Embedding(10, 3, sparse=True))
    with pytest.raises(ConfigError, match=r"cannot average the sparse gradients of words \(Embedding\(sparse=True\)\)"):
        _refuse_sparse_gradients(model)


def test_choosing_a_backend_does_not_initialise_mpi_in_the_process():
    # An MPI singleton started by the choice would leak PMIX_*/OMPI_* variables into every
    # process started afterwards, Slurm jobs included (their ranks then crash in Open MPI's
    # shared memory): the choice must look for mpi4py without importing mpi4py.MPI.
    import subprocess
    import sys

    probe = (
        "import subprocess, sys\n"
        "from hpctrain.dist.backends import choose_backend\n"
        "from hpctrain.dist.env import RankEnv\n"
        "print(choose_backend(RankEnv(rank=0, world_size=2, source='openmpi'), 'cpu')[0])\n"
        "print('mpi4py.MPI' in sys.modules)\n"
        "print(sorted(line.split('=')[0] for line in subprocess.run(['env'], capture_output=True, text=True)"
        ".stdout.splitlines() if line.startswith(('PMIX_', 'OMPI_MCA_ess'))))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if not k.startswith(("PMIX_", "OMPI_"))})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["mpi", "False", "[]"], out.stdout
