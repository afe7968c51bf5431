"""The pretraining loop: build model, engine and data from a validated config, then train.

Order of construction (torchtitan's): process groups -> megatron-core TP groups -> dense model
initialised from the seed on every rank -> TP shards cut from it (so tp=1 and tp=N start from the
same full weights) -> DeepSpeed engine (ZeRO, precision, optimizer, schedule) -> resume.

The loss is token-weighted over the whole global batch: the MLM loss of a step is the mean over
every masked token of the global batch, whichever rank and micro-batch holds it. DeepSpeed
averages gradients over micro-batches and data-parallel ranks, so each micro-batch's summed MLM
loss is scaled by (dp x accumulation / masked tokens in the global batch). This makes the update
independent of how the global batch is split, which is what lets dp=2 equal one process and a
dp=2 run resume at dp=1 on the same trajectory.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

import torch

from pretrain import checkpoint as ckpt
from pretrain.config import ConfigError, Resolved
from pretrain.optim import build_scheduler
from pretrain.metrics import MetricsWriter, bert_flops_per_sequence, memory_gb, peak_tflops, plot_losses

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
    import deepspeed

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "deepspeed": deepspeed.__version__}
    try:
        import megatron.core

        out["megatron-core"] = getattr(megatron.core, "__version__", "?")
    except ImportError:
        pass
    return out


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """pretrain.optim's groups (no decay on biases and LayerNorm), without the bookkeeping names."""
    from pretrain import optim

    groups = optim.param_groups(model, weight_decay)
    for g in groups:
        g.pop("names", None)
    return groups


def _client_optimizer(kind: str, model: torch.nn.Module, params: dict, tp_group):
    """pretrain.optim's LAMB / AdamW (used where DeepSpeed has no implementation on the device).
    Built after the model is placed: the implementation (fused kernels on GPU) follows the device."""
    from pretrain import optim

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
    from pretrain.model import BertConfig, BertForPreTraining

    config = BertConfig.from_dict(res.model_config, source=f"--model_config {res.cfg.model_config}")
    torch.manual_seed(res.cfg.seed)
    dense = BertForPreTraining(config, padded_vocab_size=res.padded_vocab_size)
    dense.init_weights()
    layers = None
    model = dense
    if tp > 1:
        from pretrain.parallel import MegatronLayerFactory, mark_tensor_parallel_params, shard_state_dict, tp_partition_dims
        from pretrain.hf_io import load_into

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


def load_init_weights(path: str, config, model, tp_rank: int, tp: int) -> None:
    """--init_from: full fp32 weights from a trainer checkpoint or an HF directory, into `model`.

    Both sources give the real vocabulary (a checkpoint's padding, maybe for another tp, is cut
    off by ckpt.full_weights); it is padded again to this model's rows."""
    from pretrain.hf_io import load_hf_dir, load_into
    from pretrain.parallel import shard_state_dict, tp_partition_dims
    from pretrain.vocab import resize_vocab

    if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, ckpt.STATE_FILE)):
        _, full = load_hf_dir(path)
    else:
        try:
            run_dir, tag = ckpt.resolve(path)
        except ckpt.CheckpointError as e:
            raise ConfigError(f"--init_from {path}: {e}") from None
        full = ckpt.full_weights(run_dir, tag)
    words = full.get("bert.embeddings.word_embeddings.weight")
    if words is not None and words.shape[0] != config.vocab_size:
        raise ConfigError(f"--init_from {path}: its vocabulary has {words.shape[0]} tokens, --model_config says vocab_size "
                          f"{config.vocab_size}; use the model config (and tokenizer) of the run it comes from")
    full = {k: v for k, v in full.items() if k in dict(model.state_dict())}
    full = resize_vocab(full, config.vocab_size, model.padded_vocab_size)
    load_into(model, shard_state_dict(full, tp_rank, tp, tp_partition_dims(model)) if tp > 1 else full)


