"""The pretraining loop: build model, engine and data from a validated config, then train.

Order of construction (torchtitan's), one function per step, called in this order by
`Trainer.__init__`: `start_processes` (process groups, megatron-core TP groups) -> `plan_resume`
(which checkpoint, converted to the universal format if dp changed) -> `build_model` (dense model
initialised from the seed on every rank, then TP shards cut from it, so tp=1 and tp=N start from the
same full weights) -> `build_engine` (DeepSpeed: ZeRO, precision, optimizer, schedule) -> `restore`
(the plan's checkpoint, giving the `Progress`) -> `build_data` (the loader starts after the
consumed samples, so it must follow `restore`).

The loss is token-weighted over the whole global batch: the MLM loss of a step is the mean over
every masked token of the global batch, whichever rank and micro-batch holds it. DeepSpeed
averages gradients over micro-batches and data-parallel ranks, so each micro-batch's summed MLM
loss is scaled by (dp x accumulation / masked tokens in the global batch). This makes the update
independent of how the global batch is split, which is what lets dp=2 equal one process and a
dp=2 run resume at dp=1 on the same trajectory.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Optional

import deepspeed
import megatron.core
import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pretrain import checkpoint as ckpt
from pretrain import optim
from pretrain.config import ConfigError, Resolved, check_resume_state
from pretrain.data import PretrainingDataset, PretrainingSampler, build_dataloader
from pretrain.hf_io import load_hf_dir, load_into
from pretrain.launch import init_distributed
from pretrain.metrics import MetricsWriter, bert_flops, memory_gb, peak_tflops, plot_losses
from pretrain.model import BertConfig, BertForPreTraining, count_parameters
from pretrain.optim import build_scheduler
from pretrain.tensor_parallel import (MegatronLayerFactory, MegatronMPU, initialize_model_parallel,
                                      mark_tensor_parallel_params, shard_state_dict, tp_partition_dims)
from pretrain.unpad import TokenLayout
from pretrain.vocab import resize_vocab

log = logging.getLogger(__name__)




# Set by SIGUSR1: the scheduler's warning before a time limit or preemption (slurm/_common.sh
# forwards it to every task). The loop checkpoints at the next step boundary and returns.
_PREEMPT = threading.Event()


def _install_preemption_handler() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, lambda signum, frame: _PREEMPT.set())

class NonFiniteError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# Logging


def setup_logging(rank: int) -> None:
    """Rank 0 at INFO; other ranks WARNING with a rank prefix (their warnings still matter)."""
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if rank == 0 else f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("DeepSpeed", "deepspeed", "megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _git_sha() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)), stderr=subprocess.DEVNULL, timeout=5
        ).decode().strip()
    except Exception:  # noqa: BLE001 - informative only
        return "unknown"


def _versions() -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "megatron-core": getattr(megatron.core, "__version__", "?")}


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule


def _client_optimizer(kind: str, model: torch.nn.Module, params: dict, tp_group):
    """pretrain.optim's LAMB / AdamW (used where DeepSpeed has no implementation on the device).
    Built after the model is placed: the implementation (fused kernels on GPU) follows the device."""
    if kind == "lamb":
        kwargs = optim.lamb_kwargs_from_ds_params(params, flag="--ds_config optimizer.params")
        return optim.build_optimizer(model, "lamb", **kwargs, tp_group=tp_group, flag="--ds_config optimizer.type")
    return optim.build_optimizer(
        model, kind, lr=params["lr"], weight_decay=float(params.get("weight_decay", 0.0)),
        betas=tuple(params.get("betas", (0.9, 0.999))), eps=float(params.get("eps", 1e-6)),
        tp_group=tp_group, flag="--ds_config optimizer.type",
    )


def deepspeed_optimizer_params(params: dict, device_type: str) -> dict:
    """The ds_config optimizer params as DeepSpeed gets them: with `"torch_adam": true` DeepSpeed
    builds torch.optim.AdamW from them, which on a GPU should be the fused (single-kernel) one."""
    out = dict(params)
    if device_type == "cuda" and out.get("torch_adam") and not out.get("foreach"):
        out.setdefault("fused", True)
    return out


def describe_optimizer(optimizer) -> str:
    """Which implementation runs, for the start-up log: the class (inside DeepSpeed's ZeRO/bf16
    wrapper), the device of its state and whether torch's fused/foreach kernels are on."""
    wrapper = type(optimizer).__name__
    inner = getattr(optimizer, "optimizer", optimizer)
    name = f"{type(inner).__module__}.{type(inner).__name__}"
    defaults = getattr(inner, "defaults", {})
    flags = [f"{k}={defaults[k]}" for k in ("fused", "foreach", "variant") if defaults.get(k) is not None]
    params = [p for g in getattr(inner, "param_groups", []) for p in g["params"]]
    device = params[0].device if params else "?"
    wrapped = f" inside DeepSpeed's {wrapper}" if inner is not optimizer else ""
    return f"{name}({', '.join(flags)}) on {device}{wrapped}"


