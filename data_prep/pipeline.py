"""The data-prep pipeline: read -> shard (parallel workers, MPI ranks) -> merge -> split -> pairs
-> manifest. `run(PrepConfig)` is what the CLI, the embedded demo and the test helpers call.

Determinism: an input file of more than --part-bytes (not gzip) is cut into parts at document
boundaries found near multiples of --part-bytes (readers.document_boundary), shard (p, k) is the
k-th run of documents of part p (closed at --docs-per-shard documents or --shard-bytes of text),
every random choice is seeded per document, and the merge goes in (file, part, k) order: the
corpus is the documents of the files in order, so output bytes do not depend on worker or rank
counts, nor on the part and shard sizes. Parts go to MPI ranks round-robin; a rank reads only its
own parts and its workers tokenize their shards. Resume is per input file: each file's shards live
in a directory named after its path, size, mtime, inode and ctime, so changing one file redoes only its shards;
finished parts are kept whatever --docs-per-shard/--shard-bytes, an unfinished part keeps only the
shards cut with the run's sizes.
Atomicity: every file is written under a temporary name and renamed; manifest.json is
removed at the start and written last, so a directory without it is never mistaken for complete.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import time
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from importlib import metadata

import numpy as np
from tqdm import tqdm

from . import manifest, readers
from .atomic import atomic_json, commit, os_error, remove_stale_tmp, tmp_name
from .corpus import merge_shards
from .errors import DataPrepError
from .manifest import FORMAT_VERSION, Counts, Manifest, TokenizerInfo
from .nsp import pair_tasks, pairs_for_documents
from .pairs import PairIndexWriter
from .shards import corpus_dtype, init_worker, part_done, part_marker, process_shard, shard_done, shard_prefix
from .splitter import SPLITTERS
from .tokenizer import (WORDPIECE_LIMIT_ALPHABET, WORDPIECE_MIN_FREQUENCY, load_tokenizer, sha256_file,
                        train_sentencepiece, train_wordpiece)

log = logging.getLogger("data_prep")

WORK_DIR = ".work"
# Arguments that change how the run is executed but never what it writes: kept out of the
# manifest so that 1 worker and 8 workers give byte-identical directories.
RUNTIME_ONLY = ("output_dir", "workers", "keep_work", "progress", "shard_bytes", "part_bytes")
# Smallest --train-wordpiece-vocab-size accepted before reading anything: 5 special tokens plus an
# English corpus's letters, digits, punctuation and their ## continuations already take ~110.
MIN_WORDPIECE_VOCAB = 128


@dataclass
class PrepConfig:
    inputs: list
    output_dir: str
    vocab: str | None = None
    seq_lengths: list = field(default_factory=lambda: [128])
    seed: int = 1234
    valid_fraction: float = 0.01
    dupe_factor: int = 1
    short_seq_prob: float = 0.1
    lower_case: bool | None = None
    splitter: str = "blingfire"
    input_format: str = "auto"
    json_key: str = "text"
    max_sentence_tokens: int = 512
    docs_per_shard: int = 1000
    # A shard is also closed at this much text: a worker's memory is ~25x its shard's text while
    # it tokenizes (plus ~0.4 GB of imports), so 8 MiB keeps a worker well under 1 GiB.
    shard_bytes: int = 8 << 20
    # Longer documents (a .txt without blank lines, a whole book) become pseudo-documents cut
    # between lines; 0 = never cut (then one document is held whole, whatever its size).
    max_document_bytes: int = 1 << 20
    # Files larger than this (not .gz) are read in parts, spread over MPI ranks.
    part_bytes: int = 256 << 20
    train_spm_vocab_size: int = 0
    spm_model_type: str = "unigram"
    train_wordpiece_vocab_size: int = 0
    tokenizer_train_sentences: int = 1_000_000
    workers: int = 1
    keep_work: bool = False
    progress: bool = True

    def validate(self) -> None:
        if not self.inputs:
            raise DataPrepError("--input: give at least one file or directory")
        if not self.seq_lengths:
            raise DataPrepError("--seq-length: give at least one sequence length")
        for L in self.seq_lengths:
            if not 8 <= L <= 65535:
                raise DataPrepError(f"--seq-length {L}: must be between 8 and 65535")
        if len(set(self.seq_lengths)) != len(self.seq_lengths):
            raise DataPrepError(f"--seq-length {self.seq_lengths}: each length may be given once")
        if not 0.0 <= self.valid_fraction < 0.5:
            raise DataPrepError(f"--valid-fraction {self.valid_fraction}: must be in [0, 0.5)")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise DataPrepError(f"--short-seq-prob {self.short_seq_prob}: must be in [0, 1]")
        if not 1 <= self.dupe_factor < 2**16:
            # The dupe round is a 16-bit field of each document's RNG seed (nsp.document_rng).
            raise DataPrepError(f"--dupe-factor {self.dupe_factor}: must be between 1 and 65535")
        if not 0 <= self.seed < 2**32:
            # numpy's and sentencepiece's seeds are unsigned; 32 bits is what sentencepiece keeps.
            raise DataPrepError(f"--seed {self.seed}: must be between 0 and {2**32 - 1}")
        if self.workers < 1:
            raise DataPrepError(f"--workers {self.workers}: must be >= 1")
        if self.docs_per_shard < 1:
            raise DataPrepError(f"--docs-per-shard {self.docs_per_shard}: must be >= 1")
        if self.shard_bytes < 1024:
            raise DataPrepError(f"--shard-bytes {self.shard_bytes}: must be >= 1024")
        if self.part_bytes < 1024:
            raise DataPrepError(f"--part-bytes {self.part_bytes}: must be >= 1024")
        if self.max_document_bytes < 0:
            raise DataPrepError(f"--max-document-bytes {self.max_document_bytes}: must be >= 0 (0: never split)")
        if self.max_sentence_tokens < 1:
            raise DataPrepError(f"--max-sentence-tokens {self.max_sentence_tokens}: must be >= 1")
        if self.splitter not in SPLITTERS:
            raise DataPrepError(f"--splitter {self.splitter}: choose one of {sorted(SPLITTERS)}")
        if self.input_format not in ("auto", "text", "jsonl"):
            raise DataPrepError(f"--input-format {self.input_format}: choose auto, text or jsonl")
        given = [flag for flag, v in (("--vocab", self.vocab), ("--train-spm-vocab-size", self.train_spm_vocab_size),
                                      ("--train-wordpiece-vocab-size", self.train_wordpiece_vocab_size)) if v]
        if len(given) > 1:
            raise DataPrepError(f"{', '.join(given[:-1])} and {given[-1]} exclude each other: give one")
        if not given:
            raise DataPrepError("--vocab: give a WordPiece vocab.txt or a sentencepiece .model (or train one with "
                                "--train-wordpiece-vocab-size N or --train-spm-vocab-size N, or use --embedded)")
        if self.train_spm_vocab_size and self.train_spm_vocab_size < 16:
            raise DataPrepError(f"--train-spm-vocab-size {self.train_spm_vocab_size}: must be >= 16")
        if self.train_wordpiece_vocab_size and self.train_wordpiece_vocab_size < MIN_WORDPIECE_VOCAB:
            raise DataPrepError(
                f"--train-wordpiece-vocab-size {self.train_wordpiece_vocab_size}: must be >= {MIN_WORDPIECE_VOCAB} "
                "(5 special tokens, the corpus's characters and their ## forms need room); 8192 suits a small "
                "corpus, BERT's is 30522")
        if self.trains_tokenizer and self.tokenizer_train_sentences < 1:
            raise DataPrepError(f"--tokenizer-train-sentences {self.tokenizer_train_sentences}: must be >= 1")
        if self.lower_case is None:
            # Resolved here, not later, so the manifest and any comparison with it see one value:
            # WordPiece vocabs (given or trained) are usually uncased (bert-base-uncased),
            # sentencepiece models cased.
            self.lower_case = not (self.train_spm_vocab_size or str(self.vocab).endswith(".model"))

    @property
    def trains_tokenizer(self) -> bool:
        return bool(self.train_spm_vocab_size or self.train_wordpiece_vocab_size)

    def manifest_args(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in RUNTIME_ONLY}


class _SingleComm:
    rank, size = 0, 1

    def barrier(self):
        pass

    def bcast(self, obj, root=0):
        return obj


def _file_stat(path: str) -> list:
    st = os.stat(path)
    # ctime and inode too: an edit of the same size whose mtime was restored (cp -p, rsync -t,
    # touch -r) still changes ctime, and a file replaced by a rename has another inode.
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def file_work_dir(work: str, path: str) -> str:
    """Where one input file's shards live: a new path, size, mtime, inode or ctime is a new directory."""
    key = hashlib.sha256(json.dumps(_file_stat(path)).encode()).hexdigest()[:20]
    return os.path.join(work, f"file_{key}")


