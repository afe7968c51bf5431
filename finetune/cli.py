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
from .train import PRECISION_CHOICES, TrainConfig

EPILOG = """\
tasks and input formats:
  classify   one text + label; .tsv (GLUE layout with header, e.g. SST-2 'sentence\\tlabel'),
             .csv or .jsonl. Metrics: accuracy, F1, Matthews (+ Pearson/Spearman with --regression)
  pair       two texts (segments A/B) + label; GLUE headers sentence1/sentence2, question1/question2,
             '#1 String'/'#2 String', question/sentence are recognised
  token      CoNLL-style file (token ... tag, blank line between sentences; IOB2, IOB1, BIOES/IOBES
             or BILOU tags, converted to IOB2); entity-level P/R/F1 from the seqeval package
  qa         SQuAD v1.1 / v2.0 JSON; exact_match/F1 with the official normalisation
Bad records (a row with missing fields, a SQuAD answer not in its context) are skipped in training
files and counted in OUT/metrics.json ("skipped"); in a file to predict they are errors.
  features   frozen vectors (--layer, --pooling) to .npy + logistic regression on them
--model: an HF BERT directory (config.json, model.safetensors, vocab.txt) or a checkpoint of
our pretraining run (consolidated through pretrain.export_hf into OUT/consolidated).
Outputs: OUT/metrics.json (per seed, mean, std, skipped records), OUT/seed_<S>/ (model, metrics, predictions,
train_losses.json: the loss of every step; test_predictions.* for --test).
Without --train (or with --predict-only), --model is a saved OUT/seed_<S>: --eval FILE scores it,
--test FILE writes OUT/test_predictions.* (GLUE index<TAB>prediction, CoNLL, SQuAD predictions.json
and null odds). transformers' example spellings (--model_name_or_path, --train_file, --do_train,
--per_device_train_batch_size, --doc_stride, ...) are accepted with their meaning there: --doc_stride
is the overlap of neighbouring QA windows (run_qa.py), --doc-stride the distance between window
starts (BERT's run_squad.py).
--deepspeed CONFIG (e.g. configs/ds_finetune.json) trains through DeepSpeed; in several processes
with `torchrun --nproc_per_node N -m finetune ...` or `deepspeed --num_gpus N --module finetune ...`
(on CPU set DS_ACCELERATOR=cpu). --batch-size is then per process: global batch = batch x N.
"""


