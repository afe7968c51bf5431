"""PrepConfig validation, the resume fingerprint, and the CLI's tokenizer flags."""
import os

import pytest

from data_prep.errors import DataPrepError
from data_prep.pipeline import PrepConfig, _prepare_work_dir


def _cfg(**kw):
    base = dict(inputs=["x.txt"], output_dir="out", vocab="vocab.txt")
    base.update(kw)
    return PrepConfig(**base)


@pytest.mark.parametrize("kw, needle", [
    (dict(seed=-1), "--seed -1: must be between 0 and"),
    (dict(seed=2**32), "--seed 4294967296"),
    (dict(dupe_factor=0), "--dupe-factor 0: must be between 1 and 65535"),
    (dict(dupe_factor=65536), "--dupe-factor 65536: must be between 1 and 65535"),
    (dict(vocab=None, train_spm_vocab_size=100, tokenizer_train_sentences=0),
     "--tokenizer-train-sentences 0: must be >= 1"),
    (dict(vocab=None, train_wordpiece_vocab_size=1000, tokenizer_train_sentences=0),
     "--tokenizer-train-sentences 0: must be >= 1"),
    (dict(vocab=None, train_wordpiece_vocab_size=100), "--train-wordpiece-vocab-size 100: must be >= 128"),
    (dict(vocab=None, train_wordpiece_vocab_size=-5), "--train-wordpiece-vocab-size -5: must be >= 128"),
    (dict(train_wordpiece_vocab_size=8192), "--vocab and --train-wordpiece-vocab-size exclude each other: give one"),
    (dict(vocab=None, train_spm_vocab_size=8000, train_wordpiece_vocab_size=8192),
     "--train-spm-vocab-size and --train-wordpiece-vocab-size exclude each other"),
    (dict(train_spm_vocab_size=8000, train_wordpiece_vocab_size=8192),
     "--vocab, --train-spm-vocab-size and --train-wordpiece-vocab-size exclude each other"),
    (dict(vocab=None), "--vocab: give a WordPiece vocab.txt"),
    (dict(shard_bytes=100), "--shard-bytes 100: must be >= 1024"),
    (dict(part_bytes=0), "--part-bytes 0: must be >= 1024"),
    (dict(max_document_bytes=-1), "--max-document-bytes -1: must be >= 0"),
])
def test_out_of_range_arguments_are_rejected_up_front(kw, needle):
    with pytest.raises(DataPrepError, match=needle.replace("(", r"\(")):
        _cfg(**kw).validate()


def test_range_limits_are_accepted():
    for kw in (dict(seed=0), dict(seed=2**32 - 1), dict(dupe_factor=65535),
               dict(vocab=None, train_wordpiece_vocab_size=128)):
        _cfg(**kw).validate()


@pytest.mark.parametrize("kw, lower", [
    (dict(), True), (dict(vocab="spm.model"), False), (dict(vocab=None, train_spm_vocab_size=100), False),
    (dict(vocab=None, train_wordpiece_vocab_size=8192), True),
    (dict(vocab=None, train_wordpiece_vocab_size=8192, lower_case=False), False),
])
def test_default_case_follows_the_tokenizer(kw, lower):
    cfg = _cfg(**kw)
    cfg.validate()
    assert cfg.lower_case is lower


def test_cli_tokenizer_flags(tmp_path):
    from data_prep.cli import build_parser, config_from_args
    from data_prep.embedded import embedded_vocab

    def cfg(*argv):
        return config_from_args(build_parser().parse_args(["--output-dir", str(tmp_path / "o"), *argv]))

    c = cfg("--input", "x.txt", "--train-wordpiece-vocab-size", "8192", "--tokenizer-train-sentences", "7")
    assert (c.vocab, c.train_wordpiece_vocab_size, c.tokenizer_train_sentences) == (None, 8192, 7)
    # The old spm-only spelling still works and sets the shared limit.
    c = cfg("--input", "x.txt", "--train-spm-vocab-size", "100", "--spm-train-sentences", "9")
    assert c.tokenizer_train_sentences == 9
    # --embedded: the bundled vocab, unless a vocab is to be trained on the embedded corpus.
    cache = str(tmp_path / "cache")
    assert cfg("--embedded", "--cache-dir", cache).vocab == embedded_vocab()
    c = cfg("--embedded", "--cache-dir", cache, "--train-wordpiece-vocab-size", "8192")
    assert c.vocab is None and c.train_wordpiece_vocab_size == 8192 and len(c.inputs) == 1


