"""Tokenize one deterministic unit of documents (a shard) into a small Megatron dataset.

Shard (p, k) of an input file is the k-th run of documents of part p of that file (see
pipeline.py), so its content depends only on that file and the arguments: never on how many
workers or MPI ranks exist, nor on the other input files. Each file has its own directory under
the work dir. A shard's .bin and .idx are fsynced and renamed into place before `<prefix>.json`,
which records their sizes, is written (atomic rename, fsynced): a re-run finds those markers,
checks the sizes and skips the work (the resume path); a shard whose files do not match its
marker (a power loss, a hand edit) is redone.
"""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np

from .atomic import atomic_json, commit, fsync_path, tmp_name
from .readers import add_example, excerpt, printable
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
    if cfg.get("in_worker") and tok.type == "sentencepiece":
        tok.num_threads = 1  # likewise for sentencepiece's batch-encode threads
    _STATE.update(cfg=cfg, tok=tok, split=get_splitter(cfg["splitter"]))


def shard_prefix(file_dir: str, part: int, k: int) -> str:
    return os.path.join(file_dir, f"shard_{part:06d}_{k:06d}")


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def shard_done(prefix: str) -> dict | None:
    """The shard's marker if its .bin and .idx are there with the sizes it recorded, else None."""
    info = _read_json(prefix + ".json")
    if not isinstance(info, dict) or not isinstance(info.get("bytes"), dict):
        return None  # no marker, a damaged one, or one of a layout without sizes
    for ext in ("bin", "idx"):
        try:
            if os.path.getsize(f"{prefix}.{ext}") != info["bytes"].get(ext):
                return None
        except OSError:
            return None
    return info


def part_marker(file_dir: str, part: int) -> str:
    return os.path.join(file_dir, f"part_{part:06d}.json")


def part_done(file_dir: str, part: int) -> dict | None:
    """Written once every shard of the part is finished: {"shards": n, "documents", "lines",
    "read_counts", "read_examples"} (a marker without "lines", of an older layout, is not finished:
    the part is read again, its finished shards kept)."""
    info = _read_json(part_marker(file_dir, part))
    ok = isinstance(info, dict) and isinstance(info.get("shards"), int) and isinstance(info.get("lines"), int)
    return info if ok else None


def _add_sentences(sents: list, pieces, max_sentence_tokens: int, counts: Counter) -> None:
    """Append the non-empty token arrays of `pieces`, cutting any longer than the limit."""
    for p in pieces:
        if len(p) == 0:
            continue
        if len(p) > max_sentence_tokens:
            counts["long_sentences_cut"] += 1
            sents.extend(p[i:i + max_sentence_tokens] for i in range(0, len(p), max_sentence_tokens))
        else:
            sents.append(p)


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
        _add_sentences(sents, pieces, max_sentence_tokens, counts)
    return sents


REFUSED = "tokenizer_refused_documents"
_PROBE = [["A probe sentence. And another one."]]


def tokenize_documents(tok, split, docs: list[list[str]], max_sentence_tokens: int, counts: Counter,
                       examples: dict | None = None) -> list:
    """Per document, the token arrays of its sentences, each equal to tokenizing that sentence alone.

    WordPiece: one batch call per shard on whole lines, cut at the splitter's character offsets
    (cuts fall between pre-tokenizer words, so the ids are unchanged). Sentencepiece has no such
    guarantee: a sentence that starts without whitespace before it ("...文。Then") is a mid-word
    piece inside the line but gets the word-start marker alone, so every sentence is encoded
    alone, all of them in one batch call.

    A document whose text the splitter or the tokenizer refuses (raises on) is dropped: None in
    its place, counted as `tokenizer_refused_documents`, the first few kept in `examples` with the
    line where the document starts (readers.Document.line), the text refused and the error. The
    readers hand over text that all of them accept, so this is the net for what they do not know
    of; an error that a plain probe text also gets is the tokenizer's, not the text's: raised.
    """
    batch_counts: Counter = Counter()
    try:
        out = _tokenize(tok, split, docs, max_sentence_tokens, batch_counts)
    except MemoryError:
        raise
    except Exception as batch_error:
        if not _accepts(tok, split, _PROBE):
            raise  # the tokenizer fails on any text: its error, not the text's
        out, batch_counts = [], Counter()
        for d in docs:
            try:
                out.extend(_tokenize(tok, split, [d], max_sentence_tokens, batch_counts))
            except MemoryError:
                raise
            except Exception as e:
                out.append(None)
                batch_counts[REFUSED] += 1
                if examples is not None:
                    bad = next((ln for ln in d if not _accepts(tok, split, [[ln]])), d[0] if d else "")
                    add_example(examples, REFUSED, {"line": getattr(d, "line", None), "excerpt": excerpt(bad),
                                                    "error": printable(f"{type(e).__name__}: {e}")[:200]})
        if not batch_counts[REFUSED]:
            raise batch_error  # no single document fails alone: not the text's fault
    counts.update(batch_counts)
    return out


