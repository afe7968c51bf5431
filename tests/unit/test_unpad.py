"""The unpadded encoder (pretrain/unpad.py) against the padded model (the reference): same logits,
losses and gradients with dropout off, for random lengths with length-1 and full-length rows, on
both attention backends; the dense layers really see only the real tokens; the packed-rows layout
(several sequences per row, for packing) equals the sequences in rows of their own."""

import pytest
import torch

from pretrain.model import BertConfig, BertForPreTraining, BertModel
from pretrain.unpad import TokenLayout, _bucket_bounds
from tests.unit.test_model import TINY, randomize_

NO_DROPOUT = dict(TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=128)
ATOL = 1e-5


def ragged_batch(config, lengths, seq, seed=0, mask_rate=0.3):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    ids = torch.randint(1, config.vocab_size, (len(lengths), seq), generator=gen) * mask
    types = ((torch.arange(seq)[None] >= (lengths[:, None] + 1) // 2) & (mask == 1)).long()
    labels = torch.full_like(ids, -100)
    pick = (torch.rand(ids.shape, generator=gen) < mask_rate) & (mask == 1)
    pick[0, 0] = True  # at least one masked token
    labels[pick] = torch.randint(0, config.vocab_size, (int(pick.sum()),), generator=gen)
    nsp = torch.randint(0, 2, (len(lengths),), generator=gen)
    return ids, types, mask, labels, nsp


def random_lengths(n, seq, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seq + 1, (n,), generator=gen).tolist()
    lengths[0], lengths[1] = 1, seq  # a length-1 row and a full row in every draw
    return lengths


def step(model, batch, unpad, backend="auto"):
    ids, types, mask, labels, nsp = batch
    model.zero_grad(set_to_none=True)
    model.unpad = unpad
    model.bert.attention_backend = backend
    out = model(ids, types, mask, labels=labels, next_sentence_label=nsp)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


SEQ = 24
LONG = 128  # long enough that the planner cuts random lengths into several buckets
LENGTHS = {
    "random": random_lengths(12, LONG, seed=3),
    "random_many_short": random_lengths(16, SEQ, seed=5)[:2] + [1, 2, 1, 3, 2, 1, 1, 2],
    "all_full": [SEQ] * 4,  # the identity plan: no gather at all
    "last_short": [SEQ, SEQ, SEQ - 1],  # one bucket whose only padding is at its end
}


@pytest.mark.parametrize("backend", ["bucketed", "nested"])
@pytest.mark.parametrize("case", sorted(LENGTHS))
def test_unpadded_pretraining_equals_padded(case, backend):
    config = BertConfig(**NO_DROPOUT)
    model = randomize_(BertForPreTraining(config)).train()
    batch = ragged_batch(config, LENGTHS[case], max(LENGTHS[case]))
    ref, ref_grads = step(model, batch, unpad=False)
    out, grads = step(model, batch, unpad=True, backend=backend)
    for name in ("loss", "mlm_loss", "nsp_loss", "prediction_logits", "seq_relationship_logits"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), atol=ATOL, rtol=0, msg=name)
    assert torch.equal(out.mlm_labels, ref.mlm_labels)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=ATOL, rtol=0, msg=name)


def test_random_lengths_use_several_buckets():
    """The multi-bucket path (gathers, key biases, the permutation back) is what the CPU runs on
    real batches; the exactness test above must exercise it."""
    lengths = LENGTHS["random"]
    layout = TokenLayout.from_attention_mask((torch.arange(LONG)[None] < torch.tensor(lengths)[:, None]).long())
    bounds = _bucket_bounds(sorted(lengths, reverse=True))
    assert len(bounds) > 1
    assert layout.lengths == lengths and layout.cu_seqlens.tolist()[-1] == sum(lengths)


def test_gradient_checkpointing_unpadded_equals_padded():
    config = BertConfig(**NO_DROPOUT)
    model = randomize_(BertForPreTraining(config)).train()
    batch = ragged_batch(config, LENGTHS["random"], LONG)
    ref, ref_grads = step(model, batch, unpad=False)
    model.bert.encoder.gradient_checkpointing = True
    out, grads = step(model, batch, unpad=True)
    torch.testing.assert_close(out.loss, ref.loss, atol=ATOL, rtol=0)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=ATOL, rtol=0, msg=name)


