"""What a build does while documents stream, beside the model: the vector structure filled in its own thread, the
keyword index fed by its own connection. The results equal building both after the stream; an error in either
thread publishes nothing; a SIGKILL leaves the previous version serving."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import run_cli, tree_digest, write_jsonl

import indexer.store
import indexer.vectors.faiss_index
import indexer.write
from indexer import Index, IndexSettings, build_index, check_index, layout
from indexer.vectors import StreamedBuild
from indexer.vectors.faiss_index import FaissIndex
from indexer.vectors.tuning import exact_neighbours, recall_at_k

WORDS = ["boots", "coffee", "tents", "kettle", "lamp", "rope", "stove", "map", "trail", "river", "cabin", "snow"]


def corpus(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"r{i}", "text": " ".join(WORDS[(i * j + j // 3) % len(WORDS)] for j in range(2 + i % 17)) + f" {i}"}
            for i in range(start, start + n)]


@pytest.fixture
def streamed(monkeypatch):
    """Records whether each build's structure came from its stream; small thresholds, so a few thousand documents stream."""
    monkeypatch.setattr(indexer.vectors.faiss_index, "STREAM_AFTER", 500)
    monkeypatch.setattr(indexer.vectors.faiss_index, "EXACT_UP_TO", 500)
    monkeypatch.setattr(indexer.vectors.faiss_index, "HNSW_UP_TO", 1000)
    taken = []
    finish = StreamedBuild.finish

    def spy(self, structure):
        got = finish(self, structure)
        taken.append(got is not None)
        return got

    monkeypatch.setattr(StreamedBuild, "finish", spy)
    return taken


def rows_and_keywords(path) -> tuple[list[tuple], list[tuple], dict[str, list[tuple]]]:
    (segment,) = (path / layout.SEGMENTS).iterdir()
    with sqlite3.connect(segment / layout.DOCUMENTS) as db:
        rows = db.execute("SELECT * FROM documents ORDER BY key").fetchall()
        sizes = db.execute("SELECT * FROM documents_fts_docsize ORDER BY id").fetchall()
        hits = {word: db.execute("SELECT rowid, round(bm25(documents_fts), 9) FROM documents_fts WHERE documents_fts MATCH ? "
                                 "ORDER BY rowid", [word]).fetchall() for word in WORDS}
    return rows, sizes, hits


def recall(path, seed: int = 0) -> float:
    """recall@10 of the index's structure against exact search, on 100 stored vectors plus noise."""
    (segment,) = (path / layout.SEGMENTS).iterdir()
    meta = layout.read_segment_meta(segment)
    vectors = FaissIndex.load(segment / layout.VECTORS, meta.search_params)
    keys = np.sort(vectors.keys())
    stored = vectors.reconstruct(keys)
    rng = np.random.default_rng(seed)
    queries = stored[rng.choice(len(keys), 100, replace=False)] + rng.normal(size=(100, stored.shape[1])).astype(np.float32) * 0.05
    truth = exact_neighbours(queries, iter([(stored, keys)]), 10)
    return recall_at_k(vectors.search(queries, 10)[1], truth)


@pytest.mark.parametrize("index_type", ["hnsw", "auto"])
def test_a_streamed_structure_serves_as_one_built_after_the_stream(tmp_path, tiny_model, streamed, monkeypatch, index_type):
    source = write_jsonl(tmp_path / "docs.jsonl", corpus(4000))
    settings = IndexSettings(model=str(tiny_model), index_type=index_type)
    build_index(source, tmp_path / "streamed", settings)
    assert streamed == [True]
    monkeypatch.setattr(indexer.write, "streamed_structure", lambda *args, **kwargs: None)  # the structure after the stream
    build_index(source, tmp_path / "after", settings)
    assert streamed == [True, False]
    assert rows_and_keywords(tmp_path / "streamed") == rows_and_keywords(tmp_path / "after")
    with Index(tmp_path / "streamed") as index:
        assert index.manifest.vector_index == ("HNSW32" if index_type == "hnsw" else "IVF64,Flat")
    assert recall(tmp_path / "streamed") >= recall(tmp_path / "after") - 0.01


