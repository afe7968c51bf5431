"""Fine-tuning step throughput on Pang & Lee sentences: our BertForSequenceClassification
(unpadded encoder, length-bucketed batches: `finetune/train.py`) vs transformers'
BertForSequenceClassification (SDPA) with its standard dynamic padding (`DataCollatorWithPadding`
over randomly drawn batches, as its Trainer does by default), same weights, fp32, CPU, one run.

The same examples (a seeded sample of the 4,000 sentences, tokenized by our task code with the
embedded bert-base-uncased vocabulary) go through every variant once, in batches of `--batch`:
ours grouped by length, transformers' in random order; a third variant runs transformers on our
bucketed batches, which separates the bucketing's share of the gain from the rest: the unpadded
encoder and also our head's last layer, which computes the [CLS] rows only (transformers' computes
every token there).
One step = forward + backward + AdamW step (the same optimizer on both sides: torch's fused AdamW, as
our loop and transformers' Trainer use it; `--foreach-adamw` for the foreach kernels);
variants alternate step by step. Prints examples/s
over the whole sample and the ratios (goal: ours >= 2x transformers with DataCollatorWithPadding).

It also counts each variant's matmul FLOPs over the same batches (torch's FlopCounterMode, forward +
backward, untimed): their ratio is the speed-up that doing less work gives if both sides run their
matmuls at the same rate, and GFLOP/s (per CPU second) shows whether they do. On CPU the step is
matmul-bound: time ratio = FLOP ratio x (our GFLOP/s / theirs), so at equal rates the FLOP ratio is the
ceiling. (In training mode attention runs as bmm and is counted; a dropout-free SDPA call on CPU may not be.)

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 nice -n 10 .venv/bin/python benchmarks/finetune_step.py \\
        --config configs/bert-base.json --batch 32 --steps 6
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from finetune.modeling import BertForSequenceClassification  # noqa: E402
from finetune.train import _batches, collate  # noqa: E402
from pretrain.model import BertConfig  # noqa: E402

logger = logging.getLogger("benchmarks.finetune_step")
LABELS = {"-1": 0, "1": 1}


def polarity_features(count: int, seed: int, max_length: int):
    """`count` Pang & Lee sentences drawn with `seed`, as our classify task encodes them."""
    from transformers import BertTokenizerFast

    from data_prep.embedded import embedded_vocab
    from finetune.datasets import load_polarity
    from finetune.tasks.sentence import encode_sentences

    examples = load_polarity()
    random.Random(seed).shuffle(examples)
    tokenizer = BertTokenizerFast(vocab_file=embedded_vocab(), do_lower_case=True)
    features = encode_sentences(examples[:count], tokenizer, max_length, LABELS, False, "pang&lee")
    return features, tokenizer


def build(config):
    import transformers

    ours = BertForSequenceClassification(config, num_labels=len(LABELS))
    ours.bert.init_weights()
    hf = transformers.BertForSequenceClassification(
        transformers.BertConfig(**config.to_dict(), num_labels=len(LABELS), attn_implementation="sdpa"))
    result = hf.load_state_dict(ours.state_dict(), strict=False)
    if result.unexpected_keys or any(not k.endswith("position_ids") for k in result.missing_keys):
        raise RuntimeError(f"weights do not map onto transformers' model: {result}")
    return ours.train(), hf.train()


def step_fn(model, optimizer, hf: bool):
    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss if hf else model(**batch)[0]
        loss.backward()
        optimizer.step()
    return step


def matmul_flops(model, batches, hf: bool) -> int:
    """Forward + backward matmul FLOPs of `model` over `batches` (no optimizer step; gradients dropped)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        for batch in batches:
            loss = model(**batch).loss if hf else model(**batch)[0]
            loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/bert-base.json", help="model config JSON")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant (batches of the sample)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--max-length", type=int, default=128, help="the task's --max-seq-length")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: CPU time then excludes OpenMP spin-waits)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--foreach-adamw", action="store_true",
                        help="torch's foreach AdamW on both sides instead of the fused one that our loop and "
                             "transformers' Trainer (torch >= 2.8) use (~0.5 s against ~0.08 s a bert-base update "
                             "on one core)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("batch", "steps", "threads", "max_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = BertConfig.from_json_file(args.config)
    n = args.batch * args.steps
    features, tokenizer = polarity_features(n + args.batch * args.warmup, args.seed, args.max_length)
    warm, features = features[:args.batch * args.warmup], features[args.batch * args.warmup:]

    from transformers import DataCollatorWithPadding

    hf_collate = DataCollatorWithPadding(tokenizer)
    ours_batches = [collate(b) for b in _batches(features, args.batch, True, random.Random(args.seed))]
    order = list(range(n))
    random.Random(args.seed).shuffle(order)  # transformers' Trainer: a random sampler, no grouping
    hf_batches = [hf_collate([features[j] for j in order[i:i + args.batch]]) for i in range(0, n, args.batch)]
    warm_batches = [collate(warm[i:i + args.batch]) for i in range(0, len(warm), args.batch)]

    ours, hf = build(config)
    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=2e-5, fused=not args.foreach_adamw or None)

    steps = {
        "ours": (step_fn(ours, adamw(ours), hf=False), ours_batches),
        "transformers": (step_fn(hf, adamw(hf), hf=True), hf_batches),
    }
    # transformers on our bucketed batches shares its model (and optimizer) with the plain run
    steps["transformers bucketed"] = (steps["transformers"][0], ours_batches)
    for b in warm_batches:
        for step, _ in steps.values():
            step(b)
    wall = {name: 0.0 for name in steps}
    cpu = {name: 0.0 for name in steps}
    names = list(steps)
    for i in range(len(ours_batches)):
        for name in names[i % len(names):] + names[:i % len(names)]:
            step, batches = steps[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            step(batches[i])
            wall[name] += time.perf_counter() - start
            cpu[name] += time.process_time() - start_cpu

    # the same model for both transformers variants; its batches differ
    flops = {"ours": matmul_flops(ours, ours_batches, hf=False),
             "transformers": matmul_flops(hf, hf_batches, hf=True),
             "transformers bucketed": matmul_flops(hf, ours_batches, hf=True)}

    real = sum(len(f["input_ids"]) for f in features)
    for name, (_, batches) in steps.items():
        grid = sum(b["input_ids"].numel() for b in batches)
        logger.info("%-22s %4d examples, %6d real tokens in %6d-token batches (%2.0f%% padding%s)", name, n, real, grid,
                    100 * (1 - real / grid), "; the unpadded encoder computes none of it" if name == "ours" else "")
    logger.info("config=%s batch=%d steps=%d threads=%d fp32 cpu, max length %d, %s AdamW, torch %s", args.config,
                args.batch, args.steps, args.threads, args.max_length, "foreach" if args.foreach_adamw else "fused",
                torch.__version__)
    for clock, times in (("wall", wall), ("cpu", cpu)):
        for name in names:
            logger.info("%-4s %-22s %7.1f examples/s (%.1f s for the sample; %.0f matmul GFLOP/s)", clock, name,
                        n / times[name], times[name], flops[name] / times[name] / 1e9)
    ratios = {}
    for other in ("transformers", "transformers bucketed"):
        ratios[other] = (wall[other] / wall["ours"], cpu[other] / cpu["ours"])
        logger.info("ratio ours/%-22s %.2fx wall-clock, %.2fx CPU time; %.2fx fewer matmul FLOPs (the bound at equal "
                    "FLOP/s)", other, *ratios[other], flops[other] / flops["ours"])
    return ratios


if __name__ == "__main__":
    main()