# ----------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    def __init__(self, res: Resolved):
        import deepspeed
        import torch.distributed as dist
        from megatron.core import parallel_state

        from pretrain.data import PretrainingDataset, build_dataloader
        from pretrain.parallel import MegatronMPU, init_distributed, initialize_model_parallel

        self.res = res
        cfg = self.cfg = res.cfg
        launch = init_distributed()
        self.rank = launch.rank
        setup_logging(self.rank)
        initialize_model_parallel(cfg.tp)
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.dist = dist
        if dist.get_world_size() != res.world_size:
            raise ConfigError(f"validated for world size {res.world_size} but {dist.get_world_size()} processes started")
        # Host-side agreement (preemption) without touching the GPU stream: a gloo group beside NCCL.
        self.host_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        _check_same_on_every_rank(dist, {"precision": res.precision, "padded_vocab_size": res.padded_vocab_size,
                                         "device": res.device})
        os.makedirs(cfg.save_dir, exist_ok=True)

        log.info("config: %s", json.dumps(res.to_dict()["cfg"], sort_keys=True))
        log.info("deepspeed config: %s", json.dumps(res.ds_config, sort_keys=True))
        log.info(
            "world %d = dp %d x tp %d | ZeRO-%d | %s | batch: micro %d x accumulation %d x dp %d = %d | %s | git %s",
            res.world_size, res.dp, cfg.tp, res.zero_stage, res.precision, res.micro_batch_size, res.grad_accum,
            res.dp, res.global_batch_size, _versions(), _git_sha(),
        )
        if res.precision_warning and self.rank == 0:
            log.warning("precision: %s", res.precision_warning)
        if res.resume_warning and self.rank == 0:
            log.warning("resume: %s", res.resume_warning)

        # --- resume decision before the engine exists (dp change needs another load path)
        self.resume_tag = ckpt.latest_tag(cfg.save_dir) if dist.get_rank() == 0 else None
        self.resume_tag = _broadcast_object(self.resume_tag)
        self.resume_state = ckpt.read_state(cfg.save_dir, self.resume_tag) if self.resume_tag else None

        # --- model
        self.model_config, model, self.layers = build_model(res, self.tp_rank, cfg.tp)
        from pretrain.model import count_parameters

        n_params = count_parameters(model)
        log.info("model: %s parameters on this rank (tp shard), %s", f"{n_params:,}", json.dumps(self.model_config.to_dict()))
        if cfg.init_from and self.resume_state is None:
            load_init_weights(cfg.init_from, self.model_config, model, self.tp_rank, cfg.tp)
            log.info("initialised weights from %s (optimizer and schedule start fresh)", cfg.init_from)

        # --- placement, then optimizer (its implementation depends on where the parameters are:
        # fused kernels on GPU), schedule, engine
        device = torch.device("cuda", launch.local_rank) if res.device == "cuda" else torch.device("cpu")
        model.to(device)
        ds_config = json.loads(json.dumps(res.ds_config))
        groups = param_groups(model, float(res.optimizer_params.get("weight_decay", 0.0)))
        # LAMB is always ours: DeepSpeed's has no CPU kernel, and under ZeRO its FusedLamb takes one
        # trust ratio per flat partition instead of per tensor (pretrain.optim.Lamb recovers them).
        use_client = cfg.optimizer == "client" or res.optimizer_type == "lamb"
        optimizer = None
        if use_client:
            optimizer = _client_optimizer(res.optimizer_type, model, res.optimizer_params, self.tp_group if cfg.tp > 1 else None)
            ds_config.pop("optimizer", None)
        else:
            ds_config["optimizer"]["params"] = deepspeed_optimizer_params(res.optimizer_params, device.type)
        warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else int(round(cfg.warmup_proportion * cfg.train_steps))
        power = 1.0 if cfg.decay == "linear" else cfg.decay_power
        schedule = lambda opt: build_scheduler(opt, warmup, cfg.train_steps, power=power)  # noqa: E731
        self.same_world = self.resume_state is not None and self.resume_state["world_size"] == res.world_size
        if self.resume_state is not None and self.resume_state["dp"] != res.dp:
            self._prepare_universal(ds_config)

        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=groups if optimizer is None else None,
            optimizer=optimizer,
            lr_scheduler=schedule,
            config=ds_config,
            mpu=MegatronMPU(),
        )
        self.device = self.engine.device
        if hasattr(optimizer, "attach_zero_partitions"):
            optimizer.attach_zero_partitions(self.engine.optimizer)  # per-tensor trust ratios under ZeRO 1/2
        log.info("optimizer: %s", describe_optimizer(self.engine.optimizer))

        # --- resume
        self.step = 0
        self.consumed = 0
        self.skipped_total = 0
        if self.resume_tag:
            self._resume()

        # --- data
        self.train_ds = PretrainingDataset(cfg.data, cfg.seq_length, "train", masking=cfg.masking(), seed=cfg.seed)
        self.valid_ds = PretrainingDataset(cfg.data, cfg.seq_length, "valid", masking=cfg.masking(), seed=cfg.seed)
        workers = loader_workers(cfg.num_workers, self.device.type)
        self.loader = build_dataloader(
            self.train_ds, res.micro_batch_size, dp_rank=self.dp_rank, dp_size=res.dp,
            consumed_samples=self.consumed, num_workers=workers, pin_memory=self.device.type == "cuda",
        )
        log.info("data: %d loader worker(s) per rank%s", workers, ", pinned memory" if self.device.type == "cuda" else "")
        tok = res.manifest.get("tokenizer", {})
        self.vocab_file = os.path.join(cfg.data, tok.get("file", "vocab.txt"))
        self.metrics = MetricsWriter(cfg.save_dir, enabled=self.rank == 0, tensorboard=cfg.tensorboard)
        self.inject = {int(s) for s in cfg.inject_nonfinite_steps.split(",") if s.strip()}
        self.unigram_id = self._most_frequent_label()
        self.peak = peak_tflops(cfg.peak_tflops)

    # ------------------------------------------------------------------------------------------

    def _prepare_universal(self, ds_config: dict) -> None:
        """A checkpoint from another dp size: DeepSpeed's universal format re-partitions ZeRO
        optimizer state; convert once (rank 0) and tell the engine to load it."""
        src = os.path.join(self.cfg.save_dir, self.resume_tag)
        uni_tag = self.resume_tag + "_universal"
        dst = os.path.join(self.cfg.save_dir, uni_tag)
        if self.dist.get_rank() == 0 and not os.path.isfile(os.path.join(dst, ".complete")):
            log.info("checkpoint %s was written at dp=%d, now dp=%d: converting it to DeepSpeed's universal format",
                     src, self.resume_state["dp"], self.res.dp)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src,
                   "--output_folder", dst, "--num_extract_workers", "1", "--num_merge_workers", "1"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"ds_to_universal failed on {src}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            open(os.path.join(dst, ".complete"), "w").close()
        self.dist.barrier()
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
        self.load_tag = uni_tag

    def _resume(self) -> None:
        tag = getattr(self, "load_tag", self.resume_tag)
        state, extra = ckpt.load(self.engine, self.cfg.save_dir, tag, same_world=self.same_world, rng_tag=self.resume_tag)
        if extra.get("tp_rng") is not None and hasattr(getattr(self.layers, "rng", None), "load_state_dict"):
            self.layers.rng.load_state_dict(extra["tp_rng"])
        # The schedule is rebuilt from this run's flags (phase lengths may have been extended):
        # the lr of the next step follows from it, not from the lr stored in the optimizer state.
        sched = self.engine.lr_scheduler
        for group, base, fn in zip(self.engine.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * fn(sched.last_epoch)
        self.step = state["step"]
        self.consumed = state["consumed_samples"]
        self.skipped_total = state.get("skipped_total", 0)
        if state["global_batch_size"] != self.res.global_batch_size:
            log.warning(
                "resuming with global batch %d, the checkpoint used %d: the sample order continues from "
                "sample %d, but step boundaries differ from the original run", self.res.global_batch_size,
                state["global_batch_size"], self.consumed,
            )
        if not self.same_world:
            # RNG streams are per rank; with another rank layout they cannot continue, so each
            # rank gets a fresh stream derived from (seed, step, dp rank). Not the global rank: the
            # ranks of one TP group must draw the same replicated-region dropout masks (hidden
            # states, embeddings), or their copies of LayerNorm/bias/embedding weights drift apart.
            torch.manual_seed(self.cfg.seed * 1000003 + self.step * 1009 + self.dp_rank)
        log.info("resumed from %s: step %d, %d samples consumed", os.path.join(self.cfg.save_dir, tag), self.step, self.consumed)

    def _state(self) -> dict:
        res = self.res
        return {
            "step": self.step,
            "consumed_samples": self.consumed,
            "skipped_total": self.skipped_total,
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
        ckpt.save(self.engine, self.cfg.save_dir, self.step, self._state(), self.cfg.keep_last, self.vocab_file, extra)

    # ------------------------------------------------------------------------------------------

    def _with_masked_positions(self, batch: dict) -> dict:
        """Add the flat indices of the masked tokens, found on the host where the labels still are:
        the model's own `nonzero` on the GPU would wait for every queued kernel, per micro-batch."""
        rows = (batch["labels"].reshape(-1) != -100).nonzero().squeeze(1)
        if self.device.type == "cuda":
            rows = rows.pin_memory()  # an asynchronous copy needs page-locked memory
        return {**batch, "masked_positions": rows}

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _all_reduce(self, values: list[float], group) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t, group=group)
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
        self.dist.all_reduce(n_global, group=self.dp_group)
        scale = (res.dp * res.grad_accum / n_global.clamp(min=1.0)).float()
        tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)  # non-pad, host tensors
        # mlm loss sum, nsp loss sum, non-pad tokens: one all-reduce at the end of the step
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        sums[2] = float(tokens)
        lr = self.engine.get_lr()[0]  # the lr this step uses (the scheduler moves on in step())
        for mb in micro_batches:
            mb = self._to_device(mb)
            out = self.engine(
                input_ids=mb["input_ids"], token_type_ids=mb["token_type_ids"], attention_mask=mb["attention_mask"],
                labels=mb["labels"], next_sentence_label=mb["next_sentence_label"],
                masked_positions=mb["masked_positions"],
            )
            n_mb = mb["masked_positions"].numel()
            mlm = out.mlm_loss.float() * n_mb
            nsp = out.nsp_loss.float()
            if self.step + 1 in self.inject:
                mlm, nsp = mlm * float("nan"), nsp * float("nan")
            loss = mlm * scale[0] + nsp
            self.engine.backward(loss)
            self.engine.step()
            sums[:2] += torch.stack([mlm.detach(), nsp.detach()]).double()
        self.dist.all_reduce(sums, group=self.dp_group)
        mlm_loss = sums[0] / n_global[0].clamp(min=1.0)
        nsp_loss = sums[1] / (res.grad_accum * res.dp)
        return {
            "loss": mlm_loss + nsp_loss, "mlm_loss": mlm_loss, "nsp_loss": nsp_loss, "masked": n_global[0],
            "tokens": sums[2], "lr": lr, "applied": self.engine.was_step_applied(),
        }

    def _most_frequent_label(self, n: int = 4096) -> int:
        """The most frequent masked token of the first `n` training samples: the unigram baseline
        that held-out MLM accuracy is compared against (identical on every rank)."""
        import numpy as np

        labels = self.train_ds.get_batch(np.arange(n))["labels"]
        return int(np.bincount(labels[labels != -100]).argmax())

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out MLM/NSP accuracy and losses over the same `eval_samples` every time."""
        from pretrain.data import PretrainingSampler, collate_pretraining

        res = self.res
        per_block = res.micro_batch_size * res.dp
        total = max(per_block, (self.cfg.eval_samples // per_block) * per_block)
        sampler = PretrainingSampler(total, self.dp_rank, res.dp, res.micro_batch_size)
        self.engine.eval()
        sums = [0.0] * 7  # mlm correct, masked, mlm loss sum, nsp correct, nsp count, nsp loss sum, unigram correct
        for idx in sampler:
            mb = self._to_device(self._with_masked_positions(
                {k: torch.as_tensor(v) for k, v in self.valid_ds.get_batch(idx).items()}))
            out = self.engine(
                input_ids=mb["input_ids"], token_type_ids=mb["token_type_ids"], attention_mask=mb["attention_mask"],
                labels=mb["labels"], next_sentence_label=mb["next_sentence_label"], masked_positions=mb["masked_positions"],
            )
            logits = out.prediction_logits.float()
            if self.cfg.tp > 1:
                parts = [torch.empty_like(logits) for _ in range(self.cfg.tp)]
                self.dist.all_gather(parts, logits.contiguous(), group=self.tp_group)
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
        s = self._all_reduce(sums, self.dp_group)
        return {
            "mlm_acc": s[0] / max(s[1], 1), "nsp_acc": s[3] / max(s[4], 1),
            "mlm_loss": s[2] / max(s[1], 1), "nsp_loss": s[5] / max(s[4], 1),
            "loss": s[2] / max(s[1], 1) + s[5] / max(s[4], 1), "samples": s[4],
            # always predicting the most frequent training token: what MLM accuracy must beat
            "unigram_acc": s[6] / max(s[1], 1),
        }

    # ------------------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg, res = self.cfg, self.res
        history = []  # per-step metrics of this process (tests compare them across runs)
        if self.step >= cfg.train_steps:
            log.info("step %d >= --train_steps %d: nothing to train", self.step, cfg.train_steps)
        it = iter(self.loader)
        _install_preemption_handler()
        consecutive = 0
        pending = []  # this interval's per-step metrics, still on the device
        window = _new_window()
        flops_cfg = (self.model_config.hidden_size, self.model_config.num_hidden_layers,
                     self.model_config.intermediate_size, res.padded_vocab_size, cfg.seq_length)  # the rows the decoder runs
        last_eval = None
        stop_at = min(cfg.train_steps, cfg.exit_at_step) if cfg.exit_at_step > 0 else cfg.train_steps
        while self.step < stop_at:
            t0 = time.perf_counter()
            micro = [next(it) for _ in range(res.grad_accum)]
            t1 = time.perf_counter()
            m = self.train_step(micro)
            self.step += 1
            self.consumed += res.global_batch_size
            pending.append(m)
            consecutive = self._count_skipped(m, consecutive)
            # The host waits for the device only here, once per log interval (and before an eval,
            # a save or the end), not per micro-batch: the last step of an interval absorbs the
            # device's backlog, so the interval's time is right.
            boundary = self.step % cfg.log_interval == 0 or self.step == stop_at
            sync = boundary or (cfg.eval_interval and self.step % cfg.eval_interval == 0) or self.step % cfg.save_interval == 0
            if sync:
                history.extend(self._materialise(pending))
                pending = []
            t2 = time.perf_counter()

            window["time"] += t2 - t0
            window["wait"] += t1 - t0
            window["tokens"] += m["tokens"]
            window["masked"] += m["masked"]
            window["steps"] += 1
            if self.step % cfg.log_interval == 0 or self.step == cfg.train_steps:
                self._log_window(window, history[-1], flops_cfg)
                window = _new_window()

            if cfg.eval_interval and self.step % cfg.eval_interval == 0 and self.step != cfg.train_steps:
                last_eval = self.evaluate()
                self.metrics.eval(self.step, last_eval)
            if self.step % cfg.save_interval == 0 and self.step != stop_at:
                if consecutive:
                    # Inside a run of skipped steps: keep `latest` at the last healthy step.
                    log.warning("step %d: checkpoint postponed, the last %d step(s) were skipped", self.step, consecutive)
                else:
                    self.save()
            if self._preempted():
                log.warning("step %d: preemption signal (SIGUSR1) received: saving a checkpoint and exiting; "
                            "re-run the same command (a SLURM job requeues itself) to continue", self.step)
                break

        final_tag = _broadcast_object(ckpt.latest_tag(cfg.save_dir) if self.rank == 0 else None)
        if final_tag != ckpt.tag_for(self.step):
            if self.step == cfg.train_steps:
                last_eval = self.evaluate()
                self.metrics.eval(self.step, last_eval)
            self.save()
        if self.step < cfg.train_steps:
            log.info("exiting at step %d (--exit_at_step or a preemption signal); re-run the same command to continue to step %d", self.step, cfg.train_steps)
        if self.rank == 0:
            png = plot_losses(self.metrics.path, os.path.join(cfg.save_dir, "loss_curves.png"))
            if png:
                log.info("loss curves: %s", png)
        self.metrics.close()
        return {"history": history, "eval": last_eval, "step": self.step, "consumed_samples": self.consumed}

    def _count_skipped(self, m: dict, consecutive: int) -> int:
        """Bookkeeping of steps DeepSpeed did not apply (host-side flag); the run of consecutive
        ones, and the stop when it gets too long. Reads the loss (a device sync) only then."""
        cfg = self.cfg
        if m["applied"]:
            return 0
        self.skipped_total += 1
        finite = math.isfinite(float(m["loss"]))
        # fp16 loss-scale overflows with a finite loss are the scaler calibrating itself, not a
        # diverging run: reported, but only non-finite losses count towards stopping.
        counts = not finite or self.res.precision != "fp16"
        consecutive = consecutive + 1 if counts else 0
        log.warning("step %d skipped: non-finite %s (%d in a row, %d in total)", self.step,
                    "loss" if not finite else "gradients", consecutive, self.skipped_total)
        if consecutive >= cfg.max_nonfinite_steps:
            msg = (f"stopping: {consecutive} consecutive steps with non-finite loss/gradients (step {self.step}); "
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
        first_step = self.step - len(pending) + 1
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
        self.dist.all_reduce(flag, group=self.host_group)
        return bool(flag.item() > 0)

    def _log_window(self, w: dict, m: dict, flops_cfg) -> None:
        res = self.res
        steps, dt = w["steps"], max(w["time"], 1e-9)
        seqs = steps * res.global_batch_size
        masked_per_seq = float(w["masked"]) / max(seqs, 1)
        flops = bert_flops_per_sequence(*flops_cfg, masked=masked_per_seq) * seqs
        tflops = flops / dt / res.world_size / 1e12  # per device
        opt = self.engine.optimizer
        scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None) or 1.0
        grad_norm = self.engine.get_global_grad_norm()
        self.metrics.train({
            "step": self.step, "loss": m["loss"], "mlm_loss": m["mlm_loss"], "nsp_loss": m["nsp_loss"],
            "lr": m["lr"],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "loss_scale": float(scale), "tokens_per_s": float(w["tokens"]) / dt, "seqs_per_s": seqs / dt,
            "tflops": tflops, "mfu": tflops / self.peak if self.peak else None, "mem_gb": memory_gb(),
            "data_wait": w["wait"] / dt, "skipped": self.skipped_total,
        })


def _check_same_on_every_rank(dist, values: dict) -> None:
    """What each rank resolved on its own (native precision follows its GPU/CPU) must agree: a
    job across mixed hardware (V100 and A100 nodes) would otherwise train fp16 on some ranks and
    bf16 on others."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, values)
    differ = {k: sorted({str(v[k]) for v in everyone}) for k in values if len({str(v[k]) for v in everyone}) > 1}
    if differ:
        raise ConfigError(f"ranks resolved different settings {differ} (mixed hardware?): pass --precision explicitly "
                          "or run on one kind of node")


def _new_window() -> dict:
    # tokens and masked are summed as device tensors; read when the window is logged
    return {"time": 0.0, "wait": 0.0, "tokens": 0.0, "steps": 0, "masked": 0.0}


def _broadcast_object(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
