"""benchmarks/pretrain_oracle.py runs end to end (transformers' BertForPreTraining on our samples):
a few steps on a tiny real data_prep directory, with its held-out figures printed. Guards the
benchmark itself, which no other test executes beyond its schedule."""
import json
import math
import os

from data_prep.testing import build_tiny_dataset
from tests._bench import load_benchmark

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64}


def test_oracle_trains_and_evaluates(tmp_path, capsys):
    main = load_benchmark("pretrain_oracle").main

    data = build_tiny_dataset(str(tmp_path / "data"), seq_lengths=(64,), n_docs=60)
    model = tmp_path / "model.json"
    model.write_text(json.dumps(TINY))
    assert main(["--data", data, "--model_config", str(model), "--seq_length", "64", "--steps", "4",
                 "--global_batch_size", "8", "--eval_interval", "2", "--eval_samples", "16", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = [l.split() for l in out.splitlines() if l.split() and l.split()[0] in ("2", "4")]
    assert [r[0] for r in rows] == ["2", "4"]
    # every logged step trained (a finite loss) and was evaluated (an accuracy, not "-")
    assert all(math.isfinite(float(r[1])) and r[2] != "-" for r in rows)
