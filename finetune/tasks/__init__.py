"""The fine-tuning tasks, by `--task` name. Each is one file here with a `Task` object
(`base.py`: read and encode, head, evaluate, save predictions, one run per seed); a new task is a
new file and one entry in `REGISTRY`."""
from __future__ import annotations

import json
import os

from pretrain import hf_io

from .. import checkpoint
from ..readers import InputError
from .base import Task, TaskData, TestData
from .features import FEATURES
from .qa import QA
from .sentence import CLASSIFY, PAIR
from .token import TOKEN

REGISTRY: dict[str, Task] = {t.name: t for t in (CLASSIFY, PAIR, TOKEN, QA, FEATURES)}
TASKS = tuple(REGISTRY)

__all__ = ["REGISTRY", "TASKS", "Task", "TaskData", "TestData", "finetuned_config", "get_task", "load_finetuned"]


def get_task(name: str) -> Task:
    if name not in REGISTRY:
        raise InputError(f"--task {name!r}: choose one of {TASKS}")
    return REGISTRY[name]


def finetuned_config(model_dir: str) -> tuple[str, list[str] | None, bool] | None:
    """(task name, labels in id order, regression) of a directory written by `Task.save_model`;
    None for any other directory (a pretrained encoder, a pretraining checkpoint)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    name = raw.get("finetuning_task")
    if REGISTRY.get(name) is None or REGISTRY[name].architecture is None:
        return None
    labels = [raw["id2label"][str(i)] for i in range(raw["num_labels"])] if "id2label" in raw else None
    return name, labels, raw.get("problem_type") == "regression"


def load_finetuned(out_dir: str):
    """(model, task name, labels) from a directory written by `Task.save_model`."""
    info = finetuned_config(out_dir)
    if info is None:
        raise InputError(f"{out_dir}: not a fine-tuned model of this package (no config.json with the "
                         f"finetuning_task of one of {[n for n, t in REGISTRY.items() if t.architecture]})")
    name, labels, regression = info
    config = checkpoint.read_config(out_dir)
    model = REGISTRY[name].build_head(config, len(labels) if labels else 2, regression)
    model.load_state_dict(hf_io.read_weights(out_dir), strict=True)
    return model, name, labels
