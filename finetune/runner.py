"""One fine-tuning (or frozen-feature) run per seed, and the summary over seeds.

Output directory layout:
    OUT/metrics.json          task, model, seeds, per-seed metrics, mean and std over seeds
    OUT/seed_<S>/             fine-tuned model (config.json, model.safetensors, vocab.txt),
                              metrics.json and predictions (eval_predictions.*)
    OUT/consolidated/         HF export of a pretraining checkpoint given as --model
    OUT/seed_<S>/*.npy        frozen features (task "features")
    OUT/seed_<S>/train_losses.json  the loss of every optimizer step (global-batch mean)

With --deepspeed CONFIG the loop runs through a DeepSpeed engine, in one process or in
several (torchrun, the deepspeed launcher); rank 0 evaluates and writes every output while
the others wait at a barrier.
"""
from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import checkpoint, features as feat, qa, tasks
from .metrics import classification_metrics, mean_std
from .modeling import build_head
from .readers import InputError, read_conll, read_squad, read_text_file
from .train import TrainConfig, deepspeed_config, predict, set_seed, train, train_deepspeed

log = logging.getLogger(__name__)

TASKS = ("classify", "pair", "token", "qa", "features")


@dataclass
class FinetuneArgs:
    task: str
    model: str
    train_file: str | None
    eval_file: str | None
    output_dir: str
    dataset: str | None = None  # built-in data instead of --train/--eval (finetune.datasets.BUILTIN)
    seeds: list[int] = field(default_factory=lambda: [42])
    max_seq_length: int = 128
    train: TrainConfig = field(default_factory=TrainConfig)
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    vocab: str | None = None
    lower_case: bool | None = None
    # sentence files
    text_column: str | None = None
    text_b_column: str | None = None
    label_column: str | None = None
    no_header: bool = False
    regression: bool = False
    # QA
    doc_stride: int = 128
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

    def validate(self) -> None:
        if self.task not in TASKS:
            raise InputError(f"--task {self.task!r}: choose one of {TASKS}")
        if not self.seeds:
            raise InputError("--seeds: give at least one seed")
        if self.device and self.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(f"--device {self.device}: no CUDA GPU visible here; use --device cpu")
        if len(set(self.seeds)) != len(self.seeds):
            raise InputError(f"--seeds {self.seeds}: seeds repeat")
        if self.max_seq_length < 8:
            raise InputError(f"--max-seq-length {self.max_seq_length}: too short (use >= 8)")
        if self.regression and self.task not in ("classify", "pair"):
            raise InputError("--regression applies to --task classify or pair only")
        if self.task == "qa" and self.doc_stride < 1:
            raise InputError(f"--doc-stride {self.doc_stride}: must be >= 1")
        if self.pooling not in feat.POOLINGS:
            raise InputError(f"--pooling {self.pooling!r}: choose one of {feat.POOLINGS}")
        if self.train.batch_size < 1 or self.train.learning_rate <= 0:
            raise InputError("--batch-size must be >= 1 and --learning-rate > 0")
        if self.deepspeed is not None:
            if not os.path.isfile(self.deepspeed):
                raise InputError(f"--deepspeed {self.deepspeed}: no such file")
            if self.task == "features":
                raise InputError("--deepspeed applies to the fine-tuning tasks, not --task features")
        if self.dataset is None and (self.train_file is None or self.eval_file is None):
            raise InputError("give --train and --eval files, or a built-in --dataset")
        if self.dataset is not None:
            if self.train_file or self.eval_file:
                raise InputError("--dataset replaces --train/--eval: give one or the other")
            return
        for flag, path in (("--train", self.train_file), ("--eval", self.eval_file)):
            if not os.path.isfile(path):
                raise InputError(f"{flag} {path}: no such file")


def _limit(items, n):
    return items[:n] if n else items


