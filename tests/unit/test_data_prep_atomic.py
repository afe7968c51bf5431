"""The one write-then-rename helper: all or nothing under the final name, clear errors, cleanup."""
import os

import pytest

from data_prep.atomic import atomic_copy, atomic_json, atomic_write, remove_stale_tmp
from data_prep.errors import DataPrepError


def test_failed_write_leaves_neither_file_nor_tmp(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(str(p)) as f:
            f.write(b"partial")
            raise RuntimeError("killed")
    assert p.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["x.bin"]
    with atomic_write(str(p)) as f:
        f.write(b"new")
    assert p.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["x.bin"]


def test_os_errors_name_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    target = str(blocker / "sub" / "m.json")  # under a regular file: fails even for root
    with pytest.raises(DataPrepError, match=r"file/sub/m.json: cannot write \(Not a directory\)"):
        atomic_json(target, {"a": 1})
    (tmp_path / "adir").mkdir()
    with pytest.raises(DataPrepError, match=r"adir: cannot write \(Is a directory\)"):
        atomic_copy(str(blocker), str(tmp_path / "adir"))
    assert sorted(os.listdir(tmp_path)) == ["adir", "file"]


def test_stale_tmp_files_are_removed_and_nothing_else(tmp_path):
    keep = ["corpus.bin", "notes.tmp", "a.tmp.x", "spm.model"]
    stale = ["corpus.bin.tmp.123", "manifest.json.tmp.9", "spm.model.tmp.42.model", "spm.model.tmp.42.vocab",
             "corpus.bin.tmp.0a1b2c3d.77", "spm.model.tmp.0a1b2c3d.77.model"]
    for n in keep + stale:
        (tmp_path / n).write_text("x")
    assert remove_stale_tmp(str(tmp_path)) == len(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(keep)
    assert remove_stale_tmp(str(tmp_path / "missing")) == 0


def test_temporary_names_carry_the_host(tmp_path, monkeypatch):
    """Two nodes with the same pid writing one file of a shared directory must not share a name."""
    import socket
    import zlib

    from data_prep import atomic

    name = atomic.tmp_name(str(tmp_path / "f"))
    assert name == f"{tmp_path / 'f'}.tmp.{zlib.crc32(socket.gethostname().encode()):08x}.{os.getpid()}"
    monkeypatch.setattr(atomic, "_HOST", "00000001")
    assert atomic.tmp_name(str(tmp_path / "f")) != name
    (tmp_path / os.path.basename(name)).write_text("x")  # left by a killed run on this host
    assert remove_stale_tmp(str(tmp_path)) == 1