def test_encoder_outputs_at_real_tokens_and_pooler_equal_padded():
    config = BertConfig(**NO_DROPOUT)
    model = randomize_(BertModel(config)).eval()
    ids, types, mask, _, _ = ragged_batch(config, LENGTHS["random"], LONG)
    ref = model(ids, types, mask, output_hidden_states=True)
    out = model(ids, types, mask, output_hidden_states=True, unpad=True)
    real = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[real], ref.last_hidden_state[real], atol=ATOL, rtol=0)
    assert torch.count_nonzero(out.last_hidden_state[~real]) == 0  # padding rows were never computed
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=ATOL, rtol=0)
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(a[real], b[real], atol=ATOL, rtol=0)


def test_dense_layers_see_only_real_tokens():
    """Unpadding that silently fell back to the padded layout would still be exact; the work done
    is what tells them apart: every dense layer gets one row per real token (the last layer's
    feed-forward only the rows the heads read)."""
    config = BertConfig(**NO_DROPOUT)
    model = randomize_(BertForPreTraining(config)).train()
    model.unpad = True
    ids, types, mask, labels, nsp = ragged_batch(config, LENGTHS["random"], LONG)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = tuple(inputs[0].shape[:-1])
        return hook

    hooks = [m.register_forward_hook(record(name))
             for name, m in model.bert.named_modules() if isinstance(m, torch.nn.Linear)]
    model(ids, types, mask, labels=labels, next_sentence_label=nsp)
    for h in hooks:
        h.remove()
    tokens = int(mask.sum())
    read = len(ids) + int((labels != -100).sum())
    assert seen["encoder.layer.0.attention.self.query"] == (tokens,)
    assert seen["encoder.layer.0.intermediate.dense"] == (tokens,)
    assert seen["encoder.layer.1.attention.self.key"] == (tokens,)
    assert seen["encoder.layer.1.output.dense"] == (read,)


def test_packed_rows_equal_sequences_in_rows_of_their_own():
    """The layout packing will use: several sequences in one row (sequence_ids), each with its own
    positions from 0 and attention only within itself, gives each sequence's padded-row numbers."""
    config = BertConfig(**NO_DROPOUT)
    model = randomize_(BertModel(config, add_pooling_layer=False)).eval()
    gen = torch.Generator().manual_seed(4)
    parts = [[5, 7, 1], [9, 3]]  # sequence lengths packed into each row
    seq = 16
    ids = torch.zeros(2, seq, dtype=torch.long)
    types = torch.zeros_like(ids)
    sequence_ids = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    separate_ids, separate_types, separate_mask = [], [], []
    for r, lengths in enumerate(parts):
        col = 0
        for k, n in enumerate(lengths):
            tok = torch.randint(1, config.vocab_size, (n,), generator=gen)
            typ = (torch.arange(n) >= n // 2).long()
            ids[r, col:col + n], types[r, col:col + n], sequence_ids[r, col:col + n] = tok, typ, k
            mask[r, col:col + n] = 1
            separate_ids.append(torch.cat([tok, torch.zeros(seq - n, dtype=torch.long)]))
            separate_types.append(torch.cat([typ, torch.zeros(seq - n, dtype=torch.long)]))
            separate_mask.append((torch.arange(seq) < n).long())
            col += n
    layout = TokenLayout.from_attention_mask(mask, sequence_ids=sequence_ids)
    assert layout.lengths == [5, 7, 1, 9, 3]
    assert layout.position_ids.tolist()[:13] == list(range(5)) + list(range(7)) + [0]
    packed = model(ids, types, mask, layout=layout).last_hidden_state
    ref = model(torch.stack(separate_ids), torch.stack(separate_types), torch.stack(separate_mask)).last_hidden_state
    torch.testing.assert_close(packed[mask.bool()], ref[torch.stack(separate_mask).bool()], atol=ATOL, rtol=0)


def test_output_row_on_padding_is_an_error():
    config = BertConfig(**NO_DROPOUT)
    model = randomize_(BertModel(config)).eval()
    ids, types, mask, _, _ = ragged_batch(config, [3, SEQ], SEQ)
    with pytest.raises(ValueError, match="padding"):
        model(ids, types, mask, output_rows=torch.tensor([5]), unpad=True)


def test_bf16_autocast_unpadded_stays_close_to_padded():
    config = BertConfig(**NO_DROPOUT)
    model = randomize_(BertForPreTraining(config)).eval()
    batch = ragged_batch(config, LENGTHS["random"], LONG)
    ids, types, mask, labels, nsp = batch
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(ids, types, mask, labels=labels, next_sentence_label=nsp).loss
        model.unpad = True
        out = model(ids, types, mask, labels=labels, next_sentence_label=nsp).loss
    assert abs(float(out) - float(ref)) < 2e-2 * abs(float(ref))


def test_host_layout_spares_the_device_a_nonzero(monkeypatch):
    """The trainer builds the layout where the mask is still on the host (as it does the masked
    positions) and moves it with the batch; the forward pass then never calls nonzero (on a GPU
    that waits for every queued kernel), and gives the padded model's loss."""
    config = BertConfig(**NO_DROPOUT)
    model = randomize_(BertForPreTraining(config)).train()
    ids, types, mask, labels, nsp = ragged_batch(config, LENGTHS["random"], LONG)
    ref = model(ids, types, mask, labels=labels, next_sentence_label=nsp).loss
    batch = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels,
             "next_sentence_label": nsp, "masked_positions": (labels.reshape(-1) != -100).nonzero().squeeze(1),
             "layout": TokenLayout.from_attention_mask(mask)}
    batch = {k: v.to("cpu", non_blocking=True) for k, v in batch.items()}  # the trainer's _to_device

    def no_nonzero(*a, **k):
        raise AssertionError("nonzero called in the forward pass")

    monkeypatch.setattr(torch.Tensor, "nonzero", no_nonzero)
    out = model(**batch)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref, atol=ATOL, rtol=0)


