"""The heuristic baselines of finetune.baselines on hand-made examples."""
import pytest

from finetune import baselines as b
from finetune.readers import TaggedSentence, TextExample


def test_first_year_not_in_question_skips_years_the_question_shows():
    ctx = "Born in 1901, she moved in 1920 and died in 1975."
    assert b.first_year_not_in_question("Born in 1901, she moved in ____ and died in 1975.", ctx) == "1920"
    assert b.first_year_not_in_question("She moved in ____ and died in 1975.", ctx) == "1901"
    assert b.first_year_not_in_question("____", "no years here") == ""


def test_aligned_blank_reads_the_gap_of_a_copied_sentence():
    ctx = "The club was founded in 1888. It moved to a new ground in 1923 and won the cup in 1950."
    assert b.aligned_blank("It moved to a new ground in ____ and won the cup in 1950.", ctx) == "1923"
    # only a short stretch of context matches: the alignment shrinks until it does
    assert b.aligned_blank("Later it won the cup in ____ again.", ctx) == "1950"
    # nothing aligns: falls back to the first year the question does not show
    assert b.aligned_blank("Unrelated ____ words", ctx) == "1888"
    assert b.aligned_blank("no blank", ctx) == ""


def test_tag_lookup_backs_off_to_lower_case_then_o():
    train = [TaggedSentence(["New", "York", "is", "big"], ["B-loc", "I-loc", "O", "O"]),
             TaggedSentence(["York", "rocks"], ["B-loc", "O"]),
             TaggedSentence(["york", "is"], ["O", "O"]),
             TaggedSentence(["Apple", "pie"], ["B-company", "O"]),
             TaggedSentence(["Apple", "pie"], ["O", "O"])]
    lk = b.TagLookup.fit(train)
    assert lk.tag_token("York") == "B-loc"  # 2 x B-loc vs 1 x I-loc
    assert lk.tag_token("YORK") == "O"  # lower-case form: york 1 x B-loc, 1 x I-loc, 1 x O -> tie goes to O
    assert lk.tag_token("Apple") == "O"  # tie between B-company and O goes to O
    assert lk.tag_token("Paris") == "O"
    # consecutive B- of one type become one entity
    assert b.TagLookup({"New": "B-loc", "York": "B-loc"}, {}).predict(["New", "York", "x"]) == \
        ["B-loc", "I-loc", "O"]


def test_gazetteer_matches_longest_training_entity():
    train = [TaggedSentence(["New", "York", "City", "rocks"], ["B-loc", "I-loc", "I-loc", "O"]),
             TaggedSentence(["New", "York", "Times"], ["B-company", "I-company", "I-company"]),
             TaggedSentence(["in", "York"], ["O", "B-loc"]),
             TaggedSentence(["York", "York"], ["B-person", "B-loc"]),
             # "apple" the company once, the fruit (O) twice: one word mostly O is left out
             TaggedSentence(["apple", "pie", "and", "apple", "juice"], ["O", "O", "O", "O", "O"]),
             TaggedSentence(["Apple", "shares"], ["B-company", "O"])]
    g = b.Gazetteer.fit(train)
    assert g.phrases[("york",)] == "loc"  # 2 x loc, 1 x person
    assert ("apple",) not in g.phrases
    assert g.predict(["I", "love", "new", "YORK", "City", "and", "York"]) == \
        ["O", "O", "B-loc", "I-loc", "I-loc", "O", "B-loc"]  # case does not matter
    assert g.predict(["New", "York", "Times", "today"]) == ["B-company", "I-company", "I-company", "O"]
    assert g.predict(["New", "Jersey"]) == ["O", "O"]  # "New" alone was never an entity


def test_overlap_rule_counts_content_words_and_tunes_its_threshold():
    assert b.word_overlap("The cat sat on the mat.", "The mat was red.") == 1  # "the"/"was" do not count
    assert b.word_overlap("A dog.", "The cat.") == 0
    train = [TextExample("Paris is the capital of France.", "France has many cities.", "next"),
             TextExample("The river is long.", "The river floods in spring.", "next"),
             TextExample("The river is long.", "Jazz began in New Orleans.", "random"),
             TextExample("Paris is the capital of France.", "Cats are mammals.", "random")]
    rule = b.OverlapRule.fit(train, positive="next")
    assert (rule.threshold, rule.negative) == (1, "random")
    assert rule.predict("Bach wrote fugues.", "His fugues are famous.") == "next"
    assert rule.predict("Bach wrote fugues.", "The moon is bright.") == "random"
    with pytest.raises(ValueError):
        b.OverlapRule.fit(train, positive="yes")


