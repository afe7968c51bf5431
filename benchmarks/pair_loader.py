"""Pretraining loader open cost at Wikipedia + BookCorpus scale: a 50M-pair index, new path vs old.

Data: a real data_prep output of the embedded Wikipedia corpus (seq 128, prepared once into
--cache-dir), whose train pair index is replaced by `--pairs` synthetic records (valid sentence
runs of that corpus, random A/B lengths 1-3 sentences) written with data_prep.pairs' own
PairIndexWriter: 650 MB at 50M pairs. The same is done with `--small-pairs` to show what grows
with the pair count.

Each configuration runs in a fresh subprocess, so its peak RSS (VmHWM) is its own:
- new: `PretrainingDataset(...)` as it is now (4,096 records spot-checked on open; the epoch's
  order is a keyed bijection evaluated at the batch's positions);
- old: the same class with the open and the order of before issue 12, reproduced here (`OldDataset`):
  the whole pair index range-checked in 4M-record chunks on open, and the epoch's permutation as an
  argsort of 64-bit hashes of every pair id, once per process (and per DataLoader worker).
"open" is the constructor; "first batch" is the first `--micro` samples at `--resume-at` (default:
mid epoch 2, as after a resume) through `get_batch`, or, with workers, through build_dataloader's
iterator (fork workers, as training uses: each worker computed the old permutation itself).
Peak RSS is VmHWM, which counts torch and the shared page cache of the memory-mapped files (the
kernel maps whole cached folios around each touched record); "private" is the peak anonymous RSS
(sampled every 10 ms) above that after the imports: what each process or worker adds on its own.
With workers: the largest worker's. The ratio columns are old / new, measured in
the same run one after the other.

    nice -n 10 .venv/bin/python benchmarks/pair_loader.py [--pairs 50000000] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from data_prep.pairs import PAIR_DTYPE, PairIndex, PairIndexError, PairIndexWriter  # noqa: E402

SEQ = 128
_OLD_CHUNK = 1 << 22  # the old open's records per validation pass


def prepare(cache_dir: str, n_pairs: int) -> str:
    """A data dir: the embedded corpus prepared by data_prep, with an n_pairs-record train index."""
    from data_prep.testing import build_tiny_dataset

    base = build_tiny_dataset(os.path.join(cache_dir, "base"), seq_lengths=(SEQ,), n_docs=2000)
    out = os.path.join(cache_dir, f"pairs_{n_pairs}")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(base):
        if name != f"pairs_{SEQ}_train.bin" and not os.path.exists(os.path.join(out, name)):
            os.symlink(os.path.join(base, name), os.path.join(out, name))
    path = os.path.join(out, f"pairs_{SEQ}_train.bin")
    try:
        if len(PairIndex(path)) == n_pairs:
            return out
    except PairIndexError:
        pass
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    n_sent = len(IndexedDataset(os.path.join(base, "corpus")))
    rng = np.random.default_rng(0)
    writer = PairIndexWriter(path, SEQ)
    t0 = time.perf_counter()
    for lo in range(0, n_pairs, 1 << 20):
        k = min(1 << 20, n_pairs - lo)
        rec = np.zeros(k, dtype=PAIR_DTYPE)
        for side in ("a", "b"):
            rec[f"{side}_count"] = rng.integers(1, 4, k)
            rec[f"{side}_start"] = rng.integers(0, n_sent - 3, k)
        rec["is_random"] = rng.integers(0, 2, k)
        writer.write(rec)
    writer.close()
    print(f"wrote {n_pairs:,} pairs ({os.path.getsize(path) / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return out


def _status_mib(pid) -> dict[str, float]:
    """VmHWM (peak RSS), VmRSS and RssAnon (private memory) in MiB from /proc/<pid>/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon"):
                out[key] = int(value.split()[0]) / 1024
    return out


