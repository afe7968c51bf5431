"""Simple heuristics for the built-in tasks (finetune.datasets): each is fit on the training
split only and scored on the evaluation split, so that a test can ask the fine-tuned model to
beat the strongest of them rather than a constant.

- cloze QA: `first_year_not_in_question` (the issue's heuristic) and `aligned_blank`, which finds
  the question's words around the blank in the passage and reads off what stands in the gap;
- WNUT-16: `TagLookup`, each token's most frequent training tag (exact form, then lower case,
  else "O"), and `Gazetteer`, the training entities matched as phrases (longest first);
- next-sentence pairs: `OverlapRule`, the number of content words A and B share, at least a
  threshold tuned on the training pairs;
- polarity: `bag_of_words_accuracy`, a tf-idf (1-2 gram) logistic regression.

`strongest_builtin(name, train_file, eval_file)` scores the strongest of them for a built-in dataset's files
(what benchmarks/finetune_vs_transformers.py and benchmarks/pretraining_value.py print next to the models).
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

# the patterns the cloze builders blank out (one definition, in the data module)
from .datasets import NAME_OR_YEAR, YEAR
from .readers import TaggedSentence, TextExample

BLANK = "____"
_WORD = re.compile(r"\w+")


# --- cloze QA -------------------------------------------------------------------------------

def first_year_not_in_question(question: str, context: str) -> str:
    """The first year of the passage that the question does not already show ("" if none)."""
    shown = set(YEAR.findall(question))
    return next((y for y in YEAR.findall(context) if y not in shown), "")


def aligned_blank(question: str, context: str, max_chars: int = 40) -> str:
    """What the passage holds where the question has its blank: the longest stretch of the
    question's text right before and after the blank (up to `max_chars` each side, shortened
    until it matches) that occurs in the passage with a gap between; the gap is the answer.
    Failing that, the word after the longest matching stretch before the blank, or before the
    one after it. A cloze question copied from its passage is solved exactly by this; without
    any alignment, falls back to first_year_not_in_question."""
    if BLANK not in question:
        return ""
    before, after = question.split(BLANK, 1)
    word = r"([^\s,.;:()]+)"
    for n in range(max_chars, 0, -4):
        left, right = before[-n:], after[:n]
        m = re.search(re.escape(left) + r"(.{1,40}?)" + re.escape(right), context)
        if m and m.group(1).strip():
            return m.group(1).strip()
    for n in range(max_chars, 3, -4):
        m = (re.search(re.escape(before[-n:]) + word, context) if before.strip() else None) or \
            (re.search(word + re.escape(after[:n]), context) if after.strip() else None)
        if m:
            return m.group(1)
    return first_year_not_in_question(question, context)


# words that put a year rather than a name in the blank after them ("in ____", "since ____")
_YEAR_SLOT = re.compile(r"\b(in|since|until|by|from|to|of|between|and|early|late|mid|year|c\.)\s*$", re.I)


def frequent_name(question: str, context: str) -> str:
    """For the cross-sentence cloze (datasets.build_entity_cloze_squad): the name or year that
    the passage repeats most and the question does not show (the first on ties); a year when the
    word before the blank usually precedes one ("in ____"), else a name."""
    before = question.split(BLANK, 1)[0]
    want_year = bool(_YEAR_SLOT.search(before)) and bool(YEAR.search(context))
    counts = Counter(m for m in NAME_OR_YEAR.findall(context)
                     if m not in question and bool(YEAR.fullmatch(m)) == want_year)
    if not counts:
        counts = Counter(m for m in NAME_OR_YEAR.findall(context) if m not in question)
    return counts.most_common(1)[0][0] if counts else ""


# --- token labelling ------------------------------------------------------------------------

@dataclass
class TagLookup:
    """Per-token most frequent training tag; unseen tokens back off to their lower-cased form,
    then to "O". A B- tag right after a token of the same entity type is read as I- so that a
    known multi-token name ("New York") comes out as one entity."""

    exact: dict[str, str] = field(default_factory=dict)
    lower: dict[str, str] = field(default_factory=dict)

    @classmethod
    def fit(cls, sentences: list[TaggedSentence]) -> "TagLookup":
        by_form, by_lower = defaultdict(Counter), defaultdict(Counter)
        for s in sentences:
            for tok, tag in zip(s.tokens, s.tags):
                by_form[tok][tag] += 1
                by_lower[tok.lower()][tag] += 1
        # ties go to "O", then to the alphabetically first tag, so the result does not depend on order
        pick = lambda c: min(c.items(), key=lambda kv: (-kv[1], kv[0] != "O", kv[0]))[0]  # noqa: E731
        return cls({t: pick(c) for t, c in by_form.items()}, {t: pick(c) for t, c in by_lower.items()})

    def tag_token(self, token: str) -> str:
        return self.exact.get(token) or self.lower.get(token.lower()) or "O"

    def predict(self, tokens: list[str]) -> list[str]:
        tags = [self.tag_token(t) for t in tokens]
        for i in range(1, len(tags)):
            if tags[i].startswith("B-") and tags[i - 1][2:] == tags[i][2:]:
                tags[i] = "I-" + tags[i][2:]
        return tags


def _spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first, end) of the B-started entities of one BIO sentence (end exclusive)."""
    out = []
    for i, tag in enumerate(tags):
        if tag.startswith("B-") or (tag.startswith("I-") and (i == 0 or tags[i - 1][2:] != tag[2:])):
            out.append([tag[2:], i, i + 1])
        elif tag.startswith("I-") and out and out[-1][2] == i and out[-1][0] == tag[2:]:
            out[-1][2] = i + 1
    return [tuple(x) for x in out]


