"""`sbatch slurm/data_prep.sh` on two nodes (one MPI rank each, srun --mpi=pmix) writes the same
bytes as a single-process `python -m data_prep` run of the same inputs."""
import filecmp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.slurm_cluster import show_report, slurm_cluster  # noqa: F401  (fixture)

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
SHAPE = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gres=none"]


def test_two_node_data_prep_is_byte_identical_to_single_process(slurm_cluster, tmp_path, request):
    from data_prep.embedded import embedded_corpus_jsonl, embedded_vocab

    c = slurm_cluster
    work = c.root / "jobs/data_prep"
    work.mkdir(parents=True)
    lines = Path(embedded_corpus_jsonl(str(work / "cache"), max_docs=120)).read_text().splitlines(keepends=True)
    # Ranks share out input files (rank i % size reads file i): four files, so both nodes read and
    # tokenize some; small shards, and the same flags for both runs.
    corpus = work / "input"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"part-{i}.jsonl").write_text("".join(lines[i::4]))
    corpus = str(corpus)
    vocab = embedded_vocab()
    common = ["--seq-length", "64", "--seq-length", "128", "--docs-per-shard", "20", "--workers", "1"]
    out = work / "out"

    t0 = time.monotonic()
    single = subprocess.run(
        [sys.executable, "-m", "data_prep", "--input", corpus, "--vocab", vocab, "--output-dir", str(out),
         "--mpi", "off", "--no-progress", *common],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert single.returncode == 0, single.stderr
    t_single = time.monotonic() - t0
    ref = work / "ref"
    out.rename(ref)  # same output path for both runs: the manifest records it

    t0 = time.monotonic()
    job = c.sbatch(*SHAPE, f"--output={work}/%x-%j.out", str(REPO / "slurm/data_prep.sh"), *common,
                   env={"INPUT": corpus, "VOCAB": vocab, "DATA": str(out), "SEQ_LENGTHS": ""}, cwd=str(work))
    info = c.wait_job(job, 240)
    log = Path(info["StdOut"]).read_text()
    t_job = time.monotonic() - t0
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    hosts = sorted(set(ln.split("host=")[1].split()[0] for ln in log.splitlines() if "task rank=" in ln))
    assert hosts == sorted(n.name for n in c.nodes), log
    assert "[rank 1]" not in log or "ERROR" not in log, log

    names = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    match, mismatch, errors = filecmp.cmpfiles(ref, out, names, shallow=False)
    assert not mismatch and not errors, f"differ: {mismatch} {errors}"
    show_report(request, "SLURM cluster: data prep", [
        f"job {job}: {info['JobState']} ExitCode={info['ExitCode']} on {info['NodeList']} "
        f"({', '.join(ln.split('] ')[-1] for ln in log.splitlines() if 'task rank=' in ln)})",
        f"{len(match)} files byte-identical to the single-process run: {', '.join(match)}",
        f"single process {t_single:.1f}s, 2-node job {t_job:.1f}s (2 shared cores: not a speed figure)",
    ])
