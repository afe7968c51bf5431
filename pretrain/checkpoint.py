"""Checkpoints of a run directory: DeepSpeed's engine state plus what exact resume needs.

Layout of RUN_DIR (one folder per saved step, DeepSpeed's own files inside):

    RUN_DIR/latest                      # the tag of the newest COMPLETE checkpoint (DeepSpeed's format)
    RUN_DIR/step_<N>/                   # DeepSpeed files (mp_rank_*, *_optim_states.pt) ...
    RUN_DIR/step_<N>/rng/rank_<r>.pt    # every rank's python/numpy/torch RNG states
    RUN_DIR/step_<N>/trainer_state.json # step, consumed samples, resolved config, model config, world
    RUN_DIR/step_<N>/vocab.txt          # the tokenizer, so export needs nothing but this folder

`latest` is rewritten (atomically) only after every rank has finished writing, so a run killed
mid-save resumes from the previous checkpoint; older folders beyond `keep_last` are removed only
after that. DeepSpeed's own `latest` handling is turned off (save_latest=False) because it writes
`latest` before the trainer's extra files exist.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import random
import re
import shutil
import tempfile
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from data_prep.atomic import atomic_write
from pretrain.model import BertForPreTraining
from pretrain.quiet import captured_output
from pretrain.tensor_parallel import universal_checkpoint_patterns, unshard_state_dicts
from pretrain.vocab import resize_vocab

log = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "trainer_state.json"
_TAG_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step}"


def latest_tag(run_dir: str) -> Optional[str]:
    """The tag `latest` names, if it points at a complete checkpoint; None for a fresh run."""
    path = os.path.join(run_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    if not os.path.isfile(os.path.join(run_dir, tag, STATE_FILE)):
        raise CheckpointError(
            f"{path} names checkpoint {tag!r} but {os.path.join(run_dir, tag, STATE_FILE)} is missing; "
            "the run directory was edited by hand: fix `latest` or use a new --save_dir"
        )
    return tag


def resolve(path: str) -> tuple[str, str]:
    """RUN_DIR, RUN_DIR/latest or RUN_DIR/step_N -> (run_dir, tag) of a complete checkpoint."""
    path = os.path.normpath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, STATE_FILE)):
        return os.path.dirname(path) or ".", os.path.basename(path)
    if os.path.basename(path) == LATEST:
        path = os.path.dirname(path) or "."
    if os.path.isdir(path):
        tag = latest_tag(path)
        if tag is not None:
            return path, tag
    raise CheckpointError(
        f"{path}: not a checkpoint of this trainer (expected RUN_DIR, RUN_DIR/latest or RUN_DIR/step_N "
        f"containing {STATE_FILE})"
    )


def read_state(run_dir: str, tag: str) -> dict:
    with open(os.path.join(run_dir, tag, STATE_FILE)) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Save / load (collective: every rank calls these)


def save(engine, run_dir: str, step: int, state: dict, keep_last: int, vocab_file: Optional[str] = None,
         extra: Optional[dict] = None) -> str:
    """Write checkpoint `step_<step>` and move `latest` to it once complete; prune old ones."""

    rank = dist.get_rank()
    tag = tag_for(step)
    tag_dir = os.path.join(run_dir, tag)
    if rank == 0 and os.path.isdir(tag_dir):
        # Leftover of a save that was killed before `latest` moved (or of another TP size, whose
        # mp_rank files DeepSpeed would try to load): never mix old and new files.
        shutil.rmtree(tag_dir)
    dist.barrier()
    client = {"trainer": state, "iteration": step, "universal_checkpoint_info": universal_info()}
    engine.save_checkpoint(run_dir, tag=tag, client_state=client, save_latest=False)
    os.makedirs(os.path.join(tag_dir, "rng"), exist_ok=True)
    torch.save({"rng": rng_state(), **(extra or {})}, os.path.join(tag_dir, "rng", f"rank_{rank}.pt"))
    dist.barrier()
    if rank == 0:
        if vocab_file and os.path.isfile(vocab_file):
            shutil.copyfile(vocab_file, os.path.join(tag_dir, os.path.basename(vocab_file)))
        with atomic_write(os.path.join(tag_dir, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1, sort_keys=True)
        with atomic_write(os.path.join(run_dir, LATEST), "w", encoding="utf-8") as f:
            f.write(tag)
        prune(run_dir, keep_last)
    dist.barrier()
    log.info("saved checkpoint %s", tag_dir)
    return tag_dir


def universal_info() -> dict:
    """What DeepSpeed's ds_to_universal needs to re-partition this model's ZeRO state for another
    dp size (used when a run resumes on a different number of ranks): the TP split rules, from
    pretrain.tensor_parallel."""
    return {"universal_checkpoint_version": 0.4, **universal_checkpoint_patterns()}


def prune(run_dir: str, keep_last: int) -> None:
    """Delete checkpoint folders beyond the newest `keep_last` (never the one `latest` names)."""
    latest = latest_tag(run_dir)
    tags = sorted(
        (int(m.group(1)), d) for d in os.listdir(run_dir) if (m := _TAG_RE.match(d)) and os.path.isdir(os.path.join(run_dir, d))
    )
    complete = [(s, d) for s, d in tags if os.path.isfile(os.path.join(run_dir, d, STATE_FILE))]
    for _, d in complete[:-keep_last] if keep_last > 0 else []:
        if d != latest:
            shutil.rmtree(os.path.join(run_dir, d), ignore_errors=True)


def load(engine, run_dir: str, tag: str, same_world: bool, rng_tag: Optional[str] = None) -> tuple[dict, dict]:
    """Load engine state (weights, optimizer, schedule) and, at the same world size, each rank's
    RNG states (from `rng_tag`'s folder, default `tag`). Returns (the trainer state saved with the
    checkpoint, the extra per-rank entries saved with the RNG states)."""

    path, client = engine.load_checkpoint(run_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {os.path.join(run_dir, tag)}")
    state = client.get("trainer") or read_state(run_dir, rng_tag or tag)
    rng_file = os.path.join(run_dir, rng_tag or tag, "rng", f"rank_{dist.get_rank()}.pt")
    extra = {}
    if same_world and os.path.isfile(rng_file):
        extra = torch.load(rng_file, weights_only=False)
        set_rng_state(extra.pop("rng"))
    return state, extra


# ----------------------------------------------------------------------------------------------
# Offline: full fp32 weights out of ZeRO (and tensor-parallel) shards, without a process group


def full_weights(run_dir: str, tag: str) -> dict:
    """The checkpoint's full fp32 weights in the HF layout, with its real vocabulary: ZeRO
    partitions gathered, TP shards joined, vocabulary rows cut to the model config's vocab_size
    (training pads them for tensor parallelism, pretrain/vocab.py). Every offline reader (HF export,
    --init_from, tests comparing against a dense model) takes the weights from here."""
    state = read_state(run_dir, tag)
    shards = fp32_shards(run_dir, tag)
    if len(shards) != state["tp"]:
        raise CheckpointError(f"{os.path.join(run_dir, tag)}: {len(shards)} tensor-parallel shard sets, "
                              f"trainer state says tp={state['tp']}")
    return resize_vocab(unshard_state_dicts(shards), state["model_config"]["vocab_size"])


def fp32_shards(run_dir: str, tag: str) -> list[dict]:
    """One full-size (ZeRO-gathered) fp32 state dict per tensor-parallel rank, in TP-rank order.

    DeepSpeed's zero_to_fp32 reads a folder holding exactly one model-parallel rank's files, named
    as rank 0's; each TP rank's files are linked into such a folder in turn.
    """
    # Imported here: importing DeepSpeed picks an accelerator, which an offline reader must not.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = os.path.join(os.path.abspath(run_dir), tag)
    files = glob.glob(os.path.join(tag_dir, "*_states.pt"))
    mp_ranks = sorted({int(m.group(1)) for f in files if (m := re.search(r"mp_rank_(\d+)", os.path.basename(f)))})
    if not mp_ranks:
        raise CheckpointError(f"{tag_dir}: no DeepSpeed *_states.pt files")
    shards = []
    for r in mp_ranks:
        with tempfile.TemporaryDirectory() as tmp:
            os.makedirs(os.path.join(tmp, tag))
            for f in files:
                name = os.path.basename(f)
                if f"mp_rank_{r:02d}" in name:
                    os.symlink(f, os.path.join(tmp, tag, name.replace(f"mp_rank_{r:02d}", "mp_rank_00")))
            with captured_output("deepspeed zero_to_fp32"):  # its progress prints and bar
                sd = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=tag)
            # Tied aliases (the MLM decoder = the word embeddings) are listed by some mp ranks'
            # files only; the owner key carries the tensor, so aliases are dropped everywhere.
            tied = BertForPreTraining.tied_weights
            shards.append({k: v.detach().clone().float() for k, v in sd.items() if k not in tied})
    return shards
