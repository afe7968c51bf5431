"""The fine-tuning loop shared by every task: AdamW (no decay on biases and LayerNorm),
linear warm-up then linear decay, gradient clipping, batches padded to their longest
sequence. Plain single-process PyTorch; the task modules supply features and evaluation."""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

# pad values per feature key; anything else is a per-example scalar
_PAD = {"input_ids": 0, "token_type_ids": 0, "attention_mask": 0, "labels_seq": -100}


@dataclass
class TrainConfig:
    learning_rate: float = 5e-5
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 32
    eval_batch_size: int = 64
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    log_every: int = 20


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def collate(features: list[dict], pad_id: int = 0) -> dict:
    """Pad the sequence keys to the batch's longest; `labels` that are lists are token labels."""
    out = {}
    longest = max(len(f["input_ids"]) for f in features)
    for key in features[0]:
        vals = [f[key] for f in features]
        if isinstance(vals[0], (list, tuple)):
            pad = pad_id if key == "input_ids" else _PAD.get("labels_seq" if key == "labels" else key, 0)
            out[key] = torch.tensor([list(v) + [pad] * (longest - len(v)) for v in vals], dtype=torch.long)
        elif isinstance(vals[0], float):
            out[key] = torch.tensor(vals, dtype=torch.float)
        else:
            out[key] = torch.tensor(vals, dtype=torch.long)
    return out


def _batches(features, batch_size, shuffle, rng):
    order = list(range(len(features)))
    if shuffle:
        rng.shuffle(order)
    for i in range(0, len(order), batch_size):
        yield [features[j] for j in order[i:i + batch_size]]


def _to(batch: dict, model) -> dict:
    """The batch on the model's device (CPU here; a GPU when the model was moved there)."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items() if not k.startswith("_")}


def train(model, features: list[dict], cfg: TrainConfig, seed: int, pad_id: int = 0) -> dict:
    """Train in place; returns {"steps", "final_loss", "seconds"}. Feature keys starting with
    "_" are bookkeeping and are not passed to the model."""
    if not features:
        raise ValueError("no training examples")
    set_seed(seed)
    rng = random.Random(seed)
    per_epoch = math.ceil(len(features) / cfg.batch_size)
    total = cfg.max_steps if cfg.max_steps else max(1, math.ceil(cfg.epochs * per_epoch))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate)
    warmup = int(cfg.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    model.train()
    step, t0, running = 0, time.time(), []
    while step < total:
        for feats in _batches(features, cfg.batch_size, True, rng):
            batch = collate([{k: v for k, v in f.items() if not k.startswith("_")} for f in feats], pad_id)
            loss, _ = model(**_to(batch, model))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            running.append(loss.item())
            if step % cfg.log_every == 0 or step == total:
                log.info("step %d/%d loss %.4f grad_norm %.3f lr %.2e %.1f s", step, total,
                         float(np.mean(running[-cfg.log_every:])), float(gnorm), sched.get_last_lr()[0],
                         time.time() - t0)
            if step >= total:
                break
    model.eval()
    return {"steps": step, "final_loss": float(np.mean(running[-cfg.log_every:])),
            "train_seconds": round(time.time() - t0, 2)}


@torch.no_grad()
def predict(model, features: list[dict], batch_size: int = 64, pad_id: int = 0) -> list:
    """Model outputs per feature, in order, as numpy arrays (logits; for QA a (start, end)
    pair), cut back to each feature's own length. Evaluation batches are formed from
    features sorted by length so that little padding is computed."""
    model.eval()
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    out = [None] * len(features)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        keep = ("input_ids", "token_type_ids", "attention_mask")
        batch = collate([{k: features[j][k] for k in keep} for j in idx], pad_id)
        _, logits = model(**_to(batch, model))
        for row, j in enumerate(idx):
            n = len(features[j]["input_ids"])
            if isinstance(logits, tuple):
                out[j] = tuple(t[row, :n].float().cpu().numpy() for t in logits)
            elif logits.dim() == 3:
                out[j] = logits[row, :n].float().cpu().numpy()
            else:
                out[j] = logits[row].float().cpu().numpy()
    return out
