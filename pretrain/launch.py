"""Launching and process groups: one entry for pretraining and fine-tuning.

- `detect_launch_env()`: rank, world size, local rank and the rendezvous address under torchrun
  and the deepspeed launcher (RANK/WORLD_SIZE/LOCAL_RANK), SLURM `srun` (SLURM_PROCID/
  SLURM_NTASKS/SLURM_LOCALID) and `mpirun` (OMPI_COMM_WORLD_* or mpi4py).
- `init_distributed()`: starts the default process group from whatever launcher started us, with a
  collective timeout so that a dead rank fails the job instead of hanging it.

Tensor parallelism (megatron-core groups, the DeepSpeed `mpu` adapter, shard/gather) is in
`pretrain/tensor_parallel.py`, built on top of this.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import subprocess
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from pretrain.precision import device_type
from pretrain.quiet import captured_output

logger = logging.getLogger(__name__)

# Bound on every collective (a dead rank makes the others fail instead of hang): DeepSpeed's own
# default and variable, DEEPSPEED_TIMEOUT in minutes, so that a raised value applies to pretraining
# and fine-tuning alike (e.g. ranks waiting while rank 0 evaluates a large dev set).
DEFAULT_TIMEOUT = timedelta(minutes=int(os.environ.get("DEEPSPEED_TIMEOUT", "10")))

__all__ = [
    "DEFAULT_TIMEOUT",
    "ParallelConfigError",
    "LaunchEnv",
    "detect_launch_env",
    "first_host",
    "default_backend",
    "init_distributed",
    "shutdown_distributed",
]


class ParallelConfigError(ValueError):
    """A parallel layout that cannot work, found before any process group starts."""


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits, whichever launcher started it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" (also the deepspeed launcher), "slurm", "mpi" or "single"


def _int_env(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ParallelConfigError(f"environment variable {name}={value!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """First host name of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'.

    Done here rather than with `scontrol show hostnames` because scontrol is not always on the
    compute nodes' PATH inside containers.
    """
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m or not m.group(1):
        raise ParallelConfigError(f"cannot read a host name from SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(3)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _mpi_rank_env(env: Mapping[str, str]):
    """(rank, size, local_rank) from the variables MPI launchers export, or None."""
    for rank_v, size_v, local_v in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),  # MPICH / Intel MPI (Hydra)
        ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
    ):
        if rank_v in env and size_v in env:
            local = _int_env(env, local_v) if local_v in env else 0
            return _int_env(env, rank_v), _int_env(env, size_v), local
    return None


def _rank0_address() -> str:
    """An address other nodes can reach rank 0 on (first of `hostname -I`, as DeepSpeed does)."""
    try:
        out = subprocess.check_output(["hostname", "-I"], timeout=10).decode().split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return socket.gethostbyname(socket.gethostname())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def detect_launch_env(env: Optional[Mapping[str, str]] = None, use_mpi4py: bool = True) -> LaunchEnv:
    """Read rank, world size, local rank and the rendezvous address from the launcher's variables.

    Precedence: RANK/WORLD_SIZE (torchrun, the deepspeed launcher, or a user who set them) >
    MPI variables > SLURM variables > a single process. torchrun wins over SLURM because
    `srun torchrun ...` sets both and the SLURM task is then one node, not one rank.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
        local = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        launcher = "torchrun"
    elif _mpi_rank_env(env) is not None:
        rank, world, local = _mpi_rank_env(env)
        launcher = "mpi"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int_env(env, "SLURM_PROCID"), _int_env(env, "SLURM_NTASKS")
        local = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        launcher = "slurm"
    else:
        rank, world, local, launcher = 0, 1, 0, "single"

    if world < 1 or not 0 <= rank < world:
        raise ParallelConfigError(f"{launcher} environment gives rank {rank} of world size {world}")

    addr = env.get("MASTER_ADDR")
    port = _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else None
    if launcher == "slurm":
        if addr is None:
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise ParallelConfigError(
                    "under SLURM set MASTER_ADDR (e.g. MASTER_ADDR=$(scontrol show hostnames "
                    "$SLURM_JOB_NODELIST | head -n1)) or run inside an allocation that sets SLURM_JOB_NODELIST"
                )
            addr = first_host(nodelist)
        if port is None:
            # Every task of the job must agree on the port without talking to each other:
            # derive it from the job id (a fixed port would clash between jobs sharing a node).
            port = 15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
    elif launcher == "mpi" and (addr is None or port is None) and world > 1:
        if not use_mpi4py:
            raise ParallelConfigError("under mpirun set MASTER_ADDR and MASTER_PORT, or install mpi4py")
        try:
            from mpi4py import MPI
        except ImportError:
            raise ParallelConfigError(
                "under mpirun without MASTER_ADDR/MASTER_PORT the rendezvous address is shared "
                "with mpi4py: `pip install mpi4py` or export MASTER_ADDR and MASTER_PORT"
            ) from None
        # Rank 0 chooses its own address and a free port, and tells everyone over MPI.
        chosen = (addr or _rank0_address(), port or _free_port()) if rank == 0 else None
        addr, port = MPI.COMM_WORLD.bcast(chosen, root=0)
    elif world == 1:
        addr = addr or "127.0.0.1"
        port = port or _free_port()
    if addr is None or port is None:
        raise ParallelConfigError(
            f"{launcher} launch with world size {world} but MASTER_ADDR/MASTER_PORT are not set"
        )
    return LaunchEnv(rank, world, local, addr, int(port), launcher)


