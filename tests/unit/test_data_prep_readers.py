"""Input discovery and bad-input clean-up: every case is either counted or a clear error."""
import gzip
import json
import os

import pytest

from data_prep import readers
from data_prep.errors import DataPrepError


def _read(files, fmt="auto"):
    st = readers.ReadStats()
    docs = [lines for _, lines in readers.iter_documents([str(f) for f in files], st, fmt)]
    return docs, st


def test_text_blank_line_documents_and_gz(tmp_path):
    body = "First doc line one.\nLine two.\n\n\n  \nSecond doc.\n\nThird\n"
    (tmp_path / "a.txt").write_text(body)
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write(body)
    docs, st = _read([tmp_path / "a.txt", tmp_path / "b.txt.gz"])
    expected = [["First doc line one.", "Line two."], ["Second doc."], ["Third"]]
    assert docs == expected * 2
    assert st.counts == {}


def test_jsonl_and_bad_lines(tmp_path):
    lines = [json.dumps({"text": "Doc one.\nPara two."}), "{not json", json.dumps({"other": 1}), "",
             json.dumps({"text": ""}), json.dumps([1, 2]), json.dumps({"text": "Last\u0000 doc."})]
    p = tmp_path / "x.jsonl"
    p.write_text("\n".join(lines) + "\n")
    docs, st = _read([p])
    assert docs == [["Doc one.", "Para two."], ["Last doc."]]
    assert st.counts["bad_json_lines"] == 1
    assert st.counts["json_lines_without_text"] == 2
    assert st.counts["empty_documents"] == 1
    assert st.counts["nul_bytes"] == 1


def test_invalid_utf8_and_nul_bytes_are_cleaned_and_counted(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"good line\nbad \xff\xfe bytes here\nnul\x00\x00 here\n\nnext doc\n")
    docs, st = _read([p])
    assert docs == [["good line", "bad \ufffd\ufffd bytes here", "nul here"], ["next doc"]]
    assert st.counts["invalid_utf8_lines"] == 1
    assert st.counts["nul_bytes"] == 2


