"""Sentence-level metrics against scikit-learn / scipy (independent implementations)."""
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from finetune.metrics import classification_metrics, mean_std, regression_metrics


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
