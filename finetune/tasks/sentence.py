"""Sentence and sentence-pair classification / regression (`--task classify`, `--task pair`):
GLUE-style TSV/CSV/JSONL files, [CLS] A [SEP] (B [SEP]), a linear head on the pooled [CLS]
vector, accuracy / F1 / Matthews (Pearson / Spearman with --regression)."""
from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter

import numpy as np

from data_prep.atomic import atomic_write

from ..metrics import classification_metrics, regression_metrics
from ..modeling import BertForSequenceClassification
from ..readers import InputError, TextExample, limit, prefixed, read_text_file
from .base import TEST_PREFIX, Task, TaskData, TestData, label_config

log = logging.getLogger(__name__)


def _number(label: str) -> float | None:
    try:
        value = float(label)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _label_key(label: str):
    value = _number(label)
    return (1, 0.0, label) if value is None else (0, value, label)


# a whole number as a file may spell it: "1", "+1", "01", "1.0", "1.00" (no exponent, no "_")
_WHOLE = re.compile(r"[+-]?(\d+)(?:\.0*)?")


def _whole(label: str) -> int | None:
    m = _WHOLE.fullmatch(label.strip())
    return None if m is None else (-1 if label.strip().startswith("-") else 1) * int(m.group(1))


def label_list(labels) -> list[str]:
    """The classes in a stable order: numeric labels by value ("-1" < "1"), others alphabetically.
    When every label is a whole number, spellings of one number ("1", "1.0", "01": a column that
    went through a float somewhere) are one class, named by its most frequent spelling (`class_id`
    maps every spelling to it); a column with any other label (codes such as "250.1", "V45") keeps
    every spelling as its own class."""
    counts = Counter(labels)
    if any(_whole(label) is None for label in counts):
        return sorted(counts, key=_label_key)
    names, seen = [], set()
    for label, _ in sorted(counts.items(), key=lambda kv: (-kv[1], len(kv[0]), kv[0])):
        if _whole(label) not in seen:
            names.append(label)
            seen.add(_whole(label))
    if len(names) < len(counts):
        merged = sorted(set(counts) - set(names), key=_label_key)
        log.warning("labels %s spell the same whole number as another label and join its class (classes: %s)",
                    merged[:5], sorted(names, key=_label_key)[:10])
    return sorted(names, key=_label_key)


def class_id(label: str, label2id: dict) -> int | None:
    """`label`'s class in `label2id`: the same string, or, when every class is a whole number, the
    same number spelt another way."""
    if label in label2id:
        return label2id[label]
    value = _whole(label)
    if value is None or any(_whole(name) is None for name in label2id):
        return None
    return next((i for name, i in label2id.items() if _whole(name) == value), None)


# more distinct numeric labels than this, each with about one example, look like a score or an id
MAX_NUMERIC_CLASSES = 20


def refuse_scores(labels: list[str], source: str, can_regress: bool, counts: dict[str, int] | None = None) -> None:
    """Numeric labels with fractions ('3.800', STS-B), or many distinct numbers with hardly two
    examples each (a 0-100 rating, an id column), are a target to regress, which a classifier would
    silently treat as that many unrelated classes. Many integer classes with examples enough
    (banking77's 77 intents) stay classes, with a warning when some have fewer than two.
    `counts`: training examples per label."""
    values = []
    for label in labels:
        try:
            values.append(float(label))
        except ValueError:
            return
    fractional = [l for l, v in zip(labels, values) if math.isfinite(v) and v != round(v)]
    many = len(labels) > MAX_NUMERIC_CLASSES
    rare = [l for l in labels if (counts or {}).get(l, 0) < 2]
    sparse = many and (counts is None or sum(counts.values()) < 2 * len(labels))
    if not fractional and not sparse:
        if many and rare:
            log.warning("%s: %d numeric labels kept as classes, %d of them with fewer than 2 training "
                        "examples (e.g. %s); if the label is a score or a rating, pass --regression",
                        source, len(labels), len(rare), rare[:3])
        return
    fix = ("pass --regression to predict the number" if can_regress else
           "--task features trains a classifier: use --task classify or pair with --regression")
    raise InputError(f"{source}: the labels look like scores, not classes ({len(labels)} distinct numbers, "
                     f"e.g. {(fractional or labels)[:3]}); {fix}, or name the right column with --label-column")


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
                label = class_id(e.label, label2id)
                if label is None:
                    raise InputError(f"{source}: label {e.label!r} of example {i + 1} does not occur in "
                                     f"the training file (known: {list(label2id)})")
                f["labels"] = label
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


