"""The real trainer on one GPU (a world of one, nccl):

- a training step queues its work without the host waiting for the device in OUR code:
  `torch.cuda.set_sync_debug_mode("warn")` reports every synchronising CUDA call with the Python
  frame that made it; none may come from pretrain/ (DeepSpeed's own grad-norm / overflow checks
  are counted and shown, not ours to remove);
- the client optimizer (LAMB, nvidia variant) is built after the model is on the GPU, so its
  state lives there, and the log names it; the AdamW path is torch's fused kernel;
- the metrics of the steps are still right when read once per interval (finite, falling).
"""
import json
import os

from tests.distributed._spawn import spawn
from tests.gpu._common import CUDA

pytestmark = CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _trainer_on_gpu(rank, world_size, workdir, ds_name):
    import warnings

    import torch

    from pretrain.config import from_dict, validate
    from pretrain.trainer import Trainer, describe_optimizer
    from tests.unit._pretrain_fixtures import build_synthetic_dataset, synthetic_vocab

    data = build_synthetic_dataset(os.path.join(workdir, "data"), n_docs=60, seq_lengths=(64,))
    with open(os.path.join(ROOT, "configs", "bert-tiny.json")) as f:
        model = json.load(f)
    model.update(vocab_size=len(synthetic_vocab()), hidden_size=64, num_attention_heads=4, intermediate_size=256)
    model_cfg = os.path.join(workdir, "tiny.json")
    with open(model_cfg, "w") as f:
        json.dump(model, f)
    res = validate(from_dict(dict(
        ds_config=os.path.join(ROOT, "configs", ds_name), model_config=model_cfg, data=data, seq_length=64,
        train_steps=40, micro_batch_size=8, global_batch_size=16, lr=1e-3, warmup_steps=2,
        save_dir=os.path.join(workdir, "run"), log_interval=10, eval_interval=0, eval_samples=16,
        save_interval=1000, tensorboard=False)), world_size=1)
    trainer = Trainer(res)
    it = iter(trainer.loader)

    def step():
        return trainer.train_step([next(it) for _ in range(res.grad_accum)])

    for _ in range(3):  # warm-up: allocator, kernels, DeepSpeed's first-step bookkeeping
        step()
    torch.cuda.synchronize()
    ours = os.path.join(ROOT, "pretrain") + os.sep
    metrics = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(5):
                metrics.append(step())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [(w.filename, w.lineno, str(w.message)[:80]) for w in caught if "synchroniz" in str(w.message).lower()]
    losses = [float(m["loss"]) for m in metrics]  # read after the region: one sync each, outside it
    inner = getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)
    state_devices = sorted({str(v.device) for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()})
    return {
        "ours": [s for s in syncs if s[0].startswith(ours)],
        "others": len([s for s in syncs if not s[0].startswith(ours)]),
        "losses": losses, "precision": res.precision,
        "optimizer": describe_optimizer(trainer.engine.optimizer), "state_devices": state_devices,
        "tensor_metrics": all(torch.is_tensor(m["loss"]) and m["loss"].is_cuda for m in metrics),
    }


def _run(tmp_path, ds_name):
    env = {"DS_ACCELERATOR": "cuda", "OMP_NUM_THREADS": "4"}
    (r,) = spawn(_trainer_on_gpu, 1, args=(str(tmp_path), ds_name), timeout=400, env=env)
    print(json.dumps(r, indent=1))
    return r


def test_training_step_has_no_host_sync_in_our_code(tmp_path):
    r = _run(tmp_path, "zero2.json")
    assert r["precision"] == "bf16"  # "auto" on a compute-capability >= 8 GPU
    assert r["ours"] == [], r["ours"]
    assert r["tensor_metrics"]  # the step hands back device tensors; the loop reads them per interval
    assert all(x == x and x < 20 for x in r["losses"]), r["losses"]
    assert r["optimizer"].startswith("torch.optim.adamw.AdamW(fused=True") and "cuda" in r["optimizer"], r["optimizer"]


def test_lamb_client_optimizer_lives_on_the_gpu(tmp_path):
    r = _run(tmp_path, "zero2_lamb.json")
    assert r["optimizer"].startswith("pretrain.optim.Lamb") and "variant=nvidia" in r["optimizer"], r["optimizer"]
    assert r["state_devices"] and all(d.startswith("cuda") for d in r["state_devices"]), r["state_devices"]
    assert r["ours"] == [], r["ours"]
