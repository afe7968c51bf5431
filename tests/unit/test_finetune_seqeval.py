"""Entity-level scores against cases counted by hand."""
import pytest

from finetune.seqeval import entities, entity_scores


def test_entities_bio_and_lenient_starts():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-ORG", "O", "B-PER"]
    # I-LOC after O starts an entity; B-LOC after I-LOC starts another; I-ORG after B-LOC
    # has another type so it starts its own; the last B-PER ends at the sentence end.
    assert entities(tags) == [
        ("PER", 0, 1), ("LOC", 3, 4), ("LOC", 5, 5), ("ORG", 6, 6), ("PER", 8, 8)]
    assert entities(["O", "O"]) == []
    assert entities(["B-X", "B-X", "I-X"]) == [("X", 0, 0), ("X", 1, 2)]


def test_entity_scores_hand_counted():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-PER", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG", "B-PER", "O"]]
    # gold entities: PER(0-1) LOC(3) | ORG(0) PER(2)      -> 4
    # predicted:     PER(0-1) ORG(3) | ORG(0-1) PER(2)    -> 4
    # correct: PER(0-1), PER(2) -> 2 (ORG(0-1) has the wrong end, ORG(3) the wrong type)
    s = entity_scores(gold, pred)
    assert s["precision"] == pytest.approx(0.5)
    assert s["recall"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx(0.5)
    assert s["accuracy"] == pytest.approx(6 / 8)
    assert s["per_type"]["PER"]["f1"] == pytest.approx(1.0)
    assert s["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # ORG: 2 predicted, 1 gold, 0 correct
    assert s["per_type"]["ORG"]["precision"] == 0.0 and s["per_type"]["ORG"]["support"] == 1


def test_entity_scores_uneven_precision_recall():
    gold = [["B-A", "I-A", "O", "B-B", "O", "B-A"]]
    pred = [["B-A", "I-A", "O", "O", "O", "O"]]
    s = entity_scores(gold, pred)
    # 1 predicted, 1 correct, 3 gold: P = 1, R = 1/3, F1 = 2 * 1/3 / (4/3) = 0.5
    assert (s["precision"], s["recall"], s["f1"]) == pytest.approx((1.0, 1 / 3, 0.5))


def test_all_o_prediction_scores_zero_and_mismatch_raises():
    s = entity_scores([["B-A", "O"]], [["O", "O"]])
    assert s["f1"] == 0.0 and s["precision"] == 0.0 and s["recall"] == 0.0
    with pytest.raises(ValueError, match="length mismatch"):
        entity_scores([["O"]], [["O", "O"]])
