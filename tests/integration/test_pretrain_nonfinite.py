"""Non-finite losses: the step is skipped (weights untouched) and reported; too many in a row stop
the run with a message, and the last complete checkpoint stays the one `latest` names."""
import os

import pytest
import torch

from tests.distributed._spawn import spawn
from tests.distributed.test_zero import final_weights, tiny_data, tiny_ds_config, tiny_model_config, trainer_values  # noqa: F401


def _run(rank, world_size, values):
    from pretrain.config import from_dict, validate
    from pretrain.trainer import NonFiniteError, Trainer

    trainer = Trainer(validate(from_dict(values), world_size=world_size))
    try:
        out = trainer.run()
    except NonFiniteError as e:
        return {"error": str(e)}
    return {"history": out["history"]}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nonfinite_step_is_skipped_then_training_continues(tiny_data, tmp_path, precision):
    model_cfg = tiny_model_config(tmp_path / "tiny.json")
    ds_cfg = tiny_ds_config(tmp_path / "z2.json", stage=2, precision=precision)
    common = dict(ds_config=ds_cfg, model_config=model_cfg, data=tiny_data, train_steps=4)
    # clean run stopped after step 2 = the weights a skipped step 3 must leave in place
    clean = trainer_values(save_dir=str(tmp_path / "clean"), **{**common, "train_steps": 2})
    skip = trainer_values(save_dir=str(tmp_path / "skip"), inject_nonfinite_steps="3", **{**common, "train_steps": 3})
    res_clean = spawn(_run, world_size=1, args=(clean,), timeout=300)[0]
    res_skip = spawn(_run, world_size=1, args=(skip,), timeout=300)[0]
    hist = res_skip["history"]
    assert [h["applied"] for h in hist] == [True, True, False]
    assert hist[2]["loss"] != hist[2]["loss"]  # NaN was reported as such
    assert [h["loss"] for h in hist[:2]] == [h["loss"] for h in res_clean["history"]]
    a, b = final_weights(clean["save_dir"]), final_weights(skip["save_dir"])
    assert all(torch.equal(a[k], b[k]) for k in a), "a skipped step changed the weights"


def test_too_many_nonfinite_steps_stop_without_a_corrupt_checkpoint(tiny_data, tmp_path):
    model_cfg = tiny_model_config(tmp_path / "tiny.json")
    ds_cfg = tiny_ds_config(tmp_path / "z2.json", stage=2)
    values = trainer_values(ds_config=ds_cfg, model_config=model_cfg, data=tiny_data, train_steps=10,
                            save_dir=str(tmp_path / "run"), save_interval=2, inject_nonfinite_steps="3,4,5,6",
                            max_nonfinite_steps=3)
    out = spawn(_run, world_size=1, args=(values,), timeout=300)[0]
    assert "3 consecutive steps with non-finite loss" in out["error"] and "step_2" in out["error"]
    # step 4 would have been a save point: nothing was written for the bad steps
    assert open(os.path.join(values["save_dir"], "latest")).read().strip() == "step_2"
    assert sorted(d for d in os.listdir(values["save_dir"]) if d.startswith("step_")) == ["step_2"]
    weights = final_weights(values["save_dir"])
    assert all(torch.isfinite(v).all() for v in weights.values())
