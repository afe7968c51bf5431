"""NSP pair builder: equal to a reference written in the structure of google-research/bert's
create_instances_from_document (token lists, not spans) and statistically right over thousands of
pairs."""
import math

import numpy as np
import pytest

from data_prep.nsp import document_pairs, document_rng
from data_prep.pairs import PAIR_DTYPE, PairIndex


def _synthetic_corpus(n_docs=3000, seed=0):
    rng = np.random.default_rng(seed)
    doc_count = rng.integers(1, 25, size=n_docs)
    sent_lens = rng.integers(1, 40, size=int(doc_count.sum())).astype(np.int32)
    doc_first = np.concatenate([[0], np.cumsum(doc_count)[:-1]]).astype(np.int64)
    return doc_first, doc_count.astype(np.int64), sent_lens


def _reference_instances(all_documents, document_index, max_seq_length, short_seq_prob, rng):
    """Token-level pairs as google-research/bert builds them, before truncation."""
    document = all_documents[document_index]
    max_num_tokens = max_seq_length - 3
    target_seq_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_seq_length = rng.randint(2, max_num_tokens)
    instances = []
    current_chunk, current_length = [], 0
    i = 0
    while i < len(document):
        segment = document[i]
        current_chunk.append(segment)
        current_length += len(segment)
        if i == len(document) - 1 or current_length >= target_seq_length:
            if current_chunk:
                a_end = 1
                if len(current_chunk) >= 2:
                    a_end = rng.randint(1, len(current_chunk) - 1)
                tokens_a = [t for seg in current_chunk[:a_end] for t in seg]
                tokens_b = []
                if len(current_chunk) == 1 or rng.random() < 0.5:
                    is_random_next = True
                    target_b_length = target_seq_length - len(tokens_a)
                    for _ in range(10):
                        random_document_index = rng.randint(0, len(all_documents) - 1)
                        if random_document_index != document_index:
                            break
                    random_document = all_documents[random_document_index]
                    random_start = rng.randint(0, len(random_document) - 1)
                    for j in range(random_start, len(random_document)):
                        tokens_b.extend(random_document[j])
                        if len(tokens_b) >= target_b_length:
                            break
                    i -= len(current_chunk) - a_end
                else:
                    is_random_next = False
                    tokens_b = [t for seg in current_chunk[a_end:] for t in seg]
                instances.append((tokens_a, tokens_b, is_random_next))
            current_chunk, current_length = [], 0
        i += 1
    return instances


def test_pairs_equal_reference_token_lists():
    doc_first, doc_count, sent_lens = _synthetic_corpus(600, seed=1)
    # Every token is its own global position, so spans can be turned back into token lists.
    offsets = np.concatenate([[0], np.cumsum(sent_lens)])
    sentence_tokens = [list(range(offsets[k], offsets[k + 1])) for k in range(len(sent_lens))]
    all_documents = [sentence_tokens[f:f + n] for f, n in zip(doc_first, doc_count)]
    docs = np.arange(len(doc_count))
    for seq_length in (16, 64, 128):
        for d in range(len(doc_count)):
            ref = _reference_instances(all_documents, d, seq_length, 0.1, document_rng(7, seq_length, 0, d))
            recs, _ = document_pairs(d, int(doc_first[d]), sent_lens[doc_first[d]:doc_first[d] + doc_count[d]].tolist(),
                                     document_rng(7, seq_length, 0, d), seq_length - 3, 0.1, docs, doc_first,
                                     doc_count, sent_lens)
            got = [([t for s in sentence_tokens[a:a + ac] for t in s], [t for s in sentence_tokens[b:b + bc] for t in s], bool(r))
                   for a, b, ac, bc, r in recs]
            assert got == ref, (seq_length, d)


def _build(seq_length, n_docs=4000, short_seq_prob=0.1, seed=3):
    doc_first, doc_count, sent_lens = _synthetic_corpus(n_docs, seed=seed)
    docs = np.arange(n_docs)
    recs, chunk_sizes = [], []
    n_short = 0
    n_docs_used = 0
    for d in docs:
        if doc_count[d] < 2:
            continue
        r, target = document_pairs(int(d), int(doc_first[d]), sent_lens[doc_first[d]:doc_first[d] + doc_count[d]].tolist(),
                                   document_rng(seed, seq_length, 0, int(d)), seq_length - 3, short_seq_prob, docs,
                                   doc_first, doc_count, sent_lens, chunk_sizes)
        recs.extend(r)
        n_short += target < seq_length - 3
        n_docs_used += 1
    return np.array(recs, dtype=PAIR_DTYPE), np.array(chunk_sizes), n_short, n_docs_used, (doc_first, doc_count, sent_lens)


