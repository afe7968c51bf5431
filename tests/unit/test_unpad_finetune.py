"""Fine-tuning on the unpadded encoder: each head's loss and gradients equal those of the padded
encoder (dropout off), its dense layers see only real tokens, and training batches are
length-bucketed, deterministically per seed."""

import random

import pytest
import torch
import torch.nn.functional as F

from finetune.modeling import BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification
from finetune.train import _batches
from pretrain.model import BertConfig
from tests.unit.test_model import TINY, randomize_
from tests.unit.test_unpad import count_reads_back

CONFIG = dict(TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([1, 17, 5, 24, 9, 2])
    seq = 24
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    ids = torch.randint(1, CONFIG["vocab_size"], (len(lengths), seq), generator=gen) * mask
    tokens = torch.randint(0, 3, ids.shape, generator=gen).masked_fill(mask == 0, -100)
    start = (lengths - 1) // 2
    return ({"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask},
            {"classify": {"labels": torch.randint(0, 3, (len(lengths),), generator=gen)},
             "token": {"labels": tokens},
             "qa": {"start_positions": start, "end_positions": lengths - 1}})


def _padded_reference(kind, model, inputs, targets):
    """The head's loss on the padded encoder (the encoder's default), written out."""
    out = model.bert(**inputs)
    if kind == "classify":
        return F.cross_entropy(model.classifier(out.pooler_output), targets["labels"])
    if kind == "token":
        logits = model.classifier(out.last_hidden_state)
        return F.cross_entropy(logits.reshape(-1, 3), targets["labels"].reshape(-1), ignore_index=-100)
    start, end = model.qa_outputs(out.last_hidden_state).unbind(-1)
    pad = inputs["attention_mask"] == 0
    start, end = start.masked_fill(pad, torch.finfo(start.dtype).min), end.masked_fill(pad, torch.finfo(end.dtype).min)
    return (F.cross_entropy(start, targets["start_positions"]) + F.cross_entropy(end, targets["end_positions"])) / 2


def _head(kind):
    config = BertConfig(**CONFIG)
    model = {"classify": lambda: BertForSequenceClassification(config, 3),
             "token": lambda: BertForTokenClassification(config, 3),
             "qa": lambda: BertForQuestionAnswering(config)}[kind]()
    return randomize_(model).train()


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["classify", "token", "qa"])
def test_head_loss_and_grads_equal_the_padded_encoder(kind):
    model = _head(kind)
    inputs, targets = _inputs()
    loss, _ = model(**inputs, **targets[kind])
    grads = _grads(model, loss)
    ref = _padded_reference(kind, model, inputs, targets[kind])
    ref_grads = _grads(model, ref)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("kind", ["classify", "token", "qa"])
def test_head_training_step_computes_no_padding(kind):
    model = _head(kind)
    inputs, targets = _inputs()
    rows = []
    hook = model.bert.encoder.layer[0].intermediate.dense.register_forward_hook(
        lambda mod, inp, out: rows.append(inp[0].shape[0]) and None)
    model(**inputs, **targets[kind])
    hook.remove()
    assert rows == [int(inputs["attention_mask"].sum())]


def _lengths_features(n, seed=0):
    rng = random.Random(seed)
    # Pang & Lee-like: mostly 10-40 tokens, a tail of long ones
    return [{"input_ids": [1] * min(128, max(3, int(rng.lognormvariate(3.1, 0.5)))), "i": i} for i in range(n)]


def _padding(batches):
    padded = sum(len(b) * max(len(f["input_ids"]) for f in b) for b in batches)
    real = sum(len(f["input_ids"]) for b in batches for f in b)
    return 1 - real / padded


def test_training_batches_are_length_bucketed_and_seeded():
    features = _lengths_features(3000)
    rng = random.Random(7)
    epoch = list(_batches(features, 32, True, rng))
    second = list(_batches(features, 32, True, rng))  # the next epoch draws from the same stream
    again = list(_batches(features, 32, True, random.Random(7)))
    other = list(_batches(features, 32, True, random.Random(8)))
    ids = [[f["i"] for f in b] for b in epoch]
    assert ids == [[f["i"] for f in b] for b in again]  # same seed, same batches
    assert ids != [[f["i"] for f in b] for b in other]
    assert sorted(i for b in ids for i in b) == list(range(3000))  # every example once
    assert [len(b) for b in ids] == [32] * 93 + [24]  # the short batch last, as before
    # Padding inside batches: random batches of these lengths pad ~60%, bucketed ones ~4%.
    assert _padding(epoch) < 0.1
    # ...and batch-mates still change between epochs (the window is shuffled first).
    pairs = {frozenset(b[:2]) for b in ids}
    assert len(pairs & {frozenset([f["i"] for f in b][:2]) for b in second}) < len(pairs) // 10


def _repeat_share(first, second):
    """Share of the batch-mate pairs of one epoch that are batch-mates again in the next."""
    def pairs(batches):
        return {frozenset((a["i"], b["i"])) for bt in batches for k, a in enumerate(bt) for b in bt[k + 1:]}
    mates = pairs(first)
    return len(mates & pairs(second)) / len(mates)


@pytest.mark.parametrize("n,batch", [(600, 32), (3000, 128)])
def test_small_training_sets_still_change_batch_mates_every_epoch(n, batch):
    # Both sets fit in one window of 50 batches: sorted as a whole, ~70% of the batch-mate pairs
    # met again in the next epoch (random batches: batch / n, ~5%). With at least 4 windows per
    # epoch (transformers' cap) the share is ~15% and batches still pad about half as much as random ones.
    features = _lengths_features(n)
    rng = random.Random(3)
    first, second = list(_batches(features, batch, True, rng)), list(_batches(features, batch, True, rng))
    assert _repeat_share(first, second) < 0.3
    assert _padding(first) < 0.6 * _padding(list(_batches(features, batch, True, random.Random(3), False)))


def test_group_by_length_off_gives_plain_shuffled_batches():
    features = _lengths_features(600)
    order = list(range(600))
    random.Random(5).shuffle(order)
    got = [[f["i"] for f in b] for b in _batches(features, 32, True, random.Random(5), group_by_length=False)]
    assert got == [order[i:i + 32] for i in range(0, 600, 32)]


def test_group_by_length_flags():
    from finetune.cli import args_from_namespace, build_parser

    base = ["--task", "classify", "--model", "M", "--output-dir", "o"]
    parse = lambda *extra: args_from_namespace(build_parser().parse_args([*base, *extra])).train.group_by_length
    assert parse() is True
    assert parse("--no-group-by-length") is False
    assert parse("--group_by_length") is True


@pytest.mark.parametrize("kind", ["classify", "token", "qa"])
def test_head_with_a_host_layout_reads_nothing_back(kind, monkeypatch):
    """The loop builds each batch's layout on the host (train.with_layout) and the heads take it:
    the forward and backward then neither call nonzero nor read a tensor back to Python, each of
    which waits for the device on a GPU; the loss is still the padded encoder's."""
    from finetune.train import with_layout

    model = _head(kind)
    inputs, targets = _inputs()
    ref = _padded_reference(kind, model, inputs, targets[kind])
    batch = with_layout({**inputs, **targets[kind]})
    reads = count_reads_back(monkeypatch)
    loss, _ = model(**batch)
    loss.backward()
    monkeypatch.undo()
    assert reads == []
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)


def _left_padded(inputs, targets):
    seq = inputs["input_ids"].shape[1]
    flipped = {k: v.flip(1) for k, v in inputs.items()}
    targets = dict(targets, token={"labels": targets["token"]["labels"].flip(1)},
                   qa={"start_positions": seq - 1 - targets["qa"]["end_positions"],
                       "end_positions": seq - 1 - targets["qa"]["start_positions"]})
    return flipped, targets


@pytest.mark.parametrize("host_layout", [False, True])
@pytest.mark.parametrize("kind", ["classify", "token", "qa"])
def test_left_padded_batches_give_the_padded_encoders_loss(kind, host_layout):
    """Left padding worked before unpadding (the pooler reads position 0, padding or not): the
    pooled head falls back to the padded encoder, the others unpad with positions = columns."""
    model = _head(kind).eval()
    inputs, targets = _left_padded(*_inputs())
    batch = {**inputs, **targets[kind]}
    if host_layout:
        from finetune.train import with_layout
        batch = with_layout(batch)
    loss, _ = model(**batch)
    torch.testing.assert_close(loss, _padded_reference(kind, model, inputs, targets[kind]), atol=1e-5, rtol=0)
