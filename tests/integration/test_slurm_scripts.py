"""What the sbatch scripts ask SLURM for, without a cluster: the scripts run as a batch job would
run them (the SLURM_* variables a job gets), with `srun`, `sbatch` and `scontrol` replaced on PATH
by recorders that write their argv, working directory and environment to a file (and answer
`scontrol show job` with a given line). This covers what the two-core test cluster cannot show:
the binding and container options a real 8-GPU cluster with pyxis acts on, and phase 2's options
for an account, QOS, reservation and SLURM 23's `TresPerNode=gres/gpu:8` spelling.

The real cluster runs of the same scripts are in test_slurm_pretrain.py / test_slurm_gpu_shape.py.
"""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.slurm_cluster import cpu_list

REPO = Path(__file__).resolve().parents[2]

RECORDER = f"""#!{sys.executable}
import json, os, sys
name = os.path.basename(sys.argv[0])
log = os.environ["FAKE_SLURM_LOG"]
with open(log, "a") as f:
    f.write(json.dumps({{"tool": name, "argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}) + "\\n")
if name == "scontrol" and sys.argv[1:3] == ["show", "hostnames"]:
    print("node1\\nnode2")
elif name == "scontrol" and sys.argv[1:3] == ["show", "job"]:
    # FAKE_SCONTROL_FAILS=N: the first N queries time out, as on a busy controller.
    count = log + ".scontrol_fails"
    failed = int(open(count).read()) if os.path.exists(count) else 0
    if failed < int(os.environ.get("FAKE_SCONTROL_FAILS", "0")):
        open(count, "w").write(str(failed + 1))
        print("slurm_load_jobs error: Socket timed out on send/recv operation", file=sys.stderr)
        sys.exit(1)
    print(os.environ.get("FAKE_JOB_INFO", ""))
elif name == "srun" and os.environ.get("FAKE_SRUN_FAIL") and os.environ["FAKE_SRUN_FAIL"] in " ".join(sys.argv):
    sys.exit(1)
elif name == "sbatch":
    if os.environ.get("FAKE_SBATCH_FAIL"):
        print("sbatch: error: Invalid qos specification", file=sys.stderr)
        sys.exit(1)
    print("777")
"""

JOB_INFO_23 = ("JobId=4242 JobName=bert-large UserId=root(0) Account=proj7 QOS=high JobState=RUNNING "
               "Requeue=1 Restarts=0 TimeLimit=1-00:00:00 Partition=gpu NumNodes=2 NumCPUs=128 NumTasks=16 "
               "CPUs/Task=8 MinCPUsNode=64 MinMemoryNode=0 MinTmpDiskNode=0 Features=h100&ib "
               "Reservation=maint_after OverSubscribe=NO Contiguous=0 StdOut=/logs/bert-large-4242.out "
               "Power= TresPerNode=gres/gpu:8")


