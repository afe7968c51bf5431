"""Shared pieces of the GPU tests: the skip marks, a tiny model, batches, error measures.

Every test module here sets ``pytestmark = CUDA`` (or ``TWO_GPUS``): marked ``gpu`` (the default
run deselects it, pytest.ini) and skipped where torch sees no CUDA device, so that the whole
folder collects on a CPU-only machine. Nothing here imports deepspeed.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from pretrain.model import BertConfig

HAS_CUDA = torch.cuda.is_available()
CUDA = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]
TWO_GPUS = [pytest.mark.gpu,
            pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

# HF's tiny test shape (STYLE.md), a little wider so that the attention has real work.
TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=256, max_position_embeddings=128)


def tiny_config(dropout: float) -> BertConfig:
    return BertConfig(**TINY, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


def pretraining_batch(batch: int = 4, seq: int = 64, seed: int = 7) -> dict:
    """A CPU batch for BertForPreTraining with padding (rows of 40 and 50 real tokens), MLM labels on
    ~15% of the real tokens (at least one per row) and NSP labels; drawn from its own generator, so
    the global RNG streams the tests compare stay untouched."""
    g = torch.Generator().manual_seed(seed)
    vocab = TINY["vocab_size"]
    input_ids = torch.randint(5, vocab, (batch, seq), generator=g)
    token_type_ids = (torch.arange(seq) >= seq // 2).long().expand(batch, seq).contiguous()
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[0, 40:] = 0
    attention_mask[min(2, batch - 1), 50:] = 0
    input_ids[attention_mask == 0] = 0  # [PAD]
    chosen = (torch.rand(batch, seq, generator=g) < 0.15) & (attention_mask == 1)
    chosen[:, 1] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
            "labels": labels, "next_sentence_label": torch.randint(0, 2, (batch,), generator=g)}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """||actual - expected|| / (||expected|| + floor), in float64 on the CPU."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).norm() / (e.norm() + floor)).item()


def worst_grad_err(actual: dict, expected: dict) -> tuple[float, str]:
    """The largest per-tensor relative error over two {name: grad} dicts, with a floor of 1e-3 x
    the total gradient norm: some gradients are zero in exact arithmetic (the key bias: softmax
    ignores a constant added to all of a query's scores) and are pure rounding noise in both."""
    assert actual.keys() == expected.keys()
    total = torch.sqrt(sum(g.detach().double().cpu().norm() ** 2 for g in expected.values())).item()
    errs = {n: rel_err(actual[n], expected[n], floor=1e-3 * total) for n in expected}
    name = max(errs, key=errs.get)
    return errs[name], name


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls in full fp32 (no TF32) for the block: the CPU is the reference."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