READS = ("nonzero", "item", "tolist", "__int__", "__bool__", "__index__", "__float__")


def count_reads_back(monkeypatch) -> list:
    """Record every Tensor method that hands a tensor's data to Python (on a GPU: a wait for every
    queued kernel) into the returned list, except inside the bucket planner, whose tensors are
    built on the host from the host lengths on every device (``_plan_buckets``)."""
    import pretrain.unpad as unpad

    reads, planning = [], []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **k):
            if not planning:
                reads.append(_name)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    plan = unpad._plan_buckets

    def planner(*a, **k):
        planning.append(1)
        try:
            return plan(*a, **k)
        finally:
            planning.pop()
    monkeypatch.setattr(unpad, "_plan_buckets", planner)
    return reads


def test_forward_with_a_host_layout_reads_nothing_back(monkeypatch):
    """With the layout and masked positions built on the host, the forward and backward read no
    tensor back to Python (the old to_packed check did int(packed.min()) twice a forward, the
    bucket planner read the device cu_seqlens with .tolist())."""
    config = BertConfig(**dict(NO_DROPOUT, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))
    model = randomize_(BertForPreTraining(config)).train()
    ids, types, mask, labels, nsp = ragged_batch(config, LENGTHS["random"], LONG)
    layout = TokenLayout.from_attention_mask(mask)
    masked = (labels.reshape(-1) != -100).nonzero().squeeze(1)
    reads = count_reads_back(monkeypatch)
    out = model(ids, types, mask, labels=labels, next_sentence_label=nsp, masked_positions=masked, layout=layout)
    out.loss.backward()
    monkeypatch.undo()
    assert reads == []


def test_left_padded_and_empty_rows_fall_back_to_the_padded_pooler():
    """BERT's pooler reads position 0: a left-padded or all-padding row (which worked before
    unpadding) gives the padded model's pooled output instead of an error."""
    config = BertConfig(**NO_DROPOUT)
    model = randomize_(BertModel(config)).eval()
    ids, types, mask, _, _ = ragged_batch(config, [5, SEQ, 9], SEQ)
    mask, ids, types = mask.flip(1), ids.flip(1), types.flip(1)  # left padding
    mask[2] = 0  # and a row without tokens
    ref = model(ids, types, mask)
    out = model(ids, types, mask, unpad=True)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=ATOL, rtol=0)
    rows = torch.arange(0, 3 * SEQ, SEQ)
    torch.testing.assert_close(model(ids, types, mask, output_rows=rows, unpad=True).last_hidden_state,
                               ref.last_hidden_state[:, 0], atol=ATOL, rtol=0)
    # a layout passed without `unpad` (as BertForPreTraining passes one) falls back alike
    passed = model(ids, types, mask, layout=TokenLayout.from_attention_mask(mask))
    torch.testing.assert_close(passed.pooler_output, ref.pooler_output, atol=ATOL, rtol=0)


