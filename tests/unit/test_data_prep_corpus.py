"""The streaming shard merge writes the same bytes as megatron-core's IndexedDatasetBuilder.add_index
and reads back through megatron-core's IndexedDataset."""
import numpy as np
import pytest


def _shard(prefix, docs, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for sents in docs:
        b.add_document(np.concatenate(sents), [len(s) for s in sents])
    b.finalize(prefix + ".idx")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_merge_equals_megatron_builder(tmp_path, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from data_prep.corpus import merge_shards

    rng = np.random.default_rng(0)
    all_docs, prefixes = [], []
    for s in range(5):
        docs = [[rng.integers(0, 30000, size=rng.integers(1, 50)) for _ in range(rng.integers(1, 8))]
                for _ in range(rng.integers(1, 20))]
        p = str(tmp_path / f"shard{s}")
        _shard(p, docs, dtype)
        prefixes.append(p)
        all_docs.extend(docs)
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype)
    for p in prefixes:
        ref.add_index(p)
    ref.finalize(str(tmp_path / "ref.idx"))
    merge_shards(prefixes, str(tmp_path / "ours"), dtype)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes(), ext
    ds = IndexedDataset(str(tmp_path / "ours"))
    flat = [s for d in all_docs for s in d]
    assert len(ds) == len(flat) and all((ds[i] == flat[i]).all() for i in range(len(flat)))
    assert ds.document_indices.tolist() == [0] + np.cumsum([len(d) for d in all_docs]).tolist()
