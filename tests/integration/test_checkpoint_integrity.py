"""Checkpoints you can trust (issue 14), with real faults in real 2-rank gloo runs of the trainer.

Every rank is SIGKILLed at points inside a save, an optimizer shard is truncated or gets one
flipped bit, a write fails in the middle of a shard (RLIMIT_FSIZE: the kernel refuses the write
inside torch's C++ writer, half the bytes on disk, as on a full disk): the re-run must continue from a checkpoint that verifies and end with exactly
(bitwise, on CPU) the per-step losses of an uninterrupted run with the same flags.

Run: checkpoints every 2 steps of 8; a fault hits the save of step 4 or the checkpoint of step 6,
and the re-run must continue from step 2 or step 4. Dropout is on, so the RNG states must resume too.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.distributed._spawn import spawn
from tests.distributed.test_zero import _run_trainers, tiny_data, tiny_ds_config, tiny_model_config, trainer_values  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 8
OPTIM = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt_cfg")
    return {"model_config": tiny_model_config(d / "tiny.json", dropout=0.1),
            "ds_config": tiny_ds_config(d / "z2.json", stage=2)}


def _values(configs, data, save_dir, **kw):
    return trainer_values(data=data, save_dir=str(save_dir), train_steps=STEPS, save_interval=2, keep_last=2,
                          eval_interval=0, **configs, **kw)


@pytest.fixture(scope="module")
def uninterrupted(configs, tiny_data, tmp_path_factory):
    """{step: loss} of the run nothing happens to."""
    run = tmp_path_factory.mktemp("ckpt_full") / "run"
    t0 = time.perf_counter()
    (hist,), _ = spawn(_run_trainers, world_size=2, args=([_values(configs, tiny_data, run)],), timeout=600)
    print(f"uninterrupted run: {time.perf_counter() - t0:.1f} s")
    assert len(hist) == STEPS
    return dict(zip(range(1, STEPS + 1), hist))


def _latest(run):
    with open(os.path.join(run, "latest")) as f:
        return f.read().strip()


def _verify_cli(*args):
    return subprocess.run([sys.executable, "-m", "pretrain.verify_checkpoint", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO})


def _export_cli(run, out):
    return subprocess.run([sys.executable, "-m", "pretrain.export_hf", str(run), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO})


def _rerun_and_compare(values, uninterrupted, first_step):
    """Re-run to the end; its steps must be first_step..STEPS with the uninterrupted run's losses."""
    (hist,), _ = spawn(_run_trainers, world_size=2, args=([values],), timeout=600)
    want = [uninterrupted[s] for s in range(first_step, STEPS + 1)]
    assert hist == want, f"the re-run (from step {first_step}) differs from the uninterrupted run"  # bitwise
    assert _latest(values["save_dir"]) == f"step_{STEPS}"
    return hist


# ----------------------------------------------------------------------------------------------
# kill -9 of every rank inside a save


def _kill_every_rank(pid_dir):
    """SIGKILL every rank of the job (their pids were written at start), this one last."""
    me = os.getpid()
    for path in glob.glob(os.path.join(pid_dir, "*.pid")):
        with open(path) as f:
            pid = int(f.read())
        if pid != me:
            os.kill(pid, signal.SIGKILL)
    os.kill(me, signal.SIGKILL)


def _wait_to_be_killed():
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(0.05)
    raise RuntimeError("this rank was never killed")


