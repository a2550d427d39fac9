"""The pipelined ingest: the same vectors and rows as encoding and storing one document after another, in order.

Chunks are made small here so that many of them are in flight at once in the
reading, encoding and writing threads.
"""

from __future__ import annotations

import json
import sqlite3

import faiss
import numpy as np
import pytest
from helpers import tree_digest, write_jsonl

import indexer.encoder.cpu_kernels
import indexer.ingest
from indexer import Index, IndexNotFoundError, IndexSettings, SourceError, build_index, layout
from indexer.encoder import Encoder, TextTokenizer
from indexer.ingest import ReadAhead
from indexer.sources import Document


def records(n: int) -> list[dict]:
    words = ["boots", "coffee", "tents", "kettle", "lamp", "rope", "stove", "map"]
    return [{"id": f"r{i}", "text": " ".join(words[(i * j) % len(words)] for j in range(1 + i % 23)) + f" {i}", "n": i}
            for i in range(n)]


def stored(path) -> tuple[list[tuple], np.ndarray]:
    """Rows (key, id, text, metadata) and vectors by key of the index's single segment."""
    (segment,) = (path / layout.SEGMENTS).iterdir()
    with sqlite3.connect(segment / layout.DOCUMENTS) as db:
        rows = db.execute("SELECT key, id, text, metadata FROM documents ORDER BY key").fetchall()
    index = faiss.read_index(str(segment / layout.VECTORS))
    return rows, index.reconstruct_batch(np.array([row[0] for row in rows], dtype=np.int64))


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(indexer.ingest, "CHUNK_SIZE", 37)


def test_pipelined_build_equals_a_sequential_reference_bitwise(tmp_path, tiny_model, small_chunks):
    docs = records(400)
    path = tmp_path / "idx"
    # One text per forward pass, so the reference's batches are the build's batches and vectors can match bit for bit.
    report = build_index(write_jsonl(tmp_path / "a.jsonl", docs), path, settings=IndexSettings(model=str(tiny_model), batch_size=1))
    assert report.encoded == len(docs) and set(report.stages) == {"read", "tokenize", "encode", "write", "seal", "structure", "tune"}
    rows, vectors = stored(path)
    encoder = Encoder(str(tiny_model), batch_size=1)
    # The build's encoding threads run one torch thread each; a lone text runs on query_threads, which timing
    # chooses, and oneDNN's bits depend on the thread count.
    encoder.query_threads = 1
    reference = np.vstack([encoder.encode_texts([doc["text"]]) for doc in docs])
    assert rows == [(key, doc["id"], doc["text"], json.dumps({"n": doc["n"]})) for key, doc in enumerate(docs)]
    assert vectors.tobytes() == reference.tobytes()


def test_pipelined_build_with_measured_batches_matches_the_reference(tmp_path, tiny_model, small_chunks):
    docs = records(300)
    path = tmp_path / "idx"
    build_index(write_jsonl(tmp_path / "a.jsonl", docs), path, settings=IndexSettings(model=str(tiny_model)))
    rows, vectors = stored(path)
    encoder = Encoder(str(tiny_model), batch_size=1)
    reference = np.vstack([encoder.encode_texts([doc["text"]]) for doc in docs])
    assert [row[1] for row in rows] == [doc["id"] for doc in docs]
    np.testing.assert_allclose(vectors, reference, atol=1e-6, rtol=0)


def test_a_bad_record_mid_source_publishes_nothing_and_names_its_line(tmp_path, tiny_model, small_chunks):
    path = tmp_path / "idx"
    settings = IndexSettings(model=str(tiny_model))
    build_index(write_jsonl(tmp_path / "good.jsonl", records(50)), path, settings=settings)
    before = tree_digest(path)
    source = write_jsonl(tmp_path / "bad.jsonl", records(300))
    lines = source.read_text().splitlines()
    lines[206] = '{"id": "broken", "text": '  # line 207, in the sixth chunk
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=r"bad\.jsonl:207: malformed JSON"):
        build_index(source, path, settings=settings)
    assert tree_digest(path) == before
    staging = path / layout.STAGING
    assert not staging.exists() or not any(staging.iterdir())
    with Index(path) as index:
        assert len(index) == 50


def test_a_bad_record_read_ahead_in_a_first_build_publishes_nothing_and_names_its_line(tmp_path, tiny_model, small_chunks):
    """A first build reads the first chunks while the model loads (ReadAhead); an error there is the pipeline's error."""
    source = write_jsonl(tmp_path / "bad.jsonl", records(300))
    lines = source.read_text().splitlines()
    lines[100] = '{"id": "broken", "text": '  # line 101, in the third chunk, read ahead
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=r"bad\.jsonl:101: malformed JSON"):
        build_index(source, tmp_path / "idx", settings=IndexSettings(model=str(tiny_model)))
    with pytest.raises(IndexNotFoundError):
        Index(tmp_path / "idx")


def test_a_first_build_reads_ahead_unless_loading_the_model_times_its_forwards(tmp_path, tiny_model, small_chunks, monkeypatch):
    prepare, given = indexer.ingest.CachedEncoder.prepare, []

    def spy(self, texts, tokens=None):  # records which chunks come tokenised already, and prepares them as ever
        given.append(tokens is not None)
        return prepare(self, texts, tokens)

    monkeypatch.setattr(indexer.ingest.CachedEncoder, "prepare", spy)
    source, settings = write_jsonl(tmp_path / "a.jsonl", records(300)), IndexSettings(model=str(tiny_model))
    Encoder(str(tiny_model))  # the choice of forward is made, so the build's model load only uses it
    read_ahead = build_index(source, tmp_path / "one", settings=settings)
    assert given[0] and not given[-1] and len(given) == 9  # the first chunks come read ahead, the rest from the pipeline
    assert read_ahead.stages["read"] > 0 and read_ahead.stages["tokenize"] > 0

    given.clear()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing remembered: this load times the forwards
    monkeypatch.setattr(indexer.encoder.cpu_kernels, "_CHOSEN", {})
    build_index(source, tmp_path / "two", settings=settings)
    assert given == [False] * 9
    (rows, vectors), (rows_again, vectors_again) = stored(tmp_path / "one"), stored(tmp_path / "two")
    assert rows == rows_again
    np.testing.assert_allclose(vectors, vectors_again, atol=1e-5, rtol=0)


