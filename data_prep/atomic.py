"""Write-then-rename, in one place for the whole product (data prep, checkpoints, HF exports,
fine-tuning outputs): a reader never sees a partial file under its final name.

Temporary names are `<final>.tmp.<host>.<pid>` (`<host>`: 8 hex digits of the host name's CRC-32, so
two nodes writing into one shared directory never pick the same name); a run that is killed leaves them behind, and
`remove_stale_tmp` deletes them when the next run starts in that directory. OS errors (read-only
or full disk, a path under a regular file) become `AtomicWriteError`s (a DataPrepError and an
OSError) naming the path.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import zlib
from contextlib import contextmanager
from typing import Callable

from .errors import DataPrepError

# `.model`/`.vocab`: what sentencepiece appends to the temporary prefix it is given.
# Names from before the host tag (`.tmp.<pid>`) are still recognised.
_STALE = re.compile(r"\.tmp\.(?:[0-9a-f]{8}\.)?\d+(\.model|\.vocab)?$")
_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"


def tmp_name(path: str) -> str:
    return f"{path}.tmp.{_HOST}.{os.getpid()}"


class AtomicWriteError(DataPrepError, OSError):
    """A failed write, rename or listing: a DataPrepError whose message names the path and what to
    check, and still an OSError (with the original errno, e.g. ENOSPC) for callers outside data prep."""


def os_error(path: str, action: str, e: OSError) -> AtomicWriteError:
    err = AtomicWriteError(f"{path}: cannot {action} ({e.strerror or e}); check free space and permissions")
    err.errno = e.errno
    return err


def _discard(tmp: str) -> None:
    try:
        os.remove(tmp)
    except OSError:
        pass


def commit(tmp: str, path: str) -> None:
    """Rename a finished temporary file into place."""
    try:
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise os_error(path, "write", e) from e


@contextmanager
def _replacing(path: str):
    """Yields the temporary name; renames it to `path` if the block succeeds, removes it if not."""
    tmp = tmp_name(path)
    try:
        yield tmp
    except OSError as e:
        _discard(tmp)
        raise os_error(path, "write", e) from e
    except BaseException:
        _discard(tmp)
        raise
    commit(tmp, path)


@contextmanager
def atomic_write(path: str, mode: str = "wb", fsync: bool = True, **open_kw):
    """`with atomic_write(p, "w") as f: ...` writes `p.tmp.<host>.<pid>` and renames it on success."""
    with _replacing(path) as tmp, open(tmp, mode, **open_kw) as f:
        yield f
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def atomic_file(path: str, fill: Callable[[str], None], fsync: bool = True) -> None:
    """For writers that take a path, not a file object (safetensors, matplotlib): `fill(tmp)`
    writes the temporary file, which is then fsynced and renamed to `path`."""
    with _replacing(path) as tmp:
        fill(tmp)
        if fsync:
            fsync_path(tmp)


def fsync_path(path: str) -> None:
    """fsync a file, or a directory (to make the renames inside it durable), by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_json(path: str, obj, sort_keys: bool = True) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=sort_keys)
        f.write("\n")


def atomic_copy(src: str, dst: str) -> None:
    if os.path.abspath(src) == os.path.abspath(dst):
        return
    with atomic_write(dst, "wb") as out, open(src, "rb") as f:
        shutil.copyfileobj(f, out, 1 << 22)


def remove_stale_tmp(directory: str) -> int:
    """Delete `*.tmp.<host>.<pid>` (and older `*.tmp.<pid>`) files left by killed runs (call before any
    writer of this run starts)."""
    n = 0
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise os_error(directory, "list", e) from e
    for name in names:
        p = os.path.join(directory, name)
        if _STALE.search(name) and os.path.isfile(p):
            try:
                os.remove(p)
            except OSError as e:
                raise os_error(p, "remove", e) from e
            n += 1
    return n
