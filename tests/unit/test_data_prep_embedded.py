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
