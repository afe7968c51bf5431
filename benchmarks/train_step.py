"""Training-step throughput on real pretraining batches: our BertForPreTraining padded, unpadded
and packed vs transformers' BertForPreTraining (SDPA), same config and weights, fp32, CPU, one run.

Batches come from the real pipeline: `data_prep` output of the embedded corpus (wiki lead
paragraphs: short documents, ~93 real tokens per 128-token NSP pair) read by
`pretrain.data.PretrainingDataset` with its masking, consecutive global sample indices as the
sampler hands them out; `--long-docs` adds a corpus of long documents (the same paragraphs, 16
summaries per document, so pairs fill their rows). One step = forward + backward + AdamW step.
Our padded and unpadded steps share one model and optimizer (`model.unpad` toggled), so the
weights are the same for every variant; transformers' model starts from the same weights.
Steps alternate between the variants (order rotated every round) after warm-up so that machine
noise hits all alike. Prints tokens/s counting real (non-pad) tokens and the ratios (goal:
unpadded >= 1.5x transformers at bert-base on the embedded corpus). Both of our variants predict
sparsely (the last layer computes the [CLS] and masked rows only, and only the masked rows reach the
vocabulary decoder), transformers' model every position: "unpadded/transformers" includes that
sparse MLM head's gain, "unpadded/padded" is the unpadding's alone. "Packed" is the same pairs as
the trainer's `--pack_sequences` lays them out (`pretrain.data.pack_batch`: first fit into fewer
rows, the layout built from `sequence_ids` in the step, as the trainer builds it per micro-batch):
"packed/unpadded" is what packing adds on top of unpadding.

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 nice -n 10 .venv/bin/python benchmarks/train_step.py \\
        --config configs/bert-base.json --batch 8 --rounds 3 --long-docs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pretrain.model import BertConfig, BertForPreTraining  # noqa: E402

logger = logging.getLogger("benchmarks.train_step")

DOCS_PER_LONG_DOCUMENT = 16


def embedded_data(cache: str, seq: int) -> str:
    from data_prep.testing import build_tiny_dataset

    return build_tiny_dataset(os.path.join(cache, f"embedded_{seq}"), seq_lengths=(seq,), n_docs=None,
                              valid_fraction=0.01, cache_dir=os.path.join(cache, "prep_cache"))


def long_document_data(cache: str, seq: int) -> str:
    """The embedded corpus regrouped into long documents, through the same data_prep pipeline."""
    from data_prep import manifest
    from data_prep.embedded import embedded_corpus_jsonl, embedded_vocab
    from data_prep.manifest import ManifestError
    from data_prep.pipeline import PrepConfig, run

    out = os.path.join(cache, f"long_docs_{seq}")
    src = os.path.join(cache, "long_docs.jsonl")
    if not os.path.exists(src):
        with open(embedded_corpus_jsonl(os.path.join(cache, "prep_cache")), encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        with open(src + ".tmp", "w", encoding="utf-8") as f:
            for i in range(0, len(texts), DOCS_PER_LONG_DOCUMENT):
                f.write(json.dumps({"text": "\n".join(texts[i:i + DOCS_PER_LONG_DOCUMENT])}) + "\n")
        os.replace(src + ".tmp", src)
    cfg = PrepConfig(inputs=[src], output_dir=out, vocab=embedded_vocab(), seq_lengths=[seq], seed=1234,
                     valid_fraction=0.01, workers=1, progress=False)
    cfg.validate()
    try:
        if manifest.read(out).args == json.loads(json.dumps(cfg.manifest_args())):
            return out
    except ManifestError:
        pass
    run(cfg)
    return out


def real_batches(data_dir: str, seq: int, batch: int, count: int, start: int = 0) -> list:
    """Each batch of `batch` consecutive pairs twice: one pair per row ("plain") and packed."""
    from pretrain.data import PretrainingDataset

    ds = PretrainingDataset(data_dir, seq, "train", seed=1234)
    out = []
    for i in range(count):
        indices = range(start + i * batch, start + (i + 1) * batch)
        out.append({kind: {k: torch.as_tensor(v) for k, v in ds.get_batch(indices, pack=kind == "packed").items()}
                    for kind in ("plain", "packed")})
    return out


def build(config, hf_attn):
    import transformers

    ours = BertForPreTraining(config)
    ours.init_weights()
    hf = transformers.BertForPreTraining(
        transformers.BertConfig(**config.to_dict(), attn_implementation=hf_attn))
    hf.load_state_dict(ours.state_dict(), strict=False)  # decoder.bias is tied to cls.predictions.bias
    return ours.train(), hf.train()


def step_fn(model, optimizer, unpad=None, packed=False):
    from pretrain.unpad import TokenLayout

    def step(batches):
        if unpad is not None:
            model.unpad = unpad
        batch = batches["packed" if packed else "plain"]
        if packed:
            batch = dict(batch)
            batch["layout"] = TokenLayout.from_attention_mask(batch["attention_mask"],
                                                              sequence_ids=batch.pop("sequence_ids"))
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        return loss.item()
    return step


def time_steps(steps: dict, batches: list, warmup: int, rounds: int):
    """Wall and this-process CPU seconds per step for each variant, alternating."""
    for i in range(warmup):
        for step in steps.values():
            step(batches[i % len(batches)])
    # Two clocks: wall time is what a user sees; this process's CPU time is what the step costs
    # and stays meaningful when other jobs compete for the cores.
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    names = list(steps)
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        batch = batches[i % len(batches)]
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[name](batch)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def report(corpus: str, batches: list, wall: dict, cpu: dict, rounds: int) -> dict:
    used = batches[:rounds] if rounds <= len(batches) else batches
    real = statistics.mean(float(b["plain"]["attention_mask"].sum()) for b in used)
    grid = batches[0]["plain"]["attention_mask"].numel()
    rows = statistics.mean(len(b["packed"]["input_ids"]) for b in used)
    logger.info("[%s] %.1f real tokens per %d-token batch (%.0f%% padding); packed into %.1f of %d rows", corpus,
                real, grid, 100 * (1 - real / grid), rows, len(batches[0]["plain"]["input_ids"]))
    ratios = {}
    for clock, times in (("wall", wall), ("cpu", cpu)):
        rate = {name: real / statistics.median(t) for name, t in times.items()}
        for name in times:
            logger.info("[%s] %-4s %-16s %8.0f real tokens/s  (median step %.0f ms)", corpus, clock, name,
                        rate[name], 1000 * statistics.median(times[name]))
        ratios[clock] = {
            "unpadded/transformers": rate["ours unpadded"] / rate["transformers"],
            "padded/transformers": rate["ours padded"] / rate["transformers"],
            "unpadded/padded": rate["ours unpadded"] / rate["ours padded"],
            "packed/transformers": rate["ours packed"] / rate["transformers"],
            "packed/unpadded": rate["ours packed"] / rate["ours unpadded"],
        }
    for key in ratios["wall"]:
        logger.info("[%s] ratio %-22s %.2fx wall-clock, %.2fx CPU time", corpus, key,
                    ratios["wall"][key], ratios["cpu"][key])
    return ratios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/bert-base.json", help="model config JSON")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: CPU time then excludes OpenMP spin-waits)")
    parser.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"],
                        help="transformers attention implementation (sdpa is its default)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "bert_bench_data"),
                        help="where the data_prep outputs are built once and reused")
    parser.add_argument("--long-docs", action="store_true", help="also run on a corpus of long documents")
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
    corpora = {"embedded": embedded_data(args.cache, args.seq)}
    if args.long_docs:
        corpora["long docs"] = long_document_data(args.cache, args.seq)
    ours, hf = build(config, args.hf_attn)
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    steps = {
        "ours unpadded": step_fn(ours, ours_opt, unpad=True),
        "ours padded": step_fn(ours, ours_opt, unpad=False),
        "ours packed": step_fn(ours, ours_opt, packed=True),
        "transformers": step_fn(hf, torch.optim.AdamW(hf.parameters(), lr=1e-4)),
    }
    logger.info("config=%s batch=%d seq=%d threads=%d fp32 cpu, hf attn=%s, %d rounds after %d warm-up, "
                "torch %s", args.config, args.batch, args.seq, args.threads, args.hf_attn, args.rounds,
                args.warmup, torch.__version__)
    results = {}
    for corpus, data_dir in corpora.items():
        batches = real_batches(data_dir, args.seq, args.batch, max(args.rounds, args.warmup))
        if int(max(b["plain"]["input_ids"].max() for b in batches)) >= config.vocab_size:
            parser.error(f"{data_dir}: token ids exceed vocab_size of {args.config}")
        wall, cpu = time_steps(steps, batches, args.warmup, args.rounds)
        results[corpus] = report(corpus, batches, wall, cpu, args.rounds)
    return results


if __name__ == "__main__":
    main()
