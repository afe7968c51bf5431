"""Sentence-level metrics against scikit-learn / scipy (independent implementations); entity
scores (the seqeval package) against cases counted by hand."""
import json

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from finetune.metrics import classification_metrics, entity_scores, mean_std, regression_metrics


@pytest.mark.parametrize("n_classes", [2, 3])
def test_classification_metrics_match_sklearn(n_classes):
    rng = np.random.default_rng(n_classes)
    y = rng.integers(0, n_classes, 200)
    p = np.where(rng.random(200) < 0.7, y, rng.integers(0, n_classes, 200))
    m = classification_metrics(y.tolist(), p.tolist())
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert m["matthews"] == pytest.approx(skm.matthews_corrcoef(y, p))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, p, average="macro"))
    if n_classes == 2:
        assert m["f1"] == pytest.approx(skm.f1_score(y, p))


def test_hand_computed_binary_case_and_constant_prediction():
    # tp=2 fn=1 fp=1 tn=1: acc 3/5, F1 = 2*2/(2*2+1+1) = 2/3, MCC = (2*1-1*1)/sqrt(3*3*2*2) = 1/6
    m = classification_metrics([1, 1, 1, 0, 0], [1, 1, 0, 1, 0])
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["matthews"] == pytest.approx(1 / 6)
    assert classification_metrics([0, 1, 1], [1, 1, 1])["matthews"] == 0.0


def test_regression_metrics_match_scipy_with_ties():
    x = [1.0, 2.0, 2.0, 3.5, 5.0, 5.0, 0.2]
    y = [0.5, 2.5, 1.0, 4.0, 4.0, 6.0, 0.1]
    m = regression_metrics(x, y)
    assert m["pearson"] == pytest.approx(stats.pearsonr(x, y)[0])
    assert m["spearman"] == pytest.approx(stats.spearmanr(x, y)[0])


def test_mean_std():
    mean, std = mean_std([{"a": 1.0, "b": "x"}, {"a": 3.0, "b": "y"}])
    assert mean == {"a": 2.0} and std["a"] == pytest.approx(np.sqrt(2))


def test_entity_scores_hand_counted():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-PER", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG", "B-PER", "O"]]
    # gold entities: PER(0-1) LOC(3) | ORG(0) PER(2)      -> 4
    # predicted:     PER(0-1) ORG(3) | ORG(0-1) PER(2)    -> 4
    # correct: PER(0-1), PER(2) -> 2 (ORG(0-1) is a partial span: wrong end; ORG(3) the wrong type)
    s = entity_scores(gold, pred)
    assert (s["precision"], s["recall"], s["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert s["support"] == 4 and s["accuracy"] == pytest.approx(6 / 8)
    assert s["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert s["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # ORG: 2 predicted, 1 gold, 0 correct
    assert s["per_type"]["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    json.dumps(s)  # plain floats and ints: it goes into metrics.json


def test_entity_scores_conlleval_chunks_and_uneven_precision_recall():
    # conlleval/seqeval default: an I- after O or after another type starts an entity, B- after
    # I- of the same type starts another; entities never run across sentences
    gold = [["I-LOC", "I-LOC", "B-LOC", "I-ORG"], ["I-A"], ["I-A", "O", "B-B", "O", "B-A"]]
    pred = [["B-LOC", "I-LOC", "B-LOC", "B-ORG"], ["B-A"], ["B-A", "O", "O", "O", "O"]]
    # gold: LOC(0-1) LOC(2) ORG(3) | A(0) | A(0) B(2) A(4) -> 7; predicted: 5, all correct
    s = entity_scores(gold, pred)
    assert (s["precision"], s["recall"]) == pytest.approx((1.0, 5 / 7))
    assert s["f1"] == pytest.approx(2 * 5 / 7 / (1 + 5 / 7))
    assert s["per_type"]["A"]["recall"] == pytest.approx(2 / 3)


def test_entity_scores_all_o_and_length_mismatch():
    s = entity_scores([["B-A", "O"]], [["O", "O"]])
    assert (s["precision"], s["recall"], s["f1"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="length mismatch"):
        entity_scores([["O"]], [["O", "O"]])
    with pytest.raises(ValueError, match="1 gold sentences but 2"):
        entity_scores([["O"]], [["O"], ["O"]])
