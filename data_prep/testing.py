"""Fixture helper for tests across the project: a real data_prep output directory in seconds.

It runs the real pipeline (no shortcuts) on the first `n_docs` documents of the embedded corpus
with the embedded bert-base-uncased vocab.
"""
from __future__ import annotations

import fcntl
import json
import os

from . import manifest
from .embedded import embedded_corpus_jsonl, embedded_vocab
from .manifest import ManifestError
from .pipeline import PrepConfig, run


def build_tiny_dataset(out_dir: str, seq_lengths=(64,), n_docs: int = 200, seed: int = 1234,
                       valid_fraction: float = 0.05, workers: int = 1, cache_dir: str | None = None,
                       **overrides) -> str:
    """Prepare `out_dir` (if it is not already complete with the same arguments); returns it.

    `cache_dir` defaults to `out_dir/../.data_prep_cache` so pytest tmp dirs stay self-contained.
    Extra keyword arguments go to `PrepConfig` (e.g. dupe_factor=2, or train_wordpiece_vocab_size=1000
    for a vocab trained on those documents instead of the embedded one).
    """
    cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(out_dir)), ".data_prep_cache")
    vocab = overrides.pop("vocab", None)
    if vocab is None and not overrides.get("train_spm_vocab_size") and not overrides.get("train_wordpiece_vocab_size"):
        vocab = embedded_vocab()
    cfg = PrepConfig(
        inputs=[embedded_corpus_jsonl(cache_dir, max_docs=n_docs)],
        output_dir=out_dir,
        vocab=vocab,
        seq_lengths=list(seq_lengths),
        seed=seed,
        valid_fraction=valid_fraction,
        workers=workers,
        progress=False,
        docs_per_shard=overrides.pop("docs_per_shard", 50),
        **overrides,
    )
    cfg.validate()
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    # Several test processes (e.g. spawned ranks) may ask for the same directory at once: the
    # first builds it, the others wait and reuse it.
    with open(os.path.abspath(out_dir) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if manifest.read(out_dir).args == json.loads(json.dumps(cfg.manifest_args())):
                return out_dir
        except ManifestError:  # not built yet, unfinished or of an older format: (re)build it
            pass
        run(cfg)
    return out_dir
