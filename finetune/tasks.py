"""Sentence (pair) classification / regression and token labelling: tokenisation into model
features and turning predictions back into labels."""
from __future__ import annotations

import logging

import numpy as np

from .metrics import classification_metrics, regression_metrics
from .readers import InputError, TaggedSentence, TextExample
from .seqeval import entity_scores

log = logging.getLogger(__name__)


def _label_key(label: str):
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def label_list(labels) -> list[str]:
    """Labels in a stable order: numeric labels by value ("-1" < "1"), others alphabetically."""
    return sorted(set(labels), key=_label_key)


# ----------------------------------------------------------------------------- sentences

def encode_sentences(examples: list[TextExample], tokenizer, max_length: int,
                     label2id: dict | None, regression: bool, source: str) -> list[dict]:
    """[CLS] A [SEP] (B [SEP]) with segment ids 0/1; the longer text is truncated first."""
    a = [e.text_a for e in examples]
    b = [e.text_b for e in examples] if examples[0].text_b is not None else None
    enc = tokenizer(a, b, truncation="longest_first", max_length=max_length)
    feats = []
    for i, e in enumerate(examples):
        f = {"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i],
             "attention_mask": enc["attention_mask"][i]}
        if e.label is not None and (regression or label2id is not None):
            if regression:
                try:
                    f["labels"] = float(e.label)
                except ValueError:
                    raise InputError(f"{source}: label {e.label!r} of example {i + 1} is not a number "
                                     "(--regression needs numeric targets)") from None
            else:
                if e.label not in label2id:
                    raise InputError(f"{source}: label {e.label!r} of example {i + 1} does not occur in "
                                     f"the training file (known: {list(label2id)})")
                f["labels"] = label2id[e.label]
        feats.append(f)
    n_trunc = sum(len(x) >= max_length for x in enc["input_ids"])
    if n_trunc:
        log.info("%s: %d of %d examples truncated to %d tokens", source, n_trunc, len(examples), max_length)
    return feats


def evaluate_sentences(outputs, features, labels: list[str] | None, regression: bool) -> tuple[dict, list]:
    """Metrics and per-example predictions (label strings, or floats for regression)."""
    if regression:
        preds = [float(np.asarray(o).reshape(-1)[0]) for o in outputs]
        gold = [f["labels"] for f in features]
        return regression_metrics(gold, preds), preds
    ids = [int(np.argmax(o)) for o in outputs]
    gold = [f["labels"] for f in features]
    metrics = classification_metrics(gold, ids, labels=list(range(len(labels))))
    return metrics, [labels[i] for i in ids]


# ----------------------------------------------------------------------------- tokens

def encode_tagged(sentences: list[TaggedSentence], tokenizer, max_length: int, label2id: dict,
                  source: str) -> list[dict]:
    """WordPiece over pre-split words; each word's label goes on its first sub-token and the
    other sub-tokens get -100 (ignored), the original BERT NER recipe. `_first` keeps, per
    word, the position of its first sub-token (-1 when truncated away or empty)."""
    enc = tokenizer([s.tokens for s in sentences], is_split_into_words=True, truncation=True,
                    max_length=max_length)
    feats, lost, unseen = [], 0, set()
    for i, s in enumerate(sentences):
        word_ids = enc.word_ids(i)
        first = [-1] * len(s.tokens)
        labels = []
        prev = None
        for pos, w in enumerate(word_ids):
            if w is None or w == prev:
                labels.append(-100)
            else:
                tag = s.tags[w]
                if tag not in label2id:
                    # an entity type never seen in training: scored as gold, but no loss target
                    unseen.add(tag)
                labels.append(label2id.get(tag, -100))
                first[w] = pos
            prev = w
        lost += sum(1 for j, p in enumerate(first) if p < 0 and s.tags[j] != "O")
        feats.append({"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i],
                      "attention_mask": enc["attention_mask"][i], "labels": labels, "_first": first})
    if unseen:
        log.warning("%s: tags %s do not occur in training; they can never be predicted", source, sorted(unseen))
    if lost:
        log.warning("%s: %d tagged words fall beyond --max-seq-length %d (or have no sub-tokens) and "
                    "are predicted as O", source, lost, max_length)
    return feats


def evaluate_tagged(outputs, features, sentences: list[TaggedSentence], labels: list[str]
                    ) -> tuple[dict, list[list[str]]]:
    preds = []
    for out, f in zip(outputs, features):
        ids = np.argmax(out, axis=-1)
        preds.append([labels[int(ids[p])] if p >= 0 else "O" for p in f["_first"]])
    return entity_scores([s.tags for s in sentences], preds), preds
