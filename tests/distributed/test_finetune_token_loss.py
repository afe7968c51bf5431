"""Token labelling's loss in several processes and over accumulated micro-batches: the mean over
every labelled token of the update's whole batch, so 2 processes reproduce 1.

The fine-tuning loop runs through a DeepSpeed ZeRO-2 engine (configs/ds_finetune.json, fp32) in 2
gloo processes; the reference is the plain single-process loop (no DeepSpeed) on the same global
batch. Sentences carry 1..7 labelled tokens, so the two shares of a batch hold different numbers
of them: weighting each process's own token mean by its share of sentences (the loop before)
gives another loss from the first step on. Per-step losses and final weights agree within 1e-6
(the attention key bias, whose true gradient is zero, within 1e-5).
"""
import os

import numpy as np
import pytest

from tests._weights import assert_weights_close
from tests.distributed._spawn import spawn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DS_CONFIG = os.path.join(REPO, "configs", "ds_finetune.json")
N = 14  # 6 per update: two full updates and a short one of 2 (1 + 1 over the processes)
STEPS = 5
BASE = dict(learning_rate=1e-4, max_steps=STEPS, warmup_ratio=0.2, log_every=1, precision="fp32")
# (per-process batch, accumulation): 2 processes x 3, and 2 processes x 2 x 3 micro-batches
RUNS = [dict(batch_size=3), dict(batch_size=3, gradient_accumulation_steps=2)]


def _features():
    from tests.unit.test_finetune_train import _token_features

    # the token task's bookkeeping: each labelled word's first sub-token
    return [{**f, "_first": [j for j, l in enumerate(f["labels"]) if l != -100]} for f in _token_features(N)]


def _model():
    import torch

    from finetune.modeling import BertForTokenClassification
    from pretrain.model import BertConfig

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return BertForTokenClassification(config, 3)


def _result(model, stats):
    return stats["step_losses"], {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def _deepspeed_runs(rank, world_size, runs):
    from finetune.train import TrainConfig, deepspeed_config, train
    from pretrain.launch import init_distributed

    init_distributed(backend="gloo", use_deepspeed=False)
    out = []
    for run in runs:
        cfg = TrainConfig(**BASE, **run)
        ds = deepspeed_config(DS_CONFIG, cfg, world_size, "cpu")
        out.append(_result(*train(_model(), _features(), cfg, seed=7, ds_config=ds)))
    return out


@pytest.fixture(scope="module")
def runs():
    pytest.importorskip("deepspeed")
    import torch

    from finetune.train import TrainConfig, train

    torch.set_num_threads(1)
    two = spawn(_deepspeed_runs, world_size=2, args=(RUNS,), timeout=300)
    one = []
    for run in RUNS:  # the same global batch in one process, plain PyTorch
        glob = run["batch_size"] * 2 * run.get("gradient_accumulation_steps", 1)
        one.append(_result(*train(_model(), _features(), TrainConfig(**BASE, batch_size=glob), seed=7)))
    return two, one


def _assert_same(two_ranks, one):
    (l0, w0), (l1, w1) = two_ranks
    losses, weights = one
    print("1 process  ", losses, "\n2 processes", l0)
    assert l0 == l1  # every rank logs the all-reduced loss
    assert len(set(round(x, 4) for x in losses)) > 3  # the loss moves: a real comparison
    assert l0 == pytest.approx(losses, abs=1e-6)
    for k in weights:
        assert np.array_equal(w0[k], w1[k]), k  # ZeRO-2: both ranks hold the same full weights
    assert_weights_close(w0, weights, atol=1e-6, key_bias_atol=1e-5)  # the key bias: tests/_weights.py


def test_two_processes_reproduce_one_on_the_token_loss(runs):
    two, one = runs
    _assert_same([r[0] for r in two], one[0])


def test_accumulated_token_loss_is_normalised_over_the_whole_update(runs):
    two, one = runs
    _assert_same([r[1] for r in two], one[1])
