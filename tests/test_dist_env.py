"""Rank discovery: the environment of each launcher, Slurm host lists, and real mpirun/srun ranks."""
import shutil
import subprocess

import pytest

from hpctrain.dist.env import RankEnv, discover, expand_nodelist, expand_tasks_per_node, slurm_rendezvous_port
from conftest import require
from hpctrain.errors import HpctrainError
from mpi_scripts.launch import clean_env, mpirun_available, results, run_mpi, run_srun

# What a 2-task srun step on nodes gpu[07-08] shows task 1 (Slurm 22.05).
SRUN_TASK_1 = {"SLURM_JOB_ID": "812", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "4",
               "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
               "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08],cpu1",
               "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}
# The batch script of `sbatch --ntasks=4`: Slurm variables, but one process.
BATCH_SCRIPT = {"SLURM_JOB_ID": "812", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0",
                "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_TASKS_PER_NODE": "2(x2)"}


def test_no_launcher_is_one_process():
    assert discover({}) == RankEnv(rank=0, world_size=1, local_rank=0, local_size=1, source="single")


def test_sbatch_script_is_one_process_even_with_slurm_variables():
    assert discover(BATCH_SCRIPT).world_size == 1
    assert discover({**BATCH_SCRIPT, "SLURM_STEP_ID": "4294967294"}).world_size == 1  # the batch step


def test_srun_step_gives_rank_world_local_and_rendezvous_host():
    env = discover(SRUN_TASK_1)
    assert (env.rank, env.world_size, env.local_rank, env.local_size, env.source) == (1, 2, 0, 1, "slurm")
    assert env.node_list == ("gpu07", "gpu08")
    assert env.master_addr == "gpu07"  # task 0 runs on the step's first node
    assert 20000 <= env.master_port < 40000
    assert env.master_port == discover({**SRUN_TASK_1, "SLURM_PROCID": "0"}).master_port  # every task agrees
    assert env.master_port != discover({**SRUN_TASK_1, "SLURM_STEP_ID": "1"}).master_port  # next step differs


def test_master_port_can_be_set():
    assert slurm_rendezvous_port({**SRUN_TASK_1, "MASTER_PORT": "29511"}) == 29511


def test_open_mpi_wins_over_the_slurm_step_of_its_daemons():
    # mpirun inside an allocation starts one orted per node with srun: SLURM_PROCID is the node index.
    env = discover({**SRUN_TASK_1, "SLURM_PROCID": "0", "OMPI_COMM_WORLD_RANK": "3",
                    "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.local_size, env.source) == (3, 4, 1, 2, "openmpi")
    assert env.mpi_launched and env.master_addr is None


def test_srun_with_pmix():
    env = discover({**SRUN_TASK_1, "PMIX_RANK": "1", "SLURM_NODEID": "0", "SLURM_LOCALID": "1",
                    "SLURM_STEP_NODELIST": "gpu07", "SLURM_STEP_TASKS_PER_NODE": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.local_size, env.source) == (1, 2, 1, 2, "pmix")
    assert env.mpi_launched and env.master_addr == "gpu07"


def test_torchrun_variables():
    env = discover({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "n1", "MASTER_PORT": "29500"})
    assert (env.rank, env.world_size, env.local_rank, env.local_size, env.source) == (2, 4, 0, 2, "torchrun")
    assert (env.master_addr, env.master_port) == ("n1", 29500)


def test_torchrun_inside_a_one_task_srun_step():
    one_task = {**SRUN_TASK_1, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}
    env = discover({**one_task, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"})
    assert (env.rank, env.world_size, env.source) == (3, 4, "torchrun")
    assert discover(one_task).world_size == 1


def test_bad_values_name_the_variable():
    with pytest.raises(HpctrainError, match="OMPI_COMM_WORLD_SIZE='two'"):
        discover({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "two"})
    with pytest.raises(HpctrainError, match="rank 5 with world size 2"):
        discover({"RANK": "5", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("gpu5", ["gpu5"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("r[1-2]n[1,3]", ["r1n1", "r1n3", "r2n1", "r2n3"]),
    ("a-1,b[2],c", ["a-1", "b2", "c"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_expand_nodelist_agrees_with_scontrol(tmp_path):
    require(shutil.which("scontrol") is not None, "scontrol is not installed")
    # `scontrol show hostnames` only parses; a minimal config lets it run without a cluster.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=probe\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\n"
                    "PartitionName=p Nodes=localhost\n")
    nodelist = "node[01-03,07],gpu5,r[1-2]n[08-09],x[7-11]"
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20,
                         env=clean_env(SLURM_CONF=str(conf)))
    assert out.returncode == 0, out.stderr
    assert expand_nodelist(nodelist) == out.stdout.split()


def test_bad_nodelist_is_named():
    with pytest.raises(HpctrainError, match=r"node\[a-b\]"):
        expand_nodelist("node[a-b]")
    with pytest.raises(HpctrainError, match="unbalanced"):
        expand_nodelist("node[01")


def test_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]


@pytest.mark.mpi
def test_discovery_under_real_mpirun():
    require(mpirun_available(), "mpirun is not installed")
    out = run_mpi("print_env.py", np=2, timeout=60)
    assert out.returncode == 0, out.stderr
    found = {r["rank"]: r for r in results(out.stdout).values()}
    assert sorted(found) == [0, 1]
    for rank, env in found.items():
        assert (env["world_size"], env["local_rank"], env["local_size"], env["source"]) == (2, rank, 2, "openmpi")


@pytest.mark.slurm
def test_discovery_under_real_srun(slurm_cluster):
    out = run_srun("print_env.py", np=2, mpi="pmix")
    assert out.returncode == 0, out.stderr
    found = {r["rank"]: r for r in results(out.stdout).values()}
    assert sorted(found) == [0, 1]
    assert all(env["world_size"] == 2 and env["source"] in ("pmix", "slurm") for env in found.values())