@pytest.fixture
def job(tmp_path):
    """Runs a script of slurm/ as a 2-node x 8-task batch job would; returns (result, calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("srun", "sbatch", "scontrol"):
        p = bin_dir / tool
        p.write_text(RECORDER)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    submit = tmp_path / "submit"
    submit.mkdir()
    log = tmp_path / "calls.jsonl"

    def run(script: str, *args: str, env: dict | None = None, job_id: int = 4242):
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "SBATCH_"))}
        for k in ("CONTAINER_IMAGE", "CONTAINER_MOUNTS", "MASTER_ADDR", "MASTER_PORT", "PHASE2_SBATCH_ARGS"):
            base.pop(k, None)
        full = {**base, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM_LOG": str(log),
                "FAKE_JOB_INFO": JOB_INFO_23, "REPO": str(REPO),
                "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NAME": "bert-large", "SLURM_SUBMIT_DIR": str(submit),
                "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "16",
                "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "8", "SLURM_JOB_PARTITION": "gpu",
                "SCONTROL_RETRY_DELAY": "0", "DATA": str(data), "RUN_DIR": str(tmp_path / "run"), "MODEL_CONFIG": "configs/bert-tiny.json",
                **(env or {})}
        log.write_text("")
        Path(f"{log}.scontrol_fails").unlink(missing_ok=True)
        res = subprocess.run(["bash", str(REPO / script), *args], cwd=submit, env=full, capture_output=True,
                             text=True, timeout=60)
        calls = [json.loads(ln) for ln in log.read_text().splitlines()]
        return res, calls

    run.tmp = tmp_path
    run.data, run.submit = data, submit
    return run


def sruns(calls):
    return [c for c in calls if c["tool"] == "srun"]


def split_srun(argv):
    """(srun options, the task command after slurm/_task.sh)."""
    i = argv.index("bash")
    assert argv[i + 1] == str(REPO / "slurm/_task.sh"), argv
    return argv[:i], argv[i + 2:]


def test_pretrain_srun_gets_cpus_per_task_and_binding(job):
    res, calls = job("slurm/pretrain_large.sh")
    assert res.returncode == 0, res.stderr
    (srun,) = sruns(calls)
    opts, cmd = split_srun(srun["argv"])
    # SLURM 22.05-23.11: srun does not inherit sbatch's --cpus-per-task (one CPU per task else).
    assert "--cpus-per-task=8" in opts and srun["env"]["SRUN_CPUS_PER_TASK"] == "8", opts
    assert "--cpu-bind=cores" in opts and "--distribution=block:block" in opts, opts
    assert "--kill-on-bad-exit=1" in opts
    assert not any(o.startswith(("--gpus-per-task", "--gpu-bind")) for o in opts), opts
    assert cmd[:2] == ["python", "pretrain/run.py"] and f"{job.tmp}/run/phase1" in cmd, cmd
    assert srun["env"]["MASTER_ADDR"] == "node1" and srun["env"]["MASTER_PORT"] == str(10000 + 4242 % 20000)
    # Whole nodes by default, as NVIDIA's run.sub.
    head = (REPO / "slurm/pretrain_large.sh").read_text()
    assert "#SBATCH --exclusive\n" in head and "#SBATCH --mem=0\n" in head


def test_cpu_bind_and_distribution_can_be_changed(job):
    res, calls = job("slurm/pretrain_large.sh", env={"CPU_BIND": "none", "TASK_DISTRIBUTION": "block:cyclic",
                                                    "CHAIN_PHASE2": "0"})
    opts, _ = split_srun(sruns(calls)[0]["argv"])
    assert "--cpu-bind=none" in opts and "--distribution=block:cyclic" in opts, opts


def test_container_mounts_data_run_dir_and_submit_dir(job, tmp_path):
    res, calls = job("slurm/pretrain_large.sh", env={"CONTAINER_IMAGE": "nvcr.io#nvidia/pytorch:24.01-py3",
                                                    "CONTAINER_MOUNTS": "/scratch:/scratch:ro", "CHAIN_PHASE2": "0"})
    assert res.returncode == 0, res.stderr
    opts, _ = split_srun(sruns(calls)[0]["argv"])
    assert "--container-image=nvcr.io#nvidia/pytorch:24.01-py3" in opts
    mounts = next(o for o in opts if o.startswith("--container-mounts=")).split("=", 1)[1].split(",")
    for path in (REPO, job.submit, job.data, tmp_path / "run"):
        assert f"{path}:{path}" in mounts, (path, mounts)
    assert mounts[-1] == "/scratch:/scratch:ro"
    assert f"--container-workdir={REPO}" in opts
    assert (tmp_path / "run").is_dir(), "RUN_DIR must exist before it is mounted"


def test_finetune_container_runs_in_the_submit_dir(job, tmp_path):
    model = tmp_path / "ckpt/phase2"
    model.mkdir(parents=True)
    res, calls = job("slurm/finetune.sh", "--task", "classify", "--model", str(model), "--train", "t.tsv",
                     "--output-dir", "ft", env={"CONTAINER_IMAGE": "img.sqsh"})
    assert res.returncode == 0, res.stderr
    (srun,) = sruns(calls)
    opts, cmd = split_srun(srun["argv"])
    mounts = next(o for o in opts if o.startswith("--container-mounts=")).split("=", 1)[1].split(",")
    assert f"--container-workdir={job.submit}" in opts, opts
    for path in (REPO, job.submit, model):
        assert f"{path}:{path}" in mounts, (path, mounts)
    assert srun["cwd"] == str(job.submit)
    assert "--cpus-per-task=8" in opts and cmd[:3] == ["python", "-m", "finetune"]


def test_phase2_copies_account_qos_constraint_reservation_exclusive(job):
    res, calls = job("slurm/pretrain_large.sh", env={"PHASE2_SBATCH_ARGS": "--time=2-00:00:00"})
    assert res.returncode == 0, res.stderr
    (sb,) = [c for c in calls if c["tool"] == "sbatch"]
    argv = sb["argv"]
    for opt in ("--nodes=2", "--ntasks-per-node=8", "--cpus-per-task=8", "--mem=0", "--partition=gpu",
                "--gres=gpu:8", "--time=1-00:00:00", "--account=proj7", "--qos=high", "--constraint=h100&ib",
                "--reservation=maint_after", "--exclusive", "--output=/logs/%x-%j.out",
                "--dependency=afterok:4242", "--export=ALL,PHASE=2"):
        assert opt in argv, (opt, argv)
    # PHASE2_SBATCH_ARGS come after the copied options, so sbatch takes them (the last one wins).
    assert argv.index("--time=2-00:00:00") > argv.index("--time=1-00:00:00")
    assert argv[-1] == str(REPO / "slurm/pretrain_large.sh")
    assert [a for a in argv if a.startswith(("--gpus", "--gres"))] == ["--gres=gpu:8"], argv
    assert "submitted phase 2 as job 777" in res.stderr


def test_phase2_slurm_22_spelling_and_shared_nodes(job):
    info = (JOB_INFO_23.replace("TresPerNode=gres/gpu:8", "TresPerNode=gres:gpu:8")
            .replace("OverSubscribe=NO", "OverSubscribe=YES").replace("MinMemoryNode=0", "MinMemoryNode=200G")
            .replace("Account=proj7", "Account=(null)").replace(" Reservation=maint_after", ""))
    res, calls = job("slurm/pretrain_large.sh", env={"FAKE_JOB_INFO": info})
    (sb,) = [c for c in calls if c["tool"] == "sbatch"]
    argv = sb["argv"]
    assert "--gres=gpu:8" in argv and "--oversubscribe" in argv and "--mem=200G" in argv, argv
    assert not any(a.startswith(("--account", "--reservation")) for a in argv) and "--exclusive" not in argv, argv


def test_refused_phase2_does_not_end_phase1(job):
    res, calls = job("slurm/pretrain_large.sh", env={"FAKE_SBATCH_FAIL": "1"})
    assert res.returncode == 0, res.stderr
    assert len(sruns(calls)) == 1, "phase 1 must still train"
    assert "WARNING: the controller refused phase 2" in res.stderr and "PHASE=2" in res.stderr


def test_finetune_array_elements_get_their_own_output_and_port(job):
    args = ("--task", "classify", "--model", "m", "--train", "t.tsv", "--output-dir", "ft", "--seeds", "SEED")
    seen = {}
    for element, job_id in ((1, 5001), (2, 5002)):
        res, calls = job("slurm/finetune.sh", *args, job_id=job_id,
                         env={"SLURM_ARRAY_TASK_ID": str(element), "SLURM_ARRAY_JOB_ID": "5000",
                              "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1"})
        assert res.returncode == 0, res.stderr
        train, summary = sruns(calls)
        _, cmd = split_srun(train["argv"])
        assert cmd[cmd.index("--output-dir") + 1] == f"{job.submit}/ft/array_{element}", cmd
        assert cmd[cmd.index("--seeds") + 1] == str(element)
        seen[element] = (train["env"]["MASTER_ADDR"], train["env"]["MASTER_PORT"])
        opts, scmd = split_srun(summary["argv"])
        assert "--ntasks=1" in opts and scmd[1:] == [str(REPO / "slurm/_array_summary.py"), f"{job.submit}/ft"]
    assert seen[1][0] == seen[2][0] == "node1"
    assert seen[1][1] != seen[2][1], f"two jobs on one node need two ports: {seen}"


def test_finetune_without_output_dir_is_refused(job):
    res, calls = job("slurm/finetune.sh", "--task", "classify", "--model", "m", "--train", "t.tsv")
    assert res.returncode == 2 and "no --output-dir" in res.stderr and not sruns(calls)


def _task(env: dict, *cmd: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "CUDA_VISIBLE_DEVICES"}
    return subprocess.run(["bash", str(REPO / "slurm/_task.sh"), *cmd], env={**base, **env},
                          capture_output=True, text=True, timeout=30)


def test_task_wrapper_sets_ranks_and_uses_the_gpu_at_local_rank():
    env = {"SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8",
           "SLURM_CPUS_PER_TASK": "8", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    res = _task(env, "sh", "-c", 'echo "$RANK $LOCAL_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE"')
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["11", "3", "16", "8"]
    assert "gpu=3 " in res.stderr and "cpus_per_task=8" in res.stderr, res.stderr
    logged = res.stderr.split("cpus=", 1)[1].split()[0]
    assert cpu_list(logged) == os.sched_getaffinity(0), logged
    # A cluster that gives each task one GPU (--gpu-bind=single:1): cuda:3 would not exist.
    res = _task({**env, "CUDA_VISIBLE_DEVICES": "3"}, "true")
    assert res.returncode == 2 and "sees only GPU(s) 3" in res.stderr and "SRUN_ARGS" in res.stderr, res.stderr
    # GRES without device files (CUDA_VISIBLE_DEVICES unset): the index is the local rank.
    env.pop("CUDA_VISIBLE_DEVICES")
    res = _task({**env, "SLURM_GPUS_ON_NODE": "8"}, "true")
    assert res.returncode == 0 and "gpu=3/8 " in res.stderr, res.stderr


def _element(out: Path, index: int, acc: float, array_job: str | None) -> None:
    """An array element's output as finetune.sh leaves it (the marker only once it succeeded)."""
    (out / f"array_{index}").mkdir(parents=True, exist_ok=True)
    (out / f"array_{index}/metrics.json").write_text(json.dumps(
        {"task": "classify", "model": "m", "runs": [{"seed": index, "accuracy": acc, "per_type": {}}]}))
    if array_job is not None:
        (out / f"array_{index}/slurm_array.json").write_text(json.dumps({"array_job_id": array_job}))


