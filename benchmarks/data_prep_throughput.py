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

    .venv/bin/python benchmarks/data_prep_throughput.py [--workers 2] [--repeats 2] [--scale 10] [--spm-only]

Scale mode (`--scale-gb [GB]`, default 2 GB; e.g. `--scale-gb 0.05` for a quick run): a generated
corpus of GB bytes of text, written in three shapes holding the same lines -- many small files
(~512 KiB each, blank lines between documents), one big file (the same), and long documents
without blank lines (one document per `--long-doc-mb` file, as books often come) -- each run
through a fresh `python -m data_prep` with default flags (only inputs, vocab, output dir and
workers given), so it measures whatever sharding the defaults do. The text is the embedded
Wikipedia corpus repeated with variation: each document joins 1-4 random extracts, and each pass
renumbers digits, so no two passes are identical. For 1 and 2 workers, pinned to that many cores:
tokens/s against the bare tokenizer (the same WordPiece vocab's `encode_batch` over the big file's first
lines, in a process pinned to the same cores, encode time only), peak RSS of the main process and
of the largest worker (VmHWM, read from /proc while it runs), the process tree's peak PSS, and
bytes on disk per token.

    nice -n 10 .venv/bin/python benchmarks/data_prep_throughput.py --scale-gb 0.05 [--work-dir DIR]

The bare tokenizer's rate is measured on the first `--bare-gb` GB of the big file's lines (default
0.25; a rate, not a total: the whole 2 GB would add ~45 min on 2 cores and change nothing). The
full 2 GB run takes ~1 h 40 min of an idle 2-core machine (15-18 min per shape with 1 worker, 8-9
with 2); `--scale-workers` and `--scale-shapes` run it in pieces with `--work-dir DIR` keeping the
generated corpus between them:

    nice -n 10 .venv/bin/python benchmarks/data_prep_throughput.py --scale-gb 2 --work-dir /var/tmp/dp2 \
        --scale-workers 2 --scale-shapes one_big_file
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import psutil  # noqa: E402

from data_prep import manifest  # noqa: E402
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

# ---------------------------------------------------------------------------------------------
# Scale mode

SMALL_FILE_BYTES = 512 << 10
STARTUP_IMPORTS = "import data_prep.cli, data_prep.pipeline, megatron.core.datasets.indexed_dataset"
SHAPES = ("small_files", "one_big_file", "long_documents")


def generate_corpus(work: str, gb: float, long_doc_mb: float, seed: int = 0) -> dict[str, str]:
    """Write the three shapes of one generated corpus of about `gb` GB under `work` (reused when a
    previous run wrote the same); returns shape -> input path for data_prep."""
    target = int(gb * 1e9)
    root = os.path.join(work, f"scale_{gb:g}gb_{long_doc_mb:g}mb_{seed}")
    paths = {shape: os.path.join(root, shape) for shape in SHAPES}
    paths["one_big_file"] = os.path.join(root, "one_big_file.txt")
    done = os.path.join(root, "complete")
    if os.path.exists(done):
        return paths
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(paths["small_files"])
    os.makedirs(paths["long_documents"])
    with open(embedded_corpus_jsonl(os.path.join(work, "cache"))) as f:
        extracts = [[p.strip() for p in json.loads(line)["text"].split("\n") if p.strip()] for line in f]
    extracts = [e for e in extracts if e]
    rng = random.Random(seed)
    big = open(paths["one_big_file"], "w", encoding="utf-8")
    small = long = None
    small_n = long_n = written = 0
    t0 = time.perf_counter()
    passes = 0
    while written < target:
        digits = list("0123456789")
        rng.shuffle(digits)
        renumber = str.maketrans("0123456789", "".join(digits))
        order = list(range(len(extracts)))
        rng.shuffle(order)
        pos = 0
        while pos < len(order) and written < target:
            k = rng.randint(1, 4)
            lines = [p.translate(renumber) for i in order[pos:pos + k] for p in extracts[i]]
            pos += k
            doc = "\n".join(lines) + "\n"
            big.write(doc + "\n")
            if small is None or small.tell() >= SMALL_FILE_BYTES:
                if small:
                    small.close()
                small = open(os.path.join(paths["small_files"], f"part_{small_n:06d}.txt"), "w", encoding="utf-8")
                small_n += 1
            small.write(doc + "\n")
            if long is None or long.tell() >= long_doc_mb * 1e6:
                if long:
                    long.close()
                long = open(os.path.join(paths["long_documents"], f"book_{long_n:04d}.txt"), "w", encoding="utf-8")
                long_n += 1
            long.write(doc)  # no blank line: the whole file is one document
            written += len(doc.encode("utf-8")) + 1
        passes += 1
    for f in (big, small, long):
        f.close()
    open(done, "w").close()
    print(f"generated {written / 1e9:.3f} GB per shape ({passes} passes over the embedded corpus, varied) in "
          f"{time.perf_counter() - t0:.0f} s: {small_n} small files, 1 big file, {long_n} long document(s)")
    return paths


