"""Building, opening and searching indexes through the library API, on real files."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import faiss
import numpy as np
import pytest
from helpers import DATASET, tree_digest, write_jsonl

from indexer import Index, IndexNotFoundError, IndexSettings, ModelError, SourceError, WriteOptions, build_index, index_info, layout


def test_sample_queries_find_their_product_in_top_3(sample_index, sample_queries):
    index = Index(sample_index)
    results = index.search_many([q["query"] for q in sample_queries], k=3)
    misses = [q["query"] for q, hits in zip(sample_queries, results) if q["product_id"] not in [h.id for h in hits]]
    assert misses == []


def test_hits_carry_cosine_score_text_and_metadata(sample_index, encoder):
    index = Index(sample_index)
    hits = index.search("espresso machine with milk frother", k=5)
    assert len(hits) == 5
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    best = hits[0]
    assert best.text.startswith("Espresso Machine with Milk Frother")
    assert set(best.metadata) == {"category", "price"}
    expected = float(encoder.encode_texts(["espresso machine with milk frother"])[0] @ encoder.encode_texts([best.text])[0])
    assert best.score == pytest.approx(expected, abs=1e-5)


def test_search_many_equals_single_searches(sample_index):
    index = Index(sample_index)
    questions = ["robot vacuum", "guitar for a beginner", "keep coffee hot"]
    batch = index.search_many(questions, k=4)
    for question, hits in zip(questions, batch):
        single = index.search(question, k=4)
        assert [h.id for h in hits] == [h.id for h in single]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in single], atol=1e-5)


def test_k_larger_than_index_returns_every_document(sample_index):
    assert len(Index(sample_index).search("anything", k=500)) == 99


def test_sqlite_key_is_faiss_id_and_vectors_are_the_texts(sample_index, encoder):
    manifest = layout.read_manifest(layout.version_dir(sample_index, layout.current_version(sample_index)))
    assert len(manifest.segments) == 1  # a build is one segment
    folder = layout.segment_dir(sample_index, manifest.segments[0])
    faiss_index = faiss.read_index(str(folder / layout.VECTORS))
    db = sqlite3.connect(folder / layout.DOCUMENTS)
    rows = db.execute("SELECT key, id, text, metadata FROM documents ORDER BY key").fetchall()
    # Sealed whole: no journal or WAL left beside it for a reader (immutable, lock-free) to miss.
    assert not [p.name for p in folder.iterdir() if p.name.startswith(layout.DOCUMENTS + "-")]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] != "wal"
    assert faiss_index.ntotal == len(rows) == 99
    assert isinstance(faiss_index, faiss.IndexIDMap2)
    assert faiss.downcast_index(faiss_index.index).metric_type == faiss.METRIC_INNER_PRODUCT
    keys = np.array([r[0] for r in rows])
    stored = np.vstack([faiss_index.reconstruct(int(k)) for k in keys])
    np.testing.assert_allclose(stored, encoder.encode_texts([r[2] for r in rows]), atol=1e-5)
    source_ids = [json.loads(line)["product_id"] for line in (DATASET / "corpus.jsonl").read_text().splitlines()]
    assert [r[1] for r in rows] == source_ids
    assert json.loads(rows[0][3]).keys() == {"category", "price"}


@pytest.mark.parametrize("vectors", ["float32", "int8"])
def test_a_sealed_segment_lists_each_of_its_files_with_its_sha256_and_size(tmp_path, tiny_model, vectors):
    # The structure's files are checksummed while SQLite finishes (EarlyChecksums), the rest at the seal: all alike.
    path = tmp_path / "idx"
    build_index(write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": f"document {i} about {i % 7}"} for i in range(300)]),
                path, IndexSettings(model=str(tiny_model), vectors=vectors))
    folder = layout.segment_dir(path, "s000001")
    meta = layout.read_segment_meta(folder)
    on_disk = {p.name for p in folder.iterdir()} - {layout.SEGMENT_META}
    assert set(meta.files) == on_disk and len(on_disk) >= (5 if vectors == "float32" else 7)
    for name in on_disk:
        assert meta.files[name] == hashlib.sha256((folder / name).read_bytes()).hexdigest(), name
        assert meta.sizes[name] == (folder / name).stat().st_size, name
    assert layout.segment_problems(folder, meta, checksums=True) == []


def test_manifest_records_how_the_index_was_built(sample_index):
    info = index_info(sample_index)
    settings = info["settings"]
    assert settings["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert (settings["pooling"], settings["max_length"]) == ("mean", 256)
    assert (settings["id_field"], settings["text_fields"]) == ("product_id", ["title", "description"])
    assert settings["source"] == str((DATASET / "corpus.jsonl").resolve())
    assert (info["dimension"], info["count"], info["vectors"], info["rows"]) == (384, 99, 99, 99)
    assert info["format_version"] == layout.FORMAT_VERSION and info["created_at"]
    folder = layout.version_dir(sample_index, info["version"])
    assert info["files"] == {layout.DELETED: layout.file_checksum(folder / layout.DELETED)}
    assert (info["segments"], info["deleted"], info["segment_sizes"]) == (["s000001"], 0, {"s000001": 99})
    segment = layout.read_segment_meta(layout.segment_dir(sample_index, "s000001"))
    assert (segment.count, segment.dimension, segment.vector_index) == (99, 384, "Flat")
    assert set(segment.files) == {layout.DOCUMENTS, layout.VECTORS, layout.KEYS, layout.LENGTHS, layout.HASHES}


def test_mismatched_model_is_refused(sample_index, tiny_model):
    Index(sample_index, model="all-MiniLM-L6-v2")  # the alias of the index's own model is fine
    with pytest.raises(ModelError, match="index was built with model 'sentence-transformers/all-MiniLM-L6-v2'"):
        Index(sample_index, model=str(tiny_model))


def test_index_uses_the_model_in_its_manifest(tmp_path, tiny_model):
    path = tmp_path / "tiny"
    source = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "text": f"document number {i}"} for i in range(20)])
    report = build_index(source, path, IndexSettings(model=str(tiny_model), pooling="cls"))
    assert (report.documents, report.encoded, report.version) == (20, 20, "v000001")
    index = Index(path)
    assert index.encoder.model_name == str(tiny_model.resolve())
    assert (index.encoder.pooling, index.encoder.dimension) == ("cls", 32)
    assert index.search("document number 7", k=1)[0].score == pytest.approx(1.0, abs=1e-5)


def test_bad_source_leaves_existing_index_untouched(tmp_path):
    path = tmp_path / "idx"
    good = write_jsonl(tmp_path / "good.jsonl", [{"id": i, "text": f"text {i}"} for i in range(5)])
    build_index(good, path)
    before = tree_digest(path)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": 1, "text": "fine"}, {"id": 1, "text": "duplicate"}])
    with pytest.raises(SourceError, match="duplicate id '1'"):
        build_index(bad, path)
    assert tree_digest(path) == before
    assert [h.id for h in Index(path).search("text 3", k=1)] == ["3"]


def test_failed_first_build_leaves_nothing_behind(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SourceError, match="no documents"):
        build_index(empty, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_rebuild_publishes_a_new_version_and_keeps_the_last_ones(tmp_path):
    path = tmp_path / "idx"
    for n in range(1, 5):
        source = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "text": f"text {i}"} for i in range(n)])
        report = build_index(source, path, options=WriteOptions(keep=2))
        assert report.version == f"v{n:06d}"
    assert layout.list_versions(path) == ["v000003", "v000004"]
    assert len(Index(path)) == 4
    assert not (path / layout.STAGING).exists()  # a write leaves nothing in staging


def test_opening_a_missing_index_is_a_user_error(tmp_path):
    with pytest.raises(IndexNotFoundError, match="no such index"):
        Index(tmp_path / "nothing")
    (tmp_path / "folder").mkdir()
    with pytest.raises(IndexNotFoundError, match="not an index"):
        Index(tmp_path / "folder")