def _summary(out: Path, count: int = 3, array_job: str = "200", **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "slurm/_array_summary.py"), str(out)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "SLURM_ARRAY_TASK_COUNT": str(count),
                               "SLURM_ARRAY_JOB_ID": array_job, **env},
                          capture_output=True, text=True, timeout=60)


def test_array_summary_merges_the_elements(tmp_path):
    out = tmp_path / "ft"
    for i, acc in ((1, 0.5), (2, 0.7), (3, 0.9)):
        _element(out, i, acc, "200")
    res = _summary(out)
    assert res.returncode == 0, res.stderr
    s = json.loads((out / "metrics.json").read_text())
    assert s["seeds"] == [1, 2, 3] and s["complete"] is True and sorted(s["elements"]) == ["1", "2", "3"]
    assert s["mean"]["accuracy"] == pytest.approx(0.7) and s["std"]["accuracy"] == pytest.approx(0.2)
    assert s["array_job_id"] == "200" and not list(out.glob("*.tmp.*")), "temp file left behind"
    # readable as the umask allows, like every other output (not mkstemp's owner-only 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "metrics.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_array_summary_counts_only_this_array_jobs_elements(tmp_path):
    # OUT held an earlier --array=1-5 (job 100); now --array=1-3 (job 200): elements 1 and 2 are
    # done, 3 is training again (its old metrics still there, no marker), 4 and 5 are leftovers.
    out = tmp_path / "ft"
    _element(out, 1, 0.5, "200")
    _element(out, 2, 0.7, "200")
    _element(out, 3, 0.1, None)
    _element(out, 4, 0.1, "100")
    _element(out, 5, 0.1, "100")
    res = _summary(out)
    assert res.returncode == 0, res.stderr
    s = json.loads((out / "metrics.json").read_text())
    assert sorted(s["elements"]) == ["1", "2"] and s["complete"] is False, s
    assert s["mean"]["accuracy"] == pytest.approx(0.6), s


