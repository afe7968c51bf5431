"""Dynamic BERT masking, vectorised over a batch and deterministic per sample.

Every random draw comes from a counter-based hash of (seed, global sample index, purpose,
position) rather than from a stateful generator. That is what makes a sample independent of how
samples are batched, which worker builds it, how many data-parallel ranks there are and whether
the run was resumed: the same (seed, i) always hashes to the same bits, whatever else is in the
batch. It is also what makes the loader fast: one numpy pass over a [B, S] array instead of a
Python-level generator per sample.

Rules (original BERT, google-research/bert `create_masked_lm_predictions`):
- candidates are the non-special tokens of the text (never [CLS], [SEP], [PAD], [MASK], [UNK] or
  any other bracketed special of the vocabulary);
- `k = min(max_predictions, max(1, round(n * mlm_probability)))` of the `n` candidates are chosen
  (`round` is half-to-even, as Python's `round` that the original used);
- of those, `mask_token_probability` become [MASK], `random_token_probability` a random
  non-special token, the rest stay unchanged (labels hold the original id either way);
- whole-word masking chooses words (a WordPiece token and its `##` continuations, or a
  SentencePiece `▁`-word) in random order and takes a word only if it fits in the remaining
  budget, so a word is masked completely or not at all.
- frequency-weighted selection (`frequency_power` p > 0; not in the original BERT) still predicts
  exactly `k` tokens per sequence, but draws them without replacement with weight
  `(count(token) + 1) ** -p` (counts over the corpus), so frequent tokens ("the", ",", "of") are
  predicted less often and content words more, as word2vec's subsampling of frequent words does
  (cf. "Weighted Sampling for Masked Language Modeling", Zhang et al. 2023). The draw is the
  exponential race of Efraimidis & Spirakis: the k smallest `-log(1 - u) / w`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from data_prep.manifest import TokenizerInfo
from data_prep.tokenizer import read_vocab
from pretrain.layers import IGNORE_INDEX  # HF convention for "no MLM label here"

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)
_ALL_ONES = _U64(0xFFFFFFFFFFFFFFFF)

# Purposes keep the streams of one sample apart (different salts -> unrelated bits).
PURPOSE_EPOCH_ORDER = 1
PURPOSE_TRUNCATE_A = 2
PURPOSE_TRUNCATE_B = 3
PURPOSE_SELECT = 4
PURPOSE_DECIDE = 5
PURPOSE_RANDOM_TOKEN = 6
_SALTS: dict[int, np.ndarray] = {}


@dataclass
class MaskingConfig:
    """How tokens are chosen and replaced for the MLM objective (defaults: original BERT)."""

    mlm_probability: float = 0.15
    """Fraction of the candidate (non-special) tokens to predict."""
    mask_token_probability: float = 0.8
    """Of the predicted tokens, the fraction replaced by [MASK]."""
    random_token_probability: float = 0.1
    """Of the predicted tokens, the fraction replaced by a random non-special token."""
    max_predictions: Optional[int] = None
    """Upper bound on predicted tokens per sequence (original BERT: 20 at seq 128, 80 at 512);
    None = no bound beyond the rate."""
    whole_word: bool = False
    """Mask whole words (WordPiece `##` continuations go with their word)."""
    frequency_power: float = 0.0
    """Choose the predicted tokens with weight (count + 1) ** -frequency_power (0 = uniform, BERT)."""

    def validate(self) -> None:
        for name in ("mlm_probability", "mask_token_probability", "random_token_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"MaskingConfig.{name} = {value}: must be within [0, 1]")
        if self.mlm_probability == 0.0:
            raise ValueError("MaskingConfig.mlm_probability = 0: nothing would be predicted; use e.g. 0.15")
        if self.mask_token_probability + self.random_token_probability > 1.0 + 1e-12:
            raise ValueError(
                f"MaskingConfig: mask_token_probability ({self.mask_token_probability}) + "
                f"random_token_probability ({self.random_token_probability}) exceeds 1; the rest is "
                "the 'keep unchanged' share, so their sum must be <= 1 (BERT: 0.8 + 0.1)"
            )
        if self.max_predictions is not None and self.max_predictions < 1:
            raise ValueError(f"MaskingConfig.max_predictions = {self.max_predictions}: must be >= 1 or None")
        if not 0.0 <= self.frequency_power <= 4.0:
            raise ValueError(f"MaskingConfig.frequency_power = {self.frequency_power}: must be within [0, 4] "
                             "(0 = uniform as BERT, 0.5 = word2vec-like weighting of rare tokens)")
        if self.frequency_power and self.whole_word:
            raise ValueError("frequency-weighted masking chooses tokens, whole-word masking chooses words: "
                             "use one of them (frequency_power 0, or whole_word False)")


# ---------------------------------------------------------------------------------------------
# Counter-based random bits (SplitMix64 finaliser): pure functions of their inputs.


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (returns a new array; wraps modulo 2**64).

    Always on arrays (ndmin=1): numpy wraps uint64 array arithmetic silently, while the same
    operation on a scalar warns about overflow.
    """
    z = np.array(z, dtype=_U64, copy=True, ndmin=1)
    z ^= z >> _U64(30)
    z *= _MIX1
    z ^= z >> _U64(27)
    z *= _MIX2
    z ^= z >> _U64(31)
    return z


