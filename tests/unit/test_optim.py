"""LAMB (both variants) against NumPy transcriptions of the published update rules; schedule
against hand values."""

import json
import logging
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from pretrain import optim
from pretrain.optim import (
    Lamb,
    OptimizerConfigError,
    build_optimizer,
    build_scheduler,
    lamb_kwargs_from_ds_params,
    param_groups,
    warmup_poly_decay,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def clamped_rule(max_trust=None, min_trust=None):
    """DeepSpeed FusedLamb: every tensor takes the ratio, clamped to [min_trust, max_trust]."""
    def rule(ratio, decay):
        if max_trust is not None:
            ratio = min(ratio, max_trust)
        if min_trust is not None:
            ratio = max(ratio, min_trust)
        return ratio
    return rule


def nvidia_rule(ratio, decay):
    """apex FusedLAMB (csrc/multi_tensor_lamb.cu stage 2, use_nvlamb=False): the unclamped ratio
    only where the tensor's group decays, else 1."""
    return ratio if decay != 0 else 1.0


def numpy_lamb(weights, grads_per_step, lr, b1, b2, eps, wd, rule=clamped_rule()):
    """Algorithm 2 of You et al. 2019 (LAMB), per tensor, in float64 NumPy, with bias correction
    and decoupled decay (apex's adam_w_mode=True, grad_averaging=True; gradients already clipped):
    u = m_hat / (sqrt(v_hat) + eps) + wd[i] * w, r = ||w|| / ||u|| (1 when either is 0), then
    `rule(r, wd[i])` (clamped_rule(...) or nvidia_rule), w -= lr * r * u.

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
            u = m_hat / (np.sqrt(v_hat) + eps) + wd[i] * w[i]
            w_norm, u_norm = np.linalg.norm(w[i]), np.linalg.norm(u)
            trust = rule(w_norm / u_norm if (w_norm > 0 and u_norm > 0) else 1.0, wd[i])
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
    ref, ref_ratios = numpy_lamb(weights, grads, 0.005, 0.9, 0.99, 1e-6, wd, rule=clamped_rule(max_trust=2.0, min_trust=0.05))
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


def test_schedule_peak_step_starts_the_decay_later():
    # fine-tuning's variant: warm-up 3, decay from step 3 (not 2), so steps 2 and 3 both use the peak
    expected = [1 / 3, 2 / 3, 1.0, 1.0, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0.0, 0.0]
    for step, value in enumerate(expected):
        assert math.isclose(warmup_poly_decay(step, 3, 10, peak_step=3), value, abs_tol=1e-12), step
    # with no warm-up both variants decay from step 0
    assert [warmup_poly_decay(s, 0, 10, peak_step=0) for s in range(11)] == \
        [warmup_poly_decay(s, 0, 10) for s in range(11)]


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


# ----------------------------------------------------------------------------------------------
# NVIDIA's variant (apex FusedLAMB as DeepLearningExamples' BERT uses it)


class _TwoGroupNet(nn.Module):
    """Decayed weights (one large, one zero-initialised) and no-decay biases/LayerNorm (one zero)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.dense = nn.Linear(6, 8)
        self.LayerNorm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)
        self.gate = nn.Linear(6, 3, bias=False)
        with torch.no_grad():
            self.dense.weight.copy_(torch.randn(8, 6, generator=g) * 15.0)  # ||w|| >> ||u||: r > 10
            self.dense.bias.copy_(torch.randn(8, generator=g) * 0.02)  # small: r << 1 if it were applied
            self.out.weight.copy_(torch.randn(3, 8, generator=g) * 0.3)
            self.out.bias.zero_()  # ||w|| = 0
            self.gate.weight.zero_()  # ||w|| = 0 in the decay group: the guard, not the group rule

    def forward(self, x):
        return self.out(torch.tanh(self.LayerNorm(self.dense(x)))) + self.gate(x)


def _train_two_group_net(steps, **opt_kwargs):
    """Steps of build_optimizer's LAMB on _TwoGroupNet; the gradients each step saw (for a
    reference), the weights before/after every step, and the last trust ratios, by name."""
    model = _TwoGroupNet()
    opt = build_optimizer(model, "lamb", **opt_kwargs)
    names = [n for n, _ in model.named_parameters()]
    start = [p.detach().double().numpy().copy() for p in model.parameters()]
    g = torch.Generator().manual_seed(1)
    grads, history = [], []
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        grads.append([p.grad.double().numpy().copy() for p in model.parameters()])
        opt.step()
        history.append([p.detach().double().numpy().copy() for p in model.parameters()])
    ratios = {n: float(opt.state[p]["last_trust_ratio"]) for n, p in zip(names, model.parameters())}
    return names, start, grads, history, ratios, opt