class SentenceTask(Task):
    architecture = "BertForSequenceClassification"
    supports_regression = True

    def __init__(self, name: str, pair: bool | None):
        self.name, self.pair = name, pair  # None: pairs when the file has two text columns

    def read(self, a, train_file, eval_file, tokenizer) -> TaskData:
        kw = dict(pair=self.pair, text_column=a.text_column, text_b_column=a.text_b_column,
                  label_column=a.label_column, has_header=not a.no_header)
        train_skips, eval_skips = {}, {}
        train_ex = limit(read_text_file(train_file, skipped=train_skips, **kw), a.max_train_examples)
        eval_ex = limit(read_text_file(eval_file, skipped=eval_skips, **kw), a.max_eval_examples)
        n_texts = [1 if ex[0].text_b is None else 2 for ex in (train_ex, eval_ex)]
        if n_texts[0] != n_texts[1]:
            raise InputError(f"{eval_file} has {n_texts[1]} text column(s) but {train_file} {n_texts[0]}; "
                             "give both files the same layout (or name the columns with --text-b-column)")
        labels = None
        if not a.regression:
            labels = label_list(e.label for e in train_ex)
            if len(labels) < 2:
                raise InputError(f"{train_file}: only one label ({labels}); a classifier "
                                 "needs at least two (or pass --regression)")
        l2i = {l: i for i, l in enumerate(labels)} if labels else None
        if labels:
            per_class = Counter(class_id(e.label, l2i) for e in train_ex)
            refuse_scores(labels, train_file, self.supports_regression,
                          {l: per_class[i] for l, i in l2i.items()})
        L = a.max_seq_length
        return TaskData(train_ex, eval_ex,
                        encode_sentences(train_ex, tokenizer, L, l2i, a.regression, train_file),
                        encode_sentences(eval_ex, tokenizer, L, l2i, a.regression, eval_file), labels,
                        skipped=prefixed(train=train_skips, eval=eval_skips))

    def build_head(self, config, num_labels=2, regression=False):
        return BertForSequenceClassification(config, num_labels, regression)

    def evaluate(self, a, data, outputs):
        return evaluate_sentences(outputs, data.eval_features, data.labels, a.regression)

    def save_predictions(self, data, preds, out_dir):
        with atomic_write(os.path.join(out_dir, "eval_predictions.tsv"), "w", encoding="utf-8") as f:
            f.write("index\tprediction\tlabel\n")
            # the gold label as its class is named (a "1.0" of class "1" is written "1"), so that the
            # two columns compare as text
            gold = [data.labels[f["labels"]] if data.labels and "labels" in f else e.label
                    for e, f in zip(data.eval_examples, data.eval_features)]
            f.writelines(f"{i}\t{p}\t{g}\n" for i, (p, g) in enumerate(zip(preds, gold)))

    def hf_config(self, labels, regression=False, data=None):
        return {**super().hf_config(labels, regression, data),
                **label_config(["score"] if regression else labels, regression)}

    def read_labelled(self, a, path, tokenizer, labels):
        kw = dict(pair=self.pair, text_column=a.text_column, text_b_column=a.text_b_column,
                  label_column=a.label_column, has_header=not a.no_header)
        ex = limit(read_text_file(path, **kw), a.max_eval_examples)
        l2i = None if a.regression else {l: i for i, l in enumerate(labels)}
        return TaskData([], ex, [], encode_sentences(ex, tokenizer, a.max_seq_length, l2i, a.regression, path), labels)

    def read_unlabelled(self, a, path, tokenizer):
        """GLUE test.tsv (columns index, sentence or index, sentence1, sentence2): no label column;
        the index column, when the file has one, numbers the predictions."""
        ex = limit(read_text_file(path, pair=self.pair, text_column=a.text_column, text_b_column=a.text_b_column,
                                  has_header=not a.no_header, require_label=False, strict=True),
                   a.max_test_examples)
        ids = [e.id for e in ex] if ex and all(e.id is not None for e in ex) else None
        feats = encode_sentences(ex, tokenizer, a.max_seq_length, None, False, path)
        return TestData(path, ex, feats, ids)

    def predict_unlabelled(self, a, test, outputs, labels):
        if a.regression:
            return [float(np.asarray(o).reshape(-1)[0]) for o in outputs]
        return [labels[int(np.argmax(o))] for o in outputs]

    def save_test_predictions(self, test, preds, out_dir):
        """GLUE's submission layout: `index` TAB `prediction` (label names; numbers for regression)."""
        ids = test.ids or [str(i) for i in range(len(preds))]
        with atomic_write(os.path.join(out_dir, f"{TEST_PREFIX}predictions.tsv"), "w", encoding="utf-8") as f:
            f.write("index\tprediction\n")
            f.writelines(f"{i}\t{p:.6g}\n" if isinstance(p, float) else f"{i}\t{p}\n" for i, p in zip(ids, preds))


CLASSIFY = SentenceTask("classify", pair=False)
PAIR = SentenceTask("pair", pair=True)
