"""The fine-tuning loop's optimizer wiring: pretraining's no-decay groups and its warm-up/decay
(with the decay one update later), checked against hand-computed values."""
import math

import pytest
import torch

from finetune.modeling import BertForSequenceClassification
from finetune.train import TrainConfig, train
from pretrain.model import BertConfig

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
