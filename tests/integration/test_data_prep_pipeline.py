"""End to end on 200 real documents: exact tokens back through megatron-core, byte-identical
output for 1 and 2 workers, resume, atomicity, checksums, sentencepiece training."""
import filecmp
import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from data_prep.embedded import embedded_corpus_jsonl, embedded_vocab
from data_prep.errors import DataPrepError
from data_prep.pairs import PairIndex
from data_prep.pipeline import PrepConfig, run
from data_prep.splitter import get_splitter
from data_prep.testing import build_tiny_dataset
from data_prep.verify import verify

N_DOCS = 200
KW = dict(seq_lengths=(64, 128), n_docs=N_DOCS, docs_per_shard=30, valid_fraction=0.05)


def _files(d):
    return sorted(f for f in os.listdir(d) if not f.startswith("."))


def _same_dir(a, b):
    assert _files(a) == _files(b)
    for f in _files(a):
        assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), f


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # One input path for every run: the input paths are part of the manifest's args.
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("dp")
    return build_tiny_dataset(str(root / "w1"), cache_dir=cache, **KW)


@pytest.fixture(scope="module")
def texts(cache):
    with open(embedded_corpus_jsonl(cache, max_docs=N_DOCS)) as f:
        return [json.loads(l)["text"] for l in f]


