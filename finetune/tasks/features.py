"""Frozen features (`--task features`): the sentence files of `classify`, or of `pair` when the
file has two text columns (a GLUE pair header, or --text-b-column), vectors from any encoder
layer (`finetune/features.py`) saved as .npy, and a logistic regression on the pooled vectors
instead of a fine-tuned head."""
from __future__ import annotations

import os

import numpy as np

from data_prep.atomic import atomic_write
from pretrain.model import BertModel

from .. import checkpoint
from .. import features as feat
from ..metrics import classification_metrics
from ..readers import InputError
from .sentence import SentenceTask


def _save_npy(path: str, array) -> None:
    with atomic_write(path, "wb") as f:
        np.save(f, array)


class FeaturesTask(SentenceTask):
    architecture = None
    supports_regression = False

    def __init__(self):
        super().__init__("features", pair=None)  # None: from the file, [CLS] A [SEP] B [SEP] for pairs

    def validate(self, a) -> None:
        if a.deepspeed is not None:
            raise InputError("--deepspeed applies to the fine-tuning tasks, not --task features")

    def run_seed(self, run, data, seed, out_dir, test=None) -> dict:
        """Vectors of the train and eval files (`OUT/seed_S/{train,eval}_features.npy`, plus
        `_offsets.npy` for --pooling tokens) and, when pooled and labelled, the accuracy of a
        logistic regression (seeded) trained on them."""
        a = run.args
        encoder = BertModel(run.config, add_pooling_layer=True)
        checkpoint.load_encoder_weights(encoder, run.model_dir)
        encoder.to(run.device)
        pad = run.tokenizer.pad_token_id
        try:
            tr = feat.extract(encoder, data.train_features, a.layer, a.pooling, a.train.eval_batch_size, pad)
            ev = feat.extract(encoder, data.eval_features, a.layer, a.pooling, a.train.eval_batch_size, pad)
        except ValueError as e:
            raise InputError(str(e)) from None
        for name, x in (("train", tr), ("eval", ev)):
            if isinstance(x, tuple):
                _save_npy(os.path.join(out_dir, f"{name}_features.npy"), x[0])
                _save_npy(os.path.join(out_dir, f"{name}_offsets.npy"), x[1])
            else:
                _save_npy(os.path.join(out_dir, f"{name}_features.npy"), x)
        metrics = {"feature_dim": int((tr[0] if isinstance(tr, tuple) else tr).shape[-1])}
        if a.pooling != "tokens" and data.labels:
            y_tr = np.array([f["labels"] for f in data.train_features])
            y_ev = np.array([f["labels"] for f in data.eval_features])
            _save_npy(os.path.join(out_dir, "train_labels.npy"), y_tr)
            _save_npy(os.path.join(out_dir, "eval_labels.npy"), y_ev)
            pred = feat.logistic_regression(tr, y_tr, ev, a.classifier_c, seed)
            metrics.update(classification_metrics(y_ev.tolist(), pred.tolist(), list(range(len(data.labels)))))
        return metrics


FEATURES = FeaturesTask()
