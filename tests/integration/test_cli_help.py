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


def test_finetune_help_documents_every_flag():
    """Every flag of `python -m finetune` (and each alias, e.g. transformers' spellings) shows in
    --help with a help text."""
    from finetune.cli import build_parser

    p = build_parser()
    text = p.format_help()
    for action in p._actions:
        if action.help == "==SUPPRESS==" or not action.option_strings:
            continue
        assert action.help and action.help.strip(), f"{action.option_strings} has no help text"
        for flag in action.option_strings:
            assert flag in text, flag
