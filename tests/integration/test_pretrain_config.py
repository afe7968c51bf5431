"""Configuration errors are found before any process group starts, with messages that say what
to change; precedence is CLI > --config file > defaults."""
import json
import os
import re
import subprocess
import sys

import pytest

from pretrain.config import ConfigError, load_config, validate
from tests.distributed.test_zero import tiny_data, tiny_model_config  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ZERO2 = os.path.join(REPO, "configs", "zero2.json")


def _args(tiny_data, model_cfg, *extra):
    return ["--ds_config", ZERO2, "--model_config", model_cfg, "--data", tiny_data, "--seq_length", "64",
            "--train_steps", "10", "--save_dir", "/tmp/unused_run", *extra]


@pytest.fixture
def model_cfg(tmp_path):
    return tiny_model_config(tmp_path / "tiny.json")


def test_every_shipped_ds_config_validates(tiny_data, model_cfg, monkeypatch):
    from pretrain import precision

    monkeypatch.setattr(precision, "cuda_capability", lambda: (9, 0))  # as on an H100
    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
        if name.startswith("zero"):
            args = _args(tiny_data, model_cfg, "--ds_config", os.path.join(REPO, "configs", name))
            res = validate(load_config(args), world_size=2, device="cuda")
            assert res.micro_batch_size * res.grad_accum * res.dp == res.global_batch_size
            assert res.precision == ("fp16" if "fp16" in name else "bf16")
            if "fp16" in name:  # on CPU: refused before start, with what to use instead
                with pytest.raises(ConfigError, match="fp16, which DeepSpeed does not run on CPU"):
                    validate(load_config(args), world_size=2, device="cpu")
            else:
                monkeypatch.setenv("BERT_CPU_BF16", "emulated")
                assert validate(load_config(args), world_size=2, device="cpu").precision == "fp32"
                monkeypatch.delenv("BERT_CPU_BF16")


def test_batch_arithmetic(tiny_data, model_cfg, tmp_path):
    res = validate(load_config(_args(tiny_data, model_cfg, "--global_batch_size", "256", "--micro_batch_size", "32")), world_size=4)
    assert (res.micro_batch_size, res.grad_accum, res.dp, res.global_batch_size) == (32, 2, 4, 256)
    res = validate(load_config(_args(tiny_data, model_cfg)), world_size=3)  # file: micro 32, accumulation 1
    assert res.global_batch_size == 96
    with pytest.raises(ConfigError, match="not a multiple of micro batch 32 x dp 3"):
        validate(load_config(_args(tiny_data, model_cfg, "--global_batch_size", "100")), world_size=3)
    ds = json.load(open(ZERO2))
    ds.update(train_batch_size=100, train_micro_batch_size_per_gpu=32, gradient_accumulation_steps=1)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match=r"micro 32 x accumulation 1 x dp 2 = 64, but the global batch is 100"):
        validate(load_config(_args(tiny_data, model_cfg, "--ds_config", str(bad))), world_size=2)


def test_parallel_layout_errors(tiny_data, model_cfg):
    with pytest.raises(ConfigError, match="num_attention_heads 4 .* not divisible"):
        validate(load_config(_args(tiny_data, model_cfg, "--tp", "3")), world_size=3)
    with pytest.raises(ConfigError, match="world size 3 is not a multiple of --tp 2"):
        validate(load_config(_args(tiny_data, model_cfg, "--tp", "2")), world_size=3)


