"""Dynamic masking statistics against the original BERT rules, over > 100,000 real sample tokens.

References are computed here independently of pretrain/masking.py: special tokens from the vocab
strings (bracketed entries), words from the `##` prefix, the masked count from Python's `round`,
and binomial confidence intervals for the 80/10/10 split.
"""
import math
import re

import numpy as np
import pytest

from pretrain.data import PretrainingDataset
from pretrain.masking import (
    MaskingConfig,
    TokenTables,
    apply_masking,
    binomial_half,
    corpus_token_counts,
    frequency_weights,
    mix64,
    sample_keys,
)
from tests.unit._pretrain_fixtures import build_synthetic_dataset, synthetic_vocab

Z = 4.5  # two-sided binomial bound; a correct implementation fails with probability ~7e-6
N_SAMPLES = 2048


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return build_synthetic_dataset(str(tmp_path_factory.mktemp("masking_data")))


@pytest.fixture(scope="module")
def vocab_tables():
    vocab = synthetic_vocab()
    special = np.array([bool(re.fullmatch(r"\[[^\]]+\]", t)) for t in vocab])
    continuation = np.array([t.startswith("##") for t in vocab])
    return vocab, special, continuation


def _originals(batch):
    """Unmasked tokens: the label where one exists, else the input."""
    return np.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])


def _text_positions(batch):
    """A and B positions (not [CLS], [SEP] or padding), from segment structure alone."""
    tt, am = batch["token_type_ids"], batch["attention_mask"]
    s = tt.shape[1]
    length = am.sum(1)
    col = np.arange(s)[None, :]
    first_b = np.where(tt.any(1), tt.argmax(1), length)  # first position with segment 1
    sep1 = first_b - 1
    return (col >= 1) & (col < length[:, None] - 1) & (col != sep1[:, None])


def _binom_ok(count, n, p):
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    return abs(count - mean) <= Z * sd + 1e-9, (count, mean, sd)


def test_mask_rate_split_and_specials(data_dir, vocab_tables):
    vocab, special, _ = vocab_tables
    ds = PretrainingDataset(data_dir, 128, masking=MaskingConfig(), seed=7)
    batch = ds.get_batch(np.arange(N_SAMPLES))
    orig, inp, labels = _originals(batch), batch["input_ids"], batch["labels"]
    text = _text_positions(batch)
    candidates = text & ~special[orig]
    n_cand = candidates.sum(1)
    assert n_cand.sum() >= 100_000, "the statistics need >= 100,000 candidate tokens"

    # Count per sequence: exactly min(max_pred, max(1, round(0.15 n))) with Python's round.
    masked = labels != -100
    expected = np.array([min(n, max(1, round(n * 0.15))) if n else 0 for n in n_cand])
    np.testing.assert_array_equal(masked.sum(1), expected)
    assert abs(masked.sum() / n_cand.sum() - 0.15) < 0.01

    # Special tokens (and [CLS]/[SEP]/padding) are never chosen; labels hold the original id.
    assert not (masked & ~candidates).any()
    np.testing.assert_array_equal(labels[masked], orig[masked])

    # 80 / 10 / 10. A random draw can return the original token: that is 'unchanged' in the data,
    # so the expected shares are corrected by 1 / (number of allowed replacement ids).
    allowed = np.flatnonzero(~special)
    mask_id = vocab.index("[MASK]")
    m = int(masked.sum())
    became_mask = masked & (inp == mask_id)
    became_other = masked & (inp != mask_id) & (inp != labels)
    unchanged = masked & (inp == labels)
    q = 1.0 / len(allowed)
    for count, p in ((became_mask.sum(), 0.8), (became_other.sum(), 0.1 * (1 - q)), (unchanged.sum(), 0.1 + 0.1 * q)):
        ok, info = _binom_ok(int(count), m, p)
        assert ok, f"split share off: count, expected mean, sd = {info}"

    # Random replacements are never special, and cover the allowed vocabulary.
    replaced = inp[became_other]
    assert not special[replaced].any()
    assert len(np.unique(replaced)) > 0.8 * len(allowed)
    # Nothing special appears in the input except where it was in the text or is [MASK].
    assert not (special[inp] & (inp != orig) & (inp != mask_id)).any()
    # Non-masked positions are untouched.
    np.testing.assert_array_equal(inp[~masked], orig[~masked])


