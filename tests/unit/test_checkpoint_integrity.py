"""The integrity record, verification, the choice of checkpoint to resume from, pruning and the
verify command, on checkpoint folders committed by the trainer's own commit step (rank 0's part
of `checkpoint.save`: record, fsync, rename, `latest`, prune) without DeepSpeed or processes."""
import fcntl
import json
import os
import re
import zlib

import pytest

from pretrain import checkpoint as ckpt
from pretrain import verify_checkpoint
from pretrain.config import ConfigError, TrainConfig, _check_checkpoint_options

SHARD = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


def _write_files(run, step, size=50_000):
    """The files a save writes into step_N.incomplete, before rank 0 commits them."""
    work = run / f"step_{step}{ckpt.INCOMPLETE}"
    (work / "rng").mkdir(parents=True)
    for i, name in enumerate(["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", SHARD,
                              "rng/rank_0.pt", "rng/rank_1.pt"]):
        (work / name).write_bytes(os.urandom(size + i))
    (work / ckpt.STATE_FILE).write_text(json.dumps(ckpt.state_for_disk({"step": step})))
    return work


def _commit(run, step, keep_last=3, size=50_000):
    """A checkpoint of `step` as a save leaves it: files written into step_N.incomplete, then committed."""
    _write_files(run, step, size)
    assert ckpt._commit(str(run), f"step_{step}", [{"files": {}, "error": None}], keep_last) is None
    return run / f"step_{step}"


def _flip_bit(path, at=1234, bit=3):
    data = bytearray(path.read_bytes())
    data[at] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_commit_records_every_file_and_renames_only_when_complete(tmp_path):
    run = tmp_path / "run"
    tag_dir = _commit(run, 2)
    assert not (run / f"step_2{ckpt.INCOMPLETE}").exists() and (run / "latest").read_text() == "step_2"
    record = json.loads((tag_dir / ckpt.INTEGRITY).read_text())
    on_disk = sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file() and p.name != ckpt.INTEGRITY)
    assert sorted(record["files"]) == on_disk and len(on_disk) == 6
    for name, entry in record["files"].items():  # an independent CRC: zlib over the whole file at once
        data = (tag_dir / name).read_bytes()
        assert entry == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    v = ckpt.verify(str(run), "step_2")
    assert v.ok and v.files == 6 and v.checksums and not v.legacy


def test_crc32_streams_files_larger_than_one_chunk(tmp_path):
    p = tmp_path / "big"
    data = os.urandom(2 * ckpt._CHUNK + 12345)
    p.write_bytes(data)
    assert ckpt.file_crc32(str(p)) == (len(data), f"{zlib.crc32(data):08x}")


@pytest.mark.parametrize("damage, checksums, expected", [
    ("flip", True, f"{SHARD} has CRC-32 .*, the integrity record says"),
    ("truncate", False, f"{SHARD} is 25000 bytes, the integrity record says 50002 \\(truncated"),
    ("delete", False, f"{SHARD} is missing"),
    ("extra", False, "zero_pp_rank_2_mp_rank_00_optim_states.pt is not in the integrity record"),
    ("record", False, "integrity.json is unreadable"),
    ("format", False, "integrity.json is unreadable \\(format 2, this trainer reads format 1\\)"),
    ("tag", False, "integrity.json is unreadable \\(it is the record of 'step_4', not of 'step_2'"),
    ("entry", False, f"integrity.json is unreadable \\(malformed entry for {SHARD}"),
    ("unreadable", True, f"{SHARD} cannot be read \\(.*Is a directory"),
    ("no_record", False, "integrity.json is missing \\(this checkpoint was written with an integrity record"),
])
def test_verify_names_the_file_and_what_is_wrong(tmp_path, damage, checksums, expected):
    run = tmp_path / "run"
    tag_dir = _commit(run, 2)
    shard = tag_dir / SHARD
    if damage == "flip":
        _flip_bit(shard)
        assert ckpt.verify(str(run), "step_2", checksums=False).ok  # sizes alone cannot see it
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:25000])
    elif damage == "delete":
        shard.unlink()
    elif damage == "extra":
        (tag_dir / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(b"x")
    elif damage == "record":
        (tag_dir / ckpt.INTEGRITY).write_text('{"files": {')
    elif damage in ("format", "tag", "entry", "unreadable"):
        record = json.loads((tag_dir / ckpt.INTEGRITY).read_text())
        if damage == "format":
            record["format"] = 2
        elif damage == "tag":
            record["tag"] = "step_4"
        elif damage == "entry":
            record["files"][SHARD] = {"size": "50002"}
        else:  # a real I/O error on read (EISDIR: root can read any file, so no chmod), same recorded size
            shard.unlink()
            shard.mkdir()
            record["files"][SHARD]["size"] = os.path.getsize(shard)
        (tag_dir / ckpt.INTEGRITY).write_text(json.dumps(record))
    else:  # a checkpoint of this trainer that lost its record is not one from before records existed
        (tag_dir / ckpt.INTEGRITY).unlink()
    v = ckpt.verify(str(run), "step_2", checksums=checksums)
    assert not v.ok
    line = ckpt.damage_message(str(run), v)
    assert "\n" not in line and line.startswith(f"checkpoint {run / 'step_2'} is damaged or incomplete: ")
    assert re.search(expected, line), line
    assert verify_checkpoint.main([str(run)]) == 1  # the command reports it, no traceback


def test_incomplete_folders_are_never_verified_exported_or_resolved(tmp_path, capsys):
    run = tmp_path / "run"
    _commit(run, 2)
    work = _write_files(run, 4)  # every file and trainer_state.json there, killed before the record
    v = ckpt.verify(str(run), work.name)
    assert not v.ok and "did not complete" in v.problem
    assert verify_checkpoint.main([str(run), work.name]) == 1
    assert "did not complete" in capsys.readouterr().err
    with pytest.raises(ckpt.CheckpointError, match="did not complete"):
        ckpt.resolve(str(work))
    with pytest.raises(ckpt.CheckpointError, match="did not complete"):
        ckpt.full_weights(str(run), work.name)  # what export_hf and --init_from read through


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4, 6):
        _commit(run, step, keep_last=9)
    _flip_bit(run / "step_6" / SHARD)
    (run / "step_4" / SHARD).write_bytes(b"")  # truncated to nothing
    # A folder newer than `latest` (a save killed just before `latest` moved) is not a candidate.
    _commit(run, 8, keep_last=9)
    (run / "latest").write_text("step_6")

    choice = ckpt.choose_resume(str(run))
    assert choice.tag == "step_2" and choice.latest == "step_6" and choice.fell_back
    assert [v.tag for v in choice.rejected] == ["step_6", "step_4"]
    assert "CRC-32" in choice.rejected[0].problem and "is 0 bytes" in choice.rejected[1].problem
    # Sizes only (what config.validate does on every rank) misses the flipped bit.
    assert ckpt.choose_resume(str(run), checksums=False).tag == "step_6"