def _run_and_kill(rank, world_size, values, pid_dir, point):
    """The trainer, with every rank killed at `point` inside the save of step 4:
    before_model_files: rank 0 is about to write the model states, rank 1 its optimizer shard;
    between_optimizer_shards: rank 0's shard is on disk, rank 1's is about to be written;
    before_latest: every file, the integrity record and the rename are done, `latest` not moved."""
    import torch

    from pretrain import checkpoint as ckpt

    with open(os.path.join(pid_dir, f"{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    saving = "step_4" + ckpt.INCOMPLETE
    real_save, real_move_latest = torch.save, ckpt._move_latest

    def save(obj, f, *args, **kwargs):
        if isinstance(f, str) and saving in f:
            if point == "before_model_files":
                if rank == 0 and f.endswith("mp_rank_00_model_states.pt"):
                    _kill_every_rank(pid_dir)
                _wait_to_be_killed()
            if point == "between_optimizer_shards" and rank == 1 and f.endswith(OPTIM.format(1)):
                _wait_to_be_killed()
        out = real_save(obj, f, *args, **kwargs)
        if point == "between_optimizer_shards" and isinstance(f, str) and f.endswith(os.path.join(saving, OPTIM.format(0))):
            _kill_every_rank(pid_dir)
        return out

    def move_latest(run_dir, tag):
        if point == "before_latest" and tag == "step_4":
            _kill_every_rank(pid_dir)
        real_move_latest(run_dir, tag)

    torch.save, ckpt._move_latest = save, move_latest
    return _run_trainers(rank, world_size, [values])


@pytest.mark.parametrize("point", [
    "between_optimizer_shards",
    pytest.param("before_model_files", marks=pytest.mark.slow),
    pytest.param("before_latest", marks=pytest.mark.slow),
])
def test_kill_every_rank_inside_a_save_then_rerun_gives_identical_losses(point, configs, tiny_data, uninterrupted, tmp_path):
    run = tmp_path / "run"
    values = _values(configs, tiny_data, run)
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    with pytest.raises(RuntimeError, match="exited with code -9"):
        spawn(_run_and_kill, world_size=2, args=(values, str(pid_dir), point), timeout=600)

    assert _latest(run) == "step_2"
    on_disk = sorted(os.listdir(run))
    if point == "before_latest":
        assert "step_4" in on_disk and "step_4.incomplete" not in on_disk
        assert _verify_cli(run, "step_4").returncode == 0  # complete, just never named by `latest`
    else:
        assert "step_4.incomplete" in on_disk and "step_4" not in on_disk, on_disk
        if point == "between_optimizer_shards":
            assert os.path.isfile(run / "step_4.incomplete" / OPTIM.format(0))
            assert not os.path.exists(run / "step_4.incomplete" / OPTIM.format(1))

    _rerun_and_compare(values, uninterrupted, first_step=3)
    assert "step_4.incomplete" not in os.listdir(run)  # removed on start
    assert _verify_cli(run).returncode == 0


# ----------------------------------------------------------------------------------------------
# A damaged optimizer shard in the checkpoint `latest` names


def _flip_one_bit_of_the_master_weights(path):
    """Flip mantissa bit 20 (about 10% of the value) of the largest fp32 master weight in a ZeRO
    shard: a change torch.load cannot notice, the quiet corruption a bad disk or cable makes."""
    import torch

    sd = torch.load(path, weights_only=False, map_location="cpu")
    flat = sd["optimizer_state_dict"]["single_partition_of_fp32_groups"][0]
    i = int(flat.abs().argmax())
    lo = max(0, i - 8)
    window = flat[lo:lo + 16].detach().numpy().tobytes()
    with open(path, "rb") as f:
        data = bytearray(f.read())
    at = data.find(window)
    assert at >= 0 and data.find(window, at + 1) < 0, "the weights' bytes are not stored once, as expected"
    data[at + 4 * (i - lo) + 2] ^= 0x10
    with open(path, "wb") as f:
        f.write(data)
    changed = torch.load(path, weights_only=False, map_location="cpu")["optimizer_state_dict"]
    assert float(changed["single_partition_of_fp32_groups"][0][i].detach()) != float(flat[i].detach())  # it loads, silently changed


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _damaged_latest(configs, tiny_data, run, damage):
    values = _values(configs, tiny_data, run)
    spawn(_run_trainers, world_size=2, args=([{**values, "exit_at_step": 6}],), timeout=600)
    assert _latest(run) == "step_6" and sorted(d for d in os.listdir(run) if d.startswith("step_")) == ["step_4", "step_6"]
    shard = run / "step_6" / OPTIM.format(1)
    damage(str(shard))
    return values, shard


def test_bit_flipped_optimizer_shard_is_refused_and_the_run_falls_back(configs, tiny_data, uninterrupted, tmp_path):
    run = tmp_path / "run"
    values, shard = _damaged_latest(configs, tiny_data, run, _flip_one_bit_of_the_master_weights)

    # The command and the export give the same one line: which file, what is wrong.
    r = _verify_cli(run)
    assert r.returncode == 1 and r.stdout == ""
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith("error: checkpoint ") and OPTIM.format(1) in line and "CRC-32" in line
    assert _verify_cli(run, "--no-checksums").returncode == 0  # sizes alone cannot see a flipped bit
    assert _verify_cli(run, "step_4").returncode == 0
    e = _export_cli(run, tmp_path / "hf")
    assert e.returncode == 2 and e.stderr.strip() == line and not os.path.exists(tmp_path / "hf")

    _rerun_and_compare(values, uninterrupted, first_step=5)


@pytest.mark.slow
def test_truncated_optimizer_shard_makes_the_run_fall_back(configs, tiny_data, uninterrupted, tmp_path):
    run = tmp_path / "run"
    values, shard = _damaged_latest(configs, tiny_data, run, _truncate)
    r = _verify_cli(run, "--no-checksums")
    assert r.returncode == 1 and OPTIM.format(1) in r.stderr and "truncated" in r.stderr
    _rerun_and_compare(values, uninterrupted, first_step=5)


# ----------------------------------------------------------------------------------------------
# A full disk in the middle of a save


def _argv(values):
    out = []
    for k, v in values.items():
        out += [f"--{k}" if v else f"--no-{k}"] if isinstance(v, bool) else [f"--{k}", str(v)]
    return out


def _main(rank, world_size, values):
    """pretrain/run.py's main in this rank: (exit code, what it printed to stderr)."""
    import contextlib
    import io

    from pretrain import run

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run.main(_argv(values))
    return code, err.getvalue()


@pytest.mark.slow
def test_no_checkpoint_that_verifies_stops_every_rank_with_what_to_do(configs, tiny_data, tmp_path):
    run = tmp_path / "run"
    values, _ = _damaged_latest(configs, tiny_data, run, _flip_one_bit_of_the_master_weights)
    _flip_one_bit_of_the_master_weights(str(run / "step_4" / OPTIM.format(1)))
    before = {p: os.path.getmtime(p) for p in glob.glob(str(run / "**"), recursive=True)}
    for code, err in spawn(_main, world_size=2, args=(values,), timeout=600):
        assert code == 2, err  # an input error, as when validate finds it
        line = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert len(line) == 1 and "no checkpoint verifies (step_6: " in line[0] and "step_4: " in line[0], err
        assert "use a new --save_dir" in line[0] and "Traceback" not in err
    assert _latest(run) == "step_6"
    assert {p: os.path.getmtime(p) for p in glob.glob(str(run / "**"), recursive=True)} == before  # nothing written


def _run_with_full_disk(rank, world_size, values):
    """pretrain/run.py's main where rank 1's optimizer shard of step 4 cannot be written past half
    its size: RLIMIT_FSIZE with SIGXFSZ ignored makes the kernel refuse the write (EFBIG) as a full
    disk does (ENOSPC), inside torch's own C++ zip writer, which then raises RuntimeError."""
    import io
    import resource

    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if not (rank == 1 and isinstance(f, str) and "step_4" in f and f.endswith(OPTIM.format(1))):
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        size = len(buf.getvalue())
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, limits[1]))
        try:
            return real_save(obj, f, *args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)

    torch.save = save
    return _main(rank, world_size, values)


