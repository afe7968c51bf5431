"""Sample-exact resume: SIGKILL mid-run then re-run = the uninterrupted run, bit for bit; a dp=2
checkpoint resumed at dp=1 continues the same global sample order (and trajectory, within 1e-5)."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

from tests.distributed._spawn import free_port, spawn
from tests.distributed.test_zero import (
    _run_trainers, final_weights, tiny_data, tiny_ds_config, tiny_model_config, trainer_values,  # noqa: F401
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _losses(save_dir):
    from pretrain.metrics import read_history

    return {r["step"]: r["loss"] for r in read_history(os.path.join(save_dir, "metrics.jsonl"))["train"]}


def _torchrun_cmd(save_dir, model_cfg, ds_cfg, data, steps):
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        os.path.join(REPO, "pretrain", "run.py"), "--ds_config", ds_cfg, "--model_config", model_cfg, "--data", data,
        "--seq_length", "64", "--train_steps", str(steps), "--save_dir", save_dir, "--global_batch_size", "8",
        "--warmup_steps", "3", "--log_interval", "1", "--save_interval", "5", "--eval_interval", "10",
        "--eval_samples", "16", "--no-tensorboard",
    ]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": REPO}


def test_sigkill_and_rerun_gives_identical_losses(tiny_data, tmp_path):
    model_cfg = tiny_model_config(tmp_path / "tiny.json", dropout=0.1)  # dropout on: RNG state must resume too
    ds_cfg = tiny_ds_config(tmp_path / "z2.json", stage=2)
    steps = 30
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")

    subprocess.run(_torchrun_cmd(full, model_cfg, ds_cfg, tiny_data, steps), env=_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)

    proc = subprocess.Popen(_torchrun_cmd(killed, model_cfg, ds_cfg, tiny_data, steps), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = os.path.join(killed, "latest")
    deadline = time.monotonic() + 300
    while not os.path.exists(latest) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    # The launcher and both ranks, no chance to clean up. torchrun starts its workers in their own
    # sessions, so a process-group kill would miss them: kill the whole process tree by pid.
    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()

    def alive():
        out = []
        for pid in tree:
            try:
                if psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                    out.append(pid)
            except psutil.NoSuchProcess:
                pass
        return out

    deadline = time.monotonic() + 30
    while alive() and time.monotonic() < deadline:  # SIGKILL is delivered asynchronously
        time.sleep(0.05)
    assert not alive(), f"processes survived SIGKILL: {alive()}"
    with open(latest) as f:
        killed_at = f.read().strip()
    assert killed_at != f"step_{steps}", "the run finished before it could be killed; the test proved nothing"

    subprocess.run(_torchrun_cmd(killed, model_cfg, ds_cfg, tiny_data, steps), env=_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)

    want, got = _losses(full), _losses(killed)
    assert sorted(want) == list(range(1, steps + 1)) and sorted(got) == sorted(want)
    assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(want)]  # bitwise
    a, b = final_weights(full), final_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_at_dp1_from_dp2_continues_the_sample_order(tiny_data, tmp_path):
    model_cfg = tiny_model_config(tmp_path / "tiny.json")
    ds_cfg = tiny_ds_config(tmp_path / "z2.json", stage=2)
    common = dict(ds_config=ds_cfg, model_config=model_cfg, data=tiny_data, train_steps=8)
    whole = trainer_values(save_dir=str(tmp_path / "whole"), **common)
    first = trainer_values(save_dir=str(tmp_path / "split"), exit_at_step=4, **common)
    spawn(_run_trainers, world_size=2, args=([whole, first],), timeout=600)
    # Same global batch (8) on one rank: micro 2 x accumulation 4.
    second = trainer_values(save_dir=str(tmp_path / "split"), micro_batch_size=2, **common)
    spawn(_run_trainers, world_size=1, args=([second],), timeout=600)

    from pretrain import checkpoint as ckpt

    state = ckpt.read_state(*ckpt.resolve(str(tmp_path / "split")))
    assert state["step"] == 8 and state["consumed_samples"] == 64 and state["dp"] == 1

    want, got = _losses(whole["save_dir"]), _losses(second["save_dir"])
    assert sorted(got) == sorted(want) == list(range(1, 9))
    assert [got[s] for s in range(1, 5)] == [want[s] for s in range(1, 5)]  # same processes, same code path
    np.testing.assert_allclose([got[s] for s in range(5, 9)], [want[s] for s in range(5, 9)], rtol=0, atol=1e-5)
    a, b = final_weights(whole["save_dir"]), final_weights(second["save_dir"])
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-5, worst


def test_tp2_resumed_at_another_dp_keeps_each_tp_group_in_step(tiny_data, tmp_path):
    """tp=2 x dp=2 -> tp=2 x dp=1 with dropout on: after the resume the RNG is reseeded (the
    per-rank streams cannot continue at another layout). The two ranks of a TP group must still draw
    the same masks in replicated regions (hidden-state dropout), or their copies of the replicated
    weights (LayerNorm, biases, position/type embeddings) drift apart with no error. Checked on the
    checkpoint the resumed run writes: every replicated tensor bitwise equal across TP ranks."""
    from pretrain import checkpoint as ckpt
    from pretrain.tensor_parallel import default_partition_dims

    model_cfg = tiny_model_config(tmp_path / "tiny.json", dropout=0.1)
    ds_cfg = tiny_ds_config(tmp_path / "z2.json", stage=2)
    run = str(tmp_path / "run")
    common = dict(ds_config=ds_cfg, model_config=model_cfg, data=tiny_data, train_steps=4, tp=2, save_dir=run)
    spawn(_run_trainers, world_size=4, args=([trainer_values(exit_at_step=2, **common)],), timeout=600)
    spawn(_run_trainers, world_size=2, args=([trainer_values(micro_batch_size=2, **common)],), timeout=600)

    run_dir, tag = ckpt.resolve(run)
    state = ckpt.read_state(run_dir, tag)
    assert state["step"] == 4 and state["dp"] == 1 and state["tp"] == 2
    shards = ckpt.fp32_shards(run_dir, tag)
    split = default_partition_dims(shards[0].keys())
    replicated = [k for k in shards[0] if k not in split]
    assert any("LayerNorm" in k for k in replicated)
    drift = {k: float((shards[0][k] - shards[1][k]).abs().max()) for k in replicated}
    assert all(v == 0.0 for v in drift.values()), {k: v for k, v in drift.items() if v}
