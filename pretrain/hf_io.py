"""Weights in the Hugging Face layout: ``config.json`` + ``model.safetensors`` (+ ``vocab.txt`` or ``spm.model``).

Because ``pretrain/model.py`` uses the HF key tree, both directions are a key-by-key copy; the
only translations are the ones HF itself makes:
- ``BertModel`` checkpoints store keys without the ``bert.`` prefix;
- the MLM decoder weight is tied to the word embeddings and the decoder bias to
  ``cls.predictions.bias``: safetensors cannot store two names for one tensor, so HF writes only
  the embedding and ``cls.predictions.bias`` and re-ties on load. We do the same;
- ``embeddings.position_ids`` / ``token_type_ids`` are buffers, not weights: dropped;
- old TF-converted checkpoints name LayerNorm parameters ``gamma`` / ``beta``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Mapping

import safetensors.torch
import torch
from torch import nn

from data_prep.atomic import atomic_copy, atomic_file, atomic_json
from pretrain.model import BertConfig, BertForPreTraining
from pretrain.vocab import resize_vocab

logger = logging.getLogger(__name__)

_DROPPED_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_HEAD_PREFIXES = ("cls.",)
_ENCODER_PREFIX = "bert."
_ENCODER_SUBMODULES = ("embeddings.", "encoder.", "pooler.")


def read_weights(path: str) -> dict:
    """The state dict stored in an HF directory, keys as written (model.safetensors, a sharded
    safetensors index, or pytorch_model.bin)."""
    st_file = os.path.join(path, "model.safetensors")
    index_file = os.path.join(path, "model.safetensors.index.json")
    bin_file = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st_file):
        return safetensors.torch.load_file(st_file)
    if os.path.isfile(index_file):
        with open(index_file, encoding="utf-8") as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(safetensors.torch.load_file(os.path.join(path, shard)))
        return state
    if os.path.isfile(bin_file):
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise ValueError(f"HF model directory {path}: no model.safetensors, "
                     "model.safetensors.index.json or pytorch_model.bin found")


def normalize_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict:
    """HF checkpoint keys (BertModel or BertForPreTraining flavour) -> our BertForPreTraining keys.

    Encoder keys get the ``bert.`` prefix; tied aliases and buffers are dropped (after checking
    that a stored decoder weight really equals the embeddings it is tied to).
    """
    out = {}
    for key, value in state.items():
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if key.startswith(_ENCODER_SUBMODULES):  # BertModel checkpoint: no "bert." prefix
            key = _ENCODER_PREFIX + key
        if key.endswith(_DROPPED_BUFFERS):
            continue
        out[key] = value
    embed_key = BertForPreTraining.tied_weights["cls.predictions.decoder.weight"]
    decoder = out.pop("cls.predictions.decoder.weight", None)
    if decoder is not None and embed_key in out and not torch.equal(decoder, out[embed_key]):
        raise ValueError("checkpoint has a cls.predictions.decoder.weight that differs from "
                         f"{embed_key}; this model requires the decoder tied to the word embeddings")
    decoder_bias = out.pop("cls.predictions.decoder.bias", None)
    if decoder_bias is not None:
        out.setdefault("cls.predictions.bias", decoder_bias)
    return out


def load_hf_dir(path) -> tuple[BertConfig, dict]:
    """Read an HF BERT directory -> (BertConfig, state dict in BertForPreTraining key layout)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"HF model directory {path}: not a directory")
    config = BertConfig.from_json_file(os.path.join(path, "config.json"))
    return config, normalize_hf_state_dict(read_weights(path))


def _expected_keys(model: nn.Module) -> set:
    tied = getattr(model, "tied_weights", {})
    return {k for k in model.state_dict() if k not in tied}


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy a state dict into ``model`` key by key; raise listing every missing/unexpected key.

    ``state_dict`` may use HF keys of either flavour. Loading into a bare ``BertModel`` (the
    fine-tuning encoder) takes the ``bert.*`` part and deliberately skips pretraining heads (and
    the pooler when the encoder has none).
    """
    state = normalize_hf_state_dict(state_dict)
    is_encoder = not hasattr(model, "bert")
    if is_encoder:
        skipped = [k for k in state if k.startswith(_HEAD_PREFIXES)]
        if skipped:
            logger.info("loading into an encoder: skipping %d pretraining-head tensors", len(skipped))
        state = {(k[len(_ENCODER_PREFIX):] if k.startswith(_ENCODER_PREFIX) else k): v
                 for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
        if getattr(model, "pooler", True) is None:  # built with add_pooling_layer=False
            state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    expected = _expected_keys(model)
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    own = model.state_dict()
    wrong_shape = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                         for k in expected & state.keys() if state[k].shape != own[k].shape)
    if missing or unexpected or wrong_shape:
        lines = []
        if missing:
            lines.append(f"missing keys: {missing}")
        if unexpected:
            lines.append(f"unexpected keys: {unexpected}")
        if wrong_shape:
            lines.append(f"shape mismatches: {wrong_shape}")
        raise ValueError("state dict does not match the model:\n  " + "\n  ".join(lines))
    with torch.no_grad():
        for key in expected:
            own[key].copy_(state[key])
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _vocab_target_name(vocab_file: str) -> str:
    # A WordPiece list is what transformers' BertTokenizer reads as "vocab.txt", whatever its
    # source name; any other tokenizer file (a SentencePiece spm.model) keeps its own name, so a
    # binary model never masquerades as a WordPiece list.
    return "vocab.txt" if vocab_file.endswith(".txt") else os.path.basename(vocab_file)


def save_hf_dir(model, config: BertConfig, out_dir, vocab_file=None, config_fields=None) -> None:
    """Write config.json + model.safetensors (+ vocab.txt) for transformers' BertForPreTraining.

    ``model`` is a tp=1 ``BertForPreTraining`` or its (gathered) state dict; vocabulary rows past
    ``config.vocab_size`` (training's padding, ``pretrain/vocab.py``) are cut off. A ``*.txt``
    ``vocab_file`` is written as ``vocab.txt``; another tokenizer file (``spm.model``) keeps its
    basename. ``config_fields`` add to (or replace) config.json entries: a fine-tuned head's
    ``architectures``, ``id2label``, ... Every file is written to a temporary name and renamed
    into place.
    """
    if vocab_file is not None:
        vocab_file = os.fspath(vocab_file)
        if not os.path.isfile(vocab_file):
            raise ValueError(f"vocab file {vocab_file}: not found")
        vocab_name = _vocab_target_name(vocab_file)
        if vocab_name in ("config.json", "model.safetensors"):
            raise ValueError(f"vocab file {vocab_file}: its name would overwrite the exported {vocab_name}")
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    state = resize_vocab(normalize_hf_state_dict(state), config.vocab_size)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    # safetensors refuses tensors sharing storage; the tied decoder was dropped above, and
    # clone() detaches everything else from optimizer/engine-owned storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    atomic_file(os.path.join(out_dir, "model.safetensors"),
                lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_json(os.path.join(out_dir, "config.json"),
                {"architectures": ["BertForPreTraining"], "model_type": "bert", **config.to_dict(),
                 **(config_fields or {})})
    if vocab_file is not None:
        atomic_copy(vocab_file, os.path.join(out_dir, vocab_name))
