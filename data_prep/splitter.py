"""Sentence splitting. Default: blingfire (see docs/data_prep.md and benchmarks/sentence_split.py
for the speed/quality comparison with pysbd and syntok that chose it).

Every splitter returns character spans (start, end) into the line it was given, so the caller can
cut a single tokenizer call at sentence boundaries.
"""
from __future__ import annotations

from typing import Callable

Span = tuple[int, int]


_BF_BUF = [None]


def _blingfire_sentences(text: str) -> str:
    """blingfire.text_to_sentences with a reused output buffer (it allocates one per call)."""
    import ctypes

    import blingfire

    data = text.encode("utf-8")
    need = 2 * len(data) + 16
    buf = _BF_BUF[0]
    if buf is None or len(buf) < need:
        buf = _BF_BUF[0] = ctypes.create_string_buffer(max(need, 1 << 16))
    n = blingfire.blingfire.TextToSentences(ctypes.c_char_p(data), ctypes.c_int(len(data)), ctypes.byref(buf),
                                            ctypes.c_int(len(buf)))
    if n < 0 or n > len(buf):
        return blingfire.text_to_sentences(text)
    return ctypes.string_at(buf, n).rstrip(b"\x00").decode("utf-8")


def _blingfire(text: str) -> list[Span]:
    import blingfire

    # text_to_sentences_and_offsets maps byte offsets back to characters in a Python loop (3x the
    # cost of the split itself, 30 s on a 10 MB line). The sentences are verbatim substrings
    # joined by newlines, so str.find recovers the spans in C; the offsets API stays as fallback.
    out = _blingfire_sentences(text)
    if not out:
        return []
    spans = []
    pos = 0
    for sent in out.split("\n"):
        i = text.find(sent, pos)
        if i < 0:
            return [(int(a), int(b)) for a, b in blingfire.text_to_sentences_and_offsets(text)[1]]
        spans.append((i, i + len(sent)))
        pos = i + len(sent)
    return spans


def _pysbd(text: str) -> list[Span]:
    import pysbd

    seg = pysbd.Segmenter(language="en", clean=False, char_span=True)
    return [(s.start, s.end) for s in seg.segment(text)]


def _syntok(text: str) -> list[Span]:
    from syntok import segmenter

    spans = []
    for para in segmenter.analyze(text):
        for sent in para:
            toks = list(sent)
            if not toks:
                continue
            start = toks[0].offset
            end = toks[-1].offset + len(toks[-1].value)
            spans.append((start, end))
    return spans


def _lines(text: str) -> list[Span]:
    """Google-BERT convention: the input already has one sentence per line."""
    return [(0, len(text))] if text.strip() else []


SPLITTERS: dict[str, Callable[[str], list[Span]]] = {
    "blingfire": _blingfire,
    "pysbd": _pysbd,
    "syntok": _syntok,
    "lines": _lines,
}


def get_splitter(name: str) -> Callable[[str], list[Span]]:
    return SPLITTERS[name]
