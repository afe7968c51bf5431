"""Sentence splitting. Default: blingfire (see docs/data_prep.md and benchmarks/sentence_split.py
for the speed/quality comparison with pysbd and syntok that chose it).

Every splitter returns character spans (start, end) into the line it was given, so the caller can
cut a single tokenizer call at sentence boundaries.
"""
from __future__ import annotations

from typing import Callable

Span = tuple[int, int]


def _blingfire(text: str) -> list[Span]:
    import blingfire

    _, offsets = blingfire.text_to_sentences_and_offsets(text)
    return [(int(a), int(b)) for a, b in offsets]


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
