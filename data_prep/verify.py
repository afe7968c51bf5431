"""`python -m data_prep.verify DIR`: is a data_prep directory complete and intact?

Checks that manifest.json exists, that every file it lists has the recorded SHA-256, and that the
corpus and pair indexes parse (the pair index checks its own size against its header). Exit 0 when
all is well, 1 with one line per problem otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .pairs import PairIndex, PairIndexError
from .tokenizer import sha256_file


def verify(data_dir: str, deep: bool = True) -> list[str]:
    problems: list[str] = []
    mpath = os.path.join(data_dir, "manifest.json")
    try:
        with open(mpath) as f:
            m = json.load(f)
    except FileNotFoundError:
        return [f"{mpath}: missing: the run did not finish (re-run data_prep to complete it)"]
    except (OSError, json.JSONDecodeError) as e:
        return [f"{mpath}: unreadable ({e})"]
    for name, digest in sorted(m.get("files", {}).items()):
        p = os.path.join(data_dir, name)
        if not os.path.exists(p):
            problems.append(f"{p}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{p}: SHA-256 mismatch (truncated or corrupted; re-run data_prep)")
    if problems or not deep:
        return problems
    for L, splits in m.get("pairs", {}).items():
        for split, name in splits.items():
            try:
                idx = PairIndex(os.path.join(data_dir, name))
            except PairIndexError as e:
                problems.append(str(e))
                continue
            if str(idx.seq_length) != L:
                problems.append(f"{name}: seq_length {idx.seq_length} but the manifest lists it under {L}")
            n_sent = m["counts"]["sentences"]
            if len(idx) and (int((idx.pairs["a_start"].astype("u8") + idx.pairs["a_count"]).max()) > n_sent
                             or int((idx.pairs["b_start"].astype("u8") + idx.pairs["b_count"]).max()) > n_sent):
                problems.append(f"{name}: pairs point past the corpus ({n_sent} sentences)")
    return problems


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