def _fingerprint(cfg: PrepConfig, files: list[str]) -> dict:
    """What every shard depends on besides its own input file (those are keyed per file)."""
    if cfg.train_wordpiece_vocab_size:
        # No seed: WordPiece training has no randomness. The recipe's constants are included so
        # that changing them invalidates a vocab trained (and shards tokenized) with the old ones.
        tokenizer = (f"train-wordpiece:{cfg.train_wordpiece_vocab_size}:{cfg.tokenizer_train_sentences}:"
                     f"lower={cfg.lower_case}:min_freq={WORDPIECE_MIN_FREQUENCY}:alphabet={WORDPIECE_LIMIT_ALPHABET}")
    elif cfg.train_spm_vocab_size:
        tokenizer = (f"train-spm:{cfg.train_spm_vocab_size}:{cfg.spm_model_type}:{cfg.tokenizer_train_sentences}:"
                     f"{cfg.seed}")
    else:
        tokenizer = sha256_file(cfg.vocab)
    fp = {
        "layout": 2,  # per-file directories; layout 1 (one fingerprint over all files) is discarded
        "tokenizer": tokenizer,
        # Not docs_per_shard / shard_bytes: they change where shards are cut, never the output bytes.
        # A finished part keeps its shards whatever the sizes (its marker counts them); an unfinished
        # part keeps only the shards cut with the run's sizes (the "plan" in each shard's marker).
        # part_bytes moves the parts' boundaries, hence every shard's (p, k): it stays here.
        **{k: getattr(cfg, k) for k in ("lower_case", "splitter", "input_format", "json_key", "max_sentence_tokens",
                                        "max_document_bytes", "part_bytes")},
        "format_version": FORMAT_VERSION,
        # The code that makes shards: a new tokenizers / splitter / numpy ... version, or new reader
        # rules, may give other tokens for the same text.
        "reader_version": readers.READER_VERSION,
        "versions": library_versions(),
    }
    if cfg.trains_tokenizer:
        # A vocab trained on the inputs depends on all of them: any change redoes every shard.
        fp["files"] = [_file_stat(p) for p in files]
    return fp


