"""Input discovery and streaming document readers.

Two conventions are accepted: plain text where documents are blocks separated by blank lines and
each line is a paragraph or sentence (google-research/bert), and JSON lines with a text field
(Megatron). Either may be gzip-compressed. Documents come out as lists of non-empty lines, in a
fixed order (inputs in the order given, directories expanded sorted), which is what makes the
downstream sharding deterministic.

Bad bytes are cleaned and counted here rather than raising: a corpus of millions of web documents
always has a few, and one bad line must not kill a day-long run. Every count has a reason (the
keys of `ReadStats.counts`) and the first few cases of each reason are kept as examples with their
file and line, for the report. What comes out is text every tokenizer and splitter accepts: valid
Unicode (they accept every scalar value; a lone surrogate, which only a JSON escape can produce, is
refused by HF `tokenizers`, sentencepiece and blingfire alike), without NUL (binary junk).
"""
from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from .errors import DataPrepError

TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
# Lines longer than this are cut at whitespace before splitting and tokenizing: it bounds the
# memory of a single tokenizer call (a 10 MB line is ~2M tokens with offsets) and is far longer
# than any real sentence, so it never changes the token ids (cuts happen at whitespace).
MAX_LINE_CHARS = 1 << 16
# Lines are read at most this many bytes at a time (memory bound for files without newlines).
MAX_LINE_BYTES = 1 << 26


# Examples kept per reason: enough to find the pattern in a corpus, few enough for a manifest.
MAX_EXAMPLES = 3
EXCERPT_CHARS = 60
# A UTF-16 surrogate on its own: JSON's "\ud83d" escape decodes to one (bytes never do: a strict
# UTF-8 decode refuses them), and no tokenizer or splitter accepts it.
_SURROGATE = re.compile("[\ud800-\udfff]")


def printable(text: str) -> str:
    """`text` as valid UTF-8 for a JSON file or a terminal: a lone surrogate (from a JSON escape or
    a file name that is not UTF-8) becomes its escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def excerpt(text: str, pos: int = 0) -> str:
    """Up to EXCERPT_CHARS characters of `text` around position `pos` (where the problem is)."""
    text = text.rstrip("\r\n")
    start = max(0, min(pos - EXCERPT_CHARS // 3, len(text) - EXCERPT_CHARS))
    return printable(text[start:start + EXCERPT_CHARS])


def add_example(examples: dict, reason: str, example: dict) -> None:
    """Keep `example` if `reason` has fewer than MAX_EXAMPLES: the first ones, in reading order."""
    kept = examples.setdefault(reason, [])
    if len(kept) < MAX_EXAMPLES:
        kept.append(example)


@dataclass
class ReadStats:
    empty_files: list = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    # reason -> the first MAX_EXAMPLES cases: {"file", "line" (1-based), "excerpt"}
    examples: dict = field(default_factory=dict)

    def note(self, reason: str, path: str, line: int, text: str = "", pos: int = 0, n: int = 1) -> None:
        """Count `n` of `reason` and keep line `line` of `path` as an example (`text` around `pos`)."""
        self.counts[reason] += n
        add_example(self.examples, reason, {"file": printable(path), "line": line, "excerpt": excerpt(text, pos)})

    def add_examples(self, examples: dict) -> None:
        """Merge another file's (or shard's) examples after this one's, keeping the first few."""
        for reason, cases in examples.items():
            for case in cases:
                add_example(self.examples, reason, case)


class Document(list):
    """The lines of one document, and `line`: the (1-based) line of its file where it starts, so
    that a document dropped later (by the tokenizer) can be reported with its place."""

    __slots__ = ("line",)

    def __init__(self, lines=(), line: int | None = None):
        super().__init__(lines)
        self.line = line


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def detect_format(path: str, forced: str = "auto") -> str:
    if forced != "auto":
        return forced
    base = _strip_gz(path.lower())
    if base.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "text"


def expand_inputs(paths: list[str]) -> list[str]:
    """Files in a fixed order: as given, directories walked and sorted. Missing paths are errors."""
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = []
            for root, dirs, files in os.walk(p):
                # Hidden folders hold tool state (ours: an output dir's .work shards), not corpora.
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for f in sorted(files):
                    if f.startswith("."):
                        continue
                    if _strip_gz(f.lower()).endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
                        found.append(os.path.join(root, f))
            if not found:
                raise DataPrepError(
                    f"--input {p}: directory has no .txt/.jsonl/.json (optionally .gz) files; "
                    "point --input at the files or rename them"
                )
            out.extend(found)
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise DataPrepError(f"--input {p}: no such file or directory; check the path")
    for f in out:
        # Every file, before any work: a dangling link or an unreadable file deep in a directory
        # should fail now, not after hours of tokenizing. (os.access says yes to root; open does not lie.)
        _open_binary(f).close()
    return out


def _open_binary(path: str):
    try:
        if path.endswith(".gz"):
            return gzip.open(path, "rb")
        return open(path, "rb")
    except OSError as e:
        raise DataPrepError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from e