class _Data:
    """Everything a run needs that does not depend on the seed (read and tokenised once)."""

    def __init__(self, a: FinetuneArgs, tokenizer):
        self.labels, self.version_2 = None, False
        L = a.max_seq_length
        if a.task in ("classify", "pair", "features"):
            kw = dict(pair=a.task == "pair", text_column=a.text_column, text_b_column=a.text_b_column,
                      label_column=a.label_column, has_header=not a.no_header)
            self.train_ex = _limit(read_text_file(a.train_file, **kw), a.max_train_examples)
            self.eval_ex = _limit(read_text_file(a.eval_file, **kw), a.max_eval_examples)
            if not a.regression:
                self.labels = tasks.label_list(e.label for e in self.train_ex)
                if len(self.labels) < 2:
                    raise InputError(f"{a.train_file}: only one label ({self.labels}); a classifier "
                                     "needs at least two (or pass --regression)")
            l2i = {l: i for i, l in enumerate(self.labels)} if self.labels else None
            self.train_f = tasks.encode_sentences(self.train_ex, tokenizer, L, l2i, a.regression, a.train_file)
            self.eval_f = tasks.encode_sentences(self.eval_ex, tokenizer, L, l2i, a.regression, a.eval_file)
        elif a.task == "token":
            self.train_ex = _limit(read_conll(a.train_file), a.max_train_examples)
            self.eval_ex = _limit(read_conll(a.eval_file), a.max_eval_examples)
            types = {t[2:] for s in self.train_ex for t in s.tags if t != "O"}
            # "O" first, then B-/I- of each entity type (both, even if one never occurs in training)
            self.labels = ["O"] + [f"{p}-{t}" for t in sorted(types) for p in "BI"]
            l2i = {l: i for i, l in enumerate(self.labels)}
            self.train_f = tasks.encode_tagged(self.train_ex, tokenizer, L, l2i, a.train_file)
            self.eval_f = tasks.encode_tagged(self.eval_ex, tokenizer, L, l2i, a.eval_file)
        else:
            self.train_ex, _ = read_squad(a.train_file)
            self.eval_ex, version = read_squad(a.eval_file)
            self.train_ex = _limit(self.train_ex, a.max_train_examples)
            self.eval_ex = _limit(self.eval_ex, a.max_eval_examples)
            self.version_2 = a.version_2 if a.version_2 is not None else (
                str(version).lstrip("v").startswith("2") or any(e.is_impossible for e in self.eval_ex))
            try:
                self.train_f = qa.qa_features(self.train_ex, tokenizer, L, a.doc_stride, a.max_query_length, True)
                self.eval_f = qa.qa_features(self.eval_ex, tokenizer, L, a.doc_stride, a.max_query_length, False)
            except ValueError as e:
                raise InputError(str(e)) from None
        log.info("%s: %d train examples -> %d features, %d eval examples -> %d features%s",
                 a.task, len(self.train_ex), len(self.train_f), len(self.eval_ex), len(self.eval_f),
                 f", labels {self.labels}" if self.labels and len(self.labels) <= 30 else "")


def _evaluate(a: FinetuneArgs, data: _Data, outputs) -> tuple[dict, object]:
    if a.task in ("classify", "pair"):
        return tasks.evaluate_sentences(outputs, data.eval_f, data.labels, a.regression)
    if a.task == "token":
        return tasks.evaluate_tagged(outputs, data.eval_f, data.eval_ex, data.labels)
    from .squad_metrics import squad_scores

    preds, nbest, null_odds = qa.decode(data.eval_ex, data.eval_f, outputs, a.n_best, a.max_answer_length,
                                        data.version_2, a.null_threshold)
    golds = {e.qid: [t for t, _ in e.answers] if not e.is_impossible else [] for e in data.eval_ex}
    return squad_scores(golds, preds), {"predictions": preds, "nbest": nbest, "null_odds": null_odds}


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def _save_predictions(a: FinetuneArgs, data: _Data, preds, out_dir: str) -> None:
    if a.task == "qa":
        for name, obj in preds.items():
            _write_json(os.path.join(out_dir, f"eval_{name}.json"), obj)
    elif a.task == "token":
        with open(os.path.join(out_dir, "eval_predictions.conll"), "w", encoding="utf-8") as f:
            for s, p in zip(data.eval_ex, preds):
                f.writelines(f"{t}\t{g}\t{q}\n" for t, g, q in zip(s.tokens, s.tags, p))
                f.write("\n")
    else:
        with open(os.path.join(out_dir, "eval_predictions.tsv"), "w", encoding="utf-8") as f:
            f.write("index\tprediction\tlabel\n")
            f.writelines(f"{i}\t{p}\t{e.label}\n" for i, (p, e) in enumerate(zip(preds, data.eval_ex)))


