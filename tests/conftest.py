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