def _cut_long(line: str, stats: ReadStats, path: str, lineno: int) -> list[str]:
    if len(line) <= MAX_LINE_CHARS:
        return [line]
    stats.note("long_lines_cut", path, lineno, line)
    pieces = []
    start = 0
    while start < len(line):
        end = min(start + MAX_LINE_CHARS, len(line))
        if end < len(line):
            ws = line.rfind(" ", start + MAX_LINE_CHARS // 2, end)
            if ws > start:
                end = ws + 1
        pieces.append(line[start:end])
        start = end
    return pieces


def _clean(raw: bytes, stats: ReadStats, path: str, lineno: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        # U+FFFD is dropped by BERT's text cleaning anyway; replacing keeps the rest of the line.
        text = raw.decode("utf-8", errors="replace")
        stats.note("invalid_utf8_lines", path, lineno, text, len(raw[:e.start].decode("utf-8", "replace")))
    return _remove_nul(text, stats, path, lineno)


def _remove_nul(text: str, stats: ReadStats, path: str, lineno: int) -> str:
    if "\x00" in text:
        stats.note("nul_bytes", path, lineno, text, text.index("\x00"), n=text.count("\x00"))
        text = text.replace("\x00", "")
    return text


def _replace_surrogates(text: str, stats: ReadStats, path: str, lineno: int) -> str:
    """A lone surrogate (a JSON escape of half an emoji, as web scrapes have) becomes U+FFFD, as
    invalid UTF-8 does: the record is kept, the broken character is not."""
    if text.isascii():  # O(1): the common case costs nothing
        return text
    m = _SURROGATE.search(text)
    if m is None:
        return text
    stats.note("lone_surrogate_lines", path, lineno, text, m.start())
    return _SURROGATE.sub("\ufffd", text)


def _doc_lines(text: str, stats: ReadStats, path: str, lineno: int) -> list[str]:
    lines = []
    for ln in text.split("\n"):
        ln = ln.strip()
        if ln:
            lines.extend(_cut_long(ln, stats, path, lineno))
    return lines


def _read_lines(path: str, limit: int | None = None) -> Iterator[tuple[bytes, bool]]:
    """(bytes, complete) per line. A line longer than `limit` bytes comes in pieces (complete=False
    for all but the last) so one newline-free file cannot take memory proportional to its size;
    text pieces end at a space (or at least at a character boundary) so no word or UTF-8
    character is cut."""
    limit = limit or MAX_LINE_BYTES
    # Reading in binary and decoding per line localises a bad byte to one line.
    f = _open_binary(path)
    carry = b""
    try:
        while True:
            try:
                chunk = f.readline(limit)
            except (EOFError, zlib.error, gzip.BadGzipFile) as e:
                raise DataPrepError(
                    f"{path}: corrupt or truncated gzip ({e}); re-create or remove the file"
                ) from e
            except OSError as e:
                raise DataPrepError(f"{path}: cannot read ({e.strerror})") from e
            if not chunk:
                if carry:
                    yield carry, True
                return
            line = carry + chunk
            carry = b""
            if line.endswith(b"\n") or len(chunk) < limit:
                yield line, True
                continue
            cut = line.rfind(b" ")
            if cut <= 0:
                cut = len(line)
                while cut > 0 and (line[cut - 1] & 0xC0) == 0x80:
                    cut -= 1  # back off UTF-8 continuation bytes...
                if cut > 0 and line[cut - 1] >= 0xC0:
                    cut -= 1  # ...and the lead byte of the character they belong to
                if cut <= 0:
                    cut = len(line)
            line, carry = line[:cut], line[cut:]
            yield line, False
    finally:
        f.close()


def iter_text_documents(path: str, stats: ReadStats) -> Iterator[Document]:
    doc = Document()
    lineno = 1  # of the line `raw` is (a piece of)
    first_piece = True
    for raw, complete in _read_lines(path):
        text = _clean(raw, stats, path, lineno)
        if not complete:  # counted per piece, one example per line
            if first_piece:
                stats.note("oversized_lines_read_in_pieces", path, lineno, text)
            else:
                stats.counts["oversized_lines_read_in_pieces"] += 1
        if text.strip():
            if not doc:
                doc.line = lineno
            doc.extend(_doc_lines(text, stats, path, lineno))
        elif doc and complete:
            yield doc
            doc = Document()
        lineno += complete
        first_piece = complete
    if doc:
        yield doc


def iter_jsonl_documents(path: str, stats: ReadStats, key: str = "text") -> Iterator[Document]:
    skipping = False
    lineno = 0
    for raw, complete in _read_lines(path):
        if not skipping:
            lineno += 1  # the first (or only) piece of a line
        if skipping or not complete:
            # A JSON line larger than MAX_LINE_BYTES cannot be parsed in bounded memory: drop it.
            if not skipping:
                stats.note("oversized_json_lines", path, lineno, raw[:4 * EXCERPT_CHARS].decode("utf-8", "replace"))
            skipping = not complete
            continue
        text = _clean(raw, stats, path, lineno)
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            stats.note("bad_json_lines", path, lineno, text, e.pos)
            continue
        value = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            stats.note("json_lines_without_text", path, lineno, text)
            continue
        value = _replace_surrogates(_remove_nul(value, stats, path, lineno), stats, path, lineno)
        yield Document(_doc_lines(value, stats, path, lineno), lineno)


def iter_file_documents(path: str, stats: ReadStats, fmt: str = "auto", json_key: str = "text") -> Iterator[Document]:
    """Yield the lines of every document of one file; empty documents are counted and skipped."""
    kind = detect_format(path, fmt)
    it = iter_jsonl_documents(path, stats, json_key) if kind == "jsonl" else iter_text_documents(path, stats)
    n = 0
    for lines in it:
        if not lines:
            stats.note("empty_documents", path, lines.line)
            continue
        n += 1
        yield lines
    if n == 0:
        stats.empty_files.append(path)


def iter_documents(files: list[str], stats: ReadStats, fmt: str = "auto", json_key: str = "text"):
    """Yield (file_index, lines) for every document of every file, in order."""
    for i, path in enumerate(files):
        for lines in iter_file_documents(path, stats, fmt, json_key):
            yield i, lines
