"""Export a trainer checkpoint to an HF `BertForPreTraining` directory.

    python -m pretrain.export_hf RUN_DIR/latest OUT_DIR     # or RUN_DIR, or RUN_DIR/step_N

Gathers the ZeRO partitions (DeepSpeed's fp32 master weights, not the bf16 copies) of every
tensor-parallel rank, joins the TP shards, and writes config.json, model.safetensors and
vocab.txt. Runs in one process without a process group or an accelerator.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain import checkpoint as ckpt  # noqa: E402
from pretrain.hf_io import save_hf_dir  # noqa: E402
from pretrain.model import BertConfig  # noqa: E402
from pretrain.quiet import filter_third_party_warnings  # noqa: E402

log = logging.getLogger("pretrain.export_hf")


def export(checkpoint_path: str, out_dir: str) -> str:
    """Write the HF directory; returns out_dir."""
    run_dir, tag = ckpt.resolve(checkpoint_path)
    ckpt.check(run_dir, tag)  # a damaged checkpoint is refused before any of it is read
    state = ckpt.read_state(run_dir, tag)
    config = BertConfig.from_dict(state["model_config"], source=f"{os.path.join(run_dir, tag, ckpt.STATE_FILE)}")
    full = ckpt.full_weights(run_dir, tag, checksums=False)  # checked above; padded vocabulary rows cut off
    vocab = None
    for name in ("vocab.txt",):
        if os.path.isfile(os.path.join(run_dir, tag, name)):
            vocab = os.path.join(run_dir, tag, name)
    save_hf_dir(full, config, out_dir, vocab_file=vocab)
    log.info("exported %s (step %d, tp %d, ZeRO-%d) to %s", os.path.join(run_dir, tag), state["step"], state["tp"],
             state["zero_stage"], out_dir)
    return out_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.export_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="RUN_DIR, RUN_DIR/latest or RUN_DIR/step_N")
    p.add_argument("out_dir", help="output directory (config.json, model.safetensors, vocab.txt)")
    args = p.parse_args(argv)
    # The command needs no accelerator (it reads the fp32 master weights on the CPU); callers that
    # import `export` keep whatever accelerator their own process uses.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    filter_third_party_warnings()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        export(args.checkpoint, args.out_dir)
    except (ckpt.CheckpointError, ValueError, OSError) as e:
        print(f"error: {ckpt.one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
