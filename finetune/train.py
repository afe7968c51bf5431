"""The fine-tuning loop shared by every task: AdamW over `pretrain.optim.optimizer_groups` (no decay
on biases and LayerNorm), `pretrain.optim`'s linear warm-up then linear decay, gradient clipping,
length-bucketed batches padded to their longest sequence (the unpadded encoder then skips the
padding). `train` runs it in plain single-process PyTorch, or, given a DeepSpeed config,
through a DeepSpeed engine (one or several processes). The tasks (`finetune/tasks/`) supply
features and evaluation.

One optimizer update consumes batch_size x processes x gradient_accumulation_steps examples. Its
loss is the mean over the loss terms of that whole batch (examples; labelled tokens for token
labelling): every share of it (a micro-batch on one process) contributes the sum of its terms
divided by the term count of the whole update, so that any split gives the gradient of one step
on the whole batch. Mixed precision (`precision`): the plain loop runs the forward pass under
torch.autocast (bf16, or fp16 with a dynamic-loss-scale GradScaler) over fp32 master weights; a
DeepSpeed engine runs the precision its config names (`pretrain.precision` resolves both)."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pretrain import precision as prec
from pretrain.optim import build_scheduler, optimizer_groups
from pretrain.unpad import TokenLayout

from .readers import InputError

log = logging.getLogger(__name__)

# pad values per feature key; anything else is a per-example scalar
_PAD = {"input_ids": 0, "token_type_ids": 0, "attention_mask": 0, "labels_seq": -100}
PRECISION_CHOICES = ("auto",) + prec.PRECISIONS
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    learning_rate: float = 5e-5
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set; counts optimizer updates
    batch_size: int = 32  # per process and micro-batch
    eval_batch_size: int = 64
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    log_every: int = 20
    # micro-batches of batch_size (per process) per optimizer update; the loss and gradient are
    # those of one step on the whole accumulated batch
    gradient_accumulation_steps: int = 1
    # auto: the device's native precision (CUDA: bf16 from compute capability 8.0, else fp16;
    # CPU: bf16 where it has AVX512-BF16/AMX, else fp32); with a DeepSpeed config, auto keeps the
    # config's own bf16/fp16 blocks and fp32/bf16/fp16 override them
    precision: str = "auto"
    progress: bool = True  # tqdm bars on rank 0 while stderr is a terminal
    # training batches of similar lengths (less padding; see _length_grouped); False: plain
    # shuffled batches, as transformers without --group_by_length and this loop before it
    group_by_length: bool = True

    def check(self) -> None:
        """InputError naming the flag when a setting cannot run."""
        if self.gradient_accumulation_steps < 1:
            raise InputError(f"--gradient-accumulation-steps {self.gradient_accumulation_steps}: must be >= 1")
        if self.precision not in PRECISION_CHOICES:
            raise InputError(f"--precision {self.precision!r}: use one of {', '.join(PRECISION_CHOICES)}")


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


# Length-bucketed training batches: the shuffled epoch is cut into windows of at most this many
# batches, each window is sorted by length and cut into batches, and the batches are shuffled
# again (transformers' group_by_length "mega-batches"). A batch then holds sentences of similar
# lengths, so the padded layout (and the attention blocks of the unpadded encoder) waste little.
_BUCKET_WINDOW = 50
# ...and at least this many windows per epoch (transformers' cap, mega_batch_mult =
# min(n // (4 x batch), 50)): a training set that fits in one window would be sorted as a whole,
# and the same examples would meet in a batch every epoch (~70% of batch-mate pairs repeat).
_MIN_WINDOWS = 4


def _batches(features, batch_size, shuffle, rng, group_by_length: bool = True):
    """Batches of `batch_size` examples (the last may be short). Shuffled (training): every
    example once per epoch, grouped by length within windows unless `group_by_length` is off,
    in an order drawn from `rng` alone, so the same seed gives the same batches on every rank
    and run."""
    order = list(range(len(features)))
    if shuffle:
        rng.shuffle(order)
        if group_by_length:
            order = _length_grouped(order, features, batch_size, rng)
    for i in range(0, len(order), batch_size):
        yield [features[j] for j in order[i:i + batch_size]]


def _window_batches(n: int, batch_size: int) -> int:
    """Batches per length-sorting window for `n` examples: 50, fewer so that the epoch has at
    least 4 windows, at least 1."""
    return max(1, min(n // (_MIN_WINDOWS * batch_size), _BUCKET_WINDOW))


def _length_grouped(order: list, features, batch_size: int, rng) -> list:
    # a multiple of batch_size: only the last batch is short
    window = batch_size * _window_batches(len(order), batch_size)
    batches = []
    for w in range(0, len(order), window):
        # Longest first within a window; the sort is stable, so ties keep the shuffled order.
        chunk = sorted(order[w:w + window], key=lambda j: -len(features[j]["input_ids"]))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    short = batches.pop() if batches and len(batches[-1]) < batch_size else None
    rng.shuffle(batches)
    if short is not None:
        batches.append(short)  # the epoch's short batch stays last, as without grouping
    return [j for b in batches for j in b]


def with_layout(batch: dict) -> dict:
    """The collated batch plus its `TokenLayout` (the heads' unpadded encoder), built here while
    the mask is on the host: from a GPU mask the model would wait for the device to build it."""
    return {**batch, "layout": TokenLayout.from_attention_mask(batch["attention_mask"])}


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


def resolve_precision(requested: str, device: str) -> str:
    """The plain loop's precision on `device` ("cuda" or "cpu") for `requested` (auto|fp32|bf16|
    fp16), through `pretrain.precision` (auto = the native precision; an explicit bf16 that the
    device only emulates runs as asked, with a warning). fp16 on CPU, which DeepSpeed refuses,
    runs here (torch autocast and GradScaler have CPU kernels), slowly: a warning says so."""
    if requested not in PRECISION_CHOICES:
        raise InputError(f"--precision {requested!r}: use one of {', '.join(PRECISION_CHOICES)}")
    if device == "cpu" and requested == "fp16":
        log.warning("precision: --precision fp16 on CPU runs fp16 autocast with loss scaling, which CPUs "
                    "emulate slowly; use --precision auto (fp32, or bf16 where the CPU has it)")
        return "fp16"
    chosen, warning = prec.resolve(requested, device, f"--precision {requested}")
    if warning:
        log.warning("precision: %s", warning)
    return chosen


def autocast(precision: str, device_type: str):
    """The forward pass's context: torch.autocast to bf16/fp16, nothing for fp32 (so the fp32
    path runs exactly the code it always ran)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=_DTYPES[precision])


