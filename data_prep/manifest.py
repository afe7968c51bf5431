"""manifest.json: the one writer and reader of a data_prep directory's table of contents.

data_prep writes it last, atomically, so its presence means the directory is complete; every
consumer (pretraining's config check and dataset, `data_prep.verify`, the test helper) reads it
through `read()`, which returns a typed `Manifest` or raises `ManifestError`: missing, unreadable,
of another `format_version`, or lacking what a reader needs. The file is the JSON of
`Manifest.to_dict()` (keys sorted, indent 2); the keys are listed in docs/interfaces.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .atomic import atomic_json, os_error
from .errors import DataPrepError

FORMAT_VERSION = 1
FILENAME = "manifest.json"
TOKENIZER_TYPES = ("wordpiece", "sentencepiece")
# The special tokens every sample needs ([PAD], [CLS], [SEP], [MASK]); data_prep also records unk.
REQUIRED_SPECIALS = ("pad", "cls", "sep", "mask")


class ManifestError(DataPrepError, ValueError):
    """manifest.json missing, unreadable, of another format_version or malformed; the message names
    the file and says what to do (re-run data_prep)."""


class ManifestMissing(ManifestError, FileNotFoundError):
    """No manifest.json (or no directory): data_prep did not finish there."""


def path(data_dir: str) -> str:
    return os.path.join(data_dir, FILENAME)


@dataclass(frozen=True)
class TokenizerInfo:
    """The `tokenizer` section: the directory's copy of the tokenizer that encoded the corpus."""

    type: str  # "wordpiece" (vocab.txt) | "sentencepiece" (.model)
    file: str  # its name inside the data directory
    vocab_size: int
    special_ids: dict  # {"pad", "cls", "sep", "mask"[, "unk"]} -> token id
    lower_case: Optional[bool] = None
    sha256: Optional[str] = None

    def path(self, data_dir: str) -> str:
        return os.path.join(data_dir, self.file)

    @classmethod
    def from_dict(cls, d: Any, source: str = FILENAME) -> "TokenizerInfo":
        if not isinstance(d, dict):
            raise ManifestError(f"{source}: 'tokenizer' section missing or not an object; re-run data_prep")
        special_ids = d.get("special_ids") or {}
        if not isinstance(special_ids, dict):
            raise ManifestError(f"{source}: tokenizer.special_ids is not an object; re-run data_prep")
        missing = [k for k in REQUIRED_SPECIALS if k not in special_ids]
        if missing:
            raise ManifestError(f"{source}: tokenizer.special_ids lacks {missing}; re-run data_prep")
        vocab_size = d.get("vocab_size")
        if not _is_int(vocab_size) or vocab_size <= 0:
            raise ManifestError(f"{source}: tokenizer.vocab_size = {vocab_size!r} must be a positive integer")
        kind = d.get("type")
        if kind not in TOKENIZER_TYPES:
            raise ManifestError(f"{source}: tokenizer.type = {kind!r}; expected 'wordpiece' or 'sentencepiece'")
        for name, idx in special_ids.items():
            if not _is_int(idx) or not 0 <= idx < vocab_size:
                raise ManifestError(f"{source}: tokenizer.special_ids.{name} = {idx!r} is not an id below {vocab_size}")
        file = d.get("file")
        if not isinstance(file, str) or not file:
            raise ManifestError(f"{source}: tokenizer.file = {file!r} must name the tokenizer file; re-run data_prep")
        return cls(type=kind, file=file, vocab_size=vocab_size, special_ids=dict(special_ids),
                   lower_case=d.get("lower_case"), sha256=d.get("sha256"))


@dataclass(frozen=True)
class Counts:
    """The `counts` section (informative: what the run produced)."""

    input_files: Optional[int] = None
    documents: Optional[int] = None
    sentences: Optional[int] = None
    tokens: Optional[int] = None
    pairs: dict = field(default_factory=dict)  # {"<L>": {split: {"pairs", "documents", "short_target_documents"}}}


