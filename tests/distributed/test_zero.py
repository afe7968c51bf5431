"""The trainer under ZeRO 1/2/3 and tensor parallelism equals plain single-process PyTorch.

Reference: a dense BertForPreTraining trained with torch.optim.AdamW on the whole global batch
in one forward (MLM loss = mean over every masked token of the batch), torch's grad-norm clipping,
the same no-decay rule and warm-up/decay schedule written out here. The trainer runs in 2 gloo
processes (dp=2 under ZeRO-1/2/3, then tp=2), fp32, dropout off; per-step losses and the final
weights (gathered from the saved checkpoint, the export path) must agree within 1e-5.
"""
import json
import os

import numpy as np
import pytest
import torch

from tests.distributed._spawn import spawn

STEPS = 4
GLOBAL_BATCH = 8
LR = 1e-3
WARMUP = 2
SEQ = 64
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_model_config(path, dropout=0.0):
    with open(os.path.join(REPO, "configs", "bert-tiny.json")) as f:
        cfg = json.load(f)
    cfg.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return str(path)


def tiny_ds_config(path, stage=2, precision="fp32", lr=LR):
    """configs/zero<stage>.json with fp32/bf16 and a small micro batch (the real file otherwise)."""
    with open(os.path.join(REPO, "configs", f"zero{stage}.json")) as f:
        ds = json.load(f)
    ds["bf16"]["enabled"] = precision == "bf16"
    ds["train_micro_batch_size_per_gpu"] = 2
    ds["optimizer"]["params"]["lr"] = lr
    if stage == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny tensors
    with open(path, "w") as f:
        json.dump(ds, f)
    return str(path)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from data_prep.testing import build_tiny_dataset

    return build_tiny_dataset(str(tmp_path_factory.getbasetemp() / "pretrain_tiny_data"), seq_lengths=(SEQ,), n_docs=200)


def trainer_values(**kw):
    base = dict(seq_length=SEQ, train_steps=STEPS, global_batch_size=GLOBAL_BATCH, warmup_steps=WARMUP,
                log_interval=1, eval_samples=16, save_interval=1000, tensorboard=False)
    base.update(kw)
    return base


def _run_trainers(rank, world_size, runs):
    """Run several trainer configs one after the other in this process; return their histories."""
    from megatron.core import parallel_state

    from pretrain.config import from_dict, validate
    from pretrain.trainer import Trainer

    out = []
    for values in runs:
        if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() != values.get("tp", 1):
            parallel_state.destroy_model_parallel()
        res = validate(from_dict(values), world_size=world_size)
        out.append([h["loss"] for h in Trainer(res).run()["history"]])
    return out


def final_weights(save_dir):
    """The saved fp32 weights, TP shards joined and the vocabulary padding cut off (the export path)."""
    from pretrain import checkpoint as ckpt

    return ckpt.full_weights(*ckpt.resolve(save_dir))


def reference(model_config_path, data_dir, steps=STEPS):
    """Plain PyTorch on the whole global batch: the independent reference."""
    from pretrain.data import PretrainingDataset
    from pretrain.model import BertConfig, BertForPreTraining

    config = BertConfig.from_json_file(model_config_path)
    torch.manual_seed(1234)
    model = BertForPreTraining(config)
    model.init_weights()
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.999), eps=1e-6)
    # after s updates: warm-up (s + 1) / WARMUP (peak at s = WARMUP - 1), then sqrt decay ((T - s) / (T - WARMUP + 1)) ** 0.5
    # (the trainer's default "poly" 0.5 towards 0 at T = STEPS)
    lrs = [LR * ((s + 1) / WARMUP if s < WARMUP else ((STEPS - s) / (STEPS - WARMUP + 1)) ** 0.5) for s in range(steps)]
    ds = PretrainingDataset(data_dir, SEQ, "train", seed=1234)
    losses = []
    for step in range(steps):
        batch = {k: torch.as_tensor(v) for k, v in ds.get_batch(range(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)).items()}
        for g in opt.param_groups:
            g["lr"] = lrs[step]
        out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_weights_close(got, want, atol=1e-5):
    assert set(got) >= set(want) - {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    worst = max((float((got[k] - want[k]).abs().max()), k) for k in want if k in got)
    assert worst[0] <= atol, f"largest weight difference {worst[0]:.3g} in {worst[1]}"


def test_zero123_and_tp2_equal_single_process_reference(tiny_data, tmp_path):
    model_cfg = tiny_model_config(tmp_path / "tiny.json")
    runs = []
    for stage in (1, 2, 3):
        ds = tiny_ds_config(tmp_path / f"z{stage}.json", stage=stage)
        # ZeRO-3 also recomputes activations: checkpointing must not change the math.
        runs.append(trainer_values(ds_config=ds, model_config=model_cfg, data=tiny_data, save_dir=str(tmp_path / f"z{stage}"),
                                   activation_checkpointing=stage == 3))
    # tp=2 x dp=1 under ZeRO-2: the TP seam, megatron groups and the DeepSpeed mpu in the loop.
    runs.append(trainer_values(ds_config=str(tmp_path / "z2.json"), model_config=model_cfg, data=tiny_data,
                               save_dir=str(tmp_path / "tp2"), tp=2))
    results = spawn(_run_trainers, world_size=2, args=(runs,), timeout=600)
    ref_losses, ref_weights = reference(model_cfg, tiny_data)

    names = ["zero1 dp2", "zero2 dp2", "zero3 dp2", "zero2 tp2"]
    for i, name in enumerate(names):
        np.testing.assert_allclose(results[0][i], ref_losses, rtol=0, atol=1e-5, err_msg=name)
        assert results[1][i] == results[0][i], f"{name}: ranks disagree on the logged losses"
        assert_weights_close(final_weights(runs[i]["save_dir"]), ref_weights)
    # the reference itself must move: a trainer that never stepped would fail above, but say so
    assert ref_losses[-1] != ref_losses[0]
