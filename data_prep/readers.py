"""Input discovery and streaming document readers.

Two conventions are accepted: plain text where documents are blocks separated by blank lines and
each line is a paragraph or sentence (google-research/bert), and JSON lines with a text field
(Megatron). Either may be gzip-compressed. Documents come out as lists of non-empty lines, in a
fixed order (inputs in the order given, directories expanded sorted), which is what makes the
downstream sharding deterministic.

Bad bytes are cleaned and counted here rather than raising: a corpus of millions of web documents
always has a few, and one bad line must not kill a day-long run.
"""
from __future__ import annotations

import gzip
import json
import os
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


@dataclass
class ReadStats:
    empty_files: list = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


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


def _cut_long(line: str, counts: Counter) -> list[str]:
    if len(line) <= MAX_LINE_CHARS:
        return [line]
    counts["long_lines_cut"] += 1
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


def _clean(raw: bytes, counts: Counter) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        counts["invalid_utf8_lines"] += 1
        # U+FFFD is dropped by BERT's text cleaning anyway; replacing keeps the rest of the line.
        text = raw.decode("utf-8", errors="replace")
    if "\x00" in text:
        counts["nul_bytes"] += text.count("\x00")
        text = text.replace("\x00", "")
    return text


def _doc_lines(text: str, counts: Counter) -> list[str]:
    lines = []
    for ln in text.split("\n"):
        ln = ln.strip()
        if ln:
            lines.extend(_cut_long(ln, counts))
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
        if complete and not _clean(raw, Counter()).strip():
            return pos
    return None


def document_bytes(lines: list[str]) -> int:
    """UTF-8 size of a document's text: what shards and pseudo-documents are measured in."""
    return sum(len(ln.encode("utf-8", "surrogatepass")) for ln in lines)


def split_document(lines: list[str], max_bytes: int | None, counts: Counter) -> Iterator[list[str]]:
    """A document longer than `max_bytes` as pseudo-documents cut between lines (paragraphs; a line
    is at most MAX_LINE_CHARS, cut at whitespace), each the first lines reaching `max_bytes`."""
    if not max_bytes:
        yield lines
        return
    piece: list[str] = []
    size = pieces = 0
    for ln in lines:
        piece.append(ln)
        size += len(ln.encode("utf-8", "surrogatepass"))
        if size >= max_bytes:
            yield piece
            piece, size, pieces = [], 0, pieces + 1
    if piece:
        yield piece
        pieces += 1
    if pieces > 1:
        counts["long_documents_split"] += 1


def iter_text_documents(path: str, counts: Counter, max_doc_bytes: int | None = None, start: int = 0,
                        end: int | None = None) -> Iterator[list[str]]:
    """Blocks of lines between blank lines. A block reaching `max_doc_bytes` is yielded as it
    grows, as pseudo-documents cut between lines (see `split_document`), so a file without blank
    lines is never held whole."""
    doc: list[str] = []
    size = pieces = 0
    for raw, complete in _read_lines(path, start=start, end=end):
        if not complete:
            counts["oversized_lines_read_in_pieces"] += 1
        text = _clean(raw, counts)
        if text.strip():
            for ln in _doc_lines(text, counts):
                doc.append(ln)
                if max_doc_bytes:
                    size += len(ln.encode("utf-8", "surrogatepass"))
                    if size >= max_doc_bytes:
                        yield doc
                        doc, size, pieces = [], 0, pieces + 1
        elif complete and (doc or pieces):
            if doc:
                yield doc
                pieces += 1
            if pieces > 1:
                counts["long_documents_split"] += 1
            doc, size, pieces = [], 0, 0
    if doc:
        yield doc
        pieces += 1
    if pieces > 1:
        counts["long_documents_split"] += 1


def iter_jsonl_documents(path: str, counts: Counter, key: str = "text", start: int = 0,
                         end: int | None = None) -> Iterator[list[str]]:
    skipping = False
    for raw, complete in _read_lines(path, start=start, end=end):
        if skipping or not complete:
            # A JSON line larger than MAX_LINE_BYTES cannot be parsed in bounded memory: drop it.
            if not skipping:
                counts["oversized_json_lines"] += 1
            skipping = not complete
            continue
        text = _clean(raw, counts)
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            counts["bad_json_lines"] += 1
            continue
        value = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            counts["json_lines_without_text"] += 1
            continue
        if "\x00" in value:
            counts["nul_bytes"] += value.count("\x00")
            value = value.replace("\x00", "")
        yield _doc_lines(value, counts)


def iter_file_documents(path: str, stats: ReadStats, fmt: str = "auto", json_key: str = "text",
                        max_doc_bytes: int | None = None, start: int = 0, end: int | None = None) -> Iterator[list[str]]:
    """Yield the lines of every document of one file (or of the byte range [start, end), from a
    `document_boundary`); empty documents are counted and skipped, documents longer than
    `max_doc_bytes` come as pseudo-documents. A whole file without documents is an empty file."""
    if detect_format(path, fmt) == "jsonl":
        it = (piece for lines in iter_jsonl_documents(path, stats.counts, json_key, start, end)
              for piece in (split_document(lines, max_doc_bytes, stats.counts) if lines else [lines]))
    else:
        it = iter_text_documents(path, stats.counts, max_doc_bytes, start, end)
    n = 0
    for lines in it:
        if not lines:
            stats.counts["empty_documents"] += 1
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
