"""Versions, incremental rebuilds, upsert/delete/rollback, what rebuilds do with upserted documents, writes that change
nothing, the writer lock, crashes and live readers.

Everything runs against real files; writers, readers and crashes that are the subject are real subprocesses."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import DATASET, records, run_cli, write_jsonl

from indexer import Index, IndexLockedError, build_index, check_index, delete_documents, index_info, layout, rebuild_index, upsert_documents
from indexer.settings import IndexSettings, WriteOptions

WORDS = (
    "amber river copper falcon granite harbor lantern meadow nickel orchard pepper quartz saddle timber velvet "
    "walnut yarrow zephyr basalt cedar dune ember fjord glacier hazel iris juniper kelp lagoon maple nectar "
    "opal pine quill reef sage tundra umber violet willow"
).split()


def corpus_words(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.sample(WORDS, 8)) for _ in range(n)]


def synthetic_corpus(path: Path, n: int, revision: int, seed: int = 1, shuffle: bool = False) -> Path:
    """``n`` documents "doc I: <words of I> rev R": fixed words per id, a revision that changes every text."""
    words = corpus_words(n, seed)
    records = [{"id": str(i), "text": f"doc {i}: {words[i]} rev {revision}"} for i in range(n)]
    if shuffle:
        random.Random(revision).shuffle(records)  # new FAISS keys for every id in every version
    return write_jsonl(path, records)


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "indexer", *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_lock_holder(path: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    """Block until ``process`` has written its pid into the index's LOCK file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lock = path / layout.LOCK
        if lock.exists() and f"pid {process.pid}," in lock.read_text():
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError("writer never took the lock")


@pytest.fixture
def products_with_source(tmp_path):
    """A copy of the sample corpus built as an index: (path, source), for tests that change the source and rebuild."""
    source = tmp_path / "corpus.jsonl"
    source.write_text((DATASET / "corpus.jsonl").read_text())
    path = tmp_path / "products"
    run_cli("build", str(source), "--index", str(path))
    return path, source


def test_unchanged_rebuild_encodes_nothing_one_change_encodes_one(products_with_source):
    path, source = products_with_source
    # Unchanged documents stay in their segment: nothing is encoded, looked up or written but a manifest.
    unchanged = json.loads(run_cli("rebuild", str(path), "--json").stdout)
    assert (unchanged["encoded"], unchanged["reused"], unchanged["deleted"], unchanged["version"], unchanged["segments"]) == (0, 0, 0, "v000002", 1)
    assert run_cli("rebuild", str(path)).stdout.startswith(f"rebuilt {path} v000003: 99 documents, 0 encoded, 0 reused")

    skipped = json.loads(run_cli("rebuild", str(path), "--if-changed", "--json").stdout)
    assert (skipped["published"], skipped["version"], skipped["encoded"]) == (False, "v000003", 0)
    assert layout.current_version(path) == "v000003"

    records = [json.loads(line) for line in source.read_text().splitlines()]
    records[10]["description"] += " Now with a lifetime warranty."
    del records[20:22]
    write_jsonl(source, records)
    changed = rebuild_index(path, if_changed=True)
    assert (changed.encoded, changed.reused, changed.deleted, changed.documents, changed.segments) == (1, 0, 2, 97, 2)
    assert changed.published and changed.version == "v000004"
    hit = Index(path).search("lifetime warranty", k=1)[0]
    assert (hit.id, hit.text.endswith("Now with a lifetime warranty.")) == (records[10]["product_id"], True)


def test_rebuild_reads_another_source_when_told(products_with_source, tmp_path):
    path, _ = products_with_source
    other = write_jsonl(
        tmp_path / "other.jsonl",
        [{"product_id": f"N{i}", "title": f"Thing {i}", "description": "A new thing."} for i in range(5)],
    )
    report = json.loads(run_cli("rebuild", str(path), "--source", str(other), "--json").stdout)
    assert (report["documents"], report["encoded"], report["deleted"]) == (5, 5, 99)
    assert index_info(path)["settings"]["source"] == str(other.resolve())
    renamed = synthetic_corpus(tmp_path / "renamed.jsonl", 3, revision=1)
    wrong_fields = run_cli("rebuild", str(path), "--source", str(renamed), check=False)
    assert wrong_fields.returncode == 3 and "renamed.jsonl:1: missing id field 'product_id'" in wrong_fields.stderr