def test_read_ahead_gives_the_first_chunks_tokenised_then_the_rest_in_order(tiny_model, small_chunks):
    tokenizer = TextTokenizer(str(tiny_model))
    docs = [Document(d["id"], d["text"]) for d in records(200)]
    ahead = ReadAhead(docs, tokenizer.tokenize, chunks=3)
    ahead._thread.join()  # all three read before the pipeline asks (else it stops reading at its first chunk)
    chunks = list(ahead)
    assert [d for chunk, _ in chunks for d in chunk] == docs and [len(chunk) for chunk, _ in chunks] == [37] * 5 + [15]
    assert [tokens is not None for _, tokens in chunks] == [True] * 3 + [False] * 3
    for chunk, tokens in chunks[:3]:
        assert tokens == tokenizer.tokenize([d.text for d in chunk])


def test_read_ahead_raises_an_error_where_its_chunk_is_reached(tiny_model, small_chunks):
    def documents():
        yield from (Document(d["id"], d["text"]) for d in records(50))
        raise SourceError("source.jsonl:51: malformed JSON")

    ahead = ReadAhead(documents(), TextTokenizer(str(tiny_model)).tokenize)
    ahead._thread.join()  # read ahead up to the error before the pipeline asks
    chunks = iter(ahead)
    first, tokens = next(chunks)
    assert len(first) == 37 and tokens is not None
    with pytest.raises(SourceError, match="source.jsonl:51"):
        next(chunks)


def test_a_failing_writer_stops_the_build(tmp_path, tiny_model, small_chunks, monkeypatch):
    """An error in the writing thread (here a store refusing the fourth chunk) stops the build with that error."""
    from indexer.segments import SegmentWriter

    path = tmp_path / "idx"
    settings = IndexSettings(model=str(tiny_model))
    build_index(write_jsonl(tmp_path / "good.jsonl", records(20)), path, settings=settings)
    before = tree_digest(path)
    add, calls = SegmentWriter.add, []

    def failing_add(self, documents, vectors, **given):
        calls.append(len(documents))
        if len(calls) == 4:
            raise OSError("simulated write failure")
        return add(self, documents, vectors, **given)

    monkeypatch.setattr(SegmentWriter, "add", failing_add)
    with pytest.raises(OSError, match="simulated write failure"):
        build_index(write_jsonl(tmp_path / "more.jsonl", records(400)), path, settings=settings)
    assert len(calls) == 4  # nothing written after the failure
    assert tree_digest(path) == before



@pytest.mark.parametrize("statement_bytes", [None, 1, 60])
def test_a_chunk_is_stored_exactly_as_one_insert_per_row_stores_it(tmp_path, monkeypatch, statement_bytes):
    """The store's insert keeps every string byte for byte (NUL, quotes, backslashes, any script, empty), in
    one statement or split into several (a document alone, or a few)."""
    import indexer.store
    from indexer.store import COLUMNS, DocumentStore, fields_json

    if statement_bytes:
        monkeypatch.setattr(indexer.store, "INSERT_BYTES", statement_bytes)

    docs = [Document("1", "a\x00b", {"k": "x\x00y", "big": 2**62, "f": 1.5e300, "b": True, "none": None}, {"text": "a\x00b"}),
            Document('é"\\', 'emoji 😀 \u2028 \t\n quote" back\\ \x7f \x01 ﻿', {"nested": {"a": [1, "2"]}}, {"t": ["x", "y"]}, "upsert"),
            Document("3", "", {}, {}),
            Document("日本", "テキスト", {"名": "値"}, {"text": "テキスト"})]
    # A chunk whose metadata, fields and origin are each one value in every row (bound once, not cut per row).
    alike = [Document(f"same{n}", f"text{n}", {"k": "x\x00y"}, {"body": f"text{n}"}, "upsert") for n in range(3)]
    docs += alike
    keys = [5, 9, 2**40, 0, 11, 12, 13]
    store = DocumentStore.create(tmp_path / "one.db")
    store.add(keys[:4], docs[:4])
    store.add([], [])
    store.add(keys[4:], alike)
    reference = DocumentStore.create(tmp_path / "rows.db")
    with reference.db.conn:
        for key, d in zip(keys, docs):
            reference.db.execute(f"INSERT INTO documents ({', '.join(COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?)",
                                 [key, d.id, d.text, json.dumps(d.metadata, ensure_ascii=False), fields_json(d.text, d.fields), d.origin])
    sql = "SELECT key, id, text, metadata, fields, origin, typeof(id), typeof(text), hex(text), hex(id) FROM documents ORDER BY key"
    assert store.db.execute(sql).fetchall() == reference.db.execute(sql).fetchall()
    by_key = sorted(range(len(keys)), key=keys.__getitem__)
    assert [row["text"] for row in store.fetch(keys).values()] == [docs[n].text for n in by_key]
    assert [row["fields"] for row in store.fetch(keys).values()] == [docs[n].fields for n in by_key]
    assert [row["metadata"] for row in store.fetch(keys).values()] == [docs[n].metadata for n in by_key]
    store.close()
    reference.close()
