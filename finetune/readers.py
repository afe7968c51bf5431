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
import re
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class InputError(ValueError):
    """Bad user data or flags; the CLI prints the message without a traceback."""


def limit(items: list, n: int | None) -> list:
    """The first `n` items (--max-train-examples / --max-eval-examples); all when n is None or 0."""
    return items[:n] if n else items


# GLUE's TSV headers (SST-2, CoLA test, MRPC, QQP, STS-B, MNLI, QNLI, RTE, WNLI) and common
# generic names, in the order they are tried when the user names no column.
PAIR_COLUMNS = [("sentence1", "sentence2"), ("question1", "question2"), ("#1 String", "#2 String"),
                ("question", "sentence"), ("text_a", "text_b"), ("premise", "hypothesis")]
SINGLE_COLUMNS = ["sentence", "text", "text_a", "sentence1", "review", "content"]
ID_COLUMNS = ["index", "idx", "id"]
LABEL_COLUMNS = ["label", "gold_label", "score", "is_duplicate", "Quality", "labels", "target"]


@dataclass
class TextExample:
    text_a: str
    text_b: str | None = None
    label: str | None = None
    id: str | None = None  # the file's own index/idx/id column (GLUE test.tsv numbers its rows)


class Skips:
    """Bad records of one file, skipped rather than aborting the read: counted by reason, with
    a few locations kept for the warning."""

    def __init__(self, path: str, strict: bool = False):
        self.path, self.strict = path, strict  # strict: a bad record is an error (files to predict)
        self.counts: dict[str, int] = {}
        self.where: dict[str, list[str]] = {}

    def add(self, reason: str, where: int | str) -> None:
        """`where`: a line number, or a description of the record."""
        if self.strict:
            place = f"{self.path}:{where}" if isinstance(where, int) else f"{self.path}: {where}"
            raise InputError(f"{place}: {reason}; every record of a file to predict needs a prediction, "
                             "so fix or remove it")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        seen = self.where.setdefault(reason, [])
        if len(seen) < 2:
            seen.append(f"{os.path.basename(self.path)}:{where}" if isinstance(where, int) else where)

    def finish(self, kept: int, into: dict | None, fix: str) -> None:
        """Warn about the skipped records and add their counts to `into`; a file whose every
        record was bad is an error (`fix` says what to change)."""
        summary = "; ".join(f"{r}: {n} (e.g. {', '.join(self.where[r])})" for r, n in self.counts.items())
        if not kept:
            if not summary:
                raise InputError(f"{self.path}: no examples")
            raise InputError(f"{self.path}: every record was skipped: {summary}; {fix}")
        if summary:
            log.warning("%s: skipped %s", self.path, summary)
        if into is not None:
            for r, n in self.counts.items():
                into[r] = into.get(r, 0) + n


def prefixed(**counts: dict) -> dict[str, int]:
    """One skip-count dict from several files: {"train: reason": n, "eval: reason": m}."""
    return {f"{name}: {r}": n for name, c in counts.items() for r, n in c.items()}


def _rows(path: str, has_header: bool, skips: Skips) -> tuple[list[str] | None, list, str]:
    """Rows of a TSV/CSV/JSONL file as (line number, row); returns (header or None, rows, format)."""
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
                except json.JSONDecodeError:
                    obj = None
                if not isinstance(obj, dict):
                    skips.add("line that is not a JSON object", n)
                    continue
                rows.append((n, obj))
        return None, rows, "jsonl"
    if ext not in (".tsv", ".csv", ".txt"):
        raise InputError(f"{path}: unknown extension {ext!r}; use .tsv (GLUE layout), .csv or .jsonl")
    with open(path, encoding="utf-8-sig", newline="") as f:
        if ext == ".csv":
            reader = csv.reader(f)
        else:
            # GLUE TSVs contain unbalanced quotes (MNLI, QQP): quotes are ordinary characters
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    if has_header:
        if not rows:
            raise InputError(f"{path}: empty file")
        return [c.strip() for c in rows[0][1]], rows[1:], ext[1:]
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