@dataclass
class Gazetteer:
    """The training entities as a phrase list, matched case-insensitively (tweets vary case):
    each token sequence that was tagged as an entity gets its most frequent type, a one-word
    phrase that the training sentences tag "O" more often than not is left out ("the", "new"),
    and a sentence is tagged by greedy longest match, left to right. Stronger than TagLookup on
    WNUT-16 (tweets repeat their names); see docs/finetune.md."""

    phrases: dict[tuple[str, ...], str] = field(default_factory=dict)
    longest: int = 0

    @classmethod
    def fit(cls, sentences: list[TaggedSentence]) -> "Gazetteer":
        types, outside, inside = defaultdict(Counter), Counter(), Counter()
        for s in sentences:
            words = [w.lower() for w in s.tokens]
            for kind, a, b in _spans(s.tags):
                types[tuple(words[a:b])][kind] += 1
            for w, tag in zip(words, s.tags):
                (outside if tag == "O" else inside)[w] += 1
        phrases = {p: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for p, c in types.items()
                   if len(p) > 1 or outside[p[0]] <= inside[p[0]]}
        return cls(phrases, max((len(p) for p in phrases), default=0))

    def predict(self, tokens: list[str]) -> list[str]:
        words = [w.lower() for w in tokens]
        tags, i = ["O"] * len(words), 0
        while i < len(words):
            for n in range(min(self.longest, len(words) - i), 0, -1):
                kind = self.phrases.get(tuple(words[i:i + n]))
                if kind:
                    tags[i:i + n] = [f"B-{kind}"] + [f"I-{kind}"] * (n - 1)
                    i += n
                    break
            else:
                i += 1
        return tags


# --- sentence pairs -------------------------------------------------------------------------

# Function words carry no topic: with them, every pair shares "the"/"of" and the overlap of two
# sentences from different articles looks like that of neighbours (accuracy 0.61 instead of 0.76
# on the built-in test pairs).
STOPWORDS = frozenset(
    "a an the of and or in on at to for from by with as is was are were be been it its he she they "
    "his her their this that these which who".split())


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in STOPWORDS}


def word_overlap(a: str, b: str) -> int:
    """How many distinct content words (lower case, function words dropped) A and B share."""
    return len(content_words(a) & content_words(b))


@dataclass
class OverlapRule:
    """`positive` when word_overlap(A, B) >= threshold, else `negative`; the threshold is the
    one that maximises training accuracy (the smallest such)."""

    threshold: int
    positive: str
    negative: str

    @classmethod
    def fit(cls, examples: list[TextExample], positive: str) -> "OverlapRule":
        labels = sorted({e.label for e in examples})
        if positive not in labels or len(labels) != 2:
            raise ValueError(f"expected two labels including {positive!r}, got {labels}")
        negative = labels[1 - labels.index(positive)]
        scored = [(word_overlap(e.text_a, e.text_b), e.label == positive) for e in examples]
        candidates = sorted({s for s, _ in scored} | {max(s for s, _ in scored) + 1})
        best = max(candidates, key=lambda t: sum((s >= t) == pos for s, pos in scored))
        return cls(best, positive, negative)

    def predict(self, a: str, b: str) -> str:
        return self.positive if word_overlap(a, b) >= self.threshold else self.negative


