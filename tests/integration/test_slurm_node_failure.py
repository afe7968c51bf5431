"""A node dies in the middle of `sbatch slurm/pretrain_large.sh` (slow).

The cluster of this module marks a silent node DOWN after 10 s (`SlurmdTimeout=10`; 300 s by
default). The node that is not the batch host loses its slurmd, slurmstepd and tasks at once
(SIGKILL to everything in its network namespace). The job must end within a bounded time, be
requeued (`#SBATCH --requeue`: SLURM requeues a batch job whose node failed), start again once
the node is back, resume from `latest` and end with the per-step losses of an uninterrupted run.
"""
import json
import time
from pathlib import Path

import pytest

from tests.integration.slurm_cluster import SlurmCluster, show_report, unavailable_reason

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "tests/assets/slurm"
# 2 nodes x 1 task, no GPUs, as test_slurm_pretrain.py: CPU-sized overrides of the #SBATCH shape.
SHAPE = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gres=none"]
SLURMD_TIMEOUT = 10


@pytest.fixture(scope="module")
def short_timeout_cluster():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(slurmd_timeout=SLURMD_TIMEOUT).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def train_losses(metrics: Path) -> list[tuple[int, float]]:
    recs = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    return [(r["step"], r["loss"]) for r in recs if r.get("kind") == "train"]


def test_node_killed_mid_run_requeues_and_resumes_with_the_same_losses(short_timeout_cluster, request):
    from data_prep.testing import build_tiny_dataset

    c = short_timeout_cluster
    jobs = c.root / "jobs"
    data = build_tiny_dataset(str(jobs / "data"), seq_lengths=(64, 128), n_docs=200)
    steps = 24
    env = {"DATA": data, "MODEL_CONFIG": "configs/bert-tiny.json", "DS_CONFIG": "configs/zero2.json",
           "PHASE1_CONFIG": str(ASSETS / "phase1_tiny.json"), "TRAIN_STEPS": str(steps), "CHAIN_PHASE2": "0"}
    script = str(REPO / "slurm/pretrain_large.sh")
    out = [f"--output={jobs}/%x-%j.out"]
    lines = []

    ref = c.wait_job(c.sbatch(*SHAPE, *out, script, env={**env, "RUN_DIR": str(jobs / "ref")}, cwd=str(jobs)), 600)
    assert (ref["JobState"], ref["ExitCode"]) == ("COMPLETED", "0:0"), Path(ref["StdOut"]).read_text()[-5000:]
    want = dict(train_losses(jobs / "ref/phase1/metrics.jsonl"))
    assert sorted(want) == list(range(1, steps + 1))

    run = jobs / "run"
    job = c.sbatch(*SHAPE, *out, script, env={**env, "RUN_DIR": str(run)}, cwd=str(jobs))
    metrics = run / "phase1/metrics.jsonl"
    deadline = time.monotonic() + 300
    while not ((run / "phase1/latest").exists() and metrics.exists() and len(train_losses(metrics)) >= 4):
        assert c.job(job)["JobState"] in ("PENDING", "RUNNING"), Path(c.job(job)["StdOut"]).read_text()[-5000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.1)
    info = c.job(job)
    victim = next(h for h in c.hostnames(info["NodeList"]) if h != info["BatchHost"])
    c.kill_node(victim)
    killed_at, killed_step = time.monotonic(), max(s for s, _ in train_losses(metrics))
    lines.append(f"job {job}: killed {victim} (not the batch host {info['BatchHost']}) at ~step {killed_step}")

    # The job leaves RUNNING (requeued: PENDING again, or failed) within SlurmdTimeout and a margin.
    states = [info["JobState"]]
    while True:
        info = c.job(job)
        if info["JobState"] != states[-1]:
            states.append(info["JobState"])
        # COMPLETING is the passage from RUNNING to the requeue (seen under load): keep polling
        if info["JobState"] not in ("RUNNING", "COMPLETING") or info["Restarts"] != "0":
            break
        assert time.monotonic() - killed_at < SLURMD_TIMEOUT + 90, (
            f"job {job} still {info['JobState']} {time.monotonic() - killed_at:.0f}s after {victim} died\n"
            f"{c.logs_tail()}")
        time.sleep(0.3)
    ended_after = time.monotonic() - killed_at
    lines.append(f"  after {ended_after:.0f}s: {info['JobState']} Restarts={info['Restarts']} Reason={info['Reason']}; "
                 f"{victim} is {c.node_state(victim)}")
    # requeued: counted in Restarts (the job may still be COMPLETING then), or on its way back to the queue
    assert info["Restarts"] != "0" or info["JobState"] in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "NODE_FAIL",
                                                           "REQUEUE_FED"), \
        (info, Path(info["StdOut"]).read_text()[-5000:])

    c.restart_node(victim)
    info = c.wait_job(job, 600)
    states.append(info["JobState"])
    log = Path(info["StdOut"]).read_text()
    got = train_losses(metrics)
    lines.append(f"  {victim} restarted; job states {' -> '.join(states)}, Restarts={info['Restarts']}, "
                 f"ExitCode={info['ExitCode']}, {time.monotonic() - killed_at:.0f}s after the kill")
    redone = [s for i, (s, _) in enumerate(got) if i and s <= got[i - 1][0]]
    lines.append(f"  resumed from step {redone[0] - 1 if redone else '?'}; {len(got) - steps} step(s) recomputed")
    mismatch = [(s, want[s], loss) for s, loss in got if loss != want[s]]
    lines.append(f"  per-step losses equal to the uninterrupted run: {not mismatch} ({len(got)} records)")
    show_report(request, f"SLURM cluster: a node dies mid-run (SlurmdTimeout={SLURMD_TIMEOUT})", lines)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-5000:]
    assert int(info["Restarts"]) >= 1, info
    assert sorted(set(s for s, _ in got)) == list(range(1, steps + 1)), "steps missing after the resume"
    assert redone, "the job did not resume from a checkpoint"
    assert not mismatch, f"losses differ from the uninterrupted run: {mismatch}"
