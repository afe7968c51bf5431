"""What a fine-tuning task is: how it reads and encodes its files, its head, its metrics, how it
writes predictions, and (here, shared by every task that trains a head) one run per seed.

A task is an object registered in `finetune/tasks/__init__.py`; a new task is one new file with
a `Task` subclass. The runner (`finetune/runner.py`) never asks which task it runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from data_prep.atomic import atomic_json

from .. import checkpoint
from ..readers import InputError
from ..train import predict, set_seed, train

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


def limit(items: list, n: int | None) -> list:
    """The first `n` items (--max-train-examples / --max-eval-examples); all when n is None or 0."""
    return items[:n] if n else items


def label_config(names: list[str], regression: bool = False) -> dict:
    """config.json label entries of a classifier (transformers' id2label / problem_type)."""
    return {"num_labels": len(names), "id2label": {str(i): l for i, l in enumerate(names)},
            "label2id": {l: i for i, l in enumerate(names)},
            "problem_type": "regression" if regression else "single_label_classification"}


class Task:
    name: str
    architecture: str | None  # transformers class of the saved model (None: nothing is trained)
    supports_regression = False  # --regression (MSE head, Pearson/Spearman)

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

    def hf_config(self, labels: list[str] | None, regression: bool = False) -> dict:
        """config.json entries of a saved model beyond the encoder's (architectures, labels)."""
        return {"architectures": [self.architecture], "finetuning_task": self.name}

    def save_model(self, model: nn.Module, out_dir: str, tokenizer, labels: list[str] | None,
                   regression: bool = False) -> None:
        """An HF directory transformers' `architecture` class loads (`finetune.tasks.load_finetuned` too)."""
        checkpoint.save_finetuned(model, out_dir, tokenizer, self.hf_config(labels, regression))

    def run_seed(self, run: Resolved, data: TaskData, seed: int, out_dir: str) -> dict:
        """Fine-tune a fresh head on the encoder for one seed; rank 0 evaluates and writes the
        losses, predictions and model into `out_dir`. Returns the seed's metrics."""
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
        if a.save_model:
            self.save_model(model, out_dir, tok, data.labels, a.regression)
        return metrics