def test_layout_and_manifest(base):
    assert _files(base) == ["corpus.bin", "corpus.idx", "manifest.json", "pairs_128_train.bin",
                            "pairs_128_valid.bin", "pairs_64_train.bin", "pairs_64_valid.bin", "vocab.txt"]
    m = json.load(open(os.path.join(base, "manifest.json")))
    assert m["format_version"] == 1 and m["corpus"] == "corpus"
    assert m["pairs"]["64"] == {"train": "pairs_64_train.bin", "valid": "pairs_64_valid.bin"}
    assert m["tokenizer"]["special_ids"] == {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
    assert m["tokenizer"]["vocab_size"] == 30522 and m["tokenizer"]["lower_case"] is True
    assert set(m["files"]) == set(_files(base)) - {"manifest.json"}
    assert m["counts"]["documents"] == N_DOCS
    assert verify(base) == []


def test_fixture_helper_reuses_a_complete_dir(base, cache):
    before = os.stat(os.path.join(base, "manifest.json")).st_mtime_ns
    assert build_tiny_dataset(base, cache_dir=cache, **KW) == base
    assert os.stat(os.path.join(base, "manifest.json")).st_mtime_ns == before


def test_corpus_reads_back_exact_tokens(base, texts):
    import transformers
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ref = transformers.BertTokenizerLegacy(embedded_vocab(), do_lower_case=True)
    split = get_splitter("blingfire")
    ds = IndexedDataset(os.path.join(base, "corpus"))
    assert ds.index.dtype == np.uint16  # vocab < 65,500 entries
    doc_idx = ds.document_indices
    assert len(doc_idx) == N_DOCS + 1 and doc_idx[0] == 0 and doc_idx[-1] == len(ds)
    n_tokens = 0
    for d, text in enumerate(texts):
        expected = []
        for line in (l.strip() for l in text.split("\n")):
            for a, b in split(line) if line else []:
                ids = ref(line[a:b], add_special_tokens=False)["input_ids"]
                if ids:
                    expected.append(ids)
        got = [ds[i].tolist() for i in range(doc_idx[d], doc_idx[d + 1])]
        assert got == expected, d
        n_tokens += sum(map(len, got))
    m = json.load(open(os.path.join(base, "manifest.json")))
    assert m["counts"]["tokens"] == n_tokens and m["counts"]["sentences"] == len(ds)


def test_pair_indexes_respect_split_and_documents(base):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(os.path.join(base, "corpus"))
    doc_of = np.repeat(np.arange(N_DOCS), np.diff(ds.document_indices))
    m = json.load(open(os.path.join(base, "manifest.json")))
    for L in ("64", "128"):
        docs = {}
        for split in ("train", "valid"):
            p = PairIndex(os.path.join(base, m["pairs"][L][split]))
            assert p.seq_length == int(L) and len(p) == m["counts"]["pairs"][L][split]["pairs"] > 0
            a, b = doc_of[p.pairs["a_start"]], doc_of[p.pairs["b_start"]]
            rnd = p.pairs["is_random"] == 1
            assert (a[rnd] != b[rnd]).all() and (a[~rnd] == b[~rnd]).all()
            docs[split] = set(a.tolist()) | set(b.tolist())
        assert docs["train"].isdisjoint(docs["valid"])
        assert 2 <= len(docs["valid"]) <= 0.1 * N_DOCS


def test_two_workers_byte_identical(base, tmp_path, cache, monkeypatch):
    import data_prep.pipeline

    # Small pair-building tasks so several run in the pool and must be written back in order.
    monkeypatch.setattr(data_prep.pipeline, "PAIR_BLOCK", 17)
    out = build_tiny_dataset(str(tmp_path / "w2"), workers=2, cache_dir=cache, **KW)
    _same_dir(base, out)


def _shard_dir(out, path):
    from data_prep.pipeline import WORK_DIR, file_work_dir

    return file_work_dir(os.path.join(out, WORK_DIR), path)


def test_resume_from_finished_shards(base, tmp_path, cache):
    out = str(tmp_path / "r")
    build_tiny_dataset(out, cache_dir=cache, keep_work=True, **KW)
    # Simulate a crash after some shards: drop a shard marker, the file's part marker and every
    # final output; and a power loss or a hand edit: a truncated .bin, an empty .idx.
    work = os.path.join(out, ".work")
    sd = _shard_dir(out, embedded_corpus_jsonl(cache, max_docs=N_DOCS))
    for f in ("shard_000000_000002.json", "part_000000.json"):
        os.remove(os.path.join(sd, f))
    with open(os.path.join(sd, "shard_000000_000005.bin"), "r+b") as f:
        f.truncate(10)
    open(os.path.join(sd, "shard_000000_000006.idx"), "wb").close()
    for f in _files(out):
        os.remove(os.path.join(out, f))
    m = run(PrepConfig(inputs=[embedded_corpus_jsonl(cache, max_docs=N_DOCS)], output_dir=out, vocab=embedded_vocab(),
                       seq_lengths=[64, 128], valid_fraction=0.05, docs_per_shard=30, progress=False))
    assert m["_run"]["shards"] == 7 and m["_run"]["resumed_shards"] == 4
    assert not os.path.exists(work)
    _same_dir(base, out)


def test_edited_input_redoes_only_its_own_shards(base, tmp_path, cache):
    """The issue's case: the third of three inputs is a truncated .gz; re-created, only its shards
    are made (0 of 8 resumed before per-file keys); then touching one file redoes only its 3."""
    import gzip

    lines = open(embedded_corpus_jsonl(cache, max_docs=N_DOCS)).read().splitlines(keepends=True)
    d = tmp_path / "in"
    d.mkdir()
    a, b, c = d / "a.jsonl", d / "b.jsonl", d / "c.jsonl.gz"
    a.write_text("".join(lines[:70]))
    b.write_text("".join(lines[70:140]))
    data = gzip.compress("".join(lines[140:]).encode())
    c.write_bytes(data[: len(data) // 2])
    out = str(tmp_path / "o")
    cfg = dict(inputs=[str(d)], output_dir=out, vocab=embedded_vocab(), seq_lengths=[64, 128],
               valid_fraction=0.05, docs_per_shard=30, progress=False, keep_work=True)
    with pytest.raises(DataPrepError, match="truncated gzip"):
        run(PrepConfig(**cfg))
    c.write_bytes(data)
    m = run(PrepConfig(**cfg))
    assert (m["_run"]["shards"], m["_run"]["resumed_shards"]) == (3 + 3 + 2, 3 + 3)
    for f in ("corpus.bin", "corpus.idx", "pairs_64_train.bin", "pairs_128_valid.bin"):
        assert filecmp.cmp(os.path.join(out, f), os.path.join(base, f), shallow=False), f
    first = {f: open(os.path.join(out, f), "rb").read() for f in _files(out)}
    st = os.stat(a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    m = run(PrepConfig(**cfg))
    assert m["_run"]["resumed_shards"] == 3 + 2
    assert {f: open(os.path.join(out, f), "rb").read() for f in _files(out)} == first
    # The edited file's old shards are gone, not left to grow the work dir.
    assert len([x for x in os.listdir(os.path.join(out, ".work")) if x.startswith("file_")]) == 3


def test_document_without_blank_lines_is_split_into_bounded_shards(tmp_path, texts):
    """A .txt of ~100 KB with no blank line is one document: with --max-document-bytes it becomes
    pseudo-documents, shards hold at most --shard-bytes (+ one document) of text, and the tokens are
    exactly those of the unsplit run (only the document boundaries in corpus.idx differ)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = tmp_path / "book.txt"
    body = "\n".join(t.strip() for t in texts if t.strip()) + "\n"
    src.write_text(body, encoding="utf-8")
    size = os.path.getsize(src)
    kw = dict(inputs=[str(src)], vocab=embedded_vocab(), seq_lengths=[64], valid_fraction=0.0, progress=False)
    small = dict(max_document_bytes=16 << 10, shard_bytes=48 << 10)
    m = run(PrepConfig(output_dir=str(tmp_path / "split"), keep_work=True, **small, **kw))
    assert m["dropped"]["long_documents_split"] == 1
    n_docs = m["counts"]["documents"]
    assert size // (16 << 10) <= n_docs <= size // (16 << 10) + 1
    sd = _shard_dir(str(tmp_path / "split"), str(src))
    bins = [os.path.getsize(os.path.join(sd, f)) for f in os.listdir(sd) if f.endswith(".bin")]
    # uint16 tokens, at most one per byte of text; a shard closes once it reaches shard_bytes, so it
    # holds less than shard_bytes + one (pseudo-)document, itself < max_document_bytes + one line.
    longest_line = max(len(ln.encode()) for ln in body.splitlines())
    assert len(bins) >= size // (48 << 10)
    assert max(bins) <= 2 * ((48 << 10) + (16 << 10) + longest_line)
    whole = run(PrepConfig(output_dir=str(tmp_path / "whole"), max_document_bytes=0, **kw))
    assert whole["counts"]["documents"] == 1 and whole["dropped"]["long_documents_split"] == 0
    assert filecmp.cmp(tmp_path / "split" / "corpus.bin", tmp_path / "whole" / "corpus.bin", shallow=False)
    ds = IndexedDataset(str(tmp_path / "split" / "corpus"))
    assert len(ds.document_indices) == n_docs + 1


_KILL_SHARD = None  # the shard (prefix basename) at which _kill_at kills its worker


def _kill_at(prefix, docs):
    """data_prep.pipeline's process_shard in the tests below: a worker that takes shard
    _KILL_SHARD dies as the OOM killer would kill it (SIGKILL, no clean-up of any kind)."""
    import multiprocessing
    import signal

    from data_prep.shards import process_shard

    if os.path.basename(prefix) == _KILL_SHARD and multiprocessing.parent_process() is not None:
        os.kill(os.getpid(), signal.SIGKILL)  # only ever a fork worker, never the test process
    return process_shard(prefix, docs)


def _kill_worker_at(monkeypatch, shard):
    import data_prep.pipeline

    # The pool's workers are forks of this process: they see both patches.
    monkeypatch.setattr(data_prep.pipeline, "process_shard", _kill_at)
    monkeypatch.setitem(globals(), "_KILL_SHARD", shard)


def test_killed_worker_is_one_clear_line_and_resumes(base, tmp_path, cache, monkeypatch):
    """A worker killed with SIGKILL (as by the OOM killer) mid-run: a one-line error naming what to
    lower, nothing written under a final name; the next run completes with base's bytes."""
    out = str(tmp_path / "k")
    cfg = dict(inputs=[embedded_corpus_jsonl(cache, max_docs=N_DOCS)], output_dir=out, vocab=embedded_vocab(),
               seq_lengths=[64, 128], valid_fraction=0.05, docs_per_shard=30, progress=False, workers=2)
    _kill_worker_at(monkeypatch, "shard_000000_000003")
    with pytest.raises(DataPrepError) as e:
        run(PrepConfig(**cfg))
    msg = str(e.value)
    assert "\n" not in msg and "killed (SIGKILL" in msg and "out-of-memory" in msg and "tokenizing" in msg
    assert "lower --workers (2) or --shard-bytes" in msg
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    monkeypatch.undo()
    m = run(PrepConfig(**cfg))
    # The worker that took shard 3 had finished an earlier one: at least that one is kept.
    assert m["_run"]["resumed_shards"] > 0
    _same_dir(base, out)


def test_rerun_with_smaller_shard_bytes_after_a_kill(base, tmp_path, cache, monkeypatch):
    """What the killed-worker line advises: a re-run with a smaller --shard-bytes keeps the
    finished parts (a.jsonl's 4 shards), redoes the unfinished part's shards cut with the old
    sizes (none of b.jsonl's old shards are left behind), and gives the clean run's bytes."""
    lines = open(embedded_corpus_jsonl(cache, max_docs=N_DOCS)).read().splitlines(keepends=True)
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_text("".join(lines[:40]))
    (d / "b.jsonl").write_text("".join(lines[40:]))
    out = str(tmp_path / "k")
    cfg = dict(inputs=[str(d)], output_dir=out, vocab=embedded_vocab(), seq_lengths=[64, 128],
               valid_fraction=0.05, docs_per_shard=10, progress=False, workers=2)
    # a.jsonl has shards 0-3 only; the worker that takes b's shard 5 finds a's shards all done.
    _kill_worker_at(monkeypatch, "shard_000000_000005")
    with pytest.raises(DataPrepError, match="killed"):
        run(PrepConfig(**cfg))
    monkeypatch.undo()
    sd_b = _shard_dir(out, str(d / "b.jsonl"))
    assert any(f.endswith(".json") for f in os.listdir(sd_b))  # b had finished shards, cut at 8 MiB
    m = run(PrepConfig(**cfg, shard_bytes=4096, keep_work=True))
    assert m["_run"]["resumed_shards"] == 4  # a's finished part; b's old shards had other sizes
    n_b = json.load(open(os.path.join(sd_b, "part_000000.json")))["shards"]
    assert n_b > 16  # 4 KiB closes shards before 10 documents
    assert len([f for f in os.listdir(sd_b) if f.startswith("shard_") and f.endswith(".json")]) == n_b
    for f in ("corpus.bin", "corpus.idx", "pairs_64_train.bin", "pairs_64_valid.bin", "pairs_128_train.bin",
              "pairs_128_valid.bin"):
        assert filecmp.cmp(os.path.join(out, f), os.path.join(base, f), shallow=False), f
    # A finished part stays whatever the sizes: a third run with other sizes redoes nothing.
    os.remove(os.path.join(out, "manifest.json"))
    m = run(PrepConfig(**cfg, shard_bytes=1 << 20, keep_work=True))
    assert m["_run"]["resumed_shards"] == m["_run"]["shards"] == 4 + n_b


def test_failed_run_never_looks_complete(base, tmp_path, cache):
    import gzip

    out = str(tmp_path / "f")
    shutil.copytree(base, out)
    good = embedded_corpus_jsonl(cache, max_docs=N_DOCS)
    data = gzip.compress(b'{"text": "x y z."}\n' * 5000)
    bad = tmp_path / "z.jsonl.gz"
    bad.write_bytes(data[: len(data) // 2])
    cfg = PrepConfig(inputs=[good, str(bad)], output_dir=out, vocab=embedded_vocab(), seq_lengths=[64, 128],
                     valid_fraction=0.05, docs_per_shard=30, progress=False)
    with pytest.raises(DataPrepError, match="truncated gzip"):
        run(cfg)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    assert "missing" in verify(out)[0]
    cfg.inputs = [good]
    run(cfg)
    _same_dir(base, out)


def test_verify_detects_truncation_and_corruption(base, tmp_path):
    out = str(tmp_path / "v")
    shutil.copytree(base, out)
    with open(os.path.join(out, "corpus.bin"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(out, "corpus.bin")) - 2)
    p = os.path.join(out, "pairs_64_train.bin")
    raw = bytearray(open(p, "rb").read())
    raw[100] ^= 0x01
    open(p, "wb").write(bytes(raw))
    problems = verify(out)
    assert len(problems) == 2
    assert "corpus.bin: SHA-256 mismatch" in problems[0] and "pairs_64_train.bin: SHA-256 mismatch" in problems[1]
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "data_prep.verify"]
    ok = subprocess.run(cmd + [base], capture_output=True, text=True)
    bad = subprocess.run(cmd + [out], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("OK")
    assert bad.returncode == 1 and bad.stderr.count("FAIL") == 2 and "Traceback" not in bad.stderr


def test_trained_sentencepiece_pipeline(tmp_path, texts, cache):
    import sentencepiece as spm

    out = build_tiny_dataset(str(tmp_path / "spm"), seq_lengths=(64,), n_docs=N_DOCS, vocab=None,
                             train_spm_vocab_size=400, docs_per_shard=50, cache_dir=cache)
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["tokenizer"]["type"] == "sentencepiece" and m["tokenizer"]["file"] == "spm.model"
    assert m["tokenizer"]["special_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert verify(out) == []
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "spm.model"))
    ds = IndexedDataset(os.path.join(out, "corpus"))
    di = ds.document_indices
    split = get_splitter("blingfire")
    checked = 0
    # Sentence by sentence, so a cut in the wrong place (not just wrong ids) fails. Every document
    # with a character outside ASCII is checked: those are where byte and character offsets differ.
    for d in range(N_DOCS):
        if d % 7 and texts[d].isascii():
            continue
        lines = [l.strip() for l in texts[d].split("\n") if l.strip()]
        expected = [ids for l in lines for a, b in split(l) if (ids := sp.encode(l[a:b]))]
        got = [ds[i].tolist() for i in range(di[d], di[d + 1])]
        assert got == expected, d
        checked += not texts[d].isascii()
    assert checked >= 5
    # The bytes the per-sentence path (proto pieces with offsets, one sentence at a time) wrote
    # before issue 12's one batch call per shard: the ids must not change. With the pinned
    # sentencepiece and blingfire (their versions are in the manifest); spm.model is not pinned,
    # its bytes hold the temporary path it was trained under.
    from data_prep.tokenizer import sha256_file

    assert {f: sha256_file(os.path.join(out, f)) for f in ("corpus.bin", "corpus.idx")} == {
        "corpus.bin": "5dbf292465025dd6447f66063e9dc123d7a4dba55d5c5838e91ca6a1a8a81afd",
        "corpus.idx": "cb8dddcc211cf562a237b1c14b388a595b8caea3e7720a3508b437afd28dece2"}, m["versions"]


def test_output_dir_failures_are_clear_errors(tmp_path, cache):
    def cfg(out, **kw):
        return PrepConfig(inputs=[embedded_corpus_jsonl(cache, max_docs=N_DOCS)], output_dir=str(out),
                          vocab=embedded_vocab(), seq_lengths=[64], docs_per_shard=100, progress=False, **kw)

    a = tmp_path / "a"
    a.mkdir()
    (a / ".work").write_text("")  # a regular file where the work directory goes
    with pytest.raises(DataPrepError, match=r"\.work: cannot create the work directory"):
        run(cfg(a))
    b = tmp_path / "b"
    (b / "manifest.json").mkdir(parents=True)
    with pytest.raises(DataPrepError, match=r"manifest.json: cannot remove the old manifest \(Is a directory\)"):
        run(cfg(b))
    c = tmp_path / "c"
    (c / "pairs_64_train.bin").mkdir(parents=True)  # fails late, at the rename of a finished file
    # One message, said once (an AtomicWriteError is also an OSError: it must not be wrapped again).
    with pytest.raises(DataPrepError, match=r"pairs_64_train.bin: cannot write \(Is a directory\); check free space and permissions$"):
        run(cfg(c))
    assert not os.path.exists(c / "manifest.json")
    assert not [f for f in os.listdir(c) if ".tmp." in f]


def test_stale_tmp_files_of_a_killed_run_are_removed(tmp_path, cache):
    out = tmp_path / "s"
    kw = dict(inputs=[embedded_corpus_jsonl(cache, max_docs=N_DOCS)], output_dir=str(out), vocab=embedded_vocab(),
              seq_lengths=[64], docs_per_shard=100, progress=False, keep_work=True)
    run(PrepConfig(**kw))
    stale = [out / "corpus.bin.tmp.4242", out / "pairs_64_train.bin.tmp.4242",
             out / ".work" / "manifest.json.tmp.1"]
    stale.append(pathlib.Path(_shard_dir(str(out), kw["inputs"][0])) / "shard_000000_000001.bin.tmp.4242")
    for p in stale:
        p.write_bytes(b"left by a killed run")
    m = run(PrepConfig(**kw))
    assert m["_run"]["resumed_shards"] == 2  # same fingerprint: the work dir was kept, only tmp files went
    assert [p for p in stale if p.exists()] == []


class _RankComm:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def barrier(self):
        pass

    def bcast(self, obj, root=0):
        return obj


def test_mpi_ranks_read_only_their_own_files(base, tmp_path, cache, monkeypatch):
    """Files go to ranks round-robin and a rank never opens another rank's file; ranks run one
    after the other here (rank 0 last: it merges), into one directory, and give base's bytes."""
    from data_prep import pipeline, readers

    src = embedded_corpus_jsonl(cache, max_docs=N_DOCS)
    lines = open(src).read().splitlines(keepends=True)
    d = tmp_path / "in"
    d.mkdir()
    cuts = [0, 45, 50, 130, 131, N_DOCS]  # uneven files, one of a single document
    for j in range(len(cuts) - 1):
        (d / f"part{j}.jsonl").write_text("".join(lines[cuts[j]:cuts[j + 1]]))
    opened = []
    real = readers.iter_file_documents
    monkeypatch.setattr(readers, "iter_file_documents", lambda p, *a, **k: (opened.append(os.path.basename(p)), real(p, *a, **k))[1])
    out = tmp_path / "mpi"
    cfg = dict(inputs=[str(d)], output_dir=str(out), vocab=embedded_vocab(), seq_lengths=[64, 128],
               valid_fraction=0.05, docs_per_shard=30, progress=False)
    # What rank 0 does before the first barrier of a real MPI run: create the work dir.
    first = PrepConfig(**cfg)
    first.validate()
    os.makedirs(out)
    pipeline._prepare_work_dir(first, readers.expand_inputs([str(d)]), str(out / ".work"))
    assert run(PrepConfig(**cfg), comm=_RankComm(1, 2)) is None
    assert opened == ["part1.jsonl", "part3.jsonl"]
    opened.clear()
    m = run(PrepConfig(**cfg), comm=_RankComm(0, 2))
    assert opened == ["part0.jsonl", "part2.jsonl", "part4.jsonl"]
    # Rank 0 started fresh (its fingerprint matched), so rank 1's files were merged, not re-read.
    assert m["_run"]["shards"] == 2 + 1 + 3 + 1 + 3 and m["_run"]["resumed_shards"] == 0
    single = run(PrepConfig(**dict(cfg, output_dir=str(tmp_path / "one"))))
    _same_dir(out, tmp_path / "one")
    for f in ("corpus.bin", "corpus.idx", "pairs_64_train.bin", "pairs_128_valid.bin"):
        assert filecmp.cmp(out / f, os.path.join(base, f), shallow=False), f
    assert single["counts"]["documents"] == m["counts"]["documents"]


def test_verify_deep_checks_on_hand_edited_directories(base, tmp_path, monkeypatch):
    import data_prep.verify
    from data_prep.pairs import write_pair_index
    from data_prep.tokenizer import sha256_file

    monkeypatch.setattr(data_prep.verify, "CHUNK", 7)  # several chunks over the pair arrays
    assert verify(base) == []

    def edited(name, change):
        out = tmp_path / name
        shutil.copytree(base, out)
        m = json.load(open(out / "manifest.json"))
        change(out, m)
        for f in m["files"]:
            m["files"][f] = sha256_file(str(out / f))  # a consistent-looking hand edit
        json.dump(m, open(out / "manifest.json", "w"))
        return verify(str(out))

    n_sent = json.load(open(os.path.join(base, "manifest.json")))["counts"]["sentences"]
    assert edited("nocounts", lambda d, m: m.pop("counts")) == [
        "manifest.json: counts.sentences missing (hand-edited?); re-run data_prep"]
    assert edited("wrongcount", lambda d, m: m["counts"].update(sentences=n_sent + 1)) == [
        f"manifest.json: counts.sentences {n_sent + 1} but the corpus has {n_sent}"]
    probs = edited("badidx", lambda d, m: (d / "corpus.idx").write_bytes(b"garbage" * 10))
    assert len(probs) == 1 and "not a readable Megatron indexed dataset" in probs[0]

    def past_end(d, m):
        recs = PairIndex(str(d / "pairs_64_train.bin")).pairs.copy()
        recs[-1]["b_start"] = n_sent - 1
        recs[-1]["b_count"] = 2  # the last pair's B runs one sentence past the corpus
        write_pair_index(str(d / "pairs_64_train.bin"), 64, recs)

    assert edited("pastend", past_end) == [f"pairs_64_train.bin: pairs point past the corpus ({n_sent} sentences)"]


def _dirty_inputs(d, good_lines):
    """Good embedded documents with bad records among them, at known lines."""
    d.mkdir()
    bad = {3: b'{"text": "Broken emoji \\ud83d here. It has two sentences."}',
           5: b'{"text": "cut off',
           8: b'{"text": "Bytes \xff\xfe here. And a NUL\\u0000 escape."}',
           9: b'{"title": "no text"}',
           12: b'{"text": "REFUSE ME: a record this tokenizer raises on. Second sentence."}'}
    lines, it = [], iter(good_lines)
    for n in range(1, len(good_lines) + len(bad) + 1):
        lines.append(bad.get(n) or next(it).rstrip("\n").encode())
    (d / "web.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (d / "notes.txt").write_bytes(b"A plain text note. Fine.\n\nSecond note \xed\xa0\xbd (CESU-8 surrogate bytes).\n")
    return str(d)


def _refusing(real):
    def encode_lines(self, lines):  # stands for any text a tokenizer might raise on
        if any("REFUSE ME" in ln for ln in lines):
            raise ValueError("refused by the tokenizer")
        return real(self, lines)
    return encode_lines


def test_bad_records_are_cleaned_or_dropped_counted_and_located(tmp_path, cache, monkeypatch):
    """One bad record among good ones costs at most its own document, never the run: the counts
    per reason and the first examples (file:line) are in the manifest and the report, the same for
    1 and 2 workers; lone surrogates and refused text included."""
    from data_prep.pipeline import format_report
    from data_prep.tokenizer import WordPieceTokenizer

    good = open(embedded_corpus_jsonl(cache, max_docs=N_DOCS)).read().splitlines()[:40]
    src = _dirty_inputs(tmp_path / "in", good)
    monkeypatch.setattr(WordPieceTokenizer, "encode_lines", _refusing(WordPieceTokenizer.encode_lines))
    runs = []
    for w in (1, 2):
        runs.append(run(PrepConfig(inputs=[src], output_dir=str(tmp_path / f"w{w}"), vocab=embedded_vocab(),
                                   seq_lengths=[64], valid_fraction=0.05, docs_per_shard=7, workers=w,
                                   progress=False)))
    _same_dir(tmp_path / "w1", tmp_path / "w2")
    m = runs[0]
    d = m["dropped"]
    assert {k: d[k] for k in ("lone_surrogate_lines", "bad_json_lines", "invalid_utf8_lines", "nul_bytes_removed",
                              "json_lines_without_text", "tokenizer_refused_documents")} == {
        "lone_surrogate_lines": 1, "bad_json_lines": 1, "invalid_utf8_lines": 2, "nul_bytes_removed": 1,
        "json_lines_without_text": 1, "tokenizer_refused_documents": 1}
    # 40 good + the surrogate and bytes records, cleaned; notes.txt's 2 documents; REFUSE ME dropped.
    assert m["counts"]["documents"] == 40 + 2 + 2
    where = {k: [(os.path.basename(e["file"]), e["line"]) for e in v] for k, v in m["dropped_examples"].items()}
    assert where == {"lone_surrogate_lines": [("web.jsonl", 3)], "bad_json_lines": [("web.jsonl", 5)],
                     "invalid_utf8_lines": [("notes.txt", 3), ("web.jsonl", 8)],
                     "nul_bytes_removed": [("web.jsonl", 8)],
                     "json_lines_without_text": [("web.jsonl", 9)], "tokenizer_refused_documents": [("web.jsonl", 12)]}
    [refused] = m["dropped_examples"]["tokenizer_refused_documents"]
    assert refused["error"] == "ValueError: refused by the tokenizer" and refused["excerpt"].startswith("REFUSE ME")
    assert m["dropped_examples"]["lone_surrogate_lines"][0]["excerpt"].startswith("Broken emoji \\ud83d here.")
    report = format_report(m)
    assert "dropped/cleaned lone_surrogate_lines: 1" in report
    assert f"e.g. {os.path.join(src, 'web.jsonl')}:3: \"Broken emoji \\ud83d here." in report
    assert f"{os.path.join(src, 'web.jsonl')}:12: \"REFUSE ME" in report and "(ValueError: refused" in report
    # The cleaned record is in the corpus as its text with U+FFFD (which BERT's cleaning drops).
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "w1" / "corpus"))
    di = ds.document_indices
    tok = WordPieceTokenizer(embedded_vocab())
    # notes.txt comes first (sorted walk): its 2 documents, then web.jsonl's lines 1, 2 and 3.
    assert [ds[i].tolist() for i in range(di[4], di[5])] == [
        tok.encode_text("Broken emoji \ufffd here."), tok.encode_text("It has two sentences.")]
    assert verify(str(tmp_path / "w1")) == []


def test_bad_records_in_a_file_read_in_parts(tmp_path, cache, monkeypatch):
    """A JSON-lines file with bad records (a lone surrogate, refused text, ...) cut into parts of
    1 KiB: the same counts, the same examples with the file's own line numbers (a part counts
    lines from its start; the merge adds the earlier parts' lines) and the same bytes, manifest
    included, as one part."""
    from data_prep.pipeline import file_work_dir
    from data_prep.tokenizer import WordPieceTokenizer

    good = open(embedded_corpus_jsonl(cache, max_docs=N_DOCS)).read().splitlines()[:40]
    web = os.path.join(_dirty_inputs(tmp_path / "in", good), "web.jsonl")
    body = open(web, "rb").read()
    # Line 3 starts past 1024: a part starts at it or after byte 1024, not at byte 0.
    assert body.index(b'{"text": "Broken emoji') > 1024
    monkeypatch.setattr(WordPieceTokenizer, "encode_lines", _refusing(WordPieceTokenizer.encode_lines))
    kw = dict(inputs=[web], vocab=embedded_vocab(), seq_lengths=[64], valid_fraction=0.05, docs_per_shard=7,
              progress=False)
    one = run(PrepConfig(output_dir=str(tmp_path / "one"), **kw))
    parts = run(PrepConfig(output_dir=str(tmp_path / "parts"), part_bytes=1024, keep_work=True, **kw))
    fdir = file_work_dir(str(tmp_path / "parts" / ".work"), web)
    markers = [json.load(open(os.path.join(fdir, f))) for f in sorted(os.listdir(fdir)) if f.startswith("part_")]
    assert len(markers) > 4 and sum(mk["lines"] for mk in markers) == body.count(b"\n")
    for m in (one, parts):
        assert m["dropped"]["lone_surrogate_lines"] == 1 and m["dropped"]["tokenizer_refused_documents"] == 1
        where = {k: [(e["file"], e["line"]) for e in v] for k, v in m["dropped_examples"].items()}
        assert where == {"lone_surrogate_lines": [(web, 3)], "bad_json_lines": [(web, 5)],
                         "invalid_utf8_lines": [(web, 8)], "nul_bytes_removed": [(web, 8)],
                         "json_lines_without_text": [(web, 9)], "tokenizer_refused_documents": [(web, 12)]}
    assert one["dropped_examples"] == parts["dropped_examples"]
    _same_dir(tmp_path / "one", tmp_path / "parts")  # corpus, pairs and manifest


def test_trained_sentencepiece_on_bad_records(tmp_path, cache):
    """The same inputs through sentencepiece training and encoding (the training sentences are
    written as UTF-8: a lone surrogate used to end the run there)."""
    good = open(embedded_corpus_jsonl(cache, max_docs=N_DOCS)).read().splitlines()
    src = _dirty_inputs(tmp_path / "in", good)
    m = run(PrepConfig(inputs=[src], output_dir=str(tmp_path / "spm"), train_spm_vocab_size=400, seq_lengths=[64],
                       docs_per_shard=50, progress=False))
    assert m["dropped"]["lone_surrogate_lines"] == 1 and m["dropped"]["tokenizer_refused_documents"] == 0
    assert m["counts"]["documents"] == N_DOCS + 3 + 2
    assert [(os.path.basename(e["file"]), e["line"]) for e in m["dropped_examples"]["lone_surrogate_lines"]] == [
        ("web.jsonl", 3)]
