"""Formats 2 and 3: versions listing segments and deletion sets, cross-segment search, compaction, format-1 conversion.

Search over a segmented index must equal a fresh build of the same live
documents: same ids, scores within 1e-5, in every mode and with filters.
Everything runs with the real default model on real files.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import DATASET, ROOT, run_cli, tree_digest, write_jsonl

from indexer import Index, build_index, check_index, compact_index, delete_documents, index_info, layout, upsert_documents
from indexer.compact import MAX_SEGMENTS
from indexer.settings import WriteOptions

FORMAT1 = ROOT / "tests" / "fixtures" / "format1"
QUESTIONS = ["waterproof boots for hiking", "wireless headphones", "espresso coffee machine", "camping gear for cold nights", "a gift for a cook"]
FILTERS = [[("category", "=", "outdoors")], [("price", "<", 30)], [("category", "in", ["kitchen", "electronics"]), ("price", ">=", 20)]]


def corpus() -> dict[str, dict]:
    return {r["product_id"]: r for r in map(json.loads, (DATASET / "corpus.jsonl").read_text().splitlines())}


def product(pid: str, title: str, description: str, category: str, price: float) -> dict:
    return {"product_id": pid, "title": title, "description": description, "category": category, "price": price}


def results(index: Index, k: int, where=None) -> dict[str, list[tuple[str, float]]]:
    """(id, score) lists per mode and question."""
    return {
        f"{mode} {question}": [(hit.id, hit.score) for hit in index.search(question, k=k, mode=mode, where=where)]
        for mode in ("dense", "keyword", "hybrid")
        for question in QUESTIONS
    }


def assert_same_results(got: dict, expected: dict, *, exhaustive: bool) -> None:
    """Scores equal within 1e-5, rank by rank; ids equal as ranked, or (for ties) as id -> score maps when every hit is listed."""
    for case, hits in expected.items():
        scores, expected_scores = [s for _, s in got[case]], [s for _, s in hits]
        assert len(scores) == len(expected_scores) and np.allclose(scores, expected_scores, atol=1e-5, rtol=0), case
        if exhaustive:
            mine, theirs = dict(got[case]), dict(hits)
            assert mine.keys() == theirs.keys(), case
            assert all(abs(mine[i] - theirs[i]) <= 1e-5 for i in mine), case
        else:
            untied = [i for i, s in hits if sum(abs(s - t) <= 1e-5 for t in expected_scores) == 1]
            assert [i for i, _ in got[case] if i in untied] == [i for i, _ in hits if i in untied], case


def assert_equals_fresh_build(path: Path, live: dict[str, dict], tmp_path: Path, name: str) -> None:
    fresh = tmp_path / f"fresh-{name}"
    build_index(write_jsonl(tmp_path / f"{name}.jsonl", list(live.values())), fresh)
    with Index(path) as segmented, Index(fresh) as reference:
        assert len(segmented) == len(reference) == len(live)
        assert_same_results(results(segmented, 500), results(reference, 500), exhaustive=True)
        assert_same_results(results(segmented, 5), results(reference, 5), exhaustive=False)
        for where in FILTERS:
            assert_same_results(results(segmented, 500, where), results(reference, 500, where), exhaustive=True)
            got = results(segmented, 3, where)
            assert_same_results(got, results(reference, 3, where), exhaustive=False)
            matching = len(reference.search("anything", k=500, where=where))
            assert all(len(hits) == min(3, matching) for case, hits in got.items() if not case.startswith("keyword")), where


def test_segmented_search_equals_a_fresh_build_through_upserts_deletes_and_compaction(tmp_path):
    live = corpus()
    source = write_jsonl(tmp_path / "corpus.jsonl", list(live.values()))
    path = tmp_path / "segmented"
    build_index(source, path)

    first = {
        "P0001": product("P0001", "Trailblazer Boots II", "Waterproof leather hiking boots, resoled.", "outdoors", 139.0),
        "P0040": {**live["P0040"], "price": 9.5},  # metadata change only
        "N001": product("N001", "Alpine Bivy Sack", "Waterproof bivouac bag for cold nights on the mountain.", "outdoors", 89.0),
        "N002": product("N002", "Pour-over Coffee Kettle", "Gooseneck kettle for slow coffee.", "kitchen", 35.0),
        "N003": product("N003", "Studio Headphones", "Closed-back wired headphones for mixing.", "electronics", 99.0),
    }
    upsert_documents(path, write_jsonl(tmp_path / "first.jsonl", list(first.values())))
    live.update(first)
    delete_documents(path, ["P0002", "P0050", "N002"])  # two in the base segment, one in the new one
    for gone in ("P0002", "P0050", "N002"):
        del live[gone]
    second = {
        "P0002": product("P0002", "CloudStep Running Shoes", "Back again: road running shoes.", "outdoors", 31.0),  # re-upsert of a deleted id
        "N001": product("N001", "Alpine Bivy Sack XL", "Roomier waterproof bivouac bag.", "outdoors", 95.0),  # replaces a key of a new segment
        "N004": product("N004", "Cast Iron Skillet", "Pre-seasoned pan for searing.", "kitchen", 25.0),
    }
    upsert_documents(path, write_jsonl(tmp_path / "second.jsonl", list(second.values())))
    live.update(second)
    delete_documents(path, ["P0003"])
    del live["P0003"]

    info = index_info(path)
    assert len(info["segments"]) == 3 and info["deleted"] > 0 and info["count"] == len(live)
    assert check_index(path, all_versions=True)["problems"] == []
    assert_equals_fresh_build(path, live, tmp_path, "before")

    report = compact_index(path)
    assert report.published and report.merged == 3 and report.segments == 1
    info = index_info(path)
    assert (len(info["segments"]), info["deleted"], info["count"]) == (1, 0, len(live))
    assert check_index(path, all_versions=True)["problems"] == []
    assert_equals_fresh_build(path, live, tmp_path, "after")
    assert not compact_index(path).published  # one segment, nothing deleted: nothing to do


def test_writes_share_segments_and_pruning_keeps_what_kept_versions_list(tmp_path):
    path = tmp_path / "idx"
    build_index(DATASET / "corpus.jsonl", path)
    base = index_info(path)["segments"]
    before = {p.name: p.stat().st_ino for p in (layout.segment_dir(path, base[0])).iterdir()}
    upsert_documents(path, write_jsonl(tmp_path / "a.jsonl", [product("N1", "Kayak", "Sea kayak.", "outdoors", 500.0)]), options=WriteOptions(keep=2))
    delete_documents(path, ["P0001"], options=WriteOptions(keep=2))
    versions = layout.list_versions(path)
    assert versions == ["v000002", "v000003"]
    listed = [layout.read_manifest(layout.version_dir(path, v)).segments for v in versions]
    assert listed[0] == listed[1] == [base[0], listed[0][1]]  # the delete lists the same two segments
    # The base segment is the same files (no copy), and the one-document segment is small.
    assert {p.name: p.stat().st_ino for p in layout.segment_dir(path, base[0]).iterdir()} == before
    small = sum(p.stat().st_size for p in layout.segment_dir(path, listed[0][1]).iterdir())
    assert small < 200_000
    assert layout.list_segments(path) == listed[0]  # version 1 was pruned, but its segment is still listed
    run_cli("rollback", str(path), "--to", "v000002")
    assert Index(path).get_document("P0001") is not None
    # A segment whose documents are all deleted is no longer listed.
    delete_documents(path, ["N1"], options=WriteOptions(keep=2))
    assert index_info(path)["segments"] == [base[0]] and index_info(path)["count"] == 99


def test_check_finds_a_damaged_segment_and_deletion_set(tmp_path):
    path = tmp_path / "idx"
    build_index(DATASET / "corpus.jsonl", path)
    delete_documents(path, ["P0001"])
    version = layout.current_version(path)
    segment = layout.segment_dir(path, index_info(path)["segments"][0])
    keys = segment / layout.KEYS
    original = keys.read_bytes()
    keys.write_bytes(original[:-8] + (10**9).to_bytes(8, "little"))
    result = run_cli("check", str(path), "--json", check=False)
    assert result.returncode != 0 and "keys.npy does not match its checksum" in json.loads(result.stdout)["problems"][0]
    keys.write_bytes(original)
    np.save(layout.version_dir(path, version) / layout.DELETED, np.array([0, 1], dtype=np.int64))
    problems = json.loads(run_cli("check", str(path), "--json", check=False).stdout)["problems"]
    assert problems and "deleted.npy does not match its checksum" in problems[0]


def test_the_policy_merges_small_segments_after_a_write(tmp_path, tiny_model):
    path = tmp_path / "idx"
    docs = [{"id": str(i), "text": f"document number {i}"} for i in range(50)]
    build_index(write_jsonl(tmp_path / "a.jsonl", docs), path, settings=_tiny(tiny_model))
    merged = 0
    for i in range(MAX_SEGMENTS + 1):
        report = upsert_documents(path, write_jsonl(tmp_path / "u.jsonl", [{"id": f"u{i}", "text": f"upserted {i}"}]))
        merged += report.merged
        assert report.segments <= MAX_SEGMENTS
    assert merged == 10  # the ten smallest segments became one, the base segment was left alone
    info = index_info(path)
    assert info["count"] == 50 + MAX_SEGMENTS + 1 and info["segment_sizes"][info["segments"][0]] == 50
    # Deleting over a fifth of the documents compacts everything.
    report = delete_documents(path, [str(i) for i in range(20)])
    assert report.merged == len(info["segments"]) and report.segments == 1 and index_info(path)["deleted"] == 0
    assert check_index(path, all_versions=True)["problems"] == []


def test_pooled_small_segments_and_an_hnsw_segment_merge_like_one_flat_index(tmp_path, tiny_model):
    """Small Flat segments are searched as one matrix, the HNSW base by FAISS; together they equal a fresh Flat build."""
    docs = {str(i): {"id": str(i), "text": f"note {i} about {['boots', 'coffee', 'tents'][i % 3]} and {i % 7} things", "n": i}
            for i in range(120)}
    path = tmp_path / "idx"
    build_index(write_jsonl(tmp_path / "a.jsonl", list(docs.values())), path, settings=_tiny(tiny_model, index_type="hnsw"))
    for batch in range(3):
        added = [{"id": f"u{batch}-{j}", "text": f"upsert {batch} {j} on coffee and boots", "n": 200 + 10 * batch + j} for j in range(3)]
        upsert_documents(path, write_jsonl(tmp_path / f"u{batch}.jsonl", added))
        docs.update({doc["id"]: doc for doc in added})
    delete_documents(path, ["5", "u1-1"])
    del docs["5"], docs["u1-1"]
    assert len(index_info(path)["segments"]) == 4
    fresh = tmp_path / "fresh"
    build_index(write_jsonl(tmp_path / "live.jsonl", list(docs.values())), fresh, settings=_tiny(tiny_model, index_type="flat"))
    with Index(path) as segmented, Index(fresh) as reference:
        for where in (None, [("n", ">=", 100)], [("n", "<", 50)]):
            for k in (3, 200):
                got = segmented.search_many(["coffee", "boots and tents"], k=k, where=where, ef_search=4096)
                expected = reference.search_many(["coffee", "boots and tents"], k=k, where=where)
                for mine, theirs in zip(got, expected):
                    assert [h.id for h in mine] == [h.id for h in theirs], (where, k)
                    assert np.allclose([h.score for h in mine], [h.score for h in theirs], atol=1e-5, rtol=0)


def test_compact_cli_reports_and_is_a_no_op_on_one_segment(tmp_path, tiny_model):
    path = tmp_path / "idx"
    build_index(write_jsonl(tmp_path / "a.jsonl", [{"id": str(i), "text": f"text {i}"} for i in range(30)]), path,
                settings=_tiny(tiny_model, index_type="hnsw"))
    delete_documents(path, ["1", "2"])
    report = json.loads(run_cli("compact", str(path), "--json").stdout)
    assert (report["published"], report["documents"], report["segments"], report["merged"]) == (True, 28, 1, 1)
    assert index_info(path)["vector_index"].startswith("HNSW")
    again = run_cli("compact", str(path))
    assert again.returncode == 0 and "unchanged" in again.stdout and layout.current_version(path) == report["version"]


def _tiny(model: Path, **options):
    from indexer import IndexSettings

    return IndexSettings(model=str(model), **options)


@pytest.fixture
def format1(tmp_path):
    path = tmp_path / "old"
    shutil.copytree(FORMAT1, path)
    return path


def test_a_format1_index_is_read_as_before(format1):
    before = tree_digest(format1)
    info = json.loads(run_cli("info", str(format1), "--json").stdout)
    assert (info["format_version"], info["count"], info["version"]) == (1, 24, "v000003")
    assert run_cli("check", str(format1), "--all").returncode == 0
    hits = json.loads(run_cli("query", str(format1), "merino wool socks", "-k", "2", "--json").stdout)["hits"]
    assert {h["id"] for h in hits} == {"P9001", "P0010"}
    assert tree_digest(format1) == before  # reading wrote nothing


@pytest.mark.parametrize("write", ["delete", "compact"])
def test_the_first_write_converts_a_format1_index(format1, write):
    with Index(format1) as old:
        expected = results(old, 50)
    if write == "delete":
        report = json.loads(run_cli("delete", str(format1), "P0001", "--json").stdout)
        expected = {case: [(i, s) for i, s in hits if i != "P0001"] for case, hits in expected.items()}
    else:
        report = json.loads(run_cli("compact", str(format1), "--json").stdout)
    assert report["published"] and any("converted from index format 1" in w for w in report["warnings"])
    info = index_info(format1)
    assert (info["format_version"], len(info["segments"])) == (layout.FORMAT_VERSION, 1)
    with Index(format1) as new:
        got = results(new, 50)
    for case in expected:
        if case.startswith("dense"):  # BM25 statistics change when a document leaves, so only dense compares here
            assert_same_results({case: got[case]}, {case: expected[case]}, exhaustive=True)
    assert {h.id for h in Index(format1).search("socks", k=50, mode="keyword")} >= {"P9001", "P0010"}
    assert check_index(format1, all_versions=True)["problems"] == []
    run_cli("rollback", str(format1), "--to", "v000003")  # the format-1 version is still there to go back to
    assert index_info(format1)["format_version"] == 1


def stored_fields(path: Path) -> dict[str, str]:
    """The fields column of every row of the current version's segments, as stored."""
    import sqlite3

    found = {}
    for name in index_info(path)["segments"]:
        with sqlite3.connect(layout.segment_dir(path, name) / "documents.db") as db:
            found.update(db.execute("SELECT id, fields FROM documents"))
    return found