def _pair_columns(header: list[str]) -> tuple[str, str] | None:
    return next(((a, b) for a, b in PAIR_COLUMNS if a in header and b in header), None)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _looks_like_labels(values: list[str]) -> bool:
    """A column of class labels rather than sentences: all numbers, or (enough rows to
    tell) single words of which few are distinct."""
    values = [v.strip() for v in values if v.strip()]
    if not values:
        return False
    if all(_is_number(v) for v in values):
        return True
    return len(values) >= 10 and len(set(values)) * 10 <= len(values) and not any(" " in v for v in values)


def _looks_like_identifier(values: list[str]) -> bool:
    """A column with (nearly) one value per row, as ids have; numeric scores with decimals
    (STS-B-like regression targets) are exempt."""
    values = [v.strip() for v in values]
    if len(values) < 10 or len(set(values)) < 0.9 * len(values):
        return False
    return not (all(_is_number(v) for v in values) and any("." in v for v in values))


# GLUE CoLA's train/dev files have no header: source, label (0/1), the author's mark, sentence
COLA_COLUMNS = {"label": 1, "text": 3}


def _is_cola(rows: list) -> bool:
    four = [r for _, r in rows if len(r) == 4]
    return (len(four) >= 0.9 * len(rows) and all(r[1].strip() in ("0", "1") for r in four)
            and all(len(r[2].strip()) <= 2 and not r[2].strip().isalnum() for r in four)
            and not _looks_like_labels([r[3] for r in four]))


def _index(value, flag: str, path: str) -> int:
    if not str(value).isdigit():
        raise InputError(f"{path}: {flag} {value!r}: the file has no header (--no-header), so give a "
                         "0-based column index")
    return int(value)


def _no_header_columns(path, rows, pair, text_column, text_b_column, label_column, require_label):
    """(text, text_b, label) indices of a header-less file: the flags, else CoLA's layout when the
    file has it, else `label, text[, text_b]`, refused when the defaults look wrong for the data."""
    if not pair and text_column is None and label_column is None and _is_cola(rows):
        log.info("%s: GLUE CoLA layout (source, label, mark, sentence): label from column %d, text "
                 "from column %d", path, COLA_COLUMNS["label"], COLA_COLUMNS["text"])
        return COLA_COLUMNS["text"], None, COLA_COLUMNS["label"]
    ia = _index(text_column, "--text-column", path) if text_column is not None else 1
    ib = (_index(text_b_column, "--text-b-column", path) if text_b_column is not None else 2) if pair else None
    il = _index(label_column, "--label-column", path) if label_column is not None else 0
    column = lambda i: [r[i] for _, r in rows if i < len(r)]  # noqa: E731
    if text_column is None or label_column is None:
        log.info("%s: no header: label from column %d, text from column %d%s", path, il, ia,
                 f", second text from column {ib}" if pair else "")
    if require_label and label_column is None and _looks_like_identifier(column(il)):
        raise InputError(f"{path}: with --no-header the label is column {il} by default, but it looks "
                         f"like an identifier ({len(set(column(il)))} distinct values in {len(rows)} rows, "
                         f"e.g. {column(il)[0]!r}); name the columns with --label-column and --text-column")
    if text_column is None and _looks_like_labels(column(ia)):
        raise InputError(f"{path}: with --no-header the text is column {ia} by default, but it holds "
                         f"labels (e.g. {column(ia)[0]!r}); name the columns with --text-column and "
                         "--label-column")
    return ia, ib, il


