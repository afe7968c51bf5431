"""WordPiece ids equal transformers' BertTokenizer (fast) and BertTokenizerLegacy (pure Python);
sentence cuts via offsets equal tokenizing each sentence alone; sentencepiece special ids."""
import json

import numpy as np
import pytest

from data_prep.embedded import embedded_corpus_jsonl, embedded_vocab
from data_prep.errors import DataPrepError
from data_prep.shards import document_sentences
from data_prep.splitter import get_splitter
from data_prep.tokenizer import WordPieceTokenizer, load_tokenizer, train_sentencepiece

TRICKY = [
    "Héllo WÖRLD! naïve café, Ångström résumé",
    "日本語のテキスト and 中文 mixed with English.",
    "control\x07chars\x1b and\ttabs  and\u00a0nbsp and zero\u200bwidth",
    "replacement \ufffd char and NUL\x00byte",
    "x" * 150 + " a word longer than 100 characters becomes [UNK]",
    "Emoji 😀 and math ∑∫ and ﬁ ligature and Ⅻ numeral",
    "U.S. Dr. Smith's 3.14 e-mail: test@example.com (http://example.com/a_b?c=d).",
]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    path = embedded_corpus_jsonl(str(tmp_path_factory.mktemp("cache")), max_docs=300)
    with open(path) as f:
        return [json.loads(l)["text"] for l in f] + TRICKY


@pytest.mark.parametrize("lower", [True, False])
def test_wordpiece_ids_equal_transformers(texts, lower):
    import transformers

    vocab = embedded_vocab()
    ours = WordPieceTokenizer(vocab, lower_case=lower)
    fast = transformers.BertTokenizer(vocab, do_lower_case=lower)
    legacy = transformers.BertTokenizerLegacy(vocab, do_lower_case=lower)
    encoded = ours.encode_lines(texts)
    for t, (ids, _) in zip(texts, encoded):
        expected = legacy(t, add_special_tokens=False)["input_ids"]
        assert ids.tolist() == expected, t[:80]
        assert fast(t, add_special_tokens=False)["input_ids"] == expected
    assert ours.special_ids == {k: legacy.convert_tokens_to_ids(v) for k, v in
                                {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}.items()}


def test_offset_cut_equals_tokenizing_each_sentence(texts):
    from collections import Counter

    tok = WordPieceTokenizer(embedded_vocab())
    split = get_splitter("blingfire")
    for t in texts[:300]:
        lines = [ln.strip() for ln in t.split("\n") if ln.strip()]
        sents = document_sentences(lines, tok.encode_lines(lines), split, 10**6, Counter())
        expected = []
        for ln in lines:
            for a, b in split(ln):
                ids = tok.encode_text(ln[a:b])
                if ids:
                    expected.append(ids)
        assert [s.tolist() for s in sents] == expected


def test_long_sentence_is_cut_and_counted():
    from collections import Counter

    tok = WordPieceTokenizer(embedded_vocab())
    line = " ".join(["word"] * 1000)
    counts = Counter()
    sents = document_sentences([line], tok.encode_lines([line]), get_splitter("blingfire"), 300, counts)
    assert [len(s) for s in sents] == [300, 300, 300, 100]
    assert counts["long_sentences_cut"] == 1


def test_bad_vocab_files_give_clear_errors(tmp_path):
    with pytest.raises(DataPrepError, match="no such file"):
        load_tokenizer(str(tmp_path / "missing.txt"))
    binary = tmp_path / "vocab.txt"
    binary.write_bytes(b"\xff\xfe\x00\x80garbage")
    with pytest.raises(DataPrepError, match="not a UTF-8"):
        load_tokenizer(str(binary))
    nospecial = tmp_path / "v2.txt"
    nospecial.write_text("a\nb\nc\n")
    with pytest.raises(DataPrepError, match=r"missing special tokens"):
        load_tokenizer(str(nospecial))
    with pytest.raises(DataPrepError, match="is a directory"):
        load_tokenizer(str(tmp_path))
    bad_model = tmp_path / "x.model"
    bad_model.write_bytes(b"not a protobuf")
    with pytest.raises(DataPrepError, match="sentencepiece"):
        load_tokenizer(str(bad_model))


def test_trained_sentencepiece_ids_and_specials(texts, tmp_path):
    import sentencepiece as spm

    sent_file = tmp_path / "s.txt"
    sent_file.write_text("\n".join(t for t in texts[:300]) + "\n")
    model = train_sentencepiece(str(sent_file), str(tmp_path / "m"), vocab_size=300)
    tok = load_tokenizer(model)
    assert tok.special_ids == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    ref = spm.SentencePieceProcessor(model_file=model)
    for t in texts[:50]:
        ids, starts = tok.encode_lines([t])[0]
        assert ids.tolist() == ref.encode(t)
        assert (np.diff(starts) >= 0).all()
