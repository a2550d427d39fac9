"""ANN structures: choice by size and memory, recall against exact search, and edits for every type."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import write_jsonl

from indexer import Index, IndexSettings, build_index, check_index, delete_documents, index_info, upsert_documents
from indexer.errors import ArgumentError
from indexer.vectors import (
    VectorIndex,
    VectorSpool,
    build_from_spool,
    choose_structure,
    create,
    exact_neighbours,
    parse_memory,
    recall_at_k,
)


def clustered_vectors(n: int, dimension: int, seed: int) -> np.ndarray:
    """Unit vectors around 200 fixed centres: shaped like real embeddings, unlike uniform noise."""
    centres = np.random.default_rng(dimension).normal(size=(200, dimension))
    rng = np.random.default_rng(seed)
    vectors = centres[rng.integers(0, 200, n)] + 0.6 * rng.normal(size=(n, dimension))
    vectors = vectors.astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize(
    "index_type, count, dimension, memory, expected",
    [
        ("flat", 10**7, 384, None, "Flat"),
        ("hnsw", 1000, 384, None, "HNSW32"),
        ("ivf", 1_000_000, 384, None, "IVF4096,Flat"),
        ("ivfpq", 1_000_000, 384, None, "IVF4096,PQ48"),
        ("auto", 50_000, 384, None, "Flat"),
        ("auto", 200_000, 384, None, "HNSW32"),
        ("auto", 500_000, 384, None, "IVF512,Flat"),
        ("auto", 1_000_000, 384, None, "IVF1024,Flat"),
        ("auto", 500_000, 384, "300MB", "IVF2048,SQ8"),
        ("auto", 500_000, 384, "50MB", "IVF2048,PQ64"),
        ("auto", 3_000_000, 384, None, "IVF8192,SQ8"),
        ("auto", 50_000, 384, "10MB", "IVF1024,PQ192"),
        ("IVF64,PQ8x4fs", 1000, 64, None, "IVF64,PQ8x4fs"),
    ],
)
def test_structure_follows_size_and_memory(index_type, count, dimension, memory, expected):
    assert choose_structure(index_type, count, dimension, parse_memory(memory)) == expected


def test_memory_sizes_and_bad_factory_strings():
    assert parse_memory("512MB") == 512 * 2**20 and parse_memory("1.5GiB") == int(1.5 * 2**30) and parse_memory("100") == 100
    with pytest.raises(ArgumentError, match="not a size"):
        parse_memory("lots")
    with pytest.raises(ArgumentError, match="not an index type"):
        create(8, "NoSuchThing42")


def spooled(tmp_path, vectors: np.ndarray) -> VectorSpool:
    spool = VectorSpool(tmp_path, vectors.shape[1])
    for start in range(0, len(vectors), 5000):
        spool.append(vectors[start : start + 5000], np.arange(start, min(start + 5000, len(vectors))) + 100)
    spool.close()
    return spool


@pytest.mark.parametrize("structure", ["HNSW32", "IVF128,Flat", "IVF128,SQ8"])
def test_tuned_defaults_reach_recall_095_on_new_queries(tmp_path, structure):
    data = clustered_vectors(20_000, 64, seed=1)
    spool = spooled(tmp_path, data)
    vectors, tuning = build_from_spool(spool, structure)
    assert len(vectors) == 20_000 and tuning["tuned_recall"] >= 0.95
    queries = clustered_vectors(300, 64, seed=2)  # held out: not the tuning queries
    truth = exact_neighbours(queries, spool.chunks(), 10)
    _, found = vectors.search(queries, 10)
    assert recall_at_k(found, truth) >= 0.95
    _, cheap = vectors.search(queries, 10, nprobe=1, efSearch=1)
    assert recall_at_k(cheap, truth) < recall_at_k(found, truth)


@pytest.mark.slow
def test_product_quantisation_reports_the_recall_it_reaches(tmp_path):
    data = clustered_vectors(20_000, 64, seed=3)
    spool = spooled(tmp_path, data)
    # 4-bit codes (fast to train: IVF128,PQ16 with 8-bit codes trains for 15 s here).
    vectors, tuning = build_from_spool(spool, "IVF128,PQ16x4")
    queries = clustered_vectors(300, 64, seed=4)
    truth = exact_neighbours(queries, spool.chunks(), 10)
    _, found = vectors.search(queries, 10)
    # 8 bytes per 64-d vector cap recall below the target; tuning stops where more probes stop helping.
    assert 0.3 < tuning["tuned_recall"] < 0.95
    assert recall_at_k(found, truth) > tuning["tuned_recall"] - 0.15
    _, everything = vectors.search(queries, 10, nprobe=128)
    assert recall_at_k(everything, truth) - recall_at_k(found, truth) < 0.02


def test_exact_neighbours_streams_like_flat_search(tmp_path):
    data = clustered_vectors(3000, 16, seed=5)
    spool = spooled(tmp_path, data)
    flat = create(16)
    flat.add(data, np.arange(3000) + 100)
    queries = clustered_vectors(20, 16, seed=6)
    assert recall_at_k(flat.search(queries, 10)[1], exact_neighbours(queries, spool.chunks(), 10)) == 1.0


@pytest.mark.parametrize("index_type", ["hnsw", "ivf", "IVF4,SQ8"])
def test_upsert_and_delete_work_for_every_structure(tmp_path, tiny_model, index_type):
    path = tmp_path / "idx"
    source = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "text": f"document number {i} about topic {i % 7}"} for i in range(400)])
    build_index(source, path, IndexSettings(model=str(tiny_model), index_type=index_type))
    info = index_info(path)
    assert info["vector_index"] != "Flat" and info["count"] == 400
    upsert_documents(path, write_jsonl(tmp_path / "u.jsonl", [{"id": 5, "text": "replaced five"}, {"id": 999, "text": "brand new"}]))
    delete_documents(path, ["7", "8"])
    index = Index(path)
    assert len(index) == 399
    hits = {h.id: h.text for h in index.search("replaced five", k=400, nprobe=10**6, ef_search=1000)}
    assert hits["5"] == "replaced five" and hits["999"] == "brand new"
    assert "7" not in hits and "8" not in hits and len(hits) == 399
    assert check_index(path, all_versions=True)["problems"] == []


class NumpyExact:
    """A second vector library, as a new ANN module would be: exact search in numpy, saved as one .npz file."""

    def __init__(self, dimension: int, vectors: np.ndarray | None = None, keys: np.ndarray | None = None):
        self.search_params: dict[str, int] = {}
        self.is_trained = True
        self._vectors = np.empty((0, dimension), np.float32) if vectors is None else vectors
        self._keys = np.empty(0, np.int64) if keys is None else keys

    @classmethod
    def create(cls, dimension: int, spec: str) -> NumpyExact:
        if spec != "exact":
            raise ArgumentError(f"numpy has no structure {spec!r}")
        return cls(dimension)

    @classmethod
    def load(cls, path, search_params=None, mmap=False) -> NumpyExact:
        with np.load(path) as saved:
            return cls(saved["vectors"].shape[1], saved["vectors"], saved["keys"])

    def save(self, path) -> None:
        with open(path, "wb") as f:
            np.savez(f, vectors=self._vectors, keys=self._keys)

    dimension = property(lambda self: self._vectors.shape[1])
    keeps_vectors = True
    is_flat = False

    def __len__(self) -> int:
        return len(self._keys)

    def training_sample(self) -> int:
        return 0

    def train(self, sample: np.ndarray) -> None:
        pass

    def add(self, vectors: np.ndarray, keys: np.ndarray) -> None:
        self._vectors = np.vstack([self._vectors, vectors]).astype(np.float32)
        self._keys = np.concatenate([self._keys, keys]).astype(np.int64)

    def all_vectors(self) -> np.ndarray:
        return self._vectors

    def reconstruct(self, keys: np.ndarray) -> np.ndarray:
        return self._vectors[[int(np.flatnonzero(self._keys == k)[0]) for k in keys]]

    def keys(self) -> np.ndarray:
        return self._keys

    def search(self, queries, k, allowed=None, excluded=None, **knobs):
        scores = np.asarray(queries, np.float32) @ self._vectors.T
        out = np.isin(self._keys, allowed, invert=True) if allowed is not None else np.isin(self._keys, excluded if excluded is not None else [])
        scores[:, out] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        found = np.take_along_axis(scores, order, axis=1)
        keys = np.where(np.isfinite(found), self._keys[order], -1)
        return np.where(np.isfinite(found), found, -3.4028235e38).astype(np.float32), keys

    def tune(self, sample, vector_chunks, k=10) -> dict[str, float]:
        return {}


def test_a_vector_library_is_one_class_and_one_registry_line(tmp_path, tiny_model, monkeypatch):
    from helpers import records

    from indexer.vectors import LIBRARIES, FaissIndex

    monkeypatch.setitem(LIBRARIES, "numpy", NumpyExact)
    assert isinstance(FaissIndex.create(8, "Flat"), VectorIndex) and isinstance(NumpyExact(8), VectorIndex)
    source = write_jsonl(tmp_path / "source.jsonl", records(60))
    by_numpy, by_faiss = tmp_path / "numpy", tmp_path / "faiss"
    build_index(source, by_numpy, IndexSettings(model=str(tiny_model), index_type="numpy:exact"))
    build_index(source, by_faiss, IndexSettings(model=str(tiny_model)))
    more = write_jsonl(tmp_path / "more.jsonl", records(3, start=60))
    upsert_documents(by_numpy, more)
    upsert_documents(by_faiss, more)
    delete_documents(by_numpy, ["doc5"])
    delete_documents(by_faiss, ["doc5"])
    with Index(by_numpy) as numpy_index, Index(by_faiss) as faiss_index:
        # The build's segment is the library's; a small upsert's is Flat, as with any index type (segment_structure).
        built, upserted = numpy_index._served.segments
        assert (built.meta.vector_index, upserted.meta.vector_index) == ("numpy:exact", "Flat")
        assert isinstance(built.vectors, NumpyExact) and isinstance(upserted.vectors, FaissIndex)
        for question in ("document number five", "document 61", "a lamp"):
            got = [(h.id, round(h.score, 5)) for h in numpy_index.search(question, k=8)]
            assert got == [(h.id, round(h.score, 5)) for h in faiss_index.search(question, k=8)] and got
            assert "doc5" not in [i for i, _ in got]
    assert check_index(by_numpy)["problems"] == []
    with pytest.raises(ArgumentError, match="numpy has no structure 'hnsw'"):
        build_index(source, tmp_path / "bad", IndexSettings(model=str(tiny_model), index_type="numpy:hnsw"))
