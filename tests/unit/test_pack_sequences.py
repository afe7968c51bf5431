"""Packed pretraining samples (`pretrain/data.py`: `first_fit`, `pack_batch`, `pack_sequences`):
several NSP pairs per row of seq_length, each with its own positions, segments, attention and
[CLS]. The packed batch holds exactly the unpacked batch's tokens and labels, and the model's MLM
and NSP losses and gradients on it equal the unpacked batch's (fp32, dropout off)."""
import numpy as np
import pytest
import torch

from pretrain.data import PretrainingDataset, first_fit, pack_batch
from pretrain.model import BertConfig, BertForPreTraining
from pretrain.unpad import TokenLayout
from tests.unit._pretrain_fixtures import build_synthetic_dataset, synthetic_vocab
from tests.unit.test_model import randomize_

SEQ = 128
ATOL = 1e-5


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return build_synthetic_dataset(str(tmp_path_factory.mktemp("pack_data")))


def test_first_fit_by_hand():
    # capacity 10: 5 -> row 0; 9 opens row 1; 3 joins row 0 (8); 7 opens row 2; 2 fills row 0 (10)
    row, col, number = first_fit(np.array([5, 9, 3, 7, 2]), 10)
    assert row.tolist() == [0, 1, 0, 2, 0]
    assert col.tolist() == [0, 0, 5, 0, 8]
    assert number.tolist() == [0, 0, 1, 0, 2]
    with pytest.raises(ValueError, match="lengths"):
        first_fit(np.array([3, 11]), 10)


def _unpack(packed, seq):
    """Each pair back in a row of its own, read from the packed rows by its [CLS] and sequence id."""
    flat = {k: packed[k].reshape(-1) for k in ("input_ids", "token_type_ids", "attention_mask", "labels",
                                               "sequence_ids")}
    rows = []
    for cls in packed["cls_positions"].tolist():
        r = cls // seq
        same = (np.arange(seq) >= cls % seq) & (flat["attention_mask"][r * seq:(r + 1) * seq] == 1) & \
               (flat["sequence_ids"][r * seq:(r + 1) * seq] == flat["sequence_ids"][cls])
        rows.append({k: flat[k][r * seq:(r + 1) * seq][same] for k in ("input_ids", "token_type_ids", "labels")})
    return rows


def test_packed_rows_hold_the_same_pairs(data_dir):
    ds = PretrainingDataset(data_dir, SEQ, seed=7)
    indices = np.arange(100, 164)
    plain = ds.get_batch(indices, pack=False)
    packed = ds.get_batch(indices, pack=True)
    assert len(packed["input_ids"]) < len(indices)  # the fixture has short pairs: rows are saved
    lengths = plain["attention_mask"].sum(1)
    for i, pair in enumerate(_unpack(packed, SEQ)):
        for key in ("input_ids", "token_type_ids", "labels"):
            np.testing.assert_array_equal(pair[key], plain[key][i, :lengths[i]], err_msg=f"pair {i} {key}")
    np.testing.assert_array_equal(packed["next_sentence_label"], plain["next_sentence_label"])
    cls_id = synthetic_vocab().index("[CLS]")
    assert (packed["input_ids"].reshape(-1)[packed["cls_positions"]] == cls_id).all()
    assert packed["attention_mask"].sum() == plain["attention_mask"].sum()
    # a pure function of the indices: a fresh dataset (another process) packs the same rows
    again = PretrainingDataset(data_dir, SEQ, seed=7, pack_sequences=True).get_batch(indices)
    for key in packed:
        np.testing.assert_array_equal(again[key], packed[key])


def _losses(model, batch, packed):
    t = {k: torch.as_tensor(v) for k, v in batch.items()}
    kw = {}
    if packed:
        kw = dict(layout=TokenLayout.from_attention_mask(t["attention_mask"], sequence_ids=t["sequence_ids"]),
                  cls_positions=t["cls_positions"])
    model.zero_grad()
    out = model(t["input_ids"], t["token_type_ids"], t["attention_mask"], labels=t["labels"],
                next_sentence_label=t["next_sentence_label"], **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_packed_losses_and_gradients_equal_the_unpacked_batch(data_dir):
    ds = PretrainingDataset(data_dir, SEQ, seed=7)
    indices = np.arange(32)
    plain, packed = ds.get_batch(indices, pack=False), ds.get_batch(indices, pack=True)
    assert len(packed["input_ids"]) < len(indices)
    vocab = len(synthetic_vocab())
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = randomize_(BertForPreTraining(config)).train()
    ref, ref_grads = _losses(model, plain, packed=False)  # padded, one pair per row
    got, grads = _losses(model, packed, packed=True)
    for name in ("mlm_loss", "nsp_loss", "loss"):
        assert abs(getattr(got, name).item() - getattr(ref, name).item()) <= ATOL, name
    # each pair's NSP logits, in sample order, read from its own [CLS]
    torch.testing.assert_close(got.seq_relationship_logits, ref.seq_relationship_logits, atol=ATOL, rtol=0)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, atol=ATOL, rtol=0, msg=n)
