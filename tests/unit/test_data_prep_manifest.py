"""data_prep.manifest: the one writer and reader of manifest.json (typed, versioned, one error)."""
import json
import os

import pytest

from data_prep import manifest
from data_prep.errors import DataPrepError
from data_prep.manifest import FORMAT_VERSION, Counts, Manifest, ManifestError, ManifestMissing, TokenizerInfo
from data_prep.verify import verify

TOKENIZER = {"type": "wordpiece", "file": "vocab.txt", "lower_case": True, "vocab_size": 30522, "sha256": "ab" * 32,
             "special_ids": {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}}


def _manifest() -> Manifest:
    return Manifest(
        corpus="corpus",
        pairs={"128": {"train": "pairs_128_train.bin", "valid": "pairs_128_valid.bin"}},
        tokenizer=TokenizerInfo(**TOKENIZER),
        counts=Counts(input_files=1, documents=10, sentences=80, tokens=900,
                      pairs={"128": {"train": {"pairs": 30, "documents": 9, "short_target_documents": 1},
                                     "valid": {"pairs": 3, "documents": 1, "short_target_documents": 0}}}),
        dropped={"empty_documents": 2, "lone_surrogate_lines": 1, "empty_files": []},
        dropped_examples={"lone_surrogate_lines": [{"file": "web.jsonl", "line": 7,
                                                    "excerpt": "Broken emoji \\ud83d here."}]},
        args={"seed": 1234, "seq_lengths": [128]},
        seed=1234,
        sentence_splitter="blingfire",
        versions={"numpy": "2.0"},
        files={"corpus.bin": "00" * 32},
    )


def _write_raw(d, obj) -> str:
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "manifest.json"), "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))
    return str(d)


def test_write_then_read_round_trips_and_the_file_is_sorted_json(tmp_path):
    m = _manifest()
    manifest.write(str(tmp_path), m)
    assert os.listdir(tmp_path) == ["manifest.json"]  # atomic: no temporary file left behind
    assert manifest.read(str(tmp_path)) == m
    text = (tmp_path / "manifest.json").read_text()
    assert text == json.dumps(m.to_dict(), indent=2, sort_keys=True) + "\n"
    raw = json.loads(text)
    assert raw["format_version"] == FORMAT_VERSION == 1
    assert sorted(raw) == ["args", "corpus", "counts", "dropped", "dropped_examples", "files", "format_version",
                           "pairs", "seed", "sentence_splitter", "tokenizer", "versions"]
    assert raw["tokenizer"] == TOKENIZER and raw["counts"]["sentences"] == 80
    assert m.seq_lengths == [128] and m.tokenizer.path("/d") == os.path.join("/d", "vocab.txt")


def test_a_data_prep_directory_reads_back_byte_for_byte(tmp_path):
    from data_prep.testing import build_tiny_dataset

    out = build_tiny_dataset(str(tmp_path / "out"), seq_lengths=(64, 128), n_docs=40)
    text = open(os.path.join(out, "manifest.json")).read()
    m = manifest.read(out)
    assert m.to_dict() == json.loads(text)
    assert m.seq_lengths == [64, 128] and m.tokenizer.type == "wordpiece" and m.counts.documents == 40
    (tmp_path / "again").mkdir()
    manifest.write(str(tmp_path / "again"), m)
    assert (tmp_path / "again" / "manifest.json").read_text() == text


def test_the_minimal_manifest_of_docs_interfaces_reads_with_defaults(tmp_path):
    """What other producers (tests/unit/_pretrain_fixtures.py) write: the keys readers need."""
    d = _write_raw(tmp_path / "min", {"format_version": 1, "corpus": "corpus",
                                      "pairs": {"64": {"train": "a.bin", "valid": "b.bin"}},
                                      "tokenizer": {k: TOKENIZER[k] for k in ("type", "file", "vocab_size", "special_ids")}})
    m = manifest.read(d)
    assert m.counts == Counts() and m.counts.sentences is None and m.files == {} and m.seed is None
    assert m.dropped == {} and m.dropped_examples == {}  # optional: absent from manifests before issue 12
    assert m.tokenizer.lower_case is None and m.tokenizer.special_ids["mask"] == 103


