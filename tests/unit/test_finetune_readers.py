"""Input readers: GLUE TSV layouts (CoLA's header-less one too), CSV, JSON lines, CoNLL (IOB1 /
BIOES converted to IOB2), SQuAD; bad records skipped and counted, clear errors on bad data."""
import json
import logging

import pytest

from finetune.readers import InputError, read_conll, read_squad, read_text_file, to_iob2


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
    with pytest.raises(InputError, match=r"s\.tsv: every record was skipped: row with missing fields: 1 "
                       r"\(e\.g\. s\.tsv:2\); .*check the delimiter"):
        read_text_file(short)


def test_conll(tmp_path):
    f = _write(tmp_path / "n.txt", "-DOCSTART- O\n\nEU NNP B-ORG\nrejects VBZ O\n\t\nPeter B-PER\n")
    s = read_conll(f)
    assert [x.tokens for x in s] == [["EU", "rejects"], ["Peter"]]
    assert [x.tags for x in s] == [["B-ORG", "O"], ["B-PER"]]
    # a tag of no scheme is refused with its line number
    with pytest.raises(InputError, match=r"n2\.txt:3: tag 'PER' is not O or PREFIX-TYPE"):
        read_conll(_write(tmp_path / "n2.txt", "EU B-ORG\n\nPeter PER\n"))
    with pytest.raises(InputError, match=r"n3\.txt:1: tag 'X-PER'"):
        read_conll(_write(tmp_path / "n3.txt", "Peter X-PER\n"))


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


# GLUE CoLA train.tsv as distributed: no header; source, label, the author's mark, sentence
COLA = ("gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
        "gj04\t1\t\tOne more pseudo generalization and I'm giving up.\n"
        "gj04\t0\t*\tThe more we study verbs, the crazier they get get.\n"
        "gj04\t1\t\tDay by day the facts are getting murkier.\n"
        "cj99\t0\t*\tThey drank the pub.\n")


def test_cola_layout_without_header(tmp_path, caplog):
    f = _write(tmp_path / "train.tsv", COLA)
    with caplog.at_level(logging.INFO, logger="finetune.readers"):
        ex = read_text_file(f, has_header=False)
    assert [e.label for e in ex] == ["1", "1", "0", "1", "0"]
    assert ex[0].text_a == "Our friends won't buy this analysis, let alone the next one we propose."
    assert "CoLA layout" in caplog.text and "label from column 1, text from column 3" in caplog.text
    # named columns win over the detection
    assert read_text_file(f, has_header=False, text_column="0", label_column="1")[0].text_a == "gj04"


def test_no_header_defaults_refused_when_they_look_wrong(tmp_path):
    # id, label, text: the default label column 0 holds ids (one per row)
    ids = _write(tmp_path / "ids.tsv", "".join(f"n{i}\t{i % 2}\tsentence number {i} here\n" for i in range(12)))
    with pytest.raises(InputError, match=r"ids\.tsv: .*column 0 .*looks like an identifier.*--label-column"):
        read_text_file(ids, has_header=False)
    ex = read_text_file(ids, has_header=False, text_column="2", label_column="1")
    assert (ex[3].text_a, ex[3].label) == ("sentence number 3 here", "1")
    # source, label, text (CoLA-like but three columns): the default text column 1 holds labels
    three = _write(tmp_path / "three.tsv", "".join(f"gj04\t{i % 2}\tsentence {i}\n" for i in range(4)))
    with pytest.raises(InputError, match=r"three\.tsv: .*text is column 1.*holds labels.*--text-column"):
        read_text_file(three, has_header=False)
    # the documented default layout still reads
    plain = _write(tmp_path / "plain.tsv", "1\tgood film\n0\tbad film\n")
    ex = read_text_file(plain, has_header=False)
    assert [(e.label, e.text_a) for e in ex] == [("1", "good film"), ("0", "bad film")]


def test_bad_rows_are_skipped_and_counted(tmp_path, caplog):
    rows = ["sentence\tlabel", "good one\t1", "too short", "bad one\t0", "no label\t", "fine\t1", "also short"]
    f = _write(tmp_path / "train.tsv", "\n".join(rows) + "\n")
    skipped = {}
    with caplog.at_level(logging.WARNING, logger="finetune.readers"):
        ex = read_text_file(f, skipped=skipped)
    assert [e.text_a for e in ex] == ["good one", "bad one", "fine"]
    assert skipped == {"row with missing fields": 2, "row with an empty label": 1}
    assert "train.tsv:3, train.tsv:7" in caplog.text  # where, for the user to look
    jl = _write(tmp_path / "a.jsonl", '{"sentence": "x", "label": 1}\n{"sentence": "y"\n{"text": "z", "label": 0}\n')
    skipped = {}
    assert len(read_text_file(jl, skipped=skipped)) == 1
    assert skipped == {"line that is not a JSON object": 1, "row with missing fields": 1}
    with pytest.raises(InputError, match=r"every record was skipped: line that is not a JSON object: 2"):
        read_text_file(_write(tmp_path / "b.jsonl", '{"a": 1,\n"b"\n'))


