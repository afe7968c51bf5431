"""Frozen features: vectors from any encoder layer, per token or pooled ([CLS], mean over the
real tokens, or the pooler output), saved as .npy, and a scikit-learn logistic regression
trained on the pooled vectors (the feature-based use of BERT, no fine-tuning)."""
from __future__ import annotations

import logging

import numpy as np
import torch

from .train import length_sorted_batches

log = logging.getLogger(__name__)

POOLINGS = ("cls", "mean", "pooler", "tokens")


@torch.no_grad()
def extract(encoder, features: list[dict], layer: int = -1, pooling: str = "mean",
            batch_size: int = 64, pad_id: int = 0):
    """pooled: float32 [N, H]. tokens: (float32 [total_tokens, H], int64 offsets [N + 1]) with
    example i's tokens (special tokens included) in rows offsets[i]:offsets[i + 1].
    `layer` indexes HF's hidden_states: 0 = embeddings, 1..L = layer outputs, -1 = last."""
    if pooling not in POOLINGS:
        raise ValueError(f"--pooling {pooling!r}: choose one of {POOLINGS}")
    n_layers = encoder.config.num_hidden_layers
    if not -(n_layers + 1) <= layer <= n_layers:
        raise ValueError(f"--layer {layer}: this model has hidden states 0..{n_layers} (or -1 for the last)")
    if pooling == "pooler" and (encoder.pooler is None or layer not in (-1, n_layers)):
        raise ValueError("--pooling pooler needs the pooler and the last layer (--layer -1)")
    encoder.eval()
    pooled = [None] * len(features)
    device = next(encoder.parameters()).device
    for idx, batch in length_sorted_batches(features, batch_size, pad_id):
        out = encoder(**{k: v.to(device) for k, v in batch.items()}, output_hidden_states=True)
        hidden = out.hidden_states[layer].float().cpu()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        for row, j in enumerate(idx):
            n = len(features[j]["input_ids"])
            if pooling == "cls":
                pooled[j] = hidden[row, 0].numpy()
            elif pooling == "mean":
                pooled[j] = ((hidden[row] * mask[row]).sum(0) / mask[row].sum()).numpy()
            elif pooling == "pooler":
                pooled[j] = out.pooler_output[row].float().cpu().numpy()
            else:
                pooled[j] = hidden[row, :n].numpy()
    if pooling == "tokens":
        offsets = np.cumsum([0] + [len(p) for p in pooled]).astype(np.int64)
        return np.concatenate(pooled).astype(np.float32), offsets
    return np.stack(pooled).astype(np.float32)


def logistic_regression(train_x, train_y, test_x, c: float = 1.0, seed: int = 0, max_iter: int = 3000):
    """L2 logistic regression (lbfgs) on the raw vectors; returns test predictions."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    clf.fit(train_x, train_y)
    return clf.predict(test_x)
