"""A checkpoint of our own pretraining (tiny config, a few DeepSpeed steps on the embedded
corpus) fine-tunes through the same entry point: `python -m finetune --model RUN_DIR`
consolidates it with pretrain.export_hf, then trains and evaluates. The consolidated encoder
must be exactly the trainer's fp32 weights, and the other tasks run from the same export."""
import json
import os
import subprocess
import sys

import pytest
import torch

from finetune import datasets
from finetune.runner import FinetuneArgs, run
from finetune.train import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ = 64


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    return env


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    from data_prep.testing import build_tiny_dataset

    d = tmp_path_factory.mktemp("own")
    data = build_tiny_dataset(str(d / "data"), seq_lengths=(SEQ,), n_docs=200)
    with open(os.path.join(REPO, "configs", "bert-tiny.json")) as f:
        cfg = json.load(f)
    cfg.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    (d / "model.json").write_text(json.dumps(cfg))
    with open(os.path.join(REPO, "configs", "zero1.json")) as f:
        ds = json.load(f)
    ds["bf16"]["enabled"] = False
    ds["train_micro_batch_size_per_gpu"] = 8
    (d / "ds.json").write_text(json.dumps(ds))
    cmd = [sys.executable, os.path.join(REPO, "pretrain", "run.py"), "--ds_config", str(d / "ds.json"),
           "--model_config", str(d / "model.json"), "--data", data, "--seq_length", str(SEQ),
           "--train_steps", "6", "--save_interval", "3", "--global_batch_size", "8", "--log_interval", "3", "--eval_samples", "16",
           "--save_dir", str(d / "run"), "--no-tensorboard"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def test_pretraining_checkpoint_finetunes_via_cli(pretrained_run):
    d = pretrained_run
    datasets.write_tsv(str(d / "pair_train.tsv"), datasets.build_next_sentence_pairs(64, seed=1, end=3000))
    datasets.write_tsv(str(d / "pair_test.tsv"), datasets.build_next_sentence_pairs(32, seed=2, offset=3000))
    out = d / "ft_pair"
    cmd = [sys.executable, "-m", "finetune", "--task", "pair", "--model", str(d / "run"),
           "--train", str(d / "pair_train.tsv"), "--eval", str(d / "pair_test.tsv"), "--output-dir", str(out),
           "--seeds", "1", "2", "--max-seq-length", str(SEQ), "--max-steps", "4", "--batch-size", "16"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["seeds"] == [1, 2] and len(summary["runs"]) == 2
    accs = [x["accuracy"] for x in summary["runs"]]
    assert summary["mean"]["accuracy"] == pytest.approx(sum(accs) / 2)
    assert summary["std"]["accuracy"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)

    # the export is the trainer's own fp32 weights, key by key
    from safetensors.torch import load_file

    from pretrain import checkpoint as ckpt
    from pretrain.tensor_parallel import unshard_state_dicts

    run_dir, tag = ckpt.resolve(str(d / "run"))
    trained = unshard_state_dicts(ckpt.fp32_shards(run_dir, tag))
    exported = load_file(str(out / "consolidated" / "model.safetensors"))
    key = "bert.encoder.layer.1.attention.self.query.weight"
    assert torch.equal(exported[key], trained[key].float())
    # training pads the vocabulary (30522 -> 30592 rows); the export holds exactly the real rows
    words = "bert.embeddings.word_embeddings.weight"
    assert trained[words].shape[0] == 30592 and exported[words].shape[0] == 30522
    assert torch.equal(exported[words], trained[words][:30522].float())
    # and the fine-tuned model is saved in the HF layout transformers reads
    import transformers

    m = transformers.BertForSequenceClassification.from_pretrained(str(out / "seed_1"))
    assert m.config.id2label == {0: "next", 1: "random"}


@pytest.mark.parametrize("task", ["token", "qa", "features"])
def test_other_tasks_run_from_the_export(pretrained_run, task):
    d = pretrained_run
    model = d / "ft_pair" / "consolidated"
    if not model.is_dir():
        pytest.skip("needs the export made by test_pretraining_checkpoint_finetunes_via_cli")
    if task == "token":
        sents = datasets.load_wnut16()
        datasets.write_conll(str(d / "ner_train.txt"), sents[:64])
        datasets.write_conll(str(d / "ner_test.txt"), sents[-32:])
        files = ("ner_train.txt", "ner_test.txt")
    elif task == "qa":
        # SQuAD v2.0 with unanswerable questions exercises the null-score path
        (d / "qa_train.json").write_text(json.dumps(datasets.build_cloze_squad(32, seed=1, unanswerable=0.3)))
        (d / "qa_test.json").write_text(json.dumps(datasets.build_cloze_squad(16, seed=2, offset=4000,
                                                                              unanswerable=0.3)))
        files = ("qa_train.json", "qa_test.json")
    else:
        files = ("pair_train.tsv", "pair_test.tsv")
    s = run(FinetuneArgs(task=task, model=str(model), train_file=str(d / files[0]), eval_file=str(d / files[1]),
                         output_dir=str(d / f"ft_{task}"), seeds=[1], max_seq_length=SEQ, doc_stride=24,
                         max_query_length=24, pooling="cls", layer=1, train=TrainConfig(max_steps=3, batch_size=16)))
    m = s["runs"][0]
    if task == "qa":
        assert m["total"] == 16 and "NoAns_total" in m and 0 <= m["f1"] <= 100
        assert (d / f"ft_{task}" / "seed_1" / "eval_null_odds.json").is_file()
    elif task == "token":
        assert 0 <= m["f1"] <= 1 and m["support"] > 0
    else:
        assert m["feature_dim"] == 32 and 0 <= m["accuracy"] <= 1


def _features_cli(model: str, out, d):
    """The frozen-features task: consolidates --model into OUT like every task, trains nothing."""
    cmd = [sys.executable, "-m", "finetune", "--task", "features", "--model", model,
           "--train", str(d / "pair_train.tsv"), "--eval", str(d / "pair_test.tsv"), "--output-dir", str(out),
           "--max-seq-length", str(SEQ), "--pooling", "cls"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file

    return load_file(str(out / "consolidated" / "model.safetensors"))


def test_second_checkpoint_into_the_same_output_is_exported_again(pretrained_run):
    """Phase 1's step then phase 2's into one OUT: the second run must use its own weights, not
    the consolidation the first one left in OUT/consolidated."""
    from pretrain import checkpoint as ckpt

    d = pretrained_run
    datasets.write_tsv(str(d / "pair_train.tsv"), datasets.build_next_sentence_pairs(16, seed=1, end=3000))
    datasets.write_tsv(str(d / "pair_test.tsv"), datasets.build_next_sentence_pairs(8, seed=2, offset=3000))
    key = "bert.encoder.layer.1.attention.self.query.weight"
    early, late = (ckpt.full_weights(str(d / "run"), tag)[key] for tag in ("step_3", "step_6"))
    assert not torch.equal(early, late)
    out = d / "two_phases"
    assert torch.equal(_features_cli(str(d / "run" / "step_3"), out, d)[key], early.float())
    assert torch.equal(_features_cli(str(d / "run"), out, d)[key], late.float())
    record = json.loads((out / "consolidated" / "consolidated_from.json").read_text())
    assert record["tag"] == "step_6" and record["step"] == 6


def test_export_cut_short_is_not_taken_as_complete(pretrained_run, tmp_path, monkeypatch):
    """A process killed while exporting leaves nothing that a later run takes as the export."""
    crash = (
        "import os, signal, sys\n"
        "from finetune import checkpoint\n"
        "real = checkpoint.export\n"
        "def export(src, dst):\n"
        "    real(src, dst)\n"
        "    with open(os.path.join(dst, 'model.safetensors'), 'r+b') as f:\n"
        "        f.truncate(100)  # the weights file half written when the process dies\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "checkpoint.export = export\n"
        "checkpoint.resolve_model_dir(sys.argv[1], sys.argv[2])\n")
    r = subprocess.run([sys.executable, "-c", crash, str(pretrained_run / "run"), str(tmp_path)], env=_env(),
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == -9, r.stderr[-3000:]
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from finetune import checkpoint

    model_dir = checkpoint.resolve_model_dir(str(pretrained_run / "run"), str(tmp_path))
    config, state = checkpoint.hf_io.load_hf_dir(model_dir)  # loads: the export was redone
    assert config.hidden_size == 32 and "bert.embeddings.word_embeddings.weight" in state
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".consolidated")]
