"""The CLI on bad user data and under mpirun: clean errors (no tracebacks), counted clean-ups,
and byte-identical output for 2 MPI ranks and 1 process; a WordPiece vocab trained by the CLI."""
import filecmp
import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_prep.embedded import embedded_corpus_jsonl, embedded_vocab

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args, timeout=300, mpi=0):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "data_prep", "--no-progress", *args]
    if mpi:
        cmd = ["timeout", "-k", "10", str(timeout), "mpirun", "--allow-run-as-root", "--oversubscribe",
               "-np", str(mpi), "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH", *cmd]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout + 30)


def _assert_clean_error(r, *needles):
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr[-2000:]


def test_user_errors_are_clean(tmp_path):
    vocab = embedded_vocab()
    out = str(tmp_path / "out")
    _assert_clean_error(_cli("--input", str(tmp_path / "missing.txt"), "--vocab", vocab, "--output-dir", out),
                        "missing.txt: no such file")
    ok = tmp_path / "ok.txt"
    ok.write_text("A sentence. Another one.\n")
    bad_vocab = tmp_path / "bad_vocab.txt"
    bad_vocab.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    _assert_clean_error(_cli("--input", str(ok), "--vocab", str(bad_vocab), "--output-dir", out),
                        "bad_vocab.txt", "not a UTF-8")
    _assert_clean_error(_cli("--input", str(ok), "--vocab", str(tmp_path / "nov.txt"), "--output-dir", out),
                        "--vocab", "nov.txt: no such file")
    _assert_clean_error(_cli("--input", str(ok), "--vocab", vocab, "--output-dir", out, "--seq-length", "4"),
                        "--seq-length 4")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _assert_clean_error(_cli("--input", str(blank), str(empty), "--vocab", vocab, "--output-dir", out),
                        "no documents found")
    assert not os.path.exists(os.path.join(out, "manifest.json"))


def _dirty_corpus(tmp_path, long_words):
    src = tmp_path / "in"
    src.mkdir()
    (src / "empty.txt").write_text("")
    (src / "blank.txt").write_text("\n\n  \n")
    (src / "bytes.txt").write_bytes(b"Good text here. More text.\n\nBad \xff\xfe utf8. And a NUL\x00 byte.\n\n"
                                    b"Third document, one sentence.\n")
    # A 10 MB line without a sentence break.
    line = "Short intro sentence. " + " ".join(long_words)
    assert len(line) > 10_000_000
    with gzip.open(src / "long.txt.gz", "wt") as f:
        f.write(line + "\n")
    # Line 3: an escaped lone surrogate, as web-scraped JSONL has (it used to end the run with a
    # TypeError traceback from the tokenizer).
    (src / "docs.jsonl").write_text(json.dumps({"text": "Json doc one. It has two sentences."}) + "\n{broken\n"
                                    + '{"text": "Broken emoji \\ud83d here."}\n')
    return src, line


