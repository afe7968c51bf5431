"""Training-step throughput: our BertForPreTraining vs transformers' at the same config, fp32, CPU.

One step = forward + backward + AdamW step on a masked batch (15% MLM labels, NSP labels, some
padding). Both models hold the same weights and see the same batches; steps alternate between
them (order flipped every round) after warm-up so that machine noise hits both alike. Prints
the median tokens/s of each and their ratio (goal >= 1.3x).

    .venv/bin/python benchmarks/train_step.py --config configs/bert-tiny.json --batch 8 --seq 128
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pretrain.model import BertConfig, BertForPreTraining  # noqa: E402

logger = logging.getLogger("benchmarks.train_step")


def make_batch(config, batch, seq, mask_rate, gen):
    ids = torch.randint(999, config.vocab_size, (batch, seq), generator=gen)
    attention = torch.ones(batch, seq, dtype=torch.long)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=gen)
    lengths[0] = seq
    for row, length in enumerate(lengths.tolist()):
        attention[row, length:] = 0
    ids[attention == 0] = config.pad_token_id
    types = torch.zeros_like(ids)
    types[:, seq // 2:] = 1
    labels = torch.full_like(ids, -100)
    pick = (torch.rand(ids.shape, generator=gen) < mask_rate) & (attention == 1)
    labels[pick] = ids[pick]
    nsp = torch.randint(0, 2, (batch,), generator=gen)
    return dict(input_ids=ids, token_type_ids=types, attention_mask=attention, labels=labels,
                next_sentence_label=nsp)


def build(config, hf_attn):
    import transformers

    ours = BertForPreTraining(config)
    ours.init_weights()
    hf = transformers.BertForPreTraining(
        transformers.BertConfig(**config.to_dict(), attn_implementation=hf_attn))
    hf.load_state_dict(ours.state_dict(), strict=False)  # decoder.bias is tied to cls.predictions.bias
    return ours.train(), hf.train()


def step_fn(model, optimizer):
    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        return loss.item()
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/bert-tiny.json", help="model config JSON")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--mask-rate", type=float, default=0.15)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per model")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"],
                        help="transformers attention implementation (sdpa is its default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("batch", "seq", "rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = BertConfig.from_json_file(args.config)
    if args.seq > config.max_position_embeddings:
        parser.error(f"--seq {args.seq} exceeds max_position_embeddings of {args.config}")
    ours, hf = build(config, args.hf_attn)
    steps = {
        "ours": step_fn(ours, torch.optim.AdamW(ours.parameters(), lr=1e-4)),
        "transformers": step_fn(hf, torch.optim.AdamW(hf.parameters(), lr=1e-4)),
    }
    gen = torch.Generator().manual_seed(1)
    batches = [make_batch(config, args.batch, args.seq, args.mask_rate, gen) for _ in range(4)]
    tokens = args.batch * args.seq

    for i in range(args.warmup):
        for step in steps.values():
            step(batches[i % len(batches)])
    # Two clocks: wall time is what a user sees; this process's CPU time is what the step costs
    # and stays meaningful when other jobs compete for the cores (a shared 2-core machine made
    # wall-clock medians swing by 2x between neighbouring steps).
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    for i in range(args.rounds):
        order = list(steps) if i % 2 == 0 else list(reversed(steps))
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[name](batches[i % len(batches)])
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)

    logger.info("config=%s batch=%d seq=%d threads=%d fp32 cpu, hf attn=%s, %d rounds after %d warm-up",
                args.config, args.batch, args.seq, args.threads, args.hf_attn, args.rounds, args.warmup)
    ratios = {}
    for clock, times in (("wall", wall), ("cpu", cpu)):
        rate = {name: tokens / statistics.median(t) for name, t in times.items()}
        for name in steps:
            logger.info("%-4s %-13s %10.0f tokens/s  (median step %.1f ms)", clock, name, rate[name],
                        1000 * statistics.median(times[name]))
        ratios[clock] = rate["ours"] / rate["transformers"]
    logger.info("ratio ours/transformers: %.2fx wall-clock, %.2fx CPU time (goal >= 1.3x)",
                ratios["wall"], ratios["cpu"])
    return ratios


if __name__ == "__main__":
    main()
