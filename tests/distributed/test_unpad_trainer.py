"""The trainer with the unpadded encoder (the default), padded (`--no-unpad`) and with packed NSP
pairs (`--pack_sequences`): one process, fp32, dropout off, the same global batches of pairs.
Unpadding and packing change where the tokens sit, not the math: per-step losses, the held-out
evaluation and the sample accounting must agree within 1e-5."""
import numpy as np

from tests.distributed._spawn import spawn
from tests.distributed.test_zero import tiny_data, tiny_ds_config, tiny_model_config, trainer_values  # noqa: F401

TOL = 1e-5


def _run(rank, world_size, runs):
    from megatron.core import parallel_state

    from pretrain.config import from_dict, validate
    from pretrain.trainer import Trainer

    out = []
    for values in runs:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        result = Trainer(validate(from_dict(values), world_size=world_size)).run()
        out.append({"losses": [(h["loss"], h["mlm_loss"], h["nsp_loss"]) for h in result["history"]],
                    "eval": result["eval"], "consumed": result["consumed_samples"]})
    return out


def test_unpadded_and_packed_trainer_steps_equal_the_padded_ones(tiny_data, tmp_path):
    model_cfg = tiny_model_config(tmp_path / "tiny.json")
    ds = tiny_ds_config(tmp_path / "z2.json", stage=2)
    # micro-batches of 4 pairs, 2 accumulated: packing must keep each micro-batch's pairs together
    common = dict(ds_config=ds, model_config=model_cfg, data=tiny_data, micro_batch_size=4, eval_samples=32)
    runs = [trainer_values(save_dir=str(tmp_path / "padded"), unpad=False, **common),
            trainer_values(save_dir=str(tmp_path / "unpadded"), **common)]
    padded, unpadded = spawn(_run, world_size=1, args=(runs,), timeout=600)[0]
    np.testing.assert_allclose(unpadded["losses"], padded["losses"], rtol=0, atol=TOL)
    for key in ("mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc"):
        assert abs(unpadded["eval"][key] - padded["eval"][key]) <= TOL, key
    assert padded["losses"][-1][0] != padded["losses"][0][0]  # the runs trained
    assert unpadded["consumed"] == padded["consumed"] == 4 * 8