def test_array_summary_leaves_out_a_damaged_element(tmp_path):
    # element 2's marker and element 3's metrics were cut short (a node lost mid-write): the
    # summary is made from element 1, says it is incomplete and names both files
    out = tmp_path / "ft"
    for i in (1, 2, 3):
        _element(out, i, 0.5 + i / 10, "200")
    (out / "array_2/slurm_array.json").write_text('{"array_job_id": "2')
    (out / "array_3/metrics.json").write_text('{"task": ')
    res = _summary(out)
    assert res.returncode == 0, res.stderr
    s = json.loads((out / "metrics.json").read_text())
    assert sorted(s["elements"]) == ["1"] and s["complete"] is False and s["mean"]["accuracy"] == pytest.approx(0.6)
    assert "array_2/slurm_array.json: unreadable" in res.stderr and "array_3/metrics.json: unreadable" in res.stderr


def test_array_summary_does_not_write_through_a_lock_symlink(tmp_path):
    out = tmp_path / "ft"
    _element(out, 1, 0.5, "200")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (out / ".metrics.lock").symlink_to(victim)
    res = _summary(out, count=1)
    assert victim.read_text() == "keep"
    assert res.returncode != 0 and ".metrics.lock is a symlink" in res.stderr, res.stderr


def test_array_summary_without_file_locks(tmp_path, monkeypatch, capsys):
    """Lustre mounted without `flock`: flock() fails with ENOSYS; the summary is still written."""
    import errno
    import importlib.util

    out = tmp_path / "ft"
    _element(out, 1, 0.5, "200")
    _element(out, 2, 0.7, "200")
    spec = importlib.util.spec_from_file_location("array_summary", REPO / "slurm/_array_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(mod.fcntl, "flock", no_flock)
    monkeypatch.setattr(sys, "argv", ["_array_summary.py", str(out)])
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "200")
    mod.main()
    s = json.loads((out / "metrics.json").read_text())
    assert sorted(s["elements"]) == ["1", "2"] and s["complete"] is True
    assert "no file locks" in capsys.readouterr().err


