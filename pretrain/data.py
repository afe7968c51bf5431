"""Pretraining samples over data_prep's output: dataset, data-parallel sampler, DataLoader.

A sample is a pure function of (seed, global sample index i):
- epoch = i // num_pairs; the pair order of an epoch is a keyed bijection of [0, num_pairs)
  seeded by (seed, epoch) (`EpochPermutation`), evaluated only at the batch's indices, so opening
  the data and resuming anywhere cost the same for 1 thousand or 1 billion pairs;
- the pair's A and B sentence runs are read straight from the Megatron corpus memmap, the longer
  side is truncated at random ends until [CLS] A [SEP] B [SEP] fits (google-research/bert
  `truncate_seq_pair`), and the result is masked dynamically (pretrain/masking.py), all with
  random bits hashed from (seed, i).
Nothing depends on the batch, the worker, the data-parallel rank or a resume, so the global sample
order is simply 0, 1, 2, ...: the sampler only decides which rank builds which index, and the
position in the run is one integer, `consumed_samples`.

Packing (`pack_sequences`): a micro-batch's pairs, built exactly as above, are laid into rows of
`seq_length` by first fit in sample order (`first_fit`): each pair goes to the first row with room
for it, else opens a row. The micro-batch is still its `micro_batch_size` pairs (a sample is still
a pair: `consumed_samples`, the schedule and eval count pairs), only in fewer rows; which pairs
share a row depends on the micro-batch's sample indices alone, so a resumed run packs the same.
`sequence_ids` (a pair's number within its row) gives each pair its own positions from 0 and
attention within itself (`pretrain.unpad.TokenLayout`); `cls_positions` and `next_sentence_label`
list the pairs in sample order.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Iterator, Optional

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_prep import manifest
from data_prep.pairs import PairIndex, PairIndexError
from pretrain.masking import (
    PURPOSE_EPOCH_ORDER,
    PURPOSE_TRUNCATE_A,
    PURPOSE_TRUNCATE_B,
    MaskingConfig,
    apply_masking,
    binomial_half,
    build_token_tables,
    corpus_token_counts,
    frequency_weights,
    random_bits,
    mix64,
    sample_keys,
)

logger = logging.getLogger(__name__)

SAMPLE_KEYS = ("input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label")
_OPEN_CHECKS = 4096  # pair records checked against the corpus on open (all of them in a smaller index)


def truncation_counts(len_a: np.ndarray, len_b: np.ndarray, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens `truncate_seq_pair` removes from A and from B (vectorised, closed form).

    The original loop removes one token at a time from the longer side, from B on a tie. So the
    longer side first loses the difference, then the remainder alternates starting with B.
    """
    excess = np.maximum(len_a + len_b - max_tokens, 0)
    a_longer = len_a > len_b
    first = np.minimum(excess, np.abs(len_a - len_b))
    rest = excess - first
    cut_a = np.where(a_longer, first, 0) + rest // 2
    cut_b = np.where(a_longer, 0, first) + rest - rest // 2
    return cut_a, cut_b


def open_check_ids(num_pairs: int) -> np.ndarray:
    """The pair ids checked against the corpus when a dataset opens: evenly spread, at most
    _OPEN_CHECKS of them (every pair of a small index)."""
    return np.unique(np.linspace(0, num_pairs - 1, min(num_pairs, _OPEN_CHECKS)).astype(np.int64))


