"""The scripts on a test cluster shaped like GPU nodes: each node declares 2 sockets x 32 cores and
`Gres=gpu:8` (placeholder device files, gres.conf) and the feature `citest_gpu`, far more than
the 2-core machine has (`SlurmdParameters=config_overrides`).

- `sbatch --nodes=2 slurm/pretrain_large.sh` keeps its own #SBATCH shape (8 tasks x 8 CPUs per
  node, gpu:8, --exclusive, --mem=0): 16 tasks on two nodes, each with its own rank, local rank
  and GPU index, and its phase-2 job submitted with the same shape, account and constraint and
  run on the nodes with the feature (default run, tests/assets/slurm/task_probe.py in place of the
  trainer: seconds; each task reports SLURM_LOCALID, SLURM_JOB_GPUS and its CPU affinity itself);
  the real trainer at 16 ranks is the slow variant (bert-tiny, a 16-rank tiny recipe).
- CPU binding is real only where SLURM can lay tasks out on real cores: on this machine
  task/affinity refuses the 8 x 8 layout ("only 2 bits in avail_map ... Unable to layout tasks on
  given cpus"), so a second cluster with the machine's true shape (1 socket x 2 cores) and
  task/affinity checks the masks the scripts' srun options give (`--cpus-per-task`, `--cpu-bind`).
  The 8 x 8 options themselves are checked in test_slurm_scripts.py.
"""
import json
import re
import time
from pathlib import Path

import pytest

from tests.integration.slurm_cluster import SlurmCluster, cpu_list, show_report, slurm_cluster, unavailable_reason  # noqa: F401

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "tests/assets/slurm"


def task_lines(log: str) -> list[dict]:
    return [dict(re.findall(r"(\w+)=(\S+)", ln.split("task ", 1)[1])) for ln in log.splitlines()
            if ln.startswith("task rank=")]


def probe_lines(log: str) -> list[dict]:
    return [dict(re.findall(r"(\w+)=(\S+)", ln.split("probe ", 1)[1])) for ln in log.splitlines()
            if ln.startswith("probe procid=")]