def test_empty_and_blank_only_files_are_reported(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n\n   \n\t\n")
    (tmp_path / "ok.txt").write_text("hello\n")
    files = readers.expand_inputs([str(tmp_path)])
    assert [f.rsplit("/", 1)[1] for f in files] == ["blank.txt", "empty.txt", "ok.txt"]
    docs, st = _read(files)
    assert docs == [["hello"]]
    assert sorted(f.rsplit("/", 1)[1] for f in st.empty_files) == ["blank.txt", "empty.txt"]


def test_long_line_is_cut_at_whitespace(tmp_path):
    words = ["w%d" % (i % 1000) for i in range(60_000)]
    line = " ".join(words)
    assert len(line) > readers.MAX_LINE_CHARS
    p = tmp_path / "long.txt"
    p.write_text(line + "\n")
    docs, st = _read([p])
    assert len(docs) == 1 and len(docs[0]) >= 2
    assert all(len(x) <= readers.MAX_LINE_CHARS for x in docs[0])
    # Cuts happen at spaces: no word is split, nothing is lost.
    assert " ".join(docs[0]).split() == words
    assert st.counts["long_lines_cut"] == 1


def test_missing_paths_and_bad_gzip_are_clear_errors(tmp_path):
    with pytest.raises(DataPrepError, match=r"--input .*nope.txt: no such file"):
        readers.expand_inputs([str(tmp_path / "nope.txt")])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.bin").write_bytes(b"\x00")
    with pytest.raises(DataPrepError, match="directory has no"):
        readers.expand_inputs([str(tmp_path / "d")])
    full = gzip.compress(b"some text\n" * 10000)
    (tmp_path / "t.txt.gz").write_bytes(full[: len(full) // 2])
    with pytest.raises(DataPrepError, match=r"t.txt.gz: corrupt or truncated gzip"):
        _read([tmp_path / "t.txt.gz"])


def test_newline_free_input_is_read_in_bounded_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 1000)
    words = ["wörd%d" % i for i in range(3000)] + ["é" * 1500]  # and one 3000-byte "word"
    p = tmp_path / "one_line.txt"
    p.write_text(" ".join(words) + "\n\nsecond doc\n")
    docs, st = _read([p])
    assert len(docs) == 2 and docs[1] == ["second doc"]
    # Pieces end at spaces or character boundaries: nothing lost, no word or UTF-8 character cut
    # (the 3000-byte word is the only one split, at character boundaries).
    assert "".join(docs[0]).replace(" ", "") == "".join(words)
    assert " ".join(docs[0]).split()[:3000] == words[:3000]
    assert st.counts["oversized_lines_read_in_pieces"] > 20 and st.counts["invalid_utf8_lines"] == 0
    j = tmp_path / "x.jsonl"
    j.write_text(json.dumps({"text": "x " * 2000}) + "\n" + json.dumps({"text": "kept"}) + "\n")
    docs, st = _read([j])
    assert docs == [["kept"]] and st.counts["oversized_json_lines"] == 1


def test_unreadable_or_vanishing_inputs_are_clear_errors(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("one doc.\n")
    (d / "b.txt").symlink_to(tmp_path / "gone.txt")  # dangling, and not the last file found
    (d / "c.txt").write_text("another doc.\n")
    with pytest.raises(DataPrepError, match=r"b.txt: cannot read \(No such file or directory\)"):
        readers.expand_inputs([str(d)])
    (d / "b.txt").unlink()
    files = readers.expand_inputs([str(d)])
    os.remove(files[1])  # vanishes between discovery and reading
    with pytest.raises(DataPrepError, match=r"c.txt: cannot read \(No such file or directory\)"):
        _read(files)


def test_read_error_mid_file_is_a_clear_error(tmp_path, monkeypatch):
    p = tmp_path / "a.txt"
    p.write_text("line\n" * 10)

    class Failing:
        def readline(self, n):
            raise OSError(5, "Input/output error")

        def close(self):
            pass

    monkeypatch.setattr(readers, "_open_binary", lambda path: Failing())
    with pytest.raises(DataPrepError, match=r"a.txt: cannot read \(Input/output error\)"):
        _read([p])


def _parts_docs(path, fmt, part_bytes, max_doc_bytes):
    """The documents of every part of `path`, in order, as the pipeline reads them."""
    from types import SimpleNamespace

    from data_prep.pipeline import _part_range

    cfg = SimpleNamespace(part_bytes=part_bytes, input_format=fmt)
    n = -(-os.path.getsize(path) // part_bytes)
    st = readers.ReadStats()  # as the merge adds up the part markers
    docs, ranges = [], []
    for p in range(n):
        rng = _part_range(cfg, str(path), p, n)
        if rng is not None:
            ranges.append(rng)
            part = readers.ReadStats()
            for d in readers.iter_file_documents(str(path), part, fmt, "text", max_doc_bytes, *rng):
                d.line += st.lines  # lines counted from the part's start, as lines of the file
                docs.append(d)
            st.counts.update(part.counts)
            st.add_examples(readers.shift_lines(part.examples, st.lines))
            st.lines += part.lines
    return docs, st, ranges


@pytest.mark.parametrize("fmt", ["text", "jsonl"])
def test_parts_at_document_boundaries_read_the_same_documents(tmp_path, monkeypatch, fmt):
    """Whatever the part size, the parts' documents (and clean-up counts) are the whole file's:
    blank lines of spaces, NULs or U+3000, runs of blank lines, CRLF, bad UTF-8, over-long lines
    read in pieces (text: the piece size lowered to 40 bytes; JSON: some lines over 160 bytes,
    dropped) and pseudo-documents. Line numbers (examples, document starts) count from a part's
    start: shifted by the lines of the parts before, they are the whole file's."""
    import random

    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 40 if fmt == "text" else 160)
    rnd = random.Random(0)
    words = ["alpha", "beta", "gamma.", "délta", "\u3000", "x" * 50, "\x00", "\xff"]
    docs_text = []
    for _ in range(60):
        paras = [" ".join(rnd.choice(words) for _ in range(rnd.randint(1, 12))) for _ in range(rnd.randint(1, 4))]
        docs_text.append(paras)
    path = tmp_path / ("f.jsonl" if fmt == "jsonl" else "f.txt")
    with open(path, "wb") as f:
        for paras in docs_text:
            if fmt == "jsonl":
                f.write((json.dumps({"text": "\n".join(paras)}) + rnd.choice(["\n", "\n\n", "\n \n"])).encode())
            else:
                body = rnd.choice(["\n", "\r\n"]).join(paras).replace("\xff", "").encode("utf-8")
                f.write(body.replace(b"gamma", b"gam\xffma")  # invalid UTF-8
                        + rnd.choice(["\n\n", "\n  \n\n", "\n\x00\n", "\n\u3000\n"]).encode("utf-8"))
    for max_doc in (0, 30):
        whole = readers.ReadStats()
        ref = list(readers.iter_file_documents(str(path), whole, fmt, "text", max_doc))
        assert len(ref) >= 15
        for part_bytes in (7, 64, 333, 1000, 5000):
            docs, st, ranges = _parts_docs(path, fmt, part_bytes, max_doc)
            assert docs == ref and st.counts == whole.counts, (max_doc, part_bytes)
            # Examples and document start lines: the whole file's, once shifted by the earlier parts' lines.
            assert [d.line for d in docs] == [d.line for d in ref], (max_doc, part_bytes)
            assert st.examples == whole.examples and st.lines == whole.lines, (max_doc, part_bytes)
            if part_bytes <= 1000:
                assert len(ranges) > 1


def test_lone_surrogate_json_line_is_cleaned_counted_and_located(tmp_path):
    """Web-scraped JSONL has escapes of half an emoji; every tokenizer refuses them (a TypeError
    from HF tokenizers and sentencepiece, a UnicodeEncodeError from blingfire)."""
    p = tmp_path / "web.jsonl"
    p.write_text("\n".join([
        '{"text": "Good line one."}',
        '{"text": "Broken emoji \\ud83d here."}',
        '{"text": "A whole emoji \\ud83d\\ude00 stays."}',  # a valid pair: one character, not counted
        '{"text": "Low half \\udc00 alone.", "title": "\\ud800"}',  # only the text field matters
        '{"text": "Good line two."}',
    ]) + "\n")
    docs, st = _read([p])
    assert docs == [["Good line one."], ["Broken emoji \ufffd here."], ["A whole emoji \U0001F600 stays."],
                    ["Low half \ufffd alone."], ["Good line two."]]
    assert [d.line for d in docs] == [1, 2, 3, 4, 5]
    for d in docs:
        for line in d:
            line.encode("utf-8")  # what every tokenizer needs: valid Unicode
    assert st.counts == {"lone_surrogate_lines": 2}
    assert st.examples == {"lone_surrogate_lines": [
        {"file": str(p), "line": 2, "excerpt": "Broken emoji \\ud83d here."},
        {"file": str(p), "line": 4, "excerpt": "Low half \\udc00 alone."}]}
    json.dumps(st.examples, ensure_ascii=False).encode("utf-8")  # examples are valid UTF-8 too


def test_every_reason_has_examples_with_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 1000)
    j = tmp_path / "a.jsonl"
    j.write_bytes(b"\n".join([
        b'{"text": "ok"}',                          # 1
        b'{not json',                               # 2
        b'{"other": 1}',                            # 3
        b'',                                        # 4
        b'{"text": ""}',                            # 5
        b'{"text": "nul\\u0000 escaped"}',          # 6
        b'{"text": "bad \xff byte"}',               # 7
        b'{"text": "' + b"y " * 600 + b'"}',        # 8: over MAX_LINE_BYTES
        b'{"text": "still read"}',                  # 9
    ]) + b"\n")
    t = tmp_path / "b.txt"
    t.write_bytes(b"first doc\n\n\nsecond \xed\xa0\xbd doc\nnul\x00 here\n" + b"z " * 700 + b"\n")
    docs, st = _read([j, t])
    assert docs[:5] == [["ok"], ["nul escaped"], ["bad \ufffd byte"], ["still read"], ["first doc"]]
    assert docs[5][:2] == ["second \ufffd\ufffd\ufffd doc", "nul here"] and " ".join(docs[5][2:]).split() == ["z"] * 700
    assert [d.line for d in docs] == [1, 6, 7, 9, 1, 4]  # where each document starts
    where = {reason: [(os.path.basename(e["file"]), e["line"]) for e in cases] for reason, cases in st.examples.items()}
    assert where == {
        "bad_json_lines": [("a.jsonl", 2)],
        "json_lines_without_text": [("a.jsonl", 3)],
        "empty_documents": [("a.jsonl", 5)],
        "nul_bytes": [("a.jsonl", 6), ("b.txt", 5)],
        "invalid_utf8_lines": [("a.jsonl", 7), ("b.txt", 4)],  # CESU-8 surrogate bytes are invalid UTF-8
        "oversized_json_lines": [("a.jsonl", 8)],
        "oversized_lines_read_in_pieces": [("b.txt", 6)],  # counted per piece, one example per line
    }
    assert st.counts["oversized_lines_read_in_pieces"] == 1 and st.counts["nul_bytes"] == 2
    assert st.examples["bad_json_lines"][0]["excerpt"] == "{not json"
    assert st.examples["invalid_utf8_lines"][1]["excerpt"] == "second \ufffd\ufffd\ufffd doc"
    assert st.examples["nul_bytes"][1]["excerpt"] == "nul\x00 here"


def test_examples_are_the_first_few_per_reason(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text("".join("{broken %d\n" % i for i in range(10)))
    q = tmp_path / "y.jsonl"
    q.write_text("{broken again\n")
    _, st = _read([p, q])
    assert st.counts["bad_json_lines"] == 11
    assert [e["line"] for e in st.examples["bad_json_lines"]] == [1, 2, 3][:readers.MAX_EXAMPLES]
    other = readers.ReadStats()
    other.note("bad_json_lines", "z.jsonl", 4, "{z")
    other.note("lone_surrogate_lines", "z.jsonl", 5, "\ud800")
    st.add_examples(other.examples)  # a later file's examples: kept only where there is room
    assert [e["file"] for e in st.examples["bad_json_lines"]] == [str(p)] * readers.MAX_EXAMPLES
    assert st.examples["lone_surrogate_lines"] == [{"file": "z.jsonl", "line": 5, "excerpt": "\\ud800"}]


def test_excerpt_is_centred_on_the_problem():
    text = "x" * 300 + "!" + "y" * 200
    ex = readers.excerpt(text, 300)
    assert len(ex) == readers.EXCERPT_CHARS and ex.index("!") == readers.EXCERPT_CHARS // 3
    assert readers.excerpt(text, 499).endswith("y" * 30)  # near the end: the last characters
    assert readers.excerpt("short\n", 3) == "short"
