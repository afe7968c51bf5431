"""End to end through the real `deepspeed` launcher (2 CPU processes, bf16, configs/zero2.json),
then `python -m pretrain.export_hf`, then transformers loading the export."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.distributed._spawn import free_port
from tests.distributed.test_zero import final_weights, tiny_data, tiny_model_config  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 3


@pytest.fixture(scope="module")
def launched_run(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launcher")
    model_cfg = tiny_model_config(tmp / "tiny.json", dropout=0.1)
    save_dir = str(tmp / "run")
    # An explicit bf16 request, on a CPU the detector is told only emulates bf16: it must run as
    # asked, with one warning (not one per rank).
    with open(os.path.join(REPO, "configs", "zero2.json")) as f:
        ds = json.load(f)
    ds["bf16"]["enabled"] = True
    ds_cfg = str(tmp / "zero2_bf16.json")
    with open(ds_cfg, "w") as f:
        json.dump(ds, f)
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [
        deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), os.path.join(REPO, "pretrain", "run.py"),
        "--ds_config", ds_cfg, "--model_config", model_cfg, "--data", tiny_data,
        "--seq_length", "64", "--train_steps", str(STEPS), "--save_dir", save_dir, "--micro_batch_size", "2",
        "--log_interval", "1", "--eval_samples", "16",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "BERT_CPU_BF16": "emulated",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return save_dir, proc.stdout + proc.stderr


def test_deepspeed_launcher_trains_bf16_on_two_processes(launched_run):
    save_dir, output = launched_run
    assert "world 2 = dp 2 x tp 1 | ZeRO-2 | bf16" in output
    warnings = [l for l in output.splitlines() if "WARNING pretrain.trainer: precision:" in l]
    assert len(warnings) == 1 and "no native bf16" in warnings[0] and "--precision auto" in warnings[0], output[-3000:]
    # third-party noise a user cannot act on is filtered (megatron-core's per-process import
    # warnings, torch.distributed deprecations from DeepSpeed's calls, DeepSpeed's op-load print)
    for noise in ("Transformer Engine and Apex are not installed", "FutureWarning", "built successfully"):
        assert noise not in output, noise
    lines = [l for l in output.splitlines() if "pretrain.metrics: step " in l]
    assert len(lines) == STEPS, output[-3000:]
    # the fixed field order of the metrics line
    fields = [part.split()[0] for part in lines[0].split("pretrain.metrics: ", 1)[1].split(" | ")]
    assert fields == ["step", "loss", "mlm_loss", "nsp_loss", "lr", "grad_norm", "loss_scale", "tokens_per_s",
                      "seqs_per_s", "tflops", "mfu", "mem_gb", "data_wait", "skipped", "sequences"]
    with open(os.path.join(save_dir, "latest")) as f:
        assert f.read().strip() == f"step_{STEPS}"
    with open(os.path.join(save_dir, f"step_{STEPS}", "trainer_state.json")) as f:
        state = json.load(f)
    assert state["consumed_samples"] == STEPS * 4 and state["precision"] == "bf16" and state["dp"] == 2
    assert os.path.getsize(os.path.join(save_dir, "loss_curves.png")) > 1000
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(save_dir, "tensorboard")))
    evals = [json.loads(l) for l in open(os.path.join(save_dir, "metrics.jsonl")) if '"eval"' in l]
    assert evals and 0.0 <= evals[-1]["mlm_acc"] <= 1.0 and evals[-1]["samples"] == 16


def test_export_loads_in_transformers_with_our_logits(launched_run, tmp_path):
    save_dir, _ = launched_run
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "pretrain.export_hf", os.path.join(save_dir, "latest"), str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"config.json", "model.safetensors", "vocab.txt"} <= set(os.listdir(out))

    import transformers

    from pretrain.data import PretrainingDataset
    from pretrain.hf_io import load_into
    from pretrain.model import BertConfig, BertForPreTraining

    hf = transformers.BertForPreTraining.from_pretrained(str(out)).eval()
    # Ours: the same checkpoint's fp32 master weights, gathered independently of the exporter.
    with open(os.path.join(save_dir, f"step_{STEPS}", "trainer_state.json")) as f:
        config = BertConfig.from_dict(json.load(f)["model_config"])
    ours = BertForPreTraining(config).eval()
    load_into(ours, final_weights(save_dir))
    with open(os.path.join(save_dir, f"step_{STEPS}", "vocab.txt")) as f:
        vocab = f.read()
    assert (out / "vocab.txt").read_text() == vocab

    manifest_dir = json.load(open(os.path.join(save_dir, f"step_{STEPS}", "trainer_state.json")))["config"]["cfg"]["data"]
    batch = PretrainingDataset(manifest_dir, 64, "valid").get_batch(range(4))
    inputs = {k: torch.as_tensor(batch[k]) for k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        want = ours(**inputs)
        got = hf(**inputs)
    torch.testing.assert_close(got.prediction_logits, want.prediction_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.seq_relationship_logits, want.seq_relationship_logits, rtol=0, atol=1e-4)
    # trained weights, not the initialisation: the export must carry what training produced
    torch.manual_seed(1234)
    init = BertForPreTraining(config)
    init.init_weights()
    assert not torch.equal(init.bert.embeddings.word_embeddings.weight, ours.bert.embeddings.word_embeddings.weight)
