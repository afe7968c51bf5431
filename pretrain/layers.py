"""The tensor-parallel seam of the model: a small factory for the layers that TP splits.

The model asks this factory for every layer that tensor parallelism shards (attention and MLP
projections, the word embeddings, the vocabulary-sized MLM decoder) and for the two operations
whose math changes when the vocabulary is split (cross entropy) or when dropout runs inside a
split region (RNG). At tp=1 (this file) they are plain ``nn.Linear`` / ``nn.Embedding`` /
``F.cross_entropy``; the megatron-core factory in ``pretrain/tensor_parallel.py`` returns Column/Row/
VocabParallel layers with the same call signatures, so ``pretrain/model.py`` never branches on
the parallel layout and never imports ``torch.distributed``.

Contract each implementation keeps (the model relies on it):
- ``column(in_f, out_f, bias)``: a module with ``.weight`` of shape ``[out_f / tp, in_f]``
  (and ``.bias`` ``[out_f / tp]``) whose ``forward(x)`` takes the full (replicated) input and
  returns one tensor, sharded on the last dimension (no gather).
- ``row(in_f, out_f, bias)``: ``.weight`` ``[out_f, in_f / tp]``; ``forward(x)`` takes an input
  sharded on the last dimension and returns one full tensor (reduced across TP ranks, bias added
  once).
- ``vocab_embedding(num, dim)``: ``.weight`` ``[num / tp, dim]`` (a contiguous vocabulary slice,
  the same slice a ``column(dim, num)`` layer holds, so the MLM decoder can share it); forward
  returns full embeddings.
- ``vocab_cross_entropy(logits, labels)``: logits ``[..., V / tp]`` against global label ids,
  mean over ``labels != -100``.
- ``sharded_rng(device)``: context manager entered around dropout on TP-split activations
  (attention probabilities) living on ``device``, so that each TP rank draws its own mask there
  while replicated regions keep one shared stream (of that device's generator).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class LayerFactory:
    """Dense layers for tp=1. Subclassed (or duck-typed) by the megatron-core factory."""

    tp_size: int = 1

    def column(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def row(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def vocab_embedding(self, num_embeddings: int, embedding_dim: int) -> nn.Module:
        return nn.Embedding(num_embeddings, embedding_dim)

    def vocab_cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Sum / count instead of reduction="mean": a micro-batch without a single masked token
        # (possible with tiny batches) then gives 0 with a zero gradient rather than NaN.
        logits = logits.reshape(-1, logits.shape[-1]).float()
        labels = labels.reshape(-1)
        total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        count = (labels != IGNORE_INDEX).sum().clamp(min=1)
        return total / count

    def sharded_rng(self, device=None):
        return contextlib.nullcontext()
