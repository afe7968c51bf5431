"""Packed NSP pairs on CUDA (`--pack_sequences`): several pairs in one row, each attending only to
itself through the layout's `sequence_ids`, its NSP read from its own [CLS]. The packed batch's
losses, NSP logits and (fp32) gradients must equal the unpacked batch's, for every attention
backend a CUDA run can take (nested/flash for bf16, bucketed dense blocks for both); the CPU
test of the same equality is tests/unit/test_pack_sequences.py."""
import numpy as np
import pytest
import torch

from pretrain.data import PretrainingDataset
from pretrain.model import BertConfig, BertForPreTraining
from pretrain.unpad import TokenLayout
from tests.gpu._common import CUDA
from tests.unit._pretrain_fixtures import build_synthetic_dataset, synthetic_vocab

pytestmark = CUDA

SEQ = 128


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    ds = PretrainingDataset(build_synthetic_dataset(str(tmp_path_factory.mktemp("packed_cuda"))), SEQ, seed=7)
    indices = np.arange(32)
    plain, packed = ds.get_batch(indices, pack=False), ds.get_batch(indices, pack=True)
    assert len(packed["input_ids"]) < len(indices)  # the pairs really share rows
    return plain, packed


def run_packed_and_unpacked(plain, packed, device, dtype, backend):
    """(unpacked out, packed out, unpacked grads, packed grads) of one model on `device`."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(synthetic_vocab()), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertForPreTraining(config).to(device).train()
    model.bert.attention_backend = backend
    results = []
    for batch, is_packed in ((plain, False), (packed, True)):
        t = {k: torch.as_tensor(v) for k, v in batch.items()}
        seq_ids = t["sequence_ids"] if is_packed else None
        layout = TokenLayout.from_attention_mask(t["attention_mask"], sequence_ids=seq_ids).to(device)
        kw = {"cls_positions": t["cls_positions"].to(device)} if is_packed else {}
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            out = model(t["input_ids"].to(device), t["token_type_ids"].to(device), t["attention_mask"].to(device),
                        labels=t["labels"].to(device), next_sentence_label=t["next_sentence_label"].to(device),
                        layout=layout, **kw)
        out.loss.backward()
        results.append((out, {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref, ref_grads), (got, grads) = results
    return ref, got, ref_grads, grads


@pytest.mark.parametrize("dtype,backend", [(torch.bfloat16, "auto"), (torch.bfloat16, "nested"),
                                           (torch.bfloat16, "bucketed"), (torch.float32, "auto"),
                                           (torch.float32, "bucketed")], ids=str)
def test_packed_pairs_equal_the_unpacked_batch_on_cuda(batches, dtype, backend):
    ref, got, ref_grads, grads = run_packed_and_unpacked(*batches, "cuda", dtype, backend)
    rel = 1e-4 if dtype == torch.float32 else 2e-2
    for name in ("mlm_loss", "nsp_loss"):
        a, b = getattr(got, name).float().item(), getattr(ref, name).float().item()
        assert abs(a - b) <= rel * abs(b), (name, a, b)
    torch.testing.assert_close(got.seq_relationship_logits.float(), ref.seq_relationship_logits.float(),
                               atol=rel * 10, rtol=rel * 10)
    if dtype == torch.float32:
        for n, g in ref_grads.items():
            torch.testing.assert_close(grads[n], g, atol=1e-4, rtol=1e-3, msg=n)