def bare_tokenizer_child(path: str, vocab: str, max_bytes: float) -> None:
    """Encode the non-blank lines of `path`'s first `max_bytes` in batches (stream: memory stays
    flat); prints {"tokens", "seconds"} with seconds = time inside encode_batch."""
    tok = WordPieceTokenizer(vocab)
    n = 0
    read = 0
    spent = 0.0
    batch, chars = [], 0

    def flush():
        nonlocal n, spent
        t = time.perf_counter()
        n += sum(len(e.ids) for e in tok._tok.encode_batch(batch, add_special_tokens=False))
        spent += time.perf_counter() - t

    with open(path, "rb") as f:
        for raw in f:
            read += len(raw)
            if read > max_bytes:
                break
            line = raw.decode("utf-8").rstrip("\n")
            if line.strip():
                batch.append(line)
                chars += len(line)
            if chars >= 8 << 20:
                flush()
                batch, chars = [], 0
    if batch:
        flush()
    print(json.dumps({"tokens": n, "seconds": spent}))


def _pinned(cores):
    return (lambda: os.sched_setaffinity(0, cores)) if cores else None


def _vm_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_monitored(cmd: list[str], cores=None, env=None) -> dict:
    """Run `cmd` pinned to `cores`; peak RSS (VmHWM) of the main process and of each child, and the
    tree's peak PSS, sampled every 0.1 s (VmHWM is a true peak; PSS is sampled)."""
    err_file = tempfile.TemporaryFile()
    t = time.perf_counter()
    p = psutil.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err_file, preexec_fn=_pinned(cores))
    hwm: dict[int, float] = {}
    peak_pss = 0.0
    tick = 0
    while p.poll() is None:
        try:
            procs = [p] + p.children(recursive=True)
            for q in procs:
                try:
                    hwm[q.pid] = max(hwm.get(q.pid, 0.0), _vm_hwm_mib(q.pid))
                except OSError:
                    pass
            if tick % 5 == 0:  # smaps is costly to read: PSS every 0.5 s
                peak_pss = max(peak_pss, sum(q.memory_full_info().pss for q in procs) / 2**20)
        except psutil.Error:
            pass
        tick += 1
        time.sleep(0.1)
    p.wait()
    secs = time.perf_counter() - t
    if p.returncode:
        err_file.seek(0)
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{err_file.read().decode(errors='replace')[-2000:]}")
    err_file.close()
    main = hwm.pop(p.pid, 0.0)
    return {"seconds": secs, "main_mib": main, "worker_mib": max(hwm.values(), default=0.0), "tree_pss_mib": peak_pss}


def bare_tokenizer_pinned(path: str, vocab: str, cores, max_gb: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--bare-child", path, "--vocab", vocab,
           "--bare-gb", str(max_gb)]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, preexec_fn=_pinned(cores),
                         env=dict(os.environ, PYTHONPATH=ROOT))
    return json.loads(out.stdout.strip().splitlines()[-1])