def _run_features(a: FinetuneArgs, model_dir: str, data: _Data, seed: int, out_dir: str, tok) -> dict:
    from pretrain.model import BertModel

    config = checkpoint.read_config(model_dir)
    encoder = BertModel(config, add_pooling_layer=True)
    checkpoint.load_encoder_weights(encoder, model_dir)
    encoder.to(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        tr = feat.extract(encoder, data.train_f, a.layer, a.pooling, a.train.eval_batch_size, tok.pad_token_id)
        ev = feat.extract(encoder, data.eval_f, a.layer, a.pooling, a.train.eval_batch_size, tok.pad_token_id)
    except ValueError as e:
        raise InputError(str(e)) from None
    for name, x in (("train", tr), ("eval", ev)):
        if isinstance(x, tuple):
            np.save(os.path.join(out_dir, f"{name}_features.npy"), x[0])
            np.save(os.path.join(out_dir, f"{name}_offsets.npy"), x[1])
        else:
            np.save(os.path.join(out_dir, f"{name}_features.npy"), x)
    metrics = {"feature_dim": int((tr[0] if isinstance(tr, tuple) else tr).shape[-1])}
    if a.pooling != "tokens" and data.labels:
        y_tr = np.array([f["labels"] for f in data.train_f])
        y_ev = np.array([f["labels"] for f in data.eval_f])
        np.save(os.path.join(out_dir, "train_labels.npy"), y_tr)
        np.save(os.path.join(out_dir, "eval_labels.npy"), y_ev)
        pred = feat.logistic_regression(tr, y_tr, ev, a.classifier_c, seed)
        metrics.update(classification_metrics(y_ev.tolist(), pred.tolist(), list(range(len(data.labels)))))
    return metrics


def run(a: FinetuneArgs) -> dict:
    """Every seed of one task; returns (and writes to OUT/metrics.json) the summary."""
    a.validate()
    previous = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return _run(a)
    finally:
        torch.set_num_threads(previous)  # callers (tests, notebooks) keep their own setting


def _init_distributed(a: FinetuneArgs) -> tuple[int, int, dict | None]:
    """(rank, world size, DeepSpeed config); (0, 1, None) without --deepspeed."""
    if a.deepspeed is None:
        return 0, 1, None
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="nccl" if (a.device or "").startswith("cuda") or
                               (a.device is None and torch.cuda.is_available()) else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world > 1 and (a.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        a.device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    try:
        ds = deepspeed_config(a.deepspeed, a.train, world,
                              a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (ValueError, OSError) as e:
        raise InputError(f"--deepspeed {e}") from None
    log.info("deepspeed: rank %d of %d, global batch %d", rank, world, a.train.batch_size * world)
    return rank, world, ds


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _run(a: FinetuneArgs) -> dict:
    rank, world, ds = _init_distributed(a)
    if rank == 0:
        os.makedirs(a.output_dir, exist_ok=True)
    if a.dataset:
        from .datasets import write_builtin

        if rank == 0:
            write_builtin(a.dataset, a.task, os.path.join(a.output_dir, "data"))
        _barrier(world)
        a.train_file, a.eval_file = write_builtin(a.dataset, a.task, os.path.join(a.output_dir, "data"))
        log.info("built-in dataset %s: %s, %s", a.dataset, a.train_file, a.eval_file)
    if rank == 0:
        model_dir = checkpoint.resolve_model_dir(a.model, a.output_dir)
    _barrier(world)
    if rank != 0:
        model_dir = checkpoint.resolve_model_dir(a.model, a.output_dir)  # rank 0's export, already there
    config = checkpoint.read_config(model_dir)
    if a.max_seq_length > config.max_position_embeddings:
        raise InputError(f"--max-seq-length {a.max_seq_length} exceeds the model's "
                         f"max_position_embeddings ({config.max_position_embeddings})")
    tok = checkpoint.load_tokenizer(model_dir, a.vocab, a.lower_case)
    if len(tok) > config.vocab_size:
        raise InputError(f"vocabulary has {len(tok)} entries but the model only {config.vocab_size}; "
                         "pass the checkpoint's own vocab.txt with --vocab")
    log.info("task %s, model %s, seeds %s, torch %s, device %s, %d threads", a.task, model_dir, a.seeds,
             torch.__version__, a.device or ("cuda" if torch.cuda.is_available() else "cpu"), torch.get_num_threads())
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = _Data(a, tok)
    runs = []
    for seed in a.seeds:
        out_dir = os.path.join(a.output_dir, f"seed_{seed}")
        if rank == 0:
            os.makedirs(out_dir, exist_ok=True)
        if a.task == "features":
            metrics = _run_features(a, model_dir, data, seed, out_dir, tok)
        else:
            set_seed(seed)  # the head's initialisation depends on the seed too
            n_labels = len(data.labels) if data.labels else (1 if a.regression else 2)
            model = build_head(a.task, config, n_labels, a.regression)
            checkpoint.load_encoder_weights(model.bert, model_dir)
            model.to(device)
            if ds is None:
                stats = train(model, data.train_f, a.train, seed, tok.pad_token_id)
            else:
                try:
                    engine, stats = train_deepspeed(model, data.train_f, a.train, seed, ds, tok.pad_token_id)
                except ValueError as e:
                    raise InputError(str(e)) from None
                model = engine.module  # ZeRO-1/2: every rank holds the full fp32 weights
            losses = stats.pop("step_losses")
            if rank == 0:
                _write_json(os.path.join(out_dir, "train_losses.json"), {"seed": seed, "losses": losses})
                outputs = predict(model, data.eval_f, a.train.eval_batch_size, tok.pad_token_id)
                metrics, preds = _evaluate(a, data, outputs)
                metrics.update(stats)
                _save_predictions(a, data, preds, out_dir)
                if a.save_model:
                    checkpoint.save_finetuned(model, a.task, out_dir, tok, data.labels, a.regression)
            else:
                metrics = dict(stats)  # rank 0 evaluates and writes; the others wait below
            del model
            if ds is not None:
                del engine
        if rank == 0:
            log.info("seed %d: %s", seed, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
            _write_json(os.path.join(out_dir, "metrics.json"), {"seed": seed, **metrics})
        _barrier(world)
        runs.append({"seed": seed, **metrics})
    mean, std = mean_std([{k: v for k, v in r.items() if k != "seed"} for r in runs])
    summary = {"task": a.task, "model": a.model, "dataset": a.dataset, "model_dir": model_dir, "seeds": a.seeds,
               "n_train": len(data.train_ex), "n_eval": len(data.eval_ex), "labels": data.labels,
               "args": {k: v for k, v in asdict(a).items() if k != "train"}, "train_config": asdict(a.train),
               "runs": runs, "mean": mean, "std": std,
               "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    if ds is not None:
        summary.update(deepspeed={"config": ds, "world_size": world, "rank": rank})
    if rank == 0:
        _write_json(os.path.join(a.output_dir, "metrics.json"), summary)
    _barrier(world)
    return summary