def first_fit(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy first fit in the given order: (row, first column, number within the row) of each
    item of `lengths` (each <= `capacity`) in rows of `capacity` columns. Items keep their order
    within a row, so a row's columns are filled left to right without gaps."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"first_fit: lengths must be in [1, {capacity}], got {lengths.min()}..{lengths.max()}")
    used = np.zeros(len(lengths), dtype=np.int64)  # columns used in each row (at most one row per item)
    count = np.zeros(len(lengths), dtype=np.int64)
    row, col, number = (np.empty(len(lengths), dtype=np.int64) for _ in range(3))
    rows = 0
    for i, length in enumerate(lengths.tolist()):
        fits = np.flatnonzero(used[:rows] + length <= capacity)
        r = int(fits[0]) if fits.size else rows
        rows += not fits.size
        row[i], col[i], number[i] = r, used[r], count[r]
        used[r] += length
        count[r] += 1
    return row, col, number


def pack_batch(arrays: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """A batch of one pair per row ([B, S] arrays, real tokens first in each row) -> its pairs
    packed into rows of S by `first_fit`, with `sequence_ids` [R, S] (the pair's number within its
    row), `cls_positions` [B] (flat R * S index of each pair's [CLS], in the batch's order) and
    `next_sentence_label` [B] unchanged. Every token keeps its id, segment and MLM label."""
    mask = arrays["attention_mask"]
    batch, seq = mask.shape
    lengths = mask.sum(1).astype(np.int64)
    row, col, number = first_fit(lengths, seq)
    rows = int(row.max()) + 1 if batch else 0
    pair = np.repeat(np.arange(batch), lengths)  # the pair of each real token, in batch order
    within = np.arange(len(pair)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # its column in the pair
    src = pair * seq + within
    dst = row[pair] * seq + col[pair] + within
    out = {}
    for key, fill in (("input_ids", pad_id), ("token_type_ids", 0), ("attention_mask", 0), ("labels", -100)):
        packed = np.full(rows * seq, fill, dtype=arrays[key].dtype)
        packed[dst] = arrays[key].reshape(-1)[src]
        out[key] = packed.reshape(rows, seq)
    sequence_ids = np.zeros(rows * seq, dtype=np.int64)
    sequence_ids[dst] = number[pair]
    out["sequence_ids"] = sequence_ids.reshape(rows, seq)
    out["cls_positions"] = row * seq + col
    out["next_sentence_label"] = arrays["next_sentence_label"]
    return out


class EpochPermutation:
    """A keyed permutation of [0, n): `perm(positions)` -> the pair ids at those positions.

    A balanced Feistel network over the smallest even number of bits that covers n (a bijection of
    [0, 4**h) whatever its round function), walked until it lands in [0, n) ("cycle walking":
    following the cycle from x stays a bijection, and since 4**h < 4n the walk takes under 4 steps
    on average). Round keys come from (seed, epoch); the round function is SplitMix64. O(1) memory
    and O(len(positions)) time: no per-epoch array, in any process or worker.
    """

    ROUNDS = 6  # Luby-Rackoff: 4 rounds of a pseudorandom function already give a pseudorandom permutation

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1:
            raise ValueError(f"EpochPermutation: n = {n} must be >= 1")
        self.n = int(n)
        self.half = max(1, ((self.n - 1).bit_length() + 1) // 2)  # 4**half >= n
        self.mask = np.uint64((1 << self.half) - 1)
        keys = sample_keys(seed, np.array([epoch]))
        self.round_keys = random_bits(keys, PURPOSE_EPOCH_ORDER, np.arange(self.ROUNDS, dtype=np.uint64))

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.round_keys:
            left, right = right, left ^ (mix64(right ^ k) & self.mask)
        return (left << h) | right

    def __call__(self, positions) -> np.ndarray:
        x = np.array(positions, dtype=np.uint64, ndmin=1)
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"position {int(x.max())} outside the permutation of {self.n}")
        y = self._feistel(x)
        walk = np.flatnonzero(y >= self.n)
        while walk.size:
            y[walk] = self._feistel(y[walk])
            walk = walk[y[walk] >= self.n]
        return y.astype(np.int64)


class PretrainingBatch(Sequence):
    """What `PretrainingDataset.__getitems__` returns: the batch arrays, viewable as samples.

    It is a sequence of per-sample dicts (so torch's `default_collate` works on it), but
    `collate_pretraining` takes the [B, S] arrays as they are, without a per-sample round trip
    (packed batches only that way: their rows are not samples).
    """

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays["input_ids"])

    def __getitem__(self, r):
        if isinstance(r, slice):
            return [self[j] for j in range(*r.indices(len(self)))]
        return {k: v[r] for k, v in self.arrays.items()}


def collate_pretraining(batch) -> dict[str, torch.Tensor]:
    """int64 tensors [B, S] (`next_sentence_label` [B]) from a PretrainingBatch or sample list."""
    if isinstance(batch, PretrainingBatch):
        arrays = batch.arrays
    else:
        arrays = {k: np.stack([np.asarray(s[k]) for s in batch]) for k in SAMPLE_KEYS}
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)) for k, v in arrays.items()}


