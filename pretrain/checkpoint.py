"""Checkpoints of a run directory: DeepSpeed's engine state plus what exact resume needs.

Layout of RUN_DIR (one folder per saved step, DeepSpeed's own files inside):

    RUN_DIR/latest                      # the tag of the newest complete checkpoint (DeepSpeed's format)
    RUN_DIR/step_<N>/                   # DeepSpeed files (mp_rank_*, *_optim_states.pt) ...
    RUN_DIR/step_<N>/rng/rank_<r>.pt    # every rank's python/numpy/torch RNG states
    RUN_DIR/step_<N>/trainer_state.json # step, consumed samples, resolved config, model config, world
    RUN_DIR/step_<N>/vocab.txt          # the tokenizer, so export needs nothing but this folder
    RUN_DIR/step_<N>/integrity.json     # name, size and CRC-32 of every file above, written last
    RUN_DIR/step_<N>.incomplete/        # a save in progress (or killed, or failed): never loaded
    RUN_DIR/step_<N>_universal/         # its conversion for a resume at another dp (DeepSpeed's format)
    RUN_DIR/.run.lock                   # flock held by rank 0 of the job using RUN_DIR (one job at a time)

A save writes into `step_<N>.incomplete`. Each rank fsyncs and checksums the files it wrote (the
DeepSpeed checkpoint engine's writes are recorded as they happen); rank 0 gathers the records,
covers anything else found in the folder, writes `integrity.json`, fsyncs the folders, renames the
folder to `step_<N>`, and only then moves `latest` (write-then-rename, directory fsynced). So a
folder named `step_<N>` is complete by construction, and `latest` never names anything else.
Any exception of a write on any rank (a full disk: torch's zip writer raises RuntimeError, not
OSError) is gathered instead of raised inside DeepSpeed's collectives, and so is any failure of
rank 0's own steps, so every rank stops with the same `CheckpointSaveError` and `latest` stays
where it was. `trainer_state.json` records `integrity_format`, so a new checkpoint that lost its
`integrity.json` is not mistaken for one written before integrity records.

On start `select_for_resume` (every rank) verifies the checkpoint `latest` names (sizes, and
CRC-32s unless --no-verify_checksums; each rank reads a slice of its files, rank 0 decides) and
falls back to the newest older one that verifies (`choose_resume`). DeepSpeed's own
`latest` handling is turned off (save_latest=False) because it writes `latest` before the
trainer's extra files exist.
"""
from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import random
import re
import shutil
import socket
import tempfile
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from data_prep.atomic import atomic_write, fsync_path
from pretrain.model import BertForPreTraining
from pretrain.quiet import captured_output
from pretrain.tensor_parallel import universal_checkpoint_patterns, unshard_state_dicts
from pretrain.vocab import resize_vocab

log = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "trainer_state.json"
INTEGRITY = "integrity.json"
INCOMPLETE = ".incomplete"
INTEGRITY_FORMAT = 1
_TAG_RE = re.compile(r"^step_(\d+)$")
_CHUNK = 8 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, damaged, not this trainer's); one line."""


class CheckpointSaveError(RuntimeError):
    """A save that could not complete (a full disk, an I/O error); `latest` was not moved."""


def tag_for(step: int) -> str:
    return f"step_{step}"


def _step_of(tag: str) -> Optional[int]:
    m = _TAG_RE.match(tag or "")
    return int(m.group(1)) if m else None


