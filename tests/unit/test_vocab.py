"""Vocabulary padding (pretrain/vocab.py): a padded model is the unpadded model plus dead rows.

Reference: the unpadded BertForPreTraining built after the same seed (itself checked against
transformers in test_model.py), and transformers loading the export.
"""

import pytest
import torch
import transformers

from pretrain.hf_io import load_hf_dir, load_into, save_hf_dir
from pretrain.model import BertConfig, BertForPreTraining
from pretrain.vocab import padded_vocab_size, resize_vocab
from tests.unit.test_model import TINY, batch, randomize_

VOCAB = TINY["vocab_size"]  # 101
PADDED = 128
WORDS, BIAS = "bert.embeddings.word_embeddings.weight", "cls.predictions.bias"


def test_padded_size_follows_megatron_rule():
    assert padded_vocab_size(30522, 128, 1) == 30592
    assert padded_vocab_size(30522, 128, 4) == 30720
    assert padded_vocab_size(30522, 128, 8) == 30720
    assert padded_vocab_size(1001, 1, 4) == 1004
    assert padded_vocab_size(30720, 128, 4) == 30720  # already a multiple: unchanged
    assert padded_vocab_size(VOCAB, 64, 1) == PADDED
    with pytest.raises(ValueError, match=">= 1"):
        padded_vocab_size(30522, 0, 4)


def _pair(seed=0):
    """(unpadded, padded) models built and initialised after the same seed."""
    config = BertConfig(**TINY)
    models = []
    for rows in (None, PADDED):
        torch.manual_seed(seed)
        model = BertForPreTraining(config, padded_vocab_size=rows)
        model.init_weights()
        models.append(model.eval())  # dropout off: the two models must see the same computation
    return config, *models


def test_init_draws_the_unpadded_numbers_and_zero_padded_rows():
    config, plain, padded = _pair()
    after = []
    for rows in (None, PADDED):  # the generator is left where the unpadded init leaves it
        torch.manual_seed(0)
        BertForPreTraining(config, padded_vocab_size=rows).init_weights()
        after.append(torch.rand(3))
    assert torch.equal(after[0], after[1])
    ours, ref = padded.state_dict(), plain.state_dict()
    assert ours[WORDS].shape == (PADDED, config.hidden_size) and ours[BIAS].shape == (PADDED,)
    assert padded.cls.predictions.decoder.weight is padded.bert.embeddings.word_embeddings.weight
    for key, value in ref.items():
        assert torch.equal(ours[key][:value.shape[0]], value), key
    assert torch.all(ours[WORDS][VOCAB:] == 0) and torch.all(ours[BIAS][VOCAB:] == 0)
    assert torch.all(ours[WORDS][:VOCAB].abs().sum(1)[1:] > 0)  # real rows drawn (row 0 is [PAD])


def _garbage_in_padded_rows_(model):
    # Padded rows that are not zero (e.g. loaded from elsewhere) must still never matter.
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[VOCAB:] = 3.0
        model.cls.predictions.bias[VOCAB:] = 50.0
    return model


def test_padded_model_has_the_unpadded_loss_and_gradients():
    config, plain, padded = _pair(seed=3)
    randomize_(plain, seed=4)
    load_into(padded, resize_vocab(plain.state_dict(), VOCAB, PADDED))
    _garbage_in_padded_rows_(padded)
    ids, types, mask, labels, nsp = batch(config, seed=5)
    labels[0, 2] = VOCAB - 1  # the last real id is a target

    out, ref = padded(ids, types, mask, labels, nsp), plain(ids, types, mask, labels, nsp)
    torch.testing.assert_close(out.mlm_loss, ref.mlm_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=0)
    assert out.prediction_logits.shape == (int((labels != -100).sum()), PADDED)
    torch.testing.assert_close(out.prediction_logits[:, :VOCAB], ref.prediction_logits, atol=1e-6, rtol=0)
    assert int(out.prediction_logits.argmax(-1).max()) < VOCAB

    out.loss.backward()
    ref.loss.backward()
    grads = dict(padded.named_parameters())
    for name, p in plain.named_parameters():
        g = grads[name].grad
        torch.testing.assert_close(g[:p.shape[0]], p.grad, atol=1e-6, rtol=1e-5, msg=name)
        if g.shape != p.grad.shape:  # the vocabulary tensors: padded rows get no gradient at all
            assert torch.all(g[p.shape[0]:] == 0), name
    assert grads[WORDS].grad.shape[0] == PADDED and grads[BIAS].grad.shape[0] == PADDED

    with torch.no_grad():  # without labels: every position, [B, S, padded V]
        full = padded(ids, types, mask).prediction_logits
    assert full.shape == (*ids.shape, PADDED)
    assert int(full.argmax(-1).max()) < VOCAB


