"""The trainer with the unpadded encoder (the default), padded (`--no-unpad`) and with packed NSP
pairs (`--pack_sequences`): one process, fp32, dropout off, the same global batches of pairs.
Unpadding and packing change where the tokens sit, not the math: per-step losses, the held-out
evaluation and the sample accounting must agree within 1e-5."""
import numpy as np
import pytest

from tests.distributed._spawn import spawn
from tests.distributed.test_zero import tiny_ds_config, tiny_model_config, trainer_values

TOL = 1e-5
SEQ = 128  # at 64 the embedded corpus's pairs (two or more sentences) almost never share a row


@pytest.fixture(scope="module")
def short_pairs(tmp_path_factory):
    """The embedded corpus's tiny data set with more short pairs (data_prep's --short-seq-prob 0.5,
    BERT's is 0.1): micro-batches of 4 pairs then pack into ~0.84 rows per pair (0.91 at 0.1)."""
    from data_prep.testing import build_tiny_dataset

    return build_tiny_dataset(str(tmp_path_factory.getbasetemp() / "pretrain_short_pairs"), seq_lengths=(SEQ,),
                              n_docs=200, short_seq_prob=0.5)


def _run(rank, world_size, runs):
    from megatron.core import parallel_state

    from pretrain.config import from_dict, validate
    from pretrain.trainer import Trainer
    from pretrain.unpad import TokenLayout

    # Which encoder ran: attention over a TokenLayout is the unpadded one's (equal losses alone
    # would not tell a trainer that never passed its layout from one that did).
    sequences = []
    attend = TokenLayout.attend

    def counting_attend(self, *args, **kwargs):
        sequences.append(len(self.lengths))
        return attend(self, *args, **kwargs)

    TokenLayout.attend = counting_attend
    out = []
    for values in runs:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        sequences.clear()
        result = Trainer(validate(from_dict(values), world_size=world_size)).run()
        out.append({"losses": [(h["loss"], h["mlm_loss"], h["nsp_loss"]) for h in result["history"]],
                    "eval": result["eval"], "consumed": result["consumed_samples"],
                    "unpadded_attention_calls": len(sequences), "sequences_per_call": sorted(set(sequences))})
    return out


def test_unpadded_and_packed_trainer_steps_equal_the_padded_ones(short_pairs, tmp_path):
    model_cfg = tiny_model_config(tmp_path / "tiny.json")
    ds = tiny_ds_config(tmp_path / "z2.json", stage=2)
    # micro-batches of 4 pairs, 2 accumulated: packing must keep each micro-batch's pairs together
    common = dict(ds_config=ds, model_config=model_cfg, data=short_pairs, seq_length=SEQ, micro_batch_size=4, eval_samples=32)
    interrupted = str(tmp_path / "packed_interrupted")
    runs = [trainer_values(save_dir=str(tmp_path / "padded"), unpad=False, **common),
            trainer_values(save_dir=str(tmp_path / "unpadded"), **common),
            trainer_values(save_dir=str(tmp_path / "packed"), pack_sequences=True, **common),
            # the packed run stopped after step 2 (checkpoint), then re-run to step 4
            trainer_values(save_dir=interrupted, pack_sequences=True, exit_at_step=2, **common),
            trainer_values(save_dir=interrupted, pack_sequences=True, **common)]
    padded, unpadded, packed, first, resumed = spawn(_run, world_size=1, args=(runs,), timeout=900)[0]
    for name, run in (("unpadded", unpadded), ("packed", packed)):
        np.testing.assert_allclose(run["losses"], padded["losses"], rtol=0, atol=TOL, err_msg=name)
        for key in ("mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc", "samples"):
            assert abs(run["eval"][key] - padded["eval"][key]) <= TOL, (name, key)
    assert padded["losses"][-1][0] != padded["losses"][0][0]  # the runs trained
    assert padded["unpadded_attention_calls"] == 0
    # every layer of every micro-batch (train and eval) attended through the layout, one sequence per pair
    assert unpadded["unpadded_attention_calls"] > 0 and packed["unpadded_attention_calls"] > 0
    assert unpadded["sequences_per_call"] == packed["sequences_per_call"] == [4]
    # consumed_samples counts pairs, packed or not: 4 steps of 8 pairs
    assert unpadded["consumed"] == packed["consumed"] == padded["consumed"] == 4 * 8
    # resume of a packed run is sample-exact: the same pairs packed the same way, bit for bit
    assert first["consumed"] == 2 * 8 and resumed["consumed"] == 4 * 8
    assert first["losses"] + resumed["losses"] == packed["losses"]
    # the metrics line says which layout ran (metrics.jsonl holds its values)
    from pretrain.metrics import read_history

    for name, word in (("padded", "unpacked"), ("packed", "packed")):
        train = read_history(str(tmp_path / name / "metrics.jsonl"))["train"]
        assert [r["sequences"] for r in train] == [word] * 4, name


def test_the_short_pairs_pack(short_pairs):
    """Without pairs that share rows the packed run above would equal the unpacked one trivially:
    the micro-batches of 4 pairs the first 4 steps read must pack into fewer rows."""
    from pretrain.data import PretrainingDataset

    ds = PretrainingDataset(short_pairs, SEQ, pack_sequences=True)
    rows = [len(ds.get_batch(range(i, i + 4))["input_ids"]) for i in range(0, 32, 4)]
    assert sum(rows) <= 0.9 * 32, rows