def test_full_disk_during_a_save_fails_cleanly_and_keeps_latest(configs, tiny_data, uninterrupted, tmp_path):
    run = tmp_path / "run"
    values = _values(configs, tiny_data, run)
    results = spawn(_run_with_full_disk, world_size=2, args=(values,), timeout=600)
    for code, err in results:  # every rank stops with the same line, none hangs in a collective
        assert code == 3, err
        line = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert len(line) == 1 and "Traceback" not in err, err
        assert f"could not save checkpoint step_4 in {run} (rank 1: " in line[0] and OPTIM.format(1) in line[0]
        assert "the write failed" in line[0] and "GiB free there" in line[0]
        assert "`latest` still names step_2" in line[0] and "delete step_N folders older than" in line[0]
    assert results[0][1] == results[1][1]
    assert _latest(run) == "step_2"
    assert sorted(d for d in os.listdir(run) if d.startswith("step_")) == ["step_2"]  # nothing partial at all
    assert _verify_cli(run).returncode == 0
    _rerun_and_compare(values, uninterrupted, first_step=3)


# ----------------------------------------------------------------------------------------------
# I/O errors on rank 0 while it chooses the checkpoint: every rank gets the same answer


def _select_twice(rank, world_size, run):
    """select_for_resume on every rank; then rank 0 meets a file where a save's folder was (it
    cannot clean up) and every rank selects again."""
    import torch.distributed as dist

    from pretrain import checkpoint as ckpt

    dist.init_process_group("gloo")
    first = ckpt.select_for_resume(run, checksums=True)
    if rank == 0:
        with open(os.path.join(run, "step_6.incomplete"), "w"):
            pass
    dist.barrier()
    return first, ckpt.select_for_resume(run, checksums=True)


