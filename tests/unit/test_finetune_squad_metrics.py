"""SQuAD EM/F1 against values worked out by hand with the official normalisation rules."""
import pytest

from finetune.squad_metrics import exact, f1, normalize_answer, squad_scores


def test_normalize_answer():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an Apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_and_f1_hand_computed():
    assert exact("Denver Broncos", "the denver broncos.") == 1
    assert f1("Denver Broncos", "the denver broncos.") == 1.0
    # gold tokens: [denver, broncos]; pred: [broncos, won] -> common 1, P = 1/2, R = 1/2
    assert f1("Denver Broncos", "Broncos won") == pytest.approx(0.5)
    # gold [1901, and, 2000] vs pred [between, 1901, and, 2000]: P = 3/4, R = 1 -> 6/7
    assert f1("1901 and 2000", "between 1901 and 2000") == pytest.approx(6 / 7)
    # repeated tokens count with multiplicity: gold [a1, a1] vs pred [a1] -> P 1, R 1/2
    assert f1("x x", "x") == pytest.approx(2 / 3)
    assert f1("", "") == 1.0 and f1("", "something") == 0.0 and f1("a thing", "") == 0.0


def test_squad_scores_v2_mix():
    golds = {
        "q1": ["Denver Broncos", "Broncos"],  # best over golds: pred "broncos" -> EM 1
        "q2": ["1901 and 2000"],              # pred "between 1901 and 2000": EM 0, F1 6/7
        "q3": [],                              # unanswerable, predicted "" -> 1, 1
        "q4": [],                              # unanswerable, predicted text -> 0, 0
    }
    preds = {"q1": "broncos", "q2": "between 1901 and 2000", "q3": "", "q4": "Paris"}
    s = squad_scores(golds, preds)
    assert s["exact_match"] == pytest.approx(100 * 2 / 4)
    assert s["f1"] == pytest.approx(100 * (1 + 6 / 7 + 1 + 0) / 4)
    assert s["HasAns_exact"] == pytest.approx(50.0) and s["HasAns_total"] == 2
    assert s["NoAns_f1"] == pytest.approx(50.0) and s["NoAns_total"] == 2
    # a missing prediction counts as the empty answer
    assert squad_scores({"a": ["x"]}, {})["f1"] == 0.0
