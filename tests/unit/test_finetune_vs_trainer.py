"""Our fine-tuning loop against transformers' own `Trainer` (an independent implementation of
the same recipe: AdamW with no decay on biases and LayerNorm, linear decay, gradient clipping,
the heads' mean losses): without dropout, from the same weights and on the same batches in the
same order, both end with the same weights. What `benchmarks/finetune_vs_transformers.py` then
compares is left to the batch order, the dropout masks and the head's initial draw."""
import random

import pytest
import torch

from finetune.modeling import BertForSequenceClassification, BertForTokenClassification
from finetune.train import TrainConfig, _batches, collate, train
from pretrain.model import BertConfig

pytest.importorskip("accelerate")  # transformers.Trainer needs it

_SIZES = dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _features(kind: str, n: int) -> list[dict]:
    """Pairs or sentences of 4..12 tokens (padding and the unpadded encoder both matter), with
    some token labels ignored (-100), as after a word's first WordPiece."""
    out = []
    for i in range(n):
        length = 4 + (i * 5) % 9
        ids = [2 + (i * 7 + j * 3) % 55 for j in range(length)]
        types = [0] * (length // 2) + [1] * (length - length // 2)
        f = {"input_ids": ids, "token_type_ids": types, "attention_mask": [1] * length}
        if kind == "token":
            f["labels"] = [-100 if j % 4 == 3 else (i + j) % 3 for j in range(length)]
        else:
            f["labels"] = (sum(ids) // 7) % 2
        out.append(f)
    return out


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_loop_matches_transformers_trainer_step_for_step(kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_cls = {"sequence": transformers.BertForSequenceClassification,
              "token": transformers.BertForTokenClassification}[kind]
    torch.manual_seed(0)
    ref = hf_cls(transformers.BertConfig(**_SIZES, num_labels=3 if kind == "token" else 2))
    ours = (BertForSequenceClassification(BertConfig(**_SIZES), 2) if kind == "sequence"
            else BertForTokenClassification(BertConfig(**_SIZES), 3))
    ours.load_state_dict(ref.state_dict())
    start = {n: p.detach().clone() for n, p in ours.named_parameters()}
    feats, seed, batch = _features(kind, 22), 5, 3  # 8 batches, the last one of 1 example
    cfg = TrainConfig(learning_rate=3e-3, epochs=1, batch_size=batch, warmup_ratio=0.0, weight_decay=0.01,
                      max_grad_norm=0.5, precision="fp32", progress=False, group_by_length=False)
    _, stats = train(ours, feats, cfg, seed)

    # Trainer, fed the batches our loop drew (its sampler sequential over our shuffled order);
    # warm-up 0, where our schedule and transformers' linear one are the same.
    ordered = [f for b in _batches(feats, batch, True, random.Random(seed), False) for f in b]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), learning_rate=3e-3, num_train_epochs=1, per_device_train_batch_size=batch,
        weight_decay=0.01, warmup_steps=0, lr_scheduler_type="linear", max_grad_norm=0.5, optim="adamw_torch",
        train_sampling_strategy="sequential", use_cpu=True, save_strategy="no", report_to="none",
        disable_tqdm=True, logging_strategy="no", dataloader_num_workers=0, seed=seed)
    trainer = transformers.Trainer(model=ref, args=args, train_dataset=ordered, data_collator=collate)
    out = trainer.train()
    assert out.global_step == stats["steps"] == 8
    theirs = dict(ref.named_parameters())
    diffs = {n: (p.detach() - theirs[n].detach()).abs().max().item() for n, p in ours.named_parameters()}
    worst = max(diffs, key=diffs.get)
    moved = max((p.detach() - start[n]).abs().max().item() for n, p in ours.named_parameters())
    assert moved > 1e-2 and diffs[worst] < 2e-5, (worst, diffs[worst], moved)