def read_text_file(path: str, pair: bool | None = False, text_column=None, text_b_column=None,
                   label_column=None, has_header: bool = True, require_label: bool = True,
                   skipped: dict | None = None, strict: bool = False) -> list[TextExample]:
    """Sentence (pair) examples from a TSV/CSV/JSONL file. Columns may be given by name or
    0-based index; with a header they default to GLUE's names. Without a header the layout is
    GLUE CoLA's when the file has it, else `label, text` (`label, text_a, text_b` for pairs).
    `pair=None`: pairs when the file has two text columns (a pair header, or `text_b_column`).
    Rows lacking a column (or the label) are skipped and counted into `skipped` (reason -> n);
    `strict` (a file to predict, whose every row needs a prediction) makes them errors."""
    skips = Skips(path, strict)
    header, rows, fmt = _rows(path, has_header, skips)
    if fmt == "jsonl":
        keys = set().union(*(r.keys() for _, r in rows)) if rows else set()
        header = sorted(keys)
    if pair is None:
        pair = text_b_column is not None or (header is not None and _pair_columns(header) is not None)
    if not rows:
        skips.finish(0, skipped, "write one JSON object per line (JSON lines)")
    if header is None:
        ia, ib, il = _no_header_columns(path, rows, pair, text_column, text_b_column, label_column,
                                        require_label)
    else:
        if pair and text_column is None and text_b_column is None:
            found = _pair_columns(header)
            if found is None:
                raise InputError(f"{path}: cannot find two text columns among {header}; name them "
                                 "with --text-column and --text-b-column")
            text_column, text_b_column = found
        ia = _pick(header, text_column, SINGLE_COLUMNS, path, "the text", "--text-column")
        ib = _pick(header, text_b_column, [], path, "the second text", "--text-b-column") if pair else None
        il = None
        if require_label or label_column is not None or any(c in header for c in LABEL_COLUMNS):
            try:
                il = _pick(header, label_column, LABEL_COLUMNS, path, "the label", "--label-column")
            except InputError:
                if require_label:
                    raise
    # GLUE test files number their rows; submissions are keyed by that number
    iid = next((header.index(k) for k in ID_COLUMNS if k in header), None) if header is not None else None
    out = []
    for n, row in rows:
        if fmt == "jsonl":
            get = lambda i: row.get(header[i]) if isinstance(i, int) else row.get(i)  # noqa: E731
        else:
            def get(i, row=row):
                return row[i] if i < len(row) else None
        a = get(ia)
        b = get(ib) if pair else None
        lab = get(il) if il is not None else None
        if a is None or (pair and b is None) or (require_label and lab is None):
            skips.add("row with missing fields", n)
            continue
        if lab is not None and not str(lab).strip() and require_label:
            skips.add("row with an empty label", n)
            continue
        rid = get(iid) if iid is not None else None
        out.append(TextExample(str(a).strip(), None if b is None else str(b).strip(),
                               None if lab is None else str(lab).strip(), None if rid is None else str(rid).strip()))
    skips.finish(len(out), skipped, f"expected the text{' columns' if pair else ' column'} and a label "
                 "in every row (check the delimiter and the column flags)")
    return out


@dataclass
class TaggedSentence:
    tokens: list[str]
    tags: list[str]


# IOB1/IOB2 (B-, I-), BIOES/IOBES (S-, E-) and BILOU (U-, L-) prefixes
_TAG = re.compile(r"^([BIESLU])-(\S+)$")
_BILOU = {"L": "E", "U": "S"}


def to_iob2(tags: list[str]) -> list[str]:
    """One sentence's tags in IOB2, entities unchanged: an entity starts at B-/S-, and at an
    I-/E- that does not continue an open entity of its type (IOB1 starts entities with I-);
    it ends after E-/S- (BIOES) or before anything that does not continue it."""
    out, prev, kind = [], "O", ""
    for tag in tags:
        if tag == "O":
            out.append("O")
            prev, kind = "O", ""
            continue
        p, t = _TAG.match(tag).groups()
        p = _BILOU.get(p, p)
        continues = p in ("I", "E") and prev in ("B", "I") and t == kind
        out.append(f"{'I' if continues else 'B'}-{t}")
        prev, kind = p, t
    return out


