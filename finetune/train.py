"""The fine-tuning loop shared by every task: AdamW over `pretrain.optim.optimizer_groups` (no decay
on biases and LayerNorm), `pretrain.optim`'s linear warm-up then linear decay, gradient clipping,
batches padded to their longest sequence. `train` runs it in plain single-process PyTorch, or,
given a DeepSpeed config, through a DeepSpeed engine (one or several processes). The tasks
(`finetune/tasks/`) supply features and evaluation."""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pretrain import precision as prec
from pretrain.optim import build_scheduler, optimizer_groups

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


def _scheduler(cfg: TrainConfig, total: int):
    """opt -> LambdaLR: linear warm-up over warmup_ratio * total steps, then linear decay to 0 at
    `total`. peak_step=warmup: fine-tuning's decay starts one update after pretraining's, as
    this loop always did (the published fine-tuning figures were measured with it)."""
    warmup = int(cfg.warmup_ratio * total)
    return lambda opt: build_scheduler(opt, warmup, total, peak_step=warmup,
                                       flag="warm-up steps (--warmup-ratio x steps)")


class _PlainStep:
    """torch AdamW in this process: the model runs as it is."""

    def __init__(self, model, cfg: TrainConfig, total: int):
        self.net = self.module = model
        self.max_grad_norm = cfg.max_grad_norm
        self.opt = torch.optim.AdamW(optimizer_groups(model, cfg.weight_decay), lr=cfg.learning_rate)
        self.sched = _scheduler(cfg, total)(self.opt)
        self.gnorm = None

    def step(self, loss) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.gnorm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        self.opt.step()
        self.sched.step()

    def grad_norm(self) -> float:
        return float(self.gnorm)

    def finish(self):
        self.net.eval()
        return self.module


class _EngineStep:
    """deepspeed.initialize over the same groups and schedule: engine.backward / engine.step
    (which clip, step, schedule and zero the gradients)."""

    def __init__(self, model, cfg: TrainConfig, total: int, ds_config: dict):
        import deepspeed  # optional and slow to import: only --deepspeed runs need it

        self.net, _, _, self.sched = deepspeed.initialize(
            model=model, model_parameters=optimizer_groups(model, cfg.weight_decay), config=ds_config,
            lr_scheduler=_scheduler(cfg, total))
        self.module = self.net.module

    def step(self, loss) -> None:
        self.net.backward(loss)
        self.net.step()

    def grad_norm(self) -> float:
        gnorm = self.net.get_global_grad_norm()
        return float(gnorm) if gnorm is not None else float("nan")

    def finish(self):
        self.net.eval()
        _full_fp32_weights(self.net)
        return self.module  # ZeRO-1/2: every rank holds the full fp32 weights


def _share(feats: list[dict], rank: int, world: int) -> tuple[list[dict], float]:
    """This rank's contiguous, disjoint share of a global batch and its weight (share x world /
    batch); a short last batch is split as evenly as possible, and a rank left without examples
    repeats the first one at weight 0."""
    bounds = [round(r * len(feats) / world) for r in range(world + 1)]
    mine = feats[bounds[rank]:bounds[rank + 1]]
    weight = len(mine) * world / len(feats)
    return (mine or feats[:1]), weight


def train(model, features: list[dict], cfg: TrainConfig, seed: int, pad_id: int = 0,
          ds_config: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """Train `model`; returns (the trained model, {"steps", "final_loss", "train_seconds",
    "step_losses"}). Feature keys starting with "_" are bookkeeping, not model inputs.

    Without `ds_config`: torch AdamW in this process, in place. With one (`deepspeed_config`;
    torch.distributed already initialised): the same loop through a DeepSpeed engine, in one or
    several processes. Every process draws the same shuffled order; a global batch is
    cfg.batch_size x world examples and rank r takes the r-th contiguous share of it. Each rank's
    loss is weighted by its share of the global batch, so with DeepSpeed's gradient averaging the
    update is that of the global-batch mean (exactly so for losses that are per-example means:
    classify, pair, qa; token loss is a per-rank mean over labelled tokens). The logged and
    returned per-step loss is the global-batch mean, all-reduced; the returned model is the
    engine's module with full fp32 weights."""
    if not features:
        raise ValueError("no training examples")
    distributed = ds_config is not None and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    if len(features) < world:
        raise ValueError(f"{len(features)} training examples for {world} processes")
    glob = cfg.batch_size * world
    total = cfg.max_steps if cfg.max_steps else max(1, math.ceil(cfg.epochs * math.ceil(len(features) / glob)))
    stepper = _PlainStep(model, cfg, total) if ds_config is None else _EngineStep(model, cfg, total, ds_config)
    set_seed(seed)  # after the engine is built: the same dropout stream and shuffle on every rank
    rng = random.Random(seed)
    stepper.net.train()
    step, t0, running = 0, time.time(), []
    where = f" (deepspeed, {world} processes)" if ds_config is not None else ""
    while step < total:
        for feats in _batches(features, glob, True, rng):
            mine, weight = _share(feats, rank, world)
            batch = collate([{k: v for k, v in f.items() if not k.startswith("_")} for f in mine], pad_id)
            loss, _ = stepper.net(**_to(batch, stepper.module))
            stepper.step(loss if weight == 1.0 else loss * weight)
            step += 1
            if world > 1:
                part = loss.detach().float().reshape(1) * (weight / world)
                dist.all_reduce(part)
                running.append(part.item())
            else:
                running.append(loss.item())
            if rank == 0 and (step % cfg.log_every == 0 or step == total):
                log.info("step %d/%d loss %.4f grad_norm %.3f lr %.2e %.1f s%s", step, total,
                         float(np.mean(running[-cfg.log_every:])), stepper.grad_norm(),
                         stepper.sched.get_last_lr()[0], time.time() - t0, where)
            if step >= total:
                break
    model = stepper.finish()
    return model, {"steps": step, "final_loss": float(np.mean(running[-cfg.log_every:])),
                   "train_seconds": round(time.time() - t0, 2), "step_losses": running}


def deepspeed_config(path: str, cfg: TrainConfig, world_size: int, device: str = "cpu") -> dict:
    """The DeepSpeed config in `path`, completed from the loop's own settings. --batch-size is
    the one source of truth for the per-process micro batch: a config that names another
    train_micro_batch_size_per_gpu (or a train_batch_size other than batch x world) is an
    error. The learning rate and weight decay come from the command line; the schedule is the
    loop's (passed to deepspeed.initialize), so the config must not name a scheduler."""
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
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    requested = prec.requested_precision(ds)
    chosen, warning = prec.resolve(requested, device, path)
    if warning:
        log.warning("precision: %s", warning)
    return prec.apply_precision(ds, chosen)


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