def loader_workers(configured: int, device_type: str, cpus_per_rank: Optional[int] = None) -> int:
    """DataLoader worker processes per rank: `configured` if >= 0; else (auto) on a GPU up to 4
    workers from this rank's share of the cores, so that sample building and masking run beside
    the device step; on CPU none (the step itself needs every core)."""
    if configured >= 0:
        return configured
    if device_type != "cuda":
        return 0
    if cpus_per_rank is None:
        cpus_per_rank = cpu_share()
    return max(1, min(4, cpus_per_rank - 1))


def cpu_share() -> int:
    """Cores this rank may use: its affinity mask when the launcher binds (srun --cpu-bind,
    deepspeed --bind_cores_to_rank), else the node's cores divided by the ranks on the node."""
    node = os.cpu_count() or 1
    mine = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else node
    if mine < node:
        return mine
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or max(1, torch.cuda.device_count())
    return max(1, node // ranks)


# ----------------------------------------------------------------------------------------------
# Model


def build_model(res: Resolved, tp_rank: int, tp: int):
    """Dense model from the seed, then (tp > 1) this rank's TP shard of the same weights.

    The vocabulary is padded to `res.padded_vocab_size` rows (pretrain/vocab.py); the real rows
    get the numbers an unpadded model built after the same seed gets."""
    config = BertConfig.from_dict(res.model_config, source=f"--model_config {res.cfg.model_config}")
    torch.manual_seed(res.cfg.seed)
    dense = BertForPreTraining(config, padded_vocab_size=res.padded_vocab_size)
    dense.init_weights()
    layers = None
    model = dense
    if tp > 1:
        layers = MegatronLayerFactory(init_std=config.initializer_range, seed=res.cfg.seed, device="cpu")
        model = BertForPreTraining(config, layers, padded_vocab_size=res.padded_vocab_size)
        # Without the tags DeepSpeed counts cls.predictions.bias (a vocab shard) on TP rank 0 only.
        mark_tensor_parallel_params(model)
        full = {k: v for k, v in dense.state_dict().items()}
        load_into(model, shard_state_dict(full, tp_rank, tp, tp_partition_dims(model)))
        del dense
    if res.cfg.activation_checkpointing:
        model.bert.encoder.gradient_checkpointing = True
    return config, model, layers


def _is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, ckpt.STATE_FILE))


def load_init_weights(path: str, config, model, tp_rank: int, tp: int, checksums: bool = True) -> None:
    """--init_from: full fp32 weights from a trainer checkpoint or an HF directory, into `model`.

    Both sources give the real vocabulary (a checkpoint's padding, maybe for another tp, is cut
    off by ckpt.full_weights); it is padded again to this model's rows. `checksums=False` when the
    checkpoint was verified already (`init_weights_on_every_rank`); its sizes are still checked."""
    if _is_hf_dir(path):
        _, full = load_hf_dir(path)
    else:
        try:
            run_dir, tag = ckpt.resolve(path)
        except ckpt.CheckpointError as e:
            raise ConfigError(f"--init_from {path}: {e}") from None
        full = ckpt.full_weights(run_dir, tag, checksums=checksums)
    words = full.get("bert.embeddings.word_embeddings.weight")
    if words is not None and words.shape[0] != config.vocab_size:
        raise ConfigError(f"--init_from {path}: its vocabulary has {words.shape[0]} tokens, --model_config says vocab_size "
                          f"{config.vocab_size}; use the model config (and tokenizer) of the run it comes from")
    full = {k: v for k, v in full.items() if k in dict(model.state_dict())}
    full = resize_vocab(full, config.vocab_size, model.padded_vocab_size)
    load_into(model, shard_state_dict(full, tp_rank, tp, tp_partition_dims(model)) if tp > 1 else full)


def init_weights_on_every_rank(path: str, config, model, tp_rank: int, tp: int, checksums: bool) -> None:
    """--init_from on every rank (collective): rank 0 verifies a checkpoint once (CRC-32s unless
    --no-verify_checksums) and every rank hears its verdict; then each rank loads, and a failure on
    any rank stops every rank with the same one line (none is left waiting in a collective)."""
    error = None  # (the exception class to raise, its line)
    if dist.get_rank() == 0 and not _is_hf_dir(path):
        try:
            ckpt.check(*ckpt.resolve(path), checksums=checksums)
        except Exception as e:
            error = ("checkpoint", f"--init_from {path}: {ckpt.one_line(e)}")
    error = _broadcast_object(error)
    if error is None:
        try:
            load_init_weights(path, config, model, tp_rank, tp, checksums=False)
        except ConfigError as e:  # the weights do not fit this model
            error = ("config", str(e))
        except Exception as e:
            error = ("checkpoint", f"--init_from {path}: {ckpt.one_line(e)}")
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error is not None:
        raise (ConfigError if error[0] == "config" else ckpt.CheckpointError)(error[1])


# ----------------------------------------------------------------------------------------------
# Start-up steps, in the order Trainer.__init__ runs them


