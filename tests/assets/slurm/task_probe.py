#!/usr/bin/env python3
"""Stands in for the trainer in a SLURM test job (PYTHON=tests/assets/slurm/task_probe.py): each
task prints, from its own process, what SLURM's step daemon gave it (SLURM_LOCALID, SLURM_PROCID,
the node's GPUs) next to what slurm/_task.sh derived (RANK, LOCAL_RANK, WORLD_SIZE) and the CPUs
the kernel lets it run on, then exits 0. Its arguments (the trainer's) are ignored."""
import os
import socket
import sys

e = os.environ.get
cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
print(f"probe procid={e('SLURM_PROCID')} localid={e('SLURM_LOCALID')} nodename={e('SLURMD_NODENAME')} "
      f"rank={e('RANK')} local_rank={e('LOCAL_RANK')} world_size={e('WORLD_SIZE')} host={socket.gethostname()} "
      f"gpus_on_node={e('SLURM_GPUS_ON_NODE') or '-'} job_gpus={e('SLURM_JOB_GPUS') or e('SLURM_STEP_GPUS') or '-'} cuda={e('CUDA_VISIBLE_DEVICES') or '-'} "
      f"affinity={cpus}", file=sys.stderr, flush=True)