def latest_tag(run_dir: str) -> Optional[str]:
    """The tag `latest` names (None for a fresh run). Whether that checkpoint is usable is
    `verify`'s question, answered on start by `choose_resume`."""
    path = os.path.join(run_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


def resolve(path: str) -> tuple[str, str]:
    """RUN_DIR, RUN_DIR/latest or RUN_DIR/step_N -> (run_dir, tag). The checkpoint is not
    verified here: readers of its weights go through `full_weights`, which is."""
    path = os.path.normpath(path)
    if os.path.basename(path).endswith(INCOMPLETE):
        raise CheckpointError(_incomplete_problem(path))
    if os.path.isdir(path) and (_step_of(os.path.basename(path)) is not None
                                or os.path.isfile(os.path.join(path, STATE_FILE))):
        return os.path.dirname(path) or ".", os.path.basename(path)
    if os.path.basename(path) == LATEST:
        path = os.path.dirname(path) or "."
    if os.path.isdir(path):
        tag = latest_tag(path)
        if tag:
            return path, tag
    raise CheckpointError(
        f"{path}: not a checkpoint of this trainer (expected RUN_DIR, RUN_DIR/latest or RUN_DIR/step_N "
        f"containing {STATE_FILE})"
    )


def _incomplete_problem(where: str) -> str:
    return (f"{where} is a save that did not complete (killed or failed; its name ends in {INCOMPLETE}) and is never "
            "loaded; use a step_N folder of the same run directory")


def read_state(run_dir: str, tag: str) -> dict:
    with open(os.path.join(run_dir, tag, STATE_FILE)) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# Integrity record: one CRC-32 per file (zlib's, ~1 GB/s from the page cache, docs/pretrain.md)
# catches every flipped bit and burst up to 32 bits; sizes catch truncation without reading.


def file_crc32(path: str) -> tuple[int, str]:
    """(size, CRC-32 as 8 hex digits), streamed in 8 MiB chunks."""
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return size, f"{crc:08x}"


def _durable_entry(path: str) -> dict:
    """fsync a finished file, then its size and checksum (read back from the page cache)."""
    fsync_path(path)
    size, crc = file_crc32(path)
    return {"size": size, "crc32": crc}


@dataclass
class Verdict:
    """What `verify` found: `problem` is None for a usable checkpoint."""

    tag: str
    problem: Optional[str] = None
    files: int = 0
    bytes: int = 0
    checksums: bool = False
    legacy: bool = False  # written before integrity records: readable, but nothing to check against

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify(run_dir: str, tag: str, checksums: bool = True, share: tuple[int, int] = (0, 1)) -> Verdict:
    """Check `run_dir/tag` against its integrity record: every file present with its size (and,
    with `checksums`, its CRC-32), and no loadable `.pt` file the record does not know. Never
    raises: an unreadable file is a problem like any other. `share` = (i, n) checks only every
    n-th recorded file from the i-th (the start-up check splits the reading across the ranks)."""
    tag_dir = os.path.join(run_dir, tag)
    if tag.endswith(INCOMPLETE):
        return Verdict(tag, _incomplete_problem(tag_dir))
    if not os.path.isdir(tag_dir):
        return Verdict(tag, f"{tag_dir} is missing")
    record_path = os.path.join(tag_dir, INTEGRITY)
    if not os.path.isfile(record_path):
        return _verify_legacy(run_dir, tag)
    try:
        files = _read_record(record_path, tag)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return Verdict(tag, f"{record_path} is unreadable ({one_line(e)})")
    total = 0
    for name in sorted(files)[share[0]::share[1]]:
        problem, size = _check_file(tag_dir, name, files[name], checksums)
        if problem:
            return Verdict(tag, problem)
        total += size
    try:
        on_disk = _files_under(tag_dir)
    except OSError as e:
        return Verdict(tag, f"{tag_dir} cannot be listed ({one_line(e)})")
    extra = sorted(n for n in on_disk if n.endswith(".pt") and n not in files)
    if extra:
        return Verdict(tag, f"{extra[0]} is not in the integrity record (a file added after the save)")
    return Verdict(tag, None, files=len(sorted(files)[share[0]::share[1]]), bytes=total, checksums=checksums)


def _read_record(record_path: str, tag: str) -> dict:
    """The record's {file: {"size", "crc32"}}, after checking its format, its tag and the shape of
    every entry (raises ValueError with what is wrong)."""
    with open(record_path) as f:
        record = json.load(f)
    if record.get("format") != INTEGRITY_FORMAT:
        raise ValueError(f"format {record.get('format')!r}, this trainer reads format {INTEGRITY_FORMAT}")
    if record.get("tag") != tag:
        raise ValueError(f"it is the record of {record.get('tag')!r}, not of {tag!r} (a folder renamed or copied over)")
    files = record["files"]
    for name, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("crc32"), str)):
            raise ValueError(f"malformed entry for {name}: {entry!r}")
    return files


