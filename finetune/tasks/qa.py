"""Extractive QA (`--task qa`): SQuAD v1.1 / v2.0 JSON, windows over long contexts and n-best
span decoding (`finetune/qa.py`), start/end logits on every token, EM / F1 with the official
normalisation (`finetune/squad_metrics.py`)."""
from __future__ import annotations

import os

from data_prep.atomic import atomic_json

from .. import qa
from ..modeling import BertForQuestionAnswering
from ..readers import InputError, limit, prefixed, read_squad
from ..squad_metrics import squad_scores
from .base import TEST_PREFIX, Task, TaskData, TestData


class QATask(Task):
    name = "qa"
    architecture = "BertForQuestionAnswering"
    default_max_seq_length = 384  # BERT's SQuAD setting (with --doc-stride 128)

    def validate(self, a) -> None:
        if a.doc_stride < 1:
            raise InputError(f"--doc-stride {a.doc_stride}: must be >= 1")
        # The context window a question of --max-query-length tokens leaves ([CLS] and two [SEP]
        # beside it); windows overlap only if they start closer than that. Shorter questions leave
        # longer windows, so this is the worst case (qa_features checks each question too).
        window = a.max_seq_length - a.max_query_length - 3
        if window < 1:
            raise InputError(f"--max-seq-length {a.max_seq_length} leaves no context after a "
                             f"{a.max_query_length}-token question (--max-query-length); raise the first "
                             "or lower the second")
        if a.doc_overlap is not None:
            if not 0 <= a.doc_overlap < window:
                raise InputError(f"--doc_stride {a.doc_overlap} (transformers' meaning: the overlap of "
                                 f"windows) must be >= 0 and below the {window} context tokens a window holds "
                                 f"at --max-seq-length {a.max_seq_length} and --max-query-length {a.max_query_length}")
        elif a.doc_stride >= window:
            raise InputError(
                f"--doc-stride {a.doc_stride} with --max-seq-length {a.max_seq_length}: windows hold "
                f"{window} context tokens (after a {a.max_query_length}-token question, [CLS] and two "
                f"[SEP]), so they would not overlap; use a --doc-stride below {window}, a longer "
                "--max-seq-length or a shorter --max-query-length (BERT's SQuAD setting: 384, 128, 64)")

    def read(self, a, train_file, eval_file, tokenizer) -> TaskData:
        train_skips, eval_skips = {}, {}
        train_ex, train_version = read_squad(train_file, train_skips)
        eval_ex, version = read_squad(eval_file, eval_skips, purpose="eval")
        train_ex = limit(train_ex, a.max_train_examples)
        eval_ex = limit(eval_ex, a.max_eval_examples)
        return TaskData(train_ex, eval_ex, self._features(a, train_ex, tokenizer, True),
                        self._features(a, eval_ex, tokenizer, False),
                        # v2.0 when either file is: a model trained on unanswerable questions abstains
                        version_2=_version_2(a, version, eval_ex) or _version_2(a, train_version, train_ex),
                        skipped=prefixed(train=train_skips, eval=eval_skips))

    def _features(self, a, examples, tokenizer, train: bool) -> list[dict]:
        try:
            return qa.qa_features(examples, tokenizer, a.max_seq_length, a.doc_stride, a.max_query_length, train,
                                  overlap=a.doc_overlap)
        except ValueError as e:
            raise InputError(str(e)) from None

    def build_head(self, config, num_labels=2, regression=False):
        return BertForQuestionAnswering(config)

    def evaluate(self, a, data, outputs):
        preds, nbest, null_odds = qa.decode(data.eval_examples, data.eval_features, outputs, a.n_best,
                                            a.max_answer_length, data.version_2, a.null_threshold)
        golds = {e.qid: [t for t, _ in e.answers] if not e.is_impossible else [] for e in data.eval_examples}
        return squad_scores(golds, preds), {"predictions": preds, "nbest": nbest, "null_odds": null_odds}

    def hf_config(self, labels, regression=False, data=None):
        # run_qa.py's name: a saved v2.0 model abstains when it predicts a test file later
        extra = {"version_2_with_negative": bool(data.version_2)} if data is not None else {}
        return {**super().hf_config(labels, regression, data), **extra}

    def save_predictions(self, data, preds, out_dir):
        for name, obj in preds.items():
            atomic_json(os.path.join(out_dir, f"eval_{name}.json"), obj, sort_keys=False)

    def read_labelled(self, a, path, tokenizer, labels) -> TaskData:
        ex, version = read_squad(path, purpose="eval")
        ex = limit(ex, a.max_eval_examples)
        return TaskData([], ex, [], self._features(a, ex, tokenizer, False), version_2=_version_2(a, version, ex))

    def read_unlabelled(self, a, path, tokenizer) -> TestData:
        ex, version = read_squad(path, purpose="test")
        ex = limit(ex, a.max_test_examples)
        return TestData(path, ex, self._features(a, ex, tokenizer, False), version_2=_version_2(a, version, ex))

    def predict_unlabelled(self, a, test, outputs, labels):
        preds, nbest, null_odds = qa.decode(test.examples, test.features, outputs, a.n_best,
                                            a.max_answer_length, test.version_2, a.null_threshold)
        out = {"predictions": preds, "nbest_predictions": nbest}
        return {**out, "null_odds": null_odds} if test.version_2 else out

    def save_test_predictions(self, test, preds, out_dir):
        """The official formats: predictions.json {id: answer text} ("" = no answer) and, for
        v2.0, null_odds.json {id: null score - best span score}; here as test_*.json."""
        for name, obj in preds.items():
            atomic_json(os.path.join(out_dir, f"{TEST_PREFIX}{name}.json"), obj, sort_keys=False)


def _version_2(a, version: str, examples) -> bool:
    """SQuAD v2.0 (unanswerable questions): --version-2/--version-1, else the file's "version",
    else whether any question is marked unanswerable."""
    if a.version_2 is not None:
        return a.version_2
    return str(version).lstrip("v").startswith("2") or any(e.is_impossible for e in examples)


QA = QATask()
