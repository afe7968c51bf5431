"""What a fine-tuning task is: how it reads and encodes its files, its head, its metrics, how it
writes predictions, and (here, shared by every task that trains a head) one run per seed.

A task is an object registered in `finetune/tasks/__init__.py`; a new task is one new file with
a `Task` subclass. The runner (`finetune/runner.py`) never asks which task it runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from data_prep.atomic import atomic_json

from .. import checkpoint
from ..readers import InputError
from ..train import predict, set_seed, train

TEST_PREFIX = "test_"  # predictions of --test FILE: OUT/seed_S/test_predictions.* (OUT/ without training)

if TYPE_CHECKING:
    from pretrain.model import BertConfig

    from ..runner import FinetuneArgs, Resolved


@dataclass
class TaskData:
    """Everything a run needs that does not depend on the seed (read and encoded once)."""

    train_examples: list
    eval_examples: list
    train_features: list[dict]
    eval_features: list[dict]
    labels: list[str] | None = None  # class names in id order (None: regression, QA)
    version_2: bool = False  # QA: SQuAD v2.0 (unanswerable questions), from the flag or the file
    # records the readers skipped as bad, "train: reason" / "eval: reason" -> count
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass
class TestData:
    """An unlabelled file to predict (GLUE test.tsv, SQuAD questions without answers, CoNLL
    tokens), encoded like the evaluation file."""

    source: str
    examples: list
    features: list[dict]
    ids: list[str] | None = None  # the file's own index column (GLUE submissions), when it has one
    version_2: bool = False  # QA: write null odds (SQuAD v2.0)



def label_config(names: list[str], regression: bool = False) -> dict:
    """config.json label entries of a classifier (transformers' id2label / problem_type)."""
    return {"num_labels": len(names), "id2label": {str(i): l for i, l in enumerate(names)},
            "label2id": {l: i for i, l in enumerate(names)},
            "problem_type": "regression" if regression else "single_label_classification"}


class Task:
    name: str
    architecture: str | None  # transformers class of the saved model (None: nothing is trained)
    supports_regression = False  # --regression (MSE head, Pearson/Spearman)
    default_max_seq_length = 128  # --max-seq-length when the user gives none

    def validate(self, a: FinetuneArgs) -> None:
        """Task-specific flag checks, before anything runs (`FinetuneArgs.validate` calls it)."""

    def read(self, a: FinetuneArgs, train_file: str, eval_file: str, tokenizer) -> TaskData:
        raise NotImplementedError

    def build_head(self, config: BertConfig, num_labels: int = 2, regression: bool = False) -> nn.Module:
        raise NotImplementedError

    def evaluate(self, a: FinetuneArgs, data: TaskData, outputs: list) -> tuple[dict, object]:
        """(metrics, predictions) from the model outputs on `data.eval_features`, in order."""
        raise NotImplementedError

    def save_predictions(self, data: TaskData, preds, out_dir: str) -> None:
        raise NotImplementedError

    def hf_config(self, labels: list[str] | None, regression: bool = False, data: TaskData | None = None) -> dict:
        """config.json entries of a saved model beyond the encoder's (architectures, labels, and
        what predicting with it later needs to know about the data it was trained on)."""
        return {"architectures": [self.architecture], "finetuning_task": self.name}

    def save_model(self, model: nn.Module, out_dir: str, tokenizer, labels: list[str] | None,
                   regression: bool = False, data: TaskData | None = None) -> None:
        """An HF directory transformers' `architecture` class loads (`finetune.tasks.load_finetuned` too)."""
        checkpoint.save_finetuned(model, out_dir, tokenizer, self.hf_config(labels, regression, data))

    # Prediction with a trained head: a labelled file scored against a saved model's labels, and
    # an unlabelled file written in its benchmark's submission format.
    def read_labelled(self, a: FinetuneArgs, path: str, tokenizer, labels: list[str] | None) -> TaskData:
        """`path` as the evaluation file of a saved model (`labels`: its id2label), no training file."""
        raise InputError(f"--task {self.name}: evaluating a saved model is not supported")

    def read_unlabelled(self, a: FinetuneArgs, path: str, tokenizer) -> TestData:
        raise InputError(f"--task {self.name}: --test (predictions for an unlabelled file) is not supported")

    def predict_unlabelled(self, a: FinetuneArgs, test: TestData, outputs: list, labels: list[str] | None):
        """Predictions from the model outputs on `test.features` (no gold to score against)."""
        raise NotImplementedError

    def save_test_predictions(self, test: TestData, preds, out_dir: str) -> None:
        raise NotImplementedError

    def predict_test(self, a: FinetuneArgs, test: TestData, model: nn.Module, pad_id: int,
                     labels: list[str] | None, out_dir: str, precision: str = "fp32") -> None:
        """`precision`: the forward pass's (`finetune.train.predict`), as for the evaluation file."""
        outputs = predict(model, test.features, a.train.eval_batch_size, pad_id, precision, a.train.progress)
        self.save_test_predictions(test, self.predict_unlabelled(a, test, outputs, labels), out_dir)

    def run_seed(self, run: Resolved, data: TaskData, seed: int, out_dir: str, test: TestData | None = None) -> dict:
        """Fine-tune a fresh head on the encoder for one seed; rank 0 evaluates and writes the
        losses, predictions (of `test` too) and model into `out_dir`. Returns the seed's metrics."""
        a, tok = run.args, run.tokenizer
        set_seed(seed)  # the head's initialisation depends on the seed too
        n_labels = len(data.labels) if data.labels else (1 if a.regression else 2)
        model = self.build_head(run.config, n_labels, a.regression)
        checkpoint.load_encoder_weights(model.bert, run.model_dir)
        model.to(run.device)
        try:
            model, stats = train(model, data.train_features, a.train, seed, tok.pad_token_id, run.ds_config)
        except ValueError as e:
            if run.ds_config is None:
                raise
            raise InputError(str(e)) from None
        losses = stats.pop("step_losses")
        if run.rank != 0:
            return dict(stats)  # rank 0 evaluates and writes; the others wait at the runner's barrier
        atomic_json(os.path.join(out_dir, "train_losses.json"), {"seed": seed, "losses": losses}, sort_keys=False)
        outputs = predict(model, data.eval_features, a.train.eval_batch_size, tok.pad_token_id,
                          stats["train_precision"], a.train.progress)
        metrics, preds = self.evaluate(a, data, outputs)
        metrics.update(stats)
        self.save_predictions(data, preds, out_dir)
        if test is not None:
            self.predict_test(a, test, model, tok.pad_token_id, data.labels, out_dir, stats["train_precision"])
        if a.save_model:
            self.save_model(model, out_dir, tok, data.labels, a.regression, data)
        return metrics
