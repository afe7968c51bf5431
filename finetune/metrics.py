"""Sentence-level metrics: accuracy, F1, Matthews correlation (classification) and
Pearson/Spearman (regression, e.g. STS-B). Plain numpy so results do not depend on the
scikit-learn version; the unit tests compare against scikit-learn and scipy. Entity-level
P/R/F1 for token labelling come from the `seqeval` package (pinned in requirements.txt), the
scorer users compare against."""
from __future__ import annotations

import numpy as np


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float((y_true == y_pred).mean()) if len(y_true) else 0.0


def _confusion(y_true, y_pred, labels):
    index = {label: i for i, label in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        cm[index[t], index[p]] += 1
    return cm


def f1_scores(y_true, y_pred, labels=None, positive=1) -> dict:
    """Binary F1 of the `positive` class when there are two labels (GLUE's MRPC/QQP
    convention), plus macro F1 over all labels (the only meaningful F1 for more classes)."""
    y_true, y_pred = list(y_true), list(y_pred)
    if labels is None:
        labels = sorted(set(y_true) | set(y_pred))
    cm = _confusion(y_true, y_pred, labels)
    tp = np.diag(cm).astype(float)
    pred_pos, true_pos = cm.sum(0).astype(float), cm.sum(1).astype(float)
    denom = pred_pos + true_pos
    per_class = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    out = {"f1_macro": float(per_class.mean()) if len(labels) else 0.0}
    if len(labels) == 2 and positive in labels:
        out["f1"] = float(per_class[labels.index(positive)])
    return out


def matthews_corrcoef(y_true, y_pred, labels=None) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K), which is the usual MCC for two
    classes; 0 when a prediction or the truth is constant (the limit sklearn also uses)."""
    y_true, y_pred = list(y_true), list(y_pred)
    if labels is None:
        labels = sorted(set(y_true) | set(y_pred))
    cm = _confusion(y_true, y_pred, labels).astype(float)
    t, p = cm.sum(1), cm.sum(0)
    c, s = np.trace(cm), cm.sum()
    num = c * s - t @ p
    den = np.sqrt(s * s - p @ p) * np.sqrt(s * s - t @ t)
    return float(num / den) if den > 0 else 0.0


def _rank(x: np.ndarray) -> np.ndarray:
    """Average ranks for ties (what Spearman's rho needs)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    return ranks


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    xc, yc = x - x.mean(), y - y.mean()
    den = np.sqrt((xc * xc).sum() * (yc * yc).sum())
    return float((xc * yc).sum() / den) if den > 0 else 0.0


def spearman(x, y) -> float:
    return pearson(_rank(np.asarray(x, dtype=float)), _rank(np.asarray(y, dtype=float)))


def classification_metrics(y_true, y_pred, labels=None) -> dict:
    out = {"accuracy": accuracy(y_true, y_pred)}
    out.update(f1_scores(y_true, y_pred, labels))
    out["matthews"] = matthews_corrcoef(y_true, y_pred, labels)
    return out


def regression_metrics(y_true, y_pred) -> dict:
    y_true, y_pred = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    return {
        "pearson": pearson(y_true, y_pred),
        "spearman": spearman(y_true, y_pred),
        "mse": float(((y_true - y_pred) ** 2).mean()) if len(y_true) else 0.0,
    }


def entity_scores(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Micro precision/recall/F1 over entities (seqeval's default mode: conlleval's chunk rules,
    what transformers' run_ner.py reports; an I- after O or another type starts an entity), the
    number of gold entities (`support`), `per_type` the same per entity type, and the token
    `accuracy` over all tags. Sentences are scored separately."""
    from seqeval.metrics import accuracy_score
    from seqeval.metrics.sequence_labeling import get_entities, precision_recall_fscore_support

    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted ones")
    for g, p in zip(gold, pred):
        if len(g) != len(p):
            raise ValueError(f"sentence length mismatch: {len(g)} gold tags, {len(p)} predicted")
    gold, pred = [list(g) for g in gold], [list(p) for p in pred]
    micro = precision_recall_fscore_support(gold, pred, average="micro", zero_division=0)
    per = precision_recall_fscore_support(gold, pred, average=None, zero_division=0)
    # the per-type arrays come in sorted type order, over the types of gold and predicted entities
    names = sorted({t for t, _, _ in get_entities(gold)} | {t for t, _, _ in get_entities(pred)})
    out = {k: float(v) for k, v in zip(("precision", "recall", "f1"), micro[:3])}
    out["support"] = int(micro[3]) if micro[3] is not None else sum(int(n) for n in per[3])
    out["accuracy"] = float(accuracy_score(gold, pred)) if any(gold) else 0.0
    out["per_type"] = {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
                       for name, p, r, f, n in zip(names, *per)}
    return out


def mean_std(runs: list[dict]) -> tuple[dict, dict]:
    """Mean and sample standard deviation (ddof=1; 0 for a single run) of every numeric
    metric shared by all runs."""
    keys = [k for k in runs[0] if all(isinstance(r.get(k), (int, float)) for r in runs)]
    mean = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    std = {k: float(np.std([r[k] for r in runs], ddof=1)) if len(runs) > 1 else 0.0 for k in keys}
    return mean, std