def test_data_and_length_errors(tiny_data, model_cfg, tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        validate(load_config(_args(str(tmp_path / "nope"), model_cfg)), world_size=1)
    with pytest.raises(ConfigError, match=r"no pair index for it \(it has \[64\]\)"):
        validate(load_config(_args(tiny_data, model_cfg, "--seq_length", "128")), world_size=1)
    with pytest.raises(ConfigError, match="longer than the position table"):
        validate(load_config(_args(tiny_data, model_cfg, "--seq_length", "1024")), world_size=1)
    with pytest.raises(ConfigError, match="missing required flag"):
        validate(load_config(["--ds_config", ZERO2]), world_size=1)


def test_masking_flags(tiny_data, model_cfg):
    from pretrain.data import PretrainingDataset

    cfg = load_config(_args(tiny_data, model_cfg, "--masked_lm_prob", "0.3", "--whole_word_masking"))
    validate(cfg, world_size=1)
    m = cfg.masking()
    assert (m.mlm_probability, m.whole_word) == (0.3, True)
    base = PretrainingDataset(tiny_data, 64, masking=load_config(_args(tiny_data, model_cfg)).masking()).get_batch(range(64))
    more = PretrainingDataset(tiny_data, 64, masking=m).get_batch(range(64))
    rate = lambda b: (b["labels"] != -100).sum() / ((b["attention_mask"] == 1).sum() - 3 * 64)  # noqa: E731
    assert 0.13 < rate(base) < 0.17 and 0.27 < rate(more) < 0.33
    with pytest.raises(ConfigError, match=r"--masked_lm_prob must be in \(0, 1\]"):
        validate(load_config(_args(tiny_data, model_cfg, "--masked_lm_prob", "0")), world_size=1)


def test_frequency_weighted_masking_trains_weighted_and_evaluates_uniform(tiny_data, model_cfg):
    import torch

    from pretrain.trainer import build_data

    res = validate(load_config(_args(tiny_data, model_cfg, "--masked_lm_frequency_power", "0.5")), world_size=1)
    train_ds, valid_ds, _ = build_data(res, consumed=0, dp_rank=0, device=torch.device("cpu"))
    assert train_ds.masking.frequency_power == 0.5 and train_ds.tables.select_weights is not None
    # held-out MLM accuracy stays comparable with uniform runs
    assert valid_ds.masking.frequency_power == 0.0 and valid_ds.tables.select_weights is None
    with pytest.raises(ConfigError, match="--masked_lm_frequency_power 0.5 with --whole_word_masking: .*use one of them"):
        validate(load_config(_args(tiny_data, model_cfg, "--masked_lm_frequency_power", "0.5", "--whole_word_masking")),
                 world_size=1)
    with pytest.raises(ConfigError, match=r"--masked_lm_frequency_power 5.0: .*must be within \[0, 4\]"):
        validate(load_config(_args(tiny_data, model_cfg, "--masked_lm_frequency_power", "5")), world_size=1)


def test_cli_overrides_file_overrides_defaults(tiny_data, model_cfg, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"lr": 0.5, "keep_last": 7, "seq_length": 64}))
    cfg = load_config(_args(tiny_data, model_cfg, "--config", str(recipe), "--lr", "0.25"))
    assert (cfg.lr, cfg.keep_last, cfg.log_interval) == (0.25, 7, 10)
    recipe.write_text(json.dumps({"learning_rate": 0.5}))
    with pytest.raises(ConfigError, match="unknown field"):
        load_config(_args(tiny_data, model_cfg, "--config", str(recipe)))
    # the shipped phase recipes name real files and validate (with a data dir of the right length)
    for phase in ("phase1", "phase2"):
        cfg = load_config(["--config", os.path.join(REPO, "configs", f"{phase}.json")])
        assert os.path.isfile(os.path.join(REPO, cfg.ds_config)) and os.path.isfile(os.path.join(REPO, cfg.model_config))


def test_cli_reports_errors_without_a_traceback(tiny_data, model_cfg):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pretrain", "run.py"), *_args(tiny_data, model_cfg, "--tp", "3")],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "WORLD_SIZE": "3"})
    assert proc.returncode == 2
    assert "error: --tp 3" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_layout_mismatch_is_reported_before_start(tiny_data, model_cfg, tmp_path):
    run = tmp_path / "run"
    (run / "step_5").mkdir(parents=True)
    (run / "latest").write_text("step_5")
    (run / "step_5" / "trainer_state.json").write_text(json.dumps({"tp": 2, "seq_length": 64}))
    args = ["--ds_config", ZERO2, "--model_config", model_cfg, "--data", tiny_data, "--seq_length", "64",
            "--train_steps", "10", "--save_dir", str(run)]
    with pytest.raises(ConfigError, match="written at tp=2; resume with --tp 2"):
        validate(load_config(args), world_size=2)
    (run / "step_5" / "trainer_state.json").write_text(json.dumps({"tp": 1, "seq_length": 128}))
    with pytest.raises(ConfigError, match="needs its own --save_dir and --init_from"):
        validate(load_config(args), world_size=2)
    # other masking flags resume, with one warning naming the change (the same flags: none)
    state = {"tp": 1, "seq_length": 64, "config": {"cfg": {"masked_lm_prob": 0.15, "whole_word_masking": False}}}
    (run / "step_5" / "trainer_state.json").write_text(json.dumps(state))
    assert validate(load_config(args), world_size=2).resume_warning is None
    warning = validate(load_config(args + ["--masked_lm_prob", "0.4"]), world_size=2).resume_warning
    assert "resumes with other masking (--masked_lm_prob 0.15 -> 0.4)" in warning
    # a checkpoint from before --masked_lm_frequency_power was written without weighting
    warning = validate(load_config(args + ["--masked_lm_frequency_power", "0.5"]), world_size=2).resume_warning
    assert "(--masked_lm_frequency_power 0.0 -> 0.5)" in warning


