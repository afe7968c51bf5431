"""Entity-level precision/recall/F1 for BIO (IOB2) tag sequences with seqeval's default
(lenient) semantics, written from the rules rather than from seqeval's code:

- an entity starts at `B-X`, and also at an `I-X` whose previous tag is `O` or of another
  type (a sequence that "forgot" its B still counts, as conlleval and seqeval do);
- it continues through following `I-X` of the same type and ends at anything else;
- a predicted entity is correct only if its type, first and last token all match a gold one.
Scores are micro-averaged over all entities; `per_type` gives the same per entity type.
Sentences are scored separately, so an entity never spans two sentences.
"""
from __future__ import annotations

from collections import Counter


def _split(tag: str) -> tuple[str, str]:
    if tag in ("O", "", None):
        return "O", ""
    prefix, _, kind = tag.partition("-")
    if prefix not in ("B", "I") or not kind:
        # a bare label such as "PER" (no prefix) is treated as an inside tag of that type
        return "I", tag
    return prefix, kind


def entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) of every entity in one sentence's tag sequence (inclusive ends)."""
    out = []
    start, kind = None, ""
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, t = _split(tag)
        begins = prefix == "B" or (prefix == "I" and (start is None or t != kind))
        if start is not None and (prefix == "O" or begins):
            out.append((kind, start, i - 1))
            start, kind = None, ""
        if begins:
            start, kind = i, t
    return out


def _prf(correct: int, n_pred: int, n_gold: int) -> dict:
    p = correct / n_pred if n_pred else 0.0
    r = correct / n_gold if n_gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f, "support": n_gold}


def entity_scores(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Micro P/R/F1 over entities, plus `per_type` and token `accuracy` (all tags)."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted ones")
    correct, n_pred, n_gold = Counter(), Counter(), Counter()
    tok_ok = tok_all = 0
    for g, p in zip(gold, pred):
        if len(g) != len(p):
            raise ValueError(f"sentence length mismatch: {len(g)} gold tags, {len(p)} predicted")
        ge, pe = set(entities(g)), set(entities(p))
        for kind, _, _ in ge:
            n_gold[kind] += 1
        for kind, _, _ in pe:
            n_pred[kind] += 1
        for kind, _, _ in ge & pe:
            correct[kind] += 1
        tok_ok += sum(a == b for a, b in zip(g, p))
        tok_all += len(g)
    out = _prf(sum(correct.values()), sum(n_pred.values()), sum(n_gold.values()))
    out["accuracy"] = tok_ok / tok_all if tok_all else 0.0
    out["per_type"] = {k: _prf(correct[k], n_pred[k], n_gold[k]) for k in sorted(n_gold | n_pred)}
    return out
