"""WordPiece ids equal transformers' BertTokenizer (fast) and BertTokenizerLegacy (pure Python);
sentence cuts via offsets equal tokenizing each sentence alone; sentencepiece special ids; a trained
WordPiece vocab is BERT-shaped, reproducible and encodes as transformers does."""
import json

import numpy as np
import pytest

from data_prep import tokenizer as tokenizer_module
from data_prep.embedded import embedded_corpus_jsonl, embedded_vocab
from data_prep.errors import DataPrepError
from data_prep.shards import document_sentences, tokenize_documents
from data_prep.splitter import get_splitter
from data_prep.tokenizer import WordPieceTokenizer, load_tokenizer, train_sentencepiece, train_wordpiece

TRICKY = [
    "Héllo WÖRLD! naïve café, Ångström résumé",
    "日本語のテキスト and 中文 mixed with English.",
    "control\x07chars\x1b and\ttabs  and\u00a0nbsp and zero\u200bwidth",
    "replacement \ufffd char and NUL\x00byte",
    "x" * 150 + " a word longer than 100 characters becomes [UNK]",
    "Emoji 😀 and math ∑∫ and ﬁ ligature and Ⅻ numeral",
    "U.S. Dr. Smith's 3.14 e-mail: test@example.com (http://example.com/a_b?c=d).",
]
# Sentence boundaries after multi-byte characters, behind tabs/NBSP, and around characters whose
# lower() is longer than themselves ("İ" -> "i" + U+0307): offsets must stay character offsets
# into the line the splitter sees.
BOUNDARIES = [
    "Café é è à ü déjà vu. The quick brown fox. Another sentence here.",
    "İstanbul is large. İzmir is smaller.\tThe tab starts this one.\u00a0NBSP starts this one.",
    "Ünïcödé everywhere: ñ ß ø. Ωmega comes next! 日本語の文。Then English again.",
    "ΣΟΦΙΑ ΚΑΙ ΛΟΓΟΣ. Second sentence after Greek capitals.  Two spaces before this.",
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


def _check_offset_cut(tok, texts):
    from collections import Counter

    split = get_splitter("blingfire")
    n_multi = 0
    for t in texts:
        lines = [ln.strip() for ln in t.split("\n") if ln.strip()]
        sents = tokenize_documents(tok, split, [lines], 10**6, Counter())[0]
        expected = []
        for ln in lines:
            for a, b in split(ln):
                ids = tok.encode_text(ln[a:b])
                if ids:
                    expected.append(ids)
        n_multi += len(expected) > 1
        assert [s.tolist() for s in sents] == expected, t[:80]
    assert n_multi >= len(BOUNDARIES)


@pytest.mark.parametrize("lower", [True, False])
def test_offset_cut_equals_tokenizing_each_sentence(texts, lower):
    _check_offset_cut(WordPieceTokenizer(embedded_vocab(), lower_case=lower), texts[:300] + BOUNDARIES)


@pytest.fixture(scope="module")
def spm_model(texts, tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    sent_file = d / "s.txt"
    sent_file.write_text("\n".join(texts[:300] + BOUNDARIES) + "\n")
    return train_sentencepiece(str(sent_file), str(d / "m"), vocab_size=300)


@pytest.mark.parametrize("lower", [True, False])
def test_sentencepiece_offset_cut_equals_encoding_each_sentence(texts, spm_model, lower):
    tok = load_tokenizer(spm_model, lower_case=lower)
    sample = texts[:300] + BOUNDARIES
    _check_offset_cut(tok, sample)
    import sentencepiece as spm

    # The per-sentence reference is sentencepiece itself, not our wrapper.
    ref = spm.SentencePieceProcessor(model_file=spm_model)
    split = get_splitter("blingfire")
    from collections import Counter

    for t in BOUNDARIES:
        sents = tokenize_documents(tok, split, [[t]], 10**6, Counter())[0]
        expected = [ref.encode(t[a:b].lower() if lower else t[a:b]) for a, b in split(t)]
        assert [s.tolist() for s in sents] == [e for e in expected if e], t


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


def test_trained_sentencepiece_ids_and_specials(texts, spm_model):
    import sentencepiece as spm

    model = spm_model
    tok = load_tokenizer(model)
    assert tok.special_ids == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    ref = spm.SentencePieceProcessor(model_file=model)
    for t in texts[:50]:
        ids, starts = tok.encode_lines([t])[0]
        assert ids.tolist() == ref.encode(t)
        assert (np.diff(starts) >= 0).all()
    # Offsets are character offsets of each piece's word, whatever the UTF-8 width before it.
    line = "Café é\tdéjà\u00a0vu İx"
    for lower in (False, True):
        ids, starts = load_tokenizer(model, lower_case=lower).encode_lines([line])[0]
        words = {line.index(w) for w in ("Café", "é\t", "déjà", "vu", "İx")}
        assert words <= set(starts.tolist()), (lower, starts.tolist())
        assert all(0 <= s <= len(line) and not line[s:s + 1].isspace() for s in starts.tolist())


SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def wp_sentences(texts, tmp_path_factory):
    path = tmp_path_factory.mktemp("wp") / "sentences.txt"
    path.write_text("\n".join(texts + BOUNDARIES) + "\n", encoding="utf-8")
    return str(path)


def _train_twice(sentences, tmp_path, size, lower):
    """Two trainings in one process: each trainer's hash maps get new random keys, which alone
    (without train_wordpiece's pinning) reorders the ## pieces and can change the tokens."""
    a = train_wordpiece(sentences, str(tmp_path / "a.txt"), size, lower_case=lower)
    b = train_wordpiece(sentences, str(tmp_path / "b.txt"), size, lower_case=lower)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        raw = fa.read()
        assert raw == fb.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]  # no temporary file left
    return a, raw.decode("utf-8").split("\n")[:-1]


@pytest.mark.parametrize("lower", [True, False])
def test_trained_wordpiece_vocab_is_bert_shaped_and_reproducible(texts, wp_sentences, tmp_path, lower):
    from transformers import BertTokenizerFast

    path, words = _train_twice(wp_sentences, tmp_path, 1000, lower)
    assert len(words) == len(set(words)) == 1000
    assert words[:5] == SPECIALS
    pieces = [w for w in words if w.startswith("##")]
    assert len(pieces) > 100 and any(len(w) > 3 for w in pieces)
    ids = {w: i for i, w in enumerate(words)}
    # BERT's layout: every character before its ## form, and every ## form's character present.
    assert all(ids[w[2:]] < ids[w] for w in pieces if len(w) == 3)
    assert any(w != w.lower() for w in words[5:]) is (not lower)
    tok = WordPieceTokenizer(path, lower_case=lower)
    assert tok.special_ids == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4} and tok.vocab_size == 1000
    # The ids data_prep writes are the ids transformers gives with the same table (the way finetune
    # loads vocab.txt: vocab=dict; vocab_file= is silently ignored by transformers 5).
    hf = BertTokenizerFast(vocab=ids, do_lower_case=lower)
    assert len(hf) == 1000
    n_tokens = n_unk = 0
    for t, (got, _) in zip(texts + BOUNDARIES, tok.encode_lines(texts + BOUNDARIES)):
        assert got.tolist() == hf(t, add_special_tokens=False)["input_ids"], t[:80]
        n_tokens += len(got)
        n_unk += int((got == 1).sum())
    assert n_unk < 0.01 * n_tokens
    _check_offset_cut(tok, texts[:300] + BOUNDARIES)


