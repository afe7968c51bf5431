"""One fine-tuning (or frozen-feature) run per seed, and the summary over seeds.

Output directory layout:
    OUT/metrics.json          task, model, seeds, per-seed metrics, mean and std over seeds
    OUT/seed_<S>/             fine-tuned model (config.json, model.safetensors, vocab.txt),
                              metrics.json and predictions (eval_predictions.*)
    OUT/consolidated/         HF export of a pretraining checkpoint given as --model
    OUT/seed_<S>/*.npy        frozen features (task "features")
    OUT/seed_<S>/train_losses.json  the loss of every optimizer step (global-batch mean)
    OUT/seed_<S>/test_predictions.*  predictions for --test FILE (GLUE TSV, CoNLL, SQuAD JSON)

Without training (--model a directory saved by a fine-tuning run, no --train, or --predict-only):
    OUT/metrics.json          metrics on --eval FILE, OUT/eval_predictions.*
    OUT/test_predictions.*    predictions for --test FILE

With --deepspeed CONFIG the loop runs through a DeepSpeed engine, in one process or in
several (torchrun, the deepspeed launcher); rank 0 evaluates and writes every output while
the others wait at a barrier.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import platform
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist

from data_prep.atomic import atomic_json
from pretrain.launch import init_distributed
from pretrain.model import BertConfig

from . import checkpoint
from . import features as feat
from .datasets import write_builtin
from .metrics import mean_std
from .readers import InputError
from .tasks import REGISTRY, Task, TestData, finetuned_config, get_task, load_finetuned
from .tasks.base import TEST_PREFIX
from .train import TrainConfig, deepspeed_config, predict, resolve_precision

log = logging.getLogger(__name__)


@dataclass
class FinetuneArgs:
    task: str
    model: str
    train_file: str | None
    eval_file: str | None
    output_dir: str
    dataset: str | None = None  # built-in data instead of --train/--eval (finetune.datasets.BUILTIN)
    seeds: list[int] = field(default_factory=lambda: [42])
    max_seq_length: int | None = None  # None: the task's default (128; 384 for qa, as BERT's SQuAD)
    train: TrainConfig = field(default_factory=TrainConfig)
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    max_test_examples: int | None = None
    test_file: str | None = None  # unlabelled file to predict (GLUE test.tsv, SQuAD without answers, CoNLL tokens)
    predict_only: bool = False  # no training: --model is a fine-tuned directory; --eval scores it, --test predicts
    do_train: bool = False  # transformers' --do_train/--do_eval/--do_predict: when any is given, they
    do_eval: bool = False  # say which steps run (and need their files); without them the files given do
    do_predict: bool = False
    vocab: str | None = None
    lower_case: bool | None = None
    # sentence files
    text_column: str | None = None
    text_b_column: str | None = None
    label_column: str | None = None
    no_header: bool = False
    regression: bool = False
    # QA
    doc_stride: int = 128  # BERT's meaning: tokens between window starts
    doc_overlap: int | None = None  # transformers' --doc_stride: tokens shared by neighbouring windows (wins)
    max_query_length: int = 64
    max_answer_length: int = 30
    n_best: int = 20
    null_threshold: float = 0.0
    version_2: bool | None = None  # None: from the file's "version"
    # frozen features
    layer: int = -1
    pooling: str = "mean"
    classifier_c: float = 1.0
    save_model: bool = True
    threads: int | None = None
    device: str | None = None  # None: "cuda" when a GPU is visible, else "cpu"
    deepspeed: str | None = None  # a DeepSpeed JSON config: train through deepspeed.initialize

    def __post_init__(self):
        if self.max_seq_length is None and self.task in REGISTRY:
            self.max_seq_length = REGISTRY[self.task].default_max_seq_length

    @property
    def trains(self) -> bool:
        """Fine-tune (else: use --model, a fine-tuned directory, as it is)."""
        if self.predict_only:
            return False
        if self.do_train or self.do_eval or self.do_predict:
            return self.do_train
        return self.train_file is not None or self.dataset is not None

    def validate(self) -> None:
        task = get_task(self.task)
        if not self.seeds:
            raise InputError("--seeds: give at least one seed")
        if self.device and self.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(f"--device {self.device}: no CUDA GPU visible here; use --device cpu")
        if len(set(self.seeds)) != len(self.seeds):
            raise InputError(f"--seeds {self.seeds}: seeds repeat")
        if self.max_seq_length < 8:
            raise InputError(f"--max-seq-length {self.max_seq_length}: too short (use >= 8)")
        if self.regression and not task.supports_regression:
            names = [name for name, t in REGISTRY.items() if t.supports_regression]
            raise InputError(f"--regression applies to --task {' or '.join(names)} only")
        task.validate(self)
        if self.pooling not in feat.POOLINGS:
            raise InputError(f"--pooling {self.pooling!r}: choose one of {feat.POOLINGS}")
        self.train.check()
        if self.train.batch_size < 1 or self.train.learning_rate <= 0:
            raise InputError("--batch-size must be >= 1 and --learning-rate > 0")
        if not 0.0 <= self.train.warmup_ratio <= 1.0:
            raise InputError(f"--warmup-ratio {self.train.warmup_ratio}: must be between 0 and 1")
        if self.deepspeed is not None and not os.path.isfile(self.deepspeed):
            raise InputError(f"--deepspeed {self.deepspeed}: no such file")
        self._validate_steps(task)
        for flag, path in (("--train", self.train_file), ("--eval", self.eval_file), ("--test", self.test_file)):
            if path is not None and not os.path.isfile(path):
                raise InputError(f"{flag} {path}: no such file")
        if self.trains:
            if self.dataset is not None:
                if self.train_file or self.eval_file:
                    raise InputError("--dataset replaces --train/--eval: give one or the other")
            elif self.train_file is None or self.eval_file is None:
                raise InputError("give --train and --eval files, or a built-in --dataset")
        else:
            self._validate_saved_model()

    def _validate_steps(self, task: Task) -> None:
        """--do_train/--do_eval/--do_predict and --predict-only against the files given."""
        if self.do_predict and self.test_file is None:
            raise InputError("--do_predict needs the file to predict: --test FILE (--test_file)")
        if self.do_eval and self.eval_file is None and self.dataset is None:
            raise InputError("--do_eval needs --eval FILE (--validation_file)")
        if self.do_train and self.train_file is None and self.dataset is None:
            raise InputError("--do_train needs --train FILE (--train_file) or a built-in --dataset")
        if self.do_train and not self.do_eval:
            raise InputError("--do_train without --do_eval: a fine-tuning run here always scores its model on "
                             "--eval FILE (--validation_file) after training; add --do_eval with that file")
        if (self.do_train or self.do_eval) and not self.do_predict and self.test_file is not None:
            raise InputError("--test_file without --do_predict: add --do_predict to write its predictions, "
                             "or drop --test_file")
        if not self.trains and (self.train_file is not None or self.dataset is not None):
            why = "--predict-only" if self.predict_only else "without --do_train"
            raise InputError(f"{why} nothing is trained: drop --train/--dataset (or add --do_train)")
        if self.test_file is not None and task.architecture is None:
            raise InputError(f"--test applies to the fine-tuning tasks, not --task {task.name}")

    def _validate_saved_model(self) -> None:
        info = finetuned_config(self.model) if os.path.isdir(self.model) else None
        if info is None:
            raise InputError(f"--model {self.model} is not a directory saved by a fine-tuning run (config.json "
                             "with finetuning_task); to fine-tune it give --train and --eval files or a "
                             "built-in --dataset")
        if info[0] != self.task:
            raise InputError(f"--model {self.model} was fine-tuned for --task {info[0]}, not {self.task}")
        if self.eval_file is None and self.test_file is None:
            raise InputError(f"--model {self.model} is used as it is (no --train): give --eval FILE to score "
                             "it and/or --test FILE to predict")
        if self.deepspeed is not None:
            raise InputError("--deepspeed applies to training; drop it when only evaluating or predicting")


@dataclass(frozen=True)
class Resolved:
    """What a run settles before its first seed, beside the arguments it leaves as given."""

    args: FinetuneArgs
    task: Task
    device: torch.device  # --device, else cuda when a GPU is visible, else cpu
    rank: int
    world: int
    ds_config: dict | None  # the completed DeepSpeed config (None: the plain loop)
    train_file: str  # --train, or the built-in --dataset's file under OUT/data
    eval_file: str
    model_dir: str  # an HF directory: --model, or its consolidation under OUT/consolidated
    config: BertConfig
    tokenizer: object


def run(a: FinetuneArgs) -> dict:
    """Every seed of one task; returns (and writes to OUT/metrics.json) the summary."""
    a.validate()
    previous = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return _run(a) if a.trains else _run_saved(a)
    finally:
        torch.set_num_threads(previous)  # callers (tests, notebooks) keep their own setting


def _distributed(a: FinetuneArgs, device: str) -> tuple[int, int, str, dict | None]:
    """(rank, world size, this process's device, DeepSpeed config); without --deepspeed one
    process and no config."""
    if a.deepspeed is None:
        return 0, 1, device, None
    cuda = device.startswith("cuda")
    launch = init_distributed(backend="nccl" if cuda else "gloo")
    if launch.world_size > 1 and cuda:
        device = f"cuda:{launch.local_rank}"
    try:
        ds = deepspeed_config(a.deepspeed, a.train, launch.world_size, device)
    except (ValueError, OSError) as e:
        raise InputError(f"--deepspeed {e}") from None
    log.info("deepspeed: rank %d of %d, global batch %d", launch.rank, launch.world_size,
             a.train.batch_size * launch.world_size)
    return launch.rank, launch.world_size, device, ds


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _on_rank0(rank: int, world: int, fn):
    """fn() on rank 0 alone (it writes files), its result on every rank."""
    box = [fn() if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _resolve(a: FinetuneArgs) -> Resolved:
    # Without --device: cuda when a GPU is visible (as before), also where DS_ACCELERATOR=cpu is set
    # for pretraining's sake; --deepspeed runs follow the same device.
    rank, world, device, ds = _distributed(a, a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if rank == 0:
        os.makedirs(a.output_dir, exist_ok=True)
    train_file, eval_file = a.train_file, a.eval_file
    if a.dataset:
        train_file, eval_file = _on_rank0(rank, world, lambda: write_builtin(
            a.dataset, a.task, os.path.join(a.output_dir, "data")))
        log.info("built-in dataset %s: %s, %s", a.dataset, train_file, eval_file)
    model_dir = _on_rank0(rank, world, lambda: checkpoint.resolve_model_dir(a.model, a.output_dir))
    config, tok = _config_and_tokenizer(a, model_dir)
    return Resolved(a, get_task(a.task), torch.device(device), rank, world, ds, train_file, eval_file,
                    model_dir, config, tok)


def _config_and_tokenizer(a: FinetuneArgs, model_dir: str):
    config = checkpoint.read_config(model_dir)
    if a.max_seq_length > config.max_position_embeddings:
        raise InputError(f"--max-seq-length {a.max_seq_length} exceeds the model's "
                         f"max_position_embeddings ({config.max_position_embeddings})")
    tok = checkpoint.load_tokenizer(model_dir, a.vocab, a.lower_case)
    if len(tok) > config.vocab_size:
        raise InputError(f"vocabulary has {len(tok)} entries but the model only {config.vocab_size}; "
                         "pass the checkpoint's own vocab.txt with --vocab")
    return config, tok


def _read_test(a: FinetuneArgs, task: Task, tokenizer) -> TestData | None:
    if a.test_file is None:
        return None
    test = task.read_unlabelled(a, a.test_file, tokenizer)
    log.info("%s: %d test examples -> %d features", a.test_file, len(test.examples), len(test.features))
    return test


def _run(a: FinetuneArgs) -> dict:
    r = _resolve(a)
    log.info("task %s, model %s, seeds %s, torch %s, device %s, %d threads", a.task, r.model_dir, a.seeds,
             torch.__version__, r.device, torch.get_num_threads())
    data = r.task.read(a, r.train_file, r.eval_file, r.tokenizer)
    log.info("%s: %d train examples -> %d features, %d eval examples -> %d features%s",
             a.task, len(data.train_examples), len(data.train_features), len(data.eval_examples),
             len(data.eval_features), f", labels {data.labels}" if data.labels and len(data.labels) <= 30 else "")
    test = _read_test(a, r.task, r.tokenizer)
    if test is not None and a.version_2 is None and data.version_2 and not test.version_2:
        # a questions-only test file need not say "v2.0": the model trained on v2.0 data abstains
        test = replace(test, version_2=True)
    runs = []
    for seed in a.seeds:
        out_dir = os.path.join(a.output_dir, f"seed_{seed}")
        if r.rank == 0:
            os.makedirs(out_dir, exist_ok=True)
        metrics = r.task.run_seed(r, data, seed, out_dir, test)  # features: validate() refused --test
        if r.rank == 0:
            log.info("seed %d: %s", seed, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
            atomic_json(os.path.join(out_dir, "metrics.json"), {"seed": seed, **metrics}, sort_keys=False)
        _barrier(r.world)
        runs.append({"seed": seed, **metrics})
    mean, std = mean_std([{k: v for k, v in run.items() if k != "seed"} for run in runs])
    args = {k: v for k, v in asdict(a).items() if k != "train"}
    # as resolved: a --dataset's files, and the device this process ran on (cuda:N under --deepspeed)
    args.update(train_file=r.train_file, eval_file=r.eval_file, device=str(r.device), trains=True)
    summary = {"task": a.task, "model": a.model, "dataset": a.dataset, "model_dir": r.model_dir, "seeds": a.seeds,
               "n_train": len(data.train_examples), "n_eval": len(data.eval_examples), "labels": data.labels,
               "skipped": data.skipped, "args": args, "train_config": asdict(a.train), "runs": runs, "mean": mean, "std": std,
               "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    if r.ds_config is not None:
        summary.update(deepspeed={"config": r.ds_config, "world_size": r.world, "rank": r.rank})
    if r.rank == 0:
        atomic_json(os.path.join(a.output_dir, "metrics.json"), summary, sort_keys=False)
    _barrier(r.world)
    return summary


def _refuse_training_output(out: str, model: str) -> None:
    """Scoring or predicting writes OUT/metrics.json and OUT/*_predictions.*: not into the model's
    own directory, nor over a fine-tuning run's summary or one seed's results."""
    if os.path.realpath(out) == os.path.realpath(model):
        raise InputError(f"--output-dir {out} is the model's own directory, whose metrics and predictions "
                         "scoring would replace; give another --output-dir")
    path = os.path.join(out, "metrics.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            written = json.load(f)
    except (OSError, ValueError):
        written = {}
    if isinstance(written, dict) and ("runs" in written or "seed" in written):
        raise InputError(f"--output-dir {out} holds a fine-tuning run's results (metrics.json), which scoring "
                         "or predicting would replace; give another --output-dir")


def _run_saved(a: FinetuneArgs) -> dict:
    """No training: --model is a directory saved by a fine-tuning run; --eval scores it
    (OUT/metrics.json, OUT/eval_predictions.*), --test writes OUT/test_predictions.*."""
    task = get_task(a.task)
    _, labels, regression = finetuned_config(a.model)
    a = replace(a, regression=regression)  # the saved head decides, not the flag
    with open(os.path.join(a.model, "config.json"), encoding="utf-8") as f:
        saved_v2 = json.load(f).get("version_2_with_negative")
    if a.version_2 is None and saved_v2 is not None:
        a = replace(a, version_2=bool(saved_v2))  # QA: as trained, unless --version-1/--version-2 say
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _refuse_training_output(a.output_dir, a.model)
    os.makedirs(a.output_dir, exist_ok=True)
    config, tok = _config_and_tokenizer(a, a.model)
    model, _, _ = load_finetuned(a.model)
    model.to(device)
    # the forward pass in the precision a training run on this device would evaluate in
    precision = resolve_precision(a.train.precision, device.type)
    log.info("task %s, fine-tuned model %s, no training, device %s, %s", a.task, a.model, device, precision)
    labels = None if a.regression else labels
    summary = {"task": a.task, "model": a.model, "model_dir": a.model, "labels": labels}
    if a.eval_file is not None:
        data = task.read_labelled(a, a.eval_file, tok, labels)
        outputs = predict(model, data.eval_features, a.train.eval_batch_size, tok.pad_token_id, precision,
                          a.train.progress)
        metrics, preds = task.evaluate(a, data, outputs)
        task.save_predictions(data, preds, a.output_dir)
        log.info("%s: %s", a.eval_file, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
        summary.update(n_eval=len(data.eval_examples), metrics=metrics)
    test = _read_test(a, task, tok)
    if test is not None:
        task.predict_test(a, test, model, tok.pad_token_id, labels, a.output_dir, precision)
        summary.update(n_test=len(test.examples), test_predictions=glob.glob(
            os.path.join(a.output_dir, f"{TEST_PREFIX}predictions.*")))
    args = {k: v for k, v in asdict(a).items() if k != "train"}
    args.update(device=str(device), trains=False)
    summary.update(args=args, versions={"torch": torch.__version__, "python": platform.python_version()})
    atomic_json(os.path.join(a.output_dir, "metrics.json"), summary, sort_keys=False)
    return summary