def test_padded_logits_stay_lowest_under_bf16_autocast():
    config, plain, padded = _pair(seed=6)
    _garbage_in_padded_rows_(padded)
    ids, types, mask, labels, nsp = batch(config, seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = padded(ids, types, mask, labels, nsp), plain(ids, types, mask, labels, nsp)
    assert out.prediction_logits.dtype == torch.bfloat16
    assert torch.all(out.prediction_logits[:, VOCAB:] == torch.finfo(torch.bfloat16).min)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)


def test_padding_must_hold_the_vocabulary_and_split_by_tp():
    config = BertConfig(**TINY)
    with pytest.raises(ValueError, match="padded_vocab_size 100 must be >= vocab_size"):
        BertForPreTraining(config, padded_vocab_size=VOCAB - 1)

    class TwoWay(type(BertForPreTraining(config)._layers)):
        tp_size = 2

    with pytest.raises(ValueError, match="divisible by the tensor-parallel size"):
        BertForPreTraining(config, layers=TwoWay(), padded_vocab_size=VOCAB)


def test_resize_vocab_trims_pads_and_round_trips():
    _, plain, padded = _pair(seed=8)
    randomize_(padded, seed=9)
    state = padded.state_dict()
    trimmed = resize_vocab(state, VOCAB)
    assert trimmed[WORDS].shape[0] == VOCAB and trimmed[BIAS].shape == (VOCAB,)
    assert trimmed["cls.predictions.decoder.weight"].shape[0] == VOCAB  # the tied alias too
    assert set(trimmed) == set(state)
    for key in state:
        assert torch.equal(trimmed[key], state[key][:trimmed[key].shape[0]]), key
    assert set(trimmed[k].shape for k in trimmed) == set(plain.state_dict()[k].shape for k in trimmed)

    again = resize_vocab(trimmed, VOCAB, PADDED)
    assert torch.equal(again[WORDS][:VOCAB], state[WORDS][:VOCAB])
    assert torch.all(again[WORDS][VOCAB:] == 0) and torch.all(again[BIAS][VOCAB:] == 0)
    assert torch.equal(resize_vocab(again, VOCAB)[WORDS], trimmed[WORDS])
    # another padded size (phase 1 at tp=1 -> phase 2 at tp=4): cut to the real rows, then re-pad
    assert resize_vocab(state, VOCAB, 104)[WORDS].shape[0] == 104
    assert torch.all(resize_vocab(state, VOCAB, 104)[WORDS][VOCAB:] == 0)
    # BertModel-flavour keys (no "bert." prefix) are vocabulary tensors too
    assert resize_vocab({"embeddings.word_embeddings.weight": state[WORDS]}, VOCAB)[
        "embeddings.word_embeddings.weight"].shape[0] == VOCAB
    with pytest.raises(ValueError, match="belong to another vocabulary"):
        resize_vocab(trimmed, VOCAB + 1)
    with pytest.raises(ValueError, match="cannot hold"):
        resize_vocab(state, VOCAB, VOCAB - 1)


def test_export_of_a_padded_model_loads_in_transformers_with_the_real_vocabulary(tmp_path):
    config, _, padded = _pair(seed=10)
    randomize_(padded, seed=11).eval()
    _garbage_in_padded_rows_(padded)
    save_hf_dir(padded, config, tmp_path / "hf")

    hf, info = transformers.BertForPreTraining.from_pretrained(
        tmp_path / "hf", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.vocab_size == VOCAB
    assert hf.bert.embeddings.word_embeddings.weight.shape == (VOCAB, config.hidden_size)
    ids, types, mask, _, _ = batch(config, seed=12)
    with torch.no_grad():
        ours = padded(ids, types, mask).prediction_logits
        ref = hf.eval()(input_ids=ids, token_type_ids=types, attention_mask=mask).prediction_logits
    torch.testing.assert_close(ours[..., :VOCAB], ref, atol=1e-5, rtol=0)


def test_init_from_an_hf_directory_pads_and_checks_the_vocabulary(tmp_path):
    from pretrain.config import ConfigError
    from pretrain.trainer import load_init_weights

    config, plain, padded = _pair(seed=13)
    randomize_(plain, seed=14)
    save_hf_dir(plain, config, tmp_path / "hf")
    load_init_weights(str(tmp_path / "hf"), config, padded, tp_rank=0, tp=1)
    assert load_hf_dir(tmp_path / "hf")[1][WORDS].shape[0] == VOCAB
    for key, value in plain.state_dict().items():
        got = padded.state_dict()[key]
        assert torch.equal(got[:value.shape[0]], value), key
        assert torch.all(got[value.shape[0]:] == 0), key

    other = BertConfig(**dict(TINY, vocab_size=VOCAB + 1))
    with pytest.raises(ConfigError, match=r"vocabulary has 101 tokens, --model_config says vocab_size 102"):
        load_init_weights(str(tmp_path / "hf"), other, BertForPreTraining(other, padded_vocab_size=PADDED), 0, 1)