def test_trained_wordpiece_alphabet_limit(wp_sentences, tmp_path, monkeypatch):
    # A corpus with more characters than the limit: the alphabet is the most frequent ones (ties
    # by code point), not whichever the trainer's hash order drops.
    monkeypatch.setattr(tokenizer_module, "WORDPIECE_LIMIT_ALPHABET", 40)
    _, words = _train_twice(wp_sentences, tmp_path, 400, True)
    singles = [w for w in words[5:] if len(w) == 1]
    assert len(singles) == 40 and {"e", "t", "a", "."} <= set(singles)
    assert set("".join(w.removeprefix("##") for w in words[5:])) == set(singles)  # built from those only


def test_trained_wordpiece_size_errors(wp_sentences, tmp_path):
    with pytest.raises(DataPrepError, match=r"--train-wordpiece-vocab-size 150: too small for this corpus, whose "
                                            r"characters alone take \d+ entries"):
        train_wordpiece(wp_sentences, str(tmp_path / "v.txt"), 150)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("The cat sat on the mat.\nThe dog sat on the log.\n")
    with pytest.raises(DataPrepError, match=r"training text is too small: it yields only (\d+) entries.*"
                                            r"use --train-wordpiece-vocab-size \1 or less"):
        train_wordpiece(str(tiny), str(tmp_path / "v.txt"), 500)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n\t\n")
    with pytest.raises(DataPrepError, match="no text to train a vocabulary on"):
        train_wordpiece(str(blank), str(tmp_path / "v.txt"), 500)
    assert not (tmp_path / "v.txt").exists()