def test_one_error_for_a_missing_unreadable_or_old_manifest(tmp_path):
    assert issubclass(ManifestError, DataPrepError) and issubclass(ManifestError, ValueError)
    with pytest.raises(ManifestMissing, match="nope: no such directory"):
        manifest.read(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestMissing, match=r"manifest.json: missing, so data_prep did not finish .*re-run data_prep"):
        manifest.read(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):  # still a FileNotFoundError for callers that expect one
        manifest.read(str(tmp_path / "empty"))
    with pytest.raises(ManifestError, match=r"manifest.json: unreadable \(.*\); re-run data_prep"):
        manifest.read(_write_raw(tmp_path / "torn", '{"format_version": 1, "cor'))
    raw = _manifest().to_dict()
    for version in (0, 2, None, "1"):
        old = dict(raw, format_version=version)
        with pytest.raises(ManifestError, match=f"format_version {version!r}, this code reads 1; re-run data_prep"):
            manifest.read(_write_raw(tmp_path / f"v{version}", old))
    del raw["format_version"]
    with pytest.raises(ManifestError, match="format_version None"):
        manifest.read(_write_raw(tmp_path / "unversioned", raw))
    with pytest.raises(ManifestError, match="not a JSON object"):
        manifest.read(_write_raw(tmp_path / "list", "[1, 2]"))


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("special_ids"), r"tokenizer.special_ids lacks \['pad', 'cls', 'sep', 'mask'\]"),
    (lambda t: t["special_ids"].pop("mask"), r"tokenizer.special_ids lacks \['mask'\]"),
    (lambda t: t.update(vocab_size=0), "tokenizer.vocab_size = 0 must be a positive integer"),
    (lambda t: t.update(vocab_size=True), "tokenizer.vocab_size = True must be a positive integer"),
    (lambda t: t.update(type="bpe"), "tokenizer.type = 'bpe'; expected 'wordpiece' or 'sentencepiece'"),
    (lambda t: t["special_ids"].update(mask=30522), "tokenizer.special_ids.mask = 30522 is not an id below 30522"),
    (lambda t: t.update(file=""), "tokenizer.file = '' must name the tokenizer file"),
])
def test_a_malformed_tokenizer_section_is_a_manifest_error(tmp_path, change, message):
    raw = _manifest().to_dict()
    change(raw["tokenizer"])
    with pytest.raises(ManifestError, match=message):
        manifest.read(_write_raw(tmp_path, raw))
    with pytest.raises(ManifestError, match="'tokenizer' section missing"):
        manifest.read(_write_raw(tmp_path, dict(raw, tokenizer=None)))


def test_malformed_sections_are_manifest_errors(tmp_path):
    raw = _manifest().to_dict()
    for key, value, message in [("pairs", {"long": {"train": "x"}}, "'pairs' must map sequence lengths"),
                                ("pairs", {"128": ["x"]}, "'pairs' must map sequence lengths"),
                                ("counts", [1], "'counts' is not an object"),
                                ("files", "x", "'files' is not an object"),
                                ("dropped_examples", [1], "'dropped_examples' is not an object")]:
        with pytest.raises(ManifestError, match=message):
            manifest.read(_write_raw(tmp_path, dict(raw, **{key: value})))


def test_invalidate_removes_the_manifest_and_readers_then_say_so(tmp_path):
    manifest.write(str(tmp_path), _manifest())
    manifest.invalidate(str(tmp_path))
    manifest.invalidate(str(tmp_path))  # nothing to remove: fine
    assert not (tmp_path / "manifest.json").exists()
    assert verify(str(tmp_path)) == [f"{tmp_path / 'manifest.json'}: missing, so data_prep did not finish in "
                                     f"{tmp_path} (it writes manifest.json last); re-run data_prep with "
                                     f"--output-dir {tmp_path} to complete it"]
    (tmp_path / "manifest.json").mkdir()
    with pytest.raises(DataPrepError, match=r"manifest.json: cannot remove the old manifest \(Is a directory\)"):
        manifest.invalidate(str(tmp_path))


def test_verify_reports_an_old_manifest(tmp_path):
    d = _write_raw(tmp_path, dict(_manifest().to_dict(), format_version=0))
    assert verify(d) == [f"{os.path.join(d, 'manifest.json')}: format_version 0, this code reads 1; "
                         "re-run data_prep with this version of the code"]
