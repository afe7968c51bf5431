"""The fine-tuning loop shared by every task: AdamW (no decay on biases and LayerNorm),
linear warm-up then linear decay, gradient clipping, batches padded to their longest
sequence. Plain single-process PyTorch by default; `train_deepspeed` runs the same loop
through a DeepSpeed engine (one or several processes). The task modules supply features
and evaluation."""
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


def _schedule(cfg: TrainConfig, total: int):
    """Linear warm-up over warmup_ratio * total steps, then linear decay to 0 (a LambdaLR factor)."""
    warmup = int(cfg.warmup_ratio * total)
    return lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))


def _param_groups(model, cfg: TrainConfig) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(model, features: list[dict], cfg: TrainConfig, seed: int, pad_id: int = 0) -> dict:
    """Train in place; returns {"steps", "final_loss", "train_seconds", "step_losses"}. Feature
    keys starting with "_" are bookkeeping and are not passed to the model."""
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
            "train_seconds": round(time.time() - t0, 2), "step_losses": running}


def deepspeed_config(path: str, cfg: TrainConfig, world_size: int, device: str = "cpu") -> dict:
    """The DeepSpeed config in `path`, completed from the loop's own settings. --batch-size is
    the one source of truth for the per-process micro batch: a config that names another
    train_micro_batch_size_per_gpu (or a train_batch_size other than batch x world) is an
    error. The learning rate and weight decay come from the command line; the schedule is the
    loop's (passed to deepspeed.initialize), so the config must not name a scheduler."""
    import json

    with open(path, encoding="utf-8") as f:
        ds = json.load(f)
    micro = ds.get("train_micro_batch_size_per_gpu")
    if micro is not None and micro != "auto" and int(micro) != cfg.batch_size:
        raise ValueError(f"{path}: train_micro_batch_size_per_gpu {micro} disagrees with --batch-size "
                         f"{cfg.batch_size} (the per-process batch; drop it from the config or make them equal)")
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    gas = ds.get("gradient_accumulation_steps", 1)
    if gas not in (1, "auto"):
        raise ValueError(f"{path}: gradient_accumulation_steps {gas}: the fine-tuning loop steps every batch "
                         "(use 1, and a larger --batch-size or more processes)")
    ds["gradient_accumulation_steps"] = 1
    tbs = ds.get("train_batch_size")
    if tbs is not None and tbs != "auto" and int(tbs) != cfg.batch_size * world_size:
        raise ValueError(f"{path}: train_batch_size {tbs} is not --batch-size {cfg.batch_size} x "
                         f"{world_size} processes")
    ds["train_batch_size"] = cfg.batch_size * world_size
    if "scheduler" in ds:
        raise ValueError(f"{path}: remove \"scheduler\": the loop's warm-up/decay (--warmup-ratio) is used")
    if int(ds.get("zero_optimization", {}).get("stage", 0)) > 2:
        raise ValueError(f"{path}: ZeRO stage 3 partitions the weights that evaluation and saving read "
                         "on rank 0; use stage 0, 1 or 2")
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    params = opt.setdefault("params", {})
    params["lr"] = cfg.learning_rate
    params["weight_decay"] = cfg.weight_decay  # per group: 0 for biases and LayerNorm
    if ds.get("gradient_clipping") is None:
        ds["gradient_clipping"] = cfg.max_grad_norm
    # The pretraining configs say "bf16": {"enabled": "auto"}: the same resolution as pretraining
    # (native precision of the device; an explicit bf16 on a CPU that emulates it warns once).
    from pretrain import precision as prec

    device = "cuda" if str(device).startswith("cuda") else "cpu"
    requested = prec.requested_precision(ds)
    chosen, warning = prec.resolve(requested, device, path)
    if warning:
        log.warning("precision: %s", warning)
    return prec.apply_precision(ds, chosen)