def test_resume_with_no_checkpoint_that_verifies_says_what_to_do(tmp_path):
    run = tmp_path / "run"
    _commit(run, 2)
    _flip_bit(run / "step_2" / SHARD)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.choose_resume(str(run))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("no checkpoint verifies (step_2: ") and SHARD in msg
    assert "use a new --save_dir" in msg and "python -m pretrain.verify_checkpoint" in msg


def test_resume_with_an_empty_latest_takes_the_newest_checkpoint_that_verifies(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4):
        _commit(run, step, keep_last=9)
    (run / "latest").write_text("")  # a filesystem that lost the rename's data
    choice = ckpt.choose_resume(str(run))
    assert choice.tag == "step_4" and choice.fell_back
    assert choice.rejected[0].tag == "latest" and "is empty" in choice.rejected[0].problem


def test_resume_of_a_fresh_run_and_of_a_checkpoint_without_a_record(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert ckpt.choose_resume(str(run)).tag is None
    # Written before integrity records: usable (with a warning on start) when its state reads.
    (run / "step_5").mkdir()
    (run / "step_5" / ckpt.STATE_FILE).write_text('{"step": 5}')
    (run / "latest").write_text("step_5")
    choice = ckpt.choose_resume(str(run))
    assert choice.tag == "step_5" and choice.verdict.legacy and not choice.fell_back


def test_prune_keeps_latest_and_never_deletes_when_latest_does_not_verify(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4, 6):
        _commit(run, step, keep_last=2)
    assert sorted(os.listdir(run)) == ["latest", "step_4", "step_6"]
    # `latest` damaged (truncated): pruning must leave the older, good ones alone.
    (run / "step_6" / SHARD).write_bytes(b"x")
    assert ckpt.prune(str(run), keep_last=1) == []
    assert sorted(os.listdir(run)) == ["latest", "step_4", "step_6"]
    # After a fall-back to step_4 and a new save of step_6 replacing the damaged one, pruning resumes.
    ckpt.point_latest(str(run), "step_4")
    _commit(run, 6, keep_last=1)
    assert sorted(os.listdir(run)) == ["latest", "step_6"] and ckpt.verify(str(run), "step_6").ok


def test_incomplete_saves_are_never_candidates_and_are_removed(tmp_path):
    run = tmp_path / "run"
    _commit(run, 2)
    (run / f"step_4{ckpt.INCOMPLETE}").mkdir()  # a save that was killed
    assert ckpt.step_tags(str(run)) == ["step_2"] and ckpt.choose_resume(str(run)).tag == "step_2"
    assert ckpt.remove_incomplete(str(run)) == [f"step_4{ckpt.INCOMPLETE}"]
    assert sorted(os.listdir(run)) == ["latest", "step_2"]


def test_verify_command_exit_codes_and_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    _commit(run, 2)
    _commit(run, 4)
    assert verify_checkpoint.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{run / 'step_4'}: ok, 6 files,") and "CRC-32s match" in out
    _flip_bit(run / "step_4" / SHARD)
    assert verify_checkpoint.main([str(run), "--no-checksums"]) == 0
    capsys.readouterr()
    assert verify_checkpoint.main([str(run)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: checkpoint {run / 'step_4'} is damaged") and SHARD in err
    assert verify_checkpoint.main([str(run), "step_2"]) == 0
    assert verify_checkpoint.main([str(run), "step_9"]) == 1
    assert verify_checkpoint.main([str(tmp_path / "nothing")]) == 2
    assert verify_checkpoint.main([str(tmp_path / "nothing"), "step_2"]) == 2  # not a run directory
    assert verify_checkpoint.main([str(run), "--no-verify_checksums"]) == 0  # the trainer's spelling too


def test_universal_conversions_go_with_their_checkpoint(tmp_path):
    run = tmp_path / "run"
    _commit(run, 2, keep_last=1)
    (run / "step_2_universal").mkdir()
    (run / "step_2_universal" / ".complete").write_text("")
    (run / "latest_universal").write_text("step_2_universal")
    _commit(run, 4, keep_last=1)  # prunes step_2, and so its conversion
    assert sorted(os.listdir(run)) == ["latest", "step_4"]
    # A save that replaces step_4 (after a fall-back) drops the conversion of the old files.
    (run / "step_4_universal").mkdir()
    (run / "step_4_universal" / ".complete").write_text("")
    ckpt.point_latest(str(run), "step_2_gone")
    _commit(run, 4, keep_last=1)
    assert sorted(os.listdir(run)) == ["latest", "step_4"]


def _held_lock(run):
    other = os.open(run / ckpt.LOCK, os.O_RDWR | os.O_CREAT)  # another job's lock (its own open file)
    os.write(other, b"pid 1234 on node7")
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return other


def test_a_second_job_on_the_same_run_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "LOCK_WAIT_S", 0.5)
    run = tmp_path / "run"
    run.mkdir()
    other = _held_lock(run)
    try:
        with pytest.raises(ckpt.CheckpointError, match=r"another run is using this run directory .*pid 1234 on node7.*"
                                                       r"waited 0 s.*delete .*\.run\.lock"):
            ckpt.lock_run_dir(str(run))
    finally:
        os.close(other)  # that job ends: its lock goes with it
    ckpt.lock_run_dir(str(run))


def test_a_lock_freed_while_waiting_is_taken(tmp_path, monkeypatch):
    """A requeued job whose dead predecessor's lock lingers (an NFS lease) starts once it is freed."""
    import threading

    monkeypatch.setattr(ckpt, "LOCK_WAIT_S", 30.0)
    run = tmp_path / "run"
    run.mkdir()
    other = _held_lock(run)
    threading.Timer(1.0, os.close, args=(other,)).start()
    ckpt.lock_run_dir(str(run))
    assert (run / ckpt.LOCK).read_text().startswith(f"pid {os.getpid()} on ")
    assert (run / ckpt.LOCK).read_text().startswith(f"pid {os.getpid()} on ")


@pytest.mark.parametrize("ds, refused", [
    ({"checkpoint": {"use_node_local_storage": True}}, "use_node_local_storage"),
    ({"checkpoint": {"writer": {"type": "fast", "decoupled": True}}}, "writer"),
    ({"datastates_ckpt": {"host_cache_size": 16}}, "datastates_ckpt"),
    ({"checkpoint": {"parallel_write": {"pipeline_stage": True}}}, "parallel_write"),
    ({"nebula": {"enabled": True}}, "nebula"),
])
def test_deepspeed_checkpoint_options_that_break_the_record_are_refused(ds, refused):
    with pytest.raises(ConfigError, match=f"remove .*{refused}.*shared by all nodes"):
        _check_checkpoint_options(TrainConfig(ds_config="z.json"), ds)
    # the same options switched off pass (DeepSpeed's own example config has parallel_write off)
    _check_checkpoint_options(TrainConfig(ds_config="z.json"), {
        "checkpoint": {"use_node_local_storage": False, "parallel_write": {"pipeline_stage": False}},
        "nebula": {"enabled": False}})


def test_an_incomplete_save_that_cannot_be_removed_is_one_clear_line(tmp_path, monkeypatch):
    import shutil

    run = tmp_path / "run"
    _commit(run, 2)
    (run / f"step_4{ckpt.INCOMPLETE}").mkdir()

    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(shutil, "rmtree", refuse)
    with pytest.raises(ckpt.CheckpointError, match=r"step_4\.incomplete: cannot remove this leftover of an "
                                                    r"incomplete save \(.*Permission denied.*\); delete it by hand"):
        ckpt.remove_incomplete(str(run))
    assert sorted(os.listdir(run)) == ["latest", "step_2", f"step_4{ckpt.INCOMPLETE}"]  # nothing else touched
