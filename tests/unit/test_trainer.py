"""Host-side decisions of the trainer that differ between CPU and GPU, checked on CPU: the
optimizer implementation DeepSpeed is asked for, how it is reported, and the loader workers."""
import torch

from pretrain.trainer import deepspeed_optimizer_params, describe_optimizer, loader_workers
from tests.distributed._spawn import spawn


def test_torch_adamw_is_the_fused_kernel_on_gpu_only():
    params = {"lr": 1e-4, "torch_adam": True, "weight_decay": 0.01}
    assert deepspeed_optimizer_params(params, "cuda")["fused"] is True
    assert "fused" not in deepspeed_optimizer_params(params, "cpu")
    assert "fused" not in params  # the resolved config is not mutated
    assert "fused" not in deepspeed_optimizer_params({**params, "foreach": True}, "cuda")  # user's choice stands
    assert "fused" not in deepspeed_optimizer_params({"lr": 1e-4}, "cuda")  # DeepSpeed's own FusedAdam


def _engine_optimizer(rank, world_size, ds_params):
    import deepspeed

    from pretrain.launch import init_distributed

    init_distributed(use_deepspeed=False)
    model = torch.nn.Linear(4, 4)
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}, "gradient_clipping": 1.0,
          "optimizer": {"type": "AdamW", "params": ds_params}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    inner = engine.optimizer.optimizer
    return type(inner).__name__, inner.defaults.get("fused"), describe_optimizer(engine.optimizer)


def test_the_fused_flag_reaches_torch_adamw_through_deepspeed():
    # torch's fused AdamW also runs on CPU, so the pass-through is checkable here.
    params = deepspeed_optimizer_params({"lr": 1e-3, "torch_adam": True}, "cuda")
    name, fused, described = spawn(_engine_optimizer, 1, args=(params,), timeout=300)[0]
    assert (name, fused) == ("AdamW", True)
    assert described.startswith("torch.optim.adamw.AdamW(fused=True") and "DeepSpeedZeroOptimizer" in described


def test_describe_a_plain_optimizer():
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), foreach=False)
    assert describe_optimizer(opt) == "torch.optim.adamw.AdamW(foreach=False) on cpu"


def test_loader_workers():
    assert loader_workers(3, "cpu") == 3 and loader_workers(0, "cuda") == 0  # explicit wins
    assert loader_workers(-1, "cpu") == 0  # CPU steps need the cores themselves
    assert loader_workers(-1, "cuda", cpus_per_rank=16) == 4
    assert loader_workers(-1, "cuda", cpus_per_rank=3) == 2
    assert loader_workers(-1, "cuda", cpus_per_rank=1) == 1