class PeakSampler(threading.Thread):
    """Samples RssAnon of this process and of its children every 10 ms (the kernel keeps a peak only
    for the whole RSS, VmHWM, which also counts the shared page cache of the memory-mapped files)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak: dict[int, float] = {}
        self.hwm: dict[int, float] = {}
        self._halt = threading.Event()

    def sample(self):
        import psutil

        for pid in [os.getpid()] + [c.pid for c in psutil.Process().children()]:
            try:
                st = _status_mib(pid)
            except OSError:
                continue
            if "RssAnon" not in st:  # an exited worker (zombie)
                continue
            self.peak[pid] = max(self.peak.get(pid, 0.0), st["RssAnon"])
            self.hwm[pid] = max(self.hwm.get(pid, 0.0), st["VmHWM"])

    def run(self):
        while not self._halt.wait(0.01):
            self.sample()

    def stop(self):
        self._halt.set()
        self.join()
        self.sample()


def child(path: str, data_dir: str, workers: int, micro: int, resume_at: float) -> dict:
    """One configuration in this (fresh) process; returns its timings and memory."""
    import torch

    from pretrain.data import PretrainingDataset, build_dataloader
    from pretrain.masking import PURPOSE_EPOCH_ORDER, random_bits, sample_keys

    class OldDataset(PretrainingDataset):
        """Open and epoch order as before issue 12 (copied from pretrain/data.py at 39790cc)."""

        def _open(self):
            super()._open()
            n_sent = len(self._lengths)
            p = self.pair_index.pairs
            for lo in range(0, len(p), _OLD_CHUNK):
                q = p[lo : lo + _OLD_CHUNK]
                a_start, b_start = q["a_start"].astype(np.int64), q["b_start"].astype(np.int64)
                a_count, b_count = q["a_count"].astype(np.int64), q["b_count"].astype(np.int64)
                bad = (a_count < 1) | (b_count < 1) | (a_start + a_count > n_sent) | (b_start + b_count > n_sent)
                assert not bad.any()
            self._perms = {}

        def _old_order(self, epoch):
            perm = self._perms.get(epoch)
            if perm is None:
                keys = sample_keys(self.seed, np.array([epoch]))
                bits = random_bits(keys, PURPOSE_EPOCH_ORDER, np.arange(self.num_pairs, dtype=np.uint64))
                perm = np.argsort(bits, kind="stable")
                if self.num_pairs < 2**31:
                    perm = perm.astype(np.int32)
                if len(self._perms) >= 2:
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = perm
            return perm

        def _pair_ids(self, indices):
            epochs, within = indices // self.num_pairs, indices % self.num_pairs
            out = np.empty(len(indices), dtype=np.int64)
            for e in np.unique(epochs):
                sel = epochs == e
                out[sel] = self._old_order(int(e))[within[sel]]
            return out

    torch.set_num_threads(1)
    base = _status_mib("self")["RssAnon"]  # after the imports: what every process pays anyway
    sampler = PeakSampler()
    sampler.start()
    cls = OldDataset if path == "old" else PretrainingDataset
    t0 = time.perf_counter()
    ds = cls(data_dir, SEQ, seed=1234)
    t_open = time.perf_counter() - t0
    start = int(resume_at * len(ds))
    t0 = time.perf_counter()
    if workers == 0:
        batch = ds.get_batch(np.arange(start, start + micro))
    else:
        loader = build_dataloader(ds, micro, consumed_samples=start, num_workers=workers, pin_memory=False,
                                  prefetch_factor=1)
        it = iter(loader)
        batch = next(it)
        sampler.sample()  # the workers, before they exit
        del it
    t_first = time.perf_counter() - t0
    sampler.stop()
    assert len(batch["input_ids"]) == micro
    me = os.getpid()
    kids = [pid for pid in sampler.peak if pid != me]
    return {"open_s": t_open, "first_s": t_first,
            "rss_mib": sampler.hwm[me], "anon_mib": sampler.peak[me] - base,
            "worker_rss_mib": max((sampler.hwm[k] for k in kids), default=None),
            "worker_anon_mib": max((sampler.peak[k] for k in kids), default=base) - base}


def run_child(path: str, data_dir: str, workers: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path, "--data-dir", data_dir,
           "--workers", str(workers), "--micro", str(args.micro), "--resume-at", str(args.resume_at)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
    if out.returncode:
        raise SystemExit(f"{path} path failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=50_000_000, help="pairs in the big index (default %(default)s)")
    parser.add_argument("--small-pairs", type=int, default=1_000_000, help="pairs in the small index")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the worker lines (0: skip)")
    parser.add_argument("--micro", type=int, default=256, help="samples in the first batch")
    parser.add_argument("--resume-at", type=float, default=1.5, help="first sample, in epochs (default mid epoch 2)")
    parser.add_argument("--cache-dir", default="/tmp/bert_pair_loader_bench", help="where the data is written once")
    parser.add_argument("--child", choices=("old", "new"), help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.child:
        print(json.dumps(child(args.child, args.data_dir, args.workers, args.micro, args.resume_at)))
        return

    configs = [(args.small_pairs, 0), (args.pairs, 0)] + ([(args.pairs, args.workers)] if args.workers else [])
    dirs = {n: prepare(args.cache_dir, n) for n in sorted({n for n, _ in configs})}
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; one thread per process; "
          f"first batch = {args.micro} samples at epoch {args.resume_at}")
    print(f"{'pairs':>12} {'workers':>7} | {'open s':>17} | {'first batch s':>17} | "
          f"{'peak RSS MiB':>17} | {'private MiB':>17}")
    print(f"{'':>12} {'':>7} | {'old':>5} {'new':>5} {'ratio':>5} | {'old':>5} {'new':>5} {'ratio':>5} | "
          f"{'old':>5} {'new':>5} {'ratio':>5} | {'old':>5} {'new':>5} {'ratio':>5}")
    for n, workers in configs:
        r = {path: run_child(path, dirs[n], workers, args) for path in ("old", "new")}
        rss, added = ("worker_rss_mib", "worker_anon_mib") if workers else ("rss_mib", "anon_mib")
        cells = []
        for key in ("open_s", "first_s", rss, added):
            old, new = r["old"][key], r["new"][key]
            fmt = "5.0f" if "mib" in key else "5.2f"
            ratio = f"{old / new:5.1f}" if new >= (1 if "mib" in key else 0.005) else "   >>"
            cells.append(f"{old:{fmt}} {new:{fmt}} {ratio}")
        print(f"{n:>12,} {workers:>7} | " + " | ".join(cells), flush=True)
    print("peak RSS = VmHWM: includes torch (~300 MiB) and the page cache of the memory-mapped index and corpus, "
          "which all processes share; private = peak RssAnon (sampled every 10 ms) minus the RssAnon after the "
          "imports: the memory a process or worker adds on its own. With workers: open = the main process's "
          "constructor; first batch = iter() to the first batch (workers start and build it); memory = the "
          "largest worker's. '>>': the new figure is below the display resolution")


if __name__ == "__main__":
    main()