def test_the_keyword_index_fed_chunk_by_chunk_equals_one_built_in_one_pass(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(indexer.ingest, "CHUNK_SIZE", 37)
    path = tmp_path / "idx"
    build_index(write_jsonl(tmp_path / "docs.jsonl", corpus(900)), path, IndexSettings(model=str(tiny_model)))
    (segment,) = (path / layout.SEGMENTS).iterdir()
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    (copied,) = (copy / layout.SEGMENTS).iterdir()
    with sqlite3.connect(copied / layout.DOCUMENTS) as db:
        db.execute("INSERT INTO documents_fts(documents_fts) VALUES('rebuild')")
    assert rows_and_keywords(path) == rows_and_keywords(copy)
    with sqlite3.connect(segment / layout.DOCUMENTS) as db:  # one b-tree after the seal's merge, and ids indexed
        assert db.execute("SELECT count(*) FROM documents_fts_data WHERE id > 10").fetchone()[0] >= 1
        assert "idx_documents_id" in {row[1] for row in db.execute("PRAGMA index_list(documents)")}


def test_an_error_in_the_structure_thread_publishes_nothing(tmp_path, tiny_model, streamed, monkeypatch):
    path = tmp_path / "idx"
    settings = IndexSettings(model=str(tiny_model), index_type="hnsw")
    build_index(write_jsonl(tmp_path / "first.jsonl", corpus(50)), path, settings)
    before = tree_digest(path)
    add = FaissIndex.add

    def failing(self, vectors, keys):
        import threading

        if threading.current_thread().name == "ingest-structure":
            raise MemoryError("simulated: no memory for the graph")
        return add(self, vectors, keys)

    monkeypatch.setattr(FaissIndex, "add", failing)
    with pytest.raises(MemoryError, match="simulated"):
        build_index(write_jsonl(tmp_path / "docs.jsonl", corpus(3000)), path, settings)
    assert tree_digest(path) == before and not (path / layout.STAGING).exists()


def test_an_error_in_the_keyword_thread_publishes_nothing(tmp_path, tiny_model, monkeypatch):
    path = tmp_path / "idx"
    settings = IndexSettings(model=str(tiny_model))
    build_index(write_jsonl(tmp_path / "first.jsonl", corpus(50)), path, settings)
    before = tree_digest(path)
    monkeypatch.setattr(indexer.store, "_INDEX_KEYWORDS", "INSERT INTO no_such_table SELECT value FROM json_each(?)")
    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        build_index(write_jsonl(tmp_path / "docs.jsonl", corpus(3000)), path, settings)
    assert tree_digest(path) == before and not (path / layout.STAGING).exists()


def test_sigkill_during_a_streamed_build_leaves_the_previous_version_serving(tmp_path, tiny_model):
    path = tmp_path / "idx"
    run_cli("build", str(write_jsonl(tmp_path / "old.jsonl", corpus(300))), "--index", str(path), "--model", str(tiny_model),
            "--index-type", "hnsw")
    source = write_jsonl(tmp_path / "new.jsonl", corpus(30_000, start=1000))
    rng = np.random.default_rng(3)
    for attempt in range(2):
        writer = subprocess.Popen([sys.executable, "-m", "indexer", "build", str(source), "--index", str(path), "--model",
                                   str(tiny_model), "--index-type", "hnsw"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not (path / layout.STAGING).exists() and writer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the write has begun
        time.sleep(float(rng.uniform(0.5, 2.5)))  # past 10,000 documents: the graph is being built
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        assert layout.current_version(path) == "v000001", attempt
        assert check_index(path)["problems"] == []
        with Index(path) as index:
            assert len(index) == 300 and index.search("boots coffee", k=3)