def test_nvidia_lamb_matches_apex_rule_over_several_steps():
    lr, wd = 0.02, 0.01
    names, start, grads, ours, our_ratios, opt = _train_two_group_net(5, lr=lr, weight_decay=wd, variant="nvidia")
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, wd]  # two groups, as the trainer builds
    # The groups of NVIDIA's recipe, decided here from the names (bias / LayerNorm: no decay).
    decay = [0.0 if (n.endswith("bias") or n.startswith("LayerNorm")) else wd for n in names]
    ref, ref_ratios = numpy_lamb(start, grads, lr, 0.9, 0.999, 1e-6, decay, rule=nvidia_rule)
    for step, (a, b) in enumerate(zip(ours, ref)):
        for n, x, y in zip(names, a, b):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=f"step {step + 1} {n}")
    np.testing.assert_allclose([our_ratios[n] for n in names], ref_ratios, rtol=1e-5)
    by_name = dict(zip(names, ref_ratios))
    assert by_name["dense.weight"] > 10  # unclamped: the clamped variant would cap it at 10
    assert by_name["out.weight"] != 1.0
    assert by_name["dense.bias"] == by_name["LayerNorm.weight"] == by_name["out.bias"] == 1.0
    assert np.abs(ref[-1][names.index("out.bias")]).max() > 1e-3  # the zero bias moved (plain Adam)
    # gate.weight started at 0, so step 1 fell back to r = 1 and it moved by lr * u.
    assert np.abs(ref[0][names.index("gate.weight")]).max() > 0.5 * lr


def test_nvidia_lamb_differs_from_clamped_where_it_should():
    lr = 0.02
    names, start, grads, hist_nv, ratios_nv, _ = _train_two_group_net(1, lr=lr, weight_decay=0.01, variant="nvidia")
    _, _, _, hist_cl, ratios_cl, _ = _train_two_group_net(1, lr=lr, weight_decay=0.01)  # clamped, [0.01, 10]
    i = names.index("dense.bias")
    # Step 1 with bias correction: m_hat = g, v_hat = g^2, so a no-decay tensor takes exactly the
    # Adam step -lr * g / (|g| + eps) (computed here in float32, as the optimizer does).
    g32 = torch.tensor(grads[0][i], dtype=torch.float32)
    expected = (torch.tensor(start[i], dtype=torch.float32) - lr * g32 / (g32.abs() + 1e-6)).double().numpy()
    np.testing.assert_allclose(hist_nv[0][i], expected, rtol=1e-6, atol=1e-7)
    assert ratios_nv["dense.bias"] == 1.0
    # The clamped variant scales the same tensor by its (small) ratio instead.
    assert ratios_cl["dense.bias"] < 0.1
    assert np.abs(hist_cl[0][i] - start[i]).max() < 0.1 * np.abs(hist_nv[0][i] - start[i]).max()
    # ... and caps the large weight's ratio, which the nvidia variant leaves as it is.
    assert ratios_cl["dense.weight"] == 10.0 < ratios_nv["dense.weight"]


def test_build_optimizer_keeps_fused_lamb_for_the_clamped_variant_only(monkeypatch):
    fused = object()
    monkeypatch.setattr(optim, "_fused_lamb", lambda *a, **k: fused)
    model = _TwoGroupNet()
    assert build_optimizer(model, "lamb", device="cuda", zero_stage=0) is fused
    opt = build_optimizer(model, "lamb", device="cuda", zero_stage=0, variant="nvidia")
    assert isinstance(opt, Lamb)
    assert {g["variant"] for g in opt.param_groups} == {"nvidia"}
    assert {(g["min_trust"], g["max_trust"]) for g in opt.param_groups} == {(None, None)}


def test_lamb_variant_errors():
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(OptimizerConfigError, match=r"variant 'apex' is unknown; use one of \['clamped', 'nvidia'\]"):
        Lamb([p], variant="apex")
    with pytest.raises(OptimizerConfigError, match="unknown"):
        Lamb([{"params": [p], "variant": "NVIDIA"}])  # a group's own variant is checked too
    with pytest.raises(OptimizerConfigError, match=r"'nvidia' does not clamp.*'max_trust': 10.0.*variant 'clamped'"):
        Lamb([p], variant="nvidia", max_trust=10.0)
    with pytest.raises(OptimizerConfigError, match="'min_trust': 0.01"):
        build_optimizer(_TwoGroupNet(), "lamb", variant="nvidia", min_trust=0.01)
    Lamb([p], variant="nvidia", max_trust=None, min_trust=None)  # "no bound" is what nvidia does