def _check_file(tag_dir: str, name: str, want: dict, checksums: bool) -> tuple[Optional[str], int]:
    """(problem or None, size) of one recorded file; an I/O error is a problem, never raised."""
    path = os.path.join(tag_dir, name)
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return f"{name} is missing (the integrity record lists it)", 0
    except OSError as e:
        return f"{name} cannot be read ({one_line(e)})", 0
    if size != want["size"]:
        return f"{name} is {size} bytes, the integrity record says {want['size']} (truncated or overwritten)", size
    if checksums:
        try:
            _, crc = file_crc32(path)
        except OSError as e:
            return f"{name} cannot be read ({one_line(e)})", size
        if crc != want["crc32"]:
            return (f"{name} has CRC-32 {crc}, the integrity record says {want['crc32']} "
                    "(its bytes changed after it was written)"), size
    return None, size


def one_line(e: BaseException) -> str:
    """An exception as one short line (torch's C++ errors carry newlines and stack frames)."""
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    text = " ".join(text.split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.filename}: {text}"
    return text if len(text) <= 1000 else text[:997] + "..."


def _verify_legacy(run_dir: str, tag: str) -> Verdict:
    """A `step_N` folder without a record: written before integrity records existed (saves now
    write into `.incomplete` folders, so a folder under its final name was complete once).
    Usable if its trainer state reads; nothing else can be checked."""
    path = os.path.join(run_dir, tag, STATE_FILE)
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        return Verdict(tag, f"{path} is missing and there is no {INTEGRITY} (not a complete checkpoint)")
    except (OSError, ValueError) as e:
        return Verdict(tag, f"{path} is unreadable ({one_line(e)})")
    if isinstance(state, dict) and "integrity_format" in state:
        return Verdict(tag, f"{INTEGRITY} is missing (this checkpoint was written with an integrity record; "
                            "it is incomplete or was copied without it)")
    return Verdict(tag, None, legacy=True)


def _files_under(tag_dir: str) -> list[str]:
    out = []
    for root, dirs, names in os.walk(tag_dir):
        dirs.sort()
        out += [os.path.relpath(os.path.join(root, n), tag_dir) for n in sorted(names)]
    return [n for n in out if n != INTEGRITY and not os.path.basename(n).startswith(".nfs")]


def damage_message(run_dir: str, verdict: Verdict) -> str:
    """The one line every reader (resume, export, the verify command) reports a bad checkpoint with."""
    return f"checkpoint {os.path.join(run_dir, verdict.tag)} is damaged or incomplete: {verdict.problem}"


def check(run_dir: str, tag: str, checksums: bool = True) -> Verdict:
    """`verify`, raising CheckpointError with `damage_message` for a bad checkpoint."""
    verdict = verify(run_dir, tag, checksums)
    if not verdict.ok:
        raise CheckpointError(damage_message(run_dir, verdict))
    if verdict.legacy:
        log.warning("%s has no %s (written before integrity records): its files cannot be verified",
                    os.path.join(run_dir, tag), INTEGRITY)
    return verdict


# ----------------------------------------------------------------------------------------------
# Which checkpoint to resume from


@dataclass
class ResumeChoice:
    tag: Optional[str]  # None: a fresh run
    latest: Optional[str] = None  # what `latest` named
    rejected: list = field(default_factory=list)  # Verdicts of the newer checkpoints that failed
    verdict: Optional[Verdict] = None

    @property
    def fell_back(self) -> bool:
        return bool(self.rejected)


def step_tags(run_dir: str) -> list[str]:
    """Complete-looking `step_N` folders, newest first (`.incomplete` ones never match)."""
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return []
    tags = [(s, d) for d in names if (s := _step_of(d)) is not None and os.path.isdir(os.path.join(run_dir, d))]
    return [d for _, d in sorted(tags, reverse=True)]


