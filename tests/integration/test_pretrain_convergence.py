"""Issue test 6: the tiny model pretrained for a few minutes on the embedded corpus (2 CPU
processes, ZeRO-2, native precision) reaches a held-out MLM accuracy clearly above the unigram-frequency
baseline (always predicting the most frequent masked token of the training data)."""
import json
import os
import subprocess
import sys

import pytest

from tests.distributed._spawn import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = int(os.environ.get("CONVERGENCE_STEPS", "600"))


@pytest.mark.slow
def test_tiny_bert_beats_unigram_baseline_on_embedded_corpus(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "data_prep", "--embedded", "--output-dir", str(data), "--seq-length", "128",
                    "--workers", "2", "--no-progress"], cwd=REPO, env=env, check=True, timeout=1200)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), os.path.join(REPO, "pretrain", "run.py"),
           "--ds_config", os.path.join(REPO, "configs", "zero2.json"),
           "--model_config", os.path.join(REPO, "configs", "bert-tiny.json"), "--data", str(data), "--seq_length", "128",
           "--train_steps", str(STEPS), "--save_dir", str(run), "--lr", "2e-3", "--warmup_steps", str(STEPS // 10),
           "--eval_interval", str(STEPS // 3), "--eval_samples", "1024", "--log_interval", "50"]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=3600)
    evals = [json.loads(l) for l in open(run / "metrics.jsonl") if '"kind": "eval"' in l]
    final = evals[-1]
    print(f"held-out after {final['step']} steps: MLM acc {final['mlm_acc']:.3f} vs unigram baseline "
          f"{final['unigram_acc']:.3f}; NSP acc {final['nsp_acc']:.3f}")
    assert final["step"] == STEPS
    assert final["mlm_acc"] > 1.5 * final["unigram_acc"] and final["mlm_acc"] > final["unigram_acc"] + 0.03
    assert evals[-1]["mlm_loss"] < evals[0]["mlm_loss"]
