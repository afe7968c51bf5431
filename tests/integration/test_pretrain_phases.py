"""Two phases: phase 2 (another sequence length, its own schedule) starts from phase 1's weights
via --init_from, with a fresh optimizer and step counter."""
import os

import pytest
import torch

from tests.distributed._spawn import spawn
from tests.distributed.test_zero import final_weights, tiny_ds_config, tiny_model_config, trainer_values


@pytest.fixture(scope="module")
def two_length_data(tmp_path_factory):
    from data_prep.testing import build_tiny_dataset

    return build_tiny_dataset(str(tmp_path_factory.getbasetemp() / "pretrain_tiny_data_64_128"), seq_lengths=(64, 128), n_docs=200)


def _run(rank, world_size, runs):
    from pretrain.config import from_dict, validate
    from pretrain.trainer import Trainer

    return [Trainer(validate(from_dict(v), world_size=world_size)).run()["history"] for v in runs]


def test_phase2_starts_from_phase1_weights(two_length_data, tmp_path):
    from pretrain.data import PretrainingDataset
    from pretrain.hf_io import load_into
    from pretrain.model import BertConfig, BertForPreTraining

    model_cfg = tiny_model_config(tmp_path / "tiny.json")
    ds_cfg = tiny_ds_config(tmp_path / "z2.json", stage=2)
    phase1 = trainer_values(ds_config=ds_cfg, model_config=model_cfg, data=two_length_data, save_dir=str(tmp_path / "p1"),
                            seq_length=64, train_steps=3)
    phase2 = trainer_values(ds_config=ds_cfg, model_config=model_cfg, data=two_length_data, save_dir=str(tmp_path / "p2"),
                            seq_length=128, train_steps=2, init_from=os.path.join(phase1["save_dir"], "latest"),
                            global_batch_size=4, lr=5e-4)
    # one process for both phases: phase 2 builds a fresh engine, reading phase 1 from disk only
    hist2 = spawn(_run, world_size=1, args=([phase1, phase2],), timeout=600)[0][1]

    # Reference: phase 1's final weights (gathered from its checkpoint) on phase 2's first global batch.
    model = BertForPreTraining(BertConfig.from_json_file(model_cfg))
    load_into(model, final_weights(phase1["save_dir"]))
    batch = PretrainingDataset(two_length_data, 128, "train", seed=1234).get_batch(range(4))
    with torch.no_grad():
        want = float(model(**{k: torch.as_tensor(v) for k, v in batch.items()}).loss)
    assert abs(hist2[0]["loss"] - want) < 1e-5, (hist2[0]["loss"], want)
    assert [h["step"] for h in hist2] == [1, 2]

    from pretrain import checkpoint as ckpt

    state = ckpt.read_state(*ckpt.resolve(phase2["save_dir"]))
    assert state["seq_length"] == 128 and state["step"] == 2 and state["consumed_samples"] == 8