def _within_binomial(k, n, p, z=4.0):
    return abs(k - n * p) <= z * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("seq_length", [32, 128])
def test_nsp_statistics(seq_length):
    recs, chunk_sizes, n_short, n_docs, (doc_first, doc_count, sent_lens) = _build(seq_length)
    assert len(recs) > 3000
    multi = chunk_sizes >= 2
    # Random-next is a fair coin for chunks of 2+ sentences; one-sentence chunks always take a random B.
    assert _within_binomial(int(recs["is_random"][multi].sum()), int(multi.sum()), 0.5)
    assert recs["is_random"][~multi].all()
    # The short target is drawn once per document (as in the original) with probability 0.1.
    assert _within_binomial(n_short, n_docs, 0.1)

    doc_end = doc_first + doc_count
    doc_of = np.repeat(np.arange(len(doc_count)), doc_count)
    a_doc = doc_of[recs["a_start"]]
    b_doc = doc_of[recs["b_start"]]
    assert (recs["a_count"] >= 1).all() and (recs["b_count"] >= 1).all()
    # Spans never cross a document boundary.
    assert (recs["a_start"] + recs["a_count"] <= doc_end[a_doc]).all()
    assert (recs["b_start"] + recs["b_count"] <= doc_end[b_doc]).all()
    rand = recs["is_random"] == 1
    assert (a_doc[rand] != b_doc[rand]).all(), "random B must come from another document"
    assert (recs["b_start"][~rand] == recs["a_start"][~rand] + recs["a_count"][~rand]).all()
    # A chunk stops as soon as it reaches the target: without its last sentence it is shorter than
    # seq_length - 3 (the rest is cut at load time), and B never exceeds what A left over by more
    # than one sentence.
    cum = np.concatenate([[0], np.cumsum(sent_lens, dtype=np.int64)])
    def span_len(start, count):
        return cum[start + count] - cum[start]
    nr = ~rand
    chunk_tokens = span_len(recs["a_start"][nr], recs["a_count"][nr] + recs["b_count"][nr])
    last = sent_lens[recs["b_start"][nr] + recs["b_count"][nr] - 1]
    assert (chunk_tokens - last < seq_length - 3).all()
    b_tokens = span_len(recs["b_start"][rand], recs["b_count"][rand])
    b_last = sent_lens[recs["b_start"][rand] + recs["b_count"][rand] - 1]
    assert (b_tokens - b_last < seq_length - 3).all()


def test_short_seq_prob_zero_and_one():
    _, _, n_short, _, _ = _build(64, n_docs=500, short_seq_prob=0.0)
    assert n_short == 0
    _, _, n_short, n_docs, _ = _build(64, n_docs=500, short_seq_prob=1.0)
    # randint(2, 61) hits 61 (= full target) with probability 1/60
    assert n_short >= 0.95 * n_docs


def _pipeline_pairs(tmp_path, doc_first, doc_count, sent_lens, workers, dupe_factor):
    from data_prep.pipeline import PrepConfig, _build_pairs

    out = tmp_path / f"w{workers}d{dupe_factor}"
    out.mkdir(parents=True)
    cfg = PrepConfig(inputs=["unused"], output_dir=str(out), vocab="unused", seq_lengths=[64], seed=11,
                     valid_fraction=0.125, dupe_factor=dupe_factor, workers=workers)
    doc_idx = np.concatenate([[0], np.cumsum(doc_count)])
    names, counts = _build_pairs(cfg, str(out), sent_lens, doc_idx)
    return {s: PairIndex(str(out / names["64"][s])).pairs for s in ("train", "valid")}, counts["64"]


