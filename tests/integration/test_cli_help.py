"""Every entry point answers --help (argparse formats help strings lazily: a stray % only fails here)."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("cmd", [
    ["-m", "data_prep"], ["-m", "data_prep.verify"], ["pretrain/run.py"], ["-m", "pretrain.export_hf"], ["-m", "finetune"],
])
def test_help(cmd):
    r = subprocess.run([sys.executable, *cmd, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout and "Traceback" not in r.stderr