def _device_type(model) -> str:
    return next(model.parameters()).device.type


class _PlainStep:
    """torch AdamW in this process over the fp32 weights; bf16/fp16 only inside autocast. fp16
    scales the loss with a GradScaler (dynamic scale): an update whose gradients overflow is
    skipped, and the schedule does not advance for it (as DeepSpeed does)."""

    def __init__(self, model, cfg: TrainConfig, total: int):
        self.net = self.module = model
        self.max_grad_norm = cfg.max_grad_norm
        self.device_type = _device_type(model)
        self.precision = resolve_precision(cfg.precision, self.device_type)
        # torch's fused AdamW (one kernel over all tensors; CPU and CUDA): a bert-base update took 0.54 s
        # with the default foreach kernels on one CPU core, 0.08 s fused. transformers' Trainer uses it
        # by default too (torch >= 2.8), so the two loops also run the same update arithmetic.
        fused = self.device_type in ("cpu", "cuda")
        self.opt = torch.optim.AdamW(optimizer_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                     fused=fused or None)
        self.sched = _scheduler(cfg, total)(self.opt)
        self.scaler = torch.amp.GradScaler(self.device_type) if self.precision == "fp16" else None
        self.opt.zero_grad(set_to_none=True)
        self.gnorm = None

    def autocast(self):
        return autocast(self.precision, self.device_type)

    def backward(self, loss, weight: float) -> None:
        """Accumulate the gradient of loss x weight (see `train`: the update's gradient is the
        sum over every share of the batch)."""
        loss = loss if weight == 1.0 else loss * weight
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> bool:
        """The optimizer update from the accumulated gradients; False when fp16 skipped it."""
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)  # clip the true gradients, not the scaled ones
        self.gnorm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        applied = True
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.opt)  # skips the update when a gradient is inf/nan
            self.scaler.update()
            applied = self.scaler.get_scale() >= scale  # the scale backs off only after an overflow
        else:
            self.opt.step()
        if applied:
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return applied

    def grad_norm(self) -> float:
        return float(self.gnorm)

    def finish(self):
        self.net.eval()
        return self.module


