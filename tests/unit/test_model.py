"""pretrain/model.py against transformers' BertForPreTraining (the independent reference)."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers

from pretrain.layers import LayerFactory
from pretrain.model import BertConfig, BertForPreTraining, BertModel, count_parameters

TINY = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)


def randomize_(model, seed=0):
    """Every parameter random (not HF's init, whose zero biases and unit LayerNorms would hide
    a mis-wired bias or norm)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if name.endswith("LayerNorm.weight") else 0.2 * noise)
    return model


def hf_twin(model, config):
    """transformers' BertForPreTraining with our weights, eager attention (no shared SDPA path)."""
    hf = transformers.BertForPreTraining(
        transformers.BertConfig(**config.to_dict(), attn_implementation="eager")).eval()
    result = hf.load_state_dict(model.state_dict(), strict=False)
    # HF ties decoder.bias to cls.predictions.bias: the only key our state dict does not name.
    assert result.unexpected_keys == [] and result.missing_keys == ["cls.predictions.decoder.bias"]
    assert hf.cls.predictions.decoder.bias is hf.cls.predictions.bias
    return hf


def batch(config, seed=1, batch_size=4, seq=24):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (batch_size, seq), generator=gen)
    mask = torch.ones(batch_size, seq, dtype=torch.long)
    for row, length in enumerate((seq, seq - 5, 9, 13)[:batch_size]):  # padding present
        mask[row, length:] = 0
    ids[mask == 0] = config.pad_token_id
    types = torch.zeros_like(ids)
    types[:, seq // 2:] = 1
    labels = torch.full_like(ids, -100)
    pick = (torch.rand(ids.shape, generator=gen) < 0.2) & (mask == 1)
    pick[0, 1] = True
    labels[pick] = torch.randint(0, config.vocab_size, (int(pick.sum()),), generator=gen)
    nsp = torch.randint(0, 2, (batch_size,), generator=gen)
    return ids, types, mask, labels, nsp


def test_matches_transformers_logits_losses_and_grads_with_padding():
    config = BertConfig(**TINY)
    ours = randomize_(BertForPreTraining(config)).eval()
    hf = hf_twin(ours, config)
    ids, types, mask, labels, nsp = batch(config)

    full = ours(ids, types, mask)
    ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(full.prediction_logits, ref.prediction_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(full.seq_relationship_logits, ref.seq_relationship_logits, atol=1e-5, rtol=0)

    out = ours(ids, types, mask, labels=labels, next_sentence_label=nsp)
    ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels,
             next_sentence_label=nsp)
    masked = labels != -100
    torch.testing.assert_close(out.prediction_logits, ref.prediction_logits[masked], atol=1e-5, rtol=0)
    assert torch.equal(out.mlm_labels, labels[masked])
    ref_mlm = F.cross_entropy(ref.prediction_logits.view(-1, config.vocab_size), labels.view(-1))
    ref_nsp = F.cross_entropy(ref.seq_relationship_logits, nsp)
    torch.testing.assert_close(out.mlm_loss, ref_mlm, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.nsp_loss, ref_nsp, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)

    out.loss.backward()
    ref.loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():  # tied decoder appears once, under the embeddings
        torch.testing.assert_close(p.grad, hf_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_sparse_head_equals_full_head_loss_and_grads():
    config = BertConfig(**TINY)
    model = randomize_(BertForPreTraining(config), seed=3).eval()
    ids, types, mask, labels, nsp = batch(config, seed=4)

    sparse = model(ids, types, mask, labels=labels)
    sparse.loss.backward()
    sparse_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    logits = model(ids, types, mask).prediction_logits  # [B, S, V]: decoder on every position
    assert logits.shape == (*ids.shape, config.vocab_size)
    full_loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), labels.reshape(-1))
    full_loss.backward()

    torch.testing.assert_close(sparse.mlm_loss, full_loss, atol=1e-6, rtol=0)
    assert sparse.loss is sparse.mlm_loss or torch.equal(sparse.loss, sparse.mlm_loss)
    for name, p in model.named_parameters():
        if name.startswith("cls.seq_relationship") or name.startswith("bert.pooler"):
            continue  # NSP path: no gradient without next_sentence_label
        torch.testing.assert_close(sparse_grads[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_last_layer_on_selected_rows_equals_full_rows():
    config = BertConfig(**TINY)
    model = randomize_(BertModel(config), seed=12).eval()
    ids, types, mask, _, _ = batch(config, seed=13)
    rows = torch.tensor([0, 5, 24, 30, 71, 95])
    full = model(ids, types, mask).last_hidden_state.reshape(-1, config.hidden_size)
    part = model(ids, types, mask, output_rows=rows)
    assert part.pooler_output is None
    torch.testing.assert_close(part.last_hidden_state, full[rows], atol=1e-6, rtol=0)


def test_no_masked_token_gives_zero_loss_not_nan():
    config = BertConfig(**TINY)
    model = BertForPreTraining(config)
    ids, types, mask, labels, nsp = batch(config)
    out = model(ids, types, mask, labels=torch.full_like(labels, -100), next_sentence_label=nsp)
    assert out.prediction_logits.shape == (0, config.vocab_size)
    assert out.mlm_loss.item() == 0.0 and torch.isfinite(out.loss)
    out.loss.backward()


@pytest.mark.parametrize("name, expected_millions", [("bert-base", 110), ("bert-large", 336)])
def test_parameter_counts_equal_transformers(name, expected_millions):
    config = BertConfig.from_json_file(f"configs/{name}.json")
    with torch.device("meta"):
        ours = BertForPreTraining(config)
        hf = transformers.BertForPreTraining(transformers.BertConfig(**config.to_dict()))
    ours_n = count_parameters(ours)
    hf_n = sum(p.numel() for p in hf.parameters())  # parameters() already dedups the tied ones
    assert ours_n == hf_n
    assert round(ours_n / 1e6) == expected_millions, ours_n
    assert set(ours.state_dict()) == set(hf.state_dict()) - {"cls.predictions.decoder.bias"}


def test_encoder_hidden_states_match_transformers_bertmodel():
    config = BertConfig(**TINY)
    ours = randomize_(BertModel(config), seed=5).eval()
    hf = transformers.BertModel(transformers.BertConfig(**config.to_dict(), attn_implementation="eager")).eval()
    hf.load_state_dict(ours.state_dict())
    ids, types, mask, _, _ = batch(config, seed=6)
    out = ours(ids, types, mask, output_hidden_states=True)
    ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=1e-5, rtol=0)


def test_bf16_autocast_with_padding_stays_close_to_fp32():
    config = BertConfig(**TINY)
    model = randomize_(BertForPreTraining(config), seed=9).eval()
    ids, types, mask, labels, nsp = batch(config, seed=10)
    reference = model(ids, types, mask, labels, nsp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids, types, mask, labels, nsp)
    assert low.prediction_logits.dtype == torch.bfloat16
    assert torch.isfinite(low.loss)
    torch.testing.assert_close(low.loss, reference.loss, atol=0.05 * reference.loss.item(), rtol=0)


def test_gradient_checkpointing_gives_identical_loss_and_grads_with_dropout():
    config = BertConfig(**TINY)
    model = randomize_(BertForPreTraining(config), seed=7).train()  # dropout on
    ids, types, mask, labels, nsp = batch(config, seed=8)

    def run(checkpointing):
        model.zero_grad()
        model.bert.encoder.gradient_checkpointing = checkpointing
        torch.manual_seed(11)
        loss = model(ids, types, mask, labels, nsp).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    model.bert.encoder.layer[0].register_forward_pre_hook(lambda *_: calls.append(1))
    loss_plain, grads_plain = run(False)
    assert len(calls) == 1
    loss_ckpt, grads_ckpt = run(True)
    assert len(calls) == 3  # forward + recomputation in backward: checkpointing really ran
    # checkpoint() replays the dropout RNG: recomputation must reproduce the same masks.
    assert torch.equal(loss_plain, loss_ckpt)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_init_weights_like_hf_and_decoder_tied():
    config = BertConfig(**dict(TINY, vocab_size=4000, hidden_size=64, intermediate_size=256))
    model = BertForPreTraining(config)
    randomize_(model)
    model.init_weights()
    sd = dict(model.named_parameters())
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    # HF zeroes the [PAD] row (nn.Embedding padding_idx); check it, then the rest as usual.
    word = sd.pop("bert.embeddings.word_embeddings.weight")
    assert torch.all(word[config.pad_token_id] == 0)
    sd["word rows but [PAD]"] = word[torch.arange(word.shape[0]) != config.pad_token_id]
    bare = BertModel(BertConfig(**dict(TINY, pad_token_id=7)))
    randomize_(bare).init_weights()
    assert torch.all(bare.embeddings.word_embeddings.weight[7] == 0)
    assert torch.all(bare.embeddings.word_embeddings.weight[0] != 0)
    for name, p in sd.items():
        if name.endswith("LayerNorm.weight"):
            assert torch.all(p == 1), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:
            # 5-sigma bounds for the mean and std of n draws from N(0, 0.02).
            n = p.numel()
            assert abs(p.mean().item()) < 5 * 0.02 / n**0.5, name
            assert abs(p.std().item() - 0.02) < 5 * 0.02 / (2 * n) ** 0.5, name


def test_every_split_layer_comes_from_the_factory():
    calls = []

    class Recording(LayerFactory):
        def column(self, i, o, bias=True):
            calls.append(("column", i, o))
            return super().column(i, o, bias)

        def row(self, i, o, bias=True):
            calls.append(("row", i, o))
            return super().row(i, o, bias)

        def vocab_embedding(self, n, d):
            calls.append(("vocab", n, d))
            return super().vocab_embedding(n, d)

    config = BertConfig(**TINY)
    BertForPreTraining(config, layers=Recording())
    h, i, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    per_layer = [("column", h, h)] * 3 + [("row", h, h), ("column", h, i), ("row", i, h)]
    assert calls == [("vocab", v, d) for d in [h]] + per_layer * n + [("column", h, v)]


def test_heads_must_divide_tp_size():
    class TwoWay(LayerFactory):
        tp_size = 2

    with pytest.raises(ValueError, match="divisible by the tensor-parallel size"):
        BertModel(BertConfig(**dict(TINY, num_attention_heads=1)), layers=TwoWay())


def test_config_files_and_errors(tmp_path):
    tiny = BertConfig.from_json_file("configs/bert-tiny.json")
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.num_attention_heads) == (128, 2, 2)
    large = BertConfig.from_json_file("configs/bert-large.json")
    assert (large.hidden_size, large.num_hidden_layers, large.num_attention_heads,
            large.intermediate_size) == (1024, 24, 16, 4096)
    # HF's own config.json (bookkeeping keys included) loads and round-trips.
    transformers.BertConfig(**tiny.to_dict()).save_pretrained(tmp_path)
    assert BertConfig.from_json_file(tmp_path / "config.json") == tiny

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hidden_size": 64, "num_layers": 2}))
    with pytest.raises(ValueError, match=r"bad\.json.*unknown key.*num_layers"):
        BertConfig.from_json_file(bad)
    bad.write_text(json.dumps({"hidden_size": 100, "num_attention_heads": 12}))
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        BertConfig.from_json_file(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        BertConfig.from_json_file(bad)
    with pytest.raises(ValueError, match="only 'absolute'"):
        BertConfig(position_embedding_type="relative_key")
    # Another architecture's config.json has BERT's field names: refuse it, accept "bert".
    bad.write_text(json.dumps({"model_type": "roberta", "hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(ValueError, match=r"model_type='roberta' is not supported.*'bert'"):
        BertConfig.from_json_file(bad)
    bad.write_text(json.dumps({"model_type": "bert", "hidden_size": 64, "num_attention_heads": 4}))
    assert BertConfig.from_json_file(bad).hidden_size == 64


def test_eval_pass_does_not_shift_training_dropout():
    """The sharded-RNG region draws from the shared generator; an eval pass (no dropout) in
    between two training steps must leave the next step's dropout masks, hence its loss, as they
    would be without it (eval-invariance, exact resume)."""
    from pretrain.tensor_parallel import TensorParallelRNG

    class ForkingFactory(LayerFactory):
        def __init__(self):
            self.rng = TensorParallelRNG(tp_rank=0)

        def sharded_rng(self, device=None):
            return self.rng.fork(device)

    config = BertConfig(**TINY)
    model = randomize_(BertForPreTraining(config, layers=ForkingFactory()))
    ids, types, mask, labels, nsp = batch(config)

    def train_loss():
        return model.train()(ids, types, mask, labels=labels, next_sentence_label=nsp).loss.item()

    torch.manual_seed(5)
    train_loss()
    expected = train_loss()
    torch.manual_seed(5)
    train_loss()
    with torch.no_grad():
        model.eval()(ids, types, mask, labels=labels, next_sentence_label=nsp)
    assert train_loss() == expected
    # And the dropout really is random (the check above could not pass by a constant loss).
    assert train_loss() != expected


def test_sharded_rng_region_gets_the_device_of_the_activations():
    """The TP dropout region must fork the generator of the device the attention runs on (on a GPU
    the CUDA generator; reseeding the CPU one there left every TP rank with the same masks)."""
    from pretrain.tensor_parallel import TensorParallelRNG

    seen = []

    class SpyFactory(LayerFactory):
        def sharded_rng(self, device):  # no default: a call without the device fails
            seen.append(torch.device(device))
            return TensorParallelRNG(tp_rank=1).fork(device)

    config = BertConfig(**TINY)
    model = randomize_(BertForPreTraining(config, layers=SpyFactory()))
    ids, types, mask, labels, nsp = batch(config)
    model.train()(ids, types, mask, labels=labels, next_sentence_label=nsp).loss.backward()
    assert seen and all(d == torch.device("cpu") for d in seen)
    assert TensorParallelRNG.generator("cpu") is torch.default_generator
    with pytest.raises(ValueError, match="no default generator"):
        TensorParallelRNG.generator("meta")


def test_masked_positions_given_by_the_caller_equal_the_models_own():
    """The trainer passes the masked rows computed on the host (no GPU sync); same numbers."""
    config = BertConfig(**TINY)
    model = randomize_(BertForPreTraining(config)).eval()
    ids, types, mask, labels, nsp = batch(config)
    positions = (labels.reshape(-1) != -100).nonzero().squeeze(1)
    a = model(ids, types, mask, labels=labels, next_sentence_label=nsp)
    b = model(ids, types, mask, labels=labels, next_sentence_label=nsp, masked_positions=positions)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.prediction_logits, b.prediction_logits)
    assert torch.equal(a.mlm_labels, b.mlm_labels)


def test_masked_positions_spare_the_device_a_nonzero(monkeypatch):
    """`nonzero` on a GPU tensor blocks the host until the queue drains; with the positions given
    the model must not call it."""
    config = BertConfig(**TINY)
    model = randomize_(BertForPreTraining(config)).train()
    ids, types, mask, labels, nsp = batch(config)
    positions = (labels.reshape(-1) != -100).nonzero().squeeze(1)

    def no_nonzero(*a, **k):
        raise AssertionError("nonzero called in the forward pass")

    monkeypatch.setattr(torch.Tensor, "nonzero", no_nonzero)
    model(ids, types, mask, labels=labels, next_sentence_label=nsp, masked_positions=positions).loss.backward()
    with pytest.raises(AssertionError, match="nonzero called"):
        model(ids, types, mask, labels=labels, next_sentence_label=nsp)
