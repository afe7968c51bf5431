"""bf16 and fp16 (dynamic loss scaling) steps through the DeepSpeed engine on one GPU, with the
repository's ZeRO-2 configs, and torch's fused AdamW inside the engine.

Each precision runs in a fresh process (a world of one, nccl), so that DeepSpeed's accelerator
choice and process group start clean: deepspeed is imported only there, never at collection.

How DeepSpeed 0.19.8 builds the optimizer from `"type": "AdamW"` with `"torch_adam": true`
(runtime/engine.py, `_configure_basic_optimizer` -> `get_optimizer_configuration`): it pops
`torch_adam`, `adam_w_mode`, `fp32_optimizer_states` and `foreach`, and calls
`torch.optim.AdamW(model_parameters, **remaining_params, foreach=foreach)`; a `"fused": true` in
the params therefore reaches torch's AdamW unchanged. ZeRO-2 then wraps it
(`engine.optimizer.optimizer` is that AdamW, stepping the fp32 master partitions on the GPU).
"""
import json
import math
import os

from tests.distributed._spawn import spawn
from tests.gpu._common import CUDA

pytestmark = CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 12


def _ds_config(path: str, precision: str, lr: float) -> dict:
    with open(path) as f:
        ds = json.load(f)
    # The trainer resolves "auto"; DeepSpeed itself wants a boolean.
    ds.setdefault(precision, {})["enabled"] = True
    ds.pop("train_batch_size", None)
    ds["train_micro_batch_size_per_gpu"] = 8
    ds["gradient_accumulation_steps"] = 1
    from pretrain.trainer import deepspeed_optimizer_params

    # The trainer's own rule for the params DeepSpeed gets on a GPU (it adds "fused": true).
    ds["optimizer"]["params"] = deepspeed_optimizer_params({**ds["optimizer"]["params"], "lr": lr}, "cuda")
    return ds


def _engine_steps(rank, world_size, config_path, precision, steps):
    """A tiny BertForPreTraining trained `steps` steps on one repeated batch; plain values back."""
    import deepspeed
    import torch

    from pretrain.model import BertForPreTraining
    from tests.gpu._common import pretraining_batch, tiny_config, to_device

    torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False, verbose=False)
    ds = _ds_config(config_path, precision, lr=1e-3)
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_config(dropout=0.0))
    model.init_weights()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    zero = engine.optimizer
    inner = getattr(zero, "optimizer", zero)
    result = {
        "accelerator": deepspeed.get_accelerator().device_name(),
        "engine_device": str(engine.device),
        "module_dtype": str(next(engine.module.parameters()).dtype),
        "wrapper": type(zero).__name__,
        "inner": f"{type(inner).__module__}.{type(inner).__name__}",
        "inner_defaults": {k: inner.defaults.get(k) for k in ("fused", "foreach", "lr", "weight_decay")},
        "inner_state_device": str(inner.param_groups[0]["params"][0].device),
        "dynamic_loss_scale": getattr(zero, "dynamic_loss_scale", None),
        "initial_scale": float(getattr(zero, "cur_scale", float("nan"))),
    }
    batch = to_device(pretraining_batch(batch=8), engine.device)
    losses, scales = [], []
    for _ in range(steps):
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss.float().item()))
        scales.append(float(getattr(zero, "cur_scale", float("nan"))))
    result.update(losses=losses, scales=scales, skipped=int(engine.skipped_steps))
    return result


def _run(config_name, precision):
    env = {"DS_ACCELERATOR": "cuda", "OMP_NUM_THREADS": "4"}
    (result,) = spawn(_engine_steps, 1, args=(os.path.join(ROOT, "configs", config_name), precision, STEPS),
                      timeout=300, env=env)
    print(json.dumps(result, indent=1))  # shown with -s / on failure: the numbers behind the asserts
    return result


def _check_common(r, dtype):
    assert r["accelerator"] == "cuda" and r["engine_device"].startswith("cuda")
    assert r["module_dtype"] == dtype
    assert r["inner"] == "torch.optim.adamw.AdamW", r["inner"]
    assert r["inner_defaults"]["fused"] is True, r["inner_defaults"]
    assert r["inner_state_device"].startswith("cuda")
    losses = r["losses"]
    assert all(math.isfinite(x) for x in losses), losses
    # Adam at lr 1e-3 on one repeated batch: the loss must fall well below the first step's.
    assert min(losses[-3:]) < losses[0] - 0.1, losses


def test_bf16_zero2_step_on_cuda():
    r = _run("zero2.json", "bf16")
    _check_common(r, "torch.bfloat16")
    assert r["skipped"] == 0
    assert r["dynamic_loss_scale"] is False  # bf16 needs no loss scaling: DeepSpeed keeps 1.0


def test_fp16_zero2_dynamic_loss_scale_on_cuda():
    r = _run("zero2_fp16.json", "fp16")
    _check_common(r, "torch.float16")
    assert r["dynamic_loss_scale"] is True
    assert r["initial_scale"] == 2.0 ** 16  # "initial_scale_power": 16
    # Overflows halve the scale (after "hysteresis": 2 of them); it stays a power of two.
    for s in r["scales"]:
        assert 1.0 <= s <= 2.0 ** 16 and math.log2(s).is_integer(), r["scales"]
    # An overflowing step is skipped (the first ones may be, at 2**16); most must be applied.
    assert r["skipped"] <= STEPS // 2, r
