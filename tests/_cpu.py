"""Threads for a single-process test that trains.

pytest runs one test at a time, so such a test has every core this process may use; multi-process
tests instead pin each rank to one thread (OMP_NUM_THREADS=1, set in conftest.py and by
tests/distributed/_spawn.py). Not read from the load average: at collection time it still holds
whatever ran before (the install), and made these tests run on one core of two.
"""
import os

TRAIN_THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