def train_deepspeed(model, features: list[dict], cfg: TrainConfig, seed: int, ds_config: dict,
                    pad_id: int = 0) -> tuple[object, dict]:
    """The loop of `train` through deepspeed.initialize (engine.backward / engine.step), in one
    or several processes (torch.distributed already initialised). Every process draws the same
    shuffled order; a global batch is cfg.batch_size x world examples and rank r takes the r-th
    contiguous share of it. Each rank's loss is weighted by its share of the global batch, so
    with DeepSpeed's gradient averaging the update is that of the global-batch mean (exactly so
    for losses that are per-example means: classify, pair, qa; token loss is a per-rank mean
    over labelled tokens). The logged and returned per-step loss is the global-batch mean,
    all-reduced. Returns (engine, stats); engine.module is the trained model."""
    import deepspeed
    import torch.distributed as dist

    if not features:
        raise ValueError("no training examples")
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    glob = cfg.batch_size * world
    per_epoch = math.ceil(len(features) / glob)
    total = cfg.max_steps if cfg.max_steps else max(1, math.ceil(cfg.epochs * per_epoch))
    if len(features) < world:
        raise ValueError(f"{len(features)} training examples for {world} processes")
    lam = _schedule(cfg, total)
    engine, _, _, sched = deepspeed.initialize(
        model=model, model_parameters=_param_groups(model, cfg), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lam))
    set_seed(seed)  # as in `train`: the same dropout stream and shuffle on every rank
    rng = random.Random(seed)
    engine.train()
    step, t0, running = 0, time.time(), []
    while step < total:
        for feats in _batches(features, glob, True, rng):
            n_all = len(feats)
            # contiguous, disjoint shares of the global batch; a short last batch is split as
            # evenly as possible (a rank left without examples repeats the first one at weight 0)
            bounds = [round(r * n_all / world) for r in range(world + 1)]
            mine = feats[bounds[rank]:bounds[rank + 1]]
            weight = len(mine) * world / n_all
            if not mine:
                mine = feats[:1]
            batch = collate([{k: v for k, v in f.items() if not k.startswith("_")} for f in mine], pad_id)
            loss, _ = engine(**_to(batch, engine.module))
            engine.backward(loss if weight == 1.0 else loss * weight)
            engine.step()
            step += 1
            if world > 1:
                part = loss.detach().float().reshape(1) * (weight / world)
                dist.all_reduce(part)
                running.append(part.item())
            else:
                running.append(loss.item())
            if step % cfg.log_every == 0 or step == total:
                if rank == 0:
                    gnorm = engine.get_global_grad_norm()
                    log.info("step %d/%d loss %.4f grad_norm %.3f lr %.2e %.1f s (deepspeed, %d processes)",
                             step, total, float(np.mean(running[-cfg.log_every:])),
                             float(gnorm) if gnorm is not None else float("nan"),
                             sched.get_last_lr()[0], time.time() - t0, world)
            if step >= total:
                break
    engine.eval()
    _full_fp32_weights(engine)
    return engine, {"steps": step, "final_loss": float(np.mean(running[-cfg.log_every:])),
                    "train_seconds": round(time.time() - t0, 2), "step_losses": running}


@torch.no_grad()
def _full_fp32_weights(engine) -> None:
    """Make engine.module fp32 with the optimizer's fp32 master weights (bf16/fp16 engines keep
    low-precision module weights; a collective, so every rank calls it). fp32 ZeRO-0/1/2 modules
    already hold the full fp32 weights on every rank."""
    module = engine.module
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return
    from deepspeed.utils import safe_get_full_fp32_param

    full = {name: safe_get_full_fp32_param(p) for name, p in module.named_parameters()}
    module.float()
    for name, p in module.named_parameters():
        if full[name] is not None:
            p.data.copy_(full[name].reshape(p.shape))


def length_sorted_batches(features: list[dict], batch_size: int, pad_id: int = 0):
    """Yield (indices, padded model inputs) over features sorted by length, so that evaluation
    computes little padding; callers put results back at `indices`."""
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    keep = ("input_ids", "token_type_ids", "attention_mask")
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        yield idx, collate([{k: features[j][k] for k in keep} for j in idx], pad_id)


@torch.no_grad()
def predict(model, features: list[dict], batch_size: int = 64, pad_id: int = 0) -> list:
    """Model outputs per feature, in order, as numpy arrays (logits; for QA a (start, end)
    pair), cut back to each feature's own length. Evaluation batches are formed from
    features sorted by length so that little padding is computed."""
    model.eval()
    out = [None] * len(features)
    for idx, batch in length_sorted_batches(features, batch_size, pad_id):
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