def test_pipeline_pairs_stay_in_split_are_deterministic_and_counted_per_round(tmp_path, monkeypatch):
    import data_prep.pipeline
    from data_prep.pipeline import split_documents

    monkeypatch.setattr(data_prep.pipeline, "PAIR_BLOCK", 37)  # many tasks, written back in order
    doc_first, doc_count, sent_lens = _synthetic_corpus(800, seed=5)
    doc_of = np.repeat(np.arange(800), doc_count)
    one, c1 = _pipeline_pairs(tmp_path, doc_first, doc_count, sent_lens, workers=1, dupe_factor=2)
    two, c2 = _pipeline_pairs(tmp_path, doc_first, doc_count, sent_lens, workers=2, dupe_factor=2)
    single, c_single = _pipeline_pairs(tmp_path, doc_first, doc_count, sent_lens, workers=1, dupe_factor=1)
    splits = dict(zip(("train", "valid"), split_documents(doc_count, 0.125, 11)))
    for name, docs in splits.items():
        recs = one[name]
        assert recs.tobytes() == two[name].tobytes()
        assert set(np.unique(doc_of[recs["a_start"]])) <= set(docs.tolist())
        assert set(np.unique(doc_of[recs["b_start"]])) <= set(docs.tolist())
        # Two dupe rounds draw different choices; round 0 is the dupe_factor=1 run exactly.
        n0 = len(single[name])
        assert recs[:n0].tobytes() == single[name].tobytes() and recs[n0:].tobytes() != recs[:n0].tobytes()
        # Counts are per round: the short-target documents of round 0, out of the split's documents.
        assert c1[name]["documents"] == c_single[name]["documents"] == len(docs)
        assert c1[name]["short_target_documents"] == c_single[name]["short_target_documents"] > 0
        assert c1[name]["short_target_documents"] <= len(docs)
        assert c1[name]["pairs"] == len(recs) and c1 == c2


def test_pair_tasks_are_bounded_by_sentences_as_well_as_documents():
    from data_prep.nsp import pair_tasks

    sentences = np.array([3, 2, 8000, 2, 2, 1, 9000, 1, 1, 1])
    tasks = pair_tasks(len(sentences), 2, block=4, sentences=sentences, max_sentences=5)
    runs = [(lo, hi) for dupe, lo, hi in tasks if dupe == 0]
    # contiguous, covering every document once, in order; dupe-major
    assert [t[1:] for t in tasks if t[0] == 1] == runs and [t[0] for t in tasks] == [0] * len(runs) + [1] * len(runs)
    # a run ends at the document that takes it to 5 sentences (3 + 2 exactly: (0, 2)); a long
    # document is a run alone, or ends the run it joins
    assert runs == [(0, 2), (2, 3), (3, 6), (6, 7), (7, 10)]
    # ... or after `block` documents, whichever comes first
    assert pair_tasks(10, 1, block=4, sentences=np.ones(10, int), max_sentences=100) == [(0, 0, 4), (0, 4, 8), (0, 8, 10)]
    # without sentence counts: runs of `block` documents, as before
    assert pair_tasks(10, 1, block=4) == [(0, 0, 4), (0, 4, 8), (0, 8, 10)]
    assert pair_tasks(0, 2, block=4, sentences=np.zeros(0, int), max_sentences=5) == []
    with pytest.raises(ValueError, match="9 sentence counts for 10 documents"):
        pair_tasks(10, 1, block=4, sentences=sentences[:9], max_sentences=5)


def test_pipeline_pair_tasks_are_bounded_and_do_not_change_the_bytes(tmp_path, monkeypatch):
    import data_prep.pipeline

    rng = np.random.default_rng(9)
    doc_count = rng.integers(1, 25, size=400)
    doc_count[::7] *= 40  # some long documents
    doc_first = np.concatenate([[0], np.cumsum(doc_count)[:-1]]).astype(np.int64)
    sent_lens = rng.integers(1, 40, size=int(doc_count.sum())).astype(np.int32)
    default, c_default = _pipeline_pairs(tmp_path / "a", doc_first, doc_count, sent_lens, workers=1, dupe_factor=2)
    held = []  # records each task held, with its documents' sentences
    task = data_prep.pipeline._pair_task

    def recording(t):
        recs, short = task(t)
        docs = data_prep.pipeline._PAIR_STATE[t[1]][t[2][1]:t[2][2]]
        held.append((len(recs), int(doc_count[docs].sum()), int(doc_count[docs].max())))
        return recs, short

    monkeypatch.setattr(data_prep.pipeline, "_pair_task", recording)
    monkeypatch.setattr(data_prep.pipeline, "PAIR_BLOCK_SENTENCES", 300)
    bounded, c_bounded = _pipeline_pairs(tmp_path / "b", doc_first, doc_count, sent_lens, workers=1, dupe_factor=2)
    for split in ("train", "valid"):
        assert len(default[split]) > 0 and default[split].tobytes() == bounded[split].tobytes()
    assert c_default == c_bounded
    assert len(held) > 2 * 2 * 10  # many runs per split and round (one of 2048 documents without the bound)
    for n_records, n_sentences, longest in held:
        assert n_sentences < 300 + longest and n_records <= n_sentences
