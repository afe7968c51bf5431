"""benchmarks/skipgram_init.py: skip-gram puts tokens that share contexts together."""
import numpy as np
import torch.nn.functional as F

from tests._bench import load_benchmark


def test_tokens_sharing_contexts_end_up_closer_than_tokens_that_do_not():
    sg = load_benchmark("skipgram_init")
    rng = np.random.default_rng(0)
    # two "topics": ids 10-19 only ever appear among 10-19, ids 20-29 among 20-29 (runs of 8 tokens)
    runs = [rng.integers(lo, lo + 10, size=8) for lo in rng.choice([10, 20], size=4000)]
    # subsample 1: keep every token (the corpus default 1e-4 would drop ~95% of these frequent ones)
    emb = sg.train_skipgram(np.concatenate(runs), vocab_size=32, dim=16, epochs=2, window=2, batch=1024, lr=0.05,
                            subsample=1.0)
    unit = F.normalize(emb - emb.mean(0), dim=-1)
    sim = unit @ unit.T
    same = (sim[10:20, 10:20].sum() - 10) / 90  # off-diagonal mean within a topic
    across = sim[10:20, 20:30].mean()
    assert same > 0.5 and across < 0.0, (float(same), float(across))