def test_an_io_error_while_choosing_reaches_every_rank_as_one_line(tmp_path):
    from tests.unit.test_checkpoint_integrity import SHARD, _commit

    run = tmp_path / "run"
    _commit(run, 2, keep_last=9)
    step_4 = _commit(run, 4, keep_last=9)
    # A real read error (EISDIR; the tests may run as root, so no chmod) in a file of `latest`,
    # with the recorded size: the check reports it, and the run falls back.
    (step_4 / SHARD).unlink()
    (step_4 / SHARD).mkdir()
    record = json.loads((step_4 / "integrity.json").read_text())
    record["files"][SHARD]["size"] = os.path.getsize(step_4 / SHARD)
    (step_4 / "integrity.json").write_text(json.dumps(record))
    (first, second), other = spawn(_select_twice, world_size=2, args=(str(run),), timeout=300)
    assert first == ("step_2", None) and other == (first, second)  # both ranks, both answers
    tag, error = second
    assert tag is None and "\n" not in error
    # the leftover it cannot remove, the OS's reason and what to do, on every rank
    assert error.startswith(f"--save_dir {run}: {run}/step_6.incomplete: cannot remove this leftover of an incomplete "
                            "save (") and "Not a directory" in error and error.endswith("delete it by hand (or fix "
                                                                                       "its permissions) and start again")


def _init_from(rank, world_size, path, checksums):
    """--init_from's collective on every rank: the one line each rank raises."""
    import torch.distributed as dist

    from pretrain import checkpoint as ckpt
    from pretrain.trainer import init_weights_on_every_rank

    dist.init_process_group("gloo")
    try:
        init_weights_on_every_rank(path, None, None, 0, 1, checksums=checksums)
    except ckpt.CheckpointError as e:
        return str(e)
    return None


@pytest.mark.slow
def test_init_from_a_damaged_checkpoint_stops_every_rank_with_one_line(tmp_path):
    from tests.unit.test_checkpoint_integrity import SHARD, _commit, _flip_bit

    run = tmp_path / "run"
    _flip_bit(_commit(run, 2) / SHARD)
    # Rank 0 alone verifies, with checksums: both ranks raise its line.
    errors = spawn(_init_from, world_size=2, args=(str(run / "latest"), True), timeout=300)
    assert errors[0] == errors[1] and errors[0].startswith(f"--init_from {run / 'latest'}: checkpoint ")
    assert "CRC-32" in errors[0] and "\n" not in errors[0]
    # --no-verify_checksums is honoured (the flipped bit is not seen); these files are not DeepSpeed's,
    # so reading the weights fails on every rank, and every rank says so instead of one hanging.
    errors = spawn(_init_from, world_size=2, args=(str(run / "latest"), False), timeout=300)
    assert errors[0] == errors[1] and "CRC-32" not in errors[0] and errors[0].startswith(f"--init_from {run / 'latest'}: ")