def test_a_text_field_that_is_the_whole_text_is_stored_once(tmp_path, tiny_model, monkeypatch):
    from indexer import rebuild_index, store

    source = write_jsonl(tmp_path / "a.jsonl", [{"id": "a", "text": "plain words"}, {"id": "b", "text": "  padded  "},
                                                {"id": "c", "text": ["two", "parts"]}])
    path = tmp_path / "idx"
    build_index(source, path, settings=_tiny(tiny_model))
    # Format 3: the field's name alone where its value is the text; a JSON object where it is not.
    assert stored_fields(path) == {"a": '"text"', "b": '{"text": "  padded  "}', "c": '{"text": ["two", "parts"]}'}
    with Index(path) as index:
        assert [d["fields"] for d in index.get_documents(list("abc"))] == [{"text": "plain words"}, {"text": "  padded  "}, {"text": ["two", "parts"]}]
    assert not rebuild_index(path, if_changed=True).published

    # Rows as format 2 stored them (every fields value a JSON object) read the same and count as unchanged.
    older = tmp_path / "older"
    with monkeypatch.context() as patched:
        patched.setattr(store, "fields_json", lambda text, fields: json.dumps(fields, ensure_ascii=False))
        build_index(source, older, settings=_tiny(tiny_model))
    assert stored_fields(older)["a"] == '{"text": "plain words"}'
    with Index(older) as index:
        assert index.get_document("a")["fields"] == {"text": "plain words"}
    assert not rebuild_index(older, if_changed=True).published
    report = build_index(write_jsonl(tmp_path / "b.jsonl", [{"id": "a", "text": "plain words, changed"}]), older,
                         settings=_tiny(tiny_model))
    assert (report.documents, stored_fields(older)) == (1, {"a": '"text"'})


