"""What a reader trusts is proven: ids compare exactly, checksums cover manifests, pointers, deletion sets, segment
files and cache rows, a damaged version is neither served nor written on, and a failure after publishing is a warning."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import fill, tree_digest, write_jsonl
from typer.testing import CliRunner

from indexer import Index, build_index, check_index, compact_index, delete_documents, layout, upsert_documents
from indexer.cache import CHECK_BYTES, cache_holds_vectors
from indexer.cli import EXIT_CODES, app
from indexer.errors import ArgumentError, DiskFullError, IndexCorruptError
from indexer.settings import IndexSettings
from indexer.snapshot import Snapshot


def records(n: int, start: int = 0, prefix: str = "doc") -> list[dict]:
    return [{"id": f"{prefix}{i}", "text": f"{prefix} number {i} about topic {i % 7}", "n": i} for i in range(start, start + n)]


def indexer(*args) -> object:
    """``indexer ARGS`` in this process (typer's CliRunner)."""
    return CliRunner().invoke(app, [str(a) for a in args], prog_name="indexer")


def one_line_error(result, code: int, *parts: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("indexer: error: "), result.stderr
    assert all(part in lines[0] for part in parts), lines[0]
    return lines[0]


@pytest.fixture
def segmented(tmp_path, tiny_model):
    """A flat index of the tiny model: 40 documents built, then two upserts of 5 (three segments)."""
    path = tmp_path / "idx"
    build_index(write_jsonl(tmp_path / "source.jsonl", records(40)), path, IndexSettings(model=str(tiny_model)))
    for first in (40, 45):
        upsert_documents(path, write_jsonl(tmp_path / f"more{first}.jsonl", records(5, first)))
    return path


def manifest_file(path: Path) -> Path:
    return layout.version_dir(path, layout.current_version(path)) / layout.MANIFEST


def segment_folders(path: Path) -> list[Path]:
    return layout.segment_folders(path, layout.read_manifest(manifest_file(path).parent))


def stored_vectors(path: Path, ids: list[str]) -> np.ndarray:
    with Index(path) as index:
        found, vectors = index.get_vectors(ids)
    assert found == ids
    return vectors


def flip_byte(file: Path, offset: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x5A
    file.write_bytes(bytes(data))


# 1. Ids compare exactly: SQLite's JSON functions cut a string at NUL, so "doc1\0x" once matched "doc1".


def test_an_id_holding_nul_matches_no_other_document(segmented):
    ids = [f"doc{i}" for i in range(50)]
    with pytest.raises(ArgumentError, match=r"no document with id 'doc1\\x00not-this-one'"):
        delete_documents(segmented, ["doc1\x00not-this-one"])
    report = delete_documents(segmented, ["doc1\x00not-this-one", "doc2\x00"], missing_ok=True)
    assert not report.published and report.deleted == 0
    with Index(segmented) as index:
        assert [d["id"] for d in index.get_documents(ids)] == ids
        assert index.get_documents(["doc1\x00x", "doc1\n"]) == []


def test_the_langchain_store_deletes_only_the_exact_id(segmented):
    pytest.importorskip("langchain_core")
    from indexer.integrations.langchain import IndexerVectorStore

    store = IndexerVectorStore(segmented)
    store.delete(ids=["doc3\x00not-this-one"])
    assert [d.id for d in store.get_by_ids(["doc3"])] == ["doc3"]


# 2. A write that published stays published, whatever the merge after it meets.


def test_a_merge_that_runs_out_of_disk_after_publishing_is_a_warning(small_disk, tmp_path, tiny_model):
    path = small_disk / "idx"
    texts = [{"id": f"d{i}", "text": f"document {i} " + "filler words here " * 60} for i in range(120)]
    build_index(write_jsonl(tmp_path / "s.jsonl", texts), path, IndexSettings(model=str(tiny_model)))
    fill(small_disk, leave=96 * 1024)  # room for a deletion set and a manifest, not for a merged segment
    doomed = [f"d{i}" for i in range(40)]  # a third deleted: the policy merges after the delete publishes
    result = indexer("delete", path, *doomed, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["published"] and report["documents"] == 80 and report["merged"] == 0
    assert any("the merge after it failed (no space left on device)" in w for w in report["warnings"]), report["warnings"]
    assert layout.current_version(path) == report["version"] and check_index(path)["problems"] == []
    with Index(path) as index:
        assert len(index) == 80 and index.get_documents(doomed) == []
    (small_disk / "filler").unlink()
    assert compact_index(path).merged == 1  # what was left for later merges now


# 3. Compaction takes vectors from proven segments, never from a damaged cache row.


def damage_cache(path: Path) -> int:
    """Negate the first two components of every cached vector, leaving each row's check as it was."""
    with sqlite3.connect(path / layout.CACHE) as db:
        rows = db.execute("SELECT key, vector FROM embeddings").fetchall()
        for key, blob in rows:
            vector = np.frombuffer(blob[:-CHECK_BYTES], dtype=np.float32).copy()
            vector[:2] *= -1
            db.execute("UPDATE embeddings SET vector = ? WHERE key = ?", [vector.tobytes() + blob[-CHECK_BYTES:], key])
    return len(rows)


def test_compaction_never_launders_a_damaged_cache(segmented):
    ids = [f"doc{i}" for i in range(50)]
    before = stored_vectors(segmented, ids)
    assert damage_cache(segmented) == 50
    report = compact_index(segmented)
    assert report.merged == 3 and check_index(segmented)["problems"] == []
    assert np.array_equal(stored_vectors(segmented, ids), before)


def test_a_damaged_cache_row_is_encoded_again_with_a_warning(segmented, tmp_path):
    before = stored_vectors(segmented, ["doc7"])
    damage_cache(segmented)
    twin = write_jsonl(tmp_path / "twin.jsonl", [{"id": "twin", "text": "doc number 7 about topic 0"}])
    report = upsert_documents(segmented, twin)
    assert (report.encoded, report.reused) == (1, 0)
    assert any("1 cached vectors failed their check" in w for w in report.warnings), report.warnings
    assert np.allclose(stored_vectors(segmented, ["twin"]), before, atol=1e-6)


# 4. Everything a reader trusts carries a checksum: the manifest, the pointer, the deletion set.


def test_every_bit_flip_of_a_manifest_is_caught_or_changes_nothing(segmented):
    where = manifest_file(segmented)
    original = where.read_bytes()
    parsed = json.loads(original)
    caught = harmless = 0
    for bit in range(len(original) * 8):
        damaged = bytearray(original)
        damaged[bit // 8] ^= 1 << (bit % 8)
        where.write_bytes(bytes(damaged))
        try:
            Snapshot.open(segmented, vectors=False).close()
        except IndexCorruptError:
            caught += 1
            continue
        assert json.loads(bytes(damaged)) == parsed, f"bit {bit} went unnoticed"
        harmless += 1
    where.write_bytes(original)
    assert caught > 0.9 * len(original) * 8 and check_index(segmented)["problems"] == []


@pytest.mark.parametrize("edit", ["pooling", "precision", "older name", "segments reordered", "count"])
def test_an_edited_manifest_fails_check_and_open(segmented, edit):
    where = manifest_file(segmented)
    data = json.loads(where.read_text())
    if edit == "pooling":
        data["settings"]["pooling"] = "cls"
    elif edit == "precision":
        data["settings"]["precision"] = "fp16"
    elif edit == "older name":
        data["version"] = layout.list_versions(segmented)[0]
    elif edit == "segments reordered":
        data["segments"] = data["segments"][::-1]
    else:
        data["count"] += 1
    where.write_text(json.dumps(data, indent=2))
    assert check_index(segmented)["problems"]
    with pytest.raises(IndexCorruptError):
        Index(segmented)
    one_line_error(indexer("upsert", segmented, write_jsonl(where.parent.parent / "x.jsonl", records(1, 90))),
                   EXIT_CODES[IndexCorruptError])


def test_a_pointer_damaged_into_another_versions_name_is_caught(segmented):
    pointer = (segmented / layout.POINTER).read_text()
    current, checksum = pointer.split()
    assert checksum.startswith("sha256:")
    older = layout.list_versions(segmented)[0]
    (segmented / layout.POINTER).write_text(f"{older} {checksum}\n")
    with pytest.raises(IndexCorruptError, match="checksum"):
        Snapshot.open(segmented)
    assert check_index(segmented)["problems"]
    indexer("rollback", segmented, "--to", current)  # a rollback writes a sound pointer again
    assert layout.current_version(segmented) == current and check_index(segmented)["problems"] == []
    (segmented / layout.POINTER).write_text(current + "\n")  # as an older indexer wrote it: still read
    assert layout.current_version(segmented) == current


def test_a_damaged_deletion_set_is_caught_at_open(segmented):
    delete_documents(segmented, ["doc1", "doc2"])
    deleted = manifest_file(segmented).parent / layout.DELETED
    flip_byte(deleted, -4)
    with pytest.raises(IndexCorruptError, match="deletion set does not match its checksum"):
        Snapshot.open(segmented, vectors=False)
    deleted.write_bytes(b"")
    one_line_error(indexer("query", segmented, "topic", "--mode", "keyword"), EXIT_CODES[IndexCorruptError])


# 5 and 8. Damaged segment files are never served, written on, or met with a traceback.


@pytest.mark.parametrize("name", [layout.DOCUMENTS, layout.VECTORS, layout.KEYS, layout.LENGTHS])
@pytest.mark.parametrize("damage", ["flip", "half", "empty"])
def test_a_damaged_segment_file_is_neither_served_nor_written_on(segmented, tmp_path, name, damage):
    file = segment_folders(segmented)[0] / name
    if damage == "flip":
        flip_byte(file, file.stat().st_size // 2)
    else:
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2] if damage == "half" else b"")
    before = tree_digest(segmented)
    for mode in ("dense", "keyword"):
        one_line_error(indexer("query", segmented, "topic 3", "--mode", mode), EXIT_CODES[IndexCorruptError], "damaged")
    one_line_error(indexer("upsert", segmented, write_jsonl(tmp_path / "x.jsonl", records(1, 90))), EXIT_CODES[IndexCorruptError])
    one_line_error(indexer("delete", segmented, "doc1"), EXIT_CODES[IndexCorruptError])
    assert tree_digest(segmented) == before
    assert check_index(segmented)["problems"]


@pytest.mark.parametrize("name", [layout.DOCUMENTS, layout.VECTORS])
def test_a_background_check_stops_serving_a_damaged_version(segmented, name):
    flip_byte(segment_folders(segmented)[0] / name, 100)
    with Index(segmented, verify="background") as index:
        index._checking.join(timeout=60)
        state = index.integrity()
        assert not state["verified"] and name in state["fault"]
        with pytest.raises(IndexCorruptError, match="damaged"):
            index.search("topic 3")


def test_a_sound_index_opened_in_the_background_says_verified(segmented):
    with Index(segmented, verify="background") as index:
        index._checking.join(timeout=60)
        assert index.integrity() == {"version": index.version, "verified": True, "fault": None}
        assert index.search("topic 3", k=3)


def test_a_cosine_outside_the_unit_range_is_never_served(segmented):
    """Vectors scaled by 1.3 under checksums made to agree: only the search's own guard sees the damage."""
    folder = segment_folders(segmented)[0]
    vector = stored_vectors(segmented, ["doc0"])[0]
    data = (folder / layout.VECTORS).read_bytes()
    at = data.index(vector.tobytes())
    (folder / layout.VECTORS).write_bytes(data[:at] + (vector * np.float32(1.3)).tobytes() + data[at + len(vector.tobytes()):])
    meta = json.loads((folder / layout.SEGMENT_META).read_text())
    meta["files"][layout.VECTORS] = layout.file_checksum(folder / layout.VECTORS)
    meta["checksum"] = layout.json_checksum(meta)
    (folder / layout.SEGMENT_META).write_text(json.dumps(meta))
    assert check_index(segmented)["problems"] == []  # consistent checksums: the files look sound
    with Index(segmented) as index, pytest.raises(IndexCorruptError, match="outside"):
        index.search("doc number 0 about topic 0")


# 12. What needs no model is checked before the model loads.


def test_a_filter_the_index_cannot_answer_fails_before_the_model_loads(segmented, tmp_path, tiny_model):
    shutil_model = tmp_path / "gone"
    tiny_model.rename(shutil_model)  # a load would fail with a model error, exit 4
    try:
        one_line_error(indexer("query", segmented, "topic", "--where", "year<nineteen"), EXIT_CODES[ArgumentError], "year")
        one_line_error(indexer("query", segmented, "topic", "--where", "n<nineteen"), EXIT_CODES[ArgumentError], "n")
    finally:
        shutil_model.rename(tiny_model)


# 11. Ctrl-C ends a write within seconds, publishes nothing, releases the lock and keeps what was encoded.


@pytest.mark.slow
def test_ctrl_c_ends_every_build_promptly_and_keeps_its_encoded_vectors(tmp_path, tiny_model):
    """Ctrl-C at random moments of 60,000-document builds (about 10 s each here, 4 of them before the write starts)."""
    texts = [{"id": f"d{i}", "text": f"document {i} " + "word other thing " * (i % 40)} for i in range(60_000)]
    source = write_jsonl(tmp_path / "big.jsonl", texts)
    rng = np.random.default_rng(7)
    interrupted, resumed = 0, False
    for attempt in range(6):
        path = tmp_path / f"idx{attempt}"
        build = subprocess.Popen([sys.executable, "-m", "indexer", "build", str(source), "--index", str(path), "--model", str(tiny_model)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (path / layout.STAGING).exists() and build.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the write has begun
        time.sleep(float(rng.uniform(0.0, 4.0)))
        build.send_signal(signal.SIGINT)
        sent = time.monotonic()
        try:
            _, stderr = build.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            build.kill()
            raise AssertionError(f"attempt {attempt}: the build did not end within 20 s of Ctrl-C") from None
        if layout.holds_index(path):
            continue  # it had published before the signal came
        assert build.returncode == 130 and stderr.strip().splitlines()[-1] == "indexer: interrupted; nothing published", stderr
        assert time.monotonic() - sent < 5, "Ctrl-C took more than 5 s to end the build"
        with layout.writer_lock(path):  # released: taking it does not fail
            pass
        interrupted += 1
        if not resumed and cache_holds_vectors(path / layout.CACHE):
            rerun = indexer("build", source, "--index", path, "--model", tiny_model, "--json")
            assert rerun.exit_code == 0, rerun.output
            report = json.loads(rerun.stdout)
            assert report["documents"] == 60_000 and report["reused"] > 0 and report["encoded"] + report["reused"] == 60_000
            resumed = True
    assert interrupted >= 3 and resumed, (interrupted, resumed)


def test_the_server_reports_a_damaged_version_on_health_and_refuses_searches(segmented):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from indexer.server import create_app

    with TestClient(create_app(segmented)) as client:
        assert client.post("/search", json={"query": "topic 3", "k": 2}).status_code == 200
        health = client.get("/health").json()
        assert health["status"] == "ok" and "verified" in health
    flip_byte(segment_folders(segmented)[0] / layout.DOCUMENTS, 200)
    with TestClient(create_app(segmented)) as client:
        deadline = time.monotonic() + 60
        while (health := client.get("/health")).json()["status"] == "ok" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health.status_code == 503 and health.json()["status"] == "damaged" and not health.json()["verified"]
        assert "documents.db does not match its checksum" in health.json()["error"]
        refused = client.post("/search", json={"query": "topic 3", "k": 2})
        assert refused.status_code == 503 and "damaged" in refused.json()["detail"]


@pytest.mark.slow
def test_sigkill_and_full_disk_over_every_write_lose_no_acknowledged_write(roomy_disk, tmp_path, tiny_model):
    """Upsert, delete, compact and import, each killed at a random moment or run on a disk filled to a random level:
    after each, every version passes check, the index serves the documents before or after the write, and after
    it whenever the writer said it succeeded (exit 0)."""
    rng = np.random.default_rng(11)
    path = roomy_disk / "idx"
    source = write_jsonl(tmp_path / "base.jsonl", records(300))
    build_index(source, path, IndexSettings(model=str(tiny_model)))
    archive = tmp_path / "base.tar.gz"
    assert indexer("export", path, "-o", archive).exit_code == 0
    base, live = {f"doc{i}" for i in range(300)}, {f"doc{i}" for i in range(300)}
    outcomes = []
    for round_ in range(16):
        verb = ("upsert", "delete", "compact", "import")[round_ % 4]
        if verb == "upsert":
            fresh = records(150, prefix=f"r{round_}-")
            args, after = [write_jsonl(tmp_path / "u.jsonl", fresh)], live | {d["id"] for d in fresh}
        elif verb == "delete":
            doomed = sorted(rng.choice(sorted(live), size=min(60, len(live)), replace=False))
            args, after = doomed, live - set(doomed)
        elif verb == "compact":
            args, after = [], live
        else:
            args, after = [], base
        command = [sys.executable, "-m", "indexer", verb, *([str(archive), "--index", str(path), "--as-version"] if verb == "import"
                                                         else [str(path), *map(str, args)]), "--keep", "2"]
        if round_ % 8 < 4:  # a kill somewhere between start-up and the end of the write
            writer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(float(rng.uniform(0.3, 5.0 if verb == "upsert" else 1.5)))  # upsert loads the model first
            writer.send_signal(signal.SIGKILL)
            writer.wait()
            code = writer.returncode
        else:  # a disk with between nothing and 256 KiB left
            fill(roomy_disk, leave=int(rng.uniform(0, 256 << 10)))
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            (roomy_disk / "filler").unlink()
            code = done.returncode
            assert code in (0, EXIT_CODES[DiskFullError]), done.stderr  # success, or no space left
            assert "Traceback" not in done.stderr, done.stderr
        assert check_index(path, all_versions=True)["problems"] == [], (verb, code)
        with Index(path) as index:
            served = {d["id"] for d in index.get_documents(sorted(live | after))}
            assert len(index) == len(served)
        assert served == after if code == 0 else served in (live, after), (verb, code, len(served), len(live), len(after))
        outcomes.append((verb, code))
        live = served
    assert {code for _, code in outcomes} >= {0, -signal.SIGKILL, EXIT_CODES[DiskFullError]}, outcomes


def test_http_upserts_of_ids_with_control_characters_are_refused_and_leave_the_index_as_it_was(segmented):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from indexer.server import create_app

    before = tree_digest(segmented)
    auth = {"Authorization": "Bearer key-of-the-test"}
    with TestClient(create_app(segmented, api_key="key-of-the-test")) as client:
        for doc_id in ("nul\u0000id", "line\nbreak", "doc1\u0000"):
            answer = client.post("/documents", json={"documents": [{"id": doc_id, "text": "t"}]}, headers=auth)
            assert answer.status_code == 400 and "control character" in answer.json()["detail"], answer.text
            assert "\n" not in answer.json()["detail"]
        assert client.get("/documents/doc1").status_code == 200
        assert client.delete("/documents/doc1%00x", headers=auth).status_code == 404
    assert tree_digest(segmented) == before