def test_selection_is_uniform_over_positions(data_dir, vocab_tables):
    """Masked share per decile of each sequence's candidate list stays 0.15 (no positional bias)."""
    _, special, _ = vocab_tables
    ds = PretrainingDataset(data_dir, 128, seed=3)
    batch = ds.get_batch(np.arange(N_SAMPLES))
    orig = _originals(batch)
    candidates = _text_positions(batch) & ~special[orig]
    rank = np.cumsum(candidates, 1) - 1
    decile = np.where(candidates, (10 * rank) // np.maximum(candidates.sum(1, keepdims=True), 1), -1)
    masked = batch["labels"] != -100
    rate = masked.sum() / candidates.sum()
    for d in range(10):
        in_d = decile == d
        ok, info = _binom_ok(int((masked & in_d).sum()), int(in_d.sum()), rate)
        assert ok, f"decile {d}: {info}"


def test_configurable_rate_split_and_max_predictions(data_dir, vocab_tables):
    vocab, special, _ = vocab_tables
    cfg = MaskingConfig(mlm_probability=0.3, mask_token_probability=0.5, random_token_probability=0.5,
                        max_predictions=12)
    ds = PretrainingDataset(data_dir, 128, masking=cfg, seed=11)
    batch = ds.get_batch(np.arange(512))
    orig = _originals(batch)
    n_cand = (_text_positions(batch) & ~special[orig]).sum(1)
    masked = batch["labels"] != -100
    np.testing.assert_array_equal(masked.sum(1), [min(12, n, max(1, round(0.3 * n))) if n else 0 for n in n_cand])
    # keep share 0: every masked token is [MASK] or a (possibly equal) random token
    became_mask = (masked & (batch["input_ids"] == vocab.index("[MASK]"))).sum()
    ok, info = _binom_ok(int(became_mask), int(masked.sum()), 0.5)
    assert ok, info


def test_whole_word_masking_masks_complete_words(data_dir, vocab_tables):
    _, special, continuation = vocab_tables
    ds = PretrainingDataset(data_dir, 128, masking=MaskingConfig(whole_word=True), seed=5)
    batch = ds.get_batch(np.arange(1024))
    orig = _originals(batch)
    candidates = _text_positions(batch) & ~special[orig]
    masked = batch["labels"] != -100
    assert not (masked & ~candidates).any()
    n_words_checked = 0
    for r in range(len(orig)):
        words, current = [], None
        for c in np.flatnonzero(candidates[r]):
            if current is not None and continuation[orig[r, c]] and c == current[-1] + 1:
                current.append(c)
            else:
                current = [c]
                words.append(current)
        for w in words:
            states = masked[r, w]
            assert states.all() or not states.any(), f"sample {r}: word at {w} partly masked"
            n_words_checked += len(w) > 1 and states.all()
        n = int(candidates[r].sum())
        k = min(n, max(1, round(0.15 * n)))
        longest = max(len(w) for w in words)
        # greedy over shuffled words, skipping words that do not fit: within (longest - 1) of k
        assert k - (longest - 1) <= masked[r].sum() <= k
    assert n_words_checked > 100, "the fixture must contain multi-piece words that get masked"
    assert abs(masked.sum() / candidates.sum() - 0.15) < 0.02


def test_masking_changes_between_epochs_and_seeds(data_dir):
    ds = PretrainingDataset(data_dir, 128, seed=1)
    n = len(ds)
    order0, order1 = ds.epoch_order(0), ds.epoch_order(1)
    # indices in epoch 0 and epoch 1 that read the same pair
    pos1 = np.empty(n, dtype=np.int64)
    pos1[order1] = np.arange(n)
    i0 = np.arange(n)
    i1 = n + pos1[order0]
    b0, b1 = ds.get_batch(i0), ds.get_batch(i1)
    short = b0["attention_mask"].sum(1) < 125  # untruncated pairs: same text both epochs
    np.testing.assert_array_equal(_originals(b0)[short], _originals(b1)[short])
    differ = ((b0["labels"] != -100) != (b1["labels"] != -100)).any(1)[short]
    assert differ.mean() > 0.9, "dynamic masking: an epoch must re-mask the same pair"
    other_seed = PretrainingDataset(data_dir, 128, seed=2).get_batch(i0)
    assert not np.array_equal(other_seed["labels"], b0["labels"])


def _two_token_tables(count_a: int, count_b: int, power: float) -> TokenTables:
    """Vocabulary [PAD] [CLS] [SEP] [MASK] a b; a and b seen count_a / count_b times."""
    counts = np.array([0, 0, 0, 0, count_a, count_b])
    return TokenTables(
        is_special=np.array([True] * 4 + [False] * 2), is_continuation=np.zeros(6, dtype=bool),
        replacement_ids=np.array([4, 5]), pad_id=0, cls_id=1, sep_id=2, mask_id=3,
        select_weights=frequency_weights(counts, power),
    )


@pytest.mark.parametrize("row, rate, p_b", [
    # k = 1 of {a, b}: b is drawn first with probability w_b / (w_a + w_b) = 1 / 1.1
    ([4, 5], 0.5, 1 / 1.1),
    # k = 1 of {a, a, b}: 1 / 1.2
    ([4, 4, 5], 0.34, 1 / 1.2),
    # k = 2 of {a, a, b}: b is left out only if both a's come first: (0.2 / 1.2) * (0.1 / 1.1)
    ([4, 4, 5], 0.67, 1 - (0.2 / 1.2) * (0.1 / 1.1)),
])
def test_frequency_weighted_selection_draws_by_weight_without_replacement(row, rate, p_b):
    """count(a) = 99, count(b) = 0, power 0.5: weights 100 ** -0.5 = 0.1 and 1 ** -0.5 = 1."""
    n = 20000
    tables = _two_token_tables(99, 0, 0.5)
    cfg = MaskingConfig(mlm_probability=rate, frequency_power=0.5, mask_token_probability=1.0,
                        random_token_probability=0.0)
    ids = np.tile(np.array([1, *row, 2]), (n, 1))
    text = np.zeros(ids.shape, dtype=bool)
    text[:, 1:-1] = True
    labels = apply_masking(ids.copy(), text, sample_keys(3, np.arange(n)), tables, cfg)
    k = round(len(row) * rate)
    np.testing.assert_array_equal((labels != -100).sum(1), k)  # the count is the rate's, as uniform
    assert not (labels[:, [0, -1]] != -100).any()
    # (power 0 would draw b with 1/2, 1/3, 2/3: each case is > 0.15 away, far outside the bound)
    ok, info = _binom_ok(int((labels == 5).any(1).sum()), n, p_b)
    assert ok, info


def test_frequency_weighted_masking_on_a_corpus(data_dir, vocab_tables):
    _, special, _ = vocab_tables
    cfg = MaskingConfig(mlm_probability=0.4, frequency_power=0.5)
    ds = PretrainingDataset(data_dir, 128, masking=cfg, seed=7)
    counts = np.bincount(ds.tokens.astype(np.int64), minlength=ds.tables.vocab_size)
    np.testing.assert_allclose(ds.tables.select_weights, (counts + 1.0) ** -0.5)
    batch = ds.get_batch(np.arange(512))
    orig = _originals(batch)
    candidates = _text_positions(batch) & ~special[orig]
    masked = batch["labels"] != -100
    n = candidates.sum(1)
    np.testing.assert_array_equal(masked.sum(1), [min(k, max(1, round(0.4 * k))) if k else 0 for k in n])
    assert not (masked & ~candidates).any()
    # Rarer tokens are predicted more often than their share of the text, frequent ones less
    # (the fixture's counts span 19..207); uniform masking predicts both halves at one rate.
    rare = counts < np.median(counts[counts > 0])

    def rate_ratio(b):
        o, m = _originals(b), b["labels"] != -100
        c = _text_positions(b) & ~special[o]
        return (m & rare[o]).sum() / (c & rare[o]).sum() / ((m & ~rare[o]).sum() / (c & ~rare[o]).sum())

    uniform = PretrainingDataset(data_dir, 128, masking=MaskingConfig(mlm_probability=0.4), seed=7)
    assert 0.95 < rate_ratio(uniform.get_batch(np.arange(512))) < 1.05
    assert rate_ratio(batch) > 1.1  # 1.18 here: 40% of a row drawn without replacement damps the weights
    # a loader worker gets the weights with the dataset (a spawned one does not count the corpus again)
    import pickle

    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone.tables.select_weights, ds.tables.select_weights)
    np.testing.assert_array_equal(clone.get_batch(np.arange(8))["labels"], batch["labels"][:8])
    # a sample's masking does not depend on the batch it is in
    pick = np.array([5, 300, 9])
    alone = ds.get_batch(pick)
    np.testing.assert_array_equal(alone["labels"], batch["labels"][pick])
    np.testing.assert_array_equal(alone["input_ids"], batch["input_ids"][pick])