def choose_resume(run_dir: str, checksums: bool = True,
                  verify_fn: Optional[Callable[[str], Verdict]] = None) -> ResumeChoice:
    """The checkpoint to continue from: the one `latest` names if it verifies, else the newest
    older one that does. Folders newer than `latest` are saves that never became `latest`
    (killed before it moved): not candidates. Raises CheckpointError when none verifies.
    Pure (no logging, no writes): `config.validate` calls it on every rank with sizes only.
    `verify_fn(tag)` replaces `verify` (the start-up check verifies on every rank at once)."""
    latest = latest_tag(run_dir)
    if latest is None:
        return ResumeChoice(None)
    rejected = []
    latest_step = _step_of(latest)
    older = [t for t in step_tags(run_dir) if latest_step is None or _step_of(t) < latest_step]
    if latest:
        candidates = [latest] + [t for t in older if t != latest]
    else:  # an empty `latest` (a filesystem that lost the rename's data): every folder is a candidate
        candidates = older
        rejected.append(Verdict(LATEST, f"{os.path.join(run_dir, LATEST)} is empty"))
    for tag in candidates:
        verdict = verify_fn(tag) if verify_fn else verify(run_dir, tag, checksums)
        if verdict.ok:
            return ResumeChoice(tag, latest, rejected, verdict)
        if tag == latest and not os.path.isdir(os.path.join(run_dir, tag)):
            verdict.problem = (f"{os.path.join(run_dir, LATEST)} names checkpoint {tag!r} but "
                               f"{os.path.join(run_dir, tag)} is missing")
        rejected.append(verdict)
    found = "; ".join(f"{v.tag}: {v.problem}" for v in rejected) or "no step_N folders"
    raise CheckpointError(
        f"no checkpoint verifies ({found}); point `latest` at an earlier complete step_N, "
        "restore the folder from a copy, or use a new --save_dir (--init_from an export to keep the weights); "
        f"`python -m pretrain.verify_checkpoint {run_dir} step_N` checks one"
    )


def select_for_resume(run_dir: str, checksums: bool) -> tuple[Optional[str], Optional[str]]:
    """Every rank on start (collective): (tag to resume from or None, error line or None), the
    same on every rank. Rank 0 decides: it locks the run directory (`lock_run_dir`), removes
    `.incomplete` folders, walks the candidates, logs every rejected checkpoint in one line and a
    fall-back, and points `latest` at the chosen checkpoint after a fall-back. The reading is
    shared: for each candidate every rank checks its slice of the files and rank 0 takes the
    gathered verdicts, so the start-up check costs 1/world of the checkpoint per rank. Never
    raises and never leaves a rank in a collective: any failure becomes the error line."""
    if dist.get_rank() != 0:
        while (tag := _broadcast(None)) is not None:
            _verify_share(run_dir, tag, checksums)
        return _broadcast(None)
    try:
        result = _select_for_resume(run_dir, checksums, lambda tag: _shared_verify(run_dir, tag, checksums)), None
    except CheckpointError as e:
        result = None, f"--save_dir {run_dir}: {e}"
    except Exception as e:  # an I/O error reading or writing RUN_DIR: every rank must hear of it
        result = None, (f"--save_dir {run_dir}: cannot choose a checkpoint to resume from ({one_line(e)}); check "
                        "that the filesystem is mounted, readable and writable, or use a new --save_dir")
    _broadcast(None)  # the other ranks stop verifying
    return _broadcast(result)


def _verify_share(run_dir: str, tag: str, checksums: bool) -> list:
    """This rank's slice of `tag`'s check, gathered from every rank (a collective that cannot raise
    before it is entered)."""
    try:
        mine = verify(run_dir, tag, checksums, share=(dist.get_rank(), dist.get_world_size()))
    except Exception as e:
        mine = Verdict(tag, f"cannot be checked on rank {dist.get_rank()} ({one_line(e)})")
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return parts


def _shared_verify(run_dir: str, tag: str, checksums: bool) -> Verdict:
    """Rank 0: ask every rank to check its slice of `tag`, and combine their verdicts."""
    _broadcast(tag)
    parts = _verify_share(run_dir, tag, checksums)
    bad = next((v for v in parts if not v.ok), None)
    if bad is not None:
        return bad
    return Verdict(tag, None, files=sum(v.files for v in parts), bytes=sum(v.bytes for v in parts),
                   checksums=checksums, legacy=parts[0].legacy)


def _select_for_resume(run_dir: str, checksums: bool, verify_fn: Callable[[str], Verdict]) -> Optional[str]:
    lock_run_dir(run_dir)
    gone = remove_incomplete(run_dir)
    if gone:
        log.info("removed %s: saves that did not complete (killed or failed)", ", ".join(gone))
    choice = choose_resume(run_dir, checksums=checksums, verify_fn=verify_fn)
    for verdict in choice.rejected:
        log.error("%s", damage_message(run_dir, verdict))
    v = choice.verdict
    if choice.fell_back:
        log.warning("falling back to %s, the newest checkpoint that verifies (`latest` named %s, now moved back; the "
                    "damaged folder is left for inspection and replaced when the run saves that step again)",
                    os.path.join(run_dir, choice.tag), choice.latest or "nothing")
        point_latest(run_dir, choice.tag)
    if v is not None and v.legacy:
        log.warning("%s has no %s (written before integrity records): its files cannot be verified",
                    os.path.join(run_dir, choice.tag), INTEGRITY)
    elif v is not None:
        log.info("checkpoint %s verified: %d files, %.1f MiB, sizes%s", os.path.join(run_dir, choice.tag), v.files,
                 v.bytes / 2**20, " and CRC-32s" if v.checksums else " (checksums skipped: --no-verify_checksums)")
    return choice.tag