def live_ids(path: Path) -> set[str]:
    with Index(path) as index:
        return {hit.id for hit in index.search("doc", k=10_000)}


@pytest.mark.slow
def test_sigkill_during_upsert_delete_and_compact_leaves_a_sound_version(tmp_path, tiny_model):
    """Kill writers at random points: the index serves the version before or after the write, and every version on disk is sound."""
    path = tmp_path / "idx"
    rng = random.Random(7)
    docs = {str(i): f"doc {i} {' '.join(rng.sample(QUESTIONS, 2))}" for i in range(1500)}
    source = write_jsonl(tmp_path / "a.jsonl", [{"id": i, "text": t} for i, t in docs.items()])
    run_cli("build", str(source), "--index", str(path), "--model", str(tiny_model), "--keep", "2")
    live = set(docs)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for round_ in range(6):
        verb = ("upsert", "delete", "compact")[round_ % 3]
        if verb == "upsert":
            fresh = [{"id": f"r{round_}-{i}", "text": f"doc r{round_}-{i} round {round_}"} for i in range(800)]
            args, after = [str(write_jsonl(tmp_path / "u.jsonl", fresh))], live | {d["id"] for d in fresh}
        elif verb == "delete":
            doomed = rng.sample(sorted(live), 100)
            args, after = doomed, live - set(doomed)
        else:
            args, after = [], live
        command = [sys.executable, "-m", "indexer", verb, str(path), *args, "--keep", "2"]
        timed = time.monotonic()
        subprocess.run(command[:3] + ["--help"], env=env, capture_output=True)  # warm the page cache, time a start
        start = time.monotonic() - timed
        writer = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(start * 0.8, start + 3.0))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        assert run_cli("check", str(path), "--all").returncode == 0
        served = live_ids(path)
        assert served in (live, after), (verb, len(served), len(live), len(after))
        live = served
    final = run_cli("compact", str(path), "--json")
    assert json.loads(final.stdout)["segments"] == 1 and live_ids(path) == live
    assert check_index(path, all_versions=True)["problems"] == []