def test_finetune_array_element_survives_a_failed_summary(job):
    args = ("--task", "classify", "--model", "m", "--train", "t.tsv", "--output-dir", "ft", "--seeds", "SEED")
    stale = job.submit / "ft/array_2/slurm_array.json"
    stale.parent.mkdir(parents=True)
    stale.write_text('{"array_job_id": "100"}')
    res, calls = job("slurm/finetune.sh", *args, job_id=5002,
                     env={"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_JOB_ID": "5000", "SLURM_ARRAY_TASK_COUNT": "2",
                          "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "FAKE_SRUN_FAIL": "_array_summary.py"})
    assert res.returncode == 0, res.stderr
    assert len(sruns(calls)) == 2 and "WARNING: the array summary" in res.stderr, res.stderr
    # The element's marker names this array job (the summary counts it); the old one is gone.
    assert json.loads(stale.read_text()) == {"array_job_id": "5000", "array_task_id": 2, "job_id": "5002"}


def test_phase2_reads_this_jobs_line_when_scontrol_lists_several(job):
    # For an array's base id `scontrol show job -o` prints every element, this job's line not first.
    other = JOB_INFO_23.replace("JobId=4242", "JobId=4243").replace("Account=proj7", "Account=other")
    res, calls = job("slurm/pretrain_large.sh", env={"FAKE_JOB_INFO": other + "\n" + JOB_INFO_23})
    assert res.returncode == 0, res.stderr
    (sb,) = [c for c in calls if c["tool"] == "sbatch"]
    assert [a for a in sb["argv"] if a.startswith("--account")] == ["--account=proj7"], sb["argv"]


def test_container_mounts_keep_symlinked_paths_as_the_job_sees_them(job, tmp_path):
    # /home -> /gpfs/home style: the checkout, the data and the run dir are reached through a link.
    real = tmp_path / "gpfs"
    (real / "data").mkdir(parents=True)
    (real / "data/manifest.json").write_text("{}")
    link = tmp_path / "home"
    link.symlink_to(real)
    repo_link = tmp_path / "repo_link"
    repo_link.symlink_to(REPO)
    res, calls = job("slurm/pretrain_large.sh", env={
        "CONTAINER_IMAGE": "img.sqsh", "CHAIN_PHASE2": "0", "REPO": str(repo_link),
        "DATA": str(link / "data"), "RUN_DIR": str(link / "run")})
    assert res.returncode == 0, res.stderr
    (srun,) = sruns(calls)
    argv = srun["argv"]
    mounts = next(o for o in argv if o.startswith("--container-mounts=")).split("=", 1)[1].split(",")
    # Source: the real folder; target: the path the job uses inside (workdir, _task.sh, --data).
    for src, dst in ((REPO, repo_link), (real / "data", link / "data"), (real / "run", link / "run")):
        assert f"{src}:{dst}" in mounts, (src, dst, mounts)
    assert f"--container-workdir={repo_link}" in argv, argv
    assert str(repo_link / "slurm/_task.sh") in argv and str(link / "data") in argv, argv


def test_phase2_keeps_its_shape_through_a_scontrol_timeout(job):
    res, calls = job("slurm/pretrain_large.sh", env={"FAKE_SCONTROL_FAILS": "2"})
    assert res.returncode == 0, res.stderr
    (sb,) = [c for c in calls if c["tool"] == "sbatch"]
    assert "--nodes=2" in sb["argv"] and "--account=proj7" in sb["argv"] and "--gres=gpu:8" in sb["argv"], sb["argv"]


def test_phase2_is_not_chained_without_phase1s_shape(job):
    # The controller never answers: phase 2 with the script's defaults (4 nodes, no account)
    # would be wrong; it is not submitted, phase 1 trains, and the log says how to submit it.
    res, calls = job("slurm/pretrain_large.sh", env={"FAKE_SCONTROL_FAILS": "99", "SLURM_JOB_ACCOUNT": "proj7"})
    assert res.returncode == 0, res.stderr
    assert len([c for c in calls if c["tool"] == "scontrol" and c["argv"][:2] == ["show", "job"]]) == 3
    assert not [c for c in calls if c["tool"] == "sbatch"], "phase 2 submitted without phase 1's shape"
    assert len(sruns(calls)) == 1, "phase 1 must still train"
    assert "phase 2 NOT chained" in res.stderr and "--nodes=2" in res.stderr and "--account=proj7" in res.stderr, res.stderr


@pytest.mark.parametrize("tres, expected", [
    ("TresPerJob=gres:gpu:16", ["--gres=none", "--gpus=16"]),                      # sbatch --gpus=16 (22.05)
    ("TresPerJob=gres/gpu:a100:16", ["--gres=none", "--gpus=a100:16"]),            # 23.02 spelling, typed
    ("TresPerTask=cpu=8,gres/gpu:1", ["--gres=none", "--gpus-per-task=1"]),        # --gpus-per-task=1 (23.x)
])
def test_phase2_keeps_gpus_asked_for_per_job_or_task(job, tres, expected):
    info = JOB_INFO_23.replace("TresPerNode=gres/gpu:8", tres) + " ExcNodeList=node[7,9]"
    res, calls = job("slurm/pretrain_large.sh", env={"FAKE_JOB_INFO": info})
    (sb,) = [c for c in calls if c["tool"] == "sbatch"]
    argv = sb["argv"]
    for opt in (*expected, "--exclude=node[7,9]"):
        assert opt in argv, (opt, argv)
    assert len([a for a in argv if a.startswith(("--gpus", "--gres"))]) == len(expected), argv


def _mounts(srun: dict) -> list[str]:
    return next(o for o in srun["argv"] if o.startswith("--container-mounts=")).split("=", 1)[1].split(",")


def test_container_mounts_configs_and_argument_paths_outside_the_repo(job, tmp_path):
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "phase1.json").write_text((REPO / "configs/phase1.json").read_text())
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    (vocab / "v.txt").write_text("[PAD]\n")
    extra = tmp_path / "extra"
    extra.mkdir()
    res, calls = job("slurm/pretrain_large.sh", "--vocab=" + str(vocab / "v.txt"), "--some_dir", str(extra),
                     env={"CONTAINER_IMAGE": "img.sqsh", "CHAIN_PHASE2": "0", "PHASE1_CONFIG": str(cfg / "phase1.json")})
    assert res.returncode == 0, res.stderr
    mounts = _mounts(sruns(calls)[0])
    for path in (cfg, vocab, extra):
        assert f"{path}:{path}" in mounts, (path, mounts)


def test_finetune_container_mounts_flag_equals_paths(job, tmp_path):
    model = tmp_path / "ckpt/phase2"
    model.mkdir(parents=True)
    (tmp_path / "glue").mkdir()
    (tmp_path / "glue/train.tsv").write_text("sentence\tlabel\n")
    res, calls = job("slurm/finetune.sh", "--task", "classify", f"--model={model}", f"--train={tmp_path}/glue/train.tsv",
                     "--output-dir", "ft", env={"CONTAINER_IMAGE": "img.sqsh"})
    assert res.returncode == 0, res.stderr
    mounts = _mounts(sruns(calls)[0])
    for path in (model, tmp_path / "glue"):
        assert f"{path}:{path}" in mounts, (path, mounts)


@pytest.mark.parametrize("name", ["data,v2", "data:v2"])
def test_container_refuses_a_path_with_comma_or_colon(job, tmp_path, name):
    data = tmp_path / name
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    res, calls = job("slurm/pretrain_large.sh", env={"CONTAINER_IMAGE": "img.sqsh", "DATA": str(data)})
    assert res.returncode == 2 and "--container-mounts cannot express" in res.stderr and str(data) in res.stderr, res.stderr
    assert not sruns(calls) and not [c for c in calls if c["tool"] == "sbatch"], "nothing may start"


def test_rendezvous_from_a_submitting_shell_with_master_addr(job):
    # A shell that ran torchrun on the login node: sbatch's --export=ALL carries its variables.
    res, calls = job("slurm/pretrain_large.sh", env={"MASTER_ADDR": "login3", "CHAIN_PHASE2": "0"})
    assert res.returncode == 0, res.stderr
    assert sruns(calls)[0]["env"]["MASTER_ADDR"] == "node1", "an address outside the job cannot be the rendezvous"
    assert "ignoring MASTER_ADDR=login3" in res.stderr
    # One of the job's own hosts is kept; a fixed port is kept but said to collide.
    res, calls = job("slurm/pretrain_large.sh", env={"MASTER_ADDR": "node2", "MASTER_PORT": "29500", "CHAIN_PHASE2": "0"})
    assert (sruns(calls)[0]["env"]["MASTER_ADDR"], sruns(calls)[0]["env"]["MASTER_PORT"]) == ("node2", "29500")
    assert "MASTER_PORT=29500 from the submitting environment replaces this job's own port 14242" in res.stderr
