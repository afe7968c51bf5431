"""One summary for a `sbatch --array ... slurm/finetune.sh` run (run by finetune.sh, not by hand).

    python slurm/_array_summary.py OUT

Every array element writes its own OUT/array_<index>/metrics.json; each element that finishes
calls this, which (under a lock, since elements finish at the same time) rewrites OUT/metrics.json
from all the finished elements: their runs side by side and the mean and standard deviation over
them, the shape `--seeds 1 2 3` writes in one process, plus which elements it covers. The last
element to finish leaves the complete summary.
"""
import fcntl
import glob
import json
import os
import re
import sys

from finetune.metrics import mean_std


def summarize(out: str, expected: int | None) -> dict:
    elements, runs, first = {}, [], None
    for path in sorted(glob.glob(os.path.join(out, "array_*", "metrics.json")),
                       key=lambda p: int(re.search(r"array_(\d+)", p).group(1))):
        index = int(re.search(r"array_(\d+)", path).group(1))
        with open(path) as f:
            m = json.load(f)
        first = first or m
        elements[index] = os.path.dirname(path)
        runs.extend({"array_index": index, **run} for run in m.get("runs", []))
    if not runs:
        raise SystemExit(f"{out}: no array_*/metrics.json with runs yet")
    mean, std = mean_std([{k: v for k, v in r.items() if k not in ("seed", "array_index")} for r in runs])
    return {"task": first.get("task"), "model": first.get("model"), "array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
            "elements": elements, "expected_elements": expected, "complete": expected is not None and len(elements) >= expected,
            "seeds": [r.get("seed") for r in runs], "runs": runs, "mean": mean, "std": std}


def main() -> None:
    out = sys.argv[1]
    count = os.environ.get("SLURM_ARRAY_TASK_COUNT")
    with open(os.path.join(out, ".metrics.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        summary = summarize(out, int(count) if count else None)
        tmp = os.path.join(out, f".metrics.json.{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(tmp, os.path.join(out, "metrics.json"))
    print(f"{out}/metrics.json: {len(summary['elements'])} of {count or '?'} array elements, "
          f"mean {({k: round(v, 4) for k, v in summary['mean'].items()})}", file=sys.stderr)


if __name__ == "__main__":
    main()