@dataclass(frozen=True)
class Processes:
    """This process's place in the job, once the process groups exist."""

    rank: int
    local_rank: int
    world_size: int
    tp_rank: int
    dp_rank: int
    tp_group: object
    dp_group: object
    host_group: object  # gloo, beside NCCL, for host-side agreement (preemption); None on gloo


def start_processes(res: Resolved) -> Processes:
    """Process groups (default + megatron-core TP/DP), rank-aware logging, and the checks that
    need every rank: the launched world size and what each rank resolved on its own."""
    launch = init_distributed()
    setup_logging(launch.rank)
    initialize_model_parallel(res.cfg.tp)
    if dist.get_world_size() != res.world_size:
        raise ConfigError(f"validated for world size {res.world_size} but {dist.get_world_size()} processes started")
    host_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    _check_same_on_every_rank({"precision": res.precision, "padded_vocab_size": res.padded_vocab_size,
                               "device": res.device})
    return Processes(
        rank=launch.rank, local_rank=launch.local_rank, world_size=dist.get_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(), dp_rank=parallel_state.get_data_parallel_rank(),
        tp_group=parallel_state.get_tensor_model_parallel_group(), dp_group=parallel_state.get_data_parallel_group(),
        host_group=host_group,
    )


def log_run_header(res: Resolved) -> None:
    cfg = res.cfg
    log.info("config: %s", json.dumps(res.to_dict()["cfg"], sort_keys=True))
    log.info("deepspeed config: %s", json.dumps(res.ds_config, sort_keys=True))
    log.info(
        "world %d = dp %d x tp %d | ZeRO-%d | %s | batch: micro %d x accumulation %d x dp %d = %d | %s | git %s",
        res.world_size, res.dp, cfg.tp, res.zero_stage, res.precision, res.micro_batch_size, res.grad_accum,
        res.dp, res.global_batch_size, _versions(), _git_sha(),
    )
    if res.precision_warning:
        log.warning("precision: %s", res.precision_warning)
    if res.resume_warning:
        log.warning("resume: %s", res.resume_warning)


@dataclass(frozen=True)
class ResumePlan:
    """Where the run continues from, decided before the engine exists (a checkpoint from another
    dp size needs another load path, set in the engine's config)."""

    tag: Optional[str] = None  # the checkpoint in --save_dir to continue from; None: a fresh start
    load_tag: Optional[str] = None  # what the engine loads: `tag`, or its universal conversion
    same_world: bool = False  # same world size: every rank's RNG streams continue exactly

    @property
    def universal(self) -> bool:
        return self.load_tag is not None and self.load_tag != self.tag


def plan_resume(res: Resolved) -> ResumePlan:
    """Which checkpoint to continue from, the same answer on every rank (a collective: call on
    every rank). Rank 0 decides, after every rank has checked its slice of the candidates' files
    (`ckpt.select_for_resume`), so that the ranks cannot disagree (a file being checked while a
    shared filesystem catches up could otherwise pass on one node and fail on another). Any
    failure reaches every rank as the same one-line CheckpointError."""
    save_dir = res.cfg.save_dir
    tag, error = ckpt.select_for_resume(save_dir, res.cfg.verify_checksums)
    state = None
    if tag is not None:
        state, error = _broadcast_object(_chosen_state(res, tag) if dist.get_rank() == 0 else None)
    if error:
        raise ckpt.CheckpointError(error)
    if tag is None:
        return ResumePlan()
    load_tag = tag if state["dp"] == res.dp else _convert_to_universal(save_dir, tag, state["dp"], res.dp)
    return ResumePlan(tag=tag, load_tag=load_tag, same_world=state["world_size"] == res.world_size)


def _chosen_state(res: Resolved, tag: str) -> tuple[Optional[dict], Optional[str]]:
    """Rank 0: (trainer state of the chosen checkpoint, or the error line). `config.validate`
    checked the layout against the sizes-only choice; a checksum failure may have made rank 0
    fall back to an older checkpoint, so the chosen one is checked again."""
    save_dir = res.cfg.save_dir
    try:
        state = ckpt.read_state(save_dir, tag)
        check_resume_state(res.cfg, state, res.padded_vocab_size)
        return state, None
    except ConfigError as e:
        return None, str(e)
    except Exception as e:
        return None, (f"--save_dir {save_dir}: {os.path.join(save_dir, tag, ckpt.STATE_FILE)} is unreadable "
                      f"({ckpt.one_line(e)}); point `latest` at an earlier complete step_N or use a new --save_dir")


