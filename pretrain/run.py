"""BERT pretraining entry point: parse, validate, build, run.

    deepspeed pretrain/run.py --ds_config configs/zero2.json --model_config configs/bert-large.json \
        --data DATA_DIR --seq_length 128 --train_steps N --save_dir RUN_DIR

Also runs under torchrun, srun and mpirun (pretrain/launch.py reads each launcher's variables).
Re-running the same command resumes from RUN_DIR/latest. Flags: `--help` or docs/pretrain.md.
"""
import logging
import os
import sys

if __package__ in (None, ""):
    # `deepspeed pretrain/run.py` runs this file as a script: make the repository importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.config import ConfigError, load_config, validate  # noqa: E402
from pretrain.quiet import filter_third_party_warnings  # noqa: E402


def main(argv=None) -> int:
    filter_third_party_warnings()  # before the trainer imports megatron-core and DeepSpeed
    try:
        # Everything that can be wrong in the inputs is found here, before any process group.
        res = validate(load_config(argv))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pretrain.checkpoint import CheckpointError, CheckpointSaveError
    from pretrain.trainer import NonFiniteError, Trainer  # after validate: a config error costs no DeepSpeed import

    from pretrain.launch import shutdown_distributed

    try:
        trainer = Trainer(res)
        trainer.run()
        shutdown_distributed(trainer.engine)
    except CheckpointError as e:  # no checkpoint in --save_dir verifies: an input error, as in validate
        logging.getLogger("pretrain").error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ConfigError, NonFiniteError, CheckpointSaveError) as e:
        logging.getLogger("pretrain").error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