def _check_dirty_run(tmp_path, src, line, expected_long=None):
    out = str(tmp_path / "out")
    r = _cli("--input", str(src), "--vocab", embedded_vocab(), "--output-dir", out, "--seq-length", "64",
             "--valid-fraction", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    m = json.load(open(os.path.join(out, "manifest.json")))
    d = m["dropped"]
    assert d["invalid_utf8_lines"] == 1 and d["nul_bytes_removed"] == 1 and d["bad_json_lines"] == 1
    assert sorted(os.path.basename(p) for p in d["empty_files"]) == ["blank.txt", "empty.txt"]
    assert d["long_lines_cut"] == 1 and d["long_sentences_cut"] >= 1 and d["lone_surrogate_lines"] == 1
    # The 10 MB line is one document of > --max-document-bytes (1 MiB): ~10 pseudo-documents.
    assert d["long_documents_split"] == 1
    assert m["counts"]["documents"] == 5 + -(-len(line) // (1 << 20))
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data_prep.tokenizer import WordPieceTokenizer

    ds = IndexedDataset(os.path.join(out, "corpus"))
    assert int(ds.sequence_lengths.max()) <= 512
    # Directory walk is sorted: blank, bytes (3 docs), docs.jsonl (2), empty, long.txt.gz -> the last docs.
    di = ds.document_indices
    got = np.concatenate([ds[i] for i in range(di[5], di[-1])])
    # Nothing of the long line was lost or changed by the cuts.
    if expected_long is None:
        expected_long = WordPieceTokenizer(embedded_vocab()).encode_text(line)
    assert got.tolist() == expected_long
    assert "dropped/cleaned" in r.stdout and "long_lines_cut" in r.stdout
    # Each reason with its first cases, file:line, in the report.
    assert f'lone_surrogate_lines: 1\n      e.g. {src / "docs.jsonl"}:3: "Broken emoji \\ud83d here."' in r.stdout
    assert f'bad_json_lines: 1\n      e.g. {src / "docs.jsonl"}:2: "{{broken"' in r.stdout
    assert m["dropped_examples"]["invalid_utf8_lines"] == [
        {"file": str(src / "bytes.txt"), "line": 3, "excerpt": "Bad \ufffd\ufffd utf8. And a NUL\x00 byte."}]


def test_dirty_corpus_is_cleaned_and_counted(tmp_path):
    # 120-character words are one [UNK] each (BERT's 100-character word limit): a 10 MB line that
    # is cheap to tokenize, so the default run stays fast.
    words = [("w%d" % i).ljust(120, "x") for i in range(85_000)]
    from data_prep.tokenizer import WordPieceTokenizer

    expected = WordPieceTokenizer(embedded_vocab()).encode_text("Short intro sentence.") + [100] * len(words)
    _check_dirty_run(tmp_path, *_dirty_corpus(tmp_path, words), expected_long=expected)


@pytest.mark.slow
def test_dirty_corpus_with_a_10mb_line_of_real_words(tmp_path):
    # ~5.6M WordPiece tokens: ~100 s on a shared 2-core machine.
    words = [f"tok{i % 5000}" for i in range(1_300_000)]
    _check_dirty_run(tmp_path, *_dirty_corpus(tmp_path, words))


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs OpenMPI's mpirun")
def test_mpirun_two_ranks_byte_identical(tmp_path):
    """Four files under 2 MPI ranks x 2 workers, files of more than --part-bytes 16384 cut into
    parts at document boundaries (one file's parts on both ranks): the bytes of one process
    reading every file whole."""
    src = embedded_corpus_jsonl(str(tmp_path / "cache"), max_docs=300)
    lines = open(src).read().splitlines(keepends=True)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for j, (lo, hi) in enumerate([(0, 70), (70, 90), (90, 200), (200, 300)]):
        (corpus / f"part{j}.jsonl").write_text("".join(lines[lo:hi]))
    args = ["--input", str(corpus), "--vocab", embedded_vocab(), "--seq-length", "64", "--seq-length", "128",
            "--docs-per-shard", "40", "--valid-fraction", "0.05"]
    r1 = _cli(*args, "--output-dir", str(tmp_path / "one"), "--mpi", "off")
    assert r1.returncode == 0, r1.stderr[-3000:]
    split = [*args, "--output-dir", str(tmp_path / "two"), "--part-bytes", "16384", "--workers", "2", "--keep-work"]
    r2 = _cli(*split, mpi=2, timeout=240)
    if r2.returncode in (124, 137):
        # An mpirun start has been seen to hang here ("OPAL ERROR: Unreachable"): one retry.
        r2 = _cli(*split, mpi=2, timeout=240)
    assert r2.returncode == 0, (r2.stdout[-2000:], r2.stderr[-3000:])
    files = sorted(os.listdir(tmp_path / "one"))
    assert files == sorted(f for f in os.listdir(tmp_path / "two") if f != ".work")
    for f in files:
        assert filecmp.cmp(tmp_path / "one" / f, tmp_path / "two" / f, shallow=False), f
    # part2.jsonl (58 KB): 4 parts, read by both ranks.
    from data_prep.pipeline import file_work_dir

    fdir = file_work_dir(str(tmp_path / "two" / ".work"), str(corpus / "part2.jsonl"))
    ranks = [json.load(open(os.path.join(fdir, f)))["rank"] for f in sorted(os.listdir(fdir)) if f.startswith("part_")]
    assert len(ranks) == 4 and set(ranks) == {0, 1}


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs OpenMPI's mpirun")
def test_mpirun_error_stops_all_ranks(tmp_path):
    r = _cli("--input", str(tmp_path / "missing.txt"), "--vocab", embedded_vocab(), "--output-dir",
             str(tmp_path / "o"), mpi=2, timeout=120)
    assert r.returncode not in (0, 124, 137), r.returncode  # failed, and did not hang until the timeout
    assert "missing.txt: no such file" in r.stderr


def test_unwritable_output_dir_is_a_clean_error(tmp_path):
    ok = tmp_path / "ok.txt"
    ok.write_text("A sentence. Another one.\n")
    blocker = tmp_path / "some_file"
    blocker.write_text("")
    # A path under a regular file fails for root too (a chmod'ed directory would not).
    _assert_clean_error(_cli("--input", str(ok), "--vocab", embedded_vocab(), "--output-dir", str(blocker / "sub")),
                        "some_file/sub", "Not a directory")


def _small_text_corpus(tmp_path, n_docs=120):
    """The first documents of the embedded corpus as a .txt file (blank line between documents)."""
    with open(embedded_corpus_jsonl(str(tmp_path / "cache"), max_docs=n_docs), encoding="utf-8") as f:
        texts = [json.loads(l)["text"].strip() for l in f]
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(t for t in texts if t) + "\n", encoding="utf-8")
    return small


def test_trained_wordpiece_vocab_through_the_cli(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import BertTokenizerFast

    from data_prep.verify import verify

    small = _small_text_corpus(tmp_path)
    args = ["--input", str(small), "--train-wordpiece-vocab-size", "300", "--seq-length", "64"]
    r = _cli(*args, "--output-dir", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = str(tmp_path / "a")
    assert verify(out) == []
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["tokenizer"]["type"] == "wordpiece" and m["tokenizer"]["file"] == "vocab.txt"
    assert m["tokenizer"]["vocab_size"] == 300 and m["tokenizer"]["lower_case"] is True
    assert m["tokenizer"]["special_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert m["args"]["train_wordpiece_vocab_size"] == 300 and m["args"]["vocab"] is None
    with open(os.path.join(out, "vocab.txt"), encoding="utf-8") as f:
        words = f.read().splitlines()
    assert len(words) == 300 and words[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert any(w.startswith("##") for w in words)
    # The corpus holds exactly what transformers makes of every input line with that vocab.
    hf = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    lines = [ln.strip() for ln in small.read_text(encoding="utf-8").split("\n") if ln.strip()]
    expected = [i for ln in lines for i in hf(ln, add_special_tokens=False)["input_ids"]]
    ds = IndexedDataset(os.path.join(out, "corpus"))
    assert np.concatenate([ds[i] for i in range(len(ds))]).tolist() == expected
    # Another process (other hash seeds in the trainer), same bytes everywhere.
    r = _cli(*args, "--output-dir", str(tmp_path / "b"), "--workers", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert files == sorted(os.listdir(tmp_path / "b"))
    for f in files:
        assert filecmp.cmp(os.path.join(out, f), tmp_path / "b" / f, shallow=False), f


def test_tokenizer_source_errors_are_clean(tmp_path):
    small = _small_text_corpus(tmp_path, n_docs=3)
    out = str(tmp_path / "out")
    _assert_clean_error(_cli("--input", str(small), "--vocab", embedded_vocab(), "--train-wordpiece-vocab-size",
                             "300", "--output-dir", out),
                        "--vocab and --train-wordpiece-vocab-size exclude each other")
    _assert_clean_error(_cli("--embedded", "--cache-dir", str(tmp_path / "cache"), "--train-spm-vocab-size", "300",
                             "--train-wordpiece-vocab-size", "300", "--output-dir", out),
                        "--train-spm-vocab-size and --train-wordpiece-vocab-size exclude each other")
    _assert_clean_error(_cli("--input", str(small), "--train-wordpiece-vocab-size", "64", "--output-dir", out),
                        "--train-wordpiece-vocab-size 64: must be >= 128")
    # Three documents cannot fill 3000 entries: the error says how many they can.
    _assert_clean_error(_cli("--input", str(small), "--train-wordpiece-vocab-size", "3000", "--output-dir", out),
                        "--train-wordpiece-vocab-size 3000: the training text is too small: it yields only")
    assert not os.path.exists(os.path.join(out, "manifest.json"))
