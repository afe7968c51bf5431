"""`sbatch slurm/pretrain_large.sh` on two nodes x one task, with only tiny-config / CPU
overrides (configs/bert-tiny.json, a tiny phase recipe from tests/assets/slurm, `--gres=none`):

- an uninterrupted phase-1 job is the reference;
- the same job is preempted mid-run the way SLURM does it before a time limit (USR1 to the batch
  shell, `#SBATCH --signal=B:USR1@...`), requeues itself, resumes from `latest` and must end with
  the reference's per-step losses (steps recomputed after the resume included);
- its phase-2 job, chained with `--dependency=afterok`, must wait through the requeue and then
  start from phase 1's checkpoint (`--init_from`).
"""
import json
import re
import time
from pathlib import Path

import pytest

from tests.integration.slurm_cluster import TERMINAL_STATES, show_report, slurm_cluster  # noqa: F401

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "tests/assets/slurm"
SHAPE = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gres=none"]


def train_losses(metrics: Path) -> list[tuple[int, float]]:
    """Every train record in order, duplicates kept (steps recomputed after a resume)."""
    recs = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    return [(r["step"], r["loss"]) for r in recs if r.get("kind") == "train"]


def test_pretrain_preempted_requeued_resumes_with_the_same_losses(slurm_cluster, request):
    from data_prep.testing import build_tiny_dataset

    c = slurm_cluster
    jobs = c.root / "jobs"
    data = build_tiny_dataset(str(jobs / "data"), seq_lengths=(64, 128), n_docs=200)
    env = {"DATA": data, "MODEL_CONFIG": "configs/bert-tiny.json", "DS_CONFIG": "configs/zero2.json",
           "PHASE1_CONFIG": str(ASSETS / "phase1_tiny.json"), "PHASE2_CONFIG": str(ASSETS / "phase2_tiny.json")}
    steps = json.loads((ASSETS / "phase1_tiny.json").read_text())["train_steps"]
    script = str(REPO / "slurm/pretrain_large.sh")
    out = [f"--output={jobs}/%x-%j.out"]
    lines = [f"nodes: {', '.join(f'{n.name} ({n.addr})' for n in c.nodes)}"]

    # --- reference: uninterrupted phase 1
    t0 = time.monotonic()
    ref = c.wait_job(c.sbatch(*SHAPE, *out, script, env={**env, "RUN_DIR": str(jobs / "ref"), "CHAIN_PHASE2": "0"},
                              cwd=str(jobs)), 600)
    ref_log = Path(ref["StdOut"]).read_text()
    assert (ref["JobState"], ref["ExitCode"]) == ("COMPLETED", "0:0"), ref_log[-5000:]
    placement = sorted(set(re.findall(r"task rank=(\d+) local_rank=(\d+) world_size=2 host=(\S+)", ref_log)))
    assert sorted(h for _, _, h in placement) == sorted(n.name for n in c.nodes), ref_log[-3000:]
    lines.append(f"job {ref['JobId']} (uninterrupted phase 1): {ref['JobState']} ExitCode={ref['ExitCode']} "
                 f"in {time.monotonic() - t0:.0f}s; " + ", ".join(f"rank {r} (local {lr}) on {h}" for r, lr, h in placement))
    want = dict(train_losses(jobs / "ref/phase1/metrics.jsonl"))
    assert sorted(want) == list(range(1, steps + 1))

    # --- preempted, requeued, resumed; chains phase 2
    run = jobs / "run"
    t0 = time.monotonic()
    job = c.sbatch(*SHAPE, *out, script, env={**env, "RUN_DIR": str(run)}, cwd=str(jobs))
    metrics = run / "phase1/metrics.jsonl"
    deadline = time.monotonic() + 300
    # Signal once a checkpoint exists and training is under way, well before the last step.
    while not ((run / "phase1/latest").exists() and metrics.exists() and len(train_losses(metrics)) >= 4):
        assert c.job(job)["JobState"] in ("PENDING", "RUNNING"), Path(c.job(job)["StdOut"]).read_text()[-5000:]
        assert time.monotonic() < deadline, "phase 1 made no checkpoint in time"
        time.sleep(0.1)
    c.run_cmd(["scancel", "--signal=USR1", "--batch", str(job)])
    signalled_at = max(s for s, _ in train_losses(metrics))
    phase2 = int(re.search(r"submitted phase 2 as job (\d+)", Path(c.job(job)["StdOut"]).read_text()).group(1))
    seen, phase2_seen = [c.job(job)["JobState"]], set()
    while True:
        info, p2 = c.job(job), c.job(phase2)
        if info["JobState"] != seen[-1]:
            seen.append(info["JobState"])
        if info["JobState"] not in TERMINAL_STATES or info["Restarts"] == "0":
            phase2_seen.add((p2["JobState"], p2["Reason"]))
        if info["JobState"] in TERMINAL_STATES:
            break
        assert time.monotonic() < deadline + 300, f"job {job} stuck in {info['JobState']} ({info['Reason']})"
        time.sleep(0.2)
    log = Path(info["StdOut"]).read_text()
    lines.append(f"job {job} (phase 1, preempted at ~step {signalled_at}): states {' -> '.join(seen)}, "
                 f"Restarts={info['Restarts']}, ExitCode={info['ExitCode']}, {time.monotonic() - t0:.0f}s")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-5000:]
    assert "received SIGUSR1" in log and "requeueing job" in log and "PENDING" in seen, log[-5000:]
    resumed = re.findall(r"resum\w* .*?step[_ ](\d+)", log)
    got = train_losses(metrics)
    assert sorted(set(s for s, _ in got)) == list(range(1, steps + 1)), "steps missing after the resume"
    redone = [s for i, (s, _) in enumerate(got) if i and s <= got[i - 1][0]]
    lines.append(f"resumed from step {redone[0] - 1 if redone else signalled_at} "
                 f"({len(got) - steps} step(s) recomputed after the resume); trainer said: {resumed[:1]}")
    lines.append("per-step loss   uninterrupted      | preempted + requeued + resumed")
    for i, (s, loss) in enumerate(got):
        mark = "   <- after requeue" if redone and i and s == redone[0] and got[i - 1][0] >= s else ""
        lines.append(f"  step {s:3d}   {want[s]:.10f}  | {loss:.10f}{mark}")
    first_attempt = got[:got.index(next((g for i, g in enumerate(got) if i and g[0] <= got[i - 1][0]), got[-1]))]
    # Before the preemption the two jobs are the same computation on the same placement: bitwise.
    assert all(loss == want[s] for s, loss in first_attempt), (first_attempt, want)
    mismatch = [(s, want[s], loss) for s, loss in got if loss != want[s]]

    # --- phase 2 waited for phase 1 (through the requeue) and starts from its checkpoint
    p2 = c.wait_job(phase2, 600)
    p2_log = Path(p2["StdOut"]).read_text()
    lines.append(f"job {phase2} (phase 2, afterok:{job}): while phase 1 ran {sorted(phase2_seen)}; "
                 f"then {p2['JobState']} ExitCode={p2['ExitCode']}")
    show_report(request, "SLURM cluster: pretraining (slurm/pretrain_large.sh, bert-tiny, 2 nodes x 1 task)", lines)
    assert all(state == "PENDING" for state, _ in phase2_seen), phase2_seen
    assert (p2["JobState"], p2["ExitCode"]) == ("COMPLETED", "0:0"), p2_log[-5000:]
    assert f"initialised weights from {run}/phase1/latest" in p2_log, p2_log[-5000:]
    p2_steps = json.loads((ASSETS / "phase2_tiny.json").read_text())["train_steps"]
    assert [s for s, _ in train_losses(run / "phase2/metrics.jsonl")] == list(range(1, p2_steps + 1))

    # --- the resumed job's losses, recomputed steps included, are the uninterrupted job's (bitwise)
    assert not mismatch, f"losses differ from the uninterrupted run: {mismatch}"