def test_vocabulary_is_padded_for_tensor_parallelism(tiny_data, model_cfg, tmp_path):
    # 30522 tokens do not split 4 ways: padded to a multiple of 128 x tp, validated before start-up.
    assert validate(load_config(_args(tiny_data, model_cfg)), world_size=1).padded_vocab_size == 30592
    res = validate(load_config(_args(tiny_data, model_cfg, "--tp", "4")), world_size=4)
    assert (res.padded_vocab_size, res.model_config["vocab_size"]) == (30720, 30522)
    res = validate(load_config(_args(tiny_data, model_cfg, "--tp", "4", "--make_vocab_size_divisible_by", "1")), world_size=8)
    assert res.padded_vocab_size == 30524
    with pytest.raises(ConfigError, match="--make_vocab_size_divisible_by must be >= 1, got 0"):
        validate(load_config(_args(tiny_data, model_cfg, "--make_vocab_size_divisible_by", "0")), world_size=1)

    # resuming must keep the padded size the checkpoint was written with
    run = tmp_path / "run"
    (run / "step_5").mkdir(parents=True)
    (run / "latest").write_text("step_5")
    state = {"tp": 1, "seq_length": 64, "model_config": {"vocab_size": 30522}, "config": {"padded_vocab_size": 30592}}
    (run / "step_5" / "trainer_state.json").write_text(json.dumps(state))
    args = _args(tiny_data, model_cfg, "--save_dir", str(run))
    assert validate(load_config(args), world_size=1).padded_vocab_size == 30592
    with pytest.raises(ConfigError, match="checkpoint with 30592 vocabulary rows, this run pads to 30720.*"
                                          "resume with the --make_vocab_size_divisible_by of that run"):
        validate(load_config([*args, "--make_vocab_size_divisible_by", "1024"]), world_size=1)
    del state["config"]  # written before padding existed: as many rows as tokens
    (run / "step_5" / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="checkpoint with 30522 vocabulary rows"):
        validate(load_config(args), world_size=1)
    assert validate(load_config([*args, "--make_vocab_size_divisible_by", "1"]), world_size=1).padded_vocab_size == 30522


def _before_start_up_case(case, tiny_data, model_cfg, tmp_path):
    """(flags, world size, expected message) of one input error that validate() must find."""
    args = _args(tiny_data, model_cfg)
    if case in ("unknown model key", "model shape field missing", "intermediate_size not divisible by tp"):
        model = json.load(open(model_cfg))
        if case == "model shape field missing":
            del model["vocab_size"]  # would otherwise silently become bert-base's 30522
        else:
            model.update({"hidden_sizes": 64} if case == "unknown model key" else {"intermediate_size": 66})
        bad = tmp_path / "model.json"
        bad.write_text(json.dumps(model))
        if case == "unknown model key":  # the model's own reader: BertConfig.from_dict
            return _args(tiny_data, str(bad)), 1, r"unknown key\(s\) \['hidden_sizes'\]"
        if case == "model shape field missing":
            return _args(tiny_data, str(bad)), 1, r"needs integer field\(s\) \['vocab_size'\]"
        return _args(tiny_data, str(bad), "--tp", "4"), 4, "intermediate_size 66 is not divisible by --tp 4"
    if case == "heads not divisible by tp":  # the TP layer's own check
        return [*args, "--tp", "8"], 8, "num_attention_heads 4 is not divisible by --tp 8"
    if case.startswith("manifest"):  # data_prep's manifest reader
        data = tmp_path / "data"
        data.mkdir()
        if case == "manifest missing":
            return _args(str(data), model_cfg), 1, "manifest.json: missing, so data_prep did not finish"
        manifest = json.load(open(os.path.join(tiny_data, "manifest.json")))
        if case == "manifest format_version old":
            manifest["format_version"] = 0
        else:
            del manifest["format_version"]
        (data / "manifest.json").write_text(json.dumps(manifest))
        expected = "0" if case == "manifest format_version old" else "None"
        return _args(str(data), model_cfg), 1, f"format_version {expected}, this code reads 1; re-run data_prep"
    run = tmp_path / "run"  # the checkpoint module's readers: latest_tag, read_state
    (run / "step_5").mkdir(parents=True)
    if case == "resume state unreadable":
        (run / "latest").write_text("step_5")
        (run / "step_5" / "trainer_state.json").write_text('{"step": 5, "tp"')
        return [*args, "--save_dir", str(run)], 1, r"step_5/trainer_state.json is unreadable \(.*\); point `latest`"
    (run / "latest").write_text("step_7")
    return [*args, "--save_dir", str(run)], 1, "names checkpoint 'step_7' but .* is missing"


@pytest.mark.parametrize("case", [
    "unknown model key", "model shape field missing", "heads not divisible by tp", "intermediate_size not divisible by tp", "manifest missing",
    "manifest format_version old", "manifest without format_version", "resume state unreadable",
    "latest names a missing checkpoint",
])
def test_input_errors_are_found_by_validate_before_start_up(case, tiny_data, model_cfg, tmp_path, monkeypatch, capsys):
    import torch.distributed as dist

    from pretrain import run

    args, world, expected = _before_start_up_case(case, tiny_data, model_cfg, tmp_path)
    with pytest.raises(ConfigError, match=expected):
        validate(load_config(args), world_size=world)
    # The launcher's path: run.py stops at validate (exit 2, a trainer error would be 3) with the
    # message and no process group.
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert run.main(args) == 2
    assert not dist.is_initialized()
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(expected, err) and "Traceback" not in err