def _convert_to_universal(save_dir: str, tag: str, old_dp: int, new_dp: int) -> str:
    """A checkpoint from another dp size: DeepSpeed's universal format re-partitions ZeRO
    optimizer state; convert once (rank 0) and return the converted tag. A failed conversion
    stops every rank with one line (its output is logged on rank 0)."""
    src = os.path.join(save_dir, tag)
    uni_tag = tag + ckpt.UNIVERSAL
    dst = os.path.join(save_dir, uni_tag)
    error = None
    if dist.get_rank() == 0 and not os.path.isfile(os.path.join(dst, ".complete")):
        log.info("checkpoint %s was written at dp=%d, now dp=%d: converting it to DeepSpeed's universal format",
                 src, old_dp, new_dp)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src,
               "--output_folder", dst, "--num_extract_workers", "1", "--num_merge_workers", "1"]
        try:
            shutil.rmtree(dst, ignore_errors=True)  # a conversion killed half-way: start over
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                log.error("ds_to_universal output:\n%s\n%s", r.stdout[-3000:], r.stderr[-3000:])
                last = (r.stderr.strip().splitlines() or ["no output"])[-1]
                error = (f"ds_to_universal failed on {src} (exit {r.returncode}: {last[:300]}); its output is in rank "
                         f"0's log; resume at dp={old_dp}, or fix the cause and re-run")
            else:
                open(os.path.join(dst, ".complete"), "w").close()
        except Exception as e:
            error = f"converting {src} to the universal format failed ({ckpt.one_line(e)}); resume at dp={old_dp}"
    error = _broadcast_object(error)
    if error is not None:
        raise ckpt.CheckpointError(error)
    return uni_tag


def build_engine(res: Resolved, model: torch.nn.Module, plan: ResumePlan, procs: Processes):
    """Optimizer, schedule and the DeepSpeed engine around the placed model. The optimizer's
    implementation depends on where the parameters are (fused kernels on GPU), so the model is
    placed first. `res.ds_config` is not changed: the engine gets an edited copy."""
    cfg = res.cfg
    ds_config = copy.deepcopy(res.ds_config)
    # LAMB is always ours: DeepSpeed's has no CPU kernel, and under ZeRO its FusedLamb takes one
    # trust ratio per flat partition instead of per tensor (pretrain.optim.Lamb recovers them).
    optimizer = None
    if cfg.optimizer == "client" or res.optimizer_type == "lamb":
        optimizer = _client_optimizer(res.optimizer_type, model, res.optimizer_params,
                                      procs.tp_group if cfg.tp > 1 else None)
        ds_config.pop("optimizer", None)
    else:
        device_type = next(model.parameters()).device.type
        ds_config["optimizer"]["params"] = deepspeed_optimizer_params(res.optimizer_params, device_type)
    if plan.universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else int(round(cfg.warmup_proportion * cfg.train_steps))
    power = 1.0 if cfg.decay == "linear" else cfg.decay_power
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=optim.optimizer_groups(model, float(res.optimizer_params.get("weight_decay", 0.0))) if optimizer is None else None,
        optimizer=optimizer,
        lr_scheduler=lambda opt: build_scheduler(opt, warmup, cfg.train_steps, power=power),
        config=ds_config,
        mpu=MegatronMPU(),
    )
    if hasattr(optimizer, "attach_zero_partitions"):
        optimizer.attach_zero_partitions(engine.optimizer)  # per-tensor trust ratios under ZeRO 1/2
    log.info("optimizer: %s", describe_optimizer(engine.optimizer))
    return engine


@dataclass
class Progress:
    """What the loop has done so far; saved in every checkpoint's trainer_state.json."""

    step: int = 0
    consumed: int = 0  # samples of the training order consumed (the loader starts after them)
    skipped_total: int = 0