def query_ids(path: Path, question: str, k: int = 200) -> dict[str, str]:
    line = json.loads(run_cli("query", str(path), question, "-k", str(k), "--json").stdout)
    return {hit["id"]: hit["text"] for hit in line["hits"]}


@pytest.mark.slow
def test_upsert_delete_rollback_round_trip(products_with_source, tmp_path):
    path, _ = products_with_source
    original = query_ids(path, "espresso")["P0026"]
    updates = write_jsonl(
        tmp_path / "updates.jsonl",
        [
            {"product_id": "P0026", "title": "Espresso Machine Mk II", "description": "Dual boiler espresso machine.", "category": "kitchen"},
            {"product_id": "P0500", "title": "Snowshoes", "description": "Aluminium snowshoes for deep powder.", "category": "outdoors"},
        ],
    )
    report = json.loads(run_cli("upsert", str(path), str(updates), "--json").stdout)
    assert (report["version"], report["documents"], report["encoded"]) == ("v000002", 100, 2)
    hits = query_ids(path, "espresso")
    assert hits["P0026"] == "Espresso Machine Mk II Dual boiler espresso machine."
    assert list(query_ids(path, "walking on deep snow", k=1)) == ["P0500"]

    deleted = json.loads(run_cli("delete", str(path), "P0026", "P0500", "--json").stdout)
    assert (deleted["version"], deleted["documents"], deleted["deleted"]) == ("v000003", 98, 2)
    everything = query_ids(path, "espresso", k=500)
    assert len(everything) == 98 and "P0026" not in everything and "P0500" not in everything

    missing = run_cli("delete", str(path), "P0026", check=False)
    assert missing.returncode == 2 and "no document with id 'P0026'" in missing.stderr

    run_cli("rollback", str(path))
    assert layout.current_version(path) == "v000002"
    assert query_ids(path, "espresso")["P0026"] == "Espresso Machine Mk II Dual boiler espresso machine."
    run_cli("rollback", str(path), "--to", "v000001")
    assert query_ids(path, "espresso")["P0026"] == original
    assert "P0500" not in query_ids(path, "snowshoes", k=500)
    assert json.loads(run_cli("check", str(path), "--all", "--json").stdout)["problems"] == []


def test_refresh_picks_up_a_new_version_without_reopening(products_with_source, tmp_path):
    path, _ = products_with_source
    index = Index(path)
    assert index.refresh() is False
    write_jsonl(tmp_path / "new.jsonl", [{"product_id": "P0777", "title": "Kayak", "description": "Sit-on-top sea kayak."}])
    run_cli("upsert", str(path), str(tmp_path / "new.jsonl"))
    assert index.search("sea kayak", k=1)[0].id != "P0777"
    assert index.refresh() is True and index.version == "v000002"
    assert index.search("sea kayak", k=1)[0].id == "P0777"


def test_a_second_writer_fails_fast_while_the_first_holds_the_lock(tmp_path):
    path = tmp_path / "idx"
    source = synthetic_corpus(tmp_path / "a.jsonl", 20, revision=1)
    run_cli("build", str(source), "--index", str(path))
    with layout.writer_lock(path, action="test"):
        with pytest.raises(IndexLockedError, match=r"locked by another writer \(pid \d+, test since"):
            rebuild_index(path)
        started = time.monotonic()
        with pytest.raises(IndexLockedError):
            rebuild_index(path, options=WriteOptions(wait=0.5))
        assert time.monotonic() - started >= 0.5
    assert rebuild_index(path).version == "v000002"


@pytest.mark.slow
def test_overlapping_rebuilds_one_wins_the_other_exits_7(tmp_path):
    path = tmp_path / "idx"
    run_cli("build", str(synthetic_corpus(tmp_path / "a.jsonl", 200, revision=1)), "--index", str(path))
    synthetic_corpus(tmp_path / "a.jsonl", 200, revision=2)
    first = start_cli("rebuild", str(path), "--json")
    wait_for_lock_holder(path, first)
    second = run_cli("rebuild", str(path), check=False)
    assert second.returncode == 7, second.stderr
    assert "locked by another writer" in second.stderr and "Traceback" not in second.stderr
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert (json.loads(out)["version"], json.loads(out)["encoded"]) == ("v000002", 200)

    synthetic_corpus(tmp_path / "a.jsonl", 200, revision=3)
    first = start_cli("rebuild", str(path))
    wait_for_lock_holder(path, first)
    waited = run_cli("rebuild", str(path), "--wait", "300", "--json")
    assert first.wait(timeout=300) == 0
    assert (json.loads(waited.stdout)["version"], json.loads(waited.stdout)["encoded"]) == ("v000004", 0)
    assert index_info(path)["count"] == 200
    assert check_index(path, all_versions=True)["problems"] == []
    assert len(Index(path).search("doc 5", k=500)) == 200