def default_backend() -> str:
    """nccl where training runs on GPUs, gloo on CPU (and under DS_ACCELERATOR=cpu on a GPU host)."""
    return "nccl" if device_type() == "cuda" else "gloo"


def init_distributed(
    backend: Optional[str] = None,
    timeout: timedelta = DEFAULT_TIMEOUT,
    env: Optional[Mapping[str, str]] = None,
    use_deepspeed: bool = True,
) -> LaunchEnv:
    """Start the default process group from whatever launcher started us; return where we are.

    Exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT so that DeepSpeed and torch's
    `env://` agree with what was detected. `timeout` bounds every collective: when a rank dies,
    the others fail with a timeout error instead of waiting forever. Idempotent.
    `use_deepspeed=False` starts the group with torch alone (DeepSpeed on CPU JIT-builds its
    shared-memory op at start-up; deepspeed.initialize() adopts an existing group either way).
    """
    launch = detect_launch_env(env)
    backend = backend or default_backend()
    os.environ.update(
        RANK=str(launch.rank),
        WORLD_SIZE=str(launch.world_size),
        LOCAL_RANK=str(launch.local_rank),
        MASTER_ADDR=launch.master_addr,
        MASTER_PORT=str(launch.master_port),
    )
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    if not dist.is_initialized():
        try:
            if not use_deepspeed:
                raise ImportError
            import deepspeed

            # auto_mpi_discovery off: the environment above is already complete, and DeepSpeed's
            # own discovery would force port 29500.
            with captured_output("deepspeed.init_distributed"):  # its "op built successfully" print
                deepspeed.init_distributed(
                    dist_backend=backend, auto_mpi_discovery=False, timeout=timeout, init_method="env://",
                    verbose=False,
                )
        except ImportError:
            dist.init_process_group(backend=backend, timeout=timeout, init_method="env://")
    logger.info(
        "distributed: %s launch, rank %d of %d (local %d), %s, rendezvous %s:%d",
        launch.launcher, launch.rank, launch.world_size, launch.local_rank, backend,
        launch.master_addr, launch.master_port,
    )
    return launch


def shutdown_distributed(engine=None) -> None:
    """End of a finished run: release the DeepSpeed `engine` (its hooks and buffers), then take
    down megatron-core's groups and the default group before the interpreter exits. Left to the
    interpreter, the backends' C++ threads meet static destruction in whatever order it runs, and a
    rank can abort at exit ("terminate called without an active exception") after its work is
    saved, which the launcher reports as a failed job. No collective here (every rank's last one
    is the final save; a barrier would make a rank that failed after it hang the others), and a
    failure is logged, not raised: the run's results are already written."""
    if not dist.is_initialized():
        return
    try:
        if engine is not None:
            engine.destroy()
        from pretrain.tensor_parallel import destroy_model_parallel

        destroy_model_parallel()
        try:
            import deepspeed.comm as ds_comm

            started_by_deepspeed = ds_comm.is_initialized()
        except ImportError:
            started_by_deepspeed = False
        if started_by_deepspeed:
            ds_comm.destroy_process_group()  # also drops DeepSpeed's references to its groups
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - nothing left to protect, only to report
        logger.warning("process group teardown at exit failed (the run's outputs are written): %s", exc)
