"""The unpadded encoder on CUDA runs fused attention kernels only, and reads nothing back.

Each case trains one step (dropout 0.1) of the tiny pretraining model with a layout built on the
host, under ``sdpa_kernel`` restricted to the kernel that case must reach, so that a fall back
to another kernel (above all SDPA's MATH path, which splits nested values per sequence by a
device lengths tensor: a sync per sequence, per q/k/v, per layer) raises instead of running
slowly. ``torch.cuda.set_sync_debug_mode("error")`` turns any device synchronisation in the
forward and backward into an error too. The loss is compared with the padded model's (same
weights, dropout off) as a check that the kernels compute the same attention.
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pretrain.model import BertForPreTraining
from pretrain.unpad import TokenLayout
from tests.gpu._common import CUDA, exact_fp32, tiny_config

pytestmark = CUDA

LENGTHS = [1, 64, 17, 40, 5, 64, 33, 9]
SEQ = 64


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(LENGTHS)
    mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
    ids = torch.randint(5, 512, (len(LENGTHS), SEQ), generator=g) * mask
    labels = torch.full_like(ids, -100)
    pick = (torch.rand(ids.shape, generator=g) < 0.15) & (mask == 1)
    pick[:, 0] = True
    labels[pick] = ids[pick]
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask, "labels": labels,
            "next_sentence_label": torch.randint(0, 2, (len(LENGTHS),), generator=g),
            "masked_positions": (labels.reshape(-1) != -100).nonzero().squeeze(1),
            "layout": TokenLayout.from_attention_mask(mask)}


def _step(model, batch, dtype):
    cast = torch.autocast("cuda", dtype=dtype) if dtype != torch.float32 else torch.autocast("cuda", enabled=False)
    with cast:
        out = model(**batch)
    out.loss.backward()
    return out.loss.detach().float()


# (precision, backend, the one kernel it must reach). "auto": nested (flash) for bf16, bucketed
# dense blocks with a float mask (memory-efficient, dropout included) for fp32 training.
CASES = [(torch.bfloat16, "auto", SDPBackend.FLASH_ATTENTION),
         (torch.bfloat16, "nested", SDPBackend.FLASH_ATTENTION),
         (torch.bfloat16, "bucketed", SDPBackend.EFFICIENT_ATTENTION),
         (torch.float32, "auto", SDPBackend.EFFICIENT_ATTENTION),
         (torch.float32, "bucketed", SDPBackend.EFFICIENT_ATTENTION)]


@pytest.mark.parametrize("dtype,backend,kernel", CASES, ids=lambda x: str(x).split(".")[-1])
def test_training_step_reaches_the_fused_kernel_without_syncs(dtype, backend, kernel):
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config(dropout=0.1)).cuda().train()
    model.bert.attention_backend = backend
    batch = {k: v.to("cuda", non_blocking=True) for k, v in _batch().items()}
    torch.cuda.synchronize()
    with sdpa_kernel([kernel]):
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = _step(model, batch, dtype)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)
    # same attention as the padded model (dropout off; bf16 rounding allowed for)
    model.eval().zero_grad(set_to_none=True)
    with torch.no_grad(), exact_fp32():
        cast = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)
        with cast:
            unpadded = model(**batch).loss.float()
            padded = model(**{k: v for k, v in batch.items() if k != "layout"}).loss.float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert abs(unpadded - padded).item() <= tol * abs(padded).item()


def test_fp32_training_on_nested_falls_back_to_math():
    """Why "auto" avoids "nested" for fp32 training: the memory-efficient kernel refuses nested
    inputs that require grad, so only MATH is left (this test fails, and the rule in
    pretrain/unpad.py _nested_is_fused can go, once torch accepts them)."""
    model = BertForPreTraining(tiny_config(dropout=0.1)).cuda().train()
    model.bert.attention_backend = "nested"
    batch = {k: v.to("cuda") for k, v in _batch().items()}
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]), pytest.raises(RuntimeError):
        _step(model, batch, torch.float32)
