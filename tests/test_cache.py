"""What an index has embedded is kept once: in the segment that keeps it whole (found by the text's digest), else in
cache.db; a rebuild encodes nothing it has, whichever of the two holds it, and a failed build keeps what it encoded."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import records, write_jsonl

from indexer import Index, build_index, layout, rebuild_index
from indexer.cache import EmbeddingCache, cache_holds_vectors
from indexer.errors import SourceError
from indexer.ingest import CHUNK_SIZE
from indexer.settings import IndexSettings
from indexer.snapshot import Snapshot


def vectors_of(path, ids: list[str]) -> np.ndarray:
    with Index(path) as index:
        found, vectors = index.get_vectors(ids)
    assert found == ids
    return vectors


def digests_file(path):
    snapshot = Snapshot.open(path, vectors=False)
    snapshot.close()
    (segment,) = snapshot.segments
    return segment.folder / layout.HASHES, segment.meta


def test_a_build_keeps_each_vector_once_and_a_rebuild_to_another_structure_encodes_nothing(tmp_path, tiny_model):
    source = write_jsonl(tmp_path / "docs.jsonl", records(60))
    path = tmp_path / "idx"
    first = build_index(source, path, IndexSettings(model=str(tiny_model)))
    assert (first.encoded, first.reused) == (60, 0)
    assert not cache_holds_vectors(path / layout.CACHE)  # the flat segment keeps them: no second copy
    hashes, meta = digests_file(path)
    assert np.load(hashes).shape == (60, 2) and layout.HASHES in meta.files  # checksummed with the segment
    before = vectors_of(path, ["doc3", "doc59"])
    # Another structure: nothing carries over, every vector comes back from the old segment by its text.
    again = build_index(source, path, IndexSettings(model=str(tiny_model), index_type="hnsw"))
    assert (again.encoded, again.reused) == (0, 60)
    assert np.array_equal(vectors_of(path, ["doc3", "doc59"]), before)


def test_a_segment_that_keeps_only_codes_leaves_its_vectors_in_the_cache(tmp_path, tiny_model):
    source = write_jsonl(tmp_path / "docs.jsonl", records(80))
    path = tmp_path / "idx"
    build_index(source, path, IndexSettings(model=str(tiny_model), index_type="IVF2,SQ8"))
    hashes, _ = digests_file(path)
    assert not hashes.exists()
    cache = EmbeddingCache(path / layout.CACHE, 32)
    assert len(cache) == 80
    cache.close()
    flat = build_index(source, path, IndexSettings(model=str(tiny_model)))
    assert (flat.encoded, flat.reused) == (0, 80)
    reference = tmp_path / "reference"
    build_index(source, reference, IndexSettings(model=str(tiny_model)))
    assert np.array_equal(vectors_of(path, ["doc5"]), vectors_of(reference, ["doc5"]))


def test_a_build_that_fails_keeps_what_it_encoded_for_the_next_try(tmp_path, tiny_model):
    good = records(2 * CHUNK_SIZE + 10)
    source = tmp_path / "docs.jsonl"
    write_jsonl(source, good)
    with source.open("a") as f:
        f.write("{not json\n")
    path = tmp_path / "idx"
    with pytest.raises(SourceError, match=f"docs.jsonl:{len(good) + 1}: malformed JSON"):
        build_index(source, path, IndexSettings(model=str(tiny_model)))
    assert not layout.holds_index(path) and cache_holds_vectors(path / layout.CACHE)
    write_jsonl(source, good)
    report = build_index(source, path, IndexSettings(model=str(tiny_model)))
    assert report.reused >= CHUNK_SIZE and report.encoded + report.reused == len(good)
    # What the failed write encoded now lives in the segment, which keeps it: the cache lets go of it.
    assert not cache_holds_vectors(path / layout.CACHE)
    assert rebuild_index(path).encoded == 0