def check_placement(tasks: list[dict], hosts: list[str]) -> None:
    """16 tasks, block-distributed: ranks 0-7 on the first node, 8-15 on the second; each with its
    local rank, the GPU at that index of the node's 8, and the script's 8 CPUs per task."""
    assert [int(t["rank"]) for t in tasks] == list(range(16)), tasks
    for t in tasks:
        r = int(t["rank"])
        assert (t["local_rank"], t["world_size"], t["host"]) == (str(r % 8), "16", hosts[r // 8]), t
        assert t["gpu"] == f"{r % 8}/8" and t["cpus_per_task"] == "8", t


def check_probes(probes: list[dict], tasks: list[dict]) -> None:
    """What each task's own process got from slurmstepd, independent of _task.sh's line: per node,
    SLURM_LOCALID is 0..7 once each and equals LOCAL_RANK (the GPU index the trainer uses), with
    RANK = SLURM_PROCID; the GPU that index picks out of the node's SLURM_GPUS_ON_NODE=8 GPUs
    (SLURM_JOB_GPUS where SLURM sets it) is a different one for each task; the CPUs the task may run on are the ones _task.sh logged."""
    assert len(probes) == 16, probes
    by_host: dict[str, list[dict]] = {}
    for p in probes:
        assert (p["rank"], p["local_rank"], p["world_size"]) == (p["procid"], p["localid"], "16"), p
        assert p["host"] == p["nodename"], p
        by_host.setdefault(p["host"], []).append(p)
    assert len(by_host) == 2, by_host.keys()
    for host, ps in by_host.items():
        assert sorted(int(p["localid"]) for p in ps) == list(range(8)), (host, ps)
        assert {p["gpus_on_node"] for p in ps} == {"8"}, (host, ps)
        # SLURM 22.05 with placeholder device files sets neither SLURM_JOB_GPUS nor
        # CUDA_VISIBLE_DEVICES in the tasks: the node's GPUs are then 0..7 by index.
        gpus = {p["job_gpus"] for p in ps}
        assert len(gpus) == 1, (host, gpus)
        node_gpus = gpus.pop().split(",") if "-" not in gpus else [str(i) for i in range(8)]
        assert len(node_gpus) == 8 and len({node_gpus[int(p["localid"])] for p in ps}) == 8, (host, ps)
    logged = {t["rank"]: t for t in tasks}
    for p in probes:
        assert cpu_list(p["affinity"]) == cpu_list(logged[p["procid"]]["cpus"]), (p, logged[p["procid"]])


def submit_large(c, jobs: Path, env: dict) -> int:
    # Only --nodes changes the script's shape (4 nodes by default, the cluster has 2); --account
    # and --constraint are the user's placement, for phase 2 to inherit.
    return c.sbatch("--nodes=2", "--account=citest", "--constraint=citest_gpu", f"--output={jobs}/%x-%j.out",
                    str(REPO / "slurm/pretrain_large.sh"), env=env, cwd=str(jobs))


def test_pretrain_large_places_sixteen_tasks_and_chains_phase2(slurm_cluster, request):
    """The placement and the chain with the script's own shape, at the cost of a few seconds:
    PYTHON=task_probe.py runs a probe in each of the 16 tasks instead of the trainer (the trainer
    at 16 ranks is the slow test below), so phase 1 completes at once and phase 2 really starts, on
    nodes with the feature, in the same shape."""
    from data_prep.testing import build_tiny_dataset

    c = slurm_cluster
    jobs = c.root / "jobs/gpu_shape_chain"
    jobs.mkdir(parents=True)
    data = build_tiny_dataset(str(jobs / "data"), seq_lengths=(64, 128), n_docs=40)
    # The probe (in place of the trainer) reports what SLURM gave each task, from the task itself.
    env = {"DATA": data, "RUN_DIR": str(jobs / "run"), "PYTHON": str(ASSETS / "task_probe.py")}
    t0 = time.monotonic()
    job = submit_large(c, jobs, env)
    p1 = c.wait_job(job, 120)
    log = Path(p1["StdOut"]).read_text()
    assert (p1["JobState"], p1["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    phase2 = int(re.search(r"submitted phase 2 as job (\d+)", log).group(1))
    p2 = c.wait_job(phase2, 120)
    p2_log = Path(p2["StdOut"]).read_text()
    elapsed = time.monotonic() - t0
    keys = ("NodeList", "NumNodes", "NumTasks", "CPUs/Task", "TresPerNode", "Account", "Features", "OverSubscribe",
            "MinMemoryNode", "Dependency", "JobState", "ExitCode")
    tasks = sorted(task_lines(log), key=lambda t: int(t["rank"]))
    lines = [f"phase 1 job {job}: " + " ".join(f"{k}={p1.get(k)}" for k in keys)]
    probes = {p["procid"]: p for p in probe_lines(log)}
    lines += [f"  rank {t['rank']:>2} local {t['local_rank']} on {t['host']}: gpu {t['gpu']}, cpus {t['cpus']} "
              f"(no binding: task/none, see the affinity test); the task itself: SLURM_LOCALID "
              f"{probes.get(t['rank'], {}).get('localid')}, SLURM_JOB_GPUS {probes.get(t['rank'], {}).get('job_gpus')}, "
              f"sched_getaffinity {probes.get(t['rank'], {}).get('affinity')}" for t in tasks]
    lines.append(f"phase 2 job {phase2}: " + " ".join(f"{k}={p2.get(k)}" for k in keys))
    lines.append(f"both jobs in {elapsed:.1f}s")
    show_report(request, "SLURM cluster: slurm/pretrain_large.sh --nodes=2 (8 tasks x 8 CPUs, gpu:8 per node)", lines)

    check_placement(tasks, c.hostnames(p1["NodeList"]))
    check_probes(probe_lines(log), tasks)
    assert (p1["NumTasks"], p1["CPUs/Task"], p1["OverSubscribe"], p1["MinMemoryNode"]) == ("16", "8", "NO", "0"), p1
    assert (p2["JobState"], p2["ExitCode"]) == ("COMPLETED", "0:0"), p2_log[-4000:]
    assert (p2["NumNodes"], p2["NumTasks"], p2["CPUs/Task"]) == ("2", "16", "8"), p2
    assert p2["TresPerNode"].endswith("gpu:8") and p2["OverSubscribe"] == "NO" and p2["MinMemoryNode"] == "0", p2
    assert (p2["Account"], p2["Features"]) == ("citest", "citest_gpu"), p2
    assert "phase 2 of bert-large" in p2_log and f"--init_from {jobs}/run/phase1/latest" in p2_log, p2_log[-3000:]
    p2_tasks = sorted(task_lines(p2_log), key=lambda t: int(t["rank"]))
    check_placement(p2_tasks, c.hostnames(p2["NodeList"]))
    check_probes(probe_lines(p2_log), p2_tasks)


def test_refused_phase2_leaves_phase1_running(slurm_cluster, request):
    """The controller refuses phase 2 (here: a constraint no node has, through PHASE2_SBATCH_ARGS):
    phase 1 still runs to the end and its log says how to submit phase 2 by hand."""
    from data_prep.testing import build_tiny_dataset

    c = slurm_cluster
    jobs = c.root / "jobs/gpu_shape_refused"
    jobs.mkdir(parents=True)
    data = build_tiny_dataset(str(jobs / "data"), seq_lengths=(64, 128), n_docs=40)
    info = c.wait_job(submit_large(c, jobs, {"DATA": data, "RUN_DIR": str(jobs / "run"), "PYTHON": "true",
                                             "PHASE2_SBATCH_ARGS": "--constraint=no_such_feature"}), 120)
    log = Path(info["StdOut"]).read_text()
    refusal = [ln for ln in log.splitlines() if "sbatch: error" in ln or "WARNING: the controller refused" in ln]
    show_report(request, "SLURM cluster: phase 2 refused by the controller", [
        f"job {info['JobId']}: {info['JobState']} ExitCode={info['ExitCode']}"] + [ln[:300] for ln in refusal])
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert "Invalid feature specification" in log and "WARNING: the controller refused phase 2" in log, log[-4000:]
    assert len(task_lines(log)) == 16, "phase 1 did not run its tasks"
    assert c.run_cmd(["squeue", "-h"]).stdout.strip() == ""


@pytest.mark.slow
def test_pretrain_large_trains_on_two_nodes_by_eight_tasks(slurm_cluster, request):
    """The real trainer at 16 ranks (bert-tiny, a 16-rank tiny recipe) on the script's own shape.
    Slow: 16 processes importing torch and DeepSpeed on 2 cores (~5 s of CPU each)."""
    from data_prep.testing import build_tiny_dataset

    c = slurm_cluster
    jobs = c.root / "jobs/gpu_shape_train"
    jobs.mkdir(parents=True)
    data = build_tiny_dataset(str(jobs / "data"), seq_lengths=(64, 128), n_docs=200)
    # One OpenMP thread per rank: 16 ranks share 2 real cores (OMP_NUM_THREADS wins over the
    # script's cpus-per-task default).
    env = {"DATA": data, "RUN_DIR": str(jobs / "run"), "MODEL_CONFIG": "configs/bert-tiny.json",
           "DS_CONFIG": "configs/zero2.json", "PHASE1_CONFIG": str(ASSETS / "phase1_tiny16.json"),
           "CHAIN_PHASE2": "0", "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    info = c.wait_job(submit_large(c, jobs, env), 900)
    elapsed = time.monotonic() - t0
    log = Path(info["StdOut"]).read_text()
    show_report(request, "SLURM cluster: slurm/pretrain_large.sh --nodes=2, real trainer at 16 ranks",
                [f"job {info['JobId']}: {info['JobState']} ExitCode={info['ExitCode']} in {elapsed:.0f}s on {info['NodeList']}"]
                + [ln for ln in log.splitlines() if "world 16" in ln or "pretrain.metrics: step" in ln])
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-5000:]
    check_placement(sorted(task_lines(log), key=lambda t: int(t["rank"])), c.hostnames(info["NodeList"]))
    assert "world 16 = dp 16" in log
    steps = json.loads((ASSETS / "phase1_tiny16.json").read_text())["train_steps"]
    recs = [json.loads(ln) for ln in (jobs / "run/phase1/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r.get("kind") == "train"] == list(range(1, steps + 1))


@pytest.fixture(scope="module")
def affinity_cluster():
    """Two nodes with this machine's true shape (1 socket x 2 cores) and task/affinity."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(sockets_per_node=1, cores_per_socket=2, gpus_per_node=2,
                           task_plugin="task/affinity").start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_tasks_are_bound_to_their_own_cores(affinity_cluster, request):
    c = affinity_cluster
    jobs = c.root / "jobs"
    toy = str(REPO / "tests/assets/slurm/toy_job.sh")
    lines, seen = [], {}
    # 1 task x 2 CPUs: srun must ask for both (SLURM 22.05-23.11 gives it one otherwise);
    # 2 tasks x 1 CPU: each task on a core of its own.
    for tasks_per_node, cpt in ((1, 2), (2, 1)):
        save = jobs / f"aff_{tasks_per_node}x{cpt}"
        job = c.sbatch("--nodes=2", f"--ntasks-per-node={tasks_per_node}", f"--cpus-per-task={cpt}", "--gres=gpu:2",
                       f"--output={jobs}/%x-%j.out", toy, "--save_dir", str(save), "--train_steps", "2",
                       env={"REPO": str(REPO), "OMP_NUM_THREADS": "1"}, cwd=str(jobs))
        info = c.wait_job(job, 180)
        log = Path(info["StdOut"]).read_text()
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
        tasks = task_lines(log)
        seen[(tasks_per_node, cpt)] = {(t["host"], int(t["local_rank"])): cpu_list(t["cpus"]) for t in tasks}
        lines.append(f"job {job} ({tasks_per_node} task(s) x {cpt} CPU(s) per node): "
                     + ", ".join(f"rank {t['rank']} local {t['local_rank']} on {t['host']}: cpus {t['cpus']}, gpu {t['gpu']}"
                                 for t in sorted(tasks, key=lambda t: int(t["rank"]))))
    show_report(request, "SLURM cluster (task/affinity, the machine's own 1 x 2 cores): CPU binding", lines)
    assert list(seen[(1, 2)].values()) == [{0, 1}, {0, 1}], seen
    two = seen[(2, 1)]
    assert len(two) == 4 and all(len(v) == 1 for v in two.values()), two
    for host in {h for h, _ in two}:
        assert two[(host, 0)] != two[(host, 1)], f"both tasks on {host} share a core: {two}"
