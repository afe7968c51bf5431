"""Extractive QA in the original BERT SQuAD recipe:

- a window `[CLS] question [SEP] context-span [SEP]` slides over long contexts; `doc_stride`
  is the distance between the starts of consecutive windows (BERT's meaning of the flag).
  transformers' run_qa.py passes its `doc_stride` to the tokenizer as `stride`, the number of
  tokens consecutive windows share; with W = max_seq_length - question tokens - 3 context tokens
  per window, our doc_stride = W - theirs (384, question of 14 tokens: W = 367, their 128 = our
  239; our 128 = their 239);
- an answer outside a window (and every unanswerable question) is labelled (0, 0), the [CLS]
  position;
- decoding takes the n best start and end logits of every window, keeps spans inside the
  context with end >= start, length <= max_answer_length tokens and a start token that has its
  maximum context in that window, and scores a span by start + end logit;
- SQuAD v2.0: the no-answer score is the smallest [CLS] start + end over the windows; the
  answer is empty when no-answer score - best span score > `null_threshold`.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from .readers import QAExample

log = logging.getLogger(__name__)


def _windows(n_ctx: int, max_ctx: int, doc_stride: int) -> list[tuple[int, int]]:
    spans, start = [], 0
    while True:
        length = min(n_ctx - start, max_ctx)
        spans.append((start, length))
        if start + length >= n_ctx:
            return spans
        start += min(length, doc_stride)


def _max_context(spans, index, pos) -> bool:
    """Is token `pos` best placed in window `index` (most context on its shorter side)?"""
    best, best_score = None, None
    for i, (start, length) in enumerate(spans):
        end = start + length - 1
        if not start <= pos <= end:
            continue
        score = min(pos - start, end - pos) + 0.01 * length
        if best_score is None or score > best_score:
            best, best_score = i, score
    return best == index


def qa_features(examples: list[QAExample], tokenizer, max_length: int = 384, doc_stride: int = 128,
                max_query_length: int = 64, train: bool = True, overlap: int | None = None) -> list[dict]:
    """One feature per window. Bookkeeping keys (start with "_"): the example index, the
    context offset of the window in the input, per-token character offsets into the context
    and the max-context flags. Windows start `doc_stride` tokens apart (BERT's meaning) or,
    given `overlap` (transformers' `doc_stride`), share that many tokens with the next one: their
    starts are then (context tokens the question leaves) - overlap apart."""
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    feats, n_lost = [], 0
    q_enc = tokenizer([e.question for e in examples], add_special_tokens=False)
    c_enc = tokenizer([e.context for e in examples], add_special_tokens=False, return_offsets_mapping=True)
    for ei, e in enumerate(examples):
        q_ids = q_enc["input_ids"][ei][:max_query_length]
        c_ids, offsets = c_enc["input_ids"][ei], c_enc["offset_mapping"][ei]
        max_ctx = max_length - len(q_ids) - 3
        if max_ctx < 1:
            raise ValueError(f"--max-seq-length {max_length} leaves no room for the context after a "
                             f"{len(q_ids)}-token question; raise it or lower --max-query-length")
        stride = doc_stride if overlap is None else max_ctx - overlap
        if len(c_ids) > max_ctx and not 1 <= stride < max_ctx:  # a second window, not overlapping
            flag = (f"--doc-stride {doc_stride}" if overlap is None else f"--doc_stride {overlap} (the overlap)")
            raise ValueError(f"{flag}: question {e.qid!r} leaves windows of {max_ctx} context tokens at "
                             f"--max-seq-length {max_length}, so windows would not overlap; lower it, or raise "
                             "--max-seq-length, or lower --max-query-length")
        tok_start = tok_end = None
        if e.answers and not e.is_impossible and train:
            text, ch = e.answers[0]
            ch_end = ch + len(text)
            inside = [i for i, (s, t) in enumerate(offsets) if s < ch_end and t > ch]
            if inside:
                tok_start, tok_end = inside[0], inside[-1]
        spans = _windows(len(c_ids), max_ctx, stride)
        found = False
        for wi, (start, length) in enumerate(spans):
            input_ids = [cls_id] + q_ids + [sep_id] + c_ids[start:start + length] + [sep_id]
            off = len(q_ids) + 2
            f = {"input_ids": input_ids,
                 "token_type_ids": [0] * off + [1] * (length + 1),
                 "attention_mask": [1] * len(input_ids),
                 "_example": ei, "_ctx_offset": off,
                 "_offsets": [tuple(o) for o in offsets[start:start + length]],
                 "_max_context": [_max_context(spans, wi, start + j) for j in range(length)]}
            if train:
                if tok_start is not None and start <= tok_start and tok_end < start + length:
                    f["start_positions"], f["end_positions"] = off + tok_start - start, off + tok_end - start
                    found = True
                else:
                    f["start_positions"] = f["end_positions"] = 0
            feats.append(f)
        if train and e.answers and not e.is_impossible and not found:
            n_lost += 1
    if n_lost:
        log.warning("%d answers could not be placed in any window (answer longer than a window, or "
                    "not aligned to tokens); they train as no-answer", n_lost)
    return feats


def decode(examples: list[QAExample], features: list[dict], outputs, n_best: int = 20,
           max_answer_length: int = 30, version_2: bool = False, null_threshold: float = 0.0):
    """-> (predictions {id: text}, nbest {id: [{"text", "score", "probability"}]},
    null_odds {id: null score - best span score} for v2)."""
    by_example: dict[int, list[int]] = {}
    for fi, f in enumerate(features):
        by_example.setdefault(f["_example"], []).append(fi)
    preds, nbest_out, null_odds = {}, {}, {}
    for ei, e in enumerate(examples):
        cands, null_score = [], math.inf
        for fi in by_example.get(ei, []):
            f, (start, end) = features[fi], outputs[fi]
            off, n_ctx = f["_ctx_offset"], len(f["_offsets"])
            null_score = min(null_score, float(start[0] + end[0]))
            top_s = np.argsort(start)[::-1][:n_best]
            top_e = np.argsort(end)[::-1][:n_best]
            for s in top_s:
                for t in top_e:
                    cs, ct = int(s) - off, int(t) - off
                    if cs < 0 or ct < 0 or cs >= n_ctx or ct >= n_ctx or ct < cs:
                        continue
                    if ct - cs + 1 > max_answer_length or not f["_max_context"][cs]:
                        continue
                    a, b = f["_offsets"][cs][0], f["_offsets"][ct][1]
                    cands.append((float(start[s] + end[t]), e.context[a:b]))
        cands.sort(key=lambda c: -c[0])
        seen, best = set(), []
        for score, text in cands:
            if text not in seen:
                seen.add(text)
                best.append((score, text))
            if len(best) >= n_best:
                break
        entries = list(best)
        if version_2:
            entries.append((null_score, ""))
            entries.sort(key=lambda c: -c[0])
        if not entries:
            entries = [(0.0, "")]
        scores = np.array([s for s, _ in entries])
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        nbest_out[e.qid] = [{"text": t, "score": s, "probability": float(p)}
                            for (s, t), p in zip(entries, probs)]
        best_text = best[0][1] if best else ""
        if version_2:
            diff = null_score - (best[0][0] if best else -math.inf)
            null_odds[e.qid] = float(diff)
            preds[e.qid] = "" if diff > null_threshold else best_text
        else:
            preds[e.qid] = best_text
    return preds, nbest_out, null_odds
