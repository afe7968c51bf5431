"""The cluster itself and the product's srun/rendezvous/preemption helper (slurm/_common.sh),
driven by a small gloo trainer (tests/assets/slurm/toy_trainer.py) so that these mechanics are
proven in seconds; test_slurm_pretrain.py does the same with the real trainer.

Jobs are judged by `scontrol show job` (JobState, ExitCode, Restarts), not by sbatch's exit code.
"""
import json
import re
import time
from pathlib import Path

import pytest

from tests.integration.slurm_cluster import show_report, slurm_cluster  # noqa: F401  (fixture)

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
TOY_JOB = REPO / "tests/assets/slurm/toy_job.sh"
# 2 nodes x 1 task, no GPUs: the only overrides of the product's defaults.
SHAPE = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gres=none"]


@pytest.fixture(scope="module")
def report(request):
    """Lines printed after the module's tests (shown without -s, via the terminal reporter)."""
    lines: list[str] = []
    yield lines
    show_report(request, "SLURM cluster: mechanics (toy gloo trainer), failures, bad input", lines)


def submit_toy(cluster, name, *args, extra=()):
    jobs = cluster.root / "jobs"
    return cluster.sbatch(*SHAPE, "--requeue", "--open-mode=append", f"--job-name={name}",
                          f"--output={jobs}/%x-%j.out", *extra, str(TOY_JOB), *args,
                          env={"REPO": str(REPO)}, cwd=str(jobs))


def job_log(cluster, info):
    return Path(info["StdOut"]).read_text()


def losses(run_dir: Path) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_two_nodes_rendezvous_preempt_requeue_resume(slurm_cluster, report):
    c = slurm_cluster
    steps = 12
    names = [n.name for n in c.nodes]
    report.append(f"nodes: {', '.join(f'{n.name} ({n.addr}, netns {n.netns})' for n in c.nodes)}")

    ref_dir = c.root / "jobs/toy_ref"
    ref = c.wait_job(submit_toy(c, "toy-ref", "--save_dir", str(ref_dir), "--train_steps", str(steps)), 120)
    ref_log = job_log(c, ref)
    assert (ref["JobState"], ref["ExitCode"]) == ("COMPLETED", "0:0"), ref_log
    ranks = dict(re.findall(r"task rank=(\d+) .* host=(\S+)", ref_log))
    assert sorted(ranks.values()) == sorted(names), f"one task per node expected\n{ref_log}"
    master = re.search(r"rendezvous (\S+):(\d+)", ref_log)
    assert master.group(1) == c.hostnames(ref["NodeList"])[0]
    report.append(f"job {ref['JobId']} (uninterrupted): rendezvous {master.group(0).split()[1]}, "
                  + ", ".join(f"rank {r} on {h}" for r, h in sorted(ranks.items())))

    run_dir = c.root / "jobs/toy_preempted"
    job = submit_toy(c, "toy-preempt", "--save_dir", str(run_dir), "--train_steps", str(steps),
                     "--step_seconds", "0.5")
    deadline = time.monotonic() + 90
    while not (run_dir / "metrics.jsonl").exists() or len(losses(run_dir)) < 3:
        assert c.job(job)["JobState"] in ("PENDING", "RUNNING"), c.job(job)
        assert time.monotonic() < deadline, "toy job made no progress"
        time.sleep(0.2)
    # What SLURM does before the time limit with --signal=B:USR1@T, on demand.
    c.run_cmd(["scancel", "--signal=USR1", "--batch", str(job)])
    seen = [c.job(job)["JobState"]]
    deadline = time.monotonic() + 150
    while True:
        info = c.job(job)
        if info["JobState"] != seen[-1]:
            seen.append(info["JobState"])
        if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            break
        assert time.monotonic() < deadline, f"job {job} stuck in {info['JobState']} ({info['Reason']})"
        time.sleep(0.2)
    log = job_log(c, info)
    report.append(f"job {job} (preempted): states {' -> '.join(seen)}, Restarts={info['Restarts']}, "
                  f"ExitCode={info['ExitCode']}")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "requeueing job" in log and "PENDING" in seen, log
    resumed_at = int(re.search(r"rank 0: resumed from step (\d+)", log).group(1))
    assert 0 < resumed_at < steps, log

    want, got = losses(ref_dir), losses(run_dir)
    report.append(f"resumed at step {resumed_at}; per-step loss  uninterrupted | preempted+resumed")
    for s in range(1, steps + 1):
        report.append(f"  step {s:2d}  {want[s]:.12f} | {got.get(s, float('nan')):.12f}"
                      + ("   <- first step after resume" if s == resumed_at + 1 else ""))
    assert sorted(got) == list(range(1, steps + 1)), "a step was lost or repeated across the requeue"
    assert got == want  # float64, deterministic gloo sums: exactly equal


