"""Training metrics: the FLOPs model behind TFLOP/s and MFU, the fixed-order log line, TensorBoard,
the metrics.jsonl history and the loss-curve PNG.

Only rank 0 writes anything; other ranks build no writer. The FLOPs formula is stated in
docs/pretrain.md and implemented in `bert_flops_per_sequence` (one place, so docs and numbers agree).
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Optional

import psutil
import torch

from data_prep.atomic import atomic_file

log = logging.getLogger(__name__)

# Dense bf16/fp16 tensor-core peaks (no sparsity), TFLOP/s, by substring of the device name.
_PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10", 125.0), ("V100", 125.0))

# The order of the log line and of the TensorBoard scalars; never reorder (people grep logs).
FIELDS = (
    "step", "loss", "mlm_loss", "nsp_loss", "lr", "grad_norm", "loss_scale", "tokens_per_s",
    "seqs_per_s", "tflops", "mfu", "mem_gb", "data_wait", "skipped", "sequences",
)
# Fields that are words, not numbers: in the log line and metrics.jsonl, not in TensorBoard
# ("sequences packed" / "sequences unpacked": NSP pairs packed several per row or one per row).
TEXT_FIELDS = ("sequences",)


def bert_flops_per_sequence(hidden: int, layers: int, intermediate: int, vocab: int, seq: int,
                            masked: float) -> float:
    """Model FLOPs of one training pass (forward + backward = 3 x forward) for one sequence.

    Counts the matmuls `pretrain.model.BertForPreTraining` runs with MLM labels, 2 FLOPs per
    multiply-add (H hidden, I intermediate, S sequence length, V `vocab`, M `masked`):

      every layer, on all S tokens:  Q/K/V projections 6*S*H^2, scores Q K^T 2*S^2*H,
                                     probabilities x V 2*S^2*H
      layers 1 .. L-1, on all S:     attention output 2*S*H^2, feed-forward 4*S*H*I
      last layer, on R = M + 1 rows: attention output 2*R*H^2, feed-forward 4*R*H*I
                                     (only the [CLS] row and the masked rows leave the encoder;
                                     every token is still a key/value, so Q/K/V and the
                                     attention itself run on all S)
      MLM head, on the M rows:       transform 2*M*H^2, decoder 2*M*H*V
      pooler on [CLS] 2*H^2, NSP classifier 2*H*2

    forward = L*(6*S*H^2 + 4*S^2*H) + ((L-1)*S + M + 1)*(2*H^2 + 4*H*I) + M*(2*H^2 + 2*H*V)
              + 2*H^2 + 4*H

    `masked` is the mean number of masked tokens per sequence (a float). `vocab` is the number of
    decoder rows actually multiplied, i.e. the padded vocabulary (`pretrain.vocab.padded_vocab_size`),
    not the tokenizer's size. All S tokens are counted: for sequences of real lengths (the log
    line) use `bert_flops`. Bias adds, embedding lookups, LayerNorm,
    softmax, GELU and dropout are left out (not matmuls, memory bound, < 1%). Backward is counted
    as 2 x forward (gradients of both matmul operands); the recomputation of activation
    checkpointing or of a fused attention backward is not counted: MFU measures model FLOPs.
    tests/unit/test_metrics.py checks this against a hand count and against the matmul FLOPs
    torch's FlopCounterMode sees in the model's forward and backward.
    """
    return bert_flops(hidden, layers, intermediate, vocab, tokens=seq, tokens_squared=float(seq) ** 2,
                      masked=masked, sequences=1)


def bert_flops(hidden: int, layers: int, intermediate: int, vocab: int, tokens: float, tokens_squared: float,
               masked: float, sequences: float) -> float:
    """Model FLOPs of one training pass over a set of sequences of real lengths L_1 .. L_N:
    `bert_flops_per_sequence`'s count with S*(...) summed over the sequences, i.e. the linear
    terms on T = sum L_n real tokens, the attention's quadratic term on Q = sum L_n^2 (each pair
    attends within itself, packed or not), M = `masked` tokens and N = `sequences` [CLS] rows:

      forward = L*(6*T*H^2 + 4*Q*H) + ((L-1)*T + M + N)*(2*H^2 + 4*H*I) + M*(2*H^2 + 2*H*V)
                + N*(2*H^2 + 4*H)

    Padding is not counted, whether or not the encoder ran on it (`--no-unpad`): MFU measures
    useful work, so a padded run shows the FLOPs it wastes as a lower MFU."""
    h, i = float(hidden), float(intermediate)
    t, q, m, n = float(tokens), float(tokens_squared), float(masked), float(sequences)
    attention_all = layers * (6 * t * h * h + 4 * q * h)
    dense_rows = (layers - 1) * t + m + n  # rows through the attention output and the FFN
    dense = dense_rows * (2 * h * h + 4 * h * i)
    mlm = m * (2 * h * h + 2 * h * vocab)
    forward = attention_all + dense + mlm + n * (2 * h * h + 2 * h * 2)
    return 3.0 * forward


def peak_tflops(configured: float = 0.0) -> Optional[float]:
    """`configured` if > 0, else the bf16 dense peak of a known GPU, else None (MFU n/a)."""
    if configured > 0:
        return configured
    try:
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            for key, value in _PEAK_TFLOPS:
                if key in name:
                    return value
    except Exception:  # noqa: BLE001 - MFU is informative only
        pass
    return None


def memory_gb() -> float:
    """Peak accelerator memory of this process (GPU), or its resident set size (CPU), in GB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    try:
        return psutil.Process().memory_info().rss / 1e9
    except Exception:  # noqa: BLE001
        return float("nan")


