"""PretrainingDataset / PretrainingSampler / build_dataloader: layout, truncation, determinism.

References: the corpus read sentence by sentence through megatron-core's IndexedDataset, the pair
records through data_prep.pairs.PairIndex, google-research/bert's `truncate_seq_pair` loop
re-written here, and uninterrupted single-rank runs for the dp / worker / resume checks.
"""
import json
import math
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from data_prep.pairs import PAIR_DTYPE, PairIndex
from pretrain.data import (
    EpochPermutation,
    PretrainingBatch,
    PretrainingDataset,
    PretrainingSampler,
    build_dataloader,
    collate_pretraining,
    open_check_ids,
    truncation_counts,
)
from pretrain.masking import MaskingConfig
from tests.unit._pretrain_fixtures import build_synthetic_dataset, special_ids, synthetic_vocab

SPECIAL = special_ids(synthetic_vocab())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return build_synthetic_dataset(str(tmp_path_factory.mktemp("pretrain_data")))


@pytest.fixture(scope="module")
def ds(data_dir):
    return PretrainingDataset(data_dir, 128, seed=42)


def _reference_truncate(la, lb, max_tokens):
    """google-research/bert truncate_seq_pair, counting removals instead of popping tokens."""
    cut_a = cut_b = 0
    while (la - cut_a) + (lb - cut_b) > max_tokens:
        if la - cut_a > lb - cut_b:
            cut_a += 1
        else:
            cut_b += 1
    return cut_a, cut_b


def test_truncation_counts_match_reference_loop():
    grid = [(la, lb, m) for la in range(0, 40, 3) for lb in range(0, 40, 2) for m in (2, 5, 17, 30, 61)]
    la, lb, m = (np.array(x) for x in zip(*grid))
    for mt in np.unique(m):
        sel = m == mt
        cut_a, cut_b = truncation_counts(la[sel], lb[sel], int(mt))
        ref = [_reference_truncate(a, b, int(mt)) for a, b in zip(la[sel], lb[sel])]
        assert list(zip(cut_a.tolist(), cut_b.tolist())) == ref


def _corpus_run(ds, start, count):
    return np.concatenate([np.asarray(ds.corpus[int(s)], dtype=np.int64) for s in range(start, start + count)])


def test_layout_and_truncation_against_the_corpus(ds, data_dir):
    n = 3 * len(ds)  # three epochs
    batch = ds.get_batch(np.arange(n))
    pairs = PairIndex(os.path.join(data_dir, "pairs_128_train.bin")).pairs
    orig = np.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    fronts, cuts, cut_any = 0, 0, 0
    for i in range(n):
        rec = pairs[ds.epoch_order(i // len(ds))[i % len(ds)]]
        full_a = _corpus_run(ds, rec["a_start"], rec["a_count"])
        full_b = _corpus_run(ds, rec["b_start"], rec["b_count"])
        cut_a, cut_b = _reference_truncate(len(full_a), len(full_b), 128 - 3)
        la, lb = len(full_a) - cut_a, len(full_b) - cut_b
        length = la + lb + 3
        row = orig[i]
        assert length <= 128
        assert row[0] == SPECIAL["cls"] and row[la + 1] == SPECIAL["sep"] and row[length - 1] == SPECIAL["sep"]
        assert (row[length:] == SPECIAL["pad"]).all()
        np.testing.assert_array_equal(batch["attention_mask"][i], np.arange(128) < length)
        np.testing.assert_array_equal(batch["token_type_ids"][i], (np.arange(128) >= la + 2) & (np.arange(128) < length))
        assert (batch["labels"][i, length:] == -100).all()
        assert batch["next_sentence_label"][i] == rec["is_random"]
        # A and B are contiguous windows of the untruncated runs, cut at random ends.
        for full, kept, cut in ((full_a, row[1 : la + 1], cut_a), (full_b, row[la + 2 : length - 1], cut_b)):
            front = [f for f in range(cut + 1) if np.array_equal(full[f : f + len(kept)], kept)]
            assert front, f"sample {i}: segment is not a window of its sentence run"
            fronts += front[0]
            cuts += cut
            cut_any += cut > 0
    assert cut_any > 10, "the fixture must contain pairs longer than seq_length"
    # Each removed token comes off the front with probability 1/2.
    assert abs(fronts - cuts / 2) <= 4.5 * math.sqrt(cuts / 4)


def test_epoch_order_is_a_seeded_permutation(ds, data_dir):
    n = len(ds)
    o0, o1 = ds.epoch_order(0), ds.epoch_order(1)
    assert sorted(o0.tolist()) == list(range(n)) and sorted(o1.tolist()) == list(range(n))
    assert not np.array_equal(o0, o1)
    np.testing.assert_array_equal(PretrainingDataset(data_dir, 128, seed=42).epoch_order(1), o1)
    assert not np.array_equal(PretrainingDataset(data_dir, 128, seed=43).epoch_order(0), o0)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 64, 97, 1000, 1024, 65536, 65537, 131_071])
