"""Tokenizers behind one small interface: WordPiece (HF `tokenizers`, ids equal to transformers'
BertTokenizer; an existing vocab.txt or one trained on the corpus) and sentencepiece (an existing
model or one trained on the corpus).

`encode_lines(lines)` returns, per line, the token ids and the character start offset of each
token. Offsets let the pipeline tokenize a whole paragraph in one call and then cut it at the
sentence splitter's boundaries: BERT's pre-tokenizer splits on whitespace and punctuation and its
normaliser is per character, so cutting at a whitespace boundary gives the same ids as tokenizing
each sentence alone, at a fraction of the per-call overhead. Offsets are character offsets into
the line as given (sentencepiece reports UTF-8 byte offsets into the lower-cased text; they are
converted). Sentencepiece ids are *not* cut-invariant at a boundary without whitespace, so the
pipeline encodes sentencepiece text per sentence (`shards.tokenize_documents`), all the sentences
of a shard in one `encode_ids` call: plain `sp.encode`, no offsets.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections import Counter

import numpy as np

from .atomic import atomic_copy, atomic_write
from .errors import DataPrepError

BERT_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


class VocabError(ValueError):
    """A vocab.txt that cannot be used; the message starts with the file's path."""


def read_vocab(path: str, require_bert_specials: bool = True) -> list[str]:
    """The tokens of a WordPiece vocab.txt in id order (line i is id i; a CRLF line end is
    dropped). The one reader of vocab.txt files: data prep encodes with it, pretraining's masking
    tables and fine-tuning's tokenizer read it, so all three agree on every id."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        tokens = [w.rstrip("\r") for w in raw.decode("utf-8").split("\n")]
    except OSError as e:
        raise VocabError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from e
    except UnicodeDecodeError as e:
        raise VocabError(f"{path}: not a UTF-8 text vocab.txt (one token per line); "
                         "for a sentencepiece model pass a .model file") from e
    if tokens and tokens[-1] == "":  # the final newline ends the last line, it is not a token
        tokens.pop()
    if require_bert_specials:
        table = vocab_ids(tokens)
        missing = [t for t in BERT_SPECIALS.values() if t not in table]
        if missing:
            raise VocabError(f"{path}: missing special tokens {missing}; a BERT WordPiece vocab.txt needs "
                             "[PAD] [UNK] [CLS] [SEP] [MASK]")
    return tokens


def vocab_ids(tokens: list[str]) -> dict[str, int]:
    """token -> id; a token listed twice keeps its first id (the one the corpus was encoded with)."""
    table: dict[str, int] = {}
    for i, w in enumerate(tokens):
        table.setdefault(w, i)
    return table


class WordPieceTokenizer:
    type = "wordpiece"

    def __init__(self, vocab_file: str, lower_case: bool = True):
        try:
            words = read_vocab(vocab_file)
        except VocabError as e:
            raise DataPrepError(f"--vocab {e}") from e
        vocab = vocab_ids(words)
        from tokenizers import BertWordPieceTokenizer

        self.vocab_file = vocab_file
        self.lower_case = lower_case
        # strip_accents follows lowercase, as in BertTokenizer's default (strip_accents=None).
        self._tok = BertWordPieceTokenizer(vocab, lowercase=lower_case, strip_accents=None, clean_text=True,
                                           handle_chinese_chars=True, wordpieces_prefix="##")
        self.vocab_size = len(words)
        self.special_ids = {k: vocab[v] for k, v in BERT_SPECIALS.items()}
        self.file_name = "vocab.txt"

    def encode_lines(self, lines: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        encs = self._tok.encode_batch(lines, add_special_tokens=False)
        out = []
        for e in encs:
            ids = np.asarray(e.ids, dtype=np.int64)
            starts = np.fromiter((o[0] for o in e.offsets), dtype=np.int64, count=len(ids))
            out.append((ids, starts))
        return out

    def encode_text(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def copy_to(self, out_dir: str) -> str:
        dst = os.path.join(out_dir, self.file_name)
        atomic_copy(self.vocab_file, dst)
        return dst


class SentencePieceTokenizer:
    type = "sentencepiece"
    # Names tried for each special role, covering our trained models and ALBERT-style ones.
    _ROLE_PIECES = {
        "pad": ["[PAD]", "<pad>"],
        "unk": ["[UNK]", "<unk>"],
        "cls": ["[CLS]", "<cls>"],
        "sep": ["[SEP]", "<sep>"],
        "mask": ["[MASK]", "<mask>"],
    }

    def __init__(self, model_file: str, lower_case: bool = False):
        import sentencepiece as spm

        if not os.access(model_file, os.R_OK):
            raise DataPrepError(f"--vocab {model_file}: cannot read the sentencepiece model; check the path and permissions")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_file)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ messages
            raise DataPrepError(f"--vocab {model_file}: not a valid sentencepiece model ({e})") from e
        self.model_file = model_file
        self.lower_case = lower_case
        # Threads of a batch encode: sentencepiece's default (-1: every core) in one process; a
        # worker process sets 1, the workers being the parallelism (shards.init_worker).
        self.num_threads = -1
        self.vocab_size = self._sp.get_piece_size()
        self.special_ids = {}
        for role, names in self._ROLE_PIECES.items():
            for n in names:
                pid = self._sp.piece_to_id(n)
                if pid != self._sp.unk_id() or n in ("[UNK]", "<unk>"):
                    if self._sp.id_to_piece(pid) == n:
                        self.special_ids[role] = pid
                        break
            else:
                raise DataPrepError(
                    f"--vocab {model_file}: sentencepiece model has no {names[0]} piece; BERT needs "
                    "[PAD] [UNK] [CLS] [SEP] [MASK] (train one with --train-spm-vocab-size)"
                )
        self.file_name = "spm.model"

    def encode_lines(self, lines: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        encoded = [ln.lower() for ln in lines] if self.lower_case else lines
        out = []
        for ln, enc, proto in zip(lines, encoded, self._sp.encode(encoded, return_type="proto")):
            ids = np.fromiter((p.id for p in proto.pieces), dtype=np.int64)
            begins = np.fromiter((p.begin for p in proto.pieces), dtype=np.int64, count=len(ids))
            out.append((ids, _piece_char_starts(ln, enc, begins)))
        return out

    def encode_ids(self, texts: list[str]) -> list[np.ndarray]:
        """The ids of each text encoded alone (int32 arrays): one batch call, as fast as plain
        `sp.encode` (the proto pieces and offsets of `encode_lines` cost 10x the encoding)."""
        if self.lower_case:
            texts = [t.lower() for t in texts]
        return self._sp.encode(texts, return_type="numpy", num_threads=self.num_threads)

    def encode_text(self, text: str) -> list[int]:
        return self._sp.encode(text.lower() if self.lower_case else text)

    def copy_to(self, out_dir: str) -> str:
        dst = os.path.join(out_dir, self.file_name)
        atomic_copy(self.model_file, dst)
        return dst


_SPACE_RUN = re.compile(r"\s+")


def _piece_char_starts(line: str, encoded: str, begins: np.ndarray) -> np.ndarray:
    """Sentencepiece piece begins (UTF-8 *byte* offsets into `encoded`, the possibly lower-cased
    `line`) -> word-start *character* offsets into `line`, the string the splitter sees."""
    raw = encoded.encode("utf-8")
    if len(raw) != len(encoded):
        lead = (np.frombuffer(raw, dtype=np.uint8) & 0xC0) != 0x80
        char_of_byte = np.append(np.cumsum(lead) - 1, len(encoded))
        begins = char_of_byte[begins]
    # A word's piece may begin at the whitespace before it (any whitespace the normaliser maps to
    # U+2581: tab, NBSP, ...); move it to the word so the word stays with its own sentence.
    runs = [(m.start(), m.end()) for m in _SPACE_RUN.finditer(encoded)]
    if runs:
        rs = np.array([a for a, _ in runs], dtype=np.int64)
        re_ = np.array([b for _, b in runs], dtype=np.int64)
        k = np.searchsorted(rs, begins, side="right") - 1
        inside = (k >= 0) & (begins < re_[np.maximum(k, 0)])
        begins = np.where(inside, re_[np.maximum(k, 0)], begins)
    if len(encoded) != len(line):
        # str.lower() can lengthen a character ("İ" -> "i" + U+0307): map back to `line`.
        orig = np.repeat(np.arange(len(line), dtype=np.int64), [len(c.lower()) for c in line])
        if len(orig) != len(encoded):  # context-dependent lowering; never seen, fail loudly
            raise DataPrepError(f"cannot align lower-cased text with the original: {line[:60]!r}")
        begins = np.append(orig, len(line))[begins]
    return begins


def load_tokenizer(path: str, lower_case: bool | None = None):
    """A `.model` file is sentencepiece, anything else a WordPiece vocab.txt."""
    if not os.path.exists(path):
        raise DataPrepError(f"--vocab {path}: no such file; pass a WordPiece vocab.txt or a sentencepiece .model")
    if os.path.isdir(path):
        raise DataPrepError(f"--vocab {path}: is a directory; pass the vocab.txt or .model file inside it")
    if path.endswith(".model"):
        return SentencePieceTokenizer(path, lower_case=bool(lower_case))
    return WordPieceTokenizer(path, lower_case=True if lower_case is None else lower_case)


def train_sentencepiece(sentences_file: str, model_prefix: str, vocab_size: int, model_type: str = "unigram",
                        input_sentence_size: int = 1_000_000, seed: int = 1234) -> str:
    """Train a BERT-ready sentencepiece model: ids 0-4 are [PAD] [UNK] [CLS] [SEP] [MASK]."""
    import sentencepiece as spm

    # Sampling/shuffling of training sentences is seeded so the model (and every id) is reproducible.
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            input=sentences_file,
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=0, pad_piece="[PAD]", unk_id=1, unk_piece="[UNK]", bos_id=-1, eos_id=-1,
            control_symbols=["[CLS]", "[SEP]", "[MASK]"],
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            # One thread: multi-threaded EM can order floating-point sums differently.
            num_threads=1,
            character_coverage=0.9995,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataPrepError(f"--train-spm-vocab-size {vocab_size}: sentencepiece training failed ({e}); "
                            "a smaller vocab size usually fixes a small corpus") from e
    return model_prefix + ".model"


# WordPiece training: the recipe of HF `tokenizers`' BertWordPieceTokenizer.train (and so of most
# BERT vocabularies trained since), with BERT's special tokens first so that their ids are 0-4.
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDPIECE_PREFIX = "##"
WORDPIECE_MIN_FREQUENCY = 2
WORDPIECE_LIMIT_ALPHABET = 1000
_TRAIN_BATCH = 10_000  # sentences per batch handed to the trainer / normaliser


def _sentence_batches(path: str):
    with open(path, encoding="utf-8", newline="\n") as f:
        batch = []
        for line in f:
            batch.append(line.rstrip("\n"))
            if len(batch) == _TRAIN_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch


def train_wordpiece(sentences_file: str, vocab_path: str, vocab_size: int, lower_case: bool = True) -> str:
    """Train a BERT WordPiece vocab.txt of exactly `vocab_size` entries on `sentences_file` (one
    sentence a line); ids 0-4 are [PAD] [UNK] [CLS] [SEP] [MASK]. Written atomically.

    `tokenizers`' trainer alone is not reproducible: it assigns the ids of the `##c` continuation
    characters in hash-map order (random per process), and merge ties are broken by those ids,
    so two runs give different vocab orders and even different tokens. It is made deterministic
    by fixing everything that hash order decides before training: the alphabet (the
    WORDPIECE_LIMIT_ALPHABET most frequent characters after BERT's normaliser, ties broken by code
    point) goes in as `initial_alphabet`, and the `##c` continuations the corpus needs (found by a
    first pass that merges nothing) go in, sorted, right after the special tokens.
    """
    from tokenizers import BertWordPieceTokenizer

    def new_tokenizer():
        # strip_accents follows lowercase, as for BERT uncased and as WordPieceTokenizer encodes.
        return BertWordPieceTokenizer(lowercase=lower_case, strip_accents=lower_case, clean_text=True,
                                      handle_chinese_chars=True, wordpieces_prefix=WORDPIECE_PREFIX)

    flag = f"--train-wordpiece-vocab-size {vocab_size}"
    # 1. Character counts as the trainer sees them: after the normaliser, whitespace excluded.
    normalizer = new_tokenizer()._tokenizer.normalizer
    counter: Counter = Counter()
    for batch in _sentence_batches(sentences_file):
        counter.update(normalizer.normalize_str("\n".join(batch)))
    counts = {c: n for c, n in counter.items() if not c.isspace()}
    if not counts:
        raise DataPrepError(f"{flag}: the inputs have no text to train a vocabulary on")
    alphabet = sorted(counts, key=lambda c: (-counts[c], ord(c)))[:WORDPIECE_LIMIT_ALPHABET]
    alphabet.sort(key=ord)

    def train(size: int, specials: list[str], limit_alphabet: int, initial_alphabet: list[str]) -> list[str]:
        tok = new_tokenizer()
        tok.train_from_iterator(_sentence_batches(sentences_file), vocab_size=size,
                                min_frequency=WORDPIECE_MIN_FREQUENCY, limit_alphabet=limit_alphabet,
                                initial_alphabet=initial_alphabet, special_tokens=specials,
                                show_progress=False, wordpieces_prefix=WORDPIECE_PREFIX)
        vocab = tok.get_vocab()
        words = sorted(vocab, key=vocab.get)
        if [vocab[w] for w in words] != list(range(len(words))):
            raise RuntimeError("tokenizers returned non-consecutive WordPiece ids")
        return words

    # 2. Which alphabet characters occur inside a word (they get a `##c` piece): a pass with no merges.
    def is_continuation(w: str) -> bool:  # "##" + one character
        return w.startswith(WORDPIECE_PREFIX) and len(w) == len(WORDPIECE_PREFIX) + 1

    kept = set(alphabet)
    probe = train(1, WORDPIECE_SPECIALS, len(alphabet), alphabet)
    continuations = sorted((w for w in probe if is_continuation(w) and w[-1] in kept), key=lambda w: ord(w[-1]))
    base = len(WORDPIECE_SPECIALS) + len(alphabet) + len(continuations)
    if vocab_size <= base:
        raise DataPrepError(
            f"{flag}: too small for this corpus, whose characters alone take {base} entries "
            f"({len(WORDPIECE_SPECIALS)} special tokens, {len(alphabet)} characters, {len(continuations)} "
            f"'{WORDPIECE_PREFIX}' continuations); use a larger size (at least {base + 1}, and a few thousand "
            "more for useful word pieces)")
    # 3. The real training, with nothing left to hash order but the merges' own (count, pair) order.
    words = train(vocab_size, WORDPIECE_SPECIALS + continuations, len(alphabet), alphabet)
    # The trainer's order is specials, continuations, characters, merges; write BERT's order
    # (characters before their ## forms). Ids follow the file; WordPiece only uses the set.
    ns, nc, na = len(WORDPIECE_SPECIALS), len(continuations), len(alphabet)
    if (words[:ns] != WORDPIECE_SPECIALS or words[ns:ns + nc] != continuations
            or words[ns + nc:ns + nc + na] != alphabet):
        raise RuntimeError(f"trained WordPiece vocab does not start with the special tokens, continuations and "
                           f"alphabet it was given: {words[:8]}")
    words = words[:ns] + alphabet + continuations + words[ns + nc + na:]
    known = set(continuations)
    stray = [w for w in words if is_continuation(w) and w not in known]
    if stray:
        raise RuntimeError(f"trained WordPiece vocab has continuations the first pass did not see: {stray[:5]}")
    if len(words) < vocab_size:
        raise DataPrepError(
            f"{flag}: the training text is too small: it yields only {len(words)} entries (word pieces "
            f"must occur at least {WORDPIECE_MIN_FREQUENCY} times); use --train-wordpiece-vocab-size "
            f"{len(words)} or less, or more text")
    text = "\n".join(words) + "\n"
    if text.splitlines() != words:
        # Guaranteed by the normaliser (no control characters, whitespace splits words); checked
        # because a token with a line break would shift every id after it when read back.
        raise RuntimeError("trained WordPiece vocab has a token with a line break")
    with atomic_write(vocab_path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    return vocab_path
