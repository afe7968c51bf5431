"""Vocabulary padding for tensor parallelism: the padded size, and trim/pad of vocabulary tensors.

The word embeddings and the tied MLM decoder are split by vocabulary rows, so their row count
must divide by tp; BERT's 30,522 does not divide by 4 or 8. As Megatron does
(``--make-vocab-size-divisible-by``, default 128), training rounds the row count up to a multiple
of ``divisible_by x tp`` (128 also keeps the decoder's GEMM shape tensor-core friendly). The model
config's ``vocab_size`` stays the real vocabulary (it is what config.json exports); only the
trained tensors carry the extra rows, which the model keeps at zero and never predicts.

Checkpoints of a run therefore hold padded tensors. Everything that hands weights to the outside
(HF export, fine-tuning's import, ``--init_from`` at another tp) goes through ``resize_vocab``
here: cut to the real vocabulary, then zero-padded to whatever the receiving model holds.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

# State-dict keys (HF layout, BertModel flavour without "bert." included) whose dim 0 is the vocabulary.
_VOCAB_ROW_SUFFIXES = ("embeddings.word_embeddings.weight", "cls.predictions.decoder.weight",
                       "cls.predictions.decoder.bias", "cls.predictions.bias")


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tp: int = 1) -> int:
    """``vocab_size`` rounded up to a multiple of ``divisible_by x tp`` (Megatron's rule)."""
    if vocab_size < 1 or divisible_by < 1 or tp < 1:
        raise ValueError(f"padded_vocab_size({vocab_size}, {divisible_by}, {tp}): every argument must be >= 1")
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def is_vocab_key(key: str) -> bool:
    return key.endswith(_VOCAB_ROW_SUFFIXES)


def resize_vocab(state: Mapping[str, torch.Tensor], vocab_size: int, rows: Optional[int] = None) -> dict:
    """``state`` (full, not TP-sharded) with every vocabulary tensor cut to its first ``vocab_size``
    rows (the real tokens), then zero-padded to ``rows`` (default ``vocab_size``: trim only).
    Other tensors pass through unchanged; a vocabulary tensor with fewer than ``vocab_size`` rows
    belongs to another vocabulary and is an error."""
    rows = vocab_size if rows is None else rows
    if rows < vocab_size:
        raise ValueError(f"resize_vocab: {rows} rows cannot hold the {vocab_size}-token vocabulary")
    out = {}
    for key, tensor in state.items():
        if is_vocab_key(key):
            if tensor.shape[0] < vocab_size:
                raise ValueError(f"{key} has {tensor.shape[0]} vocabulary rows, the model's vocab_size is "
                                 f"{vocab_size}: these weights belong to another vocabulary")
            tensor = tensor[:vocab_size]
            if rows > vocab_size:
                tensor = torch.cat([tensor, tensor.new_zeros((rows - vocab_size, *tensor.shape[1:]))])
        out[key] = tensor
    return out
