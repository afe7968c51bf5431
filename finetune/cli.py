"""`python -m finetune --task {classify,pair,token,qa,features} --model PATH --train FILE
--eval FILE --output-dir OUT [--seeds 1 2 3]`: parse, validate, run; bad input is reported
in one line without a traceback."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .datasets import BUILTIN
from .readers import InputError
from .runner import FinetuneArgs, run
from .tasks import TASKS
from .train import TrainConfig

EPILOG = """\
tasks and input formats:
  classify   one text + label; .tsv (GLUE layout with header, e.g. SST-2 'sentence\\tlabel'),
             .csv or .jsonl. Metrics: accuracy, F1, Matthews (+ Pearson/Spearman with --regression)
  pair       two texts (segments A/B) + label; GLUE headers sentence1/sentence2, question1/question2,
             '#1 String'/'#2 String', question/sentence are recognised
  token      CoNLL-style file (token ... tag, blank line between sentences, BIO tags);
             entity-level P/R/F1 (seqeval semantics)
  qa         SQuAD v1.1 / v2.0 JSON; EM/F1 with the official normalisation
  features   frozen vectors (--layer, --pooling) to .npy + logistic regression on them
--model: an HF BERT directory (config.json, model.safetensors, vocab.txt) or a checkpoint of
our pretraining run (consolidated through pretrain.export_hf into OUT/consolidated).
Outputs: OUT/metrics.json (per seed, mean, std), OUT/seed_<S>/ (model, metrics, predictions,
train_losses.json: the loss of every step).
--deepspeed CONFIG (e.g. configs/ds_finetune.json) trains through DeepSpeed; in several processes
with `torchrun --nproc_per_node N -m finetune ...` or `deepspeed --num_gpus N --module finetune ...`
(on CPU set DS_ACCELERATOR=cpu). --batch-size is then per process: global batch = batch x N.
"""


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m finetune", description=__doc__.split("\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--model", required=True, help="HF BERT directory or pretraining checkpoint")
    p.add_argument("--train", dest="train_file", help="training file")
    p.add_argument("--eval", dest="eval_file", help="evaluation file (same format)")
    p.add_argument("--dataset", default=None, choices=sorted(BUILTIN),
                   help="built-in data instead of --train/--eval (written under OUT/data): pang-lee "
                   "(classify, features), wnut16 (token), wiki-cloze (qa), wiki-next-sentence (pair)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[42], help="one run per seed; mean and std reported")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=None, help="train this many steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-train-examples", type=int, default=None)
    p.add_argument("--max-eval-examples", type=int, default=None)
    p.add_argument("--vocab", default=None, help="vocab.txt if the model directory has none")
    case = p.add_mutually_exclusive_group()
    case.add_argument("--lower-case", dest="lower_case", action="store_true", default=None)
    case.add_argument("--cased", dest="lower_case", action="store_false")
    g = p.add_argument_group("sentence files (classify, pair, features)")
    g.add_argument("--text-column", default=None, help="column name or 0-based index")
    g.add_argument("--text-b-column", default=None)
    g.add_argument("--label-column", default=None)
    g.add_argument("--no-header", action="store_true", help="TSV/CSV without a header row "
                   "(default columns: label, text[, text_b])")
    g.add_argument("--regression", action="store_true", help="numeric targets (STS-B): MSE loss, "
                   "Pearson/Spearman")
    g = p.add_argument_group("extractive QA")
    g.add_argument("--doc-stride", type=int, default=128, help="tokens between the starts of windows")
    g.add_argument("--max-query-length", type=int, default=64)
    g.add_argument("--max-answer-length", type=int, default=30, help="in tokens")
    g.add_argument("--n-best", type=int, default=20)
    g.add_argument("--null-threshold", type=float, default=0.0,
                   help="v2.0: answer empty when null score - best span score > this")
    v = g.add_mutually_exclusive_group()
    v.add_argument("--version-2", dest="version_2", action="store_true", default=None)
    v.add_argument("--version-1", dest="version_2", action="store_false")
    g = p.add_argument_group("frozen features")
    g.add_argument("--layer", type=int, default=-1, help="hidden state: 0 = embeddings, -1 = last layer")
    g.add_argument("--pooling", default="mean", choices=("cls", "mean", "pooler", "tokens"))
    g.add_argument("--classifier-c", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    p.add_argument("--no-save-model", dest="save_model", action="store_false")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--deepspeed", default=None, metavar="CONFIG",
                   help="DeepSpeed JSON config (ZeRO stage, bf16, optimizer type): train through "
                   "deepspeed.initialize; --batch-size is per process (default: plain PyTorch)")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK is used
    p.add_argument("--log-level", default="INFO")
    return p


def args_from_namespace(ns: argparse.Namespace) -> FinetuneArgs:
    train = TrainConfig(learning_rate=ns.learning_rate, epochs=ns.epochs, max_steps=ns.max_steps,
                        batch_size=ns.batch_size, eval_batch_size=ns.eval_batch_size,
                        warmup_ratio=ns.warmup_ratio, weight_decay=ns.weight_decay)
    skip = {"learning_rate", "epochs", "max_steps", "batch_size", "eval_batch_size", "warmup_ratio",
            "weight_decay", "log_level", "local_rank"}
    return FinetuneArgs(train=train, **{k: v for k, v in vars(ns).items() if k not in skip})


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = run(args_from_namespace(ns))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary.get("deepspeed", {}).get("rank", 0) != 0:
        return 0
    print(json.dumps({"task": summary["task"], "seeds": summary["seeds"], "mean": summary["mean"],
                      "std": summary["std"]}, indent=1))
    return 0
