"""Precision that fits the hardware: the detector, the ds_config resolution, and the one warning.

The detector's answer is forced with BERT_CPU_BF16 (and ONEDNN_MAX_CPU_ISA, as oneDNN itself reads
it), so both kinds of CPU are tested on either kind of machine."""
import json
import os

import pytest

from pretrain import precision as prec
from pretrain.config import ConfigError, load_config, validate
from tests.distributed.test_zero import tiny_data, tiny_model_config  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs")


def test_cpu_bf16_detector_reads_flags_and_overrides():
    assert prec.cpu_has_native_bf16({"avx2", "avx512f", "avx512_bf16"}, env={})
    assert prec.cpu_has_native_bf16({"avx2", "amx_bf16", "amx_tile"}, env={})
    assert not prec.cpu_has_native_bf16({"avx2", "fma", "avx512f"}, env={})  # AMD EPYC (Zen 2/3), AVX2/AVX512 without BF16
    # oneDNN capped below the bf16 ISA cannot use the instructions even where the CPU has them
    assert not prec.cpu_has_native_bf16({"avx512_bf16"}, env={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert prec.cpu_has_native_bf16({"avx512_bf16"}, env={"ONEDNN_MAX_CPU_ISA": "avx512_core_amx"})
    assert prec.cpu_has_native_bf16(set(), env={"BERT_CPU_BF16": "native"})
    assert not prec.cpu_has_native_bf16({"amx_bf16"}, env={"BERT_CPU_BF16": "emulated"})
    with pytest.raises(ValueError, match="use 'native' or 'emulated'"):
        prec.cpu_has_native_bf16(set(), env={"BERT_CPU_BF16": "yes"})


def test_cpuinfo_parsing(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse2 avx2 fma\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n")
    assert prec.cpu_flags(str(info)) == {"fpu", "sse2", "avx2", "fma"}
    assert prec.cpu_model_name(str(info)) == "AMD EPYC 7B12"
    assert prec.cpu_flags(str(tmp_path / "missing")) == set()


def test_native_precision_per_device():
    assert prec.native_precision("cuda", capability=(9, 0)) == "bf16"  # H100
    assert prec.native_precision("cuda", capability=(8, 0)) == "bf16"  # A100
    assert prec.native_precision("cuda", capability=(7, 0)) == "fp16"  # V100: fp16 + dynamic loss scaling
    assert prec.native_precision("cuda", capability=(7, 5)) == "fp16"  # T4
    assert prec.native_precision("cpu", cpu_bf16=True) == "bf16"
    assert prec.native_precision("cpu", cpu_bf16=False) == "fp32"


def test_ds_config_requests():
    def load(name):
        with open(os.path.join(CONFIGS, name)) as f:
            return json.load(f)

    for name in ("zero1.json", "zero2.json", "zero3.json"):
        assert prec.requested_precision(load(name)) == "auto", name  # the shipped defaults follow the hardware
    assert prec.requested_precision(load("zero2_fp16.json")) == "fp16"
    assert prec.requested_precision({"bf16": {"enabled": True}}) == "bf16"
    assert prec.requested_precision({}) == "fp32"
    with pytest.raises(ValueError, match="not both"):
        prec.requested_precision({"bf16": {"enabled": True}, "fp16": {"enabled": True}})
    with pytest.raises(ValueError, match="must be true, false or \"auto\""):
        prec.requested_precision({"bf16": {"enabled": "yes"}})

    fp16 = prec.apply_precision(load("zero2.json"), "fp16")
    assert fp16["bf16"]["enabled"] is False and fp16["fp16"]["enabled"] is True
    assert fp16["fp16"]["loss_scale"] == 0 and fp16["fp16"]["initial_scale_power"] == 16  # dynamic scaling
    kept = prec.apply_precision({"fp16": {"enabled": "auto", "initial_scale_power": 12}}, "fp16")
    assert kept["fp16"]["initial_scale_power"] == 12 and kept["fp16"]["loss_scale"] == 0
    fp32 = prec.apply_precision(load("zero2_fp16.json"), "fp32")
    assert fp32["bf16"]["enabled"] is False and fp32["fp16"]["enabled"] is False


def test_resolve_warns_once_for_emulated_bf16_and_refuses_cpu_fp16(monkeypatch):
    monkeypatch.setenv("BERT_CPU_BF16", "emulated")
    precision, warning = prec.resolve("bf16", "cpu", "--ds_config my.json", measure=lambda: 17.2)
    assert precision == "bf16"  # runs as asked
    assert "no native bf16" in warning and "17x slower than fp32" in warning and "--precision auto" in warning
    assert prec.resolve("auto", "cpu", "x") == ("fp32", None)
    assert prec.resolve("fp32", "cpu", "x") == ("fp32", None)
    with pytest.raises(ValueError, match="fp16, which DeepSpeed does not run on CPU"):
        prec.resolve("fp16", "cpu", "--precision fp16")
    monkeypatch.setenv("BERT_CPU_BF16", "native")
    assert prec.resolve("bf16", "cpu", "x") == ("bf16", None)
    assert prec.resolve("auto", "cpu", "x") == ("bf16", None)


def test_the_detector_agrees_with_a_measured_matmul():
    """Where the detector says native, bf16 is not much slower than fp32; where it says emulated (no
    AVX512-BF16/AMX, or oneDNN capped below them), it is several times slower. Measured, not assumed."""
    ratio = prec.bf16_slowdown(size=256, repeats=5)
    if prec.cpu_has_native_bf16():
        assert ratio < 2.5, ratio
    else:
        assert ratio > 2.5, ratio


def _args(data, model_cfg, ds, *extra):
    return ["--ds_config", ds, "--model_config", model_cfg, "--data", data, "--seq_length", "64",
            "--train_steps", "10", "--save_dir", "/tmp/unused_run", *extra]


def test_validate_picks_fp32_on_an_emulating_cpu_and_keeps_an_explicit_bf16(tiny_data, tmp_path, monkeypatch):
    model_cfg = tiny_model_config(tmp_path / "tiny.json")
    zero2 = os.path.join(CONFIGS, "zero2.json")
    explicit = tmp_path / "bf16.json"
    ds = json.load(open(zero2))
    ds["bf16"]["enabled"] = True
    explicit.write_text(json.dumps(ds))

    monkeypatch.setenv("BERT_CPU_BF16", "emulated")
    res = validate(load_config(_args(tiny_data, model_cfg, zero2)), world_size=1, device="cpu")
    assert res.precision == "fp32" and res.precision_warning is None
    assert res.ds_config["bf16"]["enabled"] is False  # what DeepSpeed gets: a real boolean
    res = validate(load_config(_args(tiny_data, model_cfg, str(explicit))), world_size=1, device="cpu")
    assert res.precision == "bf16" and "no native bf16" in res.precision_warning
    assert str(explicit) in res.precision_warning
    res = validate(load_config(_args(tiny_data, model_cfg, str(explicit), "--precision", "auto")), world_size=1, device="cpu")
    assert res.precision == "fp32" and res.precision_warning is None
    with pytest.raises(ConfigError, match="fp16, which DeepSpeed does not run on CPU"):
        validate(load_config(_args(tiny_data, model_cfg, zero2, "--precision", "fp16")), world_size=1, device="cpu")

    monkeypatch.setenv("BERT_CPU_BF16", "native")
    res = validate(load_config(_args(tiny_data, model_cfg, zero2)), world_size=1, device="cpu")
    assert res.precision == "bf16" and res.ds_config["bf16"]["enabled"] is True

    monkeypatch.setattr(prec, "cuda_capability", lambda: (7, 0))  # a V100
    res = validate(load_config(_args(tiny_data, model_cfg, zero2)), world_size=1, device="cuda")
    assert res.precision == "fp16" and res.ds_config["fp16"]["loss_scale"] == 0
    monkeypatch.setattr(prec, "cuda_capability", lambda: (9, 0))  # an H100
    res = validate(load_config(_args(tiny_data, model_cfg, os.path.join(CONFIGS, "zero2_fp16.json"))), world_size=1, device="cuda")
    assert res.precision == "fp16"  # an explicit fp16 config runs as asked


def test_finetune_deepspeed_config_resolves_auto(tmp_path, monkeypatch):
    """`finetune --deepspeed configs/zero2.json` (bf16 "auto") must give DeepSpeed a boolean."""
    from finetune.train import TrainConfig, deepspeed_config

    monkeypatch.setenv("BERT_CPU_BF16", "emulated")
    ds = deepspeed_config(os.path.join(CONFIGS, "zero2.json"), TrainConfig(batch_size=32), 1, "cpu")
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    monkeypatch.setenv("BERT_CPU_BF16", "native")
    assert deepspeed_config(os.path.join(CONFIGS, "zero2.json"), TrainConfig(batch_size=32), 1, "cpu")["bf16"]["enabled"] is True
    with pytest.raises(ValueError, match="fp16, which DeepSpeed does not run on CPU"):
        deepspeed_config(os.path.join(CONFIGS, "zero2_fp16.json"), TrainConfig(batch_size=32), 1, "cpu")


def test_explicit_bf16_on_an_old_gpu_warns(monkeypatch):
    monkeypatch.setattr(prec, "cuda_capability", lambda: (7, 0))
    precision, warning = prec.resolve("bf16", "cuda", "--precision bf16")
    assert precision == "bf16" and "compute capability 7.0" in warning and "zero2_fp16.json" in warning
    assert prec.resolve("auto", "cuda", "x") == ("fp16", None)


def test_resume_in_another_precision_is_said(tiny_data, tmp_path, monkeypatch):
    """"auto" follows the hardware: a requeue onto nodes of another kind changes the precision of
    a running job; the start-up warning says so and how to keep it."""
    model_cfg = tiny_model_config(tmp_path / "tiny.json")
    zero2 = os.path.join(CONFIGS, "zero2.json")
    save = tmp_path / "run"
    args = ["--ds_config", zero2, "--model_config", model_cfg, "--data", tiny_data, "--seq_length", "64",
            "--train_steps", "10", "--save_dir", str(save)]
    monkeypatch.setenv("BERT_CPU_BF16", "emulated")
    res = validate(load_config(args), world_size=1, device="cpu")
    (save / "step_5").mkdir(parents=True)
    (save / "latest").write_text("step_5")
    (save / "step_5" / "trainer_state.json").write_text(json.dumps(
        {"tp": 1, "seq_length": 64, "precision": "bf16", "config": {"padded_vocab_size": res.padded_vocab_size}}))
    res = validate(load_config(args), world_size=1, device="cpu")
    assert res.precision == "fp32"
    assert "was trained in bf16 and resumes in fp32" in res.precision_warning and "--precision bf16" in res.precision_warning
    monkeypatch.setenv("BERT_CPU_BF16", "native")
    assert validate(load_config(args), world_size=1, device="cpu").precision_warning is None