@pytest.mark.slow
def test_sigkill_during_rebuild_leaves_previous_version_serving(tmp_path):
    path = tmp_path / "idx"
    source = synthetic_corpus(tmp_path / "a.jsonl", 300, revision=0)
    run_cli("build", str(source), "--index", str(path), "--keep", "2")
    synthetic_corpus(source, 300, revision=1)
    timed = time.monotonic()
    run_cli("rebuild", str(path), "--keep", "2", process=True)  # timed as the killed writers run: a process
    duration = time.monotonic() - timed
    rng = random.Random(42)
    served = 1
    for revision in range(2, 6):
        synthetic_corpus(source, 300, revision=revision)
        before = layout.current_version(path)
        writer = start_cli("rebuild", str(path), "--keep", "2")
        time.sleep(rng.uniform(0.2, duration * 1.1))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        after = layout.current_version(path)
        assert after in (before, f"v{int(before[1:]) + 1:06d}")
        assert run_cli("check", str(path)).stdout.startswith(f"{path}: ok")
        served = revision if after != before else served
        hits = Index(path).search("doc 7", k=300)
        assert len(hits) == 300 and all(h.text.endswith(f"rev {served}") for h in hits)
    final = json.loads(run_cli("rebuild", str(path), "--keep", "2", "--json").stdout)
    assert final["published"] and run_cli("check", str(path), "--all").returncode == 0
    assert all(h.text.endswith("rev 5") for h in Index(path).search("doc 3", k=300))
    assert not (path / layout.STAGING).exists()


READER = """
import json, os, random, sys, time
from pathlib import Path
from indexer import Index

path, seconds, stop = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
index = Index(path)
rng = random.Random(0)
queries = errors = 0
versions, problems = set(), []
deadline = time.monotonic() + seconds
while time.monotonic() < deadline and not stop.exists():
    try:
        index.refresh()
        version = index.version
        versions.add(version)
        i = rng.randrange(200)
        hits = index.search(f"doc {i}: " + WORDS[i], k=5)
        queries += 1
        if queries == 1:
            stop.with_name(f"ready.{os.getpid()}").touch()  # the writes start once every reader is answering
        for hit in hits:
            if not hit.text.startswith(f"doc {hit.id}: "):
                problems.append(f"{version}: id {hit.id} has text {hit.text!r}")
        top = hits[0]
        if top.id != str(i):
            problems.append(f"{version}: doc {i} found {top.id}")
        expected = float(index.encoder.encode_texts([f"doc {i}: " + WORDS[i]])[0] @ index.encoder.encode_texts([top.text])[0])
        if abs(expected - top.score) > 1e-4:
            problems.append(f"{version}: score {top.score} but text gives {expected}")
    except Exception as exc:
        errors += 1
        problems.append(repr(exc))
    time.sleep(0.02)  # leave the writer a core: two busy readers on a 2-core machine slow every write several times
print(json.dumps({"queries": queries, "errors": errors, "versions": sorted(versions), "problems": problems[:10]}))
"""