def test_lamb_checkpoint_keeps_the_configured_variant(caplog):
    # A checkpoint from before variants (no "variant" key: it was clamped) resumes with the
    # variant and bounds of the optimizer built from the job's config, and says so.
    w = nn.Parameter(torch.ones(3))
    old = Lamb([w], lr=0.1)
    w.grad = torch.ones(3)
    old.step()
    saved = old.state_dict()
    for g in saved["param_groups"]:
        del g["variant"]
    new = Lamb([w], lr=0.1, variant="nvidia")
    with caplog.at_level(logging.WARNING, logger="pretrain.optim"):
        new.load_state_dict(saved)
    assert (new.param_groups[0]["variant"], new.param_groups[0]["max_trust"]) == ("nvidia", None)
    assert new.state[w]["step"] == 1  # the moments did load
    assert "'variant': 'clamped'" in caplog.text and "'variant': 'nvidia'" in caplog.text


def test_lamb_kwargs_from_the_shipped_phase_config():
    with open(os.path.join(REPO, "configs", "zero2_lamb.json")) as f:
        params = json.load(f)["optimizer"]["params"]
    kwargs = lamb_kwargs_from_ds_params(params, "--ds_config configs/zero2_lamb.json optimizer.params")
    assert kwargs == dict(lr=0.006, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, variant="nvidia")
    opt = build_optimizer(_TwoGroupNet(), "lamb", **kwargs)
    assert isinstance(opt, Lamb) and {g["variant"] for g in opt.param_groups} == {"nvidia"}
    # The clamped variant with DeepSpeed's names; null disables a bound.
    clamped = lamb_kwargs_from_ds_params({"lr": 1e-3, "max_coeff": 5, "min_coeff": None})
    assert clamped == dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, variant="clamped",
                           max_trust=5.0, min_trust=None)
    assert build_optimizer(_TwoGroupNet(), "lamb", **clamped).param_groups[0]["max_trust"] == 5.0


@pytest.mark.parametrize("params,match", [
    ({"lr": 1e-3, "max_grad_norm": 1.0},
     r"FLAG: unknown LAMB parameter\(s\) \['max_grad_norm'\].*gradient_clipping"
     r".*\['betas', 'eps', 'lr', 'max_coeff', 'min_coeff', 'variant', 'weight_decay'\]"),
    ({"lr": 1e-3, "variant": "nvidia", "max_coeff": 10.0},
     r"FLAG: \['max_coeff'\] clamp.*'nvidia'.*\"variant\": \"clamped\""),
    ({"lr": 1e-3, "variant": "apex"}, r"FLAG: LAMB variant 'apex' is unknown"),
    ({"lr": 1e-3, "betas": [0.9]}, r"FLAG: \"betas\" must be two numbers"),
    ({"lr": "fast"}, r"FLAG: \"lr\" must be a number"),
    ({"betas": [0.9, 0.999]}, r"FLAG: LAMB needs \"lr\""),
    ({"lr": 1e-3, "max_coeff": 1.0, "min_coeff": 2.0}, r"FLAG: LAMB min_trust \(2.0\) must be <= max_trust"),
])
def test_lamb_kwargs_from_ds_params_rejects_bad_blocks(params, match):
    with pytest.raises(OptimizerConfigError, match=match):
        lamb_kwargs_from_ds_params(params, "FLAG")


def test_oracle_schedule_equals_the_trainers():
    # benchmarks/pretrain_oracle.py writes the schedule from its definition; both must give the
    # same lr for every update, or the oracle would not be comparing like with like.
    from tests._bench import load_benchmark

    schedule = load_benchmark("pretrain_oracle").schedule

    for total, warmup, power in ((600, 60, 0.5), (1500, 90, 0.5), (10, 0, 1.0), (10, 1, 2.0), (7, 7, 0.5)):
        for step in range(total + 1):
            assert math.isclose(schedule(step, total, warmup, "poly", power),
                                warmup_poly_decay(step, warmup, total, power), abs_tol=1e-12), (total, warmup, step)