def test_hidden_states_with_output_rows_unpadded():
    config = BertConfig(**NO_DROPOUT)
    model = randomize_(BertModel(config)).eval()
    ids, types, mask, _, _ = ragged_batch(config, [5, SEQ, 9], SEQ)
    rows = torch.tensor([0, SEQ, SEQ + 3, 2 * SEQ])
    ref = model(ids, types, mask, output_hidden_states=True, output_rows=rows)
    out = model(ids, types, mask, output_hidden_states=True, output_rows=rows, unpad=True)
    assert [tuple(h.shape) for h in out.hidden_states] == [tuple(h.shape) for h in ref.hidden_states]
    real = mask.bool()
    for got, want in zip(out.hidden_states[:-1], ref.hidden_states[:-1]):
        torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.hidden_states[-1], ref.hidden_states[-1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["bucketed", "nested"])
def test_a_batch_without_tokens_runs(backend):
    config = BertConfig(**NO_DROPOUT)
    model = randomize_(BertModel(config, add_pooling_layer=False)).train()
    model.attention_backend = backend
    ids = torch.zeros(2, SEQ, dtype=torch.long)
    out = model(ids, torch.zeros_like(ids), torch.zeros_like(ids), unpad=True).last_hidden_state
    assert out.shape == (2, SEQ, config.hidden_size) and torch.count_nonzero(out) == 0
    out.sum().backward()


def test_the_models_backend_decides_a_passed_layout(monkeypatch):
    """One knob: BertForPreTraining(layout=...) attends through model.bert.attention_backend,
    not through the backend the caller happened to build the layout with."""
    import pretrain.unpad as unpad

    config = BertConfig(**NO_DROPOUT)
    model = randomize_(BertForPreTraining(config)).eval()
    ids, types, mask, labels, nsp = ragged_batch(config, LENGTHS["random"], LONG)
    calls = []
    real = unpad._nested_attention
    monkeypatch.setattr(unpad, "_nested_attention", lambda *a: calls.append(1) or real(*a))
    model.bert.attention_backend = "nested"
    model(ids, types, mask, labels=labels, layout=TokenLayout.from_attention_mask(mask, backend="bucketed"))
    assert calls


def _plan_cost(sorted_lengths, bounds):
    from pretrain.unpad import _BUCKET_CALL_COST

    return sum((hi - lo) * sorted_lengths[lo] ** 2 + _BUCKET_CALL_COST for lo, hi in bounds)


def _best_plan_cost(sorted_lengths, max_buckets):
    """The cheapest cut into at most max_buckets contiguous buckets, by the plain O(K n^2) programme."""
    from pretrain.unpad import _BUCKET_CALL_COST

    n, inf = len(sorted_lengths), float("inf")
    best = [0.0] + [inf] * n
    found = inf
    for _ in range(max_buckets):
        best = [inf] + [min(best[s] + (e - s) * sorted_lengths[s] ** 2 + _BUCKET_CALL_COST for s in range(e))
                        for e in range(1, n + 1)]
        found = min(found, best[n])
    return found


@pytest.mark.parametrize("n,seq,seed", [(64, 128, 0), (64, 128, 1), (64, 512, 2), (40, 24, 3)])
def test_bucket_planner_finds_the_best_plan_of_at_most_8_buckets(n, seq, seed):
    """Truncating an unconstrained plan to 8 buckets by merging its tail cost ~1.2x the best
    8-bucket plan's attention work on 64 random lengths; the planner must find the best one."""
    from pretrain.unpad import _MAX_BUCKETS

    lengths = sorted(random_lengths(n, seq, seed), reverse=True)
    bounds = _bucket_bounds(lengths)
    assert bounds[0][0] == 0 and bounds[-1][1] == n and len(bounds) <= _MAX_BUCKETS
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert _plan_cost(lengths, bounds) == _best_plan_cost(lengths, _MAX_BUCKETS)
