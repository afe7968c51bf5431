"""Where the encoder weights and the tokenizer come from, and how a fine-tuned model is saved.

`--model` may be an HF BERT directory (config.json + model.safetensors / pytorch_model.bin +
vocab.txt; `BertModel` keys without `bert.` or `BertForPreTraining` keys) or a checkpoint of
our own pretraining run, which is consolidated into an HF directory first through
`pretrain.export_hf`.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile

from torch import nn

from data_prep.atomic import atomic_json, atomic_write
from data_prep.tokenizer import VocabError, read_vocab, vocab_ids
from pretrain import checkpoint as ckpt
from pretrain import hf_io
from pretrain.export_hf import export
from pretrain.model import BertConfig

from .readers import InputError

log = logging.getLogger(__name__)

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_ENCODER_PARTS = ("embeddings.", "encoder.", "pooler.")


def is_hf_dir(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "config.json"))
            and any(os.path.isfile(os.path.join(path, f)) for f in _WEIGHT_FILES))


def resolve_model_dir(path: str, work_dir: str) -> str:
    """An HF directory for `path`: itself, or its consolidation under `work_dir/consolidated`.

    The consolidation is reused only when its record (`SOURCE_RECORD`) names this very
    checkpoint (`source_key`); otherwise, e.g. phase 2's checkpoint fine-tuned into the OUT of
    phase 1, it is exported again. The export is written into a temporary folder, its record
    last, and renamed into place when complete, so an export cut short is never taken as done."""
    if not os.path.exists(path):
        raise InputError(f"--model {path}: no such file or directory")
    if os.path.isdir(path) and is_hf_dir(path):
        return path
    out = os.path.join(work_dir, "consolidated")
    try:
        key = source_key(path)
    except (ValueError, OSError) as e:
        raise InputError(f"--model {path}: neither an HF BERT directory (config.json + "
                         f"model.safetensors) nor a pretraining checkpoint we can export ({e})") from None
    if _read_record(out) == key:
        log.info("using the consolidation of %s (step %s) already in %s", key["checkpoint"], key["step"], out)
        return out
    log.info("%s is not an HF directory: consolidating it with pretrain.export_hf into %s", path, out)
    os.makedirs(work_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(work_dir, ".consolidated.*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by an export or swap that was killed
    tmp = tempfile.mkdtemp(prefix=".consolidated.", dir=work_dir)
    try:
        # the checkpoint the key describes, not `path` again: a run directory's `latest` may move
        # (pretraining still saving) between the key and the export
        export(key["checkpoint"], tmp)
        if not is_hf_dir(tmp):
            raise InputError(f"--model {path}: export produced no HF directory")
        atomic_json(os.path.join(tmp, SOURCE_RECORD), key, sort_keys=False)
        _swap_into_place(tmp, out)
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"--model {path}: neither an HF BERT directory (config.json + "
                         f"model.safetensors) nor a pretraining checkpoint we can export ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


SOURCE_RECORD = "consolidated_from.json"


def source_key(path: str) -> dict:
    """What identifies a pretraining checkpoint's weights: its resolved folder, tag and step,
    every file's (name, size, mtime) and a content hash of the DeepSpeed model-state files
    (a checkpoint rewritten in place within the mtime granularity still differs there)."""
    run_dir, tag = ckpt.resolve(path)
    tag_dir = os.path.realpath(os.path.join(run_dir, tag))
    files, digest = [], hashlib.sha256()
    for root, dirs, names in os.walk(tag_dir):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            st = os.stat(full)
            rel = os.path.relpath(full, tag_dir)
            files.append([rel, st.st_size, st.st_mtime_ns])
            if name.endswith("model_states.pt") or name == ckpt.STATE_FILE:
                digest.update(rel.encode() + b"\0")
                with open(full, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        digest.update(block)
    return {"checkpoint": tag_dir, "tag": tag, "step": ckpt.read_state(run_dir, tag).get("step"),
            "files": files, "model_states_sha256": digest.hexdigest()}


def _read_record(out: str) -> dict | None:
    record = os.path.join(out, SOURCE_RECORD)
    if not (is_hf_dir(out) and os.path.isfile(record)):
        return None
    try:
        with open(record, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _swap_into_place(tmp: str, out: str) -> None:
    """Rename the complete export `tmp` to `out`; an earlier `out` is moved aside first and
    deleted after (a kill in between leaves no `out`, so the next run exports again)."""
    old = None
    if os.path.lexists(out):
        old = tempfile.mkdtemp(prefix=".consolidated.old.", dir=os.path.dirname(out))
        os.rename(out, os.path.join(old, "x"))
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_tokenizer(model_dir: str, vocab: str | None = None, lower_case: bool | None = None):
    """BertTokenizerFast over the checkpoint's vocab.txt. Lower-casing follows
    tokenizer_config.json's do_lower_case when present (uncased models are the default)."""
    from transformers import BertTokenizerFast

    vocab = vocab or os.path.join(model_dir, "vocab.txt")
    if not os.path.isfile(vocab):
        raise InputError(f"{model_dir}: no vocab.txt; pass the WordPiece vocabulary with --vocab FILE")
    if lower_case is None:
        lower_case = True
        cfg = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.isfile(cfg):
            with open(cfg, encoding="utf-8") as f:
                lower_case = bool(json.load(f).get("do_lower_case", True))
    try:
        table = vocab_ids(read_vocab(vocab))
    except VocabError as e:
        raise InputError(str(e)) from None
    # transformers 5 takes the vocabulary as `vocab` (a dict); the old `vocab_file=` keyword is
    # silently ignored there and leaves a 5-token vocabulary, so pass the table itself.
    return BertTokenizerFast(vocab=table, do_lower_case=lower_case)


