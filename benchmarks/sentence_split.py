"""Compare offline sentence splitters on speed and quality, side by side in one run.

Quality: a hand-labelled set (tests/assets/data_prep/sentence_split_gold.jsonl, 70 paragraphs /
142 sentences with abbreviations, initials, decimals, quotes, URLs, ellipses) scored as boundary
precision / recall / F1 and the share of paragraphs split exactly right.
Speed: characters per second on the same lines of the embedded Wikipedia corpus for every splitter.

    .venv/bin/python benchmarks/sentence_split.py [--lines 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep.embedded import embedded_corpus_jsonl  # noqa: E402
from data_prep.splitter import SPLITTERS  # noqa: E402

GOLD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "tests", "assets", "data_prep", "sentence_split_gold.jsonl")


def boundaries_from_gold(sents):
    text = " ".join(sents)
    out, pos = set(), 0
    for s in sents[:-1]:
        pos += len(s) + 1
        out.add(pos)
    return text, out


def predicted_boundaries(spans):
    return {a for a, _ in spans[1:]}


def quality(split):
    tp = fp = fn = exact = n = 0
    with open(GOLD) as f:
        for line in f:
            text, gold = boundaries_from_gold(json.loads(line)["sentences"])
            pred = predicted_boundaries(split(text))
            tp += len(pred & gold)
            fp += len(pred - gold)
            fn += len(gold - pred)
            exact += pred == gold
            n += 1
    p = tp / max(tp + fp, 1)
    r = tp / max(tp + fn, 1)
    return p, r, 2 * p * r / max(p + r, 1e-9), exact / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=1000, help="corpus paragraphs timed per splitter")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    with open(embedded_corpus_jsonl(args.cache_dir)) as f:
        lines = []
        for l in f:
            lines.extend(x.strip() for x in json.loads(l)["text"].split("\n") if x.strip())
            if len(lines) >= args.lines:
                break
    lines = lines[: args.lines]
    chars = sum(map(len, lines))
    print(f"speed text: {len(lines)} paragraphs, {chars:,} chars of the embedded corpus; quality: {GOLD}")
    print(f"{'splitter':<10} {'chars/s':>12} {'vs blingfire':>12} {'precision':>9} {'recall':>7} {'F1':>6} {'exact':>6}")
    rows = {}
    for name in ("blingfire", "pysbd", "syntok"):
        split = SPLITTERS[name]
        split(lines[0])  # warm-up (imports, model load)
        t = time.perf_counter()
        for ln in lines:
            split(ln)
        rows[name] = (chars / (time.perf_counter() - t),) + quality(split)
    base = rows["blingfire"][0]
    for name, (cps, p, r, f1, ex) in rows.items():
        print(f"{name:<10} {cps:>12,.0f} {cps / base:>11.3f}x {p:>9.3f} {r:>7.3f} {f1:>6.3f} {ex:>6.2f}")


if __name__ == "__main__":
    main()