def _accepts(tok, split, docs) -> bool:
    try:
        _tokenize(tok, split, docs, 1 << 30, Counter())
        return True
    except MemoryError:
        raise
    except Exception:
        return False


def _tokenize(tok, split, docs: list[list[str]], max_sentence_tokens: int, counts: Counter) -> list[list[np.ndarray]]:
    if tok.type != "sentencepiece":
        encoded = tok.encode_lines([ln for d in docs for ln in d])
        out, pos = [], 0
        for d in docs:
            out.append(document_sentences(d, encoded[pos:pos + len(d)], split, max_sentence_tokens, counts))
            pos += len(d)
        return out
    doc_sents = [[ln[a:b] for ln in d for a, b in split(ln)] for d in docs]
    encoded = tok.encode_ids([s for d in doc_sents for s in d])
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    # Sentences that are empty or too long need Python work; a document without any is a slice
    # of the batch (per-sentence work would cost a tenth of the encoding).
    special = np.flatnonzero((lengths == 0) | (lengths > max_sentence_tokens)).tolist()
    out, pos, j = [], 0, 0
    for d in doc_sents:
        end = pos + len(d)
        if j < len(special) and special[j] < end:
            sents: list[np.ndarray] = []
            _add_sentences(sents, encoded[pos:end], max_sentence_tokens, counts)
            out.append(sents)
            while j < len(special) and special[j] < end:
                j += 1
        else:
            out.append(encoded[pos:end])
        pos = end
    return out


def process_shard(prefix: str, docs: list[list[str]]) -> dict:
    """Tokenize `docs` and write shard files; returns the shard's counts (also stored as JSON)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    cfg, tok, split = _STATE["cfg"], _STATE["tok"], _STATE["split"]
    counts: Counter = Counter()
    examples: dict = {}
    doc_sents = tokenize_documents(tok, split, docs, cfg["max_sentence_tokens"], counts, examples)
    dtype = corpus_dtype(tok.vocab_size)
    tmp_bin, tmp_idx = tmp_name(prefix + ".bin"), tmp_name(prefix + ".idx")
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    for sents in doc_sents:
        if sents is None:  # refused by the tokenizer: counted, with examples
            continue
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
    # Data on disk before the marker that vouches for it: after a power loss a marker never
    # points at a shard whose blocks were not written (the sizes in the marker catch the rest).
    for tmp in (tmp_bin, tmp_idx):
        fsync_path(tmp)
    commit(tmp_bin, prefix + ".bin")
    commit(tmp_idx, prefix + ".idx")
    fsync_path(os.path.dirname(prefix) or ".")  # the two renames, before the marker's
    # "plan": the shard sizes that cut it; an unfinished part reuses only shards of the run's plan.
    result = {"shard": os.path.basename(prefix), "input_documents": len(docs), "counts": dict(counts),
              "plan": cfg.get("plan"),
              "bytes": {"bin": os.path.getsize(prefix + ".bin"), "idx": os.path.getsize(prefix + ".idx")}}
    if examples:  # {reason: [{"line" (from the part's start), "excerpt", "error"}]}; the merge adds the file
        result["examples"] = examples
    # Written last: its presence is what marks the shard finished for a resumed run.
    atomic_json(prefix + ".json", result)
    return result
