"""The CPU recipe (configs/cpu_recipe.json: bert-tiny with an 8k WordPiece vocabulary trained on the
embedded corpus, 40% masking, 5 NSP pairings, 2 CPU processes, ZeRO-2, native precision) must give a
model that fine-tunes better than the same model from random init (its own step-0 weights) and
reach a held-out MLM accuracy clearly above the unigram-frequency baseline.
Asserted: next-sentence by more than the seed spread (measured +0.27, spread 0.03), cloze QA on the
mean (measured +3.3 F1, spread 2.2). Not asserted: Pang & Lee, where the recipe is still 0.018 below
random init (README.md). ~15-35 min on 2 cores: `bash scripts/test.sh -m slow -k convergence`."""
import json
import os
import subprocess
import sys

import pytest

from tests._bench import load_benchmark
from tests.distributed._spawn import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = int(os.environ.get("CONVERGENCE_STEPS", "1500"))
# (task, {init: lr}, margin): each init at the lr the full sweep chose for it (README.md); "spread"
# asks gain > max(std) over 3 seeds, "mean" asks gain > 0.
COMPARED = (("wiki-next-sentence", {"pretrained": 5e-4, "random_init": 2e-3}, "spread"),
            ("wiki-cloze", {"pretrained": 1e-3, "random_init": 1e-3}, "mean"))


@pytest.mark.slow
def test_cpu_recipe_beats_random_init_on_next_sentence_and_cloze(tmp_path):
    bench = load_benchmark("pretraining_value")
    compare, export_run, format_table, random_init_dir = (bench.compare, bench.export_run, bench.format_table,
                                                          bench.random_init_dir)

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "data_prep", "--embedded", "--train-wordpiece-vocab-size", "8192",
                    "--dupe-factor", "5", "--output-dir", str(data), "--seq-length", "128", "--workers", "2",
                    "--no-progress"], cwd=REPO, env=env, check=True, timeout=1200)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), os.path.join(REPO, "pretrain", "run.py"),
           "--config", os.path.join(REPO, "configs", "cpu_recipe.json"), "--data", str(data),
           "--ds_config", os.path.join(REPO, "configs", "zero2.json"),
           "--model_config", os.path.join(REPO, "configs", "bert-tiny-8k.json"),
           "--train_steps", str(STEPS), "--save_dir", str(run), "--save_interval", str(STEPS),
           "--eval_interval", str(max(1, STEPS // 3))]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=4 * 3600)
    evals = [json.loads(line) for line in open(run / "metrics.jsonl") if '"kind": "eval"' in line]
    final = evals[-1]
    print(f"held-out after {final['step']} steps: MLM acc {final['mlm_acc']:.3f} vs unigram baseline "
          f"{final['unigram_acc']:.3f}; NSP acc {final['nsp_acc']:.3f}")
    assert final["step"] == STEPS
    assert final["mlm_acc"] > 2 * final["unigram_acc"]
    assert evals[-1]["mlm_loss"] < evals[0]["mlm_loss"]

    pretrained, seed = export_run(str(run), str(tmp_path / "pretrained"))
    random_dir = random_init_dir(pretrained, str(tmp_path / "random_init"), seed)
    results = {}
    for task, lrs, _ in COMPARED:
        runs = {lr: compare(pretrained, random_dir, [task], seeds=[1, 2, 3], lrs=[lr], output_dir=str(tmp_path / "ft"),
                            threads=len(os.sched_getaffinity(0)), verbose=False)["tasks"][task] for lr in set(lrs.values())}
        e = runs[lrs["pretrained"]]
        e["random_init"] = runs[lrs["random_init"]]["random_init"]
        e["gain"] = e["pretrained"]["mean"] - e["random_init"]["mean"]
        e["beats_by_more_than_spread"] = bool(e["gain"] > max(e["pretrained"]["std"], e["random_init"]["std"]))
        results[task] = e
    print(format_table({"tasks": results}))
    for task, _, margin in COMPARED:
        e = results[task]
        p, r = e["pretrained"], e["random_init"]
        need = max(p["std"], r["std"]) if margin == "spread" else 0.0
        assert e["gain"] > need, f"{task}: pretrained {p['mean']:.4g} ± {p['std']:.2g} " \
                                 f"vs random init {r['mean']:.4g} ± {r['std']:.2g}"