@dataclass(frozen=True)
class Manifest:
    """A finished data_prep directory: where the corpus, the pair indexes and the tokenizer are,
    with the counts, the arguments and the checksums of the run."""

    corpus: str  # path prefix of the Megatron indexed dataset, relative to the directory
    pairs: dict  # {"<seq length>": {"train": file, "valid": file}}
    tokenizer: TokenizerInfo
    counts: Counts = field(default_factory=Counts)
    dropped: dict = field(default_factory=dict)  # what cleaning removed or cut, by kind
    # Optional (absent from older manifests): per key of `dropped`, its first few cases, each
    # {"file", "line" (1-based, where the record or document starts, in the whole file even when
    # it was read in parts), "excerpt"[, "error"]}.
    dropped_examples: dict = field(default_factory=dict)
    args: dict = field(default_factory=dict)  # the PrepConfig fields that decide the output
    seed: Optional[int] = None
    sentence_splitter: Optional[str] = None
    versions: dict = field(default_factory=dict)  # libraries that decide the output bytes
    files: dict = field(default_factory=dict)  # file name -> SHA-256
    format_version: int = FORMAT_VERSION

    @property
    def seq_lengths(self) -> list[int]:
        """The sequence lengths with pair indexes, ascending."""
        return sorted(int(k) for k in self.pairs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, source: str = FILENAME) -> "Manifest":
        if not isinstance(d, dict):
            raise ManifestError(f"{source}: not a JSON object; re-run data_prep")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(f"{source}: format_version {version!r}, this code reads {FORMAT_VERSION}; "
                                "re-run data_prep with this version of the code")
        pairs = d.get("pairs") or {}
        if not (isinstance(pairs, dict) and all(
                isinstance(k, str) and k.isdigit() and isinstance(v, dict)
                and all(isinstance(s, str) and isinstance(f, str) for s, f in v.items()) for k, v in pairs.items())):
            raise ManifestError(f"{source}: 'pairs' must map sequence lengths to {{split: file}}; re-run data_prep")
        counts = d.get("counts") or {}
        if not isinstance(counts, dict):
            raise ManifestError(f"{source}: 'counts' is not an object; re-run data_prep")
        known = {f.name for f in dataclasses.fields(Counts)}
        sections = {}
        for name in ("dropped", "dropped_examples", "args", "versions", "files"):
            sections[name] = d.get(name) or {}
            if not isinstance(sections[name], dict):
                raise ManifestError(f"{source}: '{name}' is not an object; re-run data_prep")
        return cls(
            corpus=str(d.get("corpus", "corpus")),
            pairs=pairs,
            tokenizer=TokenizerInfo.from_dict(d.get("tokenizer"), source),
            counts=Counts(**{k: v for k, v in counts.items() if k in known}),
            seed=d.get("seed"),
            sentence_splitter=d.get("sentence_splitter"),
            **sections,
        )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read(data_dir: str) -> Manifest:
    """The manifest of a finished data_prep directory; ManifestError otherwise."""
    p = path(data_dir)
    if not os.path.isdir(data_dir):
        raise ManifestMissing(f"{data_dir}: no such directory (create it with `python -m data_prep ... "
                              f"--output-dir {data_dir}`)")
    try:
        with open(p, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ManifestMissing(f"{p}: missing, so data_prep did not finish in {data_dir} (it writes {FILENAME} "
                              f"last); re-run data_prep with --output-dir {data_dir} to complete it") from None
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or UTF-8
        raise ManifestError(f"{p}: unreadable ({e}); re-run data_prep") from None
    return Manifest.from_dict(raw, p)


def write(out_dir: str, manifest: Manifest) -> None:
    """Write (atomically) `out_dir/manifest.json`: the last file of a data_prep run."""
    atomic_json(path(out_dir), manifest.to_dict())


def invalidate(out_dir: str) -> None:
    """Remove `out_dir/manifest.json` before a run rewrites the directory: until the new one lands,
    the directory is incomplete and every reader says so."""
    p = path(out_dir)
    if os.path.lexists(p):
        try:
            os.remove(p)
        except OSError as e:
            raise os_error(p, "remove the old manifest", e) from e
