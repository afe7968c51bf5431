import os
import sys

# Tests run on CPU: DeepSpeed must not probe for CUDA, and torch threads stay bounded so that
# multi-process tests on 2 cores do not oversubscribe.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# DeepSpeed JIT-builds some ops on first use; a cache per venv avoids rebuilds between venvs (FACTS.md).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

import pytest  # noqa: E402

# pytest.ini's timeout (900 s) guards the default run against a hang; a slow-marked check is sized
# in its own comment (a 2-seed cloze fine-tune is ~30 min on 2 cores, the CPU recipe's pretraining
# ~30 min plus fine-tuning), so it gets this bound unless it names its own with @pytest.mark.timeout.
SLOW_TIMEOUT_S = 3 * 3600


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
