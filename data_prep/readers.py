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

# Part of the resume fingerprint: bump it whenever a rule that decides what the readers hand over
# changes (cleaning, long-line and pseudo-document cuts, document boundaries, part boundaries) or
# how sentences are split (splitter.py), so that shards made by the old rules are not reused.
READER_VERSION = 1

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
    # Lines read. A reader started at a part's first byte (past 0) does not know the line number
    # of its first line: its examples count lines from the part's start, and the pipeline's merge
    # adds the lines of the file's earlier parts (parts are contiguous), see `shift_lines`.
    lines: int = 0

    def note(self, reason: str, path: str, line: int, text: str = "", pos: int = 0, n: int = 1) -> None:
        """Count `n` of `reason` and keep line `line` of `path` as an example (`text` around `pos`)."""
        self.counts[reason] += n
        add_example(self.examples, reason, {"file": printable(path), "line": line, "excerpt": excerpt(text, pos)})

    def add_examples(self, examples: dict) -> None:
        """Merge another file's (or shard's) examples after this one's, keeping the first few."""
        for reason, cases in examples.items():
            for case in cases:
                add_example(self.examples, reason, case)


def shift_lines(examples: dict, offset: int) -> dict:
    """`examples` with `offset` added to every line number: a part's (counted from the part's
    start) as lines of the whole file."""
    if not offset:
        return examples
    return {r: [dict(e, line=e["line"] + offset) if e.get("line") is not None else e for e in cases]
            for r, cases in examples.items()}


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


def _read_lines(path: str, limit: int | None = None, start: int = 0, end: int | None = None) -> Iterator[tuple[bytes, bool]]:
    """(bytes, complete) per line. A line longer than `limit` bytes comes in pieces (complete=False
    for all but the last) so one newline-free file cannot take memory proportional to its size;
    text pieces end at a space (or at least at a character boundary) so no word or UTF-8
    character is cut. `start`/`end` (uncompressed files only): read the lines that start in
    [start, end); `start` must be a line start (see `document_boundary`)."""
    limit = limit or MAX_LINE_BYTES
    # Reading in binary and decoding per line localises a bad byte to one line.
    f = _open_binary(path)
    carry = b""
    try:
        if start:
            f.seek(start)
        while True:
            if end is not None and not carry and f.tell() >= end:
                return
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


def splittable(path: str) -> bool:
    """Whether a file can be read from a byte offset (gzip streams cannot)."""
    return not path.endswith(".gz")


def _line_start_at_or_after(f, pos: int) -> int:
    if pos == 0:
        return 0
    f.seek(pos - 1)
    if f.read(1) == b"\n":
        return pos
    while True:
        chunk = f.readline(1 << 20)
        if not chunk or chunk.endswith(b"\n"):
            return f.tell()


def document_boundary(path: str, fmt: str, lo: int, hi: int) -> int | None:
    """The first offset where a reader can start without changing the documents that a reader from
    offset 0 sees, among those found from lines starting in [lo, hi); None if there is none.

    JSON lines: any line start. Text: the end of a blank line (a reader from 0 has just closed a
    document there, or had none open). Lines are read exactly as `_read_lines` reads them from
    that line's start, so an over-long line's pieces and a bad byte decide the same way here."""
    with _open_binary(path) as f:
        first = _line_start_at_or_after(f, lo)
    if first >= hi:
        return None
    if detect_format(path, fmt) == "jsonl":
        return first
    pos = first
    for raw, complete in _read_lines(path, start=first, end=hi):
        pos += len(raw)
        if complete and not _clean(raw, ReadStats(), path, 0).strip():
            return pos
    return None


def document_bytes(lines: list[str]) -> int:
    """UTF-8 size of a document's text: what shards and pseudo-documents are measured in."""
    return sum(len(ln.encode("utf-8", "surrogatepass")) for ln in lines)