LOCK = ".run.lock"
LOCK_WAIT_S = 120.0  # how long a busy lock is retried before a start is refused (NFS lease of a dead node)
_LOCKS: dict[str, int] = {}  # run directory (real path) -> the open, locked file, held until exit


def lock_run_dir(run_dir: str) -> None:
    """Rank 0 on start: an exclusive flock on RUN_DIR/.run.lock, held for the life of the process
    (the kernel drops it when the process dies, however it dies), so a second job on the same run
    directory stops before it deletes the first one's save in progress or moves its `latest`.
    A filesystem without locks (ENOLCK, EOPNOTSUPP) only gets a warning."""
    key = os.path.realpath(run_dir)
    if key in _LOCKS:
        return  # this process holds it already (a second trainer in one process)
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            # A requeued job can find its own dead predecessor's lock still held: an NFS server keeps a
            # crashed node's lock until its lease ends (~90 s on NFSv4). Wait that out before refusing.
            if time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise CheckpointError(
                f"another run is using this run directory ({path} is locked by {holder or 'another process'}, "
                f"waited {LOCK_WAIT_S:.0f} s); two jobs must not share one: wait for that one to end, or use another "
                f"--save_dir; if no other job runs (a crashed node's NFS lock can outlive it), delete {path}"
            ) from None
        except OSError as e:
            os.close(fd)
            log.warning("cannot lock %s (%s): a second job on this run directory would not be detected", path,
                        one_line(e))
            return
    os.ftruncate(fd, 0)
    job = os.environ.get("SLURM_JOB_ID")
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}{f' (SLURM job {job})' if job else ''}\n".encode(), 0)
    _LOCKS[key] = fd


def point_latest(run_dir: str, tag: str) -> None:
    """Move `latest` to `tag`: write-then-rename, then the directory fsynced (the rename durable)."""
    with atomic_write(os.path.join(run_dir, LATEST), "w", encoding="utf-8") as f:
        f.write(tag)
    fsync_path(run_dir)


def remove_incomplete(run_dir: str) -> list[str]:
    """Delete `step_N.incomplete` folders (saves killed or failed; never loadable); rank 0, on start."""
    gone = []
    for name in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        if name.endswith(INCOMPLETE) and _step_of(name[: -len(INCOMPLETE)]) is not None:
            path = os.path.join(run_dir, name)
            try:
                shutil.rmtree(path)
            except OSError as e:
                # A save of that step would collide with it later: stop now, with the fix in one line.
                raise CheckpointError(f"{path}: cannot remove this leftover of an incomplete save ({one_line(e)}); "
                                      "delete it by hand (or fix its permissions) and start again") from e
            gone.append(name)
    return gone


# ----------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Save / load (collective: every rank calls these)


class _Writes:
    """The files this rank wrote into the folder being saved, each fsynced, sized and checksummed
    right after it was written (in parallel across ranks, from this rank's page cache). Any exception
    is kept, not raised: a rank that raised inside DeepSpeed's save would leave the others waiting
    in its collectives; instead every rank finishes the save's collectives and they agree after.
    Not only OSError: torch.save on a full disk raises RuntimeError from its C++ writers."""

    def __init__(self, tag_dir: str):
        self.tag_dir = tag_dir
        self.files: dict[str, dict] = {}
        self.error: Optional[str] = None

    def write(self, path: str, fill: Callable[[str], None]) -> None:
        if self.error is not None:
            return  # the disk already failed this rank: skip the rest, the save is lost anyway
        try:
            fill(path)
            self.files[os.path.relpath(path, self.tag_dir)] = _durable_entry(path)
        except Exception as e:
            self.fail(path, e)

    def fail(self, path: str, e: BaseException) -> None:
        # torch's writers do not say why a write failed ("unexpected pos 704 vs 598"): say it
        # was the write, and how much space is left.
        what = one_line(e) if isinstance(e, OSError) else f"the write failed: {one_line(e)}"
        self.error = self.error or f"{path}: {what} ({free_space(path)})"