def _fmt(key: str, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{key} n/a"
    if key == "step":
        return f"step {v}"
    if key in TEXT_FIELDS:
        return f"{key} {v}"
    if key in ("lr",):
        return f"{key} {v:.3e}"
    if key in ("tokens_per_s", "seqs_per_s"):
        return f"{key} {v:.1f}"
    if key == "mfu":
        return f"mfu {100 * v:.1f}%"
    if key == "data_wait":
        return f"data_wait {100 * v:.1f}%"
    if key in ("loss_scale", "skipped"):
        return f"{key} {v:g}"
    if key == "tflops":
        return f"tflops {v:.3f}"
    if key == "mem_gb":
        return f"mem_gb {v:.2f}"
    return f"{key} {v:.4f}"


def format_line(values: dict) -> str:
    return " | ".join(_fmt(k, values.get(k)) for k in FIELDS)


class MetricsWriter:
    """Rank 0's sink: the log line, TensorBoard scalars and an append-only metrics.jsonl that
    survives resumes (the PNG is drawn from it, so curves span all restarts)."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except Exception as e:  # noqa: BLE001 - TensorBoard is optional output
                log.warning("TensorBoard disabled: %s", e)

    def train(self, values: dict) -> None:
        if not self.enabled:
            return
        log.info(format_line(values))
        self._record("train", values)

    def eval(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        log.info("eval step %d | " % step + " | ".join(f"{k} {v:.4f}" for k, v in values.items()))
        self._record("eval", {"step": step, **values})

    def _record(self, kind: str, values: dict) -> None:
        step = values["step"]
        if self.tb is not None:
            for k, v in values.items():
                if k != "step" and k not in TEXT_FIELDS and v is not None and not (isinstance(v, float) and math.isnan(v)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
            self.tb.flush()
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, **{k: _jsonable(v) for k, v in values.items()}}) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_history(path: str) -> dict:
    """metrics.jsonl -> {"train": [...], "eval": [...]}; a step seen twice (re-run after a resume)
    keeps its last record."""
    out = {"train": {}, "eval": {}}
    if not os.path.exists(path):
        return {"train": [], "eval": []}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
            out.setdefault(rec.pop("kind"), {})[rec["step"]] = rec
    return {k: [v[s] for s in sorted(v)] for k, v in out.items()}


def plot_losses(metrics_path: str, png_path: str) -> Optional[str]:
    """Draw train and held-out losses (and MLM accuracy) against steps; returns the PNG path."""
    hist = read_history(metrics_path)
    if not hist["train"] and not hist["eval"]:
        return None
    import matplotlib  # here, not at the top: choosing the backend is a side effect

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("loss", "-"), ("mlm_loss", "--"), ("nsp_loss", ":")):
        pts = [(r["step"], r[key]) for r in hist["train"] if r.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts), style, label=f"train {key}")
    for key, style in (("mlm_loss", "o-"), ("nsp_loss", "s-")):
        pts = [(r["step"], r[key]) for r in hist["eval"] if r.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts), style, label=f"held-out {key}")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    for key, style, label in (("mlm_acc", "o-", "held-out mlm_acc"), ("nsp_acc", "o-", "held-out nsp_acc"),
                              ("unigram_acc", "k--", "unigram baseline (MLM)")):
        pts = [(r["step"], r[key]) for r in hist["eval"] if r.get(key) is not None]
        if pts:
            ax2.plot(*zip(*pts), style, label=label)
    ax2.set_xlabel("step")
    ax2.set_ylabel("accuracy")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    try:
        # The format is named because the temporary name does not end in .png.
        atomic_file(png_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), fsync=False)
    finally:
        plt.close(fig)
    return png_path
