"""Non-finite losses: the step is skipped (weights untouched) and reported; too many in a row stop
the run with a message, and the last complete checkpoint stays the one `latest` names.

All runs share one spawned process (start-up is most of the cost on CPU)."""
import os

import pytest
import torch

from tests.distributed._spawn import spawn
from tests.distributed.test_zero import final_weights, tiny_data, tiny_ds_config, tiny_model_config, trainer_values  # noqa: F401


def _run_all(rank, world_size, runs):
    from pretrain.config import from_dict, validate
    from pretrain.trainer import NonFiniteError, Trainer

    out = []
    for values in runs:
        try:
            out.append({"history": Trainer(validate(from_dict(values), world_size=world_size)).run()["history"]})
        except NonFiniteError as e:
            out.append({"error": str(e)})
    return out


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nonfinite")
    model_cfg = tiny_model_config(tmp / "tiny.json")
    plan = {}
    for precision in ("fp32", "bf16"):
        common = dict(ds_config=tiny_ds_config(tmp / f"z2_{precision}.json", stage=2, precision=precision),
                      model_config=model_cfg, data=tiny_data)
        # clean run stopped after step 2 = the weights a skipped step 3 must leave in place
        plan[f"clean_{precision}"] = trainer_values(save_dir=str(tmp / f"clean_{precision}"), train_steps=2, **common)
        plan[f"skip_{precision}"] = trainer_values(save_dir=str(tmp / f"skip_{precision}"), train_steps=3,
                                                   inject_nonfinite_steps="3", **common)
    plan["too_many"] = trainer_values(
        ds_config=str(tmp / "z2_fp32.json"), model_config=model_cfg, data=tiny_data, train_steps=10,
        save_dir=str(tmp / "too_many"), save_interval=2, inject_nonfinite_steps="3,4,5,6", max_nonfinite_steps=3)
    results = spawn(_run_all, world_size=1, args=(list(plan.values()),), timeout=600)[0]
    return {name: (values, result) for (name, values), result in zip(plan.items(), results)}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nonfinite_step_is_skipped_then_training_continues(runs, precision):
    clean_values, clean = runs[f"clean_{precision}"]
    skip_values, skip = runs[f"skip_{precision}"]
    hist = skip["history"]
    assert [h["applied"] for h in hist] == [True, True, False]
    assert hist[2]["loss"] != hist[2]["loss"]  # NaN was reported as such
    assert [h["loss"] for h in hist[:2]] == [h["loss"] for h in clean["history"]]
    a, b = final_weights(clean_values["save_dir"]), final_weights(skip_values["save_dir"])
    assert all(torch.equal(a[k], b[k]) for k in a), "a skipped step changed the weights"


def test_too_many_nonfinite_steps_stop_without_a_corrupt_checkpoint(runs):
    values, out = runs["too_many"]
    assert "3 consecutive steps with non-finite loss" in out["error"] and "step_2" in out["error"]
    # step 4 would have been a save point: nothing was written for the bad steps
    assert open(os.path.join(values["save_dir"], "latest")).read().strip() == "step_2"
    assert sorted(d for d in os.listdir(values["save_dir"]) if d.startswith("step_")) == ["step_2"]
    weights = final_weights(values["save_dir"])
    assert all(torch.isfinite(v).all() for v in weights.values())