def restore(engine, layers, plan: ResumePlan, res: Resolved, dp_rank: int) -> Progress:
    """Load the plan's checkpoint into the engine; the progress it records."""
    cfg = res.cfg
    state, extra = ckpt.load(engine, cfg.save_dir, plan.load_tag, same_world=plan.same_world, rng_tag=plan.tag)
    if extra.get("tp_rng") is not None and hasattr(getattr(layers, "rng", None), "load_state_dict"):
        layers.rng.load_state_dict(extra["tp_rng"])
    # The schedule is rebuilt from this run's flags (phase lengths may have been extended):
    # the lr of the next step follows from it, not from the lr stored in the optimizer state.
    sched = engine.lr_scheduler
    for group, base, fn in zip(engine.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * fn(sched.last_epoch)
    progress = Progress(step=state["step"], consumed=state["consumed_samples"],
                        skipped_total=state.get("skipped_total", 0))
    if state["global_batch_size"] != res.global_batch_size:
        log.warning(
            "resuming with global batch %d, the checkpoint used %d: the sample order continues from "
            "sample %d, but step boundaries differ from the original run", res.global_batch_size,
            state["global_batch_size"], progress.consumed,
        )
    if not plan.same_world:
        # RNG streams are per rank; with another rank layout they cannot continue, so each
        # rank gets a fresh stream derived from (seed, step, dp rank). Not the global rank: the
        # ranks of one TP group must draw the same replicated-region dropout masks (hidden
        # states, embeddings), or their copies of LayerNorm/bias/embedding weights drift apart.
        torch.manual_seed(cfg.seed * 1000003 + progress.step * 1009 + dp_rank)
    log.info("resumed from %s: step %d, %d samples consumed", os.path.join(cfg.save_dir, plan.load_tag),
             progress.step, progress.consumed)
    return progress


def build_data(res: Resolved, consumed: int, dp_rank: int, device: torch.device):
    """Training and held-out datasets, and the training loader starting after `consumed` samples
    (so it is built after the resume point is known)."""
    cfg = res.cfg
    # Held-out MLM accuracy is measured on uniformly chosen tokens whatever the training masking
    # weights, so runs with and without --masked_lm_frequency_power stay comparable.
    train_ds, valid_ds = (PretrainingDataset(cfg.data, cfg.seq_length, split, masking=masking, seed=cfg.seed,
                                             pack_sequences=cfg.pack_sequences)
                          for split, masking in (("train", cfg.masking()),
                                                 ("valid", replace(cfg.masking(), frequency_power=0.0))))
    workers = loader_workers(cfg.num_workers, device.type)
    loader = build_dataloader(
        train_ds, res.micro_batch_size, dp_rank=dp_rank, dp_size=res.dp,
        consumed_samples=consumed, num_workers=workers, pin_memory=device.type == "cuda",
    )
    log.info("data: %d loader worker(s) per rank%s; %s", workers, ", pinned memory" if device.type == "cuda" else "",
             f"{res.micro_batch_size} NSP pairs per micro-batch packed into rows of {cfg.seq_length}" if cfg.pack_sequences
             else "one NSP pair per row")
    return train_ds, valid_ds, loader


# ----------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    def __init__(self, res: Resolved):
        self.res = res
        cfg = self.cfg = res.cfg
        procs = self.procs = start_processes(res)
        self.rank, self.tp_rank, self.dp_rank = procs.rank, procs.tp_rank, procs.dp_rank
        os.makedirs(cfg.save_dir, exist_ok=True)
        if self.rank == 0:
            log_run_header(res)
        plan = plan_resume(res)

        self.model_config, model, self.layers = build_model(res, self.tp_rank, cfg.tp)
        log.info("model: %s parameters on this rank (tp shard), %s", f"{count_parameters(model):,}",
                 json.dumps(self.model_config.to_dict()))
        if cfg.init_from and plan.tag is None:
            init_weights_on_every_rank(cfg.init_from, self.model_config, model, self.tp_rank, cfg.tp,
                                       cfg.verify_checksums)
            log.info("initialised weights from %s (optimizer and schedule start fresh)", cfg.init_from)
        model.to(torch.device("cuda", procs.local_rank) if res.device == "cuda" else torch.device("cpu"))
        self.engine = build_engine(res, model, plan, procs)
        self.device = self.engine.device

        self.progress = restore(self.engine, self.layers, plan, res, self.dp_rank) if plan.tag else Progress()
        self.train_ds, self.valid_ds, self.loader = build_data(res, self.progress.consumed, self.dp_rank, self.device)
        self.vocab_file = res.manifest.tokenizer.path(cfg.data)
        self.metrics = MetricsWriter(cfg.save_dir, enabled=self.rank == 0, tensorboard=cfg.tensorboard)
        self.inject = {int(s) for s in cfg.inject_nonfinite_steps.split(",") if s.strip()}
        self.unigram_id = self._most_frequent_label()
        self.peak = peak_tflops(cfg.peak_tflops)

    # ------------------------------------------------------------------------------------------

    def _state(self) -> dict:
        res = self.res
        return {
            "step": self.progress.step,
            "consumed_samples": self.progress.consumed,
            "skipped_total": self.progress.skipped_total,
            "global_batch_size": res.global_batch_size,
            "world_size": res.world_size,
            "dp": res.dp,
            "tp": self.cfg.tp,
            "zero_stage": res.zero_stage,
            "precision": res.precision,
            "seq_length": self.cfg.seq_length,
            "model_config": self.model_config.to_dict(),
            "config": res.to_dict(),
            "versions": _versions(),
            "git_sha": _git_sha(),
        }

    def save(self) -> None:
        # The TP dropout stream is per TP rank: it travels with the rank's RNG states.
        rng = getattr(self.layers, "rng", None)
        extra = {"tp_rng": rng.state_dict()} if hasattr(rng, "state_dict") else None
        ckpt.save(self.engine, self.cfg.save_dir, self.progress.step, self._state(), self.cfg.keep_last,
                  self.vocab_file, extra)

    # ------------------------------------------------------------------------------------------

    def _with_masked_positions(self, batch: dict) -> dict:
        """Add the flat indices of the masked tokens and (unpadded encoder) the batch's
        `TokenLayout`, both found on the host where the batch still is: the model's own `nonzero`
        on the GPU would wait for every queued kernel, per micro-batch. Packed rows
        (`sequence_ids`) give one sequence per pair; their `cls_positions` come with the batch."""
        rows = (batch["labels"].reshape(-1) != -100).nonzero().squeeze(1)
        out = {**batch, "masked_positions": rows}
        if self.cfg.unpad:
            out["layout"] = TokenLayout.from_attention_mask(batch["attention_mask"], sequence_ids=batch.get("sequence_ids"))
        if self.device.type == "cuda":
            # an asynchronous copy needs page-locked memory (the loader pinned the batch itself)
            out["masked_positions"] = rows.pin_memory()
            if "layout" in out:
                out["layout"] = out["layout"].pin_memory()
        return out

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    @staticmethod
    def _model_inputs(mb: dict) -> dict:
        """The engine's keyword arguments from a prepared, placed micro-batch."""
        return dict(
            input_ids=mb["input_ids"], token_type_ids=mb["token_type_ids"], attention_mask=mb["attention_mask"],
            labels=mb["labels"], next_sentence_label=mb["next_sentence_label"],
            masked_positions=mb["masked_positions"], layout=mb.get("layout"), cls_positions=mb.get("cls_positions"),
        )

    def _all_reduce(self, values: list[float], group) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=group)
        return t.tolist()

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over this rank's micro-batches.

        Returns the global-batch metrics as tensors on the device (plus host-side counts): nothing
        here waits for the device; `run()` reads them once per log interval.
        """
        res = self.res
        micro_batches = [self._with_masked_positions(mb) for mb in micro_batches]
        n_local = sum(mb["masked_positions"].numel() for mb in micro_batches)  # host-side
        # torch.full, not torch.tensor([...], device=...): the latter copies from pageable host memory
        # and waits for the stream; a fill kernel does not.
        n_global = torch.full((1,), float(n_local), dtype=torch.float64, device=self.device)
        dist.all_reduce(n_global, group=self.procs.dp_group)
        scale = (res.dp * res.grad_accum / n_global.clamp(min=1.0)).float()
        lengths = [length for mb in micro_batches for length in _sequence_lengths(mb)]  # real tokens, host
        # mlm loss sum, nsp loss sum, real tokens, sum of squared sequence lengths (attention's
        # FLOPs): one all-reduce at the end of the step
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        sums[2] = float(sum(lengths))
        sums[3] = float(sum(length * length for length in lengths))
        lr = self.engine.get_lr()[0]  # the lr this step uses (the scheduler moves on in step())
        for mb in micro_batches:
            mb = self._to_device(mb)
            out = self.engine(**self._model_inputs(mb))
            n_mb = mb["masked_positions"].numel()
            mlm = out.mlm_loss.float() * n_mb
            nsp = out.nsp_loss.float()
            if self.progress.step + 1 in self.inject:
                mlm, nsp = mlm * float("nan"), nsp * float("nan")
            loss = mlm * scale[0] + nsp
            self.engine.backward(loss)
            self.engine.step()
            sums[:2] += torch.stack([mlm.detach(), nsp.detach()]).double()
        dist.all_reduce(sums, group=self.procs.dp_group)
        mlm_loss = sums[0] / n_global[0].clamp(min=1.0)
        nsp_loss = sums[1] / (res.grad_accum * res.dp)
        return {
            "loss": mlm_loss + nsp_loss, "mlm_loss": mlm_loss, "nsp_loss": nsp_loss, "masked": n_global[0],
            "tokens": sums[2], "tokens_squared": sums[3], "lr": lr, "applied": self.engine.was_step_applied(),
        }

    def _most_frequent_label(self, n: int = 4096) -> int:
        """The most frequent masked token of the first `n` training samples: the unigram baseline
        that held-out MLM accuracy is compared against (identical on every rank)."""
        labels = self.train_ds.get_batch(np.arange(n), pack=False)["labels"]
        return int(np.bincount(labels[labels != -100]).argmax())

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out MLM/NSP accuracy and losses over the same `eval_samples` every time."""
        res = self.res
        per_block = res.micro_batch_size * res.dp
        total = max(per_block, (self.cfg.eval_samples // per_block) * per_block)
        sampler = PretrainingSampler(total, self.dp_rank, res.dp, res.micro_batch_size)
        self.engine.eval()
        sums = [0.0] * 7  # mlm correct, masked, mlm loss sum, nsp correct, nsp count, nsp loss sum, unigram correct
        for idx in sampler:
            mb = self._to_device(self._with_masked_positions(
                {k: torch.as_tensor(v) for k, v in self.valid_ds.get_batch(idx).items()}))
            out = self.engine(**self._model_inputs(mb))
            logits = out.prediction_logits.float()
            if self.cfg.tp > 1:
                parts = [torch.empty_like(logits) for _ in range(self.cfg.tp)]
                dist.all_gather(parts, logits.contiguous(), group=self.procs.tp_group)
                logits = torch.cat(parts, dim=-1)
            n = out.mlm_labels.numel()
            sums[0] += float((logits.argmax(-1) == out.mlm_labels).sum())
            sums[1] += n
            sums[2] += float(out.mlm_loss.float()) * n
            nsp_pred = out.seq_relationship_logits.argmax(-1)
            sums[3] += float((nsp_pred == mb["next_sentence_label"]).sum())
            sums[4] += mb["next_sentence_label"].numel()
            sums[5] += float(out.nsp_loss.float()) * mb["next_sentence_label"].numel()
            sums[6] += float((out.mlm_labels == self.unigram_id).sum())
        self.engine.train()
        s = self._all_reduce(sums, self.procs.dp_group)
        return {
            "mlm_acc": s[0] / max(s[1], 1), "nsp_acc": s[3] / max(s[4], 1),
            "mlm_loss": s[2] / max(s[1], 1), "nsp_loss": s[5] / max(s[4], 1),
            "loss": s[2] / max(s[1], 1) + s[5] / max(s[4], 1), "samples": s[4],
            # always predicting the most frequent training token: what MLM accuracy must beat
            "unigram_acc": s[6] / max(s[1], 1),
        }

    # ------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Train to --train_steps (or --exit_at_step, or a preemption signal), then save, evaluate
        and draw the loss curves. Returns this process's per-step history and the last eval."""
        cfg, res, progress = self.cfg, self.res, self.progress
        if progress.step >= cfg.train_steps:
            log.info("step %d >= --train_steps %d: nothing to train", progress.step, cfg.train_steps)
        stop_at = min(cfg.train_steps, cfg.exit_at_step) if cfg.exit_at_step > 0 else cfg.train_steps
        it = iter(self.loader)
        _install_preemption_handler()
        loop = _LoopState()
        while progress.step < stop_at:
            t0 = time.perf_counter()
            micro = [next(it) for _ in range(res.grad_accum)]
            t1 = time.perf_counter()
            m = self.train_step(micro)
            progress.step += 1
            progress.consumed += res.global_batch_size
            loop.pending.append(m)
            loop.consecutive_skipped = self._count_skipped(m, loop.consecutive_skipped)
            self._after_step(loop, m, stop_at, t0, t1)
            if self._preempted():
                log.warning("step %d: preemption signal (SIGUSR1) received: saving a checkpoint and exiting; "
                            "re-run the same command (a SLURM job requeues itself) to continue", progress.step)
                break
        self._finish(loop)
        return {"history": loop.history, "eval": loop.last_eval, "step": progress.step,
                "consumed_samples": progress.consumed}

    def _after_step(self, loop: "_LoopState", m: dict, stop_at: int, t0: float, t1: float) -> None:
        """Per-step bookkeeping: metrics at interval boundaries, the log line, eval and saving."""
        cfg, step = self.cfg, self.progress.step
        # The host waits for the device only here, once per log interval (and before an eval,
        # a save or the end), not per micro-batch: the last step of an interval absorbs the
        # device's backlog, so the interval's time is right.
        boundary = step % cfg.log_interval == 0 or step == stop_at
        if boundary or (cfg.eval_interval and step % cfg.eval_interval == 0) or step % cfg.save_interval == 0:
            loop.history.extend(self._materialise(loop.pending))
            loop.pending = []
        w = loop.window
        w["time"] += time.perf_counter() - t0
        w["wait"] += t1 - t0
        w["tokens"] += m["tokens"]
        w["tokens_squared"] += m["tokens_squared"]
        w["masked"] += m["masked"]
        w["steps"] += 1
        if step % cfg.log_interval == 0 or step == cfg.train_steps:
            self._log_window(w, loop.history[-1])
            loop.window = _new_window()
        if cfg.eval_interval and step % cfg.eval_interval == 0 and step != cfg.train_steps:
            loop.last_eval = self.evaluate()
            self.metrics.eval(step, loop.last_eval)
        if step % cfg.save_interval == 0 and step != stop_at:
            if loop.consecutive_skipped:
                # Inside a run of skipped steps: keep `latest` at the last healthy step.
                log.warning("step %d: checkpoint postponed, the last %d step(s) were skipped", step,
                            loop.consecutive_skipped)
            else:
                self.save()

    def _finish(self, loop: "_LoopState") -> None:
        """The final checkpoint (and eval at --train_steps) unless the last step is saved already."""
        cfg, step = self.cfg, self.progress.step
        final_tag = _broadcast_object(_latest_or_none(cfg.save_dir) if self.rank == 0 else None)
        if final_tag != ckpt.tag_for(step):
            if step == cfg.train_steps:
                loop.last_eval = self.evaluate()
                self.metrics.eval(step, loop.last_eval)
            self.save()
        if step < cfg.train_steps:
            log.info("exiting at step %d (--exit_at_step or a preemption signal); re-run the same command to "
                     "continue to step %d", step, cfg.train_steps)
        if self.rank == 0:
            png = plot_losses(self.metrics.path, os.path.join(cfg.save_dir, "loss_curves.png"))
            if png:
                log.info("loss curves: %s", png)
        self.metrics.close()

    def _count_skipped(self, m: dict, consecutive: int) -> int:
        """Bookkeeping of steps DeepSpeed did not apply (host-side flag); the run of consecutive
        ones, and the stop when it gets too long. Reads the loss (a device sync) only then."""
        cfg = self.cfg
        if m["applied"]:
            return 0
        self.progress.skipped_total += 1
        finite = math.isfinite(float(m["loss"]))
        # fp16 loss-scale overflows with a finite loss are the scaler calibrating itself, not a
        # diverging run: reported, but only non-finite losses count towards stopping.
        counts = not finite or self.res.precision != "fp16"
        consecutive = consecutive + 1 if counts else 0
        log.warning("step %d skipped: non-finite %s (%d in a row, %d in total)", self.progress.step,
                    "loss" if not finite else "gradients", consecutive, self.progress.skipped_total)
        if consecutive >= cfg.max_nonfinite_steps:
            msg = (f"stopping: {consecutive} consecutive steps with non-finite loss/gradients (step {self.progress.step}); "
                   f"no checkpoint was written for them, the last good one is {ckpt.latest_tag(cfg.save_dir)}. "
                   "Lower the learning rate, use bf16 instead of fp16, or check the data")
            log.error(msg)
            raise NonFiniteError(msg)
        return consecutive

    def _materialise(self, pending: list) -> list:
        """The interval's per-step metrics as floats: one device-to-host copy for all of them."""
        if not pending:
            return []
        values = torch.stack([torch.stack([m["loss"], m["mlm_loss"], m["nsp_loss"]]) for m in pending]).tolist()
        first_step = self.progress.step - len(pending) + 1
        out = []
        for i, (m, (loss, mlm, nsp)) in enumerate(zip(pending, values)):
            step = first_step + i
            if m["applied"] and not math.isfinite(loss):
                raise NonFiniteError(f"step {step}: non-finite loss but DeepSpeed applied the update")
            out.append({"step": step, "loss": loss, "mlm_loss": mlm, "nsp_loss": nsp, "applied": m["applied"],
                        "lr": m["lr"]})
        return out

    def _preempted(self) -> bool:
        # The signal reaches the ranks at different steps: agree on one step to stop at, so that
        # every rank takes part in the same checkpoint. Every step, on a CPU (gloo) group: a
        # host-side all-reduce that never waits for the GPU.
        flag = torch.tensor([float(_PREEMPT.is_set())])
        dist.all_reduce(flag, group=self.procs.host_group)
        return bool(flag.item() > 0)

    def _log_window(self, w: dict, m: dict) -> None:
        res, mc = self.res, self.model_config
        steps, dt = w["steps"], max(w["time"], 1e-9)
        seqs = steps * res.global_batch_size  # NSP pairs, packed or not
        # Real tokens only (padding is no model work, whether the encoder skipped it or not); the
        # decoder runs over the padded vocabulary's rows.
        flops = bert_flops(mc.hidden_size, mc.num_hidden_layers, mc.intermediate_size, res.padded_vocab_size,
                           tokens=float(w["tokens"]), tokens_squared=float(w["tokens_squared"]),
                           masked=float(w["masked"]), sequences=seqs)
        tflops = flops / dt / res.world_size / 1e12  # per device
        opt = self.engine.optimizer
        scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None) or 1.0
        grad_norm = self.engine.get_global_grad_norm()
        self.metrics.train({
            "step": self.progress.step, "loss": m["loss"], "mlm_loss": m["mlm_loss"], "nsp_loss": m["nsp_loss"],
            "lr": m["lr"],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "loss_scale": float(scale), "tokens_per_s": float(w["tokens"]) / dt, "seqs_per_s": seqs / dt,
            "tflops": tflops, "mfu": tflops / self.peak if self.peak else None, "mem_gb": memory_gb(),
            "data_wait": w["wait"] / dt, "skipped": self.progress.skipped_total,
            "sequences": "packed" if self.cfg.pack_sequences else "unpacked",
        })


def _check_same_on_every_rank(values: dict) -> None:
    """What each rank resolved on its own (native precision follows its GPU/CPU) must agree: a
    job across mixed hardware (V100 and A100 nodes) would otherwise train fp16 on some ranks and
    bf16 on others."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, values)
    differ = {k: sorted({str(v[k]) for v in everyone}) for k in values if len({str(v[k]) for v in everyone}) > 1}
    if differ:
        raise ConfigError(f"ranks resolved different settings {differ} (mixed hardware?): pass --precision explicitly "
                          "or run on one kind of node")


def _sequence_lengths(mb: dict) -> list:
    """Real tokens of each sequence (NSP pair) of a prepared micro-batch: its layout's lengths
    (one per pair, also in packed rows), else the attention mask's row sums (padded encoder)."""
    if mb.get("layout") is not None:
        return list(mb["layout"].lengths)
    return mb["attention_mask"].sum(1).tolist()


def _new_window() -> dict:
    # tokens and masked are summed as device tensors; read when the window is logged
    return {"time": 0.0, "wait": 0.0, "tokens": 0.0, "tokens_squared": 0.0, "steps": 0, "masked": 0.0}


@dataclass
class _LoopState:
    """What one `run()` carries from step to step (not saved: a resumed run starts afresh)."""

    history: list = field(default_factory=list)  # per-step metrics of this process (tests compare runs)
    pending: list = field(default_factory=list)  # this interval's per-step metrics, still on the device
    window: dict = field(default_factory=_new_window)  # the log interval's timings and counts
    consecutive_skipped: int = 0
    last_eval: Optional[dict] = None


def _latest_or_none(save_dir: str) -> Optional[str]:
    """`latest`, or None when it cannot be read (then the final save runs again and reports)."""
    try:
        return ckpt.latest_tag(save_dir)
    except OSError:
        return None


def _broadcast_object(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
