"""The NSP pair index file: header bytes by hand, streaming writer == one-shot writer, damage found."""
import struct

import numpy as np
import pytest

from data_prep.pairs import PAIR_DTYPE, PairIndex, PairIndexError, PairIndexWriter, write_pair_index


def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    r = np.zeros(n, dtype=PAIR_DTYPE)
    r["a_start"] = rng.integers(0, 2**32, n, dtype=np.uint64)
    r["b_start"] = rng.integers(0, 2**32, n, dtype=np.uint64)
    r["a_count"] = rng.integers(1, 2**16, n)
    r["b_count"] = rng.integers(1, 2**16, n)
    r["is_random"] = rng.integers(0, 2, n)
    return r


def test_header_layout_by_hand(tmp_path):
    p = tmp_path / "p.bin"
    recs = _records(3)
    write_pair_index(str(p), 128, recs)
    raw = p.read_bytes()
    assert raw[:8] == b"BERTNSP\x00"
    assert struct.unpack("<IIQII", raw[8:32]) == (1, 128, 3, 13, 0)
    assert len(raw) == 32 + 3 * 13
    # First record, little-endian, packed: a_start u4, b_start u4, a_count u2, b_count u2, is_random u1.
    r0 = recs[0]
    assert raw[32:45] == struct.pack("<IIHHB", r0["a_start"], r0["b_start"], r0["a_count"], r0["b_count"], r0["is_random"])


def test_streaming_writer_equals_one_shot(tmp_path):
    recs = _records(1000, seed=1)
    write_pair_index(str(tmp_path / "a.bin"), 512, recs)
    w = PairIndexWriter(str(tmp_path / "b.bin"), 512)
    for chunk in np.array_split(recs, 7):
        w.write(chunk)
    assert not (tmp_path / "b.bin").exists()  # nothing under the final name until close()
    w.close()
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    idx = PairIndex(str(tmp_path / "b.bin"))
    assert idx.seq_length == 512 and len(idx) == 1000
    assert idx.pairs.tobytes() == recs.tobytes()


def test_empty_index_and_damage(tmp_path):
    p = tmp_path / "e.bin"
    PairIndexWriter(str(p), 64).close()
    assert len(PairIndex(str(p))) == 0
    full = tmp_path / "f.bin"
    write_pair_index(str(full), 64, _records(10))
    raw = full.read_bytes()
    (tmp_path / "t.bin").write_bytes(raw[:-1])
    with pytest.raises(PairIndexError, match="truncated"):
        PairIndex(str(tmp_path / "t.bin"))
    (tmp_path / "m.bin").write_bytes(b"X" + raw[1:])
    with pytest.raises(PairIndexError, match="bad magic"):
        PairIndex(str(tmp_path / "m.bin"))
    (tmp_path / "s.bin").write_bytes(raw[:10])
    with pytest.raises(PairIndexError, match="too short"):
        PairIndex(str(tmp_path / "s.bin"))