def test_epoch_permutation_is_a_bijection(n):
    """Every position maps to a distinct pair id in [0, n): primes, powers of 2, 1 and the rest."""
    for seed, epoch in ((1234, 0), (7, 3)):
        perm = EpochPermutation(n, seed, epoch)
        out = perm(np.arange(n))
        assert out.dtype == np.int64 and out.min() == 0 and out.max() == n - 1
        assert len(np.unique(out)) == n
        np.testing.assert_array_equal(perm(np.arange(n)[::-1]), out[::-1])  # a pure function of the position
    with pytest.raises(IndexError):
        EpochPermutation(n, 0, 0)([n])


def _chi2_independence(x, y, n, buckets=16):
    """Chi-square of the buckets x-by-y grid against independence (uniform margins): ~ buckets**2 - 1."""
    grid = np.zeros((buckets, buckets))
    np.add.at(grid, (x * buckets // n, y * buckets // n), 1)
    expected = np.outer(grid.sum(1), grid.sum(0)) / grid.sum()
    return float(((grid - expected) ** 2 / expected).sum())


def _looks_shuffled(p):
    """Position vs value, and each value vs the next, independent beyond chance; and no more
    neighbours in the input that stay neighbours in the output than a random permutation keeps
    (about 2 expected)."""
    n = len(p)
    dof = 255
    bound = dof + 6 * math.sqrt(2 * dof)
    neighbours = int((np.abs(np.diff(p)) == 1).sum())
    return (_chi2_independence(np.arange(n), p, n) < bound and _chi2_independence(p[:-1], p[1:], n) < bound
            and neighbours <= 12)


def test_epoch_permutation_is_shuffled():
    n = 100_003  # prime: the Feistel domain (4**9) is 2.6 n, so most positions cycle-walk
    # the statistic flags what is not shuffled: the identity, a reversal, an affine map mod n
    # (uniform per position, but each value is its predecessor + a), and blocks of 64 shuffled
    # whole (values and positions look independent, but neighbours stay neighbours)
    assert not _looks_shuffled(np.arange(n))
    assert not _looks_shuffled(np.arange(n)[::-1])
    assert not _looks_shuffled((np.arange(n) * 38_201 + 11) % n)
    blocks = n // 64
    assert not _looks_shuffled(np.random.default_rng(0).permutation(blocks).repeat(64) * 64 + np.tile(np.arange(64), blocks))
    orders = {}
    for seed, epoch in ((1234, 0), (1234, 1), (99, 0)):
        orders[seed, epoch] = EpochPermutation(n, seed, epoch)(np.arange(n))
        assert _looks_shuffled(orders[seed, epoch]), (seed, epoch)
    # epochs and seeds give unrelated orders: where epoch 1 puts the pair epoch 0 had at a position
    dof = 255
    for other in ((1234, 1), (99, 0)):
        assert _chi2_independence(orders[1234, 0], orders[other], n) < dof + 6 * math.sqrt(2 * dof)
    np.testing.assert_array_equal(EpochPermutation(n, 1234, 1)(np.arange(n)), orders[1234, 1])


def _sparse_pair_index(path, seq_length, count, valid_ids):
    """A pair index of `count` records (format in docs/interfaces.md, packed by hand) that takes no
    disk: all-zero records (an empty A run: invalid) except `valid_ids`, which hold a valid pair."""
    with open(path, "wb") as f:
        f.write(struct.pack("<8sIIQII", b"BERTNSP\x00", 1, seq_length, count, PAIR_DTYPE.itemsize, 0))
        f.truncate(32 + count * PAIR_DTYPE.itemsize)
        rec = np.zeros(1, dtype=PAIR_DTYPE)
        rec["a_start"], rec["a_count"], rec["b_start"], rec["b_count"] = 0, 1, 1, 1
        for i in valid_ids:
            f.seek(32 + int(i) * PAIR_DTYPE.itemsize)
            f.write(rec.tobytes())


def test_open_is_independent_of_the_pair_count(tmp_path):
    """A 50M-pair index opens without reading it whole (it is sparse: reading it would find the
    invalid records on open); a batch anywhere, e.g. a resume in epoch 3, evaluates the order at
    its own positions only and checks the records it reads."""
    d = tmp_path / "big"
    build_synthetic_dataset(str(d), n_docs=8, seq_lengths=(128,))
    n = 50_000_000
    spots = open_check_ids(n)
    assert len(spots) <= 4096
    _sparse_pair_index(d / "pairs_128_train.bin", 128, n, spots)
    ds = PretrainingDataset(str(d), 128, seed=5)
    assert len(ds) == n
    start = 3 * n + 12_345_678
    ids = ds._pair_ids(np.arange(start, start + 64))
    assert ((ids >= 0) & (ids < n)).all() and len(np.unique(ids)) == 64
    np.testing.assert_array_equal(ids, EpochPermutation(n, 5, 3)(np.arange(12_345_678, 12_345_678 + 64)))
    first_bad = int(ids[~np.isin(ids, spots)][0])
    with pytest.raises(ValueError, match=f"pair {first_bad} refers to sentences outside the corpus"):
        ds.get_batch(np.arange(start, start + 64))


def test_sample_does_not_depend_on_its_batch(ds):
    idx = np.array([5, 900, 3, 127, 128, 40000])
    whole = ds.get_batch(idx)
    shuffled = ds.get_batch(idx[::-1])
    for j, i in enumerate(idx):
        single = ds[int(i)]
        for k in single:
            np.testing.assert_array_equal(single[k], whole[k][j])
            np.testing.assert_array_equal(single[k], shuffled[k][len(idx) - 1 - j])
    clone = pickle.loads(pickle.dumps(ds))  # what a 'spawn' worker receives
    for k, v in clone.get_batch(idx).items():
        np.testing.assert_array_equal(v, whole[k])


def test_collate_gives_int64_tensors(ds):
    items = ds.__getitems__([1, 2, 3])
    assert isinstance(items, PretrainingBatch)
    fast = collate_pretraining(items)
    slow = collate_pretraining([ds[1], ds[2], ds[3]])
    default = torch.utils.data.default_collate(items)
    for k in fast:
        assert fast[k].dtype == torch.int64
        assert torch.equal(fast[k], slow[k]) and torch.equal(fast[k], default[k].long())
    assert fast["input_ids"].shape == (3, 128) and fast["next_sentence_label"].shape == (3,)


def _take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_workers_do_not_change_samples(ds):
    ref = _take(build_dataloader(ds, micro_batch_size=8, num_workers=0), 6)
    two = _take(build_dataloader(ds, micro_batch_size=8, num_workers=2), 6)
    _assert_same(ref, two)


def _interleave(rank_batches):
    """dp ranks' micro-batches -> the global micro-batch (global index g lives on rank g % dp)."""
    dp = len(rank_batches)
    out = {}
    for k in rank_batches[0]:
        shape = list(rank_batches[0][k].shape)
        shape[0] *= dp
        merged = torch.empty(shape, dtype=rank_batches[0][k].dtype)
        for r, b in enumerate(rank_batches):
            merged[r::dp] = b[k]
        out[k] = merged
    return out


def _global_steps(ds, dp, micro, steps, consumed=0):
    loaders = [build_dataloader(ds, micro, dp_rank=r, dp_size=dp, consumed_samples=consumed) for r in range(dp)]
    per_rank = [_take(ld, steps) for ld in loaders]
    return [_interleave([per_rank[r][s] for r in range(dp)]) for s in range(steps)], loaders


def test_dp_ranks_partition_the_global_order(ds):
    ref, _ = _global_steps(ds, dp=1, micro=8, steps=5)
    dp2, _ = _global_steps(ds, dp=2, micro=4, steps=5)
    _assert_same(ref, dp2)
    # each rank's samples are disjoint and together cover the global batch
    s0 = PretrainingSampler(None, 0, 2, 4)
    s1 = PretrainingSampler(None, 1, 2, 4)
    b0, b1 = next(iter(s0)), next(iter(s1))
    assert sorted(b0 + b1) == list(range(8)) and b0 == [0, 2, 4, 6]


def test_save_restore_continues_the_same_samples(ds):
    ref = _take(build_dataloader(ds, micro_batch_size=4, num_workers=0), 10)
    loader = build_dataloader(ds, micro_batch_size=4, num_workers=2)
    first = _take(loader, 4)  # workers have prefetched past batch 4
    state = json.loads(json.dumps(loader.state_dict()))
    assert state == {"consumed_samples": 16}
    resumed = build_dataloader(ds, micro_batch_size=4, num_workers=2)
    resumed.load_state_dict(state)
    _assert_same(ref, first + _take(resumed, 6))
    # a loader built from consumed_samples directly is the same
    _assert_same(ref[4:], _take(build_dataloader(ds, micro_batch_size=4, consumed_samples=16), 6))


def test_resume_at_another_dp_size_continues_the_global_order(ds):
    ref, _ = _global_steps(ds, dp=1, micro=8, steps=7)
    before, loaders = _global_steps(ds, dp=2, micro=4, steps=3)
    states = [ld.state_dict() for ld in loaders]
    assert all(s == {"consumed_samples": 24} for s in states)
    after_dp4, _ = _global_steps(ds, dp=4, micro=2, steps=4, consumed=states[0]["consumed_samples"])
    _assert_same(ref, before + after_dp4)


def test_sampler_bounds_len_and_state():
    s = PretrainingSampler(total_samples=50, dp_rank=1, dp_size=3, micro_batch_size=4, consumed_samples=12)
    assert len(s) == 3
    batches = list(s)
    assert batches == [[13, 16, 19, 22], [25, 28, 31, 34], [37, 40, 43, 46]]
    assert s.state_dict() == {"consumed_samples": 48}
    t = PretrainingSampler(total_samples=50, dp_rank=1, dp_size=3, micro_batch_size=4)
    t.load_state_dict({"consumed_samples": 24})
    assert list(t) == batches[1:]
    for kwargs, msg in (({"dp_rank": 2, "dp_size": 2}, "dp_rank"), ({"micro_batch_size": 0}, "micro_batch_size"),
                        ({"consumed_samples": -1}, "consumed_samples")):
        with pytest.raises(ValueError, match=msg):
            PretrainingSampler(None, **kwargs)


def test_whole_word_and_other_seq_length_build(data_dir):
    ds64 = PretrainingDataset(data_dir, 64, split="valid", masking=MaskingConfig(whole_word=True), seed=1)
    b = ds64.get_batch(np.arange(3 * len(ds64)))
    assert b["input_ids"].shape == (3 * len(ds64), 64)
    assert (b["attention_mask"].sum(1) <= 64).all()


def test_user_errors_name_the_file_and_the_fix(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        PretrainingDataset(str(tmp_path), 128)
    with pytest.raises(ValueError, match=r"seq_length 256 \(available: \['64', '128'\]\)"):
        PretrainingDataset(data_dir, 256)
    with pytest.raises(ValueError, match="no 'test' split"):
        PretrainingDataset(data_dir, 128, split="test")
    with pytest.raises(ValueError, match="mlm_probability"):
        PretrainingDataset(data_dir, 128, masking=MaskingConfig(mlm_probability=2.0))
    # a pair index that does not belong to the corpus
    bad = tmp_path / "bad"
    build_synthetic_dataset(str(bad), n_docs=8, seq_lengths=(128,))
    other = tmp_path / "other"
    build_synthetic_dataset(str(other), n_docs=60, seq_lengths=(128,), seed=5)
    os.replace(other / "pairs_128_train.bin", bad / "pairs_128_train.bin")
    with pytest.raises(ValueError, match="does not belong to this corpus"):
        PretrainingDataset(str(bad), 128)
    # a .bin that does not end where the index says the last sentence ends (a truncated copy,
    # a corpus appended to after indexing): caught by the O(1) check on open
    torn = tmp_path / "torn"
    build_synthetic_dataset(str(torn), n_docs=8, seq_lengths=(128,))
    PretrainingDataset(str(torn), 128)
    with open(torn / "corpus.bin", "r+b") as fh:
        fh.truncate(os.path.getsize(torn / "corpus.bin") - 4)
    with pytest.raises(ValueError, match=r"corpus\.idx: sentences are not stored back to back"):
        PretrainingDataset(str(torn), 128)


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    """A real data_prep output: embedded Wikipedia text, bert-base-uncased vocab (~12 s)."""
    testing = pytest.importorskip("data_prep.testing")
    return testing.build_tiny_dataset(str(tmp_path_factory.mktemp("real") / "out"), seq_lengths=(128,), n_docs=50)


def test_real_data_prep_output_with_the_bert_vocab(real_dir):
    with open(os.path.join(real_dir, "vocab.txt"), encoding="utf-8") as f:
        vocab = [line.rstrip("\n") for line in f]
    bracketed = np.array([t.startswith("[") and t.endswith("]") for t in vocab])
    assert bracketed.sum() > 990  # [PAD], [unused0..993], [UNK], [CLS], [SEP], [MASK]
    ds = PretrainingDataset(real_dir, 128, masking=MaskingConfig(whole_word=True), seed=3)
    assert not bracketed[ds.tables.replacement_ids].any()
    assert len(ds.tables.replacement_ids) == len(vocab) - bracketed.sum()
    pairs = ds.pair_index.pairs
    batch = ds.get_batch(np.arange(4 * len(ds)))
    orig = np.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    masked = batch["labels"] != -100
    assert not (masked & bracketed[orig]).any()
    for i in range(len(orig)):
        rec = pairs[ds.epoch_order(i // len(ds))[i % len(ds)]]
        full_a = _corpus_run(ds, rec["a_start"], rec["a_count"])
        la = int(np.flatnonzero(orig[i] == vocab.index("[SEP]"))[0]) - 1
        kept = orig[i, 1 : la + 1]
        assert any(np.array_equal(full_a[f : f + la], kept) for f in range(len(full_a) - la + 1))
        # whole words: a masked '##' piece has its word's previous piece masked too
        cont = np.array([vocab[t].startswith("##") for t in orig[i]])
        for c in np.flatnonzero(cont[2:]) + 2:
            if orig[i, c - 1] not in (vocab.index("[SEP]"), vocab.index("[CLS]")):
                assert masked[i, c] == masked[i, c - 1], f"sample {i}: {vocab[orig[i, c - 1]]} {vocab[orig[i, c]]}"


def test_real_sentencepiece_output(tmp_path):
    """SentencePiece corpus: specials from the model (control/unknown pieces), words from '▁'."""
    testing = pytest.importorskip("data_prep.testing")
    spm = pytest.importorskip("sentencepiece")
    out = testing.build_tiny_dataset(str(tmp_path / "spm"), seq_lengths=(128,), n_docs=50, train_spm_vocab_size=600)
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
        tok = json.load(f)["tokenizer"]
    assert tok["type"] == "sentencepiece"
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, tok["file"]))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    special = np.array([p.startswith("[") and p.endswith("]") or sp.is_unknown(i) or sp.is_control(i)
                        for i, p in enumerate(pieces)])
    ds = PretrainingDataset(out, 128, masking=MaskingConfig(whole_word=True), seed=9)
    assert not special[ds.tables.replacement_ids].any()
    batch = ds.get_batch(np.arange(3 * len(ds)))
    orig = np.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    masked = batch["labels"] != -100
    assert masked.sum() > 0 and not (masked & special[orig]).any()
    masked_continuations = 0
    for i in range(len(orig)):
        for c in range(2, int(batch["attention_mask"][i].sum()) - 1):
            inside = not special[orig[i, c]] and not special[orig[i, c - 1]]
            if inside and not pieces[orig[i, c]].startswith("\u2581"):
                assert masked[i, c] == masked[i, c - 1], f"sample {i}: word split at {c}"
                masked_continuations += bool(masked[i, c])
    assert masked_continuations > 20, "multi-piece words must occur and be masked whole"
