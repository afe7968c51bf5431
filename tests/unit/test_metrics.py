"""The FLOPs model behind TFLOP/s and MFU (`pretrain.metrics.bert_flops_per_sequence`).

Two independent references: a count written out by hand for one small shape, and the matmul
FLOPs torch's FlopCounterMode records while our BertForPreTraining actually runs (the sparse
path: labels given, so the last layer's output projection and FFN see only [CLS] + masked rows).
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.metrics import bert_flops_per_sequence
from pretrain.model import BertConfig, BertForPreTraining


def test_flops_hand_count():
    # H=32, L=2, I=64, V=100, S=16, M=2 masked tokens -> R = 3 rows leave the last layer.
    layer_full = (
        98_304     # Q/K/V:              3 x 2*S*H^2 = 6*16*1024
        + 32_768   # scores + context:   2 x 2*S^2*H = 4*256*32
        + 32_768   # attention output:   2*S*H^2     = 2*16*1024
        + 131_072  # feed-forward:       2 x 2*S*H*I = 4*16*32*64
    )
    layer_last = (
        98_304     # Q/K/V on all 16 tokens (every token is a key/value)
        + 32_768   # scores + context for all 16 queries
        + 6_144    # attention output on 3 rows: 2*3*1024
        + 24_576   # feed-forward on 3 rows:     4*3*32*64
    )
    heads = (
        4_096      # MLM transform on 2 rows: 2*2*1024
        + 12_800   # MLM decoder on 2 rows:   2*2*32*100
        + 2_048    # pooler on [CLS]:         2*1024
        + 128      # NSP classifier:          2*32*2
    )
    forward = layer_full + layer_last + heads
    assert forward == 475_776
    assert bert_flops_per_sequence(hidden=32, layers=2, intermediate=64, vocab=100, seq=16,
                                   masked=2) == 3 * forward


def _tiny_batch():
    torch.manual_seed(0)
    batch, seq = 3, 16
    input_ids = torch.randint(5, 100, (batch, seq))
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[0, 12:] = 0  # padding still runs through the encoder and is counted
    labels = torch.full((batch, seq), -100)
    # 1, 2 and 2 masked tokens: the formula's `masked` is their mean, 5/3
    for b, pos, tok in ((0, 3, 7), (1, 5, 9), (1, 6, 4), (2, 1, 3), (2, 15, 2)):
        labels[b, pos] = tok
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 8:] = 1
    return input_ids, token_type_ids, attention_mask, labels, torch.tensor([0, 1, 0])


@pytest.mark.parametrize("train", [False, True], ids=["forward", "forward+backward"])
def test_flops_match_the_matmuls_the_model_runs(train):
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    # The decoder multiplies by the padded vocabulary (128 rows), so that is the `vocab` to pass.
    model = BertForPreTraining(config, padded_vocab_size=128)
    model.init_weights()
    model.train(train)
    input_ids, token_type_ids, attention_mask, labels, nsp = _tiny_batch()
    counter = FlopCounterMode(display=False)
    # The math backend runs attention as bmm's, which the counter sees (it has no formula for
    # the fused CPU kernel, which it would report as 0 FLOPs).
    with sdpa_kernel(SDPBackend.MATH), counter:
        out = model(input_ids, token_type_ids, attention_mask, labels=labels, next_sentence_label=nsp)
        if train:
            out.loss.backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert set(counts) <= {"aten.mm", "aten.addmm", "aten.bmm"}, counts  # matmuls only
    assert counts.get("aten.bmm", 0) > 0  # attention was counted

    training_per_sequence = bert_flops_per_sequence(hidden=32, layers=3, intermediate=64, vocab=128,
                                                    seq=16, masked=5 / 3)
    forward_per_sequence = training_per_sequence / 3
    # Three sequences; a training pass (forward + backward) is counted as 3 x forward.
    expected = 3 * (training_per_sequence if train else forward_per_sequence)
    # Both sides count exactly the same matmuls (bias adds, lookups, softmax, LayerNorm and
    # dropout are in neither), so the only slack is float rounding of the mean 5/3.
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-12)