def free_space(path: str) -> str:
    """What is left on the filesystem of `path`, for the save error (the writer's own message
    often does not say the disk is full)."""
    d = path
    while d and not os.path.isdir(d):
        d = os.path.dirname(d)
    try:
        st = os.statvfs(d or ".")
    except OSError:
        return "free space unknown"
    return f"{st.f_bavail * st.f_frsize / 2**30:.2f} GiB free there"


@contextmanager
def _recording(engine, writes: _Writes):
    """Route the DeepSpeed engine's checkpoint writes through `writes` for one save, and keep a
    failure of its one write outside that engine (rank 0 copies zero_to_fp32.py into RUN_DIR)."""
    ce = engine.checkpoint_engine
    original = ce.save
    copy_script = getattr(engine, "_copy_recovery_script", None)

    def save(state_dict, path):
        writes.write(path, lambda p: original(state_dict, p))

    def copy_recovery_script(save_path):
        try:
            copy_script(save_path)
        except Exception as e:
            writes.fail(save_path, e)

    ce.save = save
    if copy_script is not None:
        engine._copy_recovery_script = copy_recovery_script
    try:
        yield
    finally:
        del ce.save  # the instance attributes shadowed the classes' methods
        if copy_script is not None:
            del engine._copy_recovery_script


def save(engine, run_dir: str, step: int, state: dict, keep_last: int, vocab_file: Optional[str] = None,
         extra: Optional[dict] = None) -> str:
    """Write checkpoint `step_<step>` (see the module docstring for the order that makes it
    crash-safe), move `latest` to it, prune old ones. Raises CheckpointSaveError on every rank
    if any rank could not write; no rank is left waiting in a collective."""
    rank = dist.get_rank()
    tag = tag_for(step)
    work_tag = tag + INCOMPLETE
    work_dir = os.path.join(run_dir, work_tag)
    error = None
    if rank == 0 and os.path.isdir(work_dir):
        try:
            shutil.rmtree(work_dir)  # a killed save of this step: never mix old and new files
        except Exception as e:
            error = f"rank 0: cannot remove {work_dir}: {one_line(e)}"
    _raise_save_error(run_dir, tag, _broadcast(error))
    writes = _Writes(work_dir)
    client = {"trainer": state, "iteration": step, "universal_checkpoint_info": universal_info()}
    with _recording(engine, writes):
        engine.save_checkpoint(run_dir, tag=work_tag, client_state=client, save_latest=False)
    writes.write(os.path.join(work_dir, "rng", f"rank_{rank}.pt"), lambda p: _save_rng(p, extra))
    if rank == 0:
        if vocab_file and os.path.isfile(vocab_file):
            writes.write(os.path.join(work_dir, os.path.basename(vocab_file)), lambda p: shutil.copyfile(vocab_file, p))
        writes.write(os.path.join(work_dir, STATE_FILE), lambda p: _write_json(p, state_for_disk(state)))
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {"files": writes.files, "error": writes.error})
    error = next((f"rank {r}: {p['error']}" for r, p in enumerate(parts) if p["error"]), None)
    message = None
    if rank == 0:
        if error is None:
            error = _commit(run_dir, tag, parts, keep_last)
        if error is not None:
            message = _save_error_message(run_dir, tag, error)
    _raise_save_error(run_dir, tag, _broadcast(message), formatted=True)
    log.info("saved checkpoint %s", os.path.join(run_dir, tag))
    return os.path.join(run_dir, tag)


def state_for_disk(state: dict) -> dict:
    """trainer_state.json's content: the state plus `integrity_format`, so that a checkpoint of
    this trainer that lost its integrity.json is never taken for one written before integrity
    records (`_verify_legacy`)."""
    return {**state, "integrity_format": INTEGRITY_FORMAT}


def _save_error_message(run_dir: str, tag: str, error: str) -> str:
    """Rank 0, after a failed save: free what it wrote (its name says incomplete anyway) and say
    where `latest` stands and what to do, in one line."""
    shutil.rmtree(os.path.join(run_dir, tag + INCOMPLETE), ignore_errors=True)
    try:
        previous = latest_tag(run_dir) or "nothing (no checkpoint yet)"
    except Exception as e:
        previous = f"an unreadable file ({one_line(e)})"
    return (f"could not save checkpoint {tag} in {run_dir} ({error}); `latest` still names {previous}. Free space on "
            f"that filesystem (delete step_N folders older than the one `latest` names: pruning by --keep_last runs "
            "only after a save succeeds), or point --save_dir elsewhere, and re-run the same command to continue "
            "from there")


