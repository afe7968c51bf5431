"""Oracle for the whole pretraining path: the same model, samples, masking, optimizer, schedule
and number of steps as `pretrain/run.py`, but in plain transformers (`BertForPreTraining`, its own
weight init) and a ten-line PyTorch loop in one process. Prints held-out MLM/NSP accuracy at the
same eval points, next to our run's `metrics.jsonl` when `--ours` is given.

A gap larger than the seed-to-seed spread means a defect in our path (model, loss, masking
positions, optimizer groups, schedule, DeepSpeed/ZeRO wiring); equal figures mean the recipe, not
the code, decides what pretraining reaches.

    .venv/bin/python benchmarks/pretrain_oracle.py --data demo_out/data --model_config configs/bert-tiny.json \
        --steps 600 --global_batch_size 64 --lr 2e-3 --warmup_proportion 0.1 --ours demo_out/run/metrics.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def schedule(step: int, total: int, warmup: int, decay: str, power: float) -> float:
    """Multiplier of the peak lr for the update made after `step` (0-based) updates: linear
    warm-up (step + 1) / warmup, then polynomial decay from the peak update (warmup - 1) towards
    0 at `total` (BERT's NVIDIA recipe). Written from that definition (docs/pretrain.md), not
    imported from the trainer; tests/unit/test_optim.py checks both give the same sequence."""
    if step < warmup:
        return (step + 1) / warmup
    peak = max(warmup - 1, 0)
    frac = max(0.0, (total - step) / max(1, total - peak))
    return frac ** (1.0 if decay == "linear" else power)


def forward(model, b: dict):
    """transformers' own modules: encoder (`model.bert`), then the heads (`model.cls`) on the
    masked rows only. The same logits as `model(...).prediction_logits[labels != -100]`, without
    the [B, S, vocab] tensor of every position (1 GB at 64 x 128 x 30522)."""
    seq, pooled = model.bert(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                             attention_mask=b["attention_mask"], return_dict=False)[:2]
    sel = b["labels"] != -100
    logits, nsp_logits = model.cls(seq[sel], pooled)
    return logits, nsp_logits, b["labels"][sel]


@torch.no_grad()
def evaluate(model, valid, n: int, batch: int) -> dict:
    model.eval()
    correct = masked = nsp_ok = 0
    loss_sum = 0.0
    for lo in range(0, n, batch):
        b = {k: torch.as_tensor(v) for k, v in valid.get_batch(np.arange(lo, min(n, lo + batch))).items()}
        logits, nsp_logits, labels = forward(model, b)
        correct += int((logits.argmax(-1) == labels).sum())
        masked += labels.numel()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        nsp_ok += int((nsp_logits.argmax(-1) == b["next_sentence_label"]).sum())
    model.train()
    return {"mlm_acc": correct / masked, "mlm_loss": loss_sum / masked, "nsp_acc": nsp_ok / n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model_config", required=True)
    p.add_argument("--seq_length", type=int, default=128)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--global_batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup_proportion", type=float, default=0.1)
    p.add_argument("--decay", default="poly", choices=("poly", "linear"))
    p.add_argument("--decay_power", type=float, default=0.5)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=1234, help="sample order and masking (as pretrain/run.py --seed)")
    p.add_argument("--init_seed", type=int, default=0, help="torch seed of transformers' own weight init")
    p.add_argument("--masked_lm_prob", type=float, default=0.15)
    p.add_argument("--whole_word_masking", action="store_true")
    p.add_argument("--eval_interval", type=int, default=200)
    p.add_argument("--eval_samples", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--ours", default=None, help="our run's metrics.jsonl: its eval rows are printed alongside")
    a = p.parse_args(argv)

    from transformers import BertConfig, BertForPreTraining

    from pretrain.data import PretrainingDataset
    from pretrain.masking import MaskingConfig

    torch.set_num_threads(a.threads or len(os.sched_getaffinity(0)))
    torch.manual_seed(a.init_seed)
    with open(a.model_config) as f:
        cfg = BertConfig(**{k: v for k, v in json.load(f).items() if k not in ("architectures", "model_type")})
    model = BertForPreTraining(cfg)  # transformers' own init (normal(0.02), LayerNorm 1/0, biases 0)
    no_decay = [p_ for n, p_ in model.named_parameters() if n.endswith(".bias") or "LayerNorm" in n]
    decay = [p_ for n, p_ in model.named_parameters() if not (n.endswith(".bias") or "LayerNorm" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.999), eps=1e-6)
    warmup = round(a.warmup_proportion * a.steps)
    masking = MaskingConfig(mlm_probability=a.masked_lm_prob, whole_word=a.whole_word_masking)
    train = PretrainingDataset(a.data, a.seq_length, "train", masking=masking, seed=a.seed)
    valid = PretrainingDataset(a.data, a.seq_length, "valid", masking=masking, seed=a.seed)
    ours = {}
    if a.ours:
        with open(a.ours) as f:
            ours = {r["step"]: r for r in map(json.loads, f) if r.get("kind") == "eval"}

    print(f"oracle: transformers BertForPreTraining {sum(p_.numel() for p_ in model.parameters()) / 1e6:.2f}M params, "
          f"{a.steps} steps x {a.global_batch_size}, lr {a.lr} (warm-up {warmup}, {a.decay} decay), "
          f"{torch.get_num_threads()} threads", flush=True)
    print(f"{'step':>6} {'loss':>7} {'oracle mlm_acc':>14} {'ours':>6} {'oracle nsp':>10} {'ours':>6} {'s':>6}", flush=True)
    t0 = time.perf_counter()
    model.train()
    losses = []
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = a.lr * schedule(step, a.steps, warmup, a.decay, a.decay_power)
        idx = np.arange(step * a.global_batch_size, (step + 1) * a.global_batch_size)
        b = {k: torch.as_tensor(v) for k, v in train.get_batch(idx).items()}
        logits, nsp_logits, labels = forward(model, b)
        loss = (torch.nn.functional.cross_entropy(logits, labels)  # mean over the batch's masked tokens
                + torch.nn.functional.cross_entropy(nsp_logits, b["next_sentence_label"]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % a.eval_interval == 0 or step + 1 == a.steps:
            e = evaluate(model, valid, a.eval_samples, a.global_batch_size)
            o = ours.get(step + 1, {})
            fmt = lambda v: f"{v:6.3f}" if isinstance(v, float) else f"{'-':>6}"  # noqa: E731
            print(f"{step + 1:6d} {np.mean(losses[-a.eval_interval:]):7.3f} {e['mlm_acc']:14.3f} {fmt(o.get('mlm_acc'))} "
                  f"{e['nsp_acc']:10.3f} {fmt(o.get('nsp_acc'))} {time.perf_counter() - t0:6.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