def _prepare_work_dir(cfg: PrepConfig, files: list[str], work: str) -> bool:
    """Keep finished shards made with the same arguments, of the input files that did not change
    (path, size, mtime, inode, ctime); drop the directories of files changed or no longer given."""
    fp = _fingerprint(cfg, files)
    fp_path = os.path.join(work, "fingerprint.json")
    try:
        with open(fp_path) as f:
            kept = json.load(f) == json.loads(json.dumps(fp))
    except (OSError, json.JSONDecodeError):
        kept = False
    if not kept:
        shutil.rmtree(work, ignore_errors=True)
    try:
        os.makedirs(work, exist_ok=True)
        wanted = {os.path.basename(file_work_dir(work, p)) for p in files}
        stale = [d for d in os.listdir(work) if d.startswith("file_") and d not in wanted]
        for d in stale:
            shutil.rmtree(os.path.join(work, d))
        for d in sorted(wanted):
            os.makedirs(os.path.join(work, d), exist_ok=True)
            remove_stale_tmp(os.path.join(work, d))
    except OSError as e:
        raise os_error(work, "create the work directory", e) from e
    if stale:
        log.info("dropped the finished shards of %d changed or removed input file(s)", len(stale))
    if not kept:
        atomic_json(fp_path, fp)
    return kept


def _training_sentences(cfg: PrepConfig, files: list[str]):
    """The tokenizer-training sample: the sentences of the first documents of the inputs, in
    order, until a document brings the count to --tokenizer-train-sentences."""
    split = SPLITTERS[cfg.splitter]
    n = 0
    for _, lines in readers.iter_documents(files, readers.ReadStats(), cfg.input_format, cfg.json_key,
                                           cfg.max_document_bytes):
        for ln in lines:
            for a, b in split(ln):
                s = ln[a:b].strip()
                if s:
                    yield s
                    n += 1
        if n >= cfg.tokenizer_train_sentences:
            return


def _write_lines(path: str, lines) -> int:
    """One string a line (the tokenizer trainers' input); returns how many were written."""
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")
            n += 1
    return n


def _train_spm(cfg: PrepConfig, files: list[str], work: str) -> str:
    model = os.path.join(work, "spm.model")
    if os.path.exists(model):
        return model
    sent_file = os.path.join(work, "spm_sentences.txt")
    n = _write_lines(sent_file, (s.lower() if cfg.lower_case else s for s in _training_sentences(cfg, files)))
    log.info("training sentencepiece (%s, vocab %d) on %d sentences", cfg.spm_model_type, cfg.train_spm_vocab_size, n)
    tmp_prefix = tmp_name(model)  # sentencepiece appends .model/.vocab
    # sentencepiece samples --tokenizer-train-sentences of them (seeded) when the last document overshoots.
    train_sentencepiece(sent_file, tmp_prefix, cfg.train_spm_vocab_size, cfg.spm_model_type,
                        input_sentence_size=cfg.tokenizer_train_sentences, seed=cfg.seed)
    commit(tmp_prefix + ".model", model)
    for p in (tmp_prefix + ".vocab", sent_file):
        if os.path.exists(p):
            os.remove(p)
    return model


def _train_wordpiece(cfg: PrepConfig, files: list[str], work: str) -> str:
    """Train `work/vocab.txt` (kept for a resumed run; copied into the output dir like a --vocab)."""
    vocab = os.path.join(work, "vocab.txt")
    if os.path.exists(vocab):
        return vocab
    sent_file = os.path.join(work, "wordpiece_sentences.txt")
    # Exactly the first N sentences (no sampling here, unlike sentencepiece); the trainer
    # lower-cases through BERT's normaliser, the one that encodes.
    n = _write_lines(sent_file, itertools.islice(_training_sentences(cfg, files), cfg.tokenizer_train_sentences))
    log.info("training a WordPiece vocab (%d entries, %s) on %d sentences", cfg.train_wordpiece_vocab_size,
             "uncased" if cfg.lower_case else "cased", n)
    # In a child process: the trainer's thread pool would otherwise make every later fork of this
    # process (the tokenizing workers) print tokenizers' fork warning, and its word counts are
    # memory this process keeps no use for.
    with _executor(1) as pool:
        try:
            pool.submit(train_wordpiece, sent_file, vocab, cfg.train_wordpiece_vocab_size, cfg.lower_case).result()
        except BrokenProcessPool as e:
            raise DataPrepError(worker_death_message(worker_exit_codes(pool), "train_tokenizer", cfg)) from e
    os.remove(sent_file)
    return vocab


