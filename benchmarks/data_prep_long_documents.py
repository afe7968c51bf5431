"""Peak memory of data_prep on a .txt without blank lines (one document however large the file),
side by side in one run: this tree against an older revision of data_prep (`--baseline-rev`), on
the same file, workers and cores.

The file is the embedded corpus's paragraphs, one per line, repeated to --mb megabytes. Reported
per tree: the largest RSS any worker process reached, the main process's, and the tree's PSS
(forked workers share torch's pages; PSS counts them once), sampled every 50 ms.

    .venv/bin/python benchmarks/data_prep_long_documents.py --mb 16 --workers 2 --baseline-rev 39790cc
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import psutil  # noqa: E402

from data_prep.embedded import embedded_corpus_jsonl, embedded_vocab  # noqa: E402


def write_corpus(path: str, mb: float, cache: str) -> int:
    with open(embedded_corpus_jsonl(cache), encoding="utf-8") as f:
        paras = [p.strip() for line in f for p in json.loads(line)["text"].split("\n") if p.strip()]
    target, size = int(mb * (1 << 20)), 0
    with open(path, "w", encoding="utf-8") as out:
        while size < target:
            for p in paras:
                out.write(p + "\n")
                size += len(p.encode()) + 1
                if size >= target:
                    break
    return size


def peak_rss(tree: str, corpus: str, out: str, workers: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "data_prep", "--input", corpus, "--vocab", embedded_vocab(), "--output-dir", out,
           "--workers", str(workers), "--no-progress", "--seq-length", "128", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=tree)
    err = tempfile.TemporaryFile()
    t = time.perf_counter()
    p = psutil.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=err)
    main = worker = tree_pss = 0
    while p.poll() is None:
        try:
            main = max(main, p.memory_info().rss)
            kids = p.children(recursive=True)
            for q in kids:
                worker = max(worker, q.memory_info().rss)
            tree_pss = max(tree_pss, sum(q.memory_full_info().pss for q in [p] + kids))
        except psutil.Error:
            pass
        time.sleep(0.05)
    if p.wait():
        err.seek(0)
        raise SystemExit(f"{tree}: data_prep failed:\n{err.read().decode(errors='replace')[-2000:]}")
    m = json.load(open(os.path.join(out, "manifest.json")))
    return {"seconds": time.perf_counter() - t, "main_rss_mib": main / 2**20, "max_worker_rss_mib": worker / 2**20,
            "tree_pss_mib": tree_pss / 2**20, "documents": m["counts"]["documents"], "tokens": m["counts"]["tokens"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--baseline-rev", help="git revision of the tree to compare with (its data_prep/ only)")
    ap.add_argument("--extra", default="", help="extra data_prep arguments for this tree, e.g. '--shard-bytes 1048576'")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "no_blank_lines.txt")
        size = write_corpus(corpus, args.mb, os.path.join(tmp, "cache"))
        print(f"input: {size / 2**20:.1f} MiB, no blank line; {args.workers} workers")
        trees = []
        if args.baseline_rev:
            old = os.path.join(tmp, "baseline")
            os.makedirs(old)
            arch = subprocess.run(["git", "archive", args.baseline_rev, "data_prep"], cwd=ROOT, check=True,
                                  capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", old], input=arch, check=True)
            os.symlink(os.path.join(ROOT, ".venv"), os.path.join(old, ".venv"))
            trees.append((f"baseline {args.baseline_rev}", old, []))
        trees.append(("this tree", ROOT, args.extra.split()))
        for name, tree, extra in trees:
            r = peak_rss(tree, corpus, os.path.join(tmp, f"out{len(name)}"), args.workers, extra)
            print(f"{name:>20}: " + "  ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v:,}"
                                            for k, v in r.items()))


if __name__ == "__main__":
    main()
