"""The trainer's configuration: one typed dataclass, resolved CLI > file > defaults, then validated.

Everything that can be checked without a process group is checked here, before
`torch.distributed` starts, so that a bad flag costs a second and a readable message instead of a
hung or crashed multi-node job: the model config (by the model's own reader), its tensor-parallel
split and world = dp x tp (by the TP layer's checks), the data directory's manifest and pair index
(by data_prep's readers), batch arithmetic against the DeepSpeed config, the sequence length
against the position table, and a checkpoint to resume from (by the checkpoint module's readers).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from data_prep import manifest as data_manifest
from data_prep.manifest import Manifest, ManifestError
from data_prep.pairs import PairIndex, PairIndexError
from pretrain import checkpoint as ckpt
from pretrain import precision as prec
from pretrain.masking import MaskingConfig
from pretrain.model import SHAPE_FIELDS, BertConfig
from pretrain.optim import check_optimizer_for_zero, lamb_kwargs_from_ds_params
from pretrain.tensor_parallel import validate_model_for_tp
from pretrain.vocab import padded_vocab_size


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message says what to change."""


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- what to train on
    ds_config: str = _f("", "DeepSpeed config JSON (configs/zero{1,2,3}[_fp16].json): ZeRO stage, precision, batch, optimizer")
    model_config: str = _f("", "model config JSON with HF BertConfig field names (configs/bert-*.json)")
    data: str = _f("", "data_prep output directory (holds manifest.json, corpus.*, pairs_<L>_*.bin)")
    seq_length: int = _f(128, "tokens per sample; the data directory needs pairs_<seq_length>_train.bin")
    masked_lm_prob: float = _f(0.15, "fraction of each sample's text tokens the MLM predicts (80%% [MASK], 10%% random, 10%% kept)")
    whole_word_masking: bool = _f(False, "mask whole words: a WordPiece word's ## pieces (a sentencepiece word's pieces) go together")
    masked_lm_frequency_power: float = _f(0.0, "choose the MLM's tokens with weight (corpus count + 1)^-P instead of uniformly "
                                          "(0 = BERT; 0.5 predicts rare tokens more and 'the' less, like word2vec's subsampling); "
                                          "held-out MLM accuracy keeps uniform masking")
    # --- how long and how big
    train_steps: int = _f(0, "optimizer steps to run in total (a resumed run continues up to this step)")
    micro_batch_size: int = _f(0, "per-rank micro batch; 0 = take train_micro_batch_size_per_gpu from --ds_config")
    global_batch_size: int = _f(0, "samples per optimizer step over all ranks; 0 = from --ds_config (or micro x accumulation x dp)")
    tp: int = _f(1, "tensor-parallel size (megatron-core); world size must be dp x tp")
    make_vocab_size_divisible_by: int = _f(128, "pad the word embeddings and MLM decoder to a multiple of this x --tp rows "
                                           "(Megatron's rule: TP splits them by rows, 128 keeps the decoder GEMM efficient); "
                                           "padded ids are never predicted, and exports keep the model config's vocab_size")
    precision: str = _f("config", "config: as --ds_config says (its bf16/fp16 blocks; \"enabled\": \"auto\" = native); auto: the "
                        "device's native precision (bf16 on GPUs of compute capability >= 8 and on CPUs with AVX512-BF16/AMX, "
                        "fp16 with dynamic loss scaling on older GPUs, fp32 on other CPUs); fp32/bf16/fp16: that one",
                        choices=("config", "auto", "fp32", "bf16", "fp16"))
    # --- optimizer and schedule (the optimizer's hyper-parameters come from --ds_config's "optimizer" block)
    optimizer: str = _f("auto", "auto: DeepSpeed's optimizer from --ds_config, or pretrain.optim's where DeepSpeed has none on this "
                        "device (LAMB on CPU); client: always pretrain.optim's implementation", choices=("auto", "client"))
    lr: float = _f(0.0, "peak learning rate; 0 = the lr in --ds_config's optimizer params")
    warmup_steps: int = _f(-1, "linear warm-up steps; -1 = warmup_proportion x train_steps")
    warmup_proportion: float = _f(0.01, "warm-up as a fraction of train_steps (used when --warmup_steps is -1)")
    decay: str = _f("poly", "decay after warm-up to 0 at train_steps: poly (power --decay_power) or linear", choices=("poly", "linear"))
    decay_power: float = _f(0.5, "power of the polynomial decay (BERT's NVIDIA recipe uses 0.5)")
    # --- model options
    activation_checkpointing: bool = _f(False, "recompute each encoder layer in backward (saves activation memory, ~33%% more compute)")
    unpad: bool = _f(True, "run the encoder on the real tokens only (pretrain/unpad.py: no dense layer or attention spends "
                     "work on padding, same numbers); --no-unpad runs it padded (for A/B comparisons)")
    pack_sequences: bool = _f(False, "pack several NSP pairs into one row of --seq_length (each with its own positions, "
                              "segments, attention and NSP label; each micro-batch still holds --micro_batch_size pairs, "
                              "in fewer rows); needs --unpad")
    # --- phases, checkpoints, resume
    init_from: str = _f("", "start from these weights when --save_dir has no checkpoint yet: a checkpoint folder of this "
                        "trainer (phase 1 -> phase 2) or an HF BertForPreTraining directory; optimizer and schedule start fresh")
    save_dir: str = _f("", "run directory: checkpoints, metrics.jsonl, TensorBoard logs, loss-curve PNG; re-running resumes from it")
    save_interval: int = _f(1000, "save a checkpoint every N steps (and always at the end)")
    exit_at_step: int = _f(0, "save and exit after this step (e.g. to fit a job's time slot); re-running continues to --train_steps")
    keep_last: int = _f(3, "checkpoints kept in --save_dir (older ones are deleted after a newer one is complete)")
    verify_checksums: bool = _f(True, "on start, check the CRC-32 of every file of the checkpoint to resume from (sizes are "
                                "always checked); --no-verify_checksums skips reading them, for multi-TB checkpoints")
    # --- evaluation and logging
    eval_interval: int = _f(1000, "evaluate on the held-out split every N steps (and at the end); 0 = only at the end")
    eval_samples: int = _f(2048, "held-out samples per evaluation (the same samples every time)")
    log_interval: int = _f(10, "steps per metrics line / TensorBoard point")
    peak_tflops: float = _f(0.0, "accelerator peak TFLOP/s for MFU; 0 = known GPUs by name (H100/H200/A100 bf16/fp16), else MFU n/a")
    tensorboard: bool = _f(True, "write TensorBoard events under SAVE_DIR/tensorboard")
    # --- robustness and reproducibility
    max_nonfinite_steps: int = _f(10, "stop after this many consecutive skipped steps with non-finite loss or gradients")
    seed: int = _f(1234, "seed of the sample order, masking and weight init")
    num_workers: int = _f(-1, "DataLoader worker processes per rank; -1 = auto: up to 4 on GPU (with pinned memory), 0 on CPU "
                          "(samples depend only on (seed, index), not on workers)")
    inject_nonfinite_steps: str = _f("", "testing aid: comma-separated steps whose loss is made NaN (exercises the skip logic)")
    config: str = _f("", "JSON file with any of these fields (e.g. configs/phase1.json); command-line flags override it")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def masking(self) -> MaskingConfig:
        return MaskingConfig(mlm_probability=self.masked_lm_prob, whole_word=self.whole_word_masking,
                             frequency_power=self.masked_lm_frequency_power)


