"""Unpadded ("varlen") execution of the encoder: the real tokens of a batch as one [tokens, hidden]
matrix, and attention run per sequence on it.

A padded batch spends every dense layer (QKV, attention output, FFN, LayerNorm, dropout) on its
padding too: ~28% of a pretraining batch of the embedded corpus, more for short fine-tuning
sentences. ``TokenLayout`` says where the real tokens are; the encoder gathers them once after
reading the ids, runs every layer on [T, H] and the attention through ``TokenLayout.attend``, and
callers read back only the rows they need (``to_packed`` maps padded positions to packed rows,
``pad`` restores the [B, S, ...] layout where a head needs every position).

Sequences are described as cu_seqlens (offsets of each sequence in the packed tokens) plus
per-token position ids, as flash-attention's varlen kernels take them. A padded row is one
sequence (positions = its columns, as the padded model reads them); a row that packs several
sequences (``sequence_ids``) gives one sequence per segment with positions restarting at 0, so
packing several NSP pairs per row reuses this layout unchanged.

Attention (``attend``), exact on both devices (the same softmax over the same keys as the padded
model; padded keys there get weight exactly 0):
- "bucketed" (the CPU default, and CUDA's for fp32 training): sequences sorted by length and cut
  into at most 8 buckets (a small dynamic programme trading the padding inside a bucket against
  one more kernel call), each run as one batched ``scaled_dot_product_attention`` on its own
  [n, heads, L_bucket, d] block with a key-padding mask. Batched SDPA is CPU's fastest attention (its flash kernel); a block-diagonal
  mask over all packed tokens would cost O(T^2) and a loop per sequence one call per sequence.
- "nested" (the CUDA default for fp16/bf16, and for fp32 without grad): jagged nested tensors
  built on the packed q/k/v without a copy, through SDPA, which dispatches them to the flash
  (fp16/bf16, dropout included) or memory-efficient (fp32, inference only: it refuses nested
  inputs that require grad) varlen kernels. fp32 training on "nested" falls to SDPA's math path
  (a device sync per sequence), so "auto" uses "bucketed" there, whose dense blocks with a float
  mask the memory-efficient kernel takes in training, dropout included.
  ``torch.nn.attention.varlen.varlen_attn`` has no dropout, so training could not use it.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "bucketed", "nested")

# Cost of one more SDPA call in the bucket planner, in units of "query x key" score entries
# (per head): about what a 64-token sequence's attention costs, below which a separate kernel call
# (plus its gather) does not pay for the padding it saves.
_BUCKET_CALL_COST = 64 * 64
_MAX_BUCKETS = 8


@dataclass
class _Bucket:
    count: int  # sequences in the bucket
    length: int  # the bucket's padded length (its longest sequence)
    gather: Optional[torch.Tensor]  # [count * length] packed-token rows (None: the identity)
    bias: Optional[torch.Tensor]  # [count, 1, 1, length] key-padding bias (None: no padding)


@dataclass
class TokenLayout:
    """Where the real tokens of a [batch, seq] grid are and which sequence each belongs to.

    ``indices``: [T] flat indices into the [batch * seq] grid, row-major (the packed order);
    ``cu_seqlens``: [N + 1] int32 offsets of the N sequences in the packed tokens;
    ``position_ids``: [T] position of each token in its sequence's position embeddings;
    ``lengths``: the N sequence lengths on the host (the attention plan needs them there);
    ``first_column_real``: whether every row's column 0 is a real token (the [CLS] a pooler reads;
    False for a left-padded or an all-padding row), on the host."""

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    position_ids: torch.Tensor
    lengths: list
    batch: int
    seq: int
    max_position: int
    backend: str = "auto"
    first_column_real: bool = True
    _plan: Optional[tuple] = field(default=None, repr=False)
    _inverse: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.indices.numel())

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths, default=0)

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor, sequence_ids: Optional[torch.Tensor] = None,
                            backend: str = "auto") -> "TokenLayout":
        """``attention_mask`` [B, S] (1 = token, 0 = padding). Without ``sequence_ids`` each row
        is one sequence and a token's position is its column (what the padded model uses).
        ``sequence_ids`` [B, S] (packed rows): consecutive real tokens of a row with the same id
        form one sequence, whose positions start at 0."""
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be [batch, seq] (1 = token, 0 = padding), "
                             f"got shape {tuple(attention_mask.shape)}")
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
        batch, seq = attention_mask.shape
        device = attention_mask.device
        indices = attention_mask.reshape(-1).nonzero().squeeze(1)
        rows = torch.div(indices, seq, rounding_mode="floor")
        key = rows if sequence_ids is None else rows * (int(sequence_ids.max()) + 1) + sequence_ids.reshape(-1)[indices]
        starts = torch.ones_like(indices, dtype=torch.bool)
        starts[1:] = key[1:] != key[:-1]
        seq_of_token = starts.cumsum(0) - 1
        lengths = torch.bincount(seq_of_token, minlength=int(starts.sum())) if indices.numel() else indices[:0]
        cu_seqlens = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=device)
        cu_seqlens[1:] = lengths.cumsum(0)
        if sequence_ids is None:
            position_ids = indices - rows * seq
        else:
            position_ids = torch.arange(indices.numel(), device=device) - cu_seqlens.long()[seq_of_token]
        # One read-back for every host-side number (on a GPU mask each is a wait for the device).
        first_real = attention_mask[:, 0].ne(0).all().long().reshape(1) if batch else lengths.new_ones(1)
        max_position = position_ids.max().reshape(1) if indices.numel() else lengths.new_zeros(1)
        *lengths, max_position, first_real = torch.cat([lengths.long(), max_position.long(), first_real]).tolist()
        return cls(indices, cu_seqlens, position_ids, lengths, batch, seq, max_position, backend, bool(first_real))

    def to(self, device, non_blocking: bool = False) -> "TokenLayout":
        """The layout on ``device`` (same call as a tensor's, so a batch dict moves as one)."""
        move = [t.to(device, non_blocking=non_blocking) for t in (self.indices, self.cu_seqlens, self.position_ids)]
        return TokenLayout(*move, self.lengths, self.batch, self.seq, self.max_position, self.backend,
                           self.first_column_real)

    def pin_memory(self) -> "TokenLayout":
        """The layout in page-locked host memory (an asynchronous copy to a GPU needs it; torch's
        DataLoader pinning calls this too)."""
        pinned = [t.pin_memory() for t in (self.indices, self.cu_seqlens, self.position_ids)]
        return TokenLayout(*pinned, self.lengths, self.batch, self.seq, self.max_position, self.backend,
                           self.first_column_real)

    def with_backend(self, backend: str) -> "TokenLayout":
        """This layout attending through ``backend`` (the encoder's own setting wins over the one
        the caller built the layout with)."""
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
        return self if backend == self.backend else replace(self, backend=backend)

    # -- moving between the padded grid and the packed tokens -------------------------------------

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] -> [T, ...] (the real tokens, packed)."""
        return x.reshape(self.batch * self.seq, *x.shape[2:]).index_select(0, self.indices)

    def pad(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[T, ...] -> [B, S, ...] with ``fill`` at padding (differentiable)."""
        out = x.new_full((self.batch * self.seq, *x.shape[1:]), fill)
        out = out.index_copy(0, self.indices, x)
        return out.view(self.batch, self.seq, *x.shape[1:])

    def to_packed(self, flat_rows: torch.Tensor) -> torch.Tensor:
        """Flat [B * S] grid indices -> packed token rows; every index must be a real token."""
        if self._inverse is None:
            inverse = torch.full((self.batch * self.seq,), -1, dtype=torch.long, device=self.indices.device)
            inverse[self.indices] = torch.arange(self.num_tokens, device=self.indices.device)
            self._inverse = inverse
        packed = self._inverse[flat_rows]
        # Checked without reading the result back (on a GPU a wait for every queued kernel, per
        # forward): an asynchronous device assert there, an immediate error on the CPU.
        message = ("a requested output position is padding (attention_mask 0 there): the unpadded "
                   "encoder computes real tokens only; [CLS] and masked positions must be inside the "
                   "attention mask")
        if packed.numel():
            try:
                torch._assert_async(packed.min() >= 0, message)
            except RuntimeError as e:  # raised here only where the check ran synchronously (CPU)
                raise ValueError(message) from e
        return packed

    # -- attention ----------------------------------------------------------------------------

    def attend(self, query, key, value, dropout_p: float = 0.0) -> torch.Tensor:
        """Per-sequence softmax attention on packed [T, heads, d] q/k/v; returns [T, heads, d]."""
        if not self.lengths:  # a batch without a real token (torch.cat / min of nothing below)
            return query.new_zeros(query.shape)
        backend = self.backend
        if backend == "auto":
            backend = "nested" if _nested_is_fused(query) else "bucketed"
        if backend == "nested":
            return _nested_attention(query, key, value, self.cu_seqlens, self.lengths, dropout_p)
        return self._bucketed_attention(query, key, value, dropout_p)

    def _bucketed_attention(self, query, key, value, dropout_p):
        if self._plan is None:
            self._plan = _plan_buckets(self.lengths, query.device, query.dtype)
        buckets, unbucket = self._plan
        heads, dim = query.shape[1:]
        qkv = torch.stack((query, key, value), dim=1)  # one gather per bucket instead of three
        outputs = []
        for b in buckets:
            block = qkv if b.gather is None else qkv.index_select(0, b.gather)
            q, k, v = block.view(b.count, b.length, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
            bias = b.bias if b.bias is None or b.bias.dtype == q.dtype else \
                b.bias.clamp(min=torch.finfo(q.dtype).min).to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
            outputs.append(out.transpose(1, 2).reshape(b.count * b.length, heads, dim))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return out if unbucket is None else out.index_select(0, unbucket)


def _nested_is_fused(query: torch.Tensor) -> bool:
    """Whether SDPA runs nested q/k/v in a fused varlen kernel: flash takes fp16/bf16 only, and
    the memory-efficient kernel refuses nested inputs that require grad (torch's sdp_utils,
    check_requires_grad_and_nested), so fp32 training would fall to the MATH path, which splits
    the values per sequence by a device lengths tensor (a sync per sequence, unfused). ``query``
    is the projection's output, so under autocast its dtype is the one the kernel sees. Flash also
    needs compute capability 8.0+ (a T4 or V100 trains fp16 through the bucketed path instead) and
    must not be switched off (`torch.backends.cuda.enable_flash_sdp(False)`)."""
    if not query.is_cuda:
        return False
    if not query.requires_grad:
        return True
    return (query.dtype in (torch.float16, torch.bfloat16) and torch.backends.cuda.flash_sdp_enabled()
            and _capability(query.device) >= (8, 0))


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple:
    return tuple(torch.cuda.get_device_capability(device))


def _nested_attention(query, key, value, cu_seqlens, lengths, dropout_p):
    offsets = cu_seqlens.long()
    # The host-side min/max lengths spare SDPA reading them back from the device (a sync).
    bounds = dict(min_seqlen=min(lengths), max_seqlen=max(lengths))
    q, k, v = (torch.nested.nested_tensor_from_jagged(t, offsets, **bounds).transpose(1, 2)
               for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    return out.transpose(1, 2).values()


def _bucket_bounds(sorted_lengths: list) -> list:
    """Cut lengths sorted longest first into at most ``_MAX_BUCKETS`` contiguous buckets minimising
    the attention work (count x longest^2 per bucket) plus a fixed cost per bucket; returns the
    (start, end) of each bucket in the sorted list.

    A cut inside a run of equal lengths never pays (the next bucket costs the same per sequence
    plus one more call), so the dynamic programme runs over the m distinct lengths, with the
    bucket count as a dimension: m <= the sequence length, and each of the K rounds is one
    [m, m] tensor minimum."""
    n = len(sorted_lengths)
    if not n:
        return []
    run_starts = [0] + [i for i in range(1, n) if sorted_lengths[i] != sorted_lengths[i - 1]]
    m = len(run_starts)
    head = torch.tensor([sorted_lengths[i] for i in run_starts], dtype=torch.float64)
    ends = torch.tensor(run_starts[1:] + [n], dtype=torch.float64)  # sequences up to the end of run b
    begins = torch.tensor(run_starts, dtype=torch.float64)
    # cost[a, b]: one bucket over runs a..b (inclusive), infinite unless a <= b
    cost = (ends[None, :] - begins[:, None]) * head[:, None] ** 2 + _BUCKET_CALL_COST
    cost = cost.masked_fill(torch.ones(m, m, dtype=torch.bool).tril(-1), float("inf"))
    best = cost[0].clone()  # best[b]: runs 0..b in the buckets used so far, the last ending at b
    choices, totals = [], [best[m - 1]]
    for _ in range(1, min(_MAX_BUCKETS, m)):
        # the last bucket covers runs a..b, the ones before runs 0..a-1
        previous = torch.cat([torch.full((1,), float("inf"), dtype=torch.float64), best[:-1]])
        best, start = (previous[:, None] + cost).min(0)
        choices.append(start)
        totals.append(best[m - 1])
    k = min(range(len(totals)), key=lambda i: (totals[i], i))  # fewest buckets among the cheapest
    bounds, b = [], m - 1
    for level in range(k, 0, -1):
        a = int(choices[level - 1][b])
        bounds.append((run_starts[a], n if b == m - 1 else run_starts[b + 1]))
        b = a - 1
    bounds.append((0, n if b == m - 1 else run_starts[b + 1]))
    bounds.reverse()
    return bounds


def _plan_buckets(lengths: list, device, dtype):
    """The buckets' gather indices and key biases, and the permutation back to packed order,
    built on the host from the host lengths (no read-back from the device), without a loop over
    sequences or tokens."""
    total = sum(lengths)
    host_lengths = torch.tensor(lengths)
    starts = torch.tensor(list(itertools.accumulate(lengths, initial=0))[:-1])
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep packed order
    sorted_lengths = [lengths[i] for i in order]
    buckets, position, row = [], torch.empty(total, dtype=torch.long), 0
    for lo, hi in _bucket_bounds(sorted_lengths):
        members = torch.tensor(order[lo:hi])
        count, length = hi - lo, sorted_lengths[lo]
        columns = torch.arange(length)
        valid = columns[None] < host_lengths[members][:, None]  # [count, length]
        # padding slots read token 0 of the sequence: finite values whose keys the mask zeroes
        # and whose query outputs are dropped, so they add nothing to any gradient
        gather = torch.where(valid, starts[members][:, None] + columns, starts[members][:, None])
        position[gather[valid]] = (row + torch.arange(count * length)).view(count, length)[valid]
        row += count * length
        full = sorted_lengths[hi - 1] == length
        identity = full and count == len(lengths) and order[lo:hi] == list(range(count))
        bias = None
        if not full:
            bias = torch.zeros(count, 1, 1, length, dtype=dtype)
            bias.masked_fill_(~valid[:, None, None, :], torch.finfo(dtype).min)
            bias = bias.to(device, non_blocking=True)  # pageable source: staged, no stream sync
        buckets.append(_Bucket(count, length, None if identity else gather.reshape(-1).to(device, non_blocking=True),
                               bias))
    # No permutation back only when the buckets' rows are the packed tokens themselves, in order
    # and without padding rows (a short last sequence alone pads the end).
    in_place = row == total and torch.equal(position, torch.arange(total))
    return buckets, None if in_place else position.to(device, non_blocking=True)