# --- sentence classification ----------------------------------------------------------------

C_GRID = (0.25, 1.0, 4.0, 10.0, 30.0)


def logistic_regression(x, y: list, c: float | None = None):
    """A logistic regression fit on (x, y), its inverse regularisation `c` chosen from C_GRID by
    (up to) 5-fold cross-validation on these rows unless given (4.0 where a class has < 2 rows)."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    n_folds = min(5, min(list(y).count(label) for label in set(y)))
    if c is None and n_folds >= 2:
        return LogisticRegressionCV(Cs=list(C_GRID), cv=n_folds, max_iter=2000, scoring="accuracy",
                                    l1_ratios=(0.0,), use_legacy_attributes=False).fit(x, y)
    return LogisticRegression(C=c or 4.0, max_iter=2000).fit(x, y)


def bag_of_words_accuracy(train: list[TextExample], test: list[TextExample], c: float | None = None) -> float:
    """Test accuracy of a tf-idf (unigrams + bigrams) logistic regression fit on `train`, its
    inverse regularisation `c` chosen by 5-fold cross-validation on `train` (never on `test`)
    unless given."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    clf = logistic_regression(vec.fit_transform([e.text_a for e in train]), [e.label for e in train], c)
    pred = clf.predict(vec.transform([e.text_a for e in test]))
    return float(sum(p == e.label for p, e in zip(pred, test)) / len(test))


# --- one figure per built-in dataset --------------------------------------------------------

def strongest_builtin(name: str, train_file: str, eval_file: str, max_train: int | None = None,
                      max_eval: int | None = None) -> tuple[str, float]:
    """(description, score) of the strongest simple heuristic above on a built-in dataset's files
    (finetune.datasets.write_builtin), fit on the first `max_train` training examples and scored on
    the first `max_eval` evaluation examples, as `finetune` reads them; the score is on the metric
    `finetune` reports for the task (accuracy, entity F1, SQuAD F1 in 0-100). Where a task has
    several heuristics, the best of them on the evaluation split is returned (a small optimism, like
    choosing the lr there)."""
    from .metrics import accuracy
    from .readers import limit, read_conll, read_squad, read_text_file
    from .squad_metrics import squad_scores

    if name == "pang-lee":
        tr, te = limit(read_text_file(train_file), max_train), limit(read_text_file(eval_file), max_eval)
        return "tf-idf 1-2 gram logistic regression", bag_of_words_accuracy(tr, te)
    if name == "wiki-next-sentence":
        tr, te = (limit(read_text_file(train_file, pair=True), max_train),
                  limit(read_text_file(eval_file, pair=True), max_eval))
        rule = OverlapRule.fit(tr, positive="next")
        return (f"shared content words >= {rule.threshold}",
                accuracy([e.label for e in te], [rule.predict(e.text_a, e.text_b) for e in te]))
    if name == "wnut16":
        from .metrics import entity_scores

        tr, te = limit(read_conll(train_file), max_train), limit(read_conll(eval_file), max_eval)
        gold = [s.tags for s in te]
        taggers = (("training-entity gazetteer, longest match", Gazetteer.fit(tr)),
                   ("each token's most frequent training tag", TagLookup.fit(tr)))
        return max(((d, entity_scores(gold, [h.predict(s.tokens) for s in te])["f1"]) for d, h in taggers),
                   key=lambda x: x[1])
    if name in ("wiki-cloze", "wiki-entity-cloze"):
        examples = limit(read_squad(eval_file, purpose="eval")[0], max_eval)
        golds = {e.qid: [t for t, _ in e.answers] if not e.is_impossible else [] for e in examples}  # as tasks/qa.py
        return max(((f.__name__, squad_scores(golds, {e.qid: f(e.question, e.context) for e in examples})["f1"])
                    for f in (frequent_name, aligned_blank, first_year_not_in_question)), key=lambda x: x[1])
    raise ValueError(f"no heuristic for built-in dataset {name!r}")