def test_seed_change_invalidates_a_trained_spm_model_but_not_vocab_shards(tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("a b c.\n")
    work = str(tmp_path / ".work")
    spm_cfg = _cfg(inputs=[str(inp)], vocab=None, train_spm_vocab_size=100, seed=1)
    spm_cfg.validate()
    assert _prepare_work_dir(spm_cfg, [str(inp)], work) is False
    open(os.path.join(work, "spm.model"), "w").close()  # as a crashed run leaves it
    assert _prepare_work_dir(spm_cfg, [str(inp)], work) is True
    spm_cfg.seed = 2  # _train_spm seeds training: the old model is not this run's model
    assert _prepare_work_dir(spm_cfg, [str(inp)], work) is False
    assert not os.path.exists(os.path.join(work, "spm.model"))

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n")
    wp = _cfg(inputs=[str(inp)], vocab=str(vocab), seed=1)
    wp.validate()
    assert _prepare_work_dir(wp, [str(inp)], work) is False
    wp.seed = 2  # shards do not depend on the seed: keep them
    assert _prepare_work_dir(wp, [str(inp)], work) is True


def test_wordpiece_training_params_invalidate_a_trained_vocab(tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("a b c.\n")
    work = str(tmp_path / ".work")
    trained = os.path.join(work, "vocab.txt")

    def prepare(**kw):
        cfg = _cfg(inputs=[str(inp)], vocab=None, **{"train_wordpiece_vocab_size": 1000, "seed": 1, **kw})
        cfg.validate()
        return _prepare_work_dir(cfg, [str(inp)], work)

    assert prepare() is False
    open(trained, "w").close()  # as a crashed run leaves it
    assert prepare() is True
    assert prepare(seed=2) is True  # WordPiece training is not seeded: keep the vocab and shards
    for change in (dict(train_wordpiece_vocab_size=2000), dict(tokenizer_train_sentences=10), dict(lower_case=False)):
        prepare()
        open(trained, "w").close()
        assert prepare(**change) is False, change
        assert not os.path.exists(trained)


def test_work_dir_is_kept_per_input_file(tmp_path):
    """A given vocab: editing, adding or removing a file drops only that file's shard directory.
    A vocab trained on the inputs depends on every file: any edit starts the work dir afresh."""
    from data_prep.pipeline import file_work_dir

    a, b, c = (tmp_path / n for n in ("a.txt", "b.txt", "c.txt"))
    for p in (a, b, c):
        p.write_text("a b c.\n")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n")
    work = str(tmp_path / ".work")
    cfg = _cfg(inputs=[str(a), str(b)], vocab=str(vocab))
    cfg.validate()
    assert _prepare_work_dir(cfg, [str(a), str(b)], work) is False
    keep = file_work_dir(work, str(a))
    open(os.path.join(keep, "part_000000.json"), "w").close()
    old_b = file_work_dir(work, str(b))
    b.write_text("a b c d.\n")
    assert _prepare_work_dir(cfg, [str(a), str(b), str(c)], work) is True
    assert os.path.exists(os.path.join(keep, "part_000000.json")) and not os.path.exists(old_b)
    assert os.path.isdir(file_work_dir(work, str(b))) and os.path.isdir(file_work_dir(work, str(c)))
    assert _prepare_work_dir(cfg, [str(a)], work) is True
    assert sorted(os.listdir(work)) == sorted(["fingerprint.json", os.path.basename(keep)])

    trained = _cfg(inputs=[str(a)], vocab=None, train_wordpiece_vocab_size=1000)
    trained.validate()
    assert _prepare_work_dir(trained, [str(a)], work) is False
    open(os.path.join(work, "vocab.txt"), "w").close()
    assert _prepare_work_dir(trained, [str(a)], work) is True
    a.write_text("x y z.\n")
    assert _prepare_work_dir(trained, [str(a)], work) is False
    assert not os.path.exists(os.path.join(work, "vocab.txt"))


def test_fingerprint_follows_code_versions_not_shard_sizes(tmp_path, monkeypatch):
    """Library versions and READER_VERSION start the work dir afresh; shard sizes do not (finished
    parts are kept whatever they are; see test_rerun_with_smaller_shard_bytes_after_a_kill)."""
    import data_prep.pipeline as pipeline
    from data_prep import readers

    inp = tmp_path / "a.txt"
    inp.write_text("a b c.\n")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n")
    work = str(tmp_path / ".work")

    def prepare(**kw):
        cfg = _cfg(inputs=[str(inp)], vocab=str(vocab), **kw)
        cfg.validate()
        return _prepare_work_dir(cfg, [str(inp)], work)

    assert prepare() is False
    assert prepare(shard_bytes=4096, docs_per_shard=7) is True
    assert prepare(part_bytes=4096) is False  # part boundaries move: every shard's (p, k) changes
    assert prepare(part_bytes=4096) is True
    monkeypatch.setattr(readers, "READER_VERSION", readers.READER_VERSION + 1)
    assert prepare(part_bytes=4096) is False
    real = pipeline.library_versions()
    monkeypatch.setattr(pipeline, "library_versions", lambda: {**real, "tokenizers": "0.0.0"})
    assert prepare(part_bytes=4096) is False
    assert prepare(part_bytes=4096) is True


def test_same_size_edit_with_restored_mtime_is_a_new_file(tmp_path):
    """cp -p / rsync -t / touch -r: same size, same mtime, other bytes; ctime (and, for a file
    replaced by a rename, the inode) still tell it apart."""
    import time

    from data_prep.pipeline import file_work_dir

    a = tmp_path / "a.txt"
    a.write_text("a b c.\n")
    st = os.stat(a)
    before = file_work_dir("w", str(a))
    assert file_work_dir("w", str(a)) == before  # stable while nothing changes
    time.sleep(0.05)  # past the clock tick that stamps ctime
    a.write_text("x y z.\n")
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(a).st_size == st.st_size and os.stat(a).st_mtime_ns == st.st_mtime_ns
    assert file_work_dir("w", str(a)) != before
    b = tmp_path / "b.txt"
    b.write_text("a b c.\n")
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    key_a = file_work_dir("w", str(a))
    os.replace(b, a)  # same path, size and mtime: another inode
    assert file_work_dir("w", str(a)) != key_a
