"""One summary for a `sbatch --array ... slurm/finetune.sh` run (run by finetune.sh, not by hand).

    python slurm/_array_summary.py OUT

Every array element writes its own OUT/array_<index>/metrics.json and, once it succeeded,
OUT/array_<index>/slurm_array.json naming its array job; each element that finishes calls this,
which (under a lock, since elements finish at the same time) rewrites OUT/metrics.json from the
finished elements of this array job ($SLURM_ARRAY_JOB_ID: folders left by an earlier submission
into the same OUT are not counted): their runs side by side and the mean and standard deviation
over them, the shape `--seeds 1 2 3` writes in one process, plus which elements it covers. The
last element to finish leaves the complete summary.
"""
import errno
import fcntl
import glob
import json
import os
import re
import sys

from data_prep.atomic import atomic_json
from finetune.metrics import mean_std

MARKER = "slurm_array.json"
# What flock gives on file systems mounted without lock support (Lustre without -o flock, some NFS).
NO_LOCKS = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL)


def _read_json(path: str) -> dict | None:
    """One element's record, or None (with a line on stderr) when it cannot be read: a damaged
    element is left out of the summary (which then says it is incomplete), not the end of it."""
    try:
        with open(path) as f:
            record = json.load(f)
        if isinstance(record, dict):
            return record
        problem = "not a JSON object"
    except (OSError, ValueError) as exc:
        problem = str(exc)
    print(f"_array_summary: {path}: unreadable ({problem}); that element is left out of the summary; re-run "
          "it (same --array index) to include it", file=sys.stderr)
    return None


def _this_jobs_elements(out: str, array_job_id: str | None) -> dict[int, str]:
    """index -> folder, for the elements of this array job that succeeded (their marker names it)."""
    found = {}
    for marker in glob.glob(os.path.join(out, "array_*", MARKER)):
        m = re.fullmatch(r"array_(\d+)", os.path.basename(os.path.dirname(marker)))
        if not m:
            continue
        record = _read_json(marker)
        if record is None:
            continue
        owner = str(record.get("array_job_id"))
        if array_job_id is None or owner == array_job_id:
            found[int(m.group(1))] = os.path.dirname(marker)
    return dict(sorted(found.items()))


def summarize(out: str, expected: int | None, array_job_id: str | None = None) -> dict:
    elements, runs, first = {}, [], None
    for index, folder in _this_jobs_elements(out, array_job_id).items():
        path = os.path.join(folder, "metrics.json")
        if not os.path.exists(path):
            continue
        m = _read_json(path)
        if m is None:
            continue
        first = first or m
        elements[index] = folder
        runs.extend({"array_index": index, **run} for run in m.get("runs", []))
    if not runs:
        raise SystemExit(f"{out}: no array_*/metrics.json with runs from array job {array_job_id} yet")
    mean, std = mean_std([{k: v for k, v in r.items() if k not in ("seed", "array_index")} for r in runs])
    return {"task": first.get("task"), "model": first.get("model"), "array_job_id": array_job_id,
            "elements": elements, "expected_elements": expected, "complete": expected is not None and len(elements) >= expected,
            "seeds": [r.get("seed") for r in runs], "runs": runs, "mean": mean, "std": std}


def _write(out: str, summary: dict) -> None:
    # a temporary name unique per host and pid in OUT itself (elements on other nodes share OUT,
    # and os.replace is atomic only within one file system), then one rename
    atomic_json(os.path.join(out, "metrics.json"), summary, sort_keys=False)


def _lock(out: str) -> int | None:
    """An exclusive lock on OUT/.metrics.lock (never through a symlink); None where the file system
    has no locks."""
    path = os.path.join(out, ".metrics.lock")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SystemExit(f"{path} is a symlink: remove it (the summary locks a plain file there)")
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:
        if e.errno not in NO_LOCKS:
            raise
        os.close(fd)
        print(f"WARNING: {out}: no file locks here ({os.strerror(e.errno)}); writing the summary unlocked",
              file=sys.stderr)
        return None
    return fd


def main() -> None:
    out = sys.argv[1]
    count = os.environ.get("SLURM_ARRAY_TASK_COUNT")
    expected = int(count) if count else None
    array_job_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    fd = _lock(out)
    try:
        summary = summarize(out, expected, array_job_id)
        _write(out, summary)
        if fd is None:
            # Unlocked, an element finishing meanwhile may have written a summary without ours, or
            # ours may have replaced a newer one: read again until what is written covers what is there.
            for _ in range(5):
                again = summarize(out, expected, array_job_id)
                if again["elements"] == summary["elements"]:
                    break
                summary = again
                _write(out, summary)
    finally:
        if fd is not None:
            os.close(fd)
    print(f"{out}/metrics.json: {len(summary['elements'])} of {count or '?'} array elements, "
          f"mean {({k: round(v, 4) for k, v in summary['mean'].items()})}", file=sys.stderr)


if __name__ == "__main__":
    main()
