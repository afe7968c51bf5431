"""Extractive QA (`--task qa`): SQuAD v1.1 / v2.0 JSON, windows over long contexts and n-best
span decoding (`finetune/qa.py`), start/end logits on every token, EM / F1 with the official
normalisation (`finetune/squad_metrics.py`)."""
from __future__ import annotations

import os

from data_prep.atomic import atomic_json

from .. import qa
from ..modeling import BertForQuestionAnswering
from ..readers import InputError, prefixed, read_squad
from ..squad_metrics import squad_scores
from .base import Task, TaskData, limit


class QATask(Task):
    name = "qa"
    architecture = "BertForQuestionAnswering"

    def validate(self, a) -> None:
        if a.doc_stride < 1:
            raise InputError(f"--doc-stride {a.doc_stride}: must be >= 1")

    def read(self, a, train_file, eval_file, tokenizer) -> TaskData:
        train_skips, eval_skips = {}, {}
        train_ex, _ = read_squad(train_file, train_skips)
        eval_ex, version = read_squad(eval_file, eval_skips)
        train_ex = limit(train_ex, a.max_train_examples)
        eval_ex = limit(eval_ex, a.max_eval_examples)
        version_2 = a.version_2 if a.version_2 is not None else (
            str(version).lstrip("v").startswith("2") or any(e.is_impossible for e in eval_ex))
        L = a.max_seq_length
        try:
            train_f = qa.qa_features(train_ex, tokenizer, L, a.doc_stride, a.max_query_length, True)
            eval_f = qa.qa_features(eval_ex, tokenizer, L, a.doc_stride, a.max_query_length, False)
        except ValueError as e:
            raise InputError(str(e)) from None
        return TaskData(train_ex, eval_ex, train_f, eval_f, version_2=version_2,
                        skipped=prefixed(train=train_skips, eval=eval_skips))

    def build_head(self, config, num_labels=2, regression=False):
        return BertForQuestionAnswering(config)

    def evaluate(self, a, data, outputs):
        preds, nbest, null_odds = qa.decode(data.eval_examples, data.eval_features, outputs, a.n_best,
                                            a.max_answer_length, data.version_2, a.null_threshold)
        golds = {e.qid: [t for t, _ in e.answers] if not e.is_impossible else [] for e in data.eval_examples}
        return squad_scores(golds, preds), {"predictions": preds, "nbest": nbest, "null_odds": null_odds}

    def save_predictions(self, data, preds, out_dir):
        for name, obj in preds.items():
            atomic_json(os.path.join(out_dir, f"eval_{name}.json"), obj, sort_keys=False)


QA = QATask()