class PretrainingDataset(torch.utils.data.Dataset):
    """Masked NSP samples `[CLS] A [SEP] B [SEP]` for global sample indices 0, 1, 2, ... (any epoch)."""

    def __init__(
        self,
        data_dir: str,
        seq_length: int,
        split: str = "train",
        masking: Optional[MaskingConfig] = None,
        seed: int = 1234,
        pack_sequences: bool = False,
    ):
        self.data_dir = data_dir
        self.pack_sequences = bool(pack_sequences)
        self.seq_length = int(seq_length)
        self.split = split
        self.masking = masking if masking is not None else MaskingConfig()
        self.masking.validate()
        self.seed = int(seed)
        if self.seq_length < 5:
            raise ValueError(f"seq_length = {seq_length}: needs room for [CLS] A [SEP] B [SEP] (>= 5)")
        self._open()

    # Workers started with 'spawn' get the paths, not a pickled copy of the memmaps.
    def __getstate__(self):
        return {
            "data_dir": self.data_dir,
            "seq_length": self.seq_length,
            "split": self.split,
            "masking": self.masking,
            "seed": self.seed,
            "pack_sequences": self.pack_sequences,
            "_select_weights": getattr(self, "_select_weights", None),  # [V] floats, not the corpus
        }

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def _open(self) -> None:
        m = manifest.read(self.data_dir)  # ManifestError (a ValueError; FileNotFoundError when missing)
        manifest_path = manifest.path(self.data_dir)
        by_length = m.pairs.get(str(self.seq_length))
        if by_length is None:
            have = [str(L) for L in m.seq_lengths]
            raise ValueError(
                f"{manifest_path}: no NSP pairs for seq_length {self.seq_length} (available: {have}); "
                f"use one of those or re-run data_prep with --seq-length {self.seq_length}"
            )
        if self.split not in by_length:
            raise ValueError(
                f"{manifest_path}: no '{self.split}' split for seq_length {self.seq_length} "
                f"(available: {sorted(by_length)})"
            )
        try:
            self.pair_index = PairIndex(os.path.join(self.data_dir, by_length[self.split]))
        except PairIndexError as e:
            raise ValueError(str(e)) from e
        if self.pair_index.seq_length != self.seq_length:
            raise ValueError(
                f"{self.pair_index.path}: built for seq_length {self.pair_index.seq_length}, "
                f"manifest lists it under {self.seq_length}; re-run data_prep"
            )
        if len(self.pair_index) == 0:
            raise ValueError(f"{self.pair_index.path}: no NSP pairs in the '{self.split}' split (corpus too small?)")

        prefix = os.path.join(self.data_dir, m.corpus)
        if not IndexedDataset.exists(prefix):
            raise FileNotFoundError(f"{manifest_path}: corpus {prefix}.bin/.idx not found; re-run data_prep")
        self.corpus = IndexedDataset(prefix)
        self.tables = build_token_tables(m.tokenizer, self.data_dir, manifest_path)

        # One flat view of the .bin: a sentence run A is then a single contiguous slice, read
        # without a Python call per sentence. Offsets come from the .idx memmaps per batch, so
        # nothing here grows with the corpus.
        self._lengths = self.corpus.sequence_lengths
        self._pointers = self.corpus.index.sequence_pointers
        self._itemsize = np.dtype(self.corpus.index.dtype).itemsize
        n_sent = len(self._lengths)
        self._base = int(self._pointers[0]) // self._itemsize if n_sent else 0
        # O(1) plausibility check (this runs on every open, in every loader worker): the first and
        # the last sentence adjoin their neighbours and the last one ends where the .bin ends.
        # Every pointer in between is covered by the manifest's checksums (data_prep.verify).
        if n_sent:
            ptr = [int(self._pointers[i]) for i in (0, min(1, n_sent - 1), max(n_sent - 2, 0), n_sent - 1)]
            length = [int(self._lengths[i]) * self._itemsize for i in (0, max(n_sent - 2, 0), n_sent - 1)]
            adjoin = n_sent == 1 or (ptr[1] == ptr[0] + length[0] and ptr[3] == ptr[2] + length[1])
            bin_size = os.path.getsize(prefix + ".bin")
            if ptr[0] != 0 or not adjoin or ptr[3] + length[2] != bin_size:
                raise ValueError(f"{prefix}.idx: sentences are not stored back to back in {prefix}.bin "
                                 f"({bin_size} bytes); re-run data_prep")
        total = int(self._pointers[-1]) // self._itemsize + int(self._lengths[-1]) - self._base if n_sent else 0
        self.tokens = self.corpus.get(0, 0, total) if total else np.zeros(0, dtype=np.int32)
        if self.masking.frequency_power:
            # Computed once per dataset; loader workers receive them through __getstate__.
            weights = getattr(self, "_select_weights", None)
            if weights is None:
                counts = corpus_token_counts(self.tokens, self.tables.vocab_size)
                weights = frequency_weights(counts, self.masking.frequency_power)
            self.tables.select_weights = self._select_weights = weights

        self._n_sent = n_sent
        # O(_OPEN_CHECKS), not a scan: an index of another corpus fails here; every record a batch
        # reads is checked again in get_batch, and data_prep.verify checks them all.
        spots = open_check_ids(len(self.pair_index))
        self._check_pairs(spots, self.pair_index.pairs[spots])

    def _check_pairs(self, pair_ids: np.ndarray, rec: np.ndarray) -> None:
        a_start, b_start = rec["a_start"].astype(np.int64), rec["b_start"].astype(np.int64)
        a_count, b_count = rec["a_count"].astype(np.int64), rec["b_count"].astype(np.int64)
        n_sent = self._n_sent
        bad = (a_count < 1) | (b_count < 1) | (a_start + a_count > n_sent) | (b_start + b_count > n_sent)
        if bad.any():
            first = int(pair_ids[np.flatnonzero(bad)[0]])
            raise ValueError(
                f"{self.pair_index.path}: pair {first} refers to sentences outside the corpus "
                f"({n_sent} sentences) or to an empty run; the pair index does not belong to this corpus"
            )

    def _span(self, first: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token offset into self.tokens and token count of the sentence runs [first, first+count)."""
        last = first + count - 1
        start = self._pointers[first].astype(np.int64) // self._itemsize - self._base
        end = self._pointers[last].astype(np.int64) // self._itemsize - self._base + self._lengths[last]
        return start, end - start

    @property
    def num_pairs(self) -> int:
        return len(self.pair_index)

    def __len__(self) -> int:
        """Samples in one epoch (one pass over the pairs); indices beyond it are later epochs."""
        return self.num_pairs

    def permutation(self, epoch: int) -> EpochPermutation:
        """The pair order of `epoch`, a pure function of (seed, epoch)."""
        return EpochPermutation(self.num_pairs, self.seed, epoch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All pair ids of `epoch` in order: O(num_pairs), for tests and inspection (batches use
        `_pair_ids`, which evaluates the permutation at their own positions only)."""
        return self.permutation(epoch)(np.arange(self.num_pairs))

    def _pair_ids(self, indices: np.ndarray) -> np.ndarray:
        epochs = indices // self.num_pairs
        within = indices % self.num_pairs
        out = np.empty(len(indices), dtype=np.int64)
        for e in np.unique(epochs):  # one, or two where a batch straddles an epoch boundary
            sel = epochs == e
            out[sel] = self.permutation(int(e))(within[sel])
        return out

    def get_batch(self, indices, pack: Optional[bool] = None) -> dict[str, np.ndarray]:
        """Samples for global indices as int64 arrays [B, S] (`next_sentence_label` [B]); packed
        (`pack`, default the dataset's `pack_sequences`): the same pairs in R <= B rows, see
        `pack_batch`."""
        arrays = self._pairs(indices)
        if self.pack_sequences if pack is None else pack:
            return pack_batch(arrays, self.tables.pad_id)
        return arrays

    def _pairs(self, indices) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and indices.min() < 0:
            raise IndexError(f"sample index {int(indices.min())} < 0: global sample indices start at 0")
        s = self.seq_length
        keys = sample_keys(self.seed, indices)
        pair_ids = self._pair_ids(indices)
        rec = self.pair_index.pairs[pair_ids]
        self._check_pairs(pair_ids, rec)
        a_tok, len_a = self._span(rec["a_start"].astype(np.int64), rec["a_count"].astype(np.int64))
        b_tok, len_b = self._span(rec["b_start"].astype(np.int64), rec["b_count"].astype(np.int64))
        cut_a, cut_b = truncation_counts(len_a, len_b, s - 3)
        # Each removed token comes off the front or the back with probability 1/2, as in the
        # original's per-token coin; only the count from the front matters.
        front_a = binomial_half(keys, PURPOSE_TRUNCATE_A, cut_a)
        front_b = binomial_half(keys, PURPOSE_TRUNCATE_B, cut_b)
        a0, b0 = a_tok + front_a, b_tok + front_b
        la, lb = (len_a - cut_a)[:, None], (len_b - cut_b)[:, None]

        col = np.arange(s, dtype=np.int64)[None, :]
        in_a = (col >= 1) & (col <= la)
        b_off = col - 2 - la
        in_b = (b_off >= 0) & (b_off < lb)
        text = in_a | in_b
        src = np.where(in_a, a0[:, None] + col - 1, b0[:, None] + b_off)
        input_ids = np.where(text, self.tokens[np.where(text, src, 0)], self.tables.pad_id).astype(np.int64)
        if input_ids.size and input_ids.max() >= self.tables.vocab_size:
            raise ValueError(
                f"{self.corpus.path_prefix}.bin holds token ids >= tokenizer.vocab_size "
                f"{self.tables.vocab_size}: corpus and manifest tokenizer do not match; re-run data_prep"
            )
        input_ids[:, 0] = self.tables.cls_id
        input_ids[(col == la + 1) | (b_off == lb)] = self.tables.sep_id
        token_type_ids = ((b_off >= 0) & (b_off <= lb)).astype(np.int64)
        attention_mask = (col < la + lb + 3).astype(np.int64)
        labels = apply_masking(input_ids, text, keys, self.tables, self.masking)
        return {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "next_sentence_label": rec["is_random"].astype(np.int64),
        }

    def __getitems__(self, indices) -> PretrainingBatch:
        # torch's fetcher calls this with a whole micro-batch: one vectorised pass.
        return PretrainingBatch(self.get_batch(indices))

    def __getitem__(self, i) -> dict[str, np.ndarray]:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"PretrainingDataset index must be an int, got {type(i).__name__}")
        return PretrainingBatch(self.get_batch([int(i)], pack=False))[0]


