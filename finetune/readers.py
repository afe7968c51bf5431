"""Readers for the downstream input formats, with errors that name the file, the line and
what to change:

- sentence / sentence-pair files: TSV (GLUE layout: header row, no quoting), CSV, JSON lines;
- token labelling: CoNLL-style columns (token first, tag last, blank line between sentences);
- extractive QA: SQuAD v1.1 / v2.0 JSON.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class InputError(ValueError):
    """Bad user data or flags; the CLI prints the message without a traceback."""


# GLUE's TSV headers (SST-2, CoLA test, MRPC, QQP, STS-B, MNLI, QNLI, RTE, WNLI) and common
# generic names, in the order they are tried when the user names no column.
PAIR_COLUMNS = [("sentence1", "sentence2"), ("question1", "question2"), ("#1 String", "#2 String"),
                ("question", "sentence"), ("text_a", "text_b"), ("premise", "hypothesis")]
SINGLE_COLUMNS = ["sentence", "text", "text_a", "sentence1", "review", "content"]
LABEL_COLUMNS = ["label", "gold_label", "score", "is_duplicate", "Quality", "labels", "target"]


@dataclass
class TextExample:
    text_a: str
    text_b: str | None = None
    label: str | None = None


def _rows(path: str, has_header: bool) -> tuple[list[str] | None, list, str]:
    """Rows of a TSV/CSV/JSONL file; returns (header or None, rows, format)."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json", ".ndjson"):
        rows = []
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: not a JSON object per line ({e.msg}); "
                                     "write one JSON object per line (JSON lines)") from None
                if not isinstance(obj, dict):
                    raise InputError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
                rows.append(obj)
        return None, rows, "jsonl"
    if ext not in (".tsv", ".csv", ".txt"):
        raise InputError(f"{path}: unknown extension {ext!r}; use .tsv (GLUE layout), .csv or .jsonl")
    with open(path, encoding="utf-8-sig", newline="") as f:
        if ext == ".csv":
            rows = list(csv.reader(f))
        else:
            # GLUE TSVs contain unbalanced quotes (MNLI, QQP): quotes are ordinary characters
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if has_header:
        if not rows:
            raise InputError(f"{path}: empty file")
        return [c.strip() for c in rows[0]], rows[1:], ext[1:]
    return None, rows, ext[1:]


def _pick(header, wanted, candidates, path, what, flag):
    """Column index (TSV/CSV) or key (JSONL) for `what`."""
    if wanted is not None:
        if header is None and str(wanted).isdigit():
            return int(wanted)
        if header is not None:
            if wanted in header:
                return header.index(wanted)
            if str(wanted).isdigit():
                return int(wanted)
            raise InputError(f"{path}: no column {wanted!r} for {what} (columns: {header}); fix {flag}")
        return wanted
    if header is None:
        return None
    for c in candidates:
        if c in header:
            return header.index(c)
    raise InputError(f"{path}: cannot tell which column holds {what} (columns: {header}); "
                     f"name it with {flag}")


def read_text_file(path: str, pair: bool = False, text_column=None, text_b_column=None,
                   label_column=None, has_header: bool = True, require_label: bool = True
                   ) -> list[TextExample]:
    """Sentence (pair) examples from a TSV/CSV/JSONL file. Columns may be given by name or
    0-based index; with a header they default to GLUE's names. Without a header the default
    layout is `label, text` (`label, text_a, text_b` for pairs)."""
    header, rows, fmt = _rows(path, has_header)
    if fmt == "jsonl":
        keys = set().union(*(r.keys() for r in rows)) if rows else set()
        header = sorted(keys)
    if not rows:
        raise InputError(f"{path}: no examples")
    if header is None:
        ia = int(text_column) if text_column is not None else 1
        ib = (int(text_b_column) if text_b_column is not None else 2) if pair else None
        il = int(label_column) if label_column is not None else 0
    else:
        if pair and text_column is None and text_b_column is None:
            for a, b in PAIR_COLUMNS:
                if a in header and b in header:
                    text_column, text_b_column = a, b
                    break
            else:
                raise InputError(f"{path}: cannot find two text columns among {header}; name them "
                                 "with --text-column and --text-b-column")
        ia = _pick(header, text_column, SINGLE_COLUMNS, path, "the text", "--text-column")
        ib = _pick(header, text_b_column, [], path, "the second text", "--text-b-column") if pair else None
        il = None
        if require_label or label_column is not None or any(c in header for c in LABEL_COLUMNS):
            try:
                il = _pick(header, label_column, LABEL_COLUMNS, path, "the label", "--label-column")
            except InputError:
                if require_label:
                    raise
    out = []
    for n, row in enumerate(rows, 2 if has_header and fmt != "jsonl" else 1):
        if fmt == "jsonl":
            get = lambda i: row.get(header[i]) if isinstance(i, int) else row.get(i)  # noqa: E731
        else:
            def get(i, row=row):
                return row[i] if i < len(row) else None
        a = get(ia)
        b = get(ib) if pair else None
        lab = get(il) if il is not None else None
        if a is None or (pair and b is None) or (require_label and lab is None):
            raise InputError(f"{path}: line {n} has {len(row)} fields; expected the text"
                             f"{' columns' if pair else ' column'} and a label (check the delimiter "
                             "and the column flags)")
        out.append(TextExample(str(a).strip(), None if b is None else str(b).strip(),
                               None if lab is None else str(lab).strip()))
    return out


