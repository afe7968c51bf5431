"""LAMB against a NumPy transcription of the published update rule; schedule against hand values."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from pretrain.optim import (
    Lamb,
    OptimizerConfigError,
    build_optimizer,
    build_scheduler,
    param_groups,
    warmup_poly_decay,
)


def numpy_lamb(weights, grads_per_step, lr, b1, b2, eps, wd, max_trust=None, min_trust=None):
    """Algorithm 2 of You et al. 2019 (LAMB), per tensor, in float64 NumPy.

    weights: list of arrays; grads_per_step: list (steps) of lists (tensors) of arrays.
    Returns the weights after every step and the trust ratios of the last step.
    """
    w = [x.astype(np.float64).copy() for x in weights]
    m = [np.zeros_like(x) for x in w]
    v = [np.zeros_like(x) for x in w]
    history, ratios = [], []
    for t, grads in enumerate(grads_per_step, start=1):
        ratios = []
        for i, g in enumerate(grads):
            g = g.astype(np.float64)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat = m[i] / (1 - b1 ** t)
            v_hat = v[i] / (1 - b2 ** t)
            r = m_hat / (np.sqrt(v_hat) + eps)
            u = r + wd[i] * w[i]
            w_norm, u_norm = np.linalg.norm(w[i]), np.linalg.norm(u)
            trust = w_norm / u_norm if (w_norm > 0 and u_norm > 0) else 1.0
            if max_trust is not None:
                trust = min(trust, max_trust)
            if min_trust is not None:
                trust = max(trust, min_trust)
            ratios.append(trust)
            w[i] = w[i] - lr * trust * u
        history.append([x.copy() for x in w])
    return history, ratios


def _run_lamb(weights, grads_per_step, lr, betas, eps, wd, **kw):
    params = [nn.Parameter(torch.tensor(x, dtype=torch.float32)) for x in weights]
    groups = [{"params": [p], "weight_decay": d} for p, d in zip(params, wd)]
    opt = Lamb(groups, lr=lr, betas=betas, eps=eps, **kw)
    history = []
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
        history.append([p.detach().numpy().astype(np.float64).copy() for p in params])
    ratios = [float(opt.state[p]["last_trust_ratio"]) for p in params]
    return history, ratios


def _problem(seed=0, steps=6):
    rng = np.random.default_rng(seed)
    weights = [
        rng.normal(0, 0.5, (8, 5)),  # a weight matrix (decayed)
        rng.normal(0, 0.02, (5,)),  # a small bias (no decay): large trust ratio
        np.zeros(4),  # a zero-initialised bias: the ||w|| = 0 guard
        rng.normal(0, 3.0, (3, 3)),  # large weights: trust ratio > 1
    ]
    grads = [[rng.normal(0, s, w.shape) for w, s in zip(weights, (1.0, 0.1, 0.5, 0.01))] for _ in range(steps)]
    return weights, grads


def test_lamb_matches_published_rule_over_several_steps():
    weights, grads = _problem()
    wd = [0.01, 0.0, 0.0, 0.01]
    hp = dict(lr=0.01, eps=1e-6, wd=wd)
    ours, our_ratios = _run_lamb(weights, grads, hp["lr"], (0.9, 0.999), hp["eps"], wd, max_trust=None, min_trust=None)
    ref, ref_ratios = numpy_lamb(weights, grads, hp["lr"], 0.9, 0.999, hp["eps"], wd)
    for step, (a, b) in enumerate(zip(ours, ref)):
        for i, (x, y) in enumerate(zip(a, b)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=f"step {step + 1} tensor {i}")
    np.testing.assert_allclose(our_ratios, ref_ratios, rtol=1e-5)
    # The trust ratio really acts: it is far from 1 for some tensors (else this is just Adam).
    assert max(ref_ratios) > 5 or min(ref_ratios) < 0.2
    # The weights moved by much more than float32 noise.
    assert np.abs(ref[-1][0] - weights[0]).max() > 1e-3


def test_lamb_trust_clamp_matches_reference():
    weights, grads = _problem(seed=1, steps=4)
    wd = [0.01, 0.0, 0.0, 0.01]
    ours, our_ratios = _run_lamb(weights, grads, 0.005, (0.9, 0.99), 1e-6, wd, max_trust=2.0, min_trust=0.05)
    ref, ref_ratios = numpy_lamb(weights, grads, 0.005, 0.9, 0.99, 1e-6, wd, max_trust=2.0, min_trust=0.05)
    for a, b in zip(ours, ref):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(our_ratios, ref_ratios, rtol=1e-5)
    assert 2.0 in [round(r, 6) for r in ref_ratios]  # the clamp was hit


def test_lamb_zero_gradient_and_zero_weight_guards():
    p = nn.Parameter(torch.zeros(3))
    opt = Lamb([p], lr=0.1, weight_decay=0.0, max_trust=None, min_trust=None)
    p.grad = torch.zeros(3)
    opt.step()
    assert torch.equal(p.detach(), torch.zeros(3))  # ||u|| = 0: no NaN, no move
    p.grad = torch.tensor([1.0, -2.0, 0.0])
    opt.step()
    assert torch.isfinite(p).all()
    assert float(opt.state[p]["last_trust_ratio"]) == 1.0  # ||w|| = 0: ratio falls back to 1


def test_lamb_state_dict_resume_is_exact():
    weights, grads = _problem(seed=2, steps=4)
    wd = [0.01, 0.0, 0.0, 0.01]
    full, _ = _run_lamb(weights, grads, 0.01, (0.9, 0.999), 1e-6, wd)

    params = [nn.Parameter(torch.tensor(x, dtype=torch.float32)) for x in weights]
    opt = Lamb([{"params": [p], "weight_decay": d} for p, d in zip(params, wd)], lr=0.01)
    for grads_t in grads[:2]:
        for p, g in zip(params, grads_t):
            p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
    saved = {"opt": opt.state_dict(), "w": [p.detach().clone() for p in params]}
    params2 = [nn.Parameter(w) for w in saved["w"]]
    opt2 = Lamb([{"params": [p], "weight_decay": d} for p, d in zip(params2, wd)], lr=0.01)
    opt2.load_state_dict(saved["opt"])
    for grads_t in grads[2:]:
        for p, g in zip(params2, grads_t):
            p.grad = torch.tensor(g, dtype=torch.float32)
        opt2.step()
    for x, y in zip(params2, full[-1]):
        assert np.array_equal(x.detach().numpy(), y.astype(np.float32))


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.dense = nn.Linear(4, 4)
        self.LayerNorm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied, as the MLM decoder


def test_param_groups_exclude_bias_and_layernorm_from_decay():
    groups = param_groups(_Tiny(), weight_decay=0.01)
    by_decay = {g["weight_decay"]: g["names"] for g in groups}
    assert sorted(by_decay[0.01]) == ["dense.weight", "emb.weight"]  # tied weight once
    assert sorted(by_decay[0.0]) == ["LayerNorm.bias", "LayerNorm.weight", "dense.bias"]


def test_param_groups_on_the_bert_model():
    from pretrain.model import BertConfig, BertForPreTraining

    model = BertForPreTraining(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=32))
    groups = param_groups(model, 0.01)
    decay = set(groups[0]["names"])
    no_decay = set(groups[1]["names"])
    assert "cls.predictions.bias" in no_decay
    assert "bert.encoder.layer.0.attention.output.LayerNorm.weight" in no_decay
    assert "bert.encoder.layer.0.intermediate.dense.weight" in decay
    assert "bert.embeddings.word_embeddings.weight" in decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_build_optimizer_kinds_and_errors():
    model = _Tiny()
    assert isinstance(build_optimizer(model, "lamb", lr=1e-3), Lamb)
    adamw = build_optimizer(model, "AdamW", lr=1e-3, weight_decay=0.02)
    assert isinstance(adamw, torch.optim.AdamW)
    assert sorted(g["weight_decay"] for g in adamw.param_groups) == [0.0, 0.02]
    with pytest.raises(OptimizerConfigError, match="--optimizer 'sgd'.*'lamb' or 'adamw'"):
        build_optimizer(model, "sgd")


def test_schedule_hand_computed_values():
    # warm-up 4 steps (peak at step 3, used once), then linear decay over the 7 steps to 0 at 10
    expected = {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 4: 6 / 7, 5: 5 / 7, 7: 3 / 7, 9: 1 / 7, 10: 0.0, 12: 0.0}
    for step, value in expected.items():
        assert math.isclose(warmup_poly_decay(step, 4, 10), value, abs_tol=1e-12), step
    # polynomial power 2 with a floor of 10%: at step 7, remaining = 3/7 -> 0.1 + 0.9 * 9/49
    assert math.isclose(warmup_poly_decay(7, 4, 10, power=2.0, min_lr_ratio=0.1), 0.1 + 0.9 * 9 / 49)
    assert math.isclose(warmup_poly_decay(10, 4, 10, power=2.0, min_lr_ratio=0.1), 0.1)
    # no warm-up (and a 1-step warm-up, which is the same thing)
    for warmup in (0, 1):
        assert warmup_poly_decay(0, warmup, 10) == 1.0
        assert math.isclose(warmup_poly_decay(5, warmup, 10), 0.5)
    # the peak lr is used by exactly one update, whatever the warm-up length
    for warmup in (1, 2, 5, 10):
        values = [warmup_poly_decay(s, warmup, 10) for s in range(11)]
        assert values.count(1.0) == 1, (warmup, values)


def test_scheduler_drives_optimizer_lr():
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=6)
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(seen, [0.05, 0.1, 0.08, 0.06, 0.04, 0.02, 0.0], atol=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(warmup_steps=11, total_steps=10), "--warmup_steps 11"),
    (dict(warmup_steps=1, total_steps=0), "total steps"),
    (dict(warmup_steps=1, total_steps=10, power=0), "power"),
])
def test_scheduler_rejects_bad_settings(kwargs, match):
    opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(OptimizerConfigError, match=match):
        build_scheduler(opt, **kwargs)


def test_lamb_refused_under_zero3():
    from pretrain.optim import check_optimizer_for_zero

    for stage in (0, 1, 2):
        check_optimizer_for_zero("lamb", stage)
    check_optimizer_for_zero("adamw", 3)
    with pytest.raises(OptimizerConfigError, match='stage 3.*"stage": 2.*--optimizer adamw'):
        check_optimizer_for_zero("LAMB", 3)


def test_lamb_step_refuses_a_flattened_group():
    # What DeepSpeed ZeRO does to a client optimizer: one flat tensor replaces the group's params.
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = Lamb([a, b], lr=0.1)
    flat = nn.Parameter(torch.ones(5))
    flat.grad = torch.ones(5)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="attach_zero_partitions"):
        opt.step()


def test_lamb_rejects_min_trust_above_max_trust():
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(OptimizerConfigError, match=r"min_trust \(5.0\) must be <= max_trust \(2.0\)"):
        Lamb([p], max_trust=2.0, min_trust=5.0)
    Lamb([p], max_trust=2.0, min_trust=2.0)  # equal bounds: a fixed ratio, allowed
    Lamb([p], max_trust=None, min_trust=5.0)  # one side open


def test_lamb_without_bias_correction_keeps_the_moments():
    # The update is recomputed from the moments in a second pass: it must not modify them.
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = Lamb([p], lr=0.1, bias_correction=False)
    p.grad = torch.tensor([0.5, 0.25, -1.0])
    opt.step()
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], 0.001 * p.grad ** 2, rtol=0, atol=0)
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.1 * p.grad, rtol=0, atol=0)
