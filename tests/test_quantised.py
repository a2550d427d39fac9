"""Quantised vectors (``--vectors int8|binary``): codes searched first, rescored with the whole vectors on disk."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import records, run_cli, write_jsonl
from test_vectors import clustered_vectors, spooled

from indexer import Index, IndexSettings, build_index, check_index, compact_index, delete_documents, upsert_documents
from indexer.vectors import build_from_spool, exact_neighbours, load, quantised_structure, recall_at_k, whole_files
from indexer.vectors.rescored import DiskVectors


@pytest.mark.parametrize("storage, structure", [("int8", "Flat"), ("int8", "IVF128,Flat"), ("int8", "HNSW32"),
                                                ("binary", "Flat"), ("binary", "IVF128,Flat")])
def test_codes_rescored_reach_the_recall_of_exact_search_in_less_memory(tmp_path, storage, structure):
    dimension = 64 if storage == "int8" else 384  # a bit a dimension: binary codes suit embeddings' widths, not 64
    data = clustered_vectors(20_000, dimension, seed=11)
    spool = spooled(tmp_path, data)
    spec = quantised_structure(structure, storage)
    vectors, tuning = build_from_spool(spool, spec)
    assert tuning["tuned_recall"] >= 0.95 and vectors.search_params["oversample"] >= 1
    vectors.save(tmp_path / "vectors.faiss")
    float32, _ = build_from_spool(spool, structure)
    float32.save(tmp_path / "float32.faiss")
    # What a search process holds in memory: the codes (the whole vectors stay on disk, mapped).
    held = (tmp_path / "vectors.faiss").stat().st_size / (tmp_path / "float32.faiss").stat().st_size
    # Ids and HNSW's links (256 bytes a vector, as many as 64 float32s) are not quantised.
    assert held < {"int8": 0.7 if structure == "HNSW32" else 0.35, "binary": 0.1}[storage]
    loaded = load(tmp_path / "vectors.faiss", spec, vectors.search_params)
    assert isinstance(loaded._whole()[0], DiskVectors)  # read from disk at each search, not held
    queries = clustered_vectors(300, dimension, seed=12)  # held out: not the tuning queries
    truth = exact_neighbours(queries, spool.chunks(), 10)
    scores, found = loaded.search(queries, 10)
    assert recall_at_k(found, truth) >= 0.95
    # Rescored scores are the exact inner products, best first.
    keys = np.arange(20_000) + 100
    exact = np.einsum("nkd,nd->nk", data[found - 100], queries)
    assert np.allclose(scores, exact, atol=1e-5) and (np.diff(scores, axis=1) <= 0).all()
    assert np.array_equal(loaded.reconstruct(keys[[5, 0, 19_999]]), data[[5, 0, 19_999]])
    if storage == "binary":  # the oversampling is what brings the recall
        assert recall_at_k(loaded.search(queries, 10, oversample=1)[1], truth) < recall_at_k(found, truth) - 0.1
    # Deleted (excluded) and filtered (allowed) keys hold in the first stage.
    gone = found[:, 0]
    assert not np.isin(loaded.search(queries, 10, excluded=gone)[1], gone).any()
    allowed = keys[::50]
    assert np.isin(loaded.search(queries, 5, allowed=allowed)[1], allowed).all()


def test_only_flat_hnsw_and_ivf_structures_take_codes():
    assert quantised_structure("HNSW32", "float32") == "HNSW32"
    assert quantised_structure("IVF1024,Flat", "int8") == "rescore:IVF1024,SQ8"
    assert quantised_structure("HNSW16", "binary") == "rescore:BFlat"
    from indexer.errors import ArgumentError

    with pytest.raises(ArgumentError, match="not 'OPQ16,IVF256,PQ16'"):
        quantised_structure("OPQ16,IVF256,PQ16", "int8")


@pytest.mark.parametrize("storage", ["int8", "binary"])
def test_an_index_of_codes_answers_as_float32_does_through_edits(tmp_path, tiny_model, storage):
    source = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "text": f"document number {i} about topic {i % 7}", "n": i % 3}
                                                 for i in range(600)])
    whole, coded = tmp_path / "whole", tmp_path / "coded"
    build_index(source, whole, IndexSettings(model=str(tiny_model)))
    build_index(source, coded, IndexSettings(model=str(tiny_model), vectors=storage))
    for path in (whole, coded):
        upsert_documents(path, write_jsonl(tmp_path / "u.jsonl", [{"id": 5, "text": "replaced five", "n": 9}]))
        delete_documents(path, ["7", "8"])
    questions = [f"topic {i} number {i * 37}" for i in range(20)]
    for _ in range(2):  # before and after a compaction merges the segments again
        with Index(whole) as exact, Index(coded) as quantised:
            assert len(quantised) == len(exact) == 598
            for question in questions:
                expected = [h.id for h in exact.search(question, k=10)]
                got = quantised.search(question, k=10)
                assert len({h.id for h in got} & set(expected)) >= 9 and "7" not in {h.id for h in got}
                filtered = [h.id for h in quantised.search(question, k=5, where=[("n", "=", 1)])]
                expected = [h.id for h in exact.search(question, k=5, where=[("n", "=", 1)])]
                assert len(filtered) == 5 and all(int(i) % 3 == 1 for i in filtered) and len(set(filtered) & set(expected)) >= 4
            assert quantised.search("replaced five", k=1)[0].id == "5"
        compact_index(coded)
        compact_index(whole)
    segment = max((coded / "segments").iterdir())  # the last compaction's, all the current version lists
    assert check_index(coded)["problems"] == []
    full, _ = whole_files(segment / "vectors.faiss")
    with open(full, "r+b") as file:  # damage a whole vector: the check finds it by its checksum
        file.seek(-4, 2)
        file.write(b"\x00\x00\x80\x7f")
    assert any("vectors-full.npy" in p for p in check_index(coded)["problems"])


def test_build_takes_vectors_from_the_command_line(tmp_path, tiny_model):
    source = write_jsonl(tmp_path / "d.jsonl", records(30))
    run_cli("build", str(source), "--index", str(tmp_path / "idx"), "--model", str(tiny_model), "--vectors", "binary")
    info = run_cli("info", str(tmp_path / "idx"), "--json")
    assert '"vectors": "binary"' in info.stdout and "rescore:BFlat" in info.stdout
    refused = run_cli("build", str(source), "--index", str(tmp_path / "other"), "--model", str(tiny_model),
                      "--vectors", "int4", check=False)
    assert refused.returncode == 2 and "int4" in refused.stderr and not (tmp_path / "other").exists()