def test_dead_task_fails_the_job_with_a_message(slurm_cluster, report):
    c = slurm_cluster
    run_dir = c.root / "jobs/toy_dead"
    t0 = time.monotonic()
    job = submit_toy(c, "toy-dead", "--save_dir", str(run_dir), "--train_steps", "50",
                     "--die_rank", "1", "--die_at_step", "3")
    info = c.wait_job(job, 120)
    log = job_log(c, info)
    report.append(f"job {job} (rank 1 dies at step 3): {info['JobState']} ExitCode={info['ExitCode']} "
                  f"after {time.monotonic() - t0:.1f}s")
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", log
    assert "rank 1: dying before step 3" in log
    assert "ERROR: step failed" in log, log


def test_bad_input_fails_the_job_with_a_message_and_chains_nothing(slurm_cluster, report):
    c = slurm_cluster
    jobs = c.root / "jobs"
    (jobs / "empty").mkdir()
    cases = {"no DATA": ({"DATA": None}, "DATA is not set"),
             "DATA without manifest": ({"DATA": str(jobs / "empty")}, "has no manifest.json"),
             "missing config": ({"DATA": str(jobs / "empty"), "MODEL_CONFIG": "configs/nope.json"},
                                "config file configs/nope.json not found")}
    for name, (env, message) in cases.items():
        job = c.sbatch("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gres=none",
                       f"--output={jobs}/bad-%j.out", str(REPO / "slurm/pretrain_large.sh"), env=env, cwd=str(jobs))
        info = c.wait_job(job, 60)
        log = job_log(c, info)
        report.append(f"job {job} ({name}): {info['JobState']} ExitCode={info['ExitCode']}: {log.strip().splitlines()[-1]}")
        assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), log
        assert message in log and "Traceback" not in log, log
    # No phase-2 job may be left waiting on a phase 1 that failed its checks.
    assert c.run_cmd(["squeue", "-h"]).stdout.strip() == ""


@pytest.mark.slow
def test_time_limit_signal_requeues_until_done(slurm_cluster, report):
    """The real `--signal=B:USR1@T` path: SLURM itself signals before a 1-minute limit (its
    time-limit check runs about every 30 s), the job requeues as often as needed and finishes
    with the uninterrupted losses."""
    c = slurm_cluster
    steps = 150
    ref_dir, run_dir = c.root / "jobs/tl_ref", c.root / "jobs/tl_run"
    ref = c.wait_job(submit_toy(c, "tl-ref", "--save_dir", str(ref_dir), "--train_steps", str(steps)), 120)
    assert ref["JobState"] == "COMPLETED", job_log(c, ref)
    job = submit_toy(c, "tl-run", "--save_dir", str(run_dir), "--train_steps", str(steps), "--step_seconds", "0.4",
                     extra=["--time=1", "--signal=B:USR1@45"])
    info = c.wait_job(job, 600)
    log = job_log(c, info)
    report.append(f"job {job} (--time=1 --signal=B:USR1@45, ~60 s of work): {info['JobState']} "
                  f"Restarts={info['Restarts']} ExitCode={info['ExitCode']}")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert int(info["Restarts"]) >= 1 and "received SIGUSR1" in log, log
    assert losses(run_dir) == losses(ref_dir)
