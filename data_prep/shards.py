"""Tokenize one deterministic unit of documents (a shard) into a small Megatron dataset.

Shard (i, k) is the k-th run of `docs_per_shard` documents of input file i, so its content
depends only on the inputs and the arguments: never on how many workers or MPI ranks exist. Each
shard is finished by writing `<prefix>.json` last (atomic rename); a re-run finds those markers
and skips the work, which is the resume path.
"""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np

from .atomic import atomic_json, commit, tmp_name
from .splitter import get_splitter
from .tokenizer import load_tokenizer

_STATE: dict = {}


def corpus_dtype(vocab_size: int):
    # megatron-core's own rule (uint16 below 65,500 entries), restated to avoid importing torch
    # in every worker just to read it.
    return np.uint16 if vocab_size < 65500 else np.int32


def init_worker(cfg: dict) -> None:
    """Per-process state: built once per worker, not per shard."""
    if cfg.get("in_worker"):
        # The worker processes are the parallelism; a rayon thread pool in each would oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = load_tokenizer(cfg["tokenizer_file"], cfg["lower_case"])
    _STATE.update(cfg=cfg, tok=tok, split=get_splitter(cfg["splitter"]))


def shard_prefix(work_dir: str, shard_id: tuple[int, int]) -> str:
    file_index, k = shard_id
    return os.path.join(work_dir, f"shard_{file_index:06d}_{k:06d}")


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def shard_done(work_dir: str, shard_id: tuple[int, int]) -> dict | None:
    return _read_json(shard_prefix(work_dir, shard_id) + ".json")


def file_marker(work_dir: str, file_index: int) -> str:
    return os.path.join(work_dir, f"file_{file_index:06d}.json")


def file_done(work_dir: str, file_index: int) -> dict | None:
    """Written once every shard of the file is finished: {"shards": n, "read_counts", "empty"}."""
    return _read_json(file_marker(work_dir, file_index))


def document_sentences(lines: list[str], encoded, split, max_sentence_tokens: int, counts: Counter) -> list[np.ndarray]:
    """Token arrays, one per sentence, for one document whose lines were already encoded."""
    sents: list[np.ndarray] = []
    for line, (ids, starts) in zip(lines, encoded):
        if len(ids) == 0:
            continue
        spans = split(line)
        if len(spans) > 1:
            span_starts = np.fromiter((s for s, _ in spans[1:]), dtype=np.int64, count=len(spans) - 1)
            cuts = np.searchsorted(starts, span_starts, side="left")
            pieces = np.split(ids, cuts)
        else:
            pieces = [ids]
        for p in pieces:
            if len(p) == 0:
                continue
            if len(p) > max_sentence_tokens:
                counts["long_sentences_cut"] += 1
                sents.extend(p[i:i + max_sentence_tokens] for i in range(0, len(p), max_sentence_tokens))
            else:
                sents.append(p)
    return sents


def tokenize_documents(tok, split, docs: list[list[str]], max_sentence_tokens: int, counts: Counter) -> list[list[np.ndarray]]:
    """Per document, the token arrays of its sentences, each equal to tokenizing that sentence alone.

    WordPiece: one batch call per shard on whole lines, cut at the splitter's character offsets
    (cuts fall between pre-tokenizer words, so the ids are unchanged). Sentencepiece has no such
    guarantee: a sentence that starts without whitespace before it ("...文。Then") is a mid-word
    piece inside the line but gets the word-start marker alone, so it encodes each sentence.
    """
    if tok.type != "sentencepiece":
        encoded = tok.encode_lines([ln for d in docs for ln in d])
        out, pos = [], 0
        for d in docs:
            out.append(document_sentences(d, encoded[pos:pos + len(d)], split, max_sentence_tokens, counts))
            pos += len(d)
        return out
    doc_sents = [[ln[a:b] for ln in d for a, b in split(ln)] for d in docs]
    encoded = tok.encode_lines([s for d in doc_sents for s in d])
    out, pos = [], 0
    for d in doc_sents:
        out.append(document_sentences(d, encoded[pos:pos + len(d)], _whole, max_sentence_tokens, counts))
        pos += len(d)
    return out


def _whole(line: str) -> list[tuple[int, int]]:
    return [(0, len(line))]


def process_shard(shard_id: tuple[int, int], docs: list[list[str]]) -> dict:
    """Tokenize `docs` and write shard files; returns the shard's counts (also stored as JSON)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    cfg, tok, split = _STATE["cfg"], _STATE["tok"], _STATE["split"]
    prefix = shard_prefix(cfg["work_dir"], shard_id)
    counts: Counter = Counter()
    doc_sents = tokenize_documents(tok, split, docs, cfg["max_sentence_tokens"], counts)
    dtype = corpus_dtype(tok.vocab_size)
    tmp_bin, tmp_idx = tmp_name(prefix + ".bin"), tmp_name(prefix + ".idx")
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    for sents in doc_sents:
        if not sents:
            counts["empty_documents_after_tokenizing"] += 1
            continue
        lengths = [len(s) for s in sents]
        builder.add_document(np.concatenate(sents), lengths)
        counts["documents"] += 1
        counts["sentences"] += len(sents)
        counts["tokens"] += sum(lengths)
        if len(sents) == 1:
            counts["one_sentence_documents"] += 1
    builder.finalize(tmp_idx)
    commit(tmp_bin, prefix + ".bin")
    commit(tmp_idx, prefix + ".idx")
    result = {"shard": list(shard_id), "input_documents": len(docs), "counts": dict(counts)}
    # Written last: its presence is what marks the shard finished for a resumed run.
    atomic_json(prefix + ".json", result)
    return result