class PretrainingSampler:
    """Batch sampler for data parallelism over the global sample order 0, 1, 2, ...

    Each micro-step consumes `micro_batch_size * dp_size` consecutive global indices starting at
    `consumed_samples`; global index g of that block goes to rank `g % dp_size`. With gradient
    accumulation a global batch (micro x accumulation x dp) is therefore the contiguous range
    [k * global, (k + 1) * global), the same set for any dp size, so a run resumed at another dp
    size (same global batch) continues exactly where it stopped.

    Yields lists of `micro_batch_size` indices for this rank; `consumed_samples` counts the
    global samples handed out so far (all ranks). A sample is one NSP pair, packed or not: a
    packed micro-batch is the same indices' pairs in fewer rows. Behind a prefetching DataLoader use the
    loader's state_dict (it counts delivered batches), not this one's.
    """

    def __init__(
        self,
        total_samples: Optional[int] = None,
        dp_rank: int = 0,
        dp_size: int = 1,
        micro_batch_size: int = 1,
        consumed_samples: int = 0,
    ):
        if dp_size < 1:
            raise ValueError(f"dp_size = {dp_size}: must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank = {dp_rank}: must be in [0, dp_size={dp_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size = {micro_batch_size}: must be >= 1")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples = {consumed_samples}: must be >= 0")
        if total_samples is not None and total_samples < 0:
            raise ValueError(f"total_samples = {total_samples}: must be >= 0 or None (endless)")
        self.total_samples = total_samples
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.micro_batch_size = micro_batch_size
        self.consumed_samples = consumed_samples

    @property
    def samples_per_step(self) -> int:
        """Global samples consumed by one micro-step of all ranks together."""
        return self.micro_batch_size * self.dp_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.samples_per_step
        while self.total_samples is None or self.consumed_samples + step <= self.total_samples:
            start = self.consumed_samples + self.dp_rank
            batch = list(range(start, start + step, self.dp_size))
            self.consumed_samples += step
            yield batch

    def __len__(self) -> int:
        if self.total_samples is None:
            raise TypeError("PretrainingSampler without total_samples is endless and has no len()")
        return max(0, self.total_samples - self.consumed_samples) // self.samples_per_step

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        if "consumed_samples" not in state:
            raise KeyError("sampler state has no 'consumed_samples' (not saved by PretrainingSampler?)")
        self.consumed_samples = int(state["consumed_samples"])


