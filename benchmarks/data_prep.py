"""data_prep throughput, disk cost and memory, side by side in one run on the same text and cores.

1. tokens/s: the bare tokenizer (HF `tokenizers` WordPiece, `encode_batch` over whole documents,
   its default thread pool) against the full pipeline (read, split, tokenize, shard, merge, pair
   indexes for every --seq-length, manifest with checksums) with 1 and N workers, all in this
   process after imports, best of --repeats. Goal: pipeline >= 0.7x the bare tokenizer.
2. bytes on disk per token: corpus.bin + corpus.idx + pair indexes (vocab copy and manifest listed
   apart). Goal: <= 2.1.
3. peak RSS of a fresh `python -m data_prep` process tree (sampled) on the corpus and on the corpus
   repeated 10x. Goal: flat, < 1 GiB.
4. sentencepiece: the pipeline's encoding path (`shards.tokenize_documents`, shard by shard)
   against plain `sp.encode` of the same sentences in one call, same threads, after splitting
   (blingfire, shared with WordPiece, timed apart); a unigram model trained on the corpus. Goal:
   >= 0.7x plain, with the same ids.

    .venv/bin/python benchmarks/data_prep.py [--workers 2] [--repeats 2] [--scale 10] [--spm-only]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import psutil  # noqa: E402

from data_prep.embedded import embedded_corpus_jsonl, embedded_vocab  # noqa: E402
from data_prep.pipeline import PrepConfig, run  # noqa: E402
from data_prep.shards import document_sentences, tokenize_documents  # noqa: E402
from data_prep.splitter import get_splitter  # noqa: E402
from data_prep.tokenizer import SentencePieceTokenizer, WordPieceTokenizer, train_sentencepiece  # noqa: E402


def bare_tokenizer(texts, vocab):
    tok = WordPieceTokenizer(vocab)
    t = time.perf_counter()
    encs = tok._tok.encode_batch(texts, add_special_tokens=False)
    n = sum(len(e.ids) for e in encs)
    return n / (time.perf_counter() - t), n


def pipeline(corpus, vocab, out, workers, seq_lengths):
    shutil.rmtree(out, ignore_errors=True)
    cfg = PrepConfig(inputs=[corpus], output_dir=out, vocab=vocab, seq_lengths=list(seq_lengths),
                     workers=workers, progress=False)
    t = time.perf_counter()
    m = run(cfg)
    return m["counts"]["tokens"] / (time.perf_counter() - t), m


def peak_rss_subprocess(corpus, vocab, out, workers, seq_lengths):
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "data_prep", "--input", corpus, "--vocab", vocab, "--output-dir", out,
           "--workers", str(workers), "--no-progress"]
    for L in seq_lengths:
        cmd += ["--seq-length", str(L)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t = time.perf_counter()
    # Unread pipes would block the child once ~64 KB of output piled up (and stall the timing):
    # the report goes nowhere, stderr to a file read only on failure.
    err_file = tempfile.TemporaryFile()
    p = psutil.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err_file)
    peak_tree = peak_main = 0
    while p.poll() is None:
        try:
            peak_main = max(peak_main, p.memory_info().rss)
            kids = p.children(recursive=True)
            if kids:
                # PSS: forked workers share the parent's pages (torch alone is ~300 MiB); summing
                # RSS would count those once per process.
                peak_tree = max(peak_tree, sum(q.memory_full_info().pss for q in [p] + kids))
        except psutil.Error:
            pass
        time.sleep(0.05)
    p.wait()
    if p.returncode:
        err_file.seek(0)
        raise SystemExit(f"data_prep failed:\n{err_file.read().decode(errors='replace')[-2000:]}")
    err_file.close()
    return peak_main, peak_tree, time.perf_counter() - t


def _whole(line):
    return [(0, len(line))]


def _best(fn, repeats):
    """Best wall seconds, best CPU seconds of this process (all its threads), last result."""
    wall = cpu = float("inf")
    out = None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return wall, cpu, out


def spm_side_by_side(texts, work, repeats, vocab_size=8000, docs_per_shard=1000):
    """Section 4: tokens/s of our sentencepiece path and of plain `sp.encode`, same sentences."""
    import sentencepiece as spm

    split = get_splitter("blingfire")
    docs = [[ln.strip() for ln in t.split("\n") if ln.strip()] for t in texts]
    t_split, _, sent_docs = _best(lambda: [[ln[a:b] for ln in d for a, b in split(ln)] for d in docs], repeats)
    sentences = [s for d in sent_docs for s in d]
    model = os.path.join(work, f"spm{vocab_size}.model")
    if not os.path.exists(model):
        with open(os.path.join(work, "spm_sentences.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(sentences) + "\n")
        train_sentencepiece(os.path.join(work, "spm_sentences.txt"), model[:-len(".model")], vocab_size)
    sp = spm.SentencePieceProcessor(model_file=model)
    tok = SentencePieceTokenizer(model)
    # The pipeline's unit of work: a shard of documents, here already split (the `lines`
    # splitter hands each sentence over whole), so both sides encode exactly `sentences`.
    shards = [sent_docs[i:i + docs_per_shard] for i in range(0, len(sent_docs), docs_per_shard)]
    lines = get_splitter("lines")

    def ours():
        return [d for sh in shards for d in tokenize_documents(tok, lines, sh, 10**9, Counter())]

    def before():  # issue 12's starting point: proto pieces and unused character offsets
        out = []
        for sh in shards:
            flat = [s for d in sh for s in d]
            enc, pos = tok.encode_lines(flat), 0
            for d in sh:
                out.append(document_sentences(d, enc[pos:pos + len(d)], _whole, 10**9, Counter()))
                pos += len(d)
        return out

    print(f"\n4. sentencepiece (unigram {vocab_size:,}, trained on the corpus): {len(sentences):,} sentences; "
          f"tokens per second of wall time and of CPU time (this process, all threads), best of {repeats}")
    for threads, label in ((-1, "all cores (one process)"), (1, "1 thread (as in each worker)")):
        tok.num_threads = threads
        w_plain, c_plain, plain = _best(lambda: sp.encode(sentences, num_threads=threads), repeats)
        w_ours, c_ours, got = _best(ours, repeats)
        n = sum(map(len, plain))
        assert [s.tolist() for d in got for s in d] == [x for x in plain if x], "ids differ from plain sp.encode"
        print(f"   threads: {label}{'' if threads == -1 else '; CPU time is the steady figure on a busy machine'}")
        print(f"     {'':<36} {'wall':>12}  {'':>5}   {'CPU':>12}")
        rows = [("plain sp.encode(sentences)", w_plain, c_plain), ("ours: tokenize_documents", w_ours, c_ours)]
        if threads == -1:
            w_before, c_before, old = _best(before, 1)
            assert [s.tolist() for d in old for s in d] == [s.tolist() for d in got for s in d]
            rows.append(("before: per-sentence proto+offsets", w_before, c_before))
        for name, w, c in rows:
            print(f"     {name:<36} {n / w:>12,.0f}  {w_plain / w:>4.2f}x   {n / c:>12,.0f}  {c_plain / c:>4.2f}x")
        print("     (goal: ours >= 0.70x plain, same ids: checked)")
    print(f"   splitting those sentences out of the lines (blingfire, not in the figures above): "
          f"{n / t_split:,.0f} tokens/s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--seq-length", type=int, action="append", dest="seq_lengths")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--spm-only", action="store_true", help="run section 4 (sentencepiece) only")
    args = ap.parse_args()
    seq_lengths = args.seq_lengths or [128, 512]
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_data_prep_")
    corpus = embedded_corpus_jsonl(os.path.join(work, "cache"))
    vocab = embedded_vocab()
    with open(corpus) as f:
        texts = [json.loads(l)["text"] for l in f]
    if args.spm_only:
        spm_side_by_side(texts, work, max(args.repeats, 3))
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
        return
    big = os.path.join(work, f"corpus_x{args.scale}.jsonl")
    with open(big, "w") as out, open(corpus) as f:
        data = f.read()
        for _ in range(args.scale):
            out.write(data)

    import megatron.core.datasets.indexed_dataset  # noqa: F401  (imports are not throughput)

    print(f"text: embedded corpus, {len(texts):,} documents, {sum(map(len, texts)):,} chars; "
          f"{os.cpu_count()} cores; seq lengths {seq_lengths}")
    best = {"bare": 0.0, "w1": 0.0, f"w{args.workers}": 0.0}
    m = None
    for _ in range(args.repeats):
        tps, n_tok = bare_tokenizer(texts, vocab)
        best["bare"] = max(best["bare"], tps)
        for w in sorted({1, args.workers}):
            tps, m = pipeline(corpus, vocab, os.path.join(work, "out"), w, seq_lengths)
            best[f"w{w}"] = max(best[f"w{w}"], tps)
    assert m["counts"]["tokens"] == n_tok, "pipeline and bare tokenizer disagree on the token count"
    print("\n1. throughput (tokens/s, best of %d)" % args.repeats)
    print(f"   bare tokenizer            {best['bare']:>12,.0f}   1.00x")
    for w in sorted({1, args.workers}):
        print(f"   pipeline, {w} worker(s)     {best[f'w{w}']:>12,.0f}   {best[f'w{w}'] / best['bare']:.2f}x   (goal >= 0.7x)")

    out = os.path.join(work, "out")
    sizes = {f: os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)}
    tokens = m["counts"]["tokens"]
    sentences = m["counts"]["sentences"]
    core = {k: v for k, v in sizes.items() if k.startswith(("corpus.", "pairs_"))}
    print(f"\n2. bytes on disk per token ({tokens:,} tokens, {sentences:,} sentences, "
          f"{tokens / sentences:.1f} tokens/sentence)")
    for k in sorted(core):
        print(f"   {k:<22} {core[k]:>12,} B  {core[k] / tokens:.3f} B/token")
    total = sum(core.values())
    print(f"   {'total (data+indexes)':<22} {total:>12,} B  {total / tokens:.3f} B/token   (goal <= 2.1)")
    print(f"   of which the .idx costs 12 B/sentence = {12 * sentences / tokens:.3f} B/token; "
          f"vocab copy + manifest add {sizes['vocab.txt'] + sizes['manifest.json']:,} B once")

    print(f"\n3. peak RSS, fresh process (1 worker), corpus x1 vs x{args.scale}")
    r1 = peak_rss_subprocess(corpus, vocab, os.path.join(work, "rss1"), 1, seq_lengths)
    r10 = peak_rss_subprocess(big, vocab, os.path.join(work, "rss10"), 1, seq_lengths)
    for name, (main_rss, tree, secs) in (("x1", r1), (f"x{args.scale}", r10)):
        print(f"   {name:<4} main {main_rss / 2**20:>7.0f} MiB   {secs:>6.1f} s wall (incl. start-up)")
    print(f"   ratio x{args.scale}/x1: {r10[0] / r1[0]:.2f}   (goal: flat, < 1024 MiB)")
    if args.workers > 1:
        rw = peak_rss_subprocess(big, vocab, os.path.join(work, "rssw"), args.workers, seq_lengths)
        print(f"   x{args.scale} with {args.workers} workers: main {rw[0] / 2**20:.0f} MiB RSS, "
              f"whole process tree {rw[1] / 2**20:.0f} MiB PSS")
    spm_side_by_side(texts, work, max(args.repeats, 3))
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