class _EngineStep:
    """deepspeed.initialize over the same groups and schedule: engine.backward / engine.step
    for every micro-batch (the engine reduces, clips, steps, schedules and zeroes at the
    accumulation boundary). The precision is the config's; the engine casts the module itself."""

    def __init__(self, model, cfg: TrainConfig, total: int, ds_config: dict, world: int):
        import deepspeed  # optional and slow to import: only --deepspeed runs need it

        # deepspeed_config resolved "auto" already (apply_precision): the config names one precision
        self.precision = prec.requested_precision(ds_config)
        self.net, _, _, self.sched = deepspeed.initialize(
            model=model, model_parameters=optimizer_groups(model, cfg.weight_decay), config=ds_config,
            lr_scheduler=_scheduler(cfg, total))
        self.module = self.net.module
        self.gas = self.net.gradient_accumulation_steps()
        if self.gas != cfg.gradient_accumulation_steps:
            raise ValueError(f"the DeepSpeed config accumulates {self.gas} micro-batches, the loop "
                             f"{cfg.gradient_accumulation_steps} (--gradient-accumulation-steps)")
        # engine.backward divides by the accumulation steps and the engine averages over processes
        self.factor = float(world * self.gas)

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss, weight: float) -> None:
        factor = weight * self.factor
        self.net.backward(loss if factor == 1.0 else loss * factor)
        self.net.step()  # only the boundary's micro-batch updates

    def step(self) -> bool:
        return self.net.was_step_applied()

    def grad_norm(self) -> float:
        gnorm = self.net.get_global_grad_norm()
        return float(gnorm) if gnorm is not None else float("nan")

    def finish(self):
        self.net.eval()
        _full_fp32_weights(self.net)
        return self.module  # ZeRO-1/2: every rank holds the full fp32 weights


def _pieces(feats: list[dict], rank: int, world: int, gas: int) -> list[tuple[list[dict], bool]]:
    """This rank's share of each of the update's `gas` micro-batches: the update batch is cut
    into gas x world contiguous, near-equal pieces (micro-batch m, rank r: piece m x world + r),
    so a short last batch is split as evenly as possible. A piece without examples repeats the
    batch's first one and is marked empty (it counts no loss terms)."""
    k = gas * world
    bounds = [round(i * len(feats) / k) for i in range(k + 1)]
    out = []
    for m in range(gas):
        i = m * world + rank
        mine = feats[bounds[i]:bounds[i + 1]]
        out.append((mine or feats[:1], bool(mine)))
    return out


def _update_loss(stepper, feats: list[dict], rank: int, world: int, gas: int, pad_id: int) -> float:
    """Forward and backward of this rank's micro-batches of one update; the update's loss (the
    mean over every loss term of the global batch, the same on every rank).

    Each piece's loss is the sum of its terms over the term count of the whole update (counts
    all-reduced), which makes the update's gradient that of one step on the whole batch however
    it is split. A batch that is one piece keeps the head's own mean (the same bits as before
    accumulation and several processes existed)."""
    pieces = _pieces(feats, rank, world, gas)
    batches = [with_layout(collate([{k: v for k, v in f.items() if not k.startswith("_")} for f in mine], pad_id))
               for mine, _ in pieces]
    units = [stepper.module.loss_units(b) if real else 0 for b, (_, real) in zip(batches, pieces)]
    total = float(sum(units))
    if world > 1:
        count = torch.tensor([total], dtype=torch.float64, device=next(stepper.module.parameters()).device)
        dist.all_reduce(count)
        total = count.item()
    whole = world == 1 and gas == 1 and total > 0
    parts = []
    for batch, (_, real) in zip(batches, pieces):
        with stepper.autocast():
            if whole:
                loss, _ = stepper.net(**_to(batch, stepper.module))
                weight = 1.0
            else:
                loss, _ = stepper.net(**_to(batch, stepper.module), loss_reduction="sum")
                # a stand-in piece, or no loss terms in the whole update (token labels all
                # ignored): a backward all the same (the engine's collectives), no gradient
                weight = 1.0 / total if real and total > 0 else 0.0
        stepper.backward(loss, weight)
        parts.append(loss.detach().float() * weight if weight != 1.0 else loss.detach().float())
    part = parts[0] if len(parts) == 1 else torch.stack(parts).sum()
    if world > 1:
        part = part.reshape(1)
        dist.all_reduce(part)
    return part.item()


