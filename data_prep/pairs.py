"""The precomputed NSP pair index: a fixed-width, memory-mapped array of sentence-run pairs.

One record per (A, B) pair; the tokens stay in the Megatron corpus, so repeating pairs over epochs
or dupe factors costs 13 bytes per pair, not a copy of the text. Format in docs/interfaces.md.
"""
from __future__ import annotations

import os
import struct

import numpy as np

from .atomic import atomic_write, commit, os_error, tmp_name

MAGIC = b"BERTNSP\x00"
VERSION = 1
_HEADER = struct.Struct("<8sIIQII")  # magic, version, seq_length, count, record size, reserved
HEADER_SIZE = _HEADER.size  # 32

PAIR_DTYPE = np.dtype(
    [("a_start", "<u4"), ("b_start", "<u4"), ("a_count", "<u2"), ("b_count", "<u2"), ("is_random", "u1")]
)
assert PAIR_DTYPE.itemsize == 13


class PairIndexError(ValueError):
    pass


def write_pair_index(path: str, seq_length: int, records: np.ndarray) -> None:
    """Write `records` (PAIR_DTYPE) atomically: a reader never sees a partial file under `path`."""
    records = np.ascontiguousarray(records, dtype=PAIR_DTYPE)
    with atomic_write(path, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, seq_length, len(records), PAIR_DTYPE.itemsize, 0))
        f.write(records.tobytes())


class PairIndex:
    """Read-only view of a pair index file; `.pairs` is a memmap of PAIR_DTYPE.

    Opening reads the 32-byte header and the file size only (O(1) whatever the record count: every
    loader worker opens it); records are read when used. Whether they point into the corpus is
    checked by their users: pretrain.data on the records a batch reads, data_prep.verify on all.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(HEADER_SIZE)
        except OSError as e:
            raise PairIndexError(f"cannot read NSP pair index {path}: {e}") from e
        if len(head) < HEADER_SIZE:
            raise PairIndexError(f"{path}: too short to be an NSP pair index (re-run data_prep)")
        magic, version, seq_length, count, rec_size, _ = _HEADER.unpack(head)
        if magic != MAGIC:
            raise PairIndexError(f"{path}: not an NSP pair index (bad magic {magic!r})")
        if version != VERSION or rec_size != PAIR_DTYPE.itemsize:
            raise PairIndexError(
                f"{path}: pair index version {version} / record size {rec_size} unsupported "
                f"(this code reads version {VERSION}, {PAIR_DTYPE.itemsize} bytes); re-run data_prep"
            )
        expected = HEADER_SIZE + count * rec_size
        if size != expected:
            raise PairIndexError(
                f"{path}: {size} bytes but header promises {expected} (truncated or corrupted; re-run data_prep)"
            )
        self.seq_length = seq_length
        self.pairs = (
            np.memmap(path, dtype=PAIR_DTYPE, mode="r", offset=HEADER_SIZE, shape=(count,))
            if count
            else np.zeros(0, dtype=PAIR_DTYPE)
        )

    def __len__(self) -> int:
        return len(self.pairs)


class PairIndexWriter:
    """Streaming writer for the same format: records are appended as they are built, so memory
    does not grow with the number of pairs; the header is filled in and the file renamed into place
    only by `close()` (an interrupted run leaves only a `.tmp` file)."""

    def __init__(self, path: str, seq_length: int):
        self.path = path
        self.seq_length = seq_length
        self.count = 0
        self._tmp = tmp_name(path)
        try:
            self._f = open(self._tmp, "wb")
            self._f.write(b"\x00" * HEADER_SIZE)
        except OSError as e:
            raise os_error(path, "write", e) from e

    def write(self, records: np.ndarray) -> None:
        records = np.ascontiguousarray(records, dtype=PAIR_DTYPE)
        try:
            self._f.write(memoryview(records).cast("B"))  # no copy of the records
        except OSError as e:
            raise os_error(self.path, "write", e) from e
        self.count += len(records)

    def close(self) -> None:
        try:
            self._f.seek(0)
            self._f.write(_HEADER.pack(MAGIC, VERSION, self.seq_length, self.count, PAIR_DTYPE.itemsize, 0))
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        except OSError as e:
            self.abort()
            raise os_error(self.path, "write", e) from e
        commit(self._tmp, self.path)

    def abort(self) -> None:
        self._f.close()
        try:
            os.remove(self._tmp)
        except OSError:
            pass