@pytest.mark.slow
def test_readers_see_consistent_versions_while_rebuilds_publish(tmp_path):
    path = tmp_path / "idx"
    source = synthetic_corpus(tmp_path / "a.jsonl", 200, revision=0, shuffle=True)
    run_cli("build", str(source), "--index", str(path), "--keep", "2")
    script = tmp_path / "reader.py"
    script.write_text(f"WORDS = {json.dumps(corpus_words(200))}\n" + READER)
    stop = tmp_path / "stop"
    readers = [
        subprocess.Popen(
            [sys.executable, str(script), str(path), "240", str(stop)],
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        deadline = time.monotonic() + 180  # readers load the model first: slow on a busy machine
        while len(list(tmp_path.glob("ready.*"))) < len(readers) and time.monotonic() < deadline:
            assert all(reader.poll() is None for reader in readers), "a reader ended before answering"
            time.sleep(0.1)
        words = corpus_words(200)
        for revision in range(1, 4):  # 7 versions published while they read
            synthetic_corpus(source, 200, revision=revision, shuffle=True)
            run_cli("rebuild", str(path), "--keep", "2")
            # Small writes between rebuilds: new segments and deletion sets while readers refresh.
            picked = random.Random(revision).sample(range(200), 20)
            edits = [{"id": str(i), "text": f"doc {i}: {words[i]} edit {revision}"} for i in picked]
            run_cli("upsert", str(path), str(write_jsonl(tmp_path / "edits.jsonl", edits)), "--keep", "2")
        run_cli("compact", str(path), "--keep", "2")
        time.sleep(1)
    finally:
        stop.write_text("")
    for reader in readers:
        out, err = reader.communicate(timeout=120)
        assert reader.returncode == 0, err
        result = json.loads(out)
        assert result["errors"] == 0 and result["problems"] == [], result
        assert result["queries"] > 20 and len(result["versions"]) >= 3, result


# What a rebuild does with upserted documents.


def test_rebuild_keeps_upserted_documents_until_deleted_or_pruned(tmp_path, tiny_model):
    source = write_jsonl(tmp_path / "source.jsonl", records(20))
    path = tmp_path / "idx"
    build_index(source, path, IndexSettings(model=str(tiny_model)))
    upsert_documents(path, write_jsonl(tmp_path / "new.jsonl", [
        {"id": "api1", "text": "written through the API", "n": 1},
        {"id": "doc5", "text": "an edit of a source document", "n": 5},
    ]))
    write_jsonl(source, records(21))  # the source grows by doc20
    report = rebuild_index(path)
    assert report.published and report.kept_upserts == 2 and report.documents == 22
    with Index(path) as index:
        assert index.get_document("api1")["text"] == "written through the API"
        assert index.get_document("doc5")["text"] == "an edit of a source document"  # the upsert shadows the source
        assert index.get_document("doc20") is not None
    delete_documents(path, ["api1"])
    rebuild_index(path)
    with Index(path) as index:
        assert index.get_document("api1") is None and len(index) == 21
    report = rebuild_index(path, prune_upserts=True)
    assert report.kept_upserts == 0
    with Index(path) as index:
        assert index.get_document("doc5")["text"] == "doc number 5 about topic 5"
    # build publishes exactly its source
    upsert_documents(path, write_jsonl(tmp_path / "again.jsonl", [{"id": "api2", "text": "another", "n": 2}]))
    build_index(source, path, IndexSettings(model=str(tiny_model)))
    with Index(path) as index:
        assert index.get_document("api2") is None and len(index) == 21


def test_rebuild_cli_reports_kept_upserts_and_prunes_them(tiny_index):
    extra = write_jsonl(tiny_index.parent / "extra.jsonl", records(3, 100, prefix="new"))
    run_cli("upsert", str(tiny_index), str(extra))
    kept = json.loads(run_cli("rebuild", str(tiny_index), "--json").stdout)
    assert kept["kept_upserts"] == 3 and kept["documents"] == 43
    assert "3 upserts kept" in run_cli("rebuild", str(tiny_index)).stdout
    pruned = json.loads(run_cli("rebuild", str(tiny_index), "--prune-upserts", "--json").stdout)
    assert pruned["kept_upserts"] == 0 and pruned["documents"] == 40 and pruned["deleted"] == 3


# Writes that change nothing publish nothing.


def test_no_op_writes_publish_nothing(tiny_index):
    result = json.loads(run_cli("delete", str(tiny_index), "nope", "--missing-ok", "--json").stdout)
    assert result["published"] is False and result["version"] == "v000001"
    same = write_jsonl(tiny_index.parent / "same.jsonl", records(3))
    upsert_documents(tiny_index, same)  # same ids and texts, but now marked as upserted: a change
    versions = layout.list_versions(tiny_index)
    report = upsert_documents(tiny_index, same)
    assert report.published is False and layout.list_versions(tiny_index) == versions
    assert run_cli("delete", str(tiny_index), "nope", "--missing-ok").stdout.strip().endswith("unchanged, still v000002 (40 documents, 0 encoded)")
