"""The integrity record, verification, the choice of checkpoint to resume from, pruning and the
verify command, on checkpoint folders committed by the trainer's own commit step (rank 0's part
of `checkpoint.save`: record, fsync, rename, `latest`, prune) without DeepSpeed or processes."""
import json
import os
import re
import zlib

import pytest

from pretrain import checkpoint as ckpt
from pretrain import verify_checkpoint

SHARD = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


def _commit(run, step, keep_last=3, size=50_000):
    """A checkpoint of `step` as a save leaves it: files written into step_N.incomplete, then committed."""
    work = run / f"step_{step}{ckpt.INCOMPLETE}"
    (work / "rng").mkdir(parents=True)
    for i, name in enumerate(["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", SHARD,
                              "rng/rank_0.pt", "rng/rank_1.pt"]):
        (work / name).write_bytes(os.urandom(size + i))
    (work / ckpt.STATE_FILE).write_text(json.dumps({"step": step}))
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
    else:
        (tag_dir / ckpt.INTEGRITY).write_text('{"files": {')
    v = ckpt.verify(str(run), "step_2", checksums=checksums)
    assert not v.ok
    line = ckpt.damage_message(str(run), v)
    assert "\n" not in line and line.startswith(f"checkpoint {run / 'step_2'} is damaged or incomplete: ")
    assert re.search(expected, line), line


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