def _executor(workers: int, initializer=None, initargs=()):
    """Worker processes. fork: they inherit the imported modules (torch, megatron) and the pair
    tables instead of re-importing or pickling them. A worker that dies (OOM killer, a crash)
    surfaces as BrokenProcessPool (turned into a one-line error naming how it died by
    worker_death_message) instead of the silent hang of multiprocessing.Pool."""
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=initializer,
                               initargs=initargs)


def worker_exit_codes(pool) -> dict:
    """{pid: exit code (None: still running)} of a pool's workers, read when it broke and before
    shutdown(), which drops them (CPython's ProcessPoolExecutor._processes, None once shut down)."""
    procs = list((getattr(pool, "_processes", None) or {}).items())
    # The pool sees a worker die when its pipe closes, a moment before the kernel lets it be
    # reaped; the others are being terminated. Poll (each read reaps if it can) for up to 2 s.
    deadline = time.monotonic() + 2.0
    while any(p.exitcode is None for _, p in procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    return {pid: p.exitcode for pid, p in procs}


_PHASES = {"tokenize": "tokenizing", "pairs": "building pairs", "train_tokenizer": "training the tokenizer"}


def worker_death_message(codes: dict, phase: str, cfg: PrepConfig) -> str:
    """One line for a broken pool, from how its worker died. The pool terminates (SIGTERM) the
    other workers once one dies: those are not the cause. SIGKILL is what the OOM killer sends."""
    what = _PHASES[phase]
    seen = [c for c in codes.values() if c is not None]
    causes = [c for c in seen if c != -signal.SIGTERM] or seen
    if -signal.SIGKILL in causes:
        advice = {"tokenize": f"lower --workers ({cfg.workers}) or --shard-bytes ({cfg.shard_bytes}) and re-run: "
                              "finished shards are kept",
                  "pairs": f"lower --workers ({cfg.workers}) and re-run: finished shards are kept",
                  "train_tokenizer": f"lower --tokenizer-train-sentences ({cfg.tokenizer_train_sentences}) and "
                                     "re-run"}[phase]
        return (f"a worker process {what} was killed (SIGKILL, most often by the out-of-memory killer: see dmesg); "
                f"{advice}")
    if -signal.SIGSEGV in causes:
        return (f"a worker process {what} crashed (SIGSEGV: a fault in a native library such as the tokenizer or "
                "the splitter, not a memory limit); re-run to resume, and report it with the log if it recurs")
    if not causes:
        return f"a worker process {what} died (exit status unknown); see the log above and re-run to resume"
    c = causes[0]
    if c < 0:
        try:
            name = signal.Signals(-c).name
        except ValueError:
            name = f"signal {-c}"
        return f"a worker process {what} was killed by {name}; re-run to resume"
    why = " (0: an error in its initializer, logged above)" if c == 0 else "; see the log above"
    return f"a worker process {what} exited with code {c}{why}; re-run to resume"


def _chunks(doc_iter, size: int, max_bytes: int):
    """Runs of `size` documents, closed early once they hold `max_bytes` of text."""
    buf, nbytes = [], 0
    for lines in doc_iter:
        buf.append(lines)
        nbytes += readers.document_bytes(lines)
        if len(buf) == size or nbytes >= max_bytes:
            yield buf
            buf, nbytes = [], 0
    if buf:
        yield buf


def _n_parts(cfg: PrepConfig, path: str) -> int:
    if not readers.splittable(path):
        return 1  # a gzip stream cannot be entered in the middle
    return max(1, -(-os.path.getsize(path) // cfg.part_bytes))


def _part_range(cfg: PrepConfig, path: str, p: int, n: int) -> tuple[int, int | None] | None:
    """Bytes [start, end) of part p: from the first document boundary in window p (file offset 0
    for p = 0) to the first boundary of a later window (None: the end of the file). None when
    window p has no boundary: its bytes belong to a document of an earlier part."""
    if n == 1:
        return 0, None
    w = cfg.part_bytes
    start = 0 if p == 0 else readers.document_boundary(path, cfg.input_format, p * w, (p + 1) * w)
    if start is None:
        return None
    for q in range(p + 1, n):
        end = readers.document_boundary(path, cfg.input_format, q * w, (q + 1) * w)
        if end is not None:
            return start, end
    return start, None


def _my_parts(cfg: PrepConfig, files: list[str], comm):
    """(file index, part, parts of that file) of this rank: all parts of all files, round-robin."""
    j = 0
    for i, path in enumerate(files):
        n = _n_parts(cfg, path)
        for p in range(n):
            if j % comm.size == comm.rank:
                yield i, p, n
            j += 1


def _part_finished(fdir: str, p: int) -> dict | None:
    done = part_done(fdir, p)
    if done is None or not all(shard_done(shard_prefix(fdir, p, k)) for k in range(done["shards"])):
        return None  # not finished, or a shard was lost or damaged since: redo the missing ones
    return done


def shard_plan(cfg: PrepConfig) -> dict:
    """How a part's documents are cut into shards; recorded in every shard marker."""
    return {"docs_per_shard": cfg.docs_per_shard, "shard_bytes": cfg.shard_bytes}


def _drop_other_plans(fdir: str, p: int, plan: dict) -> int:
    """Remove the shards of unfinished part p cut with other shard sizes (or of a marker without
    sizes): their (p, k) would not be this run's. Returns how many were removed."""
    head = os.path.basename(shard_prefix(fdir, p, 0))[:-len("000000")]
    dropped = 0
    for name in sorted(os.listdir(fdir)):
        if not (name.startswith(head) and name.endswith(".json")):
            continue
        prefix = os.path.join(fdir, name[:-len(".json")])
        info = shard_done(prefix)
        if info is not None and info.get("plan") == plan:
            continue
        for ext in ("json", "bin", "idx"):  # the marker first: never a marker without its data
            try:
                os.remove(f"{prefix}.{ext}")
            except FileNotFoundError:
                pass
        dropped += 1
    return dropped


def _build_shards(cfg: PrepConfig, files: list[str], work: str, tok_file: str, comm, bar) -> int:
    """Tokenize this rank's parts (each rank reads only its own; its workers tokenize the shards).
    A part is finished by its marker, written after all its shards; returns the shards skipped
    because a previous run finished them."""
    plan = shard_plan(cfg)
    wcfg = {"tokenizer_file": tok_file, "lower_case": cfg.lower_case, "splitter": cfg.splitter,
            "max_sentence_tokens": cfg.max_sentence_tokens, "in_worker": cfg.workers > 1, "plan": plan}
    pool = None
    if cfg.workers > 1:
        pool = _executor(cfg.workers, init_worker, (wcfg,))
    else:
        init_worker(wcfg)
    # Futures and part markers in submission order: a part's marker is written only once every
    # shard before it in the queue has finished.
    pending: deque = deque()

    def settle(entry):
        if isinstance(entry, dict):
            atomic_json(entry.pop("marker"), entry)
        else:
            entry.result()

    resumed = 0
    fdirs: dict[int, str] = {}  # one stat and hash per file, not per part
    try:
        for i, p, n_parts in _my_parts(cfg, files, comm):
            if i not in fdirs:
                fdirs[i] = file_work_dir(work, files[i])
            fdir = fdirs[i]
            done = _part_finished(fdir, p)
            if done is not None:
                resumed += done["shards"]
                continue
            try:
                dropped = _drop_other_plans(fdir, p, plan)
            except OSError as e:
                raise os_error(fdir, "remove shards cut with other shard sizes", e) from e
            if dropped:
                log.info("%s part %d: redoing %d shard(s) cut with other --docs-per-shard/--shard-bytes",
                         files[i], p, dropped)
            stats = readers.ReadStats()
            n = n_docs = 0
            rng = _part_range(cfg, files[i], p, n_parts)
            docs_iter = () if rng is None else readers.iter_file_documents(
                files[i], stats, cfg.input_format, cfg.json_key, cfg.max_document_bytes, *rng)
            for k, docs in enumerate(_chunks(docs_iter, cfg.docs_per_shard, cfg.shard_bytes)):
                n, n_docs = k + 1, n_docs + len(docs)
                if bar is not None:
                    bar.update(len(docs))
                prefix = shard_prefix(fdir, p, k)
                info = shard_done(prefix)
                if info is not None and info.get("plan") == plan:
                    resumed += 1
                    continue
                if pool is None:
                    process_shard(prefix, docs)
                else:
                    pending.append(pool.submit(process_shard, prefix, docs))
                    # A bounded window keeps memory flat: the reader never runs far ahead of workers.
                    while len(pending) >= 2 * cfg.workers:
                        settle(pending.popleft())
            # read_examples and the shards' examples count lines from the part's start; "lines"
            # (lines read) lets the merge turn them into lines of the file.
            pending.append({"marker": part_marker(fdir, p), "path": files[i], "shards": n, "documents": n_docs,
                            "lines": stats.lines, "read_counts": dict(stats.counts),
                            "read_examples": stats.examples, "rank": comm.rank})
            while pending and not isinstance(pending[0], Future):
                settle(pending.popleft())
        while pending:
            settle(pending.popleft())
    except BrokenProcessPool as e:
        raise DataPrepError(worker_death_message(worker_exit_codes(pool), "tokenize", cfg)) from e
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return resumed


def _merge(cfg: PrepConfig, work: str, files: list[str], out_prefix: str, dtype) -> tuple[Counter, readers.ReadStats, int]:
    """Merge every shard in (file, part, k) order; returns the shard counts, the reading counts of
    all files (whichever rank read them) with the examples of reading and tokenizing, and the
    number of shards. A part's examples count lines from the part's start: the lines of the parts
    before it (contiguous, in order) are added, so they are lines of the file, whatever the parts."""
    totals: Counter = Counter()
    rstats = readers.ReadStats()
    prefixes = []
    n_shards = 0
    for i, path in enumerate(files):
        fdir = file_work_dir(work, path)
        n_docs = line0 = 0
        for p in range(_n_parts(cfg, path)):
            done = part_done(fdir, p)
            if done is None:
                raise DataPrepError(f"{path}: not finished in {work}: a worker or MPI rank failed; re-run to resume")
            rstats.counts.update(done["read_counts"])
            rstats.add_examples(readers.shift_lines(done.get("read_examples", {}), line0))
            n_docs += done["documents"]
            for k in range(done["shards"]):
                info = shard_done(shard_prefix(fdir, p, k))
                if info is None:
                    raise DataPrepError(f"shard {p}/{k} of {path} in {fdir} is missing or damaged: a worker or MPI "
                                        "rank failed, or a file was removed; re-run to redo it")
                totals.update(info["counts"])
                shard_examples = {r: [dict(e, file=readers.printable(path)) for e in ex]
                                  for r, ex in info.get("examples", {}).items()}
                rstats.add_examples(readers.shift_lines(shard_examples, line0))
                totals["input_documents"] += info["input_documents"]
                if info["counts"].get("documents", 0):
                    prefixes.append(shard_prefix(fdir, p, k))
            n_shards += done["shards"]
            line0 += done["lines"]
        if n_docs == 0:
            rstats.empty_files.append(path)
    if prefixes:
        merge_shards(prefixes, out_prefix, dtype)
    return totals, rstats, n_shards


def split_documents(doc_count: np.ndarray, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded by-document split. Valid documents are drawn among those that can form a pair."""
    eligible = np.flatnonzero(doc_count >= 2)
    n_valid = 0
    if valid_fraction > 0 and len(eligible) >= 4:
        # At least 2, so that a random-next B can come from another valid document.
        n_valid = max(2, int(round(valid_fraction * len(eligible))))
    rng = np.random.default_rng([seed, 0x5EED])
    valid = np.sort(rng.permutation(eligible)[:n_valid])
    mask = np.ones(len(doc_count), dtype=bool)
    mask[valid] = False
    return np.flatnonzero(mask), valid


_PAIR_STATE: dict = {}
PAIR_BLOCK = 2048  # documents per pair-building task, at most,
# and about this many sentences: a task's records (a list of tuples, ~150 B each, then 13 B) are
# held until written, at most this + one document's sentences of them (~80 MB).
PAIR_BLOCK_SENTENCES = 1 << 19


def _pair_task(task):
    seq_length, split, (dupe, lo, hi) = task
    st = _PAIR_STATE
    docs = st[split]
    c: Counter = Counter()
    recs = pairs_for_documents(seq_length, docs[lo:hi], docs, st["seed"], dupe, st["short_seq_prob"],
                               st["doc_first"], st["doc_count"], st["sent_lens"], c)
    # Counted in the first round only: like "documents", a per-round figure (every round draws
    # its own targets, so summing rounds would exceed the document count).
    return recs, c["short_target_documents"] if dupe == 0 else 0


def _in_order(pool, fn, tasks, window: int):
    """fn over tasks in the pool, results in task order, at most `window` tasks submitted and not
    yet consumed (pool.map submits every task at once and keeps every finished result behind a
    slow one: memory would grow with the number of tasks)."""
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.submit(fn, task))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _build_pairs(cfg: PrepConfig, out_dir: str, sent_lens, doc_idx) -> tuple[dict, dict]:
    """One pair file per (length, split). Tasks are runs of documents; with several workers they
    run in a pool and are written back in task order, so the bytes match the 1-worker run."""
    doc_first = np.asarray(doc_idx[:-1], dtype=np.int64)
    doc_count = np.diff(np.asarray(doc_idx, dtype=np.int64))
    train, valid = split_documents(doc_count, cfg.valid_fraction, cfg.seed)
    _PAIR_STATE.update(train=train, valid=valid, seed=cfg.seed, short_seq_prob=cfg.short_seq_prob,
                       doc_first=doc_first, doc_count=doc_count, sent_lens=np.asarray(sent_lens))
    pool = _executor(cfg.workers) if cfg.workers > 1 else None
    pairs, counts = {}, {}
    try:
        for L in cfg.seq_lengths:
            pairs[str(L)] = {}
            counts[str(L)] = {}
            for name, docs in (("train", train), ("valid", valid)):
                fname = f"pairs_{L}_{name}.bin"
                tasks = [(L, name, t) for t in pair_tasks(len(docs), cfg.dupe_factor, PAIR_BLOCK,
                                                          doc_count[docs], PAIR_BLOCK_SENTENCES)]
                results = _in_order(pool, _pair_task, tasks, 2 * cfg.workers) if pool is not None else map(_pair_task, tasks)
                w = PairIndexWriter(os.path.join(out_dir, fname), L)
                short = 0
                try:
                    for recs, n_short in results:
                        w.write(recs)
                        short += n_short
                except BaseException:
                    w.abort()
                    raise
                w.close()
                pairs[str(L)][name] = fname
                counts[str(L)][name] = {"pairs": w.count, "documents": int(len(docs)),
                                        "short_target_documents": int(short)}
    except BrokenProcessPool as e:
        raise DataPrepError(worker_death_message(worker_exit_codes(pool), "pairs", cfg)) from e
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        _PAIR_STATE.clear()
    return pairs, counts


def run(cfg: PrepConfig, comm=None) -> dict:
    """Run the whole pipeline; returns the manifest written (`Manifest.to_dict()`) with the run's
    timings under "_run" (rank 0), or None (other MPI ranks)."""
    t0 = time.time()
    comm = comm or _SingleComm()
    cfg.validate()
    files = readers.expand_inputs(cfg.inputs)
    out_abs = os.path.abspath(cfg.output_dir) + os.sep
    inside = [f for f in files if os.path.abspath(f).startswith(out_abs)]
    if inside:
        # An output dir inside an input dir would otherwise feed our own vocab.txt back in.
        log.warning("skipping %d input file(s) inside --output-dir %s", len(inside), cfg.output_dir)
        files = [f for f in files if f not in inside]
        if not files:
            raise DataPrepError(f"--input: every input file is inside --output-dir {cfg.output_dir}")
    if not cfg.trains_tokenizer:
        load_tokenizer(cfg.vocab, cfg.lower_case)  # a bad vocab fails here, before anything is touched
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (torch + megatron: start-up, not throughput)

    try:
        return _run(cfg, comm, files, t0, time.time() - t0)
    except BrokenProcessPool as e:
        # The pools above name how their worker died; this is the net for any other pool.
        raise DataPrepError("a worker process died; see the log above (dmesg if it was killed) and re-run "
                            "to resume") from e
    except DataPrepError:
        raise  # already names the path (data_prep.atomic's AtomicWriteError is also an OSError)
    except OSError as e:
        # Output-side failures (full disk, read-only or vanished directory), here or in a worker:
        # a message naming the path, not a traceback.
        raise DataPrepError(f"{e.filename or cfg.output_dir}: {e.strerror or e}; check free space and "
                            "permissions of --output-dir") from e


def library_versions() -> dict:
    """Versions that decide the output bytes (tokenizer, splitter, index writer)."""
    out = {}
    for name in ("tokenizers", "sentencepiece", "blingfire", "pysbd", "syntok", "megatron-core", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _run(cfg: PrepConfig, comm, files: list[str], t0: float, startup: float) -> dict:
    if comm.rank == 0:
        log.info("data_prep: %d input file(s), %d rank(s) x %d worker(s); config %s; versions %s",
                 len(files), comm.size, cfg.workers, json.dumps(cfg.manifest_args(), sort_keys=True),
                 json.dumps(library_versions(), sort_keys=True))
    out = cfg.output_dir
    work = os.path.join(out, WORK_DIR)
    if comm.rank == 0:
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise DataPrepError(f"--output-dir {out}: cannot create ({e.strerror})") from e
        manifest.invalidate(out)  # first: from here until the new manifest lands the directory is incomplete
        remove_stale_tmp(out)
        resumed_dir = _prepare_work_dir(cfg, files, work)
        if remove_stale_tmp(work):
            log.info("removed temporary files of an interrupted run in %s", work)
        if resumed_dir:
            log.info("resuming from finished shards in %s", work)
    comm.barrier()

    phases = {}
    if cfg.trains_tokenizer:
        t_phase = time.time()
        train = _train_wordpiece if cfg.train_wordpiece_vocab_size else _train_spm
        tok_file = train(cfg, files, work) if comm.rank == 0 else None
        comm.barrier()  # the sleeping barrier: bcast alone would spin the other ranks meanwhile
        tok_file = comm.bcast(tok_file, root=0)
        phases["train_tokenizer"] = time.time() - t_phase
    else:
        tok_file = cfg.vocab
    # From here a trained vocab is used exactly as a --vocab file would be.
    tok = load_tokenizer(tok_file, cfg.lower_case)

    bar = None
    if cfg.progress and comm.rank == 0:
        bar = tqdm(unit=" docs", desc="tokenizing", dynamic_ncols=True)
    try:
        t_shards = time.time()
        resumed = _build_shards(cfg, files, work, tok_file, comm, bar)
        phases["tokenize"] = time.time() - t_shards
    finally:
        if bar is not None:
            bar.close()
    comm.barrier()
    if comm.rank != 0:
        return None
    prefix = os.path.join(out, "corpus")
    t_phase = time.time()
    totals, rstats, n_shards = _merge(cfg, work, files, prefix, corpus_dtype(tok.vocab_size))
    if n_shards == 0:
        raise DataPrepError(f"--input {' '.join(cfg.inputs)}: no documents found (all files empty or blank); "
                            "check the files and --input-format")
    phases["merge"] = time.time() - t_phase
    t_phase = time.time()
    if totals["documents"] == 0:
        raise DataPrepError(f"--input {' '.join(cfg.inputs)}: no document had any token after cleaning")
    if totals["sentences"] >= 2**32:
        raise DataPrepError("corpus has >= 2^32 sentences: the pair index stores uint32 sentence ids; "
                            "split the inputs into several data_prep runs")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    pairs, pair_counts = _build_pairs(cfg, out, ds.sequence_lengths, ds.document_indices)
    phases["pairs"] = time.time() - t_phase
    t_phase = time.time()
    del ds

    tok_copy = tok.copy_to(out)
    names = ["corpus.bin", "corpus.idx", os.path.basename(tok_copy)]
    names += [f for L in pairs.values() for f in L.values()]
    m = Manifest(
        corpus="corpus",
        pairs=pairs,
        tokenizer=TokenizerInfo(type=tok.type, file=os.path.basename(tok_copy), lower_case=bool(cfg.lower_case),
                                vocab_size=tok.vocab_size, sha256=sha256_file(tok_copy), special_ids=tok.special_ids),
        counts=Counts(input_files=len(files), documents=totals["documents"], sentences=totals["sentences"],
                      tokens=totals["tokens"], pairs=pair_counts),
        # Not cleaning, but what the report should show next to it: documents cut into pseudo-documents.
        dropped={**_dropped(rstats, totals), "long_documents_split": rstats.counts["long_documents_split"]},
        dropped_examples=_dropped_examples(rstats),
        args=cfg.manifest_args(),
        seed=cfg.seed,
        sentence_splitter=cfg.splitter,
        versions=library_versions(),
        files={n: sha256_file(os.path.join(out, n)) for n in names},
    )
    manifest.write(out, m)
    phases["manifest"] = time.time() - t_phase
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.time() - t0
    # Not in the file: timings differ run to run and the manifest must not.
    run_info = {"seconds": elapsed, "startup_seconds": startup, "phases": phases,
                "tokens_per_s": totals["tokens"] / max(elapsed - startup, 1e-9),
                "resumed_shards": resumed, "shards": n_shards}
    return {**m.to_dict(), "_run": run_info}


# Reasons of the readers' and shards' counts whose `dropped` key says more than their own name.
_DROPPED_NAMES = {"nul_bytes": "nul_bytes_removed"}


def _dropped(rstats: readers.ReadStats, totals: Counter) -> dict:
    """The manifest's `dropped` section: what reading and tokenizing removed or cut."""
    return {
        "empty_documents": rstats.counts["empty_documents"] + totals["empty_documents_after_tokenizing"],
        "one_sentence_documents_no_pairs": totals["one_sentence_documents"],
        "long_sentences_cut": totals["long_sentences_cut"],
        "long_lines_cut": rstats.counts["long_lines_cut"],
        "oversized_lines_read_in_pieces": rstats.counts["oversized_lines_read_in_pieces"],
        "oversized_json_lines": rstats.counts["oversized_json_lines"],
        "invalid_utf8_lines": rstats.counts["invalid_utf8_lines"],
        "lone_surrogate_lines": rstats.counts["lone_surrogate_lines"],
        "nul_bytes_removed": rstats.counts["nul_bytes"],
        "bad_json_lines": rstats.counts["bad_json_lines"],
        "json_lines_without_text": rstats.counts["json_lines_without_text"],
        "tokenizer_refused_documents": totals["tokenizer_refused_documents"],
        "empty_files": rstats.empty_files,
    }


def _dropped_examples(rstats: readers.ReadStats) -> dict:
    """The manifest's `dropped_examples`: per key of `dropped`, its first few cases (file, line)."""
    return {_DROPPED_NAMES.get(r, r): cases for r, cases in sorted(rstats.examples.items()) if cases}


def _shown(text: str) -> str:
    """`text` for a terminal: control and other non-printable characters as their escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def format_report(m: dict) -> str:
    c, d, r = m["counts"], m["dropped"], m.get("_run", {})
    lines = [
        "data_prep report",
        f"  documents {c['documents']:,}  sentences {c['sentences']:,}  tokens {c['tokens']:,}",
    ]
    for L, sp in c["pairs"].items():
        lines.append(f"  pairs @{L}: train {sp['train']['pairs']:,} ({sp['train']['documents']:,} docs)  "
                     f"valid {sp['valid']['pairs']:,} ({sp['valid']['documents']:,} docs)")
    examples = m.get("dropped_examples") or {}
    for k, v in d.items():
        if v:
            lines.append(f"  dropped/cleaned {k}: {v if not isinstance(v, list) else len(v)}")
            for e in examples.get(k, []):
                where = f"{e['file']}:{e['line']}" if e.get("line") is not None else e["file"]
                error = f"  ({e['error']})" if e.get("error") else ""
                lines.append(f"      e.g. {where}: \"{_shown(e['excerpt'])}\"{error}")
    if r:
        lines.append(f"  {r['seconds']:.1f} s ({r['startup_seconds']:.1f} s start-up), "
                     f"{r['tokens_per_s']:,.0f} tokens/s after start-up, "
                     f"{r['shards']} shards ({r['resumed_shards']} resumed)")
        lines.append("  phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["phases"].items()))
    return "\n".join(lines)