def test_one_vocab_reader_for_data_prep_masking_and_finetune(tmp_path):
    """data_prep, pretraining's masking tables and fine-tuning's tokenizer read vocab.txt through
    `read_vocab`, so a CRLF file and a repeated token give the same ids in all three."""
    from data_prep.manifest import TokenizerInfo
    from finetune.checkpoint import load_tokenizer as finetune_tokenizer
    from pretrain.masking import build_token_tables

    tokens = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "##s", "sat", "cat"]
    lf, crlf = tmp_path / "lf", tmp_path / "crlf"
    lf.mkdir(), crlf.mkdir()
    (lf / "vocab.txt").write_bytes(("\n".join(tokens) + "\n").encode())
    (crlf / "vocab.txt").write_bytes(("\r\n".join(tokens) + "\r\n").encode())
    assert tokenizer_module.read_vocab(str(crlf / "vocab.txt")) == tokens
    assert tokenizer_module.vocab_ids(tokens)["cat"] == 7  # the first id of a repeated token
    section = TokenizerInfo(type="wordpiece", file="vocab.txt", vocab_size=len(tokens),
                            special_ids={"pad": 0, "unk": 2, "cls": 3, "sep": 4, "mask": 5})
    tables = [build_token_tables(section, str(d)) for d in (lf, crlf)]
    assert tables[0].is_special.tolist() == tables[1].is_special.tolist()
    assert tables[1].is_special[1]  # "[unused0]" is never masked in or sampled, CRLF or not
    text = ["the cats sat", "cat"]
    ids = [[e[0].tolist() for e in WordPieceTokenizer(str(d / "vocab.txt")).encode_lines(text)] for d in (lf, crlf)]
    assert ids[0] == ids[1] == [[6, 7, 8, 9], [7]]
    for d in (lf, crlf):
        tok = finetune_tokenizer(str(d))
        assert [tok(t, add_special_tokens=False)["input_ids"] for t in text] == ids[0]


def _tokenizers(spm_model):
    return {"wordpiece": WordPieceTokenizer(embedded_vocab()), "sentencepiece": load_tokenizer(spm_model)}


@pytest.mark.parametrize("kind", ["wordpiece", "sentencepiece"])
def test_refused_document_is_dropped_counted_and_located(spm_model, kind):
    """Text the tokenizer or splitter raises on (here a lone surrogate handed over directly, which
    the readers would have cleaned) costs its document, never the run."""
    from collections import Counter

    from data_prep.readers import Document

    tok = _tokenizers(spm_model)[kind]
    split = get_splitter("blingfire")
    good = [Document(["First good document. Two sentences."], 1), Document(["Another good one."], 3)]
    bad = Document(["Its first line is fine.", "Broken emoji \ud83d here."], 7)
    counts, examples = Counter(), {}
    got = tokenize_documents(tok, split, [good[0], bad, good[1]], 10**6, counts, examples)
    alone = tokenize_documents(tok, split, good, 10**6, Counter())
    assert got[1] is None
    assert [[s.tolist() for s in d] for d in (got[0], got[2])] == [[s.tolist() for s in d] for d in alone]
    assert counts["tokenizer_refused_documents"] == 1
    [ex] = examples["tokenizer_refused_documents"]
    assert ex["line"] == 7 and ex["excerpt"] == "Broken emoji \\ud83d here."  # the line refused, printable
    assert ex["error"].startswith(("TypeError", "UnicodeEncodeError"))
    import json

    json.dumps(examples, ensure_ascii=False).encode("utf-8")


def test_a_tokenizer_that_refuses_everything_raises(monkeypatch):
    """The net is for text, not for a broken tokenizer: an error a plain probe also gets is raised."""
    from collections import Counter

    tok = WordPieceTokenizer(embedded_vocab())

    def broken(lines):
        raise RuntimeError("tokenizer state lost")

    monkeypatch.setattr(tok, "encode_lines", broken)
    with pytest.raises(RuntimeError, match="tokenizer state lost"):
        tokenize_documents(tok, get_splitter("blingfire"), [["Some text."], ["More."]], 512, Counter(), {})


def test_every_code_point_but_surrogates_is_accepted(spm_model):
    """What the readers must clean: tokenizers and splitter accept every Unicode scalar value (NUL,
    control characters, non-characters, private use, every plane), so surrogates, which only a
    JSON escape can produce, are all they refuse."""
    from collections import Counter

    text = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and chr(c) != "\n")
    lines = [text[i:i + 4000].strip() for i in range(0, len(text), 4000)]
    for kind, tok in _tokenizers(spm_model).items():
        counts = Counter()
        out = tokenize_documents(tok, get_splitter("blingfire"), [[ln] for ln in lines if ln], 10**6, counts, {})
        assert counts["tokenizer_refused_documents"] == 0 and None not in out, kind


@pytest.mark.parametrize("lower", [True, False])
def test_sentencepiece_batch_ids_equal_the_offsets_path(texts, spm_model, lower):
    """`encode_ids` (one plain batch call) gives the ids of `encode_lines` (proto pieces with
    offsets, what the pipeline used before), with every thread count."""
    tok = load_tokenizer(spm_model, lower_case=lower)
    sample = texts[:300] + BOUNDARIES
    expected = [ids.tolist() for ids, _ in tok.encode_lines(sample)]
    assert [a.tolist() for a in tok.encode_ids(sample)] == expected
    tok.num_threads = 1
    assert [a.tolist() for a in tok.encode_ids(sample)] == expected
