"""What a reader trusts is proven: ids compare exactly, checksums cover manifests, pointers, deletion sets, segment
files and cache rows, a damaged version is neither served nor written on, and a failure after publishing is a warning;
damaged, missing and full storage: writes never launder damage, the embedding cache is disposable, a broken pointer is
recoverable, a full disk is one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import fill, indexer, one_line_error, records, run_cli, tree_digest, write_jsonl

pytest.importorskip("fastapi")

from indexer import Index, build_index, check_index, compact_index, delete_documents, layout, upsert_documents  # noqa: E402
from indexer.cache import CHECK_BYTES, EmbeddingCache, cache_holds_vectors, digest_keys, embedding_digests  # noqa: E402
from indexer.errors import ArgumentError, DiskFullError, IndexCorruptError  # noqa: E402
from indexer.settings import IndexSettings  # noqa: E402
from indexer.snapshot import Snapshot  # noqa: E402


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


def cache_rows(path: Path, texts: list[str], vectors: np.ndarray) -> None:
    """Put rows for ``texts`` into the index's cache.db, as a write whose segment keeps only codes would."""
    snapshot = Snapshot.open(path, vectors=False)
    snapshot.close()
    embedding = snapshot.segments[0].meta.embedding
    cache = EmbeddingCache(path / layout.CACHE, vectors.shape[1])
    cache.put(digest_keys(embedding_digests(embedding + "|", texts)), vectors, 1)
    cache.close()


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
    assert not cache_holds_vectors(segmented / layout.CACHE)  # flat segments keep their vectors: the cache holds none
    with Index(segmented) as index:
        texts = [index.get_documents([i])[0]["text"] for i in ids]
    cache_rows(segmented, texts, before)
    assert damage_cache(segmented) == 50
    report = compact_index(segmented)
    assert report.merged == 3 and check_index(segmented)["problems"] == []
    assert np.array_equal(stored_vectors(segmented, ids), before)


