"""A synthetic data_prep output directory for the pretraining-data tests and the loader benchmark.

Built directly with megatron-core's IndexedDatasetBuilder, data_prep.pairs.write_pair_index and a
manifest.json as docs/interfaces.md specifies, so these tests do not depend on the text pipeline.
The vocabulary is small but shaped like BERT's: [PAD], [unusedN], [UNK], [CLS], [SEP], [MASK],
whole words and `##` continuation pieces; the corpus contains some [UNK] and a few long sentences
so that truncation and special-token handling are exercised.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

from data_prep.pairs import PAIR_DTYPE, write_pair_index

N_UNUSED = 5
SPECIALS = ["[PAD]"] + [f"[unused{i}]" for i in range(N_UNUSED)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
N_WORDS = 300
N_PIECES = 100


def synthetic_vocab() -> list[str]:
    return SPECIALS + [f"w{i}" for i in range(N_WORDS)] + [f"##p{i}" for i in range(N_PIECES)]


def special_ids(vocab: list[str]) -> dict:
    return {"pad": vocab.index("[PAD]"), "unk": vocab.index("[UNK]"), "cls": vocab.index("[CLS]"),
            "sep": vocab.index("[SEP]"), "mask": vocab.index("[MASK]")}


def _sentence(rng: np.random.Generator, n_words: int, vocab: list[str]) -> list[int]:
    first_word = len(SPECIALS)
    first_piece = first_word + N_WORDS
    unk = vocab.index("[UNK]")
    out: list[int] = []
    for _ in range(n_words):
        if rng.random() < 0.02:
            out.append(unk)
            continue
        out.append(first_word + int(rng.integers(N_WORDS)))
        out.extend((first_piece + rng.integers(N_PIECES, size=int(rng.choice(3, p=[0.6, 0.3, 0.1])))).tolist())
    return out


def build_synthetic_dataset(
    out_dir: str,
    n_docs: int = 60,
    seq_lengths: tuple[int, ...] = (64, 128),
    seed: int = 0,
) -> str:
    """Write corpus.bin/.idx, vocab.txt, pairs_<L>_{train,valid}.bin and manifest.json to out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = synthetic_vocab()
    with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")

    prefix = os.path.join(out_dir, "corpus")
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=np.uint16)
    doc_sentences: list[tuple[int, int]] = []  # (first global sentence, count) per document
    n_sent = 0
    for _ in range(n_docs):
        count = int(rng.integers(4, 14))
        doc_sentences.append((n_sent, count))
        for _ in range(count):
            # Mostly short sentences, a few very long ones that must be truncated.
            n_words = int(rng.integers(3, 25)) if rng.random() > 0.05 else int(rng.integers(60, 200))
            builder.add_item(torch.tensor(_sentence(rng, n_words, vocab), dtype=torch.int64))
            n_sent += 1
        builder.end_document()
    builder.finalize(get_idx_path(prefix))

    docs = np.arange(n_docs)
    valid_docs = set(rng.choice(docs, size=max(1, n_docs // 10), replace=False).tolist())
    manifest_pairs = {}
    for length in seq_lengths:
        entry = {}
        for split in ("train", "valid"):
            records = []
            split_docs = [d for d in docs if (d in valid_docs) == (split == "valid")]
            for d in split_docs:
                first, count = doc_sentences[d]
                i = 0
                while i < count - 1:
                    a_count = int(rng.integers(1, max(2, min(4, count - i))))
                    a_count = min(a_count, count - i - 1)
                    if rng.random() < 0.5 and len(split_docs) > 1:
                        other = int(rng.choice([o for o in split_docs if o != d]))
                        o_first, o_count = doc_sentences[other]
                        b_start = o_first + int(rng.integers(o_count))
                        b_count = 1
                        is_random = 1
                    else:
                        b_start = first + i + a_count
                        b_count = int(rng.integers(1, count - i - a_count + 1))
                        is_random = 0
                    records.append((first + i, b_start, a_count, b_count, is_random))
                    i += a_count + (b_count if not is_random else 0)
            name = f"pairs_{length}_{split}.bin"
            write_pair_index(os.path.join(out_dir, name), length, np.array(records, dtype=PAIR_DTYPE))
            entry[split] = name
        manifest_pairs[str(length)] = entry

    def sha(name):
        with open(os.path.join(out_dir, name), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    files = ["corpus.bin", "corpus.idx", "vocab.txt"] + [n for e in manifest_pairs.values() for n in e.values()]
    manifest = {
        "format_version": 1,
        "corpus": "corpus",
        "pairs": manifest_pairs,
        "tokenizer": {"type": "wordpiece", "file": "vocab.txt", "lower_case": True, "vocab_size": len(vocab),
                      "sha256": sha("vocab.txt"), "special_ids": special_ids(vocab)},
        "counts": {"documents": n_docs, "sentences": n_sent},
        "dropped": {},
        "args": {"synthetic": True},
        "seed": seed,
        "files": {n: sha(n) for n in files},
    }
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return out_dir
