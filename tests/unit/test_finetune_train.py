"""The fine-tuning loop: pretraining's no-decay groups and its warm-up/decay (with the decay one
update later), checked against hand-computed values; mixed precision against fp32; gradient
accumulation against one step on the whole batch, written out here; progress bars."""
import io
import logging
import math
import sys

import pytest
import torch

from finetune.modeling import BertForSequenceClassification
from finetune.train import TrainConfig, train
from pretrain.model import BertConfig
from tests._weights import assert_weights_close

TINY = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=32)


def _features(n):
    return [{"input_ids": [2 + i % 7, 3, 4 + i % 5], "token_type_ids": [0, 0, 0], "attention_mask": [1, 1, 1],
             "labels": i % 2} for i in range(n)]


def test_lr_per_update_and_decay_groups(monkeypatch):
    seen = []
    step = torch.optim.AdamW.step

    def record(opt, *args, **kw):
        seen.append([(g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups])
        return step(opt, *args, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    torch.manual_seed(0)
    model = BertForSequenceClassification(TINY, 2)
    cfg = TrainConfig(learning_rate=1e-3, max_steps=10, batch_size=4, warmup_ratio=0.3, weight_decay=0.05)
    model_out, stats = train(model, _features(12), cfg, seed=1)
    assert model_out is model and stats["steps"] == 10 and len(stats["step_losses"]) == 10
    # warm-up over int(0.3 x 10) = 3 updates, the peak used by updates 3 and 4, then linear to 0 at 10
    expected = [1 / 3, 2 / 3, 1, 1, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7]
    assert [s[0][0] for s in seen] == pytest.approx([1e-3 * m for m in expected], abs=1e-15)
    names = dict(model.named_parameters())
    no_decay = [n for n in names if n.endswith("bias") or "LayerNorm" in n]
    assert seen[0][0][1:] == (0.05, len(names) - len(no_decay)) and seen[0][1][1:] == (0.0, len(no_decay))
    assert not math.isnan(stats["final_loss"])


# --- mixed precision, gradient accumulation, progress bars -----------------------------------

NO_DROPOUT = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)


def _token_features(n):
    """Sentences of 3..9 tokens with 1..7 labelled ones (the rest -100): micro-batches and
    processes hold very different numbers of loss terms."""
    out = []
    for i in range(n):
        length = 3 + (i * 5) % 7
        labelled = 1 + (i * 3) % (length - 1)
        ids = [2 + (i * 7 + j * 3) % 45 for j in range(length)]
        labels = [(i + j) % 3 if j < labelled else -100 for j in range(length)]
        out.append({"input_ids": ids, "token_type_ids": [0] * length, "attention_mask": [1] * length,
                    "labels": labels})
    return out


def _model(kind, seed=0):
    from finetune.modeling import BertForTokenClassification

    torch.manual_seed(seed)
    if kind == "token":
        return BertForTokenClassification(NO_DROPOUT, 3)
    return BertForSequenceClassification(NO_DROPOUT, 2)


def _data(kind, n):
    return _token_features(n) if kind == "token" else _features(n)


def _dtype_of(module, store):
    return module.register_forward_hook(lambda m, i, o: store.append(o.dtype))


def test_bf16_autocast_trains_close_to_fp32_with_fp32_master_weights():
    # label = whether the first token is one of five: learnable in a few steps
    feats = [{"input_ids": [5 + i % 10, 3, 4 + i % 3], "token_type_ids": [0] * 3, "attention_mask": [1] * 3,
              "labels": int(i % 10 >= 5)} for i in range(32)]
    cfg = dict(learning_rate=1e-2, max_steps=20, batch_size=8, warmup_ratio=0.1, log_every=1)
    fp32, s32 = train(_model("classify"), feats, TrainConfig(precision="fp32", **cfg), seed=1)
    model = _model("classify")
    seen = []
    hook = _dtype_of(model.classifier, seen)
    bf16, s16 = train(model, feats, TrainConfig(precision="bf16", **cfg), seed=1)
    assert s16["train_precision"] == "bf16" and s32["train_precision"] == "fp32"
    assert set(seen) == {torch.bfloat16}  # the forward pass ran under autocast
    assert all(p.dtype == torch.float32 for p in bf16.parameters())  # master weights
    assert s32["step_losses"][-1] < s32["step_losses"][0] / 2  # a real trajectory to follow
    diffs = [abs(a - b) for a, b in zip(s16["step_losses"], s32["step_losses"])]
    assert 0 < max(diffs) < 0.02, diffs  # bf16 rounding (~3 significant digits), not another run
    seen.clear()
    from finetune.train import predict

    out16 = predict(bf16, feats, 16, precision="bf16", progress=False)
    assert set(seen) == {torch.bfloat16}
    hook.remove()
    out32 = predict(bf16, feats, 16, precision="fp32", progress=False)
    assert max(float(abs(a - b).max()) for a, b in zip(out16, out32)) < 0.05


def test_fp16_scaler_skips_the_update_whose_gradient_overflows(monkeypatch):
    steps = []
    adamw_step = torch.optim.AdamW.step

    def record(opt, *args, **kw):
        # Count the updates that changed the weights (the fused AdamW may be called for a skipped
        # update too, with GradScaler's inf flag, and then leaves every weight as it was).
        weight = opt.param_groups[0]["params"][0]
        before = weight.detach().clone()
        out = adamw_step(opt, *args, **kw)
        if not torch.equal(before, weight.detach()):
            steps.append(opt.param_groups[0]["lr"])
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    model = _model("classify")
    seen, calls = [], []
    _dtype_of(model.classifier, seen)

    def poison(grad):  # the third backward's gradient overflows (as an fp16 overflow would)
        calls.append(1)
        return torch.full_like(grad, float("inf")) if len(calls) == 3 else grad

    model.classifier.weight.register_hook(poison)
    cfg = TrainConfig(learning_rate=1e-3, max_steps=6, batch_size=4, warmup_ratio=0.5, precision="fp16", log_every=1)
    model, stats = train(model, _features(24), cfg, seed=1)
    assert set(seen) == {torch.float16}
    assert stats["train_precision"] == "fp16" and stats["skipped_steps"] == 1 and stats["steps"] == 6
    # 5 updates reached AdamW; the schedule stood still over the skipped one (warm-up 3: 1/3, 2/3, -, 1, ...)
    assert len(steps) == 5
    assert steps[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_auto_precision_follows_native_bf16(monkeypatch):
    from finetune.train import resolve_precision
    from pretrain import precision as prec

    # an AVX2-only CPU as oneDNN sees it: bf16 would be emulated, ~17x slower than fp32
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("BERT_CPU_BF16", raising=False)
    assert resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda *a, **k: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    model, stats = train(_model("classify"), _features(8), TrainConfig(max_steps=2, batch_size=4), seed=1)
    assert stats["train_precision"] == "fp32"
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda *a, **k: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(prec, "cuda_capability", lambda: (8, 0))
    assert resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(prec, "cuda_capability", lambda: (7, 0))
    assert resolve_precision("auto", "cuda") == "fp16"
    from finetune.readers import InputError

    with pytest.raises(InputError, match="--precision"):
        train(_model("classify"), _features(8), TrainConfig(max_steps=1, precision="fp8"), seed=1)


def _grads_at_step(monkeypatch):
    grads = []
    adamw_step = torch.optim.AdamW.step

    def record(opt, *args, **kw):
        grads.append({id(p): p.grad.clone() for g in opt.param_groups for p in g["params"]})
        return adamw_step(opt, *args, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    return grads


def _assert_same_weights(a, b):
    assert_weights_close(dict(a.named_parameters()), dict(b.named_parameters()), atol=1e-6, key_bias_atol=1e-4,
                         rtol=1e-5)


@pytest.mark.parametrize("kind", ["classify", "token"])
def test_accumulated_update_equals_one_step_on_the_whole_batch(kind, monkeypatch):
    from finetune.train import collate

    feats = _data(kind, 12)
    # reference, written out here: the head's mean loss over all 12 examples in one forward
    ref = _model(kind)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.0)
    loss, _ = ref(**collate(feats))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    ref_grads = [p.grad.clone() for p in ref.parameters()]
    opt.step()

    grads = _grads_at_step(monkeypatch)
    cfg = TrainConfig(learning_rate=1e-3, max_steps=1, batch_size=3, gradient_accumulation_steps=4,
                      warmup_ratio=0.0, weight_decay=0.0, precision="fp32")
    model, stats = train(_model(kind), feats, cfg, seed=1)
    assert stats["step_losses"][0] == pytest.approx(loss.item(), abs=1e-6)
    for (name, p), g in zip(model.named_parameters(), ref_grads):
        assert torch.allclose(grads[0][id(p)], g, atol=1e-7, rtol=1e-5), name
    _assert_same_weights(model, ref)


@pytest.mark.parametrize("kind", ["classify", "token"])
def test_accumulation_counts_updates_and_matches_the_large_batch(kind):
    feats = _data(kind, 13)
    # weights compared to 1e-6 need the same micro-batch shapes: length grouping reorders the examples
    # inside an update, and on AVX2 kernels the other rounding, scaled up by Adam on parameters whose
    # gradient is ~0, moved a key weight by more (native-bf16 CPUs passed); grouped runs compare losses
    base = dict(learning_rate=1e-3, epochs=2, warmup_ratio=0.2, log_every=1, precision="fp32")
    runs = {}
    for grouped in (False, True):
        cfg = dict(base, group_by_length=grouped)
        big, s_big = train(_model(kind), feats, TrainConfig(batch_size=6, **cfg), seed=4)
        acc, s_acc = train(_model(kind), feats, TrainConfig(batch_size=2, gradient_accumulation_steps=3, **cfg), seed=4)
        # 13 examples, 6 per update: 3 updates per epoch (the last one of 1 example, split 1/0/0)
        assert s_big["steps"] == s_acc["steps"] == 6
        assert s_acc["step_losses"] == pytest.approx(s_big["step_losses"], abs=1e-6 if not grouped else 1e-5)
        assert len(set(round(x, 3) for x in s_acc["step_losses"])) > 3
        runs[grouped] = (acc, big)
    _assert_same_weights(*runs[False])


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_on_a_terminal_only(monkeypatch, caplog):
    from finetune.train import predict

    cfg = TrainConfig(max_steps=5, batch_size=4, log_every=5, precision="fp32")
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    with caplog.at_level(logging.INFO, logger="finetune.train"):
        model, _ = train(_model("classify"), _features(12), cfg, seed=1)
    predict(model, _features(10), 4)
    assert "train" in term.getvalue() and "5/5" in term.getvalue()
    assert "eval" in term.getvalue() and "3/3" in term.getvalue()
    assert any("step 5/5 loss" in r.getMessage() for r in caplog.records)  # the log line stays

    for stream, progress in ((io.StringIO(), True), (_Terminal(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        train(_model("classify"), _features(12), TrainConfig(max_steps=2, batch_size=4, progress=progress,
                                                             precision="fp32"), seed=1)
        predict(model, _features(10), 4, progress=progress)
        assert stream.getvalue() == ""


def test_deepspeed_config_takes_accumulation_and_precision_from_the_loop(tmp_path, monkeypatch):
    import json
    import os

    from finetune.train import deepspeed_config

    monkeypatch.setenv("BERT_CPU_BF16", "native")
    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "ds_finetune.json")
    ds = deepspeed_config(path, TrainConfig(batch_size=4, gradient_accumulation_steps=3), 2, "cpu")
    sizes = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert sizes == (4, 3, 24)
    assert ds["bf16"]["enabled"] is False  # auto: the file's own choice (fp32)
    ds = deepspeed_config(path, TrainConfig(batch_size=4, precision="bf16"), 1, "cpu")
    assert ds["bf16"]["enabled"] is True and ds["gradient_accumulation_steps"] == 1  # an explicit flag wins
    with open(path) as f:
        raw = json.load(f)
    for extra, needle in (({"gradient_accumulation_steps": 2}, "--gradient-accumulation-steps 3"),
                          ({"train_batch_size": 8}, "--gradient-accumulation-steps 3 x 2 processes")):
        bad = tmp_path / "ds.json"
        bad.write_text(json.dumps({**raw, **extra}))
        with pytest.raises(ValueError, match=needle):
            deepspeed_config(str(bad), TrainConfig(batch_size=4, gradient_accumulation_steps=3), 2, "cpu")
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({**raw, "gradient_accumulation_steps": 3, "train_batch_size": 24}))
    ds = deepspeed_config(str(ok), TrainConfig(batch_size=4, gradient_accumulation_steps=3), 2, "cpu")
    assert ds["train_batch_size"] == 24


def test_plain_loop_uses_fused_adamw_with_the_same_update_as_foreach():
    """Our loop's AdamW is torch's fused kernel on CPU (as transformers' Trainer's default); its
    update equals the foreach kernel's on the same gradients."""
    from finetune.train import _PlainStep

    torch.manual_seed(0)
    model = BertForSequenceClassification(TINY, 2)
    twin = BertForSequenceClassification(TINY, 2)
    twin.load_state_dict(model.state_dict())
    model.eval(), twin.eval()  # no dropout: the two forwards must see the same network
    cfg = TrainConfig(learning_rate=1e-2, max_steps=3, warmup_ratio=0.0, precision="fp32")
    step = _PlainStep(model, cfg, total=3)
    assert all(g.get("fused") for g in step.opt.param_groups)
    from pretrain.optim import optimizer_groups
    ref = torch.optim.AdamW(optimizer_groups(twin, cfg.weight_decay), lr=cfg.learning_rate, foreach=True)
    batch = {"input_ids": torch.tensor([[2, 5, 3], [2, 7, 3]]), "token_type_ids": torch.zeros(2, 3, dtype=torch.long),
             "attention_mask": torch.ones(2, 3, dtype=torch.long), "labels": torch.tensor([0, 1])}
    for _ in range(3):
        for g, r in zip(step.opt.param_groups, ref.param_groups):
            r["lr"] = g["lr"]  # the loop's schedule for this update
        step.backward(model(**batch)[0], 1.0)
        step.step()
        twin(**batch)[0].backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), cfg.max_grad_norm)
        ref.step()
        ref.zero_grad(set_to_none=True)
    compared = assert_weights_close(dict(model.named_parameters()), dict(twin.named_parameters()), atol=1e-6,
                                    key_bias_atol=None, rtol=1e-5)
    assert compared > 10