def load_encoder_weights(encoder: nn.Module, model_dir: str) -> None:
    """Copy the checkpoint's encoder into `encoder` (a `pretrain.model.BertModel`, e.g. a
    head's `.bert`) key by key; pretraining heads and any earlier task head are skipped. A
    missing pooler is left freshly initialised, as transformers does, with a warning."""
    _, state = hf_io.load_hf_dir(model_dir)
    enc = {k[5:]: v for k, v in state.items() if k.startswith("bert.") and k[5:].startswith(_ENCODER_PARTS)}
    own = encoder.state_dict()
    if not any(k.startswith("pooler.") for k in own):
        enc = {k: v for k, v in enc.items() if not k.startswith("pooler.")}
    elif not any(k.startswith("pooler.") for k in enc):
        log.warning("%s has no pooler weights: the pooler starts from random init", model_dir)
        enc.update({k: v for k, v in own.items() if k.startswith("pooler.")})
    hf_io.load_into(encoder, enc)


def read_config(model_dir: str) -> BertConfig:
    try:
        return BertConfig.from_json_file(os.path.join(model_dir, "config.json"))
    except ValueError as e:
        raise InputError(str(e)) from None


def save_finetuned(model: nn.Module, out_dir: str, tokenizer, config_fields: dict) -> None:
    """An HF directory of a fine-tuned head: config.json (the encoder's config + `config_fields`:
    architectures, id2label, ...) + model.safetensors through `pretrain.hf_io.save_hf_dir`, and
    vocab.txt + tokenizer_config.json of `tokenizer`; every file renamed into place when complete.
    `finetune.tasks.load_finetuned` reads it back; transformers' Bert* task classes load it."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    if [i for _, i in vocab] != list(range(len(vocab))):
        raise ValueError("tokenizer vocabulary ids are not consecutive; cannot write vocab.txt")
    hf_io.save_hf_dir(model, model.config, out_dir, config_fields=config_fields)
    with atomic_write(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:
        f.writelines(t + "\n" for t, _ in vocab)
    atomic_json(os.path.join(out_dir, "tokenizer_config.json"),
                {"do_lower_case": bool(tokenizer.do_lower_case), "tokenizer_class": "BertTokenizer",
                 "model_max_length": model.config.max_position_embeddings}, sort_keys=False)