@dataclass
class TaggedSentence:
    tokens: list[str]
    tags: list[str]


def read_conll(path: str) -> list[TaggedSentence]:
    """CoNLL-style token-per-line file: token in the first column, tag in the last, a blank
    (or whitespace-only) line between sentences, `-DOCSTART-` lines ignored."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    sents, toks, tags = [], [], []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                if toks:
                    sents.append(TaggedSentence(toks, tags))
                    toks, tags = [], []
                continue
            if parts[0] == "-DOCSTART-":
                continue
            if len(parts) < 2:
                raise InputError(f"{path}:{n}: expected 'TOKEN ... TAG' (whitespace-separated), got "
                                 f"{line.strip()!r}")
            tag = parts[-1]
            if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
                raise InputError(f"{path}:{n}: tag {tag!r} is not BIO (O, B-TYPE or I-TYPE); "
                                 "convert the file to IOB2 tags")
            toks.append(parts[0])
            tags.append(tag)
    if toks:
        sents.append(TaggedSentence(toks, tags))
    if not sents:
        raise InputError(f"{path}: no sentences")
    return sents


@dataclass
class QAExample:
    qid: str
    question: str
    context: str
    answers: list[tuple[str, int]] = field(default_factory=list)  # (text, char start)
    is_impossible: bool = False


def read_squad(path: str, require_answers: bool = True) -> tuple[list[QAExample], str]:
    """Examples of a SQuAD v1.1/v2.0 JSON file and its version string. A test file (questions
    without answers, to predict) is read with require_answers=False."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8-sig") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise InputError(f"{path}: expected SQuAD JSON {{'version': ..., 'data': [articles]}}")
    out, fixed = [], 0
    for a, article in enumerate(doc["data"]):
        for p, para in enumerate(article.get("paragraphs", [])):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            if "context" not in para or "qas" not in para:
                raise InputError(f"{where}: needs 'context' and 'qas'")
            ctx = para["context"]
            for qa in para["qas"]:
                if "id" not in qa or "question" not in qa:
                    raise InputError(f"{where}: a question lacks 'id' or 'question'")
                answers = []
                for ans in qa.get("answers", []):
                    text, start = ans.get("text", ""), ans.get("answer_start", -1)
                    if ctx[start:start + len(text)] != text:
                        # a few official answers are off by some characters: take the nearest match
                        hits = [i for i in range(len(ctx)) if ctx.startswith(text, i)] if text else []
                        if not hits:
                            raise InputError(f"{where}: answer {text!r} of question {qa['id']!r} is not "
                                             "in the context; fix its text or answer_start")
                        start = min(hits, key=lambda i: abs(i - start))
                        fixed += 1
                    answers.append((text, start))
                impossible = bool(qa.get("is_impossible", False))
                if not answers and not impossible and require_answers:
                    raise InputError(f"{where}: question {qa['id']!r} has no answers; mark it "
                                     "'is_impossible': true (SQuAD v2.0) or add its answers")
                out.append(QAExample(str(qa["id"]), qa["question"], ctx, answers, impossible))
    if fixed:
        log.warning("%s: %d answer_start offsets did not match their text; used the nearest match", path, fixed)
    if not out:
        raise InputError(f"{path}: no questions")
    return out, str(doc.get("version", "v1.1"))
