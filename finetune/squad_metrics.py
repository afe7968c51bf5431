"""SQuAD exact match and F1 with the official answer normalisation (lower case, drop
punctuation, drop the articles a/an/the, collapse whitespace). Follows the v2.0 evaluation
rules, which reduce to v1.1's for answerable questions: the score of a prediction is its best
over the gold answers, and a question without gold answers scores 1 only for an empty
prediction. Scores are percentages, as the official scripts print them, under the keys
transformers' run_qa.py reports: `exact_match` and `f1` (v1.1 script's names; the v2.0 script's
per-split `HasAns_exact`, `NoAns_f1`, ... as it names them)."""
from __future__ import annotations

import re
import string
from collections import Counter

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def f1(gold: str, pred: str) -> float:
    g, p = normalize_answer(gold).split(), normalize_answer(pred).split()
    if not g or not p:
        # no-answer: only an empty prediction for an empty gold counts
        return float(g == p)
    common = sum((Counter(g) & Counter(p)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_scores(golds: dict[str, list[str]], preds: dict[str, str]) -> dict:
    """golds: question id -> gold answer texts ([] for an unanswerable question);
    preds: question id -> predicted text ("" = no answer). Missing predictions count as ""."""
    em_sum = f1_sum = 0.0
    split = {"HasAns": [0, 0.0, 0.0], "NoAns": [0, 0.0, 0.0]}
    for qid, answers in golds.items():
        answers = [a for a in answers if normalize_answer(a)] or [""]
        pred = preds.get(qid, "")
        e = max(exact(a, pred) for a in answers)
        f = max(f1(a, pred) for a in answers)
        em_sum += e
        f1_sum += f
        bucket = split["HasAns" if answers != [""] else "NoAns"]
        bucket[0] += 1
        bucket[1] += e
        bucket[2] += f
    n = len(golds)
    out = {"exact_match": 100.0 * em_sum / n if n else 0.0, "f1": 100.0 * f1_sum / n if n else 0.0, "total": n}
    for name, (count, e, f) in split.items():
        if count:
            out[f"{name}_exact"] = 100.0 * e / count
            out[f"{name}_f1"] = 100.0 * f / count
            out[f"{name}_total"] = count
    return out
