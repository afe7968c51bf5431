"""bf16 vs fp32 on this CPU, side by side in one run: what `--precision auto` chooses and why.

Times a bert-tiny (and optionally bert-base) training step (forward + backward, the trainer's sparse
MLM head, AdamW) in fp32 and under bf16 autocast, alternating the two so that machine noise hits
both, and prints the detector's answer (pretrain/precision.py) beside the measured ratio.

    .venv/bin/python benchmarks/precision.py                    # bert-tiny, batch 32 x 128
    .venv/bin/python benchmarks/precision.py --model configs/bert-base.json --batch 8 --steps 3
    # the path a CPU without AVX512-BF16/AMX takes, on one that has them (ISA capped for torch/oneDNN):
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python benchmarks/precision.py
"""
import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pretrain import precision as prec  # noqa: E402
from pretrain.model import BertConfig, BertForPreTraining  # noqa: E402


def batch(config, size, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, config.vocab_size, (size, seq), generator=g)
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(size, seq, generator=g) < 0.15
    labels[chosen] = ids[chosen]
    return dict(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids),
                labels=labels, next_sentence_label=torch.randint(0, 2, (size,), generator=g))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="configs/bert-tiny.json")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per precision (after one warm-up each)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    config = BertConfig.from_json_file(a.model)
    torch.manual_seed(0)
    model = BertForPreTraining(config)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = batch(config, a.batch, a.seq)

    def step(dtype):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
        with ctx:
            loss = model(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = {"fp32": [], "bf16": []}
    for dtype in times:
        step(dtype)  # warm-up
    for _ in range(a.steps):
        for dtype in times:
            t = time.perf_counter()
            step(dtype)
            times[dtype].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    native = prec.cpu_has_native_bf16()
    print(f"CPU: {prec.cpu_model_name()} | native bf16 (AVX512-BF16/AMX, ONEDNN_MAX_CPU_ISA): {native} | "
          f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '-')} | torch {torch.__version__}, {a.threads} threads")
    print(f"{a.model}, batch {a.batch} x {a.seq}, best of {a.steps} steps: fp32 {best['fp32'] * 1000:.0f} ms, "
          f"bf16 autocast {best['bf16'] * 1000:.0f} ms -> bf16/fp32 = {best['bf16'] / best['fp32']:.2f}x")
    print(f"matmul 256^3 bf16/fp32: {prec.bf16_slowdown():.1f}x | --precision auto picks {prec.native_precision('cpu')}")


if __name__ == "__main__":
    main()