def test_corpus_token_counts_reads_a_bounded_sample():
    tokens = np.arange(100_000, dtype=np.int32) % 7
    np.testing.assert_array_equal(corpus_token_counts(tokens, 8), np.bincount(tokens, minlength=8))
    # Past max_tokens: 10 slices of 700 spread evenly over the corpus, scaled to corpus units.
    # Ten blocks of 10,000 equal ids: a slice at the wrong place (all at the start, all at the
    # end) misses whole blocks.
    blocks = np.repeat(np.arange(10, dtype=np.uint16), 10_000)
    sampled = corpus_token_counts(blocks, 11, max_tokens=7_000, chunks=10)
    starts = np.linspace(0, 100_000 - 700, 10).astype(np.int64)
    reference = np.bincount(np.concatenate([blocks[s:s + 700] for s in starts]), minlength=11) * (100_000 / 7_000)
    np.testing.assert_allclose(sampled, reference)
    assert sampled.sum() == pytest.approx(100_000) and (sampled[:10] > 0).all() and sampled[10] == 0
    with pytest.raises(ValueError, match="max_tokens 5 < chunks 10"):
        corpus_token_counts(blocks, 11, max_tokens=5, chunks=10)


def test_equal_weights_choose_what_uniform_masking_chooses(data_dir):
    """The weighted race reads the same random bits as the uniform draw: equal weights, same tokens."""
    uniform = PretrainingDataset(data_dir, 128, masking=MaskingConfig(mlm_probability=0.4), seed=4)
    weighted = PretrainingDataset(data_dir, 128, masking=MaskingConfig(mlm_probability=0.4, frequency_power=0.5),
                                  seed=4)
    weighted.tables.select_weights = np.ones(weighted.tables.vocab_size)
    a, b = uniform.get_batch(np.arange(256)), weighted.get_batch(np.arange(256))
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_masking_config_errors():
    with pytest.raises(ValueError, match="mlm_probability"):
        MaskingConfig(mlm_probability=1.5).validate()
    with pytest.raises(ValueError, match="exceeds 1"):
        MaskingConfig(mask_token_probability=0.8, random_token_probability=0.3).validate()
    with pytest.raises(ValueError, match="max_predictions"):
        MaskingConfig(max_predictions=0).validate()
    with pytest.raises(ValueError, match="frequency_power"):
        MaskingConfig(frequency_power=-0.5).validate()
    with pytest.raises(ValueError, match="use one of them"):
        MaskingConfig(frequency_power=0.5, whole_word=True).validate()


def test_random_bit_helpers():
    # SplitMix64 reference values for state 0: the first outputs of the published generator.
    z = np.array([0], dtype=np.uint64)
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        out = [int(mix64(z + golden * np.uint64(k))[0]) for k in (1, 2)]
    assert out == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    # Binomial(n, 1/2) by popcount: mean n/2 and variance n/4, also for n > 64.
    keys = mix64(np.arange(20000, dtype=np.uint64))
    for n in (1, 5, 64, 65, 300):
        draws = binomial_half(keys, 9, np.full(len(keys), n))
        assert draws.min() >= 0 and draws.max() <= n
        assert abs(draws.mean() - n / 2) < Z * math.sqrt(n / 4 / len(keys))
        assert abs(draws.var() / (n / 4) - 1) < 0.06
