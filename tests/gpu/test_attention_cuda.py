"""Attention with a padding mask on CUDA: same numbers as on the CPU, and padded keys inert.

Tolerance for CUDA fp32 vs CPU fp32 (TF32 off): 5e-5 relative, per tensor. Each device's fp32
result differs from exact arithmetic by rounding alone: measured on the CPU against float64 for
this tiny model (5 seeds, 2026-11-30), the worst gradient was 2.6e-6 off (the NSP bias, a
difference of two nearly equal means) and the attention output 4e-7; the CUDA kernels (cuBLAS in
fp32, memory-efficient attention, whose fp32 path emulates fp32 on the tensor cores) round at the
same level, and the two errors add. 5e-5 leaves a margin of 10 over that sum, while TF32 left on
(10-bit mantissa, ~5e-4) or a mask applied wrongly (errors of order 1) fail it.
"""
import copy

import pytest
import torch

from pretrain.layers import LayerFactory
from pretrain.model import BertForPreTraining, BertModel, BertSelfAttention
from tests.gpu._common import CUDA, exact_fp32, pretraining_batch, rel_err, tiny_config, to_device, worst_grad_err

pytestmark = CUDA

TOL = 5e-5


def _padding_bias(lengths, seq):
    """The additive [B, 1, 1, S] mask the model builds: 0 for real keys, fp32's lowest for padding."""
    keep = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]
    bias = torch.zeros(len(lengths), seq).masked_fill(~keep, torch.finfo(torch.float32).min)
    return bias[:, None, None, :]


def _attention_pass(module, x, bias, weights):
    x = x.detach().clone().requires_grad_()
    out = module(x, bias)
    (out * weights).sum().backward()  # a loss that weights every output element differently
    grads = {"input": x.grad}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return out.detach(), grads


def test_self_attention_with_padding_cuda_matches_cpu():
    config = tiny_config(dropout=0.0)
    torch.manual_seed(0)
    cpu = BertSelfAttention(config, LayerFactory()).train()
    batch, seq, hidden = 4, 64, config.hidden_size
    x = torch.randn(batch, seq, hidden)
    bias = _padding_bias([64, 40, 1, 50], seq)  # one row with a single real key
    weights = torch.randn(batch, seq, hidden)
    out_cpu, grads_cpu = _attention_pass(cpu, x, bias, weights)
    with exact_fp32():
        gpu = copy.deepcopy(cpu).cuda()
        out_gpu, grads_gpu = _attention_pass(gpu, x.cuda(), bias.cuda(), weights.cuda())
    assert out_gpu.is_cuda and torch.isfinite(out_gpu).all()
    assert rel_err(out_gpu, out_cpu) < TOL
    err, name = worst_grad_err(grads_gpu, grads_cpu)
    assert err < TOL, f"gradient of {name}: relative error {err:.2e}"


def test_pretraining_forward_backward_cuda_matches_cpu():
    torch.manual_seed(0)
    cpu = BertForPreTraining(tiny_config(dropout=0.0))
    cpu.init_weights()
    cpu.train()  # dropout 0: training mode runs the same code as a real step, deterministically
    batch = pretraining_batch()
    out_cpu = cpu(**batch)
    out_cpu.loss.backward()
    grads_cpu = {n: p.grad for n, p in cpu.named_parameters()}
    with exact_fp32():
        gpu = copy.deepcopy(cpu).cuda()
        gpu.zero_grad(set_to_none=True)
        out_gpu = gpu(**to_device(batch, "cuda"))
        out_gpu.loss.backward()
    grads_gpu = {n: p.grad for n, p in gpu.named_parameters()}
    assert torch.isfinite(out_gpu.loss)
    for key in ("loss", "mlm_loss", "nsp_loss", "prediction_logits", "seq_relationship_logits"):
        assert rel_err(getattr(out_gpu, key), getattr(out_cpu, key)) < TOL, key
    err, name = worst_grad_err(grads_gpu, grads_cpu)
    assert err < TOL, f"gradient of {name}: relative error {err:.2e}"


def _encoder_output(model, input_ids, attention_mask, seed, autocast):
    torch.manual_seed(seed)  # seeds the CUDA generator that SDPA's and nn.Dropout's masks come from
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids, torch.zeros_like(input_ids), attention_mask).last_hidden_state
    return out.float()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_dropout_on_cuda_gives_padded_keys_no_weight(autocast):
    """With dropout on, real tokens' outputs do not depend on what the padded positions hold."""
    torch.manual_seed(0)
    model = BertModel(tiny_config(dropout=0.1)).cuda().train()
    model.init_weights()
    batch = pretraining_batch()
    input_ids, attention_mask = batch["input_ids"].cuda(), batch["attention_mask"].cuda()
    real = attention_mask.bool()
    other = input_ids.clone()
    other[~real] = torch.randint(5, 512, (int((~real).sum()),), device="cuda")  # new padded tokens

    first = _encoder_output(model, input_ids, attention_mask, seed=123, autocast=autocast)
    second = _encoder_output(model, other, attention_mask, seed=123, autocast=autocast)
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    # exp(lowest - max) is exactly 0: padded keys add exactly nothing, whatever their values.
    assert torch.equal(first[real], second[real])

    # The comparison can fail: dropout does act (another seed, other outputs), and without the
    # mask the padded tokens do reach the real rows.
    assert not torch.equal(first[real], _encoder_output(model, input_ids, attention_mask, 124, autocast)[real])
    unmasked = _encoder_output(model, input_ids, None, seed=123, autocast=autocast)
    unmasked_other = _encoder_output(model, other, None, seed=123, autocast=autocast)
    assert not torch.equal(unmasked[real], unmasked_other[real])

    # and the backward pass through the masked, dropped-out attention is finite
    torch.manual_seed(123)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids, torch.zeros_like(input_ids), attention_mask).last_hidden_state
    out.float().pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