def sample_keys(seed: int, indices: np.ndarray) -> np.ndarray:
    """One 64-bit key per global sample index: all randomness of sample i derives from it."""
    base = mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=_U64))
    return mix64(base + np.array(indices, dtype=_U64, ndmin=1) * _GOLDEN)


def random_bits(keys: np.ndarray, purpose: int, counters: np.ndarray) -> np.ndarray:
    """uint64 bits for (key, purpose, counter); `counters` broadcasts against `keys`."""
    salt = _SALTS.get(purpose)
    if salt is None:
        salt = _SALTS[purpose] = mix64(np.array([purpose], dtype=_U64))
    salted = mix64(np.asarray(keys, dtype=_U64) ^ salt)
    return mix64(salted + (np.array(counters, dtype=_U64, ndmin=1) + _U64(1)) * _GOLDEN)


def to_unit_float(bits: np.ndarray) -> np.ndarray:
    """Uniform float64 in [0, 1) from the top 53 bits."""
    return (bits >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))


def binomial_half(keys: np.ndarray, purpose: int, trials: np.ndarray) -> np.ndarray:
    """Binomial(trials, 1/2) per key as the popcount of `trials` random bits (exact, any size)."""
    trials = np.asarray(trials, dtype=np.int64)
    if trials.size == 0 or trials.max() <= 0:
        return np.zeros(trials.shape, dtype=np.int64)
    words = int((trials.max() + 63) // 64)
    bits = random_bits(keys[:, None], purpose, np.arange(words, dtype=_U64)[None, :])
    nbits = np.clip(trials[:, None] - 64 * np.arange(words)[None, :], 0, 64).astype(_U64)
    # (1 << 64) is undefined in numpy: full words take the all-ones mask explicitly.
    masks = np.where(nbits >= _U64(64), _ALL_ONES, (_U64(1) << np.minimum(nbits, _U64(63))) - _U64(1))
    return np.bitwise_count(bits & masks).sum(axis=1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Token tables (precomputed once per dataset; masking is then pure array lookups).

_BRACKETED = re.compile(r"^\[[^\[\]\s]+\]$")


@dataclass
class TokenTables:
    """Lookup tables over the vocabulary, built from the manifest's tokenizer section."""

    is_special: np.ndarray  # bool [V]: never a masking candidate, never a random replacement
    is_continuation: np.ndarray  # bool [V]: piece that continues the previous word (WWM)
    replacement_ids: np.ndarray  # int64: the ids a "random token" is drawn from
    pad_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    select_weights: Optional[np.ndarray] = None  # float64 [V], frequency-weighted selection only

    @property
    def vocab_size(self) -> int:
        return len(self.is_special)


def _wordpiece_tables(vocab_path: str, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = read_vocab(vocab_path, require_bert_specials=False)
    is_special = np.ones(vocab_size, dtype=bool)  # ids past the file (padded vocab) stay unused
    is_cont = np.zeros(vocab_size, dtype=bool)
    for i, tok in enumerate(tokens[:vocab_size]):
        is_special[i] = bool(_BRACKETED.match(tok))
        is_cont[i] = tok.startswith("##") and len(tok) > 2
    return is_special, is_cont


def _sentencepiece_tables(model_path: str, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    import sentencepiece as spm  # only needed for SentencePiece corpora

    sp = spm.SentencePieceProcessor(model_file=model_path)
    is_special = np.ones(vocab_size, dtype=bool)
    is_cont = np.zeros(vocab_size, dtype=bool)
    for i in range(min(vocab_size, sp.get_piece_size())):
        is_special[i] = sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)
        is_cont[i] = not sp.id_to_piece(i).startswith("\u2581")
    return is_special, is_cont


def build_token_tables(tokenizer: TokenizerInfo, base_dir: str, source: str = "manifest.json") -> TokenTables:
    """Tables from the manifest's `tokenizer` section (as `data_prep.manifest.read` returns it);
    `source` names the manifest in errors."""
    special_ids = tokenizer.special_ids
    vocab_size = tokenizer.vocab_size
    path = tokenizer.path(base_dir)
    if not os.path.isfile(path):
        raise ValueError(f"{source}: tokenizer file {path} not found (the data directory is incomplete)")
    if tokenizer.type == "wordpiece":
        is_special, is_cont = _wordpiece_tables(path, vocab_size)
    else:
        is_special, is_cont = _sentencepiece_tables(path, vocab_size)
    for idx in special_ids.values():
        is_special[idx] = True
    is_cont &= ~is_special
    replacement_ids = np.flatnonzero(~is_special).astype(np.int64)
    if len(replacement_ids) == 0:
        raise ValueError(f"{source}: every vocabulary entry is special; nothing to mask or sample")
    return TokenTables(
        is_special=is_special,
        is_continuation=is_cont,
        replacement_ids=replacement_ids,
        pad_id=int(special_ids["pad"]),
        cls_id=int(special_ids["cls"]),
        sep_id=int(special_ids["sep"]),
        mask_id=int(special_ids["mask"]),
    )


def corpus_token_counts(tokens: np.ndarray, vocab_size: int, max_tokens: int = 1 << 26, chunks: int = 256) -> np.ndarray:
    """Token counts [V] over `tokens` (the corpus's flat token array, e.g. a memmap of the .bin),
    float64 in corpus units.

    Up to `max_tokens` the counts are exact. Past it they come from `chunks` evenly spaced
    contiguous slices holding `max_tokens` in all, scaled by len(tokens) / max_tokens: an estimate
    in corpus units (so `+ 1` in the weights means one occurrence in the corpus, as on the exact
    path) that reads a bounded part of a large corpus and stays a function of the corpus alone.
    Read in slices of at most 4M tokens, so no copy of the corpus is made.
    """
    n = len(tokens)
    if n <= max_tokens:
        spans = [(0, n)]
    else:
        width = max_tokens // chunks
        if width < 1:
            raise ValueError(f"corpus_token_counts: max_tokens {max_tokens} < chunks {chunks}")
        spans = [(int(s), int(s) + width) for s in np.linspace(0, n - width, chunks).astype(np.int64)]
    counts = np.zeros(vocab_size, dtype=np.int64)
    read = 0
    step = 1 << 22
    for start, stop in spans:
        for lo in range(start, stop, step):
            part = tokens[lo:min(stop, lo + step)]
            counts += np.bincount(part, minlength=vocab_size)[:vocab_size]
            read += len(part)
    return counts * (n / read) if read else counts.astype(np.float64)


def frequency_weights(counts: np.ndarray, power: float) -> np.ndarray:
    """Selection weight per token id: (count + 1) ** -power (finite and > 0 for power in [0, 4])."""
    weights = (np.asarray(counts, dtype=np.float64) + 1.0) ** -float(power)
    if not (np.isfinite(weights).all() and (weights > 0).all()):
        raise ValueError(f"frequency_weights: counts must be finite and >= 0 and power in [0, 4], got power {power}")
    return weights


# ---------------------------------------------------------------------------------------------
# Masking.


def _num_to_predict(n_candidates: np.ndarray, cfg: MaskingConfig) -> np.ndarray:
    k = np.maximum(1, np.rint(n_candidates * cfg.mlm_probability).astype(np.int64))
    if cfg.max_predictions is not None:
        k = np.minimum(k, cfg.max_predictions)
    return np.where(n_candidates > 0, np.minimum(k, n_candidates), 0)


def _take_first_k(order: np.ndarray, candidates: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The first k[b] positions of each row's `order` (candidates sorted first), as a mask."""
    b, s = candidates.shape
    selected = np.zeros((b, s), dtype=bool)
    np.put_along_axis(selected, order, np.arange(s)[None, :] < k[:, None], axis=1)
    return selected & candidates


def _select_tokens(keys: np.ndarray, candidates: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Exactly k[b] candidates per row, chosen uniformly (ranks of per-position random keys)."""
    s = candidates.shape[1]
    order_keys = random_bits(keys[:, None], PURPOSE_SELECT, np.arange(s, dtype=_U64)[None, :])
    order_keys[~candidates] = _ALL_ONES
    return _take_first_k(np.argsort(order_keys, axis=1, kind="stable"), candidates, k)


def _select_weighted(keys: np.ndarray, candidates: np.ndarray, k: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Exactly k[b] candidates per row, drawn without replacement with probability proportional
    to `weights` [B, S] (> 0; exponential race: the k smallest -log(1 - u) / w). The same bits as
    `_select_tokens`, so equal weights give its choice (up to ties in the top 53 bits)."""
    s = candidates.shape[1]
    u = to_unit_float(random_bits(keys[:, None], PURPOSE_SELECT, np.arange(s, dtype=_U64)[None, :]))
    race = -np.log1p(-u) / weights  # u < 1: finite
    race[~candidates] = np.inf
    return _take_first_k(np.argsort(race, axis=1, kind="stable"), candidates, k)


def _select_words(keys: np.ndarray, candidates: np.ndarray, is_cont: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Whole words in random order, each taken only if it fits the remaining budget (BERT WWM)."""
    b, s = candidates.shape
    prev_candidate = np.zeros_like(candidates)
    prev_candidate[:, 1:] = candidates[:, :-1]
    starts = candidates & ~(is_cont & prev_candidate)
    word_id = np.cumsum(starts, axis=1) - 1  # meaningful on candidate positions only
    n_words = starts.sum(axis=1)
    w = int(n_words.max()) if b else 0
    if w == 0:
        return np.zeros((b, s), dtype=bool)
    rows, cols = np.nonzero(candidates)
    flat_word = rows * w + word_id[rows, cols]
    sizes = np.bincount(flat_word, minlength=b * w).reshape(b, w)
    # A word's random key is the key of its first piece, so it depends only on (seed, i, position).
    start_keys = random_bits(keys[:, None], PURPOSE_SELECT, np.arange(s, dtype=_U64)[None, :])
    word_keys = np.full((b, w), _ALL_ONES, dtype=_U64)
    srows, scols = np.nonzero(starts)
    word_keys[srows, word_id[srows, scols]] = start_keys[srows, scols]
    order = np.argsort(word_keys, axis=1, kind="stable")
    sorted_sizes = np.take_along_axis(sizes, order, axis=1)
    remaining = k.astype(np.int64).copy()
    take_sorted = np.zeros((b, w), dtype=bool)
    for r in range(w):
        size = sorted_sizes[:, r]
        take = (size > 0) & (size <= remaining)
        take_sorted[:, r] = take
        remaining -= np.where(take, size, 0)
        if not remaining.any():
            break
    chosen = np.zeros((b, w), dtype=bool)
    np.put_along_axis(chosen, order, take_sorted, axis=1)
    selected = np.zeros((b, s), dtype=bool)
    selected[rows, cols] = chosen.reshape(-1)[flat_word]
    return selected


def apply_masking(
    input_ids: np.ndarray,
    text_positions: np.ndarray,
    keys: np.ndarray,
    tables: TokenTables,
    cfg: MaskingConfig,
) -> np.ndarray:
    """Mask `input_ids` [B, S] in place; returns labels [B, S] (int64, IGNORE_INDEX elsewhere).

    `text_positions` marks the A/B token positions (not [CLS]/[SEP]/padding); `keys` [B] are the
    per-sample keys from `sample_keys`.
    """
    candidates = text_positions & ~tables.is_special[input_ids]
    k = _num_to_predict(candidates.sum(axis=1), cfg)
    if cfg.whole_word:
        selected = _select_words(keys, candidates, tables.is_continuation[input_ids], k)
    elif cfg.frequency_power:
        if tables.select_weights is None:
            raise ValueError("MaskingConfig.frequency_power > 0 needs TokenTables.select_weights "
                             "(frequency_weights(corpus_token_counts(...), power))")
        selected = _select_weighted(keys, candidates, k, tables.select_weights[input_ids])
    else:
        selected = _select_tokens(keys, candidates, k)
    labels = np.full(input_ids.shape, IGNORE_INDEX, dtype=np.int64)
    rows, cols = np.nonzero(selected)
    labels[rows, cols] = input_ids[rows, cols]
    u = to_unit_float(random_bits(keys[rows], PURPOSE_DECIDE, cols))
    to_mask = u < cfg.mask_token_probability
    to_random = ~to_mask & (u < cfg.mask_token_probability + cfg.random_token_probability)
    input_ids[rows[to_mask], cols[to_mask]] = tables.mask_id
    rr, rc = rows[to_random], cols[to_random]
    if len(rr):
        pick = random_bits(keys[rr], PURPOSE_RANDOM_TOKEN, rc) % _U64(len(tables.replacement_ids))
        input_ids[rr, rc] = tables.replacement_ids[pick.astype(np.int64)]
    return labels
