"""`python -m data_prep.verify DIR`: is a data_prep directory complete and intact?

Checks that manifest.json exists, that every file it lists has the recorded SHA-256, and (deep)
that the corpus opens with megatron-core's `IndexedDataset` with as many sentences as the manifest
says and a .bin as long as its index, that each pair index parses (it checks its own size against
its header) and that no pair points past the corpus. Exit 0 when all is well, 1 with one line per
problem otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from . import manifest
from .manifest import Manifest, ManifestError
from .pairs import PairIndex, PairIndexError
from .tokenizer import sha256_file


def verify(data_dir: str, deep: bool = True) -> list[str]:
    problems: list[str] = []
    try:
        m = manifest.read(data_dir)
    except ManifestError as e:  # missing (the run did not finish), unreadable, another format_version
        return [str(e)]
    for name, digest in sorted(m.files.items()):
        p = os.path.join(data_dir, name)
        if not os.path.exists(p):
            problems.append(f"{p}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{p}: SHA-256 mismatch (truncated or corrupted; re-run data_prep)")
    if problems or not deep:
        return problems
    n_sent = _check_corpus(data_dir, m, problems)
    if n_sent is None:
        return problems
    for L, splits in m.pairs.items():
        for split, name in splits.items():
            try:
                idx = PairIndex(os.path.join(data_dir, name))
            except PairIndexError as e:
                problems.append(str(e))
                continue
            if str(idx.seq_length) != L:
                problems.append(f"{name}: seq_length {idx.seq_length} but the manifest lists it under {L}")
            if _pairs_end(idx.pairs) > n_sent:
                problems.append(f"{name}: pairs point past the corpus ({n_sent} sentences)")
    return problems


CHUNK = 1 << 20  # pairs per step: memory stays flat whatever the index size


def _pairs_end(pairs) -> int:
    """One past the last sentence any pair uses."""
    end = 0
    for i in range(0, len(pairs), CHUNK):
        p = pairs[i:i + CHUNK]
        for start, count in (("a_start", "a_count"), ("b_start", "b_count")):
            end = max(end, int((p[start].astype(np.int64) + p[count]).max()))
    return end


def _check_corpus(data_dir: str, m: Manifest, problems: list[str]) -> int | None:
    """Sentences in the corpus, or None (with a problem recorded) when it cannot be used."""
    prefix = os.path.join(data_dir, m.corpus)
    try:
        # Here, not at the top: torch + megatron-core take seconds to import, which
        # `python -m data_prep.verify --help` and the shallow check do without.
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        ds = IndexedDataset(prefix)
        n_sent = len(ds)
        expected_bin = int(ds.sequence_lengths.sum(dtype=np.int64)) * ds.index.dtype_size
        del ds
    except Exception as e:  # megatron-core raises AssertionError/ValueError/OSError on bad files
        problems.append(f"{prefix}.idx/.bin: not a readable Megatron indexed dataset ({type(e).__name__}: {e})")
        return None
    if os.path.getsize(prefix + ".bin") != expected_bin:
        problems.append(f"{prefix}.bin: {os.path.getsize(prefix + '.bin')} bytes but the index needs {expected_bin}")
    listed = m.counts.sentences
    if listed is None:
        problems.append("manifest.json: counts.sentences missing (hand-edited?); re-run data_prep")
    elif listed != n_sent:
        problems.append(f"manifest.json: counts.sentences {listed} but the corpus has {n_sent}")
    return n_sent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.verify", description=__doc__.splitlines()[0])
    p.add_argument("data_dir")
    args = p.parse_args(argv)
    problems = verify(args.data_dir)
    for line in problems:
        print(f"FAIL {line}", file=sys.stderr)
    if not problems:
        print(f"OK {args.data_dir}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
