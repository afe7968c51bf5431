"""Loader throughput: masked seq-128 samples/s on one core, against the goal of 20,000.

Measures the path training uses: build_dataloader(num_workers=0) -> PretrainingDataset.__getitems__
(truncation, [CLS] A [SEP] B [SEP], dynamic masking) -> collate to int64 tensors, in one
single-threaded process (torch.set_num_threads(1), no workers).

Data: an existing data_prep output (--data-dir), else the embedded Wikipedia corpus prepared with
the real data_prep pipeline into --cache-dir (first run ~20-60 s), else, if data_prep or its
corpus is unavailable, the synthetic corpus of the tests. The line printed says which.

    .venv/bin/python benchmarks/loader.py [--data-dir DIR] [--samples 200000]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from pretrain.data import PretrainingDataset, build_dataloader  # noqa: E402
from pretrain.masking import MaskingConfig  # noqa: E402

GOAL = 20_000
SEQ = 128


def prepare_data(args) -> tuple[str, str]:
    if args.data_dir:
        return args.data_dir, f"data_prep output {args.data_dir}"
    out = os.path.join(args.cache_dir, "embedded")
    try:
        from data_prep.testing import build_tiny_dataset

        build_tiny_dataset(out, seq_lengths=(SEQ,), n_docs=None, valid_fraction=0.01)
        return out, "embedded Wikipedia corpus (10,033 lead extracts) via data_prep"
    except Exception as e:  # the synthetic corpus keeps the benchmark usable without data_prep
        logging.warning("embedded corpus unavailable (%s); using the synthetic test corpus", e)
        from tests.unit._pretrain_fixtures import build_synthetic_dataset

        out = build_synthetic_dataset(os.path.join(args.cache_dir, "synthetic"), n_docs=3000, seq_lengths=(SEQ,))
        return out, "synthetic corpus (tests/unit/_pretrain_fixtures.py)"


def measure(dataset, micro: int, samples: int) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of this single-threaded process)."""
    loader = build_dataloader(dataset, micro_batch_size=micro, num_workers=0)
    it = iter(loader)
    for _ in range(max(1, 2048 // micro)):  # warm-up: epoch permutation, page cache
        next(it)
    steps = max(1, samples // micro)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        batch = next(it)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (micro, SEQ)
    return steps * micro / wall, steps * micro / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="a data_prep output directory with seq-128 pairs")
    parser.add_argument("--cache-dir", default=os.path.join("/tmp", "bert_loader_bench"),
                        help="where the embedded corpus is prepared once (default %(default)s)")
    parser.add_argument("--samples", type=int, default=50_000, help="samples timed per configuration")
    parser.add_argument("--micro", type=int, nargs="+", default=[32, 256], help="micro-batch sizes to time")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    data_dir, source = prepare_data(args)
    plain = PretrainingDataset(data_dir, SEQ, masking=MaskingConfig(), seed=1)
    wwm = PretrainingDataset(data_dir, SEQ, masking=MaskingConfig(whole_word=True), seed=1)
    probe = plain.get_batch(range(min(len(plain), 4096)))
    print(f"data: {source}; {len(plain)} train pairs; mean real tokens/sample "
          f"{probe['attention_mask'].sum(1).mean():.1f} of {SEQ}")
    load = os.getloadavg()[0]
    print(f"one thread (torch {torch.get_num_threads()}), no workers, {args.samples} samples per line; "
          f"load average {load:.1f} on {os.cpu_count()} cores")
    print("wall = samples per elapsed second; cpu = per second of this process's CPU time (the one-core "
          "figure when the machine is shared)")
    for micro in args.micro:
        for name, ds in (("masked", plain), ("masked whole-word", wwm)):
            wall, cpu = measure(ds, micro, args.samples)
            print(f"seq {SEQ} {name:18s} micro {micro:4d}: wall {wall:8.0f}/s ({wall / GOAL:.2f}x goal)  "
                  f"cpu {cpu:8.0f}/s ({cpu / GOAL:.2f}x goal {GOAL})")


if __name__ == "__main__":
    main()