def test_a_damaged_cache_row_is_encoded_again_with_a_warning(segmented, tmp_path):
    text = "a text no segment holds"
    reference = build_index(write_jsonl(tmp_path / "one.jsonl", [{"id": "x", "text": text}]), tmp_path / "reference",
                            IndexSettings(model=layout.read_manifest(manifest_file(segmented).parent).settings.model))
    assert reference.encoded == 1
    expected = stored_vectors(tmp_path / "reference", ["x"])
    cache_rows(segmented, [text], expected)
    damage_cache(segmented)
    report = upsert_documents(segmented, write_jsonl(tmp_path / "twin.jsonl", [{"id": "twin", "text": text}]))
    assert (report.encoded, report.reused) == (1, 0)
    assert any("1 cached vectors failed their check" in w for w in report.warnings), report.warnings
    assert np.allclose(stored_vectors(segmented, ["twin"]), expected, atol=1e-6)


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
                   IndexCorruptError.exit_code)


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
    one_line_error(indexer("query", segmented, "topic", "--mode", "keyword"), IndexCorruptError.exit_code)


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
        one_line_error(indexer("query", segmented, "topic 3", "--mode", mode), IndexCorruptError.exit_code, "damaged")
    one_line_error(indexer("upsert", segmented, write_jsonl(tmp_path / "x.jsonl", records(1, 90))), IndexCorruptError.exit_code)
    one_line_error(indexer("delete", segmented, "doc1"), IndexCorruptError.exit_code)
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
        one_line_error(indexer("query", segmented, "topic", "--where", "year<nineteen"), ArgumentError.exit_code, "year")
        one_line_error(indexer("query", segmented, "topic", "--where", "n<nineteen"), ArgumentError.exit_code, "n")
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
    for attempt in range(4):
        path = tmp_path / f"idx{attempt}"
        build = subprocess.Popen([sys.executable, "-m", "indexer", "build", str(source), "--index", str(path), "--model", str(tiny_model)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (path / layout.STAGING).exists() and build.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the write has begun
        time.sleep(float(rng.uniform(0.0, 3.0)))
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
            assert code in (0, DiskFullError.exit_code), done.stderr  # success, or no space left
            assert "Traceback" not in done.stderr, done.stderr
        assert check_index(path, all_versions=True)["problems"] == [], (verb, code)
        with Index(path) as index:
            served = {d["id"] for d in index.get_documents(sorted(live | after))}
            assert len(index) == len(served)
        assert served == after if code == 0 else served in (live, after), (verb, code, len(served), len(live), len(after))
        outcomes.append((verb, code))
        live = served
    assert {code for _, code in outcomes} >= {0, -signal.SIGKILL, DiskFullError.exit_code}, outcomes


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


# Damaged, missing and full storage, through the CLI.

def current_folder(path: Path) -> Path:
    return layout.version_dir(path, layout.current_version(path))


def base_segment(path: Path) -> Path:
    """The folder of the first segment the current version lists."""
    return layout.segment_dir(path, layout.read_manifest(current_folder(path)).segments[0])


def flip_bytes(file: Path, offset: int = -64, count: int = 8) -> None:
    data = bytearray(file.read_bytes())
    for i in range(count):
        data[offset + i] ^= 0xFF
    file.write_bytes(bytes(data))


# Writes verify what they carry over.


@pytest.mark.parametrize("damaged", [layout.VECTORS, layout.DOCUMENTS])
@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_writes_never_launder_a_damaged_segment(tmp_path, tiny_model, damaged, index_type):
    """Every write proves the version it starts from against its checksums and refuses a damaged one, before writing."""
    source = write_jsonl(tmp_path / "source.jsonl", records(40))
    path = tmp_path / "idx"
    build_index(source, path, IndexSettings(model=str(tiny_model), index_type=index_type))
    flip_bytes(base_segment(path) / damaged)
    before = tree_digest(path)
    extra = write_jsonl(tmp_path / "extra.jsonl", records(2, 100))
    for verb, *args in (("delete", "doc3"), ("compact",), ("upsert", str(extra))):
        message = one_line_error(run_cli(verb, str(path), *args, check=False), 6)
        assert "v000001 is damaged" in message and f"{damaged} does not match its checksum" in message and "nothing written" in message
    assert tree_digest(path) == before
    problems = check_index(path, all_versions=True)["problems"]
    assert {p.split(":")[0] for p in problems} == {"v000001"} and all(damaged in p for p in problems)
    # A damaged file that also changed size is named as such.
    with open(base_segment(path) / damaged, "ab") as f:
        f.write(b"\0" * 16)
    message = one_line_error(run_cli("delete", str(path), "doc4", check=False), 6)
    assert f"{damaged} has the wrong size" in message


def test_writes_refuse_a_missing_documents_file_and_rebuild_creates_nothing_in_it(tiny_index):
    folder = base_segment(tiny_index)
    (folder / layout.DOCUMENTS).unlink()
    before = tree_digest(tiny_index)
    assert "documents.db is missing" in one_line_error(run_cli("delete", str(tiny_index), "doc1", check=False), 6)
    extra = write_jsonl(tiny_index.parent / "extra.jsonl", records(1, 100))
    one_line_error(run_cli("upsert", str(tiny_index), str(extra), check=False), 6)
    # A rebuild must carry upserted documents over, which it cannot read: it refuses and names the way out.
    message = one_line_error(run_cli("rebuild", str(tiny_index), check=False), 6)
    assert "--prune-upserts" in message
    assert tree_digest(tiny_index) == before and not (folder / layout.DOCUMENTS).exists()
    report = json.loads(run_cli("rebuild", str(tiny_index), "--prune-upserts", "--json").stdout)
    assert report["version"] == "v000002" and report["documents"] == 40
    assert not (folder / layout.DOCUMENTS).exists()
    assert check_index(tiny_index)["problems"] == []


@pytest.mark.parametrize("manifest", ["[]", "{}", '{"format_version": 1, "settings": {}}', '{"format_version": 1, "dimension": "x"}', "not json"])
def test_a_damaged_manifest_is_one_line_for_every_reader(tiny_index, manifest):
    (current_folder(tiny_index) / layout.MANIFEST).write_text(manifest)
    for command in (["query", str(tiny_index), "x"], ["info", str(tiny_index)], ["upsert", str(tiny_index), "nope.jsonl"]):
        one_line_error(run_cli(*command, check=False), 6)
    result = run_cli("check", str(tiny_index), check=False)
    assert result.returncode == 6 and "manifest" in result.stderr and "Traceback" not in result.stderr


# The embedding cache is disposable.


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_cache_is_set_aside_and_rebuilt(tmp_path, tiny_model, damage):
    source = write_jsonl(tmp_path / "source.jsonl", records(300))
    path = tmp_path / "idx"
    build_index(source, path, IndexSettings(model=str(tiny_model), index_type="hnsw"))
    cache = path / layout.CACHE

    def spoil() -> None:
        if damage == "garbage":
            cache.write_bytes(os.urandom(50_000))
        else:
            cache.write_bytes(cache.read_bytes()[:8192])

    def one_warning(result) -> None:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("indexer: warning: "), result.stderr
        assert "cache.db" in lines[0] and "set aside" in lines[0]

    spoil()
    write_jsonl(source, [{**r, "n": -1} for r in records(301)])  # every document changed; one new text, looked up in the cache
    result = run_cli("rebuild", str(path), "--json")
    one_warning(result)
    report = json.loads(result.stdout)  # the 300 known texts come from the segment that keeps their vectors
    assert (report["encoded"], report["reused"]) == (1, 300) and (path / "cache.db.broken").exists()
    spoil()
    result = run_cli("upsert", str(path), str(write_jsonl(tmp_path / "new.jsonl", records(2, 500))), "--json")
    one_warning(result)
    assert json.loads(result.stdout)["documents"] == 303
    spoil()
    result = run_cli("delete", str(path), "doc1", "--json")  # only tidying up after it reads the cache
    one_warning(result)
    assert json.loads(result.stdout)["documents"] == 302
    assert check_index(path, all_versions=True)["problems"] == []
    with Index(path) as index:
        assert index.search("doc number 7 about topic 0", k=1)[0].id == "doc7"
    back = json.loads(run_cli("rebuild", str(path), "--json").stdout)
    assert (back["encoded"], back["reused"]) == (0, 1)  # doc1 is back, its vector from the segment still holding it
    write_jsonl(source, [{**r, "n": -2} for r in records(301)])
    changed = json.loads(run_cli("rebuild", str(path), "--json").stdout)
    assert (changed["encoded"], changed["reused"]) == (0, 301) and not cache_holds_vectors(cache)  # kept once: in segments


# A broken CURRENT pointer can be repaired with the tool.


def test_current_pointing_at_a_missing_version_is_recoverable(tmp_path, tiny_model):
    source = write_jsonl(tmp_path / "source.jsonl", records(30))
    path = tmp_path / "idx"
    build_index(source, path, IndexSettings(model=str(tiny_model)))
    upsert_documents(path, write_jsonl(tmp_path / "new.jsonl", records(1, 50)))
    (path / layout.POINTER).write_text("v000009\n")
    one_line_error(run_cli("query", str(path), "x", check=False), 6)
    checked = run_cli("check", str(path), "--all", "--json", check=False)
    result = json.loads(checked.stdout)
    assert checked.returncode == 6 and result["checked"] == ["v000001", "v000002"]
    assert len(result["problems"]) == 1 and "v000009" in result["problems"][0]
    rolled = json.loads(run_cli("rollback", str(path), "--to", "v000001", "--json").stdout)
    assert rolled == {"index": str(path), "version": "v000001", "previous": "v000009"}
    (path / layout.POINTER).write_text("v000009\n")
    assert json.loads(run_cli("rollback", str(path), "--json").stdout)["version"] == "v000002"  # the newest sound one
    (path / layout.POINTER).write_text("v000009\n")
    result = run_cli("build", str(source), "--index", str(path), "--model", str(tiny_model), "--json")
    assert json.loads(result.stdout)["version"] == "v000003"
    assert "v000009" in result.stderr and result.stderr.startswith("indexer: warning: ")
    assert check_index(path, all_versions=True)["problems"] == []


def test_a_build_never_writes_among_a_folders_own_files(tmp_path, tiny_model):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "text": "fine"}\nnot json\n')
    (tmp_path / "good.jsonl").write_text('{"id": "a", "text": "fine"}\n')
    for source in ("bad.jsonl", "good.jsonl"):
        result = run_cli("build", str(tmp_path / source), "--index", str(folder), "--model", str(tiny_model), check=False)
        assert result.returncode == 2 and f"{folder}: holds files of its own (notes.txt) and no index" in result.stderr
        assert [p.name for p in folder.iterdir()] == ["notes.txt"] and (folder / "notes.txt").read_text() == "keep me"
    # What a fresh volume or a file manager puts in any folder does not make it the user's.
    volume = tmp_path / "volume"
    (volume / "lost+found").mkdir(parents=True)
    (volume / ".DS_Store").write_bytes(b"\0")
    (volume / "cache.db-wal").write_bytes(b"")  # what a crashed first build can leave
    assert layout.foreign_names(volume) == []
    run_cli("build", str(tmp_path / "good.jsonl"), "--index", str(volume), "--model", str(tiny_model))
    assert layout.current_version(volume) == "v000001"


def test_writes_never_create_a_missing_index(tmp_path):
    missing = tmp_path / "nothing"
    for command in (["delete", str(missing), "a"], ["rollback", str(missing)], ["upsert", str(missing), "x.jsonl"]):
        assert run_cli(*command, check=False).returncode == 5
    assert not missing.exists()
    # Nor write into a folder that is no index (not even their lock file).
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("mine")
    for command in (["delete", str(data), "a"], ["rollback", str(data)], ["upsert", str(data), "x.jsonl"], ["compact", str(data)]):
        message = one_line_error(run_cli(*command, check=False), 5)
        assert message == f"indexer: error: {data}: not an index (no versions in it)"
    assert [p.name for p in data.iterdir()] == ["notes.txt"]


# A full disk.


@pytest.mark.slow
def test_disk_full_is_one_line_exit_8_and_leaves_the_index_as_it_was(small_disk, tmp_path, tiny_model):
    source = write_jsonl(tmp_path / "source.jsonl", records(40))
    path = small_disk / "idx"
    build_index(source, path, IndexSettings(model=str(tiny_model)))
    fill(small_disk, leave=64 * 1024)
    before = tree_digest(path)
    big = write_jsonl(tmp_path / "big.jsonl", [{"id": f"big{i}", "text": f"long text {i} " + "word " * 2000} for i in range(40)])
    assert "no space left on device" in one_line_error(run_cli("upsert", str(path), str(big), check=False), 8)
    assert "no space left on device" in one_line_error(
        run_cli("build", str(big), "--index", str(path), "--model", str(tiny_model), check=False), 8)
    assert tree_digest(path) == before and not (path / layout.STAGING).exists()
    assert check_index(path)["problems"] == []
    (small_disk / "filler").unlink()
    run_cli("upsert", str(path), str(big))


@pytest.mark.slow
@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_a_cache_on_a_full_disk_never_fails_a_write(small_disk, tmp_path, tiny_model, index_type):
    """The cache (a symlink onto a full disk) cannot be used; the version still publishes, with one warning.

    Every text changed, so the write encodes them all and its segment keeps them (nothing needs the cache).
    """
    source = write_jsonl(tmp_path / "source.jsonl", records(40))
    path = tmp_path / "idx"
    build_index(source, path, IndexSettings(model=str(tiny_model), index_type=index_type))
    cache = path / layout.CACHE
    shutil.move(cache, small_disk / layout.CACHE)
    cache.symlink_to(small_disk / layout.CACHE)
    fill(small_disk, leave=0)
    changed = write_jsonl(tmp_path / "changed.jsonl", [{**r, "text": r["text"] + " changed"} for r in records(40)])
    result = run_cli("upsert", str(path), str(changed), "--json")
    report = json.loads(result.stdout)
    assert report["published"] is True and report["version"] == "v000002" and report["encoded"] == 40
    assert layout.current_version(path) == "v000002"
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("indexer: warning: ") and "cache" in warnings[0], result.stderr
    assert check_index(path)["problems"] == []