def split_document(lines: list[str], max_bytes: int | None, counts: Counter) -> Iterator[list[str]]:
    """A document longer than `max_bytes` as pseudo-documents cut between lines (paragraphs; a line
    is at most MAX_LINE_CHARS, cut at whitespace), each the first lines reaching `max_bytes`. Each
    keeps the document's start line (`Document.line`: a JSON record is one line)."""
    if not max_bytes:
        yield lines
        return
    line = getattr(lines, "line", None)
    piece = Document(line=line)
    size = pieces = 0
    for ln in lines:
        piece.append(ln)
        size += len(ln.encode("utf-8", "surrogatepass"))
        if size >= max_bytes:
            yield piece
            piece, size, pieces = Document(line=line), 0, pieces + 1
    if piece:
        yield piece
        pieces += 1
    if pieces > 1:
        counts["long_documents_split"] += 1


def iter_text_documents(path: str, stats: ReadStats, max_doc_bytes: int | None = None, start: int = 0,
                        end: int | None = None) -> Iterator[Document]:
    """Blocks of lines between blank lines. A block reaching `max_doc_bytes` is yielded as it
    grows, as pseudo-documents cut between lines (see `split_document`), so a file without blank
    lines is never held whole. Line numbers (examples, `Document.line`) count from `start`: from
    the file's first line when it is 0; `stats.lines` gets the lines read (see ReadStats)."""
    counts = stats.counts
    doc = Document()
    size = pieces = 0
    lineno = 1  # of the line `raw` is (a piece of), counted from `start`
    first_piece = True
    for raw, complete in _read_lines(path, start=start, end=end):
        text = _clean(raw, stats, path, lineno)
        if not complete:  # counted per piece, one example per line
            if first_piece:
                stats.note("oversized_lines_read_in_pieces", path, lineno, text)
            else:
                counts["oversized_lines_read_in_pieces"] += 1
        if text.strip():
            for ln in _doc_lines(text, stats, path, lineno):
                if not doc:
                    doc.line = lineno
                doc.append(ln)
                if max_doc_bytes:
                    size += len(ln.encode("utf-8", "surrogatepass"))
                    if size >= max_doc_bytes:
                        yield doc
                        doc, size, pieces = Document(), 0, pieces + 1
        elif complete and (doc or pieces):
            if doc:
                yield doc
                pieces += 1
            if pieces > 1:
                counts["long_documents_split"] += 1
            doc, size, pieces = Document(), 0, 0
        lineno += complete
        first_piece = complete
    stats.lines += lineno - 1
    if doc:
        yield doc
        pieces += 1
    if pieces > 1:
        counts["long_documents_split"] += 1


def iter_jsonl_documents(path: str, stats: ReadStats, key: str = "text", start: int = 0,
                         end: int | None = None) -> Iterator[Document]:
    """One document per JSON record with a string `key`; line numbers count from `start` (see
    iter_text_documents)."""
    skipping = False
    lineno = 0
    for raw, complete in _read_lines(path, start=start, end=end):
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
    stats.lines += lineno


def iter_file_documents(path: str, stats: ReadStats, fmt: str = "auto", json_key: str = "text",
                        max_doc_bytes: int | None = None, start: int = 0, end: int | None = None) -> Iterator[Document]:
    """Yield the lines of every document of one file (or of the byte range [start, end), from a
    `document_boundary`); empty documents are counted and skipped, documents longer than
    `max_doc_bytes` come as pseudo-documents. A whole file without documents is an empty file.
    Line numbers count from `start` (the pipeline shifts a part's by the lines of the parts
    before it, see ReadStats.lines)."""
    if detect_format(path, fmt) == "jsonl":
        it = (piece for lines in iter_jsonl_documents(path, stats, json_key, start, end)
              for piece in (split_document(lines, max_doc_bytes, stats.counts) if lines else [lines]))
    else:
        it = iter_text_documents(path, stats, max_doc_bytes, start, end)
    n = 0
    for lines in it:
        if not lines:
            stats.note("empty_documents", path, lines.line)
            continue
        n += 1
        yield lines
    if n == 0 and start == 0 and end is None:
        stats.empty_files.append(path)


def iter_documents(files: list[str], stats: ReadStats, fmt: str = "auto", json_key: str = "text",
                   max_doc_bytes: int | None = None):
    """Yield (file_index, lines) for every document of every file, in order."""
    for i, path in enumerate(files):
        for lines in iter_file_documents(path, stats, fmt, json_key, max_doc_bytes):
            yield i, lines
