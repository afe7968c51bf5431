"""Process-group set-up (pretrain/launch.py): launcher detection, real groups under each launcher's
variables, collective timeout."""

import os
import shutil
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from pretrain.launch import ParallelConfigError, detect_launch_env, first_host, init_distributed, shutdown_distributed
from tests.distributed._spawn import spawn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


# ---------------------------------------------------------------- detection from variables only


def test_torchrun_and_deepspeed_launcher_variables():
    env = dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="29611")
    launch = detect_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (3, 4, 1, "torchrun")
    assert (launch.master_addr, launch.master_port) == ("10.0.0.1", 29611)


def test_slurm_variables_give_ranks_host_and_a_job_derived_port():
    env = dict(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_JOB_ID="123456",
               SLURM_JOB_NODELIST="gpu[017-018,020],login1")
    launch = detect_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (5, 8, 1, "slurm")
    assert launch.master_addr == "gpu017"
    assert launch.master_port == 15000 + 123456 % 20000
    env.update(MASTER_ADDR="head", MASTER_PORT="2000")
    launch = detect_launch_env(env)
    assert (launch.master_addr, launch.master_port) == ("head", 2000)


def test_torchrun_inside_srun_wins_over_slurm():
    env = dict(SLURM_PROCID="0", SLURM_NTASKS="2", RANK="6", WORLD_SIZE="16", LOCAL_RANK="6",
               MASTER_ADDR="n1", MASTER_PORT="1234")
    assert detect_launch_env(env).rank == 6
    assert detect_launch_env(env).launcher == "torchrun"


def test_open_mpi_and_hydra_variables():
    env = dict(OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT="4000")
    launch = detect_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (1, 2, 1, "mpi")
    env = dict(PMI_RANK="2", PMI_SIZE="4", MASTER_ADDR="h", MASTER_PORT="4000")
    assert detect_launch_env(env).rank == 2


def test_single_process_without_launcher():
    launch = detect_launch_env({})
    assert (launch.rank, launch.world_size, launch.launcher, launch.master_addr) == (0, 1, "single", "127.0.0.1")
    assert launch.master_port > 0


def test_bad_launcher_variables_are_named():
    with pytest.raises(ParallelConfigError, match="RANK='x'"):
        detect_launch_env(dict(RANK="x", WORLD_SIZE="2"))
    with pytest.raises(ParallelConfigError, match="rank 4 of world size 4"):
        detect_launch_env(dict(RANK="4", WORLD_SIZE="4", MASTER_ADDR="a", MASTER_PORT="1"))
    with pytest.raises(ParallelConfigError, match="MASTER_ADDR"):
        detect_launch_env(dict(SLURM_PROCID="0", SLURM_NTASKS="2"))
    with pytest.raises(ParallelConfigError, match="MASTER_ADDR/MASTER_PORT"):
        detect_launch_env(dict(RANK="0", WORLD_SIZE="2"))


@pytest.mark.parametrize("nodelist,host", [
    ("node1", "node1"), ("node[01-04]", "node01"), ("a[7,9-10],b", "a7"), ("x-y[003-005]", "x-y003"),
])
def test_first_host_of_slurm_nodelists(nodelist, host):
    assert first_host(nodelist) == host


# ---------------------------------------------------------------- real process groups


def _as_launcher(rank, world_size, kind):
    """Replace spawn's torchrun-style variables with another launcher's, then init."""
    port = os.environ["MASTER_PORT"]
    for var in LAUNCH_VARS:
        os.environ.pop(var, None)
    if kind == "slurm":
        os.environ.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world_size), SLURM_LOCALID=str(rank),
                          SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="1")
        os.environ.pop("MASTER_ADDR")  # must come from the node list
    else:
        os.environ.update(OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE=str(world_size),
                          OMPI_COMM_WORLD_LOCAL_RANK=str(rank))
    os.environ["MASTER_PORT"] = port
    launch = init_distributed("gloo", use_deepspeed=False)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return dict(rank=dist.get_rank(), world=dist.get_world_size(), launcher=launch.launcher, sum=t.item())


@pytest.mark.parametrize("kind", ["slurm", "mpi"])
def test_init_distributed_from_launcher_variables(kind):
    results = spawn(_as_launcher, 2, args=(kind,), timeout=120)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 and r["launcher"] == kind for r in results)


def _dead_peer(rank, world_size, timeout_s):
    init_distributed("gloo", timeout=timedelta(seconds=timeout_s), use_deepspeed=False)
    if rank == 1:
        time.sleep(timeout_s + 5)  # alive but never joins the collective, like a stuck rank
        return None
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
    except Exception as exc:  # noqa: BLE001 - the type differs across torch versions
        return dict(raised=type(exc).__name__, seconds=time.monotonic() - start)
    return dict(raised=None, seconds=time.monotonic() - start)


def test_a_stuck_rank_fails_the_collective_instead_of_hanging():
    result = spawn(_dead_peer, 2, args=(3,), timeout=120)[0]
    assert result["raised"] is not None
    assert result["seconds"] < 30


def _finish_and_shut_down(rank, world_size, use_deepspeed):
    from megatron.core import parallel_state

    from pretrain import tensor_parallel

    init_distributed("gloo", use_deepspeed=use_deepspeed)
    tensor_parallel.initialize_model_parallel(2)
    t = torch.ones(1)
    dist.all_reduce(t)
    shutdown_distributed()
    return dict(sum=t.item(), initialized=dist.is_initialized(),
                model_parallel=parallel_state.model_parallel_is_initialized())


@pytest.mark.parametrize("use_deepspeed", [False, True])
def test_shutdown_takes_down_every_group(use_deepspeed):
    # the end of a finished run (pretrain/run.py): no group is left to the interpreter's exit
    results = spawn(_finish_and_shut_down, 2, args=(use_deepspeed,), timeout=180)
    assert all(r["sum"] == 2.0 and not r["initialized"] and not r["model_parallel"] for r in results)
    shutdown_distributed()  # no group in this process: nothing to do, no error


MPI_SCRIPT = """
import torch, torch.distributed as dist
from pretrain.launch import init_distributed
launch = init_distributed("gloo")
t = torch.tensor([float(dist.get_rank() + 1)]); dist.all_reduce(t)
print(f"RESULT {launch.launcher} {dist.get_rank()} {dist.get_world_size()} {t.item()}", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow  # a real mpirun start: ~15 s, and Open MPI start-up hangs now and then (FACTS.md)
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")
def test_real_mpirun_with_mpi4py_rendezvous():
    # No MASTER_ADDR/PORT: rank 0 picks them and broadcasts over MPI.
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS + ("MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = REPO
    cmd = ["timeout", "-k", "5", "150", "mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
           "-x", "PYTHONPATH", "-x", "DS_ACCELERATOR", "-x", "OMP_NUM_THREADS", "-x", "TORCH_EXTENSIONS_DIR",
           sys.executable, "-c", MPI_SCRIPT]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert lines == ["RESULT mpi 0 2 3.0", "RESULT mpi 1 2 3.0"], proc.stdout[-2000:] + proc.stderr[-2000:]
