"""The unpadded encoder through tensor parallelism (megatron-core column/row layers on packed
[tokens, hidden] activations) and under DeepSpeed ZeRO-2, against the dense padded model in one
process (the reference): same losses, logits and gradients / trained weights, dropout off, with
length-1 and full-length rows in every batch."""

import torch

from tests.distributed._spawn import spawn
from tests.distributed.test_tensor_parallel import _gather_grads, build_tp_model, dense_model, tiny_config
from tests.distributed.test_tensor_parallel_deepspeed import _ds_config

TOL = 1e-5
SEQ = 16
MICRO = 4
STEPS = 2


def ragged_batch(config, batch, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, SEQ + 1, (batch,), generator=g)
    lengths[0], lengths[1] = 1, SEQ
    mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
    ids = torch.randint(5, config.vocab_size, (batch, SEQ), generator=g) * mask
    types = (torch.arange(SEQ)[None] >= (lengths[:, None] + 1) // 2).long() * mask
    masked = (torch.rand(batch, SEQ, generator=g) < 0.3) & mask.bool()
    masked[1, 2] = True
    labels = torch.where(masked, torch.randint(0, config.vocab_size, (batch, SEQ), generator=g), -100)
    nsp = torch.randint(0, 2, (batch,), generator=g)
    return dict(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels, next_sentence_label=nsp)


def _tp2_worker(rank, world_size):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain import tensor_parallel
    from pretrain.launch import init_distributed

    init_distributed("gloo")
    tensor_parallel.initialize_model_parallel(2)
    config = tiny_config()
    ref = dense_model(config)
    model, _ = build_tp_model(config, {k: v.clone() for k, v in ref.state_dict().items()})
    model.unpad = True
    batch = ragged_batch(config, 8, seed=3)
    out = model(**batch)
    out.loss.backward()
    out_ref = ref(**batch)  # padded (the default)
    out_ref.loss.backward()
    logits = out.prediction_logits.detach()
    parts = [torch.empty_like(logits) for _ in range(2)]
    dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    grads = _gather_grads(model)
    result = dict(
        losses=[out.loss.item(), out.mlm_loss.item(), out.nsp_loss.item()],
        ref_losses=[out_ref.loss.item(), out_ref.mlm_loss.item(), out_ref.nsp_loss.item()],
        logits_diff=(torch.cat(parts, -1) - out_ref.prediction_logits).abs().max().item(),
        nsp_logits_diff=(out.seq_relationship_logits - out_ref.seq_relationship_logits).abs().max().item(),
        grad_diff={n: float(abs(torch.as_tensor(grads[n]) - p.grad).max()) for n, p in ref.named_parameters()},
    )
    tensor_parallel.destroy_model_parallel()
    return result


def test_unpadded_tp2_equals_padded_dense():
    for r in spawn(_tp2_worker, 2, timeout=300):
        for a, b in zip(r["losses"], r["ref_losses"]):
            assert abs(a - b) < TOL
        assert r["logits_diff"] < TOL and r["nsp_logits_diff"] < TOL
        worst = max(r["grad_diff"].items(), key=lambda kv: kv[1])
        assert worst[1] < TOL, worst


def _zero2_worker(rank, world_size):
    """dp=2 under ZeRO-2 (unpadded) vs the dense padded model on the same global batch split in
    the same two micro-batches (loss = their mean, what data-parallel averaging computes)."""
    import deepspeed
    import torch.distributed as dist

    from pretrain import tensor_parallel
    from pretrain.launch import init_distributed

    init_distributed("gloo")
    tensor_parallel.initialize_model_parallel(1)
    config = tiny_config()
    ref = dense_model(config)
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = torch.optim.AdamW(ref.parameters(), lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    model = dense_model(config)
    model.unpad = True
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=_ds_config(2), mpu=tensor_parallel.MegatronMPU())
    losses, ref_losses = [], []
    for step in range(STEPS):
        batch = ragged_batch(config, MICRO * 2, seed=50 + step)
        micro = [{k: v[d * MICRO:(d + 1) * MICRO] for k, v in batch.items()} for d in range(2)]
        loss_ref = sum(ref(**m).loss for m in micro) / 2
        opt.zero_grad()
        loss_ref.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)  # _ds_config's gradient_clipping
        opt.step()
        ref_losses.append(loss_ref.item())
        out = engine(**micro[rank])
        engine.backward(out.loss)
        engine.step()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / 2)
    weights = engine.module.state_dict()
    ref_sd = ref.state_dict()
    result = dict(losses=losses, ref_losses=ref_losses,
                  weight_diff=max((weights[k] - ref_sd[k]).abs().max().item() for k in ref_sd),
                  moved=max((ref_sd[k] - start[k]).abs().max().item() for k in ref_sd))
    tensor_parallel.destroy_model_parallel()
    return result


def test_unpadded_zero2_dp2_equals_padded_dense():
    for r in spawn(_zero2_worker, 2, timeout=300):
        for a, b in zip(r["losses"], r["ref_losses"]):
            assert abs(a - b) < TOL
        assert r["moved"] > 1e-3  # the steps really changed the weights
        assert r["weight_diff"] < TOL
