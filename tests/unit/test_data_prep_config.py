"""PrepConfig validation and the resume fingerprint."""
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
    (dict(vocab=None, train_spm_vocab_size=100, spm_train_sentences=0), "--spm-train-sentences 0: must be >= 1"),
])
def test_out_of_range_arguments_are_rejected_up_front(kw, needle):
    with pytest.raises(DataPrepError, match=needle.replace("(", r"\(")):
        _cfg(**kw).validate()


def test_range_limits_are_accepted():
    for kw in (dict(seed=0), dict(seed=2**32 - 1), dict(dupe_factor=65535)):
        _cfg(**kw).validate()


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