def build_parser() -> argparse.ArgumentParser:
    """Our flags with, as aliases of the same meaning, the spellings of transformers' examples
    (run_glue.py, run_ner.py, run_qa.py): --model_name_or_path, --train_file, --do_train, ..."""
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m finetune", description=__doc__.split("\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=TASKS, help="what to fine-tune (see below)")
    p.add_argument("--model", "--model_name_or_path", required=True,
                   help="HF BERT directory, pretraining checkpoint, or a model saved by a fine-tuning "
                   "run (OUT/seed_S: then without --train it is scored on --eval / predicts --test)")
    p.add_argument("--train", "--train_file", dest="train_file", help="training file")
    p.add_argument("--eval", "--validation_file", dest="eval_file", help="evaluation file (same format)")
    p.add_argument("--test", "--test_file", dest="test_file",
                   help="unlabelled file to predict (GLUE test.tsv, SQuAD questions without answers, "
                   "CoNLL tokens): OUT/seed_S/test_predictions.* (OUT/ without training)")
    p.add_argument("--dataset", default=None, choices=sorted(BUILTIN),
                   help="built-in data instead of --train/--eval (written under OUT/data): pang-lee "
                   "(classify, features), wnut16 (token), wiki-cloze and wiki-entity-cloze (qa), wiki-next-sentence "
                   "(pair, features)")
    p.add_argument("--predict-only", "--predict_only", action="store_true",
                   help="no training: --model is a saved fine-tuned model (the default without --train)")
    p.add_argument("--do_train", "--do-train", action="store_true",
                   help="(transformers' spelling) train; when any --do_* is given, only those steps run")
    p.add_argument("--do_eval", "--do-eval", action="store_true", help="evaluate on --eval (--validation_file)")
    p.add_argument("--do_predict", "--do-predict", action="store_true",
                   help="predict --test (--test_file), which it requires")
    p.add_argument("--output-dir", "--output_dir", required=True, help="where metrics, models and predictions go")
    p.add_argument("--seeds", "--seed", type=int, nargs="+", default=[42],
                   help="one run per seed; mean and std reported")
    p.add_argument("--max-seq-length", "--max_seq_length", type=int, default=None,
                   help="tokens per input (default 128; --task qa 384, BERT's SQuAD setting)")
    p.add_argument("--learning-rate", "--learning_rate", type=float, default=d.learning_rate, help="peak AdamW rate")
    p.add_argument("--epochs", "--num_train_epochs", type=float, default=d.epochs, help="passes over the training set")
    p.add_argument("--max-steps", "--max_steps", type=int, default=None,
                   help="train this many steps (overrides --epochs)")
    p.add_argument("--batch-size", "--per_device_train_batch_size", type=int, default=d.batch_size,
                   help="training batch (per process under --deepspeed)")
    p.add_argument("--eval-batch-size", "--per_device_eval_batch_size", type=int, default=d.eval_batch_size,
                   help="evaluation / prediction batch")
    p.add_argument("--gradient-accumulation-steps", "--gradient_accumulation_steps", type=int, default=1,
                   help="batches whose gradients are summed per optimizer step")
    precision = p.add_mutually_exclusive_group()  # "--precision fp32 --fp16" is refused, not last-wins
    precision.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                           help="training precision (auto: bf16 on a GPU or CPU that computes it natively, fp16 "
                           "on older GPUs, else fp32; under --deepspeed auto keeps the config's own setting)")
    precision.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                           help="same as --precision bf16 (transformers' spelling)")
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                           help="same as --precision fp16 (transformers' spelling)")
    grouping = p.add_mutually_exclusive_group()
    grouping.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                          default=d.group_by_length,
                          help="plain shuffled training batches (default: batches of similar lengths, less padding)")
    grouping.add_argument("--group-by-length", "--group_by_length", dest="group_by_length", action="store_true",
                          help="(the default; transformers' spelling) training batches of similar lengths")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (they show only when stderr is a terminal)")
    p.add_argument("--warmup-ratio", "--warmup_ratio", type=float, default=d.warmup_ratio,
                   help="share of the steps spent warming up the learning rate")
    p.add_argument("--weight-decay", "--weight_decay", type=float, default=d.weight_decay,
                   help="AdamW decay (not on biases and LayerNorm)")
    p.add_argument("--max-train-examples", "--max_train_samples", type=int, default=None,
                   help="use the first N training examples")
    p.add_argument("--max-eval-examples", "--max_eval_samples", type=int, default=None,
                   help="use the first N evaluation examples")
    p.add_argument("--max-test-examples", "--max_predict_samples", type=int, default=None,
                   help="predict the first N test examples")
    p.add_argument("--vocab", default=None, help="vocab.txt if the model directory has none")
    case = p.add_mutually_exclusive_group()
    case.add_argument("--lower-case", dest="lower_case", action="store_true", default=None,
                      help="lower-case the text (default: tokenizer_config.json, else uncased)")
    case.add_argument("--cased", dest="lower_case", action="store_false", help="keep the case")
    g = p.add_argument_group("sentence files (classify, pair, features)")
    g.add_argument("--text-column", default=None, help="column name or 0-based index")
    g.add_argument("--text-b-column", default=None, help="second text column of --task pair")
    g.add_argument("--label-column", "--label_column_name", default=None, help="column name or 0-based index")
    g.add_argument("--no-header", action="store_true", help="TSV/CSV without a header row "
                   "(default columns: GLUE CoLA's source, label, mark, sentence when the file has that "
                   "layout, else label, text[, text_b])")
    g.add_argument("--regression", action="store_true", help="numeric targets (STS-B): MSE loss, "
                   "Pearson/Spearman")
    g = p.add_argument_group("extractive QA")
    g.add_argument("--doc-stride", type=int, default=128,
                   help="tokens between the starts of windows (BERT's run_squad meaning)")
    g.add_argument("--doc_stride", dest="doc_overlap", type=int, default=None,
                   help="transformers' run_qa meaning: tokens neighbouring windows share (the same "
                   "windows as --doc-stride = window length - this, per question); wins over --doc-stride")
    g.add_argument("--max-query-length", "--max_query_length", type=int, default=64, help="question tokens kept")
    g.add_argument("--max-answer-length", "--max_answer_length", type=int, default=30, help="in tokens")
    g.add_argument("--n-best", "--n_best_size", type=int, default=20, help="spans kept per question")
    g.add_argument("--null-threshold", "--null_score_diff_threshold", type=float, default=0.0,
                   help="v2.0: answer empty when null score - best span score > this")
    v = g.add_mutually_exclusive_group()
    v.add_argument("--version-2", "--version_2_with_negative", dest="version_2", action="store_true", default=None,
                   help="SQuAD v2.0 (unanswerable questions; default: from the file)")
    v.add_argument("--version-1", dest="version_2", action="store_false", help="SQuAD v1.1")
    g = p.add_argument_group("frozen features")
    g.add_argument("--layer", type=int, default=-1, help="hidden state: 0 = embeddings, -1 = last layer")
    g.add_argument("--pooling", default="mean", choices=("cls", "mean", "pooler", "tokens"),
                   help="how token vectors become one per text (tokens: keep them all)")
    g.add_argument("--classifier-c", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    p.add_argument("--no-save-model", dest="save_model", action="store_false",
                   help="do not write the fine-tuned model into OUT/seed_S")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--deepspeed", default=None, metavar="CONFIG",
                   help="DeepSpeed JSON config (ZeRO stage, bf16, optimizer type): train through "
                   "deepspeed.initialize; --batch-size is per process (default: plain PyTorch)")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK is used
    p.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    return p


_TRAIN_FLAGS = {"learning_rate": "learning_rate", "epochs": "epochs", "max_steps": "max_steps",
                "batch_size": "batch_size", "eval_batch_size": "eval_batch_size", "warmup_ratio": "warmup_ratio",
                "weight_decay": "weight_decay", "gradient_accumulation_steps": "gradient_accumulation_steps",
                "precision": "precision", "progress": "progress",
                "group_by_length": "group_by_length"}


def args_from_namespace(ns: argparse.Namespace) -> FinetuneArgs:
    ours = vars(ns)
    train = TrainConfig(**{field: ours[flag] for flag, field in _TRAIN_FLAGS.items()})
    skip = set(_TRAIN_FLAGS) | {"log_level", "local_rank"}
    return FinetuneArgs(train=train, **{k: v for k, v in ours.items() if k not in skip})


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
    keys = ("task", "seeds", "mean", "std", "metrics", "test_predictions")  # the last two: no training
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=1))
    return 0