@contextlib.contextmanager
def _progress(total: int, show: bool, desc: str):
    """A tqdm bar on stderr when asked for and stderr is a terminal (None otherwise); log
    records go around it meanwhile."""
    if not (show and sys.stderr.isatty()):
        yield None
        return
    with tqdm(total=total, desc=desc, unit="step" if desc == "train" else "batch", file=sys.stderr,
              dynamic_ncols=True) as bar, logging_redirect_tqdm():
        yield bar


def train(model, features: list[dict], cfg: TrainConfig, seed: int, pad_id: int = 0,
          ds_config: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """Train `model`; returns (the trained model, {"steps", "final_loss", "train_seconds",
    "train_precision", "skipped_steps", "step_losses"}). Feature keys starting with "_" are
    bookkeeping, not model inputs.

    Without `ds_config`: torch AdamW in this process, in place, in `cfg.precision`. With one
    (`deepspeed_config`; torch.distributed already initialised): the same loop through a
    DeepSpeed engine, in one or several processes. Every process draws the same shuffled order;
    an update's batch is cfg.batch_size x world x cfg.gradient_accumulation_steps examples, cut
    into one contiguous share per (micro-batch, rank). Each share contributes the sum of its
    loss terms over the term count of the whole update batch, so the update is that of one
    step on the whole batch for every head (per-example means: classify, pair, qa; the mean
    over labelled tokens: token). Steps, epochs and the schedule count optimizer updates. The
    logged and returned per-step loss is the whole batch's mean, all-reduced; the returned
    model is the engine's module with full fp32 weights. "train_precision" is what the forward pass
    ran in (`predict` takes it); "skipped_steps" counts fp16 updates skipped on overflow."""
    cfg.check()
    if not features:
        raise ValueError("no training examples")
    distributed = ds_config is not None and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    if len(features) < world:
        raise ValueError(f"{len(features)} training examples for {world} processes")
    gas = cfg.gradient_accumulation_steps
    per_update = cfg.batch_size * world * gas
    total = cfg.max_steps if cfg.max_steps else max(1, math.ceil(cfg.epochs * math.ceil(len(features) / per_update)))
    stepper = (_PlainStep(model, cfg, total) if ds_config is None
               else _EngineStep(model, cfg, total, ds_config, world))
    set_seed(seed)  # after the engine is built: the same dropout stream and shuffle on every rank
    rng = random.Random(seed)
    stepper.net.train()
    step, skipped, t0, running = 0, 0, time.time(), []
    where = f" (deepspeed, {world} processes)" if ds_config is not None else ""
    with _progress(total, cfg.progress and rank == 0, "train") as bar:
        while step < total:
            for feats in _batches(features, per_update, True, rng, cfg.group_by_length):
                running.append(_update_loss(stepper, feats, rank, world, gas, pad_id))
                if not stepper.step():
                    skipped += 1
                    log.warning("step %d skipped: fp16 gradients overflowed (%d skipped so far)", step + 1, skipped)
                step += 1
                if bar is not None:
                    bar.set_postfix(loss=f"{running[-1]:.4f}", refresh=False)
                    bar.update(1)
                if rank == 0 and (step % cfg.log_every == 0 or step == total):
                    log.info("step %d/%d loss %.4f grad_norm %.3f lr %.2e %.1f s%s", step, total,
                             float(np.mean(running[-cfg.log_every:])), stepper.grad_norm(),
                             stepper.sched.get_last_lr()[0], time.time() - t0, where)
                if step >= total:
                    break
    model = stepper.finish()
    return model, {"steps": step, "final_loss": float(np.mean(running[-cfg.log_every:])),
                   "train_seconds": round(time.time() - t0, 2), "train_precision": stepper.precision,
                   "skipped_steps": skipped, "step_losses": running}


def deepspeed_config(path: str, cfg: TrainConfig, world_size: int, device: str = "cpu") -> dict:
    """The DeepSpeed config in `path`, completed from the loop's own settings. --batch-size is
    the one source of truth for the per-process micro batch, --gradient-accumulation-steps for
    the micro-batches per update: a config that names another train_micro_batch_size_per_gpu or
    gradient_accumulation_steps (or a train_batch_size other than batch x accumulation x world)
    is an error. The learning rate and weight decay come from the command line; the schedule is
    the loop's (passed to deepspeed.initialize), so the config must not name a scheduler. The
    precision is the config's bf16/fp16 blocks ("enabled": "auto" = native) unless --precision
    names one (fp32, bf16, fp16), which overrides them."""
    cfg.check()
    with open(path, encoding="utf-8") as f:
        ds = json.load(f)
    micro = ds.get("train_micro_batch_size_per_gpu")
    if micro is not None and micro != "auto" and int(micro) != cfg.batch_size:
        raise ValueError(f"{path}: train_micro_batch_size_per_gpu {micro} disagrees with --batch-size "
                         f"{cfg.batch_size} (the per-process batch; drop it from the config or make them equal)")
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    gas = ds.get("gradient_accumulation_steps")
    if gas is not None and gas != "auto" and int(gas) != cfg.gradient_accumulation_steps:
        raise ValueError(f"{path}: gradient_accumulation_steps {gas} disagrees with --gradient-accumulation-steps "
                         f"{cfg.gradient_accumulation_steps} (drop it from the config or make them equal)")
    ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    glob = cfg.batch_size * cfg.gradient_accumulation_steps * world_size
    tbs = ds.get("train_batch_size")
    if tbs is not None and tbs != "auto" and int(tbs) != glob:
        raise ValueError(f"{path}: train_batch_size {tbs} is not --batch-size {cfg.batch_size} x "
                         f"--gradient-accumulation-steps {cfg.gradient_accumulation_steps} x {world_size} processes")
    ds["train_batch_size"] = glob
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
    if cfg.precision == "auto":
        requested, source = prec.requested_precision(ds), path
    else:
        requested, source = cfg.precision, f"--precision {cfg.precision}"
    chosen, warning = prec.resolve(requested, device, source)
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
def predict(model, features: list[dict], batch_size: int = 64, pad_id: int = 0, precision: str = "fp32",
            progress: bool = True) -> list:
    """Model outputs per feature, in order, as numpy arrays (logits; for QA a (start, end)
    pair), cut back to each feature's own length. Evaluation batches are formed from
    features sorted by length so that little padding is computed. `precision`: the one
    training ran in (`train`'s "train_precision"): the forward pass under the same autocast."""
    model.eval()
    out = [None] * len(features)
    with _progress(math.ceil(len(features) / batch_size), progress, "eval") as bar, \
            autocast(precision, _device_type(model)):
        for idx, batch in length_sorted_batches(features, batch_size, pad_id):
            _, logits = model(**_to(with_layout(batch), model))
            for row, j in enumerate(idx):
                n = len(features[j]["input_ids"])
                if isinstance(logits, tuple):
                    out[j] = tuple(t[row, :n].float().cpu().numpy() for t in logits)
                elif logits.dim() == 3:
                    out[j] = logits[row, :n].float().cpu().numpy()
                else:
                    out[j] = logits[row].float().cpu().numpy()
            if bar is not None:
                bar.update(1)
    return out