def read_conll(path: str, skipped: dict | None = None, tagged: bool = True) -> list[TaggedSentence]:
    """CoNLL-style token-per-line file: token in the first column, tag in the last, a blank
    (or whitespace-only) line between sentences, `-DOCSTART-` lines ignored. IOB1, BIOES
    (IOBES) and BILOU tags are converted to IOB2; a tag of no scheme is an error. A sentence
    with a tag-less line is skipped and counted into `skipped` (reason -> n). `tagged=False`: a
    file to tag, whose tokens are read and further columns ignored (every tag "O")."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    skips = Skips(path)
    sents, toks, tags, bad = [], [], [], None
    schemes, rewritten = set(), 0

    def close():
        nonlocal toks, tags, bad, rewritten
        if bad is not None:
            skips.add("sentence with a line lacking its tag", bad)
        elif toks:
            iob2 = to_iob2(tags)
            rewritten += sum(a != b for a, b in zip(tags, iob2))
            sents.append(TaggedSentence(toks, iob2))
        toks, tags, bad = [], [], None

    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                close()
                continue
            if parts[0] == "-DOCSTART-":
                continue
            if not tagged:
                toks.append(parts[0])
                tags.append("O")
                continue
            if len(parts) < 2:
                bad = n if bad is None else bad
                continue
            tag = parts[-1]
            m = _TAG.match(tag)
            if tag != "O" and m is None:
                raise InputError(f"{path}:{n}: tag {tag!r} is not O or PREFIX-TYPE with a BIO, BIOES or "
                                 "BILOU prefix (B-, I-, E-, S-, L-, U-); fix the tag or the column order "
                                 "(token first, tag last)")
            if m is not None:
                schemes.add("BIOES" if m.group(1) in "ESLU" else "IOB")
            toks.append(parts[0])
            tags.append(tag)
    close()
    skips.finish(len(sents), skipped, "write 'TOKEN ... TAG' per line (whitespace-separated), a blank "
                 "line between sentences")
    if rewritten:
        name = "BIOES/BILOU" if "BIOES" in schemes else "IOB1 (entities starting with I-)"
        log.info("%s: %s tags converted to IOB2 (%d tags rewritten; entities unchanged)", path, name, rewritten)
    return sents


@dataclass
class QAExample:
    qid: str
    question: str
    context: str
    answers: list[tuple[str, int]] = field(default_factory=list)  # (text, char start)
    is_impossible: bool = False


def _locate(ctx: str, text: str, start) -> int | None:
    """Char start of `text` in `ctx`: `start` when it matches, else the nearest occurrence (a few
    official answers are off by some characters); None when the text is not in the context."""
    if isinstance(start, int) and start >= 0 and text and ctx[start:start + len(text)] == text:
        return start
    hits = [i for i in range(len(ctx)) if ctx.startswith(text, i)] if text else []
    if not hits:
        return None
    return min(hits, key=lambda i: abs(i - start)) if isinstance(start, int) else hits[0]


SQUAD_PURPOSES = ("train", "eval", "test")


def read_squad(path: str, skipped: dict | None = None, purpose: str = "train") -> tuple[list[QAExample], str]:
    """Examples of a SQuAD v1.1/v2.0 JSON file and its version string, read for `purpose`:

    - "train": an answer whose text is not in its context is dropped, and a question left without
      answers skipped (as BERT's run_squad does: "Could not find answer"), both counted into
      `skipped` (reason -> n); a question with no answers must be marked is_impossible.
    - "eval": every question is kept with every answer text, as the official evaluation scores
      them (only the texts are compared; spans are not needed).
    - "test": questions to predict; answers, if any, are ignored."""
    if purpose not in SQUAD_PURPOSES:
        raise ValueError(f"purpose {purpose!r}: one of {SQUAD_PURPOSES}")
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8-sig") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise InputError(f"{path}: expected SQuAD JSON {{'version': ..., 'data': [articles]}}")
    skips = Skips(path)
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
                answers, lost = [], 0
                for ans in qa.get("answers", []) if purpose != "test" else []:
                    text, start = ans.get("text", ""), ans.get("answer_start", -1)
                    found = _locate(ctx, text, start)
                    if found is None and purpose == "eval":
                        answers.append((text, -1))  # scored by its text
                        continue
                    if found is None:
                        lost += 1
                        continue
                    fixed += found != start
                    answers.append((text, found))
                impossible = bool(qa.get("is_impossible", False))
                if lost and not answers and not impossible:
                    skips.add("question whose answer is not in its context", f"question {qa['id']!r}")
                    continue
                if lost:
                    skips.add("answer not in its context (the question's other answers kept)",
                              f"question {qa['id']!r}")
                if not answers and not impossible and purpose != "test":
                    raise InputError(f"{where}: question {qa['id']!r} has no answers; mark it "
                                     "'is_impossible': true (SQuAD v2.0) or add its answers")
                out.append(QAExample(str(qa["id"]), qa["question"], ctx, answers, impossible))
    if fixed:
        log.warning("%s: %d answer_start offsets did not match their text; used the nearest match", path, fixed)
    skips.finish(len(out), skipped, "each answer's text must occur in its paragraph's context")
    return out, str(doc.get("version", "v1.1"))
