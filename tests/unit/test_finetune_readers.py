"""Input readers: GLUE TSV layouts, CSV, JSON lines, CoNLL, SQuAD; clear errors on bad data."""
import json

import pytest

from finetune.readers import InputError, read_conll, read_squad, read_text_file


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_glue_tsv_layouts(tmp_path):
    sst = _write(tmp_path / "sst.tsv", 'sentence\tlabel\nit \'s a "charming" film\t1\nbad\t0\n')
    ex = read_text_file(sst)
    assert [(e.text_a, e.label) for e in ex] == [('it \'s a "charming" film', "1"), ("bad", "0")]
    mrpc = _write(tmp_path / "mrpc.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                  "1\t11\t12\tHe said so.\tHe did say so.\n")
    e = read_text_file(mrpc, pair=True)[0]
    assert (e.text_a, e.text_b, e.label) == ("He said so.", "He did say so.", "1")
    stsb = _write(tmp_path / "sts.tsv", "index\tgenre\tsentence1\tsentence2\tscore\n0\tnews\tA\tB\t3.8\n")
    e = read_text_file(stsb, pair=True)[0]
    assert (e.text_a, e.text_b, e.label) == ("A", "B", "3.8")
    # CoLA's train file has no header: columns given by index
    cola = _write(tmp_path / "cola.tsv", "gj04\t1\t\tOur friends won't buy this.\n")
    e = read_text_file(cola, has_header=False, text_column="3", label_column="1")[0]
    assert (e.text_a, e.label) == ("Our friends won't buy this.", "1")


def test_csv_and_jsonl(tmp_path):
    csv_file = _write(tmp_path / "a.csv", 'text,label\n"hello, world",pos\n')
    assert read_text_file(csv_file)[0].text_a == "hello, world"
    jl = _write(tmp_path / "a.jsonl", json.dumps({"question1": "q?", "question2": "p?", "label": 0}) + "\n")
    e = read_text_file(jl, pair=True)[0]
    assert (e.text_a, e.text_b, e.label) == ("q?", "p?", "0")


def test_text_errors_name_file_and_fix(tmp_path):
    f = _write(tmp_path / "x.tsv", "foo\tbar\n1\t2\n")
    with pytest.raises(InputError, match=r"x\.tsv.*--text-column"):
        read_text_file(f)
    with pytest.raises(InputError, match="unknown extension"):
        read_text_file(_write(tmp_path / "x.xml", "<a/>"))
    short = _write(tmp_path / "s.tsv", "sentence\tlabel\nonly text\n")
    with pytest.raises(InputError, match=r"s\.tsv: line 2"):
        read_text_file(short)


def test_conll(tmp_path):
    f = _write(tmp_path / "n.txt", "-DOCSTART- O\n\nEU NNP B-ORG\nrejects VBZ O\n\t\nPeter B-PER\n")
    s = read_conll(f)
    assert [x.tokens for x in s] == [["EU", "rejects"], ["Peter"]]
    assert [x.tags for x in s] == [["B-ORG", "O"], ["B-PER"]]
    with pytest.raises(InputError, match=r"n2\.txt:1: tag 'PER' is not BIO"):
        read_conll(_write(tmp_path / "n2.txt", "Peter PER\n"))


def test_squad_v2_and_offset_repair(tmp_path, caplog):
    doc = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{
        "context": "Paris is the capital of France.",
        "qas": [{"id": "a", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}]},
                {"id": "b", "question": "Where?", "answers": [{"text": "France", "answer_start": 20}]},
                {"id": "c", "question": "Why?", "answers": [], "is_impossible": True}]}]}]}
    f = _write(tmp_path / "s.json", json.dumps(doc))
    ex, version = read_squad(f)
    assert version == "v2.0" and [e.qid for e in ex] == ["a", "b", "c"]
    assert ex[1].answers == [("France", 24)]  # off-by-4 start repaired to the real occurrence
    assert ex[2].is_impossible and ex[2].answers == []
    doc["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["text"] = "Berlin"
    with pytest.raises(InputError, match="'Berlin'.*not in the context"):
        read_squad(_write(tmp_path / "bad.json", json.dumps(doc)))