_REQUIRED = ("ds_config", "model_config", "data", "train_steps", "save_dir")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain/run.py",
        description="BERT pretraining with DeepSpeed ZeRO and megatron-core tensor parallelism.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        kw: dict[str, Any] = {"help": f.metadata["help"], "default": argparse.SUPPRESS}
        if f.type == "bool" or isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = type(f.default)
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        p.add_argument(f"--{f.name}", **kw)
    # The deepspeed launcher appends --local_rank=N; ranks come from the environment instead.
    p.add_argument("--local_rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def load_config(argv: Optional[list[str]] = None) -> TrainConfig:
    """Defaults, then the --config file, then the command line (only flags actually given)."""
    args = vars(build_parser().parse_args(argv))
    args.pop("local_rank", None)
    values: dict[str, Any] = {}
    if args.get("config"):
        values.update(_read_config_file(args["config"]))
    values.update(args)
    return from_dict(values, source="the command line")


def _read_config_file(path: str) -> dict:
    data = _read_json(path, "--config")
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of trainer fields")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown field(s) {unknown}; known fields: {sorted(known)}")
    # Relative paths in a recipe file are relative to the current directory, like flags.
    return data


def from_dict(values: dict, source: str = "config") -> TrainConfig:
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown}")
    cfg = TrainConfig()
    for k, v in values.items():
        default = known[k].default
        if isinstance(default, bool):
            ok = isinstance(v, bool)
        elif isinstance(default, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            v = float(v) if ok else v
        else:
            ok = isinstance(v, type(default)) and not isinstance(v, bool)
        if not ok:
            raise ConfigError(f"{source}: field {k!r} must be {type(default).__name__}, got {v!r}")
        setattr(cfg, k, v)
    return cfg


def _read_json(path: str, flag: str) -> Any:
    if not path:
        raise ConfigError(f"{flag} is required")
    if not os.path.isfile(path):
        raise ConfigError(f"{flag} {path}: no such file")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} {path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


# ----------------------------------------------------------------------------------------------
# World size before any process group exists


def world_size_from_env(env=None) -> int:
    """The number of processes the launcher started: torchrun/deepspeed (WORLD_SIZE), srun
    (SLURM_NTASKS), mpirun (OMPI_COMM_WORLD_SIZE / PMI_SIZE); 1 when started by hand."""
    env = os.environ if env is None else env
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS"):
        if env.get(key):
            return int(env[key])
    return 1


# ----------------------------------------------------------------------------------------------
# Validation


@dataclass
class Resolved:
    """What validation derives from the inputs; the trainer uses these, not the raw files."""

    cfg: TrainConfig
    ds_config: dict  # the DeepSpeed config as it will be passed to deepspeed.initialize
    model_config: dict  # HF BertConfig fields
    world_size: int
    dp: int
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int
    zero_stage: int
    precision: str  # "fp32" | "bf16" | "fp16", resolved for the device (never "auto")
    optimizer_type: str  # "adamw" | "lamb"
    optimizer_params: dict
    manifest: Manifest  # the data directory's, as data_prep.manifest reads it
    device: str = "cpu"  # "cuda" | "cpu"
    precision_warning: Optional[str] = None  # logged once at start (bf16 asked on a CPU that emulates it)
    resume_warning: Optional[str] = None  # logged once at start (a resume with other masking flags)
    padded_vocab_size: int = 0  # word-embedding / MLM-decoder rows: vocab_size padded (pretrain/vocab.py)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["cfg"] = self.cfg.to_dict()
        return d


_DS_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def validate(cfg: TrainConfig, world_size: Optional[int] = None, device: Optional[str] = None) -> Resolved:
    """Check everything that can be checked without a process group; raise ConfigError.

    Each input is read by its owner's reader: the model config by `BertConfig.from_dict`, the
    tensor-parallel split by `validate_model_for_tp`, the data directory by `data_prep.manifest`,
    a run directory to resume by `checkpoint.choose_resume`/`read_state`. `device` ("cuda" or "cpu",
    default: where training will run) decides what "auto" precision is.
    """
    world_size = world_size_from_env() if world_size is None else world_size
    device = prec.device_type() if device is None else device
    missing = [k for k in _REQUIRED if not getattr(cfg, k)]
    if missing:
        raise ConfigError("missing required flag(s): " + ", ".join(f"--{k}" for k in missing))
    for name in ("seq_length", "train_steps", "tp", "save_interval", "keep_last", "log_interval", "eval_samples",
                 "make_vocab_size_divisible_by"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.warmup_steps > cfg.train_steps or not 0.0 <= cfg.warmup_proportion <= 1.0:
        raise ConfigError(f"--warmup_steps {cfg.warmup_steps} / --warmup_proportion {cfg.warmup_proportion}: warm-up must fit in --train_steps {cfg.train_steps}")
    if cfg.decay_power <= 0:
        raise ConfigError(f"--decay_power must be > 0 (1 = linear), got {cfg.decay_power}")
    if not 0.0 < cfg.masked_lm_prob <= 1.0:
        raise ConfigError(f"--masked_lm_prob must be in (0, 1] (BERT: 0.15), got {cfg.masked_lm_prob}")
    try:
        cfg.masking().validate()
    except ValueError as e:
        raise ConfigError(f"--masked_lm_frequency_power {cfg.masked_lm_frequency_power}"
                          f"{' with --whole_word_masking' if cfg.whole_word_masking else ''}: {e}") from None
    if cfg.pack_sequences and not cfg.unpad:
        raise ConfigError("--pack_sequences needs the unpadded encoder (it keeps the packed pairs apart): drop --no-unpad")
    if cfg.eval_interval < 0 or cfg.max_nonfinite_steps < 1 or cfg.num_workers < -1:
        raise ConfigError("--eval_interval must be >= 0, --num_workers >= 0 (or -1 = auto), --max_nonfinite_steps >= 1")

    model = _read_json(cfg.model_config, "--model_config")
    try:
        bert = BertConfig.from_dict(model, source=f"--model_config {cfg.model_config}", required=SHAPE_FIELDS)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.seq_length > bert.max_position_embeddings:
        raise ConfigError(
            f"--seq_length {cfg.seq_length} is longer than the position table (max_position_embeddings "
            f"{bert.max_position_embeddings} in {cfg.model_config}); lower --seq_length or use a model config with more positions"
        )
    if world_size % cfg.tp:
        raise ConfigError(f"world size {world_size} is not a multiple of --tp {cfg.tp}: start dp x tp processes")
    try:
        dp = validate_model_for_tp(bert, world_size, cfg.tp, make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by)
    except ValueError as e:
        raise ConfigError(f"--tp {cfg.tp} does not split --model_config {cfg.model_config}: {e}") from None
    padded_vocab = padded_vocab_size(bert.vocab_size, cfg.make_vocab_size_divisible_by, cfg.tp)

    manifest = _check_data(cfg, bert)

    ds = _read_json(cfg.ds_config, "--ds_config")
    if not isinstance(ds, dict):
        raise ConfigError(f"--ds_config {cfg.ds_config}: expected a JSON object")
    ds = copy.deepcopy(ds)
    micro, accum, global_bs = _resolve_batch(cfg, ds, dp)
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = global_bs

    if "scheduler" in ds:
        raise ConfigError(
            f"--ds_config {cfg.ds_config}: remove the \"scheduler\" block; the warm-up/decay schedule is set by "
            "--warmup_steps/--warmup_proportion/--decay/--decay_power so that phase 2 gets its own"
        )
    _check_checkpoint_options(cfg, ds)
    zero_stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if zero_stage not in (1, 2, 3):
        raise ConfigError(f"--ds_config {cfg.ds_config}: zero_optimization.stage must be 1, 2 or 3 (got {zero_stage})")
    ds, precision, precision_warning = _resolve_precision(cfg, ds, device)
    if ds.get("gradient_clipping", 0) <= 0:
        # DeepSpeed only computes the global grad norm (and so only detects non-finite gradients
        # in fp32) when clipping is on; the skip logic and the logged grad norm depend on it.
        raise ConfigError(f"--ds_config {cfg.ds_config}: set \"gradient_clipping\" > 0 (BERT uses 1.0)")

    opt = ds.get("optimizer")
    if not isinstance(opt, dict) or "type" not in opt:
        raise ConfigError(f"--ds_config {cfg.ds_config}: needs an \"optimizer\" block with \"type\" (AdamW or Lamb) and \"params\"")
    otype = str(opt["type"]).lower().replace("_", "")
    if otype in ("adamw", "adam"):
        otype = "adamw"
    elif otype in ("lamb", "fusedlamb", "onebitlamb"):
        otype = "lamb"
    else:
        raise ConfigError(f"--ds_config {cfg.ds_config}: optimizer type {opt['type']!r} is not supported; use AdamW or Lamb")
    params = dict(opt.get("params", {}))
    if cfg.lr > 0:
        params["lr"] = cfg.lr
    if not isinstance(params.get("lr"), (int, float)) or params["lr"] <= 0:
        raise ConfigError(f"--ds_config {cfg.ds_config}: optimizer params need a positive \"lr\" (or pass --lr)")
    opt["params"] = params

    try:
        check_optimizer_for_zero(otype, zero_stage, flag=f"--ds_config {cfg.ds_config} optimizer.type")
        if otype == "lamb":
            lamb_kwargs_from_ds_params(params, flag=f"--ds_config {cfg.ds_config} optimizer.params")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    resumed = _check_resume(cfg, padded_vocab)
    if resumed and resumed.get("precision") not in (None, precision):
        # "auto" follows the hardware: a requeue onto other nodes may change it mid-run.
        note = (f"--save_dir {cfg.save_dir} was trained in {resumed['precision']} and resumes in {precision} "
                f"(the precision follows this machine's hardware or the flags); pass --precision {resumed['precision']} "
                "to keep it")
        precision_warning = f"{precision_warning}; {note}" if precision_warning else note
    resume_warning = None
    old = (resumed or {}).get("config", {}).get("cfg", {})
    # A flag missing from an older checkpoint's config did not exist then: the run had its default.
    was = {k: old.get(k, TrainConfig.__dataclass_fields__[k].default)
           for k in ("masked_lm_prob", "whole_word_masking", "masked_lm_frequency_power")} if old else {}
    changed = [f"--{k} {v} -> {getattr(cfg, k)}" for k, v in was.items() if v != getattr(cfg, k)]
    if changed:
        resume_warning = (f"--save_dir {cfg.save_dir} resumes with other masking ({', '.join(changed)}): the objective "
                          "and the held-out MLM accuracy change meaning from here on; pass the run's values to keep them")

    return Resolved(
        cfg=cfg,
        ds_config=ds,
        model_config=model,
        world_size=world_size,
        dp=dp,
        micro_batch_size=micro,
        grad_accum=accum,
        global_batch_size=global_bs,
        zero_stage=zero_stage,
        precision=precision,
        optimizer_type=otype,
        optimizer_params=params,
        manifest=manifest,
        padded_vocab_size=padded_vocab,
        device=device,
        precision_warning=precision_warning,
        resume_warning=resume_warning,
    )


def _check_checkpoint_options(cfg: TrainConfig, ds: dict) -> None:
    """DeepSpeed checkpoint options under which the integrity record cannot hold: rank 0 records
    and renames one folder on one filesystem after every rank's files are written and fsynced, so
    files on node-local disks, or written later by a background engine, would be missing from it
    or written after `latest` moved (pretrain/checkpoint.py, docs/pretrain.md)."""
    ckpt_opts = ds.get("checkpoint") or {}
    refused = []
    if ckpt_opts.get("use_node_local_storage"):
        refused.append('"checkpoint": {"use_node_local_storage": true} (files on node-local disks)')
    if ckpt_opts.get("writer") is not None:
        refused.append('"checkpoint": {"writer": ...} (FastPersist / decoupled asynchronous checkpoint writers)')
    # DeepSpeed's own example config carries "parallel_write": {"pipeline_stage": false}: only "on" is refused
    if (ckpt_opts.get("parallel_write") or {}).get("pipeline_stage"):
        refused.append('"checkpoint": {"parallel_write": {"pipeline_stage": true}}')
    if ds.get("datastates_ckpt", False) is not False:
        refused.append('"datastates_ckpt" (asynchronous DataStates checkpointing)')
    if (ds.get("nebula") or {}).get("enabled"):
        refused.append('"nebula": {"enabled": true}')
    if refused:
        raise ConfigError(
            f"--ds_config {cfg.ds_config}: remove {refused[0]}; checkpoints are written synchronously by every rank "
            "into --save_dir, which must be one filesystem shared by all nodes, so that their integrity record covers "
            "every file before `latest` moves"
        )


def _resolve_precision(cfg: TrainConfig, ds: dict, device: str) -> tuple:
    """The ds_config with its precision blocks set for `device`, the precision, and a warning."""
    src = f"--ds_config {cfg.ds_config}"
    try:
        requested = prec.requested_precision(ds)
    except ValueError as e:
        raise ConfigError(f"{src}: {e}") from None
    if cfg.precision != "config":
        requested, src = cfg.precision, f"--precision {cfg.precision}"
    elif requested == "bf16":
        src = f"{src} (\"bf16\": {{\"enabled\": true}})"
    try:
        precision, warning = prec.resolve(requested, device, src)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return prec.apply_precision(ds, precision), precision, warning


def _resolve_batch(cfg: TrainConfig, ds: dict, dp: int) -> tuple[int, int, int]:
    """micro x accumulation x dp = global, from any two of them (flags override the file)."""
    src = f"--ds_config {cfg.ds_config}"
    for k in _DS_BATCH_KEYS:
        if k in ds and (not isinstance(ds[k], int) or ds[k] < 1):
            raise ConfigError(f"{src}: {k} must be a positive integer, got {ds[k]!r}")
    micro = cfg.micro_batch_size or ds.get("train_micro_batch_size_per_gpu")
    global_bs = cfg.global_batch_size or ds.get("train_batch_size")
    accum = ds.get("gradient_accumulation_steps")
    if cfg.micro_batch_size or cfg.global_batch_size:
        # A flag changes the batch: the file's accumulation no longer binds unless it is needed
        # to complete the triple.
        accum = None if global_bs is not None else (accum or 1)
    if micro is None and global_bs is not None and accum is not None:
        micro, rem = divmod(global_bs, accum * dp)
        if rem or micro == 0:
            raise ConfigError(f"{src}: train_batch_size {global_bs} is not divisible by gradient_accumulation_steps {accum} x dp {dp}")
    if micro is None:
        raise ConfigError(f"{src}: give train_micro_batch_size_per_gpu (or two of train_batch_size, micro batch, gradient_accumulation_steps)")
    if global_bs is None:
        accum = accum or 1
        global_bs = micro * accum * dp
    if accum is None:
        accum, rem = divmod(global_bs, micro * dp)
        if rem or accum == 0:
            raise ConfigError(
                f"global batch {global_bs} is not a multiple of micro batch {micro} x dp {dp} = {micro * dp}; "
                "change --global_batch_size / --micro_batch_size or the number of processes"
            )
    if micro * accum * dp != global_bs:
        raise ConfigError(
            f"{src}: batch arithmetic does not hold: micro {micro} x accumulation {accum} x dp {dp} = "
            f"{micro * accum * dp}, but the global batch is {global_bs}; fix the ds_config or pass "
            "--global_batch_size/--micro_batch_size"
        )
    return micro, accum, global_bs


def _check_data(cfg: TrainConfig, bert: BertConfig) -> Manifest:
    d = cfg.data
    try:
        manifest = data_manifest.read(d)
    except ManifestError as e:
        raise ConfigError(f"--data {e}") from None
    pairs = manifest.pairs.get(str(cfg.seq_length))
    if not pairs:
        raise ConfigError(
            f"--seq_length {cfg.seq_length}: --data {d} has no pair index for it (it has {manifest.seq_lengths}); "
            f"run data_prep with --seq-length {cfg.seq_length} or pick one of those"
        )
    for split in ("train", "valid"):
        if split not in pairs:
            raise ConfigError(f"--data {d}: manifest has no {split} pair index for seq length {cfg.seq_length}")
        path = os.path.join(d, pairs[split])
        try:
            idx = PairIndex(path)
        except PairIndexError as e:
            raise ConfigError(f"--data: {e}") from None
        if idx.seq_length < cfg.seq_length:
            raise ConfigError(f"--seq_length {cfg.seq_length} is longer than the pair index {path} ({idx.seq_length})")
        if len(idx) == 0:
            raise ConfigError(f"--data {d}: {path} has no pairs (too little text for seq length {cfg.seq_length})")
    vocab = manifest.tokenizer.vocab_size
    if vocab > bert.vocab_size:
        raise ConfigError(
            f"--data {d}: tokenizer has {vocab} tokens but vocab_size in {cfg.model_config} is {bert.vocab_size}; "
            "use a model config whose vocab_size is at least the tokenizer's"
        )
    return manifest


def _check_resume(cfg: TrainConfig, padded_vocab: int) -> Optional[dict]:
    """A re-run resumes from --save_dir: its checkpoint must fit this layout. Returns its state."""
    tag = None
    try:
        # Sizes only, on every rank: the trainer verifies checksums on rank 0 and reports fall-backs.
        tag = ckpt.choose_resume(cfg.save_dir, checksums=False).tag
        state = ckpt.read_state(cfg.save_dir, tag) if tag is not None else None
        if state is not None and not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except ckpt.CheckpointError as e:  # no checkpoint in --save_dir verifies
        raise ConfigError(f"--save_dir {cfg.save_dir}: {e}") from None
    except (OSError, ValueError) as e:  # an unreadable `latest` or trainer state, or not JSON
        where = os.path.join(cfg.save_dir, tag, ckpt.STATE_FILE) if tag else os.path.join(cfg.save_dir, ckpt.LATEST)
        raise ConfigError(f"--save_dir {cfg.save_dir}: {where} is unreadable ({e}); point `latest` at an earlier "
                          "complete step_N or use a new --save_dir") from None
    if state is None:
        return None
    check_resume_state(cfg, state, padded_vocab)
    return state


def check_resume_state(cfg: TrainConfig, state: dict, padded_vocab: int) -> None:
    """The checkpoint's trainer state fits this run's layout (tp, seq_length, vocabulary rows).
    Also called by the trainer on the checkpoint rank 0 finally chose: a checksum failure can make
    it fall back to an older one than the sizes-only choice checked here."""
    if state.get("tp") != cfg.tp:
        raise ConfigError(
            f"--save_dir {cfg.save_dir} holds a checkpoint written at tp={state.get('tp')}; resume with --tp {state.get('tp')}, "
            f"or start a new --save_dir with --init_from {os.path.join(cfg.save_dir, 'latest')}"
        )
    if state.get("seq_length") != cfg.seq_length:
        raise ConfigError(
            f"--save_dir {cfg.save_dir} holds a seq_length {state.get('seq_length')} run; a new phase (e.g. seq {cfg.seq_length}) "
            f"needs its own --save_dir and --init_from {os.path.join(cfg.save_dir, 'latest')}"
        )
    # The resolved config of the run records its padded vocabulary; checkpoints from before padding have none.
    rows = state.get("config", {}).get("padded_vocab_size") or state.get("model_config", {}).get("vocab_size")
    if rows is not None and rows != padded_vocab:
        raise ConfigError(
            f"--save_dir {cfg.save_dir} holds a checkpoint with {rows} vocabulary rows, this run pads to {padded_vocab} "
            f"(--make_vocab_size_divisible_by {cfg.make_vocab_size_divisible_by} x --tp {cfg.tp}); resume with the "
            "--make_vocab_size_divisible_by of that run (1 for checkpoints written before padding), or start a new "
            f"--save_dir with --init_from {os.path.join(cfg.save_dir, 'latest')}"
        )
