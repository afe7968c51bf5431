"""Resume of a packed run (`--pack_sequences`) at another dp size: a dp=2 run stopped at step 4 and
resumed at dp=1 continues the same global sample order and trajectory as the uninterrupted dp=2
run. Packing windows are micro-batches, which differ between dp=2 (each rank every other pair) and
dp=1 (consecutive pairs), so the rows differ after the resume, the pairs and the losses do not.
Slow (~290 s wall, 90 s CPU on the shared 2 cores): the default run's resume check of a packed run is
`tests/distributed/test_unpad_trainer.py` (same dp, bit for bit)."""
import numpy as np
import pytest

from tests.distributed._spawn import spawn
from tests.distributed.test_resume import _losses
from tests.distributed.test_unpad_trainer import SEQ, short_pairs  # noqa: F401
from tests.distributed.test_zero import _run_trainers, final_weights, tiny_ds_config, tiny_model_config, trainer_values


@pytest.mark.slow
def test_packed_run_resumed_at_dp1_from_dp2_continues_the_sample_order(short_pairs, tmp_path):
    model_cfg = tiny_model_config(tmp_path / "tiny.json")
    ds_cfg = tiny_ds_config(tmp_path / "z2.json", stage=2)
    common = dict(ds_config=ds_cfg, model_config=model_cfg, data=short_pairs, seq_length=SEQ, train_steps=8,
                  micro_batch_size=4, pack_sequences=True)
    whole = trainer_values(save_dir=str(tmp_path / "whole"), **common)
    first = trainer_values(save_dir=str(tmp_path / "split"), exit_at_step=4, **common)
    spawn(_run_trainers, world_size=2, args=([whole, first],), timeout=600)
    # Same global batch (8 pairs) on one rank: micro 4 x accumulation 2.
    second = trainer_values(save_dir=str(tmp_path / "split"), **common)
    spawn(_run_trainers, world_size=1, args=([second],), timeout=600)

    from pretrain import checkpoint as ckpt

    state = ckpt.read_state(*ckpt.resolve(str(tmp_path / "split")))
    assert state["step"] == 8 and state["consumed_samples"] == 64 and state["dp"] == 1
    want, got = _losses(whole["save_dir"]), _losses(second["save_dir"])
    assert sorted(got) == sorted(want) == list(range(1, 9))
    assert [got[s] for s in range(1, 5)] == [want[s] for s in range(1, 5)]
    np.testing.assert_allclose([got[s] for s in range(5, 9)], [want[s] for s in range(5, 9)], rtol=0, atol=1e-5)
    a, b = final_weights(whole["save_dir"]), final_weights(second["save_dir"])
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-5, worst
