"""A minimal torch.distributed (gloo) trainer with the pretraining CLI's resume contract.

Used by tests/integration/test_slurm_cluster.py to prove the cluster, the srun rendezvous
(env://: MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE set by slurm/_common.sh) and the
preempt -> checkpoint -> requeue -> resume cycle without the cost of the real trainer:
data-parallel least squares where each rank owns a deterministic data shard, gradients are
all-reduced, and the per-step loss (also all-reduced) is a function of the exact weights, so a
resume that loses or repeats anything changes the loss curve.

On SIGUSR1 (or SIGTERM) the ranks agree, at the end of the current step, to save and exit 0;
the next start resumes from SAVE_DIR/latest.
"""
import argparse
import json
import os
import signal
import socket
import time

import torch
import torch.distributed as dist

_stop = False


def _on_signal(signum, frame):
    global _stop
    _stop = True


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--save_dir", required=True)
    p.add_argument("--train_steps", type=int, required=True)
    p.add_argument("--step_seconds", type=float, default=0.0, help="sleep per step (so a signal lands mid-run)")
    p.add_argument("--die_rank", type=int, default=-1, help="this rank exits with status 3 ...")
    p.add_argument("--die_at_step", type=int, default=-1, help="... before this step (a failed task)")
    args = p.parse_args()
    signal.signal(signal.SIGUSR1, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    dist.init_process_group("gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"rank {rank}/{world} on {socket.gethostname()} (master {os.environ['MASTER_ADDR']}:"
          f"{os.environ['MASTER_PORT']})", flush=True)

    dim = 8
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(64, dim, generator=g, dtype=torch.float64)
    y = x @ torch.arange(1.0, dim + 1, dtype=torch.float64) + 0.1 * torch.randn(64, generator=g, dtype=torch.float64)
    w = torch.zeros(dim, dtype=torch.float64)
    step = 0
    os.makedirs(args.save_dir, exist_ok=True)
    latest = os.path.join(args.save_dir, "latest")
    if os.path.exists(latest):
        with open(latest) as f:
            state = torch.load(os.path.join(args.save_dir, f.read().strip()))
        w, step = state["w"], state["step"]
        print(f"rank {rank}: resumed from step {step}", flush=True)

    metrics = open(os.path.join(args.save_dir, "metrics.jsonl"), "a") if rank == 0 else None
    while step < args.train_steps:
        if rank == args.die_rank and step + 1 == args.die_at_step:
            print(f"rank {rank}: dying before step {step + 1} (test)", flush=True)
            os._exit(3)
        # Step-dependent mini-batch: rows chosen by (step, rank), so order matters on resume.
        idx = torch.randperm(64, generator=torch.Generator().manual_seed(step * 131 + rank))[:16]
        err = x[idx] @ w - y[idx]
        loss = (err ** 2).mean()
        grad = 2 * x[idx].T @ err / len(idx)
        dist.all_reduce(grad)
        dist.all_reduce(loss)
        w = w - 0.05 * grad / world
        step += 1
        if rank == 0:
            metrics.write(json.dumps({"step": step, "loss": loss.item() / world}) + "\n")
            metrics.flush()
        time.sleep(args.step_seconds)
        stop = torch.tensor([1.0 if _stop else 0.0])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item() and step < args.train_steps:
            break
    if rank == 0:
        tag = f"step_{step}.pt"
        torch.save({"w": w, "step": step}, os.path.join(args.save_dir, tag))
        with open(latest + ".tmp", "w") as f:
            f.write(tag)
        os.replace(latest + ".tmp", latest)
        print(f"saved {tag}" + (" on signal" if step < args.train_steps else ""), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