def test_bag_of_words_learns_sentiment_words():
    pos = ["a wonderful film", "wonderful acting", "truly wonderful", "a great story", "great fun"]
    neg = ["a dull film", "dull acting", "truly dull", "a boring story", "boring fun"]
    train = [TextExample(t, label="1") for t in pos] + [TextExample(t, label="-1") for t in neg]
    test = [TextExample("wonderful and great", label="1"), TextExample("dull and boring", label="-1")]
    assert b.bag_of_words_accuracy(train, test) == 1.0


def test_strongest_builtin_scores_each_task_on_its_files_as_finetune_reads_them(tmp_path):
    import json

    from finetune.datasets import write_conll, write_tsv

    def path(name):
        return str(tmp_path / name)

    # polarity: one word decides; the first 4 eval rows are clean, the last 4 contradict the training words
    train = [TextExample(f"{w} movie number {i}", None, y) for i in range(20) for w, y in (("great", "1"), ("awful", "-1"))]
    clean = [TextExample(f"a {w} film", None, y) for w, y in (("great", "1"), ("awful", "-1"))] * 2
    flipped = [TextExample(f"a {w} film", None, y) for w, y in (("great", "-1"), ("awful", "1"))] * 2
    write_tsv(path("tr.tsv"), train)
    write_tsv(path("te.tsv"), clean + flipped)
    write_tsv(path("flipped.tsv"), flipped)
    assert b.strongest_builtin("pang-lee", path("tr.tsv"), path("te.tsv")) == ("tf-idf 1-2 gram logistic regression", 0.5)
    assert b.strongest_builtin("pang-lee", path("tr.tsv"), path("te.tsv"), max_eval=4)[1] == 1.0
    assert b.strongest_builtin("pang-lee", path("tr.tsv"), path("te.tsv"), max_train=0, max_eval=0)[1] == 0.5  # 0 = all
    # fit on the training file only: one fit on these eval rows would score 1.0
    assert b.strongest_builtin("pang-lee", path("tr.tsv"), path("flipped.tsv"))[1] == 0.0
    # max_train keeps the first rows: the 20 after them teach the opposite words
    write_tsv(path("tr2.tsv"), train + [TextExample(e.text_a, None, "1" if e.label == "-1" else "-1") for e in train * 2])
    assert b.strongest_builtin("pang-lee", path("tr2.tsv"), path("flipped.tsv"), max_train=40)[1] == 0.0
    assert b.strongest_builtin("pang-lee", path("tr2.tsv"), path("flipped.tsv"))[1] == 1.0

    # next-sentence: "next" pairs share a content word, "random" ones do not; the rule learns which is which
    pairs = [TextExample(f"the {w} rose early", f"later the {w} fell", "next") for w in ("river", "market", "tower")] + \
            [TextExample(f"the {w} rose early", f"a {v} sang loudly", "random") for w, v in (("river", "bird"),
                                                                                           ("market", "choir"),
                                                                                           ("tower", "crowd"))]
    write_tsv(path("ns.tsv"), pairs)
    name, acc = b.strongest_builtin("wiki-next-sentence", path("ns.tsv"), path("ns.tsv"))
    assert acc == 1.0 and name.startswith("shared content words >= ")

    # tagging: the training entity recurs in the test sentence; the better of gazetteer and tag lookup wins
    write_conll(path("tr.conll"), [TaggedSentence(["I", "love", "New", "York"], ["O", "O", "B-loc", "I-loc"])] * 3)
    write_conll(path("te.conll"), [TaggedSentence(["New", "York", "rocks"], ["B-loc", "I-loc", "O"])])
    name, f1 = b.strongest_builtin("wnut16", path("tr.conll"), path("te.conll"))
    assert f1 == 1.0 and name in ("training-entity gazetteer, longest match", "each token's most frequent training tag")
    # an entity only the test sentence has: nothing fit on the training file tags it
    write_conll(path("te2.conll"), [TaggedSentence(["Paris", "rocks"], ["B-loc", "O"])])
    assert b.strongest_builtin("wnut16", path("tr.conll"), path("te2.conll"))[1] == 0.0

    # cloze: the question is a passage sentence with its year blanked, so alignment reads it off (F1 in 0-100)
    ctx = "The club was founded in 1888. It moved to a new ground in 1923 and won the cup in 1950."
    doc = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": [
        {"id": "q1", "question": "It moved to a new ground in ____ and won the cup in 1950.",
         "answers": [{"text": "1923", "answer_start": ctx.index("1923")}]}]}]}]}
    with open(path("te.json"), "w") as f:
        json.dump(doc, f)
    # the cloze heuristics fit nothing: the training file is never read
    assert b.strongest_builtin("wiki-cloze", path("absent.json"), path("te.json")) == ("aligned_blank", 100.0)

    with pytest.raises(ValueError, match="no heuristic"):
        b.strongest_builtin("squad", path("te.json"), path("te.json"))
