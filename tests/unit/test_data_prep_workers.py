"""How a broken worker pool is reported: the message follows how the worker died (read from the
pool's processes before shutdown), with advice that fits the phase."""
import os
import signal
from concurrent.futures.process import BrokenProcessPool

import pytest

from data_prep.pipeline import PrepConfig, _executor, worker_death_message, worker_exit_codes

CFG = PrepConfig(inputs=["x"], output_dir="o", vocab="v.txt", workers=3, shard_bytes=1 << 20,
                 tokenizer_train_sentences=5000)


def _die(how):
    if how == "exit":
        os._exit(3)
    os.kill(os.getpid(), how)


@pytest.mark.parametrize("how, code", [(signal.SIGKILL, -9), (signal.SIGSEGV, -11), ("exit", 3)])
def test_exit_codes_of_a_broken_pool(how, code):
    pool = _executor(2)
    try:
        with pytest.raises(BrokenProcessPool):
            pool.submit(_die, how).result()
        codes = worker_exit_codes(pool)
    finally:
        pool.shutdown(wait=True)
    assert code in codes.values()
    # The sibling is terminated by the pool (SIGTERM) or still exiting: never the cause.
    assert set(codes.values()) <= {code, -signal.SIGTERM, None}
    assert worker_exit_codes(pool) == {}  # shutdown drops them: read before


def test_messages_per_death_and_phase():
    term = -signal.SIGTERM
    m = worker_death_message({1: -9, 2: term}, "tokenize", CFG)
    assert "out-of-memory" in m and "lower --workers (3) or --shard-bytes (1048576)" in m and "tokenizing" in m
    m = worker_death_message({1: term, 2: -9}, "pairs", CFG)
    assert "out-of-memory" in m and "lower --workers (3) and re-run" in m and "shard-bytes" not in m
    m = worker_death_message({1: -9}, "train_tokenizer", CFG)
    assert "lower --tokenizer-train-sentences (5000)" in m and "--workers" not in m
    for phase in ("tokenize", "pairs", "train_tokenizer"):
        m = worker_death_message({1: -11, 2: term}, phase, CFG)
        assert "crashed (SIGSEGV" in m and "out-of-memory" not in m
        m = worker_death_message({1: 3, 2: None}, phase, CFG)
        assert "exited with code 3" in m and "out-of-memory" not in m
        assert "exited with code 0" in worker_death_message({1: 0}, phase, CFG)
        assert "killed by SIGABRT" in worker_death_message({1: -6, 2: term}, phase, CFG)
        assert "SIGTERM" in worker_death_message({1: term}, phase, CFG)
        assert "unknown" in worker_death_message({}, phase, CFG)
        assert all("\n" not in worker_death_message(c, phase, CFG) for c in ({1: -9}, {1: -11}, {1: 2}, {}))