def _raise_save_error(run_dir: str, tag: str, error: Optional[str], formatted: bool = False) -> None:
    """Every rank calls this with the broadcast error, so every rank raises the same line."""
    if error is None:
        return
    if not formatted:
        error = (f"could not save checkpoint {tag} in {run_dir} ({error}); fix that (permissions, the filesystem) or "
                 "point --save_dir elsewhere, and re-run the same command")
    raise CheckpointSaveError(error)


def _save_rng(path: str, extra: Optional[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"rng": rng_state(), **(extra or {})}, path)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def _commit(run_dir: str, tag: str, parts: list[dict], keep_last: int) -> Optional[str]:
    """Rank 0, after every rank's files are durable: the integrity record, the rename to the
    final name, `latest`, then pruning. Returns an error line instead of raising (the other ranks
    wait for it). A pruning failure is logged, not returned: the checkpoint is complete and
    `latest` names it."""
    work_dir = os.path.join(run_dir, tag + INCOMPLETE)
    final_dir = os.path.join(run_dir, tag)
    try:
        files = {}
        for part in parts:
            files.update(part["files"])
        for name in _files_under(work_dir):
            if name not in files:  # written by DeepSpeed outside its checkpoint engine, if ever
                files[name] = _durable_entry(os.path.join(work_dir, name))
        for sub in sorted({os.path.dirname(n) for n in files} - {""}):
            fsync_path(os.path.join(work_dir, sub))
        record = {"format": INTEGRITY_FORMAT, "tag": tag, "checksum": "crc32", "files": dict(sorted(files.items()))}
        with atomic_write(os.path.join(work_dir, INTEGRITY), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
        fsync_path(work_dir)
        # A complete save of this step that never became `latest` (killed just before), or a
        # damaged one the run fell back from: this one replaces it, and its universal conversion
        # (with its `.complete` marker) describes the old files, so it goes too.
        _remove_universal(run_dir, tag)
        if os.path.isdir(final_dir):
            shutil.rmtree(final_dir)
        os.replace(work_dir, final_dir)
        fsync_path(run_dir)
        _move_latest(run_dir, tag)
    except Exception as e:
        return f"rank 0: {one_line(e)}"
    try:
        prune(run_dir, keep_last)
    except Exception as e:
        log.warning("checkpoint %s saved, but pruning older ones failed (%s); delete old step_N folders by hand",
                    final_dir, one_line(e))
    return None


UNIVERSAL = "_universal"


def _remove_universal(run_dir: str, tag: str) -> None:
    """Delete `tag`'s conversion to DeepSpeed's universal format (made on a resume at another dp
    size) and the `latest_universal` pointer ds_to_universal leaves when it names it."""
    shutil.rmtree(os.path.join(run_dir, tag + UNIVERSAL), ignore_errors=True)
    pointer = os.path.join(run_dir, "latest_universal")
    try:
        with open(pointer) as f:
            named = f.read().strip()
    except OSError:
        return
    if named == tag + UNIVERSAL:
        os.remove(pointer)


def _move_latest(run_dir: str, tag: str) -> None:
    # Its own function: the fault-injection tests kill every rank right here.
    point_latest(run_dir, tag)


def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def universal_info() -> dict:
    """What DeepSpeed's ds_to_universal needs to re-partition this model's ZeRO state for another
    dp size (used when a run resumes on a different number of ranks): the TP split rules, from
    pretrain.tensor_parallel."""
    return {"universal_checkpoint_version": 0.4, **universal_checkpoint_patterns()}


def prune(run_dir: str, keep_last: int) -> list[str]:
    """Keep `latest` and the `keep_last - 1` checkpoints before it; delete older ones. Nothing is
    deleted unless `latest` verifies (sizes), so the newest checkpoint that verifies is never
    among them. Folders newer than `latest` (a save killed before `latest` moved, or a damaged one
    the run fell back from) are left alone: the run overwrites them when it reaches that step."""
    latest = latest_tag(run_dir)
    latest_step = _step_of(latest)
    if latest_step is None:
        return []
    verdict = verify(run_dir, latest, checksums=False)
    if not verdict.ok:
        log.warning("not pruning old checkpoints: %s", damage_message(run_dir, verdict))
        return []
    older = [t for t in step_tags(run_dir) if _step_of(t) < latest_step]
    gone = older[max(keep_last - 1, 0):]
    for tag in gone:
        shutil.rmtree(os.path.join(run_dir, tag), ignore_errors=True)
    # Universal conversions whose checkpoint is gone (pruned now or before) go with it.
    for name in os.listdir(run_dir):
        if name.endswith(UNIVERSAL) and _step_of(name[: -len(UNIVERSAL)]) is not None \
                and not os.path.isdir(os.path.join(run_dir, name[: -len(UNIVERSAL)])):
            _remove_universal(run_dir, name[: -len(UNIVERSAL)])
    return gone


def load(engine, run_dir: str, tag: str, same_world: bool, rng_tag: Optional[str] = None) -> tuple[dict, dict]:
    """Load engine state (weights, optimizer, schedule) and, at the same world size, each rank's
    RNG states (from `rng_tag`'s folder, default `tag`). Returns (the trainer state saved with the
    checkpoint, the extra per-rank entries saved with the RNG states)."""

    path, client = engine.load_checkpoint(run_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {os.path.join(run_dir, tag)}")
    state = client.get("trainer") or read_state(run_dir, rng_tag or tag)
    rng_file = os.path.join(run_dir, rng_tag or tag, "rng", f"rank_{dist.get_rank()}.pt")
    extra = {}
    if same_world and os.path.isfile(rng_file):
        extra = torch.load(rng_file, weights_only=False)
        set_rng_state(extra.pop("rng"))
    return state, extra


# ----------------------------------------------------------------------------------------------
# Offline: full fp32 weights out of ZeRO (and tensor-parallel) shards, without a process group


def full_weights(run_dir: str, tag: str, checksums: bool = True) -> dict:
    """The checkpoint's full fp32 weights in the HF layout, with its real vocabulary: ZeRO
    partitions gathered, TP shards joined, vocabulary rows cut to the model config's vocab_size
    (training pads them for tensor parallelism, pretrain/vocab.py). Every offline reader (HF export,
    --init_from, tests comparing against a dense model) takes the weights from here, so every one
    refuses a damaged checkpoint (CheckpointError, `damage_message`)."""
    check(run_dir, tag, checksums)
    state = read_state(run_dir, tag)
    shards = fp32_shards(run_dir, tag)
    if len(shards) != state["tp"]:
        raise CheckpointError(f"{os.path.join(run_dir, tag)}: {len(shards)} tensor-parallel shard sets, "
                              f"trainer state says tp={state['tp']}")
    return resize_vocab(unshard_state_dicts(shards), state["model_config"]["vocab_size"])


def fp32_shards(run_dir: str, tag: str) -> list[dict]:
    """One full-size (ZeRO-gathered) fp32 state dict per tensor-parallel rank, in TP-rank order.

    DeepSpeed's zero_to_fp32 reads a folder holding exactly one model-parallel rank's files, named
    as rank 0's; each TP rank's files are linked into such a folder in turn.
    """
    # Imported here: importing DeepSpeed picks an accelerator, which an offline reader must not.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = os.path.join(os.path.abspath(run_dir), tag)
    files = glob.glob(os.path.join(tag_dir, "*_states.pt"))
    mp_ranks = sorted({int(m.group(1)) for f in files if (m := re.search(r"mp_rank_(\d+)", os.path.basename(f)))})
    if not mp_ranks:
        raise CheckpointError(f"{tag_dir}: no DeepSpeed *_states.pt files")
    shards = []
    for r in mp_ranks:
        with tempfile.TemporaryDirectory() as tmp:
            os.makedirs(os.path.join(tmp, tag))
            for f in files:
                name = os.path.basename(f)
                if f"mp_rank_{r:02d}" in name:
                    os.symlink(f, os.path.join(tmp, tag, name.replace(f"mp_rank_{r:02d}", "mp_rank_00")))
            with captured_output("deepspeed zero_to_fp32"):  # its progress prints and bar
                sd = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=tag)
            # Tied aliases (the MLM decoder = the word embeddings) are listed by some mp ranks'
            # files only; the owner key carries the tensor, so aliases are dropped everywhere.
            tied = BertForPreTraining.tied_weights
            shards.append({k: v.detach().clone().float() for k, v in sd.items() if k not in tied})
    return shards
