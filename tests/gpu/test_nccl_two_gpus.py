"""NCCL between two GPUs: two processes, one GPU each, all-reduce equals the sum."""
import torch

from tests.distributed._spawn import spawn
from tests.gpu._common import TWO_GPUS

pytestmark = TWO_GPUS


def _all_reduce(rank, world_size):
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    # Values that differ per rank and per element; integers, so the sums are exact (bf16 holds
    # integers up to 256 exactly, hence its smaller range).
    base = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
    x = (base % 1000) * (rank + 1)
    y = ((base % 64) * (rank + 1)).to(torch.bfloat16)
    dist.all_reduce(x)
    dist.all_reduce(y)
    torch.cuda.synchronize()
    return {"backend": dist.get_backend(), "device": str(x.device),
            "sum": x.cpu(), "sum_bf16": y.float().cpu()}


def test_nccl_all_reduce_on_two_gpus():
    results = spawn(_all_reduce, 2, timeout=180)
    base = torch.arange(1 << 20, dtype=torch.float32)
    expected = (base % 1000) * 3  # rank 0's x 1 + rank 1's x 2
    for rank, r in enumerate(results):
        assert r["backend"] == "nccl" and r["device"] == f"cuda:{rank}"
        assert torch.equal(r["sum"], expected)
        assert torch.equal(r["sum_bf16"], (base % 64) * 3)
