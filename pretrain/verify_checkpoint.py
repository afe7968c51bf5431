"""Check a trainer checkpoint against its integrity record, the same check a run does on start.

    python -m pretrain.verify_checkpoint RUN_DIR            # the checkpoint `latest` names
    python -m pretrain.verify_checkpoint RUN_DIR step_N     # that one
    python -m pretrain.verify_checkpoint RUN_DIR --no-checksums   # sizes only (no file is read;
                                                                  # --no-verify_checksums, as the trainer, too)

Exit 0 and one line (files, bytes) for a good checkpoint; exit 1 and the one-line reason a run or
`pretrain.export_hf` would give (which file, what is wrong) for a damaged or incomplete one (a
`step_N.incomplete` folder included); exit 2 when RUN_DIR is not a run directory. Needs no process group, accelerator or DeepSpeed.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain import checkpoint as ckpt  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.verify_checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="the run directory (--save_dir of the run)")
    p.add_argument("tag", nargs="?", default=None, help="a checkpoint folder in it (step_N); default: the one `latest` names")
    p.add_argument("--no-checksums", "--no-verify_checksums", dest="checksums", action="store_false",
                   help="check sizes only (a truncated file is still found; a changed byte is not)")
    args = p.parse_args(argv)
    try:
        if args.tag and not os.path.isdir(args.run_dir):
            raise ckpt.CheckpointError(f"{args.run_dir}: no such run directory")
        run_dir, tag = (os.path.normpath(args.run_dir), args.tag) if args.tag else ckpt.resolve(args.run_dir)
    except (ckpt.CheckpointError, OSError) as e:
        print(f"error: {ckpt.one_line(e)}", file=sys.stderr)
        return 2
    verdict = ckpt.verify(run_dir, tag, checksums=args.checksums)
    if not verdict.ok:
        print(f"error: {ckpt.damage_message(run_dir, verdict)}", file=sys.stderr)
        return 1
    where = os.path.join(run_dir, tag)
    if verdict.legacy:
        print(f"{where}: no {ckpt.INTEGRITY} (written before integrity records); its trainer state reads, nothing else "
              "can be checked")
    else:
        print(f"{where}: ok, {verdict.files} files, {verdict.bytes:,} bytes, sizes"
              f"{' and CRC-32s' if verdict.checksums else ''} match {ckpt.INTEGRITY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