def test_conll_sentence_without_tag_is_skipped(tmp_path):
    f = _write(tmp_path / "n.txt", "EU B-ORG\nrejects O\n\nPeter\nspoke O\n\nBonn B-LOC\n")
    skipped = {}
    s = read_conll(f, skipped)
    assert [x.tokens for x in s] == [["EU", "rejects"], ["Bonn"]]
    assert skipped == {"sentence with a line lacking its tag": 1}
    with pytest.raises(InputError, match="every record was skipped"):
        read_conll(_write(tmp_path / "untagged.txt", "Peter\nspoke\n"))


def test_squad_answer_not_in_context_skipped(tmp_path, caplog):
    ctx = "Paris is the capital of France."
    doc = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": [
        {"id": "a", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}]},
        {"id": "b", "question": "Which?", "answers": [{"text": "Berlin", "answer_start": 0}]},
        {"id": "c", "question": "Country?", "answers": [{"text": "France", "answer_start": 24},
                                                        {"text": "Frankreich", "answer_start": 24}]}]}]}]}
    skipped = {}
    with caplog.at_level(logging.WARNING, logger="finetune.readers"):
        ex, _ = read_squad(_write(tmp_path / "s.json", json.dumps(doc)), skipped)
    assert [e.qid for e in ex] == ["a", "c"] and ex[1].answers == [("France", 24)]
    assert skipped == {"question whose answer is not in its context": 1,
                       "answer not in its context (the question's other answers kept)": 1}
    assert "question 'b'" in caplog.text
    doc["data"][0]["paragraphs"][0]["qas"] = doc["data"][0]["paragraphs"][0]["qas"][1:2]
    with pytest.raises(InputError, match=r"every record was skipped: question whose answer is not in its context"):
        read_squad(_write(tmp_path / "bad.json", json.dumps(doc)))


def test_iob1_and_bioes_become_iob2(tmp_path):
    f = _write(tmp_path / "iob1.txt", "Peter I-PER\nBlack I-PER\nin O\nBonn I-LOC\nKoeln B-LOC\n")
    assert read_conll(f)[0].tags == ["B-PER", "I-PER", "O", "B-LOC", "B-LOC"]
    # IOB1: entities start with I-; B- only between two adjacent entities of one type
    assert to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]) == [
        "B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-ORG"]
    # BIOES: S- single, E- last; an I- after E-/S- starts a new entity; BILOU's U-/L- likewise
    assert to_iob2(["S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC", "E-LOC", "U-X", "B-X", "L-X"]) == [
        "B-PER", "B-LOC", "I-LOC", "I-LOC", "B-LOC", "B-LOC", "B-X", "B-X", "I-X"]


def _to_bioes(tags):
    """IOB2 -> BIOES, written independently of the reader: an entity's last token is E- (S- if
    it is also its first)."""
    out = []
    for i, t in enumerate(tags):
        nxt = tags[i + 1] if i + 1 < len(tags) else "O"
        last = nxt != "I-" + t[2:]
        if t == "O":
            out.append("O")
        elif t.startswith("B-"):
            out.append(("S-" if last else "B-") + t[2:])
        else:
            out.append(("E-" if last else "I-") + t[2:])
    return out


def test_bioes_file_reads_as_its_iob2_twin(tmp_path, caplog):
    """WNUT-16 (real data) written once in IOB2 and once in BIOES: the same tags after reading,
    the same entities as seqeval finds in the raw BIOES tags, the same scores."""
    from seqeval.metrics.sequence_labeling import get_entities

    from finetune import datasets
    from finetune.metrics import entity_scores

    sents = datasets.load_wnut16()[:400]
    bioes = [datasets.TaggedSentence(s.tokens, _to_bioes(s.tags)) for s in sents]
    prefixes = {t[:2] for s in bioes for t in s.tags}
    assert {"S-", "E-", "B-", "I-"} <= prefixes
    datasets.write_conll(str(tmp_path / "iob2.txt"), sents)
    datasets.write_conll(str(tmp_path / "bioes.txt"), bioes)
    with caplog.at_level(logging.INFO, logger="finetune.readers"):
        read_bioes = read_conll(str(tmp_path / "bioes.txt"))
    read_iob2 = read_conll(str(tmp_path / "iob2.txt"))
    assert "BIOES/BILOU tags converted to IOB2" in caplog.text
    assert [s.tags for s in read_bioes] == [s.tags for s in read_iob2] == [s.tags for s in sents]
    assert get_entities([s.tags for s in read_bioes]) == get_entities([s.tags for s in bioes])
    # a prediction that drops every third entity token: equal scores against either gold file
    pred = [[t if (i % 3) else "O" for i, t in enumerate(s.tags)] for s in sents]
    assert entity_scores([s.tags for s in read_bioes], pred) == entity_scores([s.tags for s in read_iob2], pred)