def scale_mode(args, work: str) -> None:
    vocab = embedded_vocab()
    paths = generate_corpus(work, args.scale_gb, args.long_doc_mb)
    cores_all = sorted(os.sched_getaffinity(0))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    print(f"scale mode: {args.scale_gb:g} GB per shape; {len(cores_all)} cores; load average "
          f"{os.getloadavg()[0]:.1f}; data_prep with default flags (no --seq-length: its default)")
    print(f"tokens/s: pipeline = manifest tokens / wall time of `python -m data_prep` (start-up included; 'warm' = "
          f"the ratio without the start-up, timed as `python -c '{STARTUP_IMPORTS}'`); bare = the same vocab's "
          "encode_batch over the same lines, encode time only; both pinned to the same cores. main/worker MiB = "
          "peak RSS (VmHWM) of the main process / the largest worker; tree PSS = peak sum over the process tree")
    print(f"{'shape':<15} {'workers':>7} {'pipeline tok/s':>14} {'bare tok/s':>11} {'ratio':>6} {'warm':>6} "
          f"{'main MiB':>8} {'worker MiB':>10} {'tree PSS MiB':>12} {'B/token':>8} {'tokens':>13}")
    bare = {}
    for workers in args.scale_workers:
        cores = set(cores_all[:workers])
        if len(cores) < workers:
            print(f"   (only {len(cores)} cores for {workers} workers)")
        bare[workers] = bare_tokenizer_pinned(paths["one_big_file"], vocab, cores, args.bare_gb)
        # What `python -m data_prep` pays before any text (its imports; run() imports torch and
        # megatron-core up front): shown apart, it dominates small runs.
        startup = run_monitored([sys.executable, "-c", STARTUP_IMPORTS], cores, env)["seconds"]
        for shape in args.scale_shapes:
            out = os.path.join(work, f"out_{shape}_w{workers}")
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "data_prep", "--input", paths[shape], "--vocab", vocab,
                   "--output-dir", out, "--workers", str(workers), "--no-progress"]
            r = run_monitored(cmd, cores, env)
            tokens = manifest.read(out).counts.tokens
            disk = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)
                       if f.startswith(("corpus.", "pairs_")))
            tps = tokens / r["seconds"]
            warm = tokens / max(r["seconds"] - startup, 1e-9)
            b = bare[workers]["tokens"] / bare[workers]["seconds"]
            print(f"{shape:<15} {workers:>7} {tps:>14,.0f} {b:>11,.0f} {tps / b:>6.2f} {warm / b:>6.2f} "
                  f"{r['main_mib']:>8.0f} "
                  f"{r['worker_mib']:>10.0f} {r['tree_pss_mib']:>12.0f} {disk / tokens:>8.3f} {tokens:>13,}",
                  flush=True)
            shutil.rmtree(out, ignore_errors=True)
    print(f"bare tokenizer: rate over the first {args.bare_gb:g} GB of the big file's lines "
          f"({bare[args.scale_workers[0]]['tokens']:,} tokens)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--seq-length", type=int, action="append", dest="seq_lengths")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--spm-only", action="store_true", help="run section 4 (sentencepiece) only")
    ap.add_argument("--scale-gb", type=float, nargs="?", const=2.0, default=None,
                    help="scale mode: a generated corpus of this many GB (default 2) in three shapes")
    ap.add_argument("--scale-workers", type=int, nargs="+", default=[1, 2], help="scale mode: worker counts")
    ap.add_argument("--long-doc-mb", type=float, default=64.0,
                    help="scale mode: size of each long document without blank lines (default %(default)s MB)")
    ap.add_argument("--scale-shapes", nargs="+", choices=SHAPES, default=list(SHAPES),
                    help="scale mode: the shapes to run (all three are generated once per --work-dir)")
    ap.add_argument("--bare-gb", type=float, default=0.25,
                    help="scale mode: GB of lines the bare tokenizer's rate is measured on (default %(default)s)")
    ap.add_argument("--bare-child", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_child:
        return bare_tokenizer_child(args.bare_child, args.vocab, args.bare_gb * 1e9)
    seq_lengths = args.seq_lengths or [128, 512]
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_data_prep_")
    if args.scale_gb is not None:
        scale_mode(args, work)
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
        return
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
