"""NSP pair construction with google-research/bert `create_pretraining_data.py` semantics.

Per document (its own RNG, derived from seed, seq length, dupe round and document index, so the
result is the same whatever process builds it):
- target = seq_length - 3; with probability `short_seq_prob` (drawn once per document, as in the
  original) a random target in [2, seq_length - 3];
- sentences are accumulated until the target is reached or the document ends; A = the first
  1..n-1 of them (random);
- B is the rest, or with probability 0.5 (always, if the chunk has one sentence) a run of
  sentences from a random *other* document of the same split, starting at a random sentence and
  long enough for the remaining target; the chunk's unused sentences are put back and start the
  next chunk.
Only sentence spans are stored; truncation to seq_length - 3 happens at load time.
"""
from __future__ import annotations

import random

import numpy as np

from .pairs import PAIR_DTYPE


def document_rng(seed: int, seq_length: int, dupe: int, doc: int) -> random.Random:
    # An int seed is used bit for bit (stable across runs, platforms and processes, unlike hash());
    # packing the fields into disjoint bit ranges gives every (seed, L, dupe, doc) its own stream.
    if not (0 <= doc < 2**32 and 0 <= dupe < 2**16 and 0 <= seq_length < 2**16 and seed >= 0):
        raise ValueError(f"rng fields out of range: seed={seed} L={seq_length} dupe={dupe} doc={doc}")
    return random.Random((seed << 64) | (seq_length << 48) | (dupe << 32) | doc)


def document_pairs(doc: int, first: int, lens: list[int], rng: random.Random, max_num_tokens: int,
                   short_seq_prob: float, split_docs: np.ndarray, doc_first: np.ndarray,
                   doc_count: np.ndarray, sent_lens: np.ndarray, chunk_sizes: list | None = None):
    """Pairs for one document. Returns (list of record tuples, target length used).

    `chunk_sizes`, if given, receives the number of sentences accumulated for each pair (for
    statistics: a one-sentence chunk always takes a random B, as in the original).

    `split_docs` are the documents random B may come from (same split); `doc_first`/`doc_count`
    give each document's first global sentence and sentence count; `sent_lens` all sentence lengths.
    """
    target = max_num_tokens
    if rng.random() < short_seq_prob:
        target = rng.randint(2, max_num_tokens)
    out = []
    chunk_start = 0  # index into lens of the chunk's first sentence
    cur_len = 0
    i = 0
    n = len(lens)
    while i < n:
        cur_len += lens[i]
        if i == n - 1 or cur_len >= target:
            chunk_n = i - chunk_start + 1
            a_end = rng.randint(1, chunk_n - 1) if chunk_n >= 2 else 1
            a_len = sum(lens[chunk_start:chunk_start + a_end])
            if chunk_n == 1 or rng.random() < 0.5:
                rdoc = doc
                for _ in range(10):
                    rdoc = int(split_docs[rng.randint(0, len(split_docs) - 1)])
                    if rdoc != doc:
                        break
                if rdoc == doc:
                    # Google falls back to the same document here; we prefer a clean label and
                    # take the next document of the split (only reachable with tiny splits).
                    j = int(np.searchsorted(split_docs, doc))
                    rdoc = int(split_docs[(j + 1) % len(split_docs)])
                    if rdoc == doc:
                        i = chunk_start + chunk_n
                        chunk_start, cur_len = i, 0
                        continue
                r_first, r_n = int(doc_first[rdoc]), int(doc_count[rdoc])
                r_start = rng.randint(0, r_n - 1)
                target_b = target - a_len
                b_len = 0
                b_n = 0
                for k in range(r_start, r_n):
                    b_len += int(sent_lens[r_first + k])
                    b_n += 1
                    if b_len >= target_b:
                        break
                out.append((first + chunk_start, r_first + r_start, a_end, b_n, 1))
                if chunk_sizes is not None:
                    chunk_sizes.append(chunk_n)
                # The unused sentences of this chunk go back to start the next one.
                i = chunk_start + a_end - 1
            else:
                out.append((first + chunk_start, first + chunk_start + a_end, a_end, chunk_n - a_end, 0))
                if chunk_sizes is not None:
                    chunk_sizes.append(chunk_n)
            chunk_start = i + 1
            cur_len = 0
        i += 1
    return out, target


def pairs_for_documents(seq_length: int, docs: np.ndarray, split_docs: np.ndarray, seed: int, dupe: int,
                        short_seq_prob: float, doc_first: np.ndarray, doc_count: np.ndarray,
                        sent_lens: np.ndarray, stats=None) -> np.ndarray:
    """Pairs of `docs` (a run of the split `split_docs`) for one dupe round, as a PAIR_DTYPE array."""
    max_num_tokens = seq_length - 3
    buf = []
    for d in docs:
        d = int(d)
        n = int(doc_count[d])
        if n < 2:
            continue
        first = int(doc_first[d])
        rng = document_rng(seed, seq_length, dupe, d)
        recs, target = document_pairs(d, first, sent_lens[first:first + n].tolist(), rng, max_num_tokens,
                                      short_seq_prob, split_docs, doc_first, doc_count, sent_lens)
        if stats is not None:
            stats["documents"] += 1
            stats["short_target_documents"] += target < max_num_tokens
        buf.extend(recs)
    return np.array(buf, dtype=PAIR_DTYPE) if buf else np.zeros(0, dtype=PAIR_DTYPE)


def pair_tasks(n_docs: int, dupe_factor: int, block: int, sentences: np.ndarray | None = None,
               max_sentences: int | None = None) -> list[tuple[int, int, int]]:
    """(dupe, lo, hi) runs of a split's documents, in the order their records are written:
    dupe-major, then document order. A run ends after `block` documents or, with `sentences` (each
    document's sentence count, in split order), at the document that takes it to `max_sentences`:
    a task's records are held in memory until written, and a run of long documents (books, a
    file without blank lines cut into 1 MiB pseudo-documents) would otherwise hold millions.
    Every pair takes at least one sentence of its document, so a task holds at most
    `max_sentences` + (its longest document's sentences) records. Every document's records come
    from its own RNG, so where runs end never changes the bytes, and any worker count runs the
    same tasks. No `sentences` (or `max_sentences` 0): runs of `block` documents."""
    bounds = []
    if sentences is None or not max_sentences:
        bounds = [(lo, min(lo + block, n_docs)) for lo in range(0, n_docs, block)]
    else:
        if len(sentences) != n_docs or max_sentences < 0:
            raise ValueError(f"pair_tasks: {len(sentences)} sentence counts for {n_docs} documents, "
                             f"max_sentences {max_sentences}")
        ends = np.cumsum(np.asarray(sentences, dtype=np.int64))  # sentences up to and including each
        lo = 0
        while lo < n_docs:
            before = int(ends[lo - 1]) if lo else 0
            # the first document whose run total reaches max_sentences ends the run; it is at index
            # >= lo (ends[lo - 1] = before < before + max_sentences), so a run holds >= 1 document
            hi = min(lo + block, n_docs, int(np.searchsorted(ends, before + max_sentences, side="left")) + 1)
            bounds.append((lo, hi))
            lo = hi
    return [(dupe, lo, hi) for dupe in range(dupe_factor) for lo, hi in bounds]
