"""Import a script under benchmarks/ by its path, for tests that reuse its functions.

Not by putting benchmarks/ on sys.path: a file there named like a package of ours would then
shadow it, in this process and in every process spawned from it (multiprocessing copies sys.path).
"""
import importlib.util
import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load_benchmark(name: str):
    key = f"benchmarks_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module
