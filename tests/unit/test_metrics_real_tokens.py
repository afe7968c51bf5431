"""TFLOP/s and MFU from real tokens only (`pretrain.metrics.bert_flops`): a hand count for two
sequences of different lengths, the matmuls torch's FlopCounterMode sees while the unpadded model
runs, and the log line's packing word."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.metrics import bert_flops, bert_flops_per_sequence, format_line
from pretrain.model import BertConfig, BertForPreTraining
from pretrain.unpad import TokenLayout


def test_real_length_flops_hand_count():
    # H=32, L=2, I=64, V=100; two sequences of 10 and 6 real tokens (T=16, Q=10^2+6^2=136),
    # 3 masked tokens, 2 [CLS] rows -> 5 rows leave the last layer.
    layer_full = (
        98_304     # Q/K/V:              6*T*H^2 = 6*16*1024
        + 17_408   # scores + context:   4*Q*H   = 4*136*32 (each sequence attends within itself)
        + 32_768   # attention output:   2*T*H^2 = 2*16*1024
        + 131_072  # feed-forward:       4*T*H*I = 4*16*32*64
    )
    layer_last = (
        98_304     # Q/K/V on all 16 real tokens
        + 17_408   # scores + context
        + 10_240   # attention output on 5 rows: 2*5*1024
        + 40_960   # feed-forward on 5 rows:     4*5*32*64
    )
    heads = (
        6_144      # MLM transform on 3 rows: 2*3*1024
        + 19_200   # MLM decoder on 3 rows:   2*3*32*100
        + 4_096    # pooler on 2 [CLS]:       2*2*1024
        + 256      # NSP classifier:          2*2*32*2
    )
    forward = layer_full + layer_last + heads
    assert forward == 476_160
    got = bert_flops(hidden=32, layers=2, intermediate=64, vocab=100, tokens=16, tokens_squared=136, masked=3,
                     sequences=2)
    assert got == 3 * forward
    # The same two sequences padded to 16 columns count 32 tokens (the old log line's figure).
    padded = 2 * bert_flops_per_sequence(hidden=32, layers=2, intermediate=64, vocab=100, seq=16, masked=1.5)
    assert padded > 1.6 * got


def test_real_length_flops_match_the_unpadded_models_matmuls():
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertForPreTraining(config, padded_vocab_size=128)
    model.init_weights()
    torch.manual_seed(0)
    batch, seq, length = 3, 16, 11  # equal lengths: one attention bucket without padding columns
    mask = (torch.arange(seq)[None] < length).long().expand(batch, seq).contiguous()
    input_ids = torch.randint(5, 100, (batch, seq)) * mask
    labels = torch.full((batch, seq), -100)
    for b, pos, tok in ((0, 3, 7), (1, 5, 9), (1, 6, 4), (2, 1, 3), (2, 10, 2)):
        labels[b, pos] = tok
    layout = TokenLayout.from_attention_mask(mask, backend="bucketed")
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        out = model(input_ids, torch.zeros_like(input_ids), mask, labels=labels,
                    next_sentence_label=torch.tensor([0, 1, 0]), layout=layout)
        out.loss.backward()
    want = bert_flops(hidden=32, layers=3, intermediate=64, vocab=128, tokens=batch * length,
                      tokens_squared=batch * length ** 2, masked=5, sequences=batch)
    assert counter.get_total_flops() == pytest.approx(want, rel=1e-12)


def test_log_line_says_whether_pairs_are_packed():
    assert format_line({"step": 3, "sequences": "packed"}).endswith("| skipped n/a | sequences packed")
    assert format_line({"step": 3, "sequences": "unpacked"}).endswith("| sequences unpacked")