class PretrainingDataLoader(torch.utils.data.DataLoader):
    """A DataLoader over a PretrainingSampler whose position survives save/restore.

    Workers prefetch ahead of the training loop, so the position is counted here, on delivery:
    `state_dict()` after n batches says n micro-steps were consumed, whatever was prefetched.
    """

    def __init__(self, dataset: PretrainingDataset, sampler: PretrainingSampler, **kwargs):
        # Samples never use torch's RNG, but each iter() of a DataLoader draws a worker base seed
        # from its generator, by default the global one. That draw would shift every later dropout
        # mask of a resumed run (restored RNG state, then a fresh iter()) against the uninterrupted
        # run, so the loader draws from a private generator instead.
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(dataset, batch_sampler=sampler, collate_fn=collate_pretraining, **kwargs)
        self._consumed = sampler.consumed_samples

    @property
    def consumed_samples(self) -> int:
        return self._consumed

    def __iter__(self):
        self.batch_sampler.consumed_samples = self._consumed
        step = self.batch_sampler.samples_per_step
        for batch in super().__iter__():
            self._consumed += step
            yield batch

    def state_dict(self) -> dict:
        return {"consumed_samples": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        if "consumed_samples" not in state:
            raise KeyError("loader state has no 'consumed_samples' (not saved by PretrainingDataLoader?)")
        self._consumed = int(state["consumed_samples"])


def build_dataloader(
    dataset: PretrainingDataset,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    consumed_samples: int = 0,
    total_samples: Optional[int] = None,
    num_workers: int = 0,
    pin_memory: Optional[bool] = None,
    prefetch_factor: Optional[int] = None,
) -> PretrainingDataLoader:
    """DataLoader yielding this rank's micro-batches as int64 tensors, from `consumed_samples` on.

    `pin_memory` defaults to "CUDA available" (pinning is useless, and warns, on CPU).
    """
    if num_workers < 0:
        raise ValueError(f"num_workers = {num_workers}: must be >= 0")
    sampler = PretrainingSampler(total_samples, dp_rank, dp_size, micro_batch_size, consumed_samples)
    kwargs = {}
    if num_workers > 0 and prefetch_factor is not None:
        kwargs["prefetch_factor"] = prefetch_factor
    return PretrainingDataLoader(
        dataset,
        sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        **kwargs,
    )
