"""Snapshots: ``indexer export`` / ``indexer import`` round trips, archives that must be refused, and imports that only a
deep check, a size cap or a depth cap catches, or that retry after a killed import."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sqlite3
import tarfile

import faiss
import numpy as np
import pytest
from helpers import indexer, one_line_error, run_cli, stored, tree_digest, write_jsonl

from indexer import IndexSettings, build_index, check_index, delete_documents, layout, upsert_documents
from indexer import archive as archive_module
from indexer.archive import SNAPSHOT
from indexer.errors import ArgumentError, IndexCorruptError


def documents(path, n: int, tag: str):
    return write_jsonl(path, [{"id": f"{tag}{i}", "text": f"{tag} document {i} about {'rivers' if i % 2 else 'mountains'}",
                               "colour": "red" if i % 3 else "blue"} for i in range(n)])


def contents(path) -> dict[str, tuple[str, str, bytes]]:
    """id -> (text, metadata, vector bytes) of every live document the current version serves."""
    manifest = layout.read_manifest(layout.version_dir(path, layout.current_version(path)))
    deleted = set(np.load(layout.version_dir(path, manifest.version) / layout.DELETED).tolist())
    found = {}
    for name in manifest.segments:
        folder = layout.segment_dir(path, name)
        vectors = faiss.read_index(str(folder / layout.VECTORS))
        with sqlite3.connect(folder / layout.DOCUMENTS) as db:
            for key, doc_id, text, metadata in db.execute("SELECT key, id, text, metadata FROM documents"):
                if key not in deleted:
                    found[doc_id] = (text, metadata, vectors.reconstruct(key).tobytes())
    return found


@pytest.fixture(scope="module")
def segmented(tmp_path_factory, tiny_model):
    """An index of three segments with deletions: a build, an upsert, a delete."""
    folder = tmp_path_factory.mktemp("archive")
    path = folder / "source-index"
    build_index(documents(folder / "a.jsonl", 60, "a"), path, IndexSettings(model=str(tiny_model)))
    upsert_documents(path, documents(folder / "b.jsonl", 20, "b"))
    delete_documents(path, ["a3", "a4", "b1"])
    return path


def test_export_import_round_trip_keeps_ids_texts_and_vectors_bit_for_bit(segmented, tmp_path):
    archive = tmp_path / "backup.tar.gz"
    exported = json.loads(run_cli("export", str(segmented), "-o", str(archive), "--json").stdout)
    assert exported["version"] == layout.current_version(segmented) and exported["documents"] == 77
    imported = json.loads(run_cli("import", str(archive), "--index", str(tmp_path / "restored"), "--json").stdout)
    restored = tmp_path / "restored"
    assert imported["version"] == imported["source_version"] == exported["version"]
    assert contents(restored) == contents(segmented) and len(contents(restored)) == 77
    assert check_index(restored)["problems"] == []
    assert run_cli("check", str(restored)).returncode == 0
    first = run_cli("query", str(segmented), "rivers", "-k", "5", "--json").stdout
    assert run_cli("query", str(restored), "rivers", "-k", "5", "--json").stdout == first


def test_export_names_a_version_and_does_not_wait_for_the_writer(segmented, tmp_path):
    versions = layout.list_versions(segmented)
    archive = tmp_path / "older.tar.gz"
    with layout.writer_lock(segmented, 0, "test"):  # a writer at work: export neither waits nor fails
        run_cli("export", str(segmented), "-o", str(archive), "--version", versions[0])
    with tarfile.open(archive) as tar:
        assert tar.getnames()[0] == SNAPSHOT
        snapshot = json.loads(tar.extractfile(SNAPSHOT).read())
    assert snapshot["version"] == versions[0]
    assert f"versions/{versions[0]}/manifest.json" in snapshot["files"]


def test_import_as_version_publishes_over_an_existing_index_and_rollback_undoes_it(segmented, tmp_path, tiny_model):
    archive = tmp_path / "backup.tar.gz"
    run_cli("export", str(segmented), "-o", str(archive))
    other = tmp_path / "other"
    build_index(documents(tmp_path / "c.jsonl", 10, "c"), other, IndexSettings(model=str(tiny_model)))
    before = contents(other)
    refused = run_cli("import", str(archive), "--index", str(other), check=False)
    assert refused.returncode == ArgumentError.exit_code and "--as-version" in refused.stderr
    assert contents(other) == before
    report = json.loads(run_cli("import", str(archive), "--index", str(other), "--as-version", "--json").stdout)
    assert report["version"] == "v000002" and report["source_version"] == layout.current_version(segmented)
    assert contents(other) == contents(segmented)
    assert set(report["segments"]).isdisjoint(layout.read_manifest(layout.version_dir(other, "v000001")).segments)
    assert check_index(other, all_versions=True)["problems"] == []
    run_cli("rollback", str(other))
    assert contents(other) == before


def refused_import(archive, target, existing=None) -> str:
    digest = tree_digest(existing) if existing is not None else None
    result = run_cli("import", str(archive), "--index", str(target), *(["--as-version"] if existing else []), check=False)
    assert result.returncode == IndexCorruptError.exit_code, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "nothing imported" in result.stderr
    if existing is not None:
        assert tree_digest(existing) == digest
    else:
        assert not target.exists()
    return result.stderr


def test_truncated_or_damaged_archives_are_refused_and_nothing_is_published(segmented, tmp_path):
    archive = tmp_path / "backup.tar.gz"
    run_cli("export", str(segmented), "-o", str(archive))
    data = archive.read_bytes()
    for cut in (len(data) // 2, len(data) - 30):
        truncated = tmp_path / f"cut-{cut}.tar.gz"
        truncated.write_bytes(data[:cut])
        message = refused_import(truncated, tmp_path / f"new-{cut}")
        assert str(truncated) in message
        refused_import(truncated, segmented, existing=segmented)
    (tmp_path / "junk.tar.gz").write_bytes(b"not an archive at all")
    assert "damaged or truncated" in refused_import(tmp_path / "junk.tar.gz", tmp_path / "junk")

    # A member whose bytes changed after export, repacked with the original snapshot.json: its checksum catches it.
    tampered = tmp_path / "tampered.tar.gz"
    with tarfile.open(archive) as source, tarfile.open(tampered, "w:gz") as out:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if member.name.endswith(layout.DOCUMENTS):
                data = data.replace(b"mountains", b"mountainz", 1)
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    assert "does not match its checksum" in refused_import(tampered, tmp_path / "tampered")

    # A member the snapshot does not list (here one escaping the index folder) is refused before it is written.
    escaping = tmp_path / "escaping.tar.gz"
    with tarfile.open(archive) as source, tarfile.open(escaping, "w:gz") as out:
        for member in source.getmembers():
            out.addfile(member, source.extractfile(member))
        evil = tarfile.TarInfo("../evil.txt")
        evil.size = 4
        out.addfile(evil, io.BytesIO(b"evil"))
    assert "unexpected member" in refused_import(escaping, tmp_path / "escaping")
    assert not (tmp_path / "evil.txt").exists()


def test_import_refuses_a_folder_that_holds_something_else(segmented, tmp_path):
    archive = tmp_path / "backup.tar.gz"
    run_cli("export", str(segmented), "-o", str(archive))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    result = run_cli("import", str(archive), "--index", str(busy), check=False)
    assert result.returncode == ArgumentError.exit_code and "neither empty nor an index" in result.stderr
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    missing_folder = run_cli("export", str(segmented), "-o", str(tmp_path / "nowhere" / "x.tar.gz"), check=False)
    assert missing_folder.returncode == ArgumentError.exit_code and "cannot write the archive" in missing_folder.stderr
    assert "Traceback" not in missing_folder.stderr


# Imports: what 'indexer check' would reject, oversized and deeply nested JSON, a retry after a killed import.


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model):
    """An index of two segments (a build, then an upsert of new ids) and its archive."""
    folder = tmp_path_factory.mktemp("limits")
    path = folder / "index"
    build_index(write_jsonl(folder / "a.jsonl", [{"id": f"a{i}", "text": f"about rivers {i}"} for i in range(6)]), path,
                IndexSettings(model=str(tiny_model)))
    upsert_documents(path, write_jsonl(folder / "b.jsonl", [{"id": f"b{i}", "text": f"about mountains {i}"} for i in range(4)]))
    assert len(layout.read_manifest(layout.version_dir(path, layout.current_version(path))).segments) == 2
    archive = folder / "index.tar.gz"
    assert indexer("export", path, "-o", archive).exit_code == 0
    return path, archive


def members(archive) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def repack(target, files: dict[str, bytes], snapshot: bytes | None = None):
    """An archive of ``files`` whose snapshot.json lists each with its true checksum and size (or is ``snapshot``)."""
    if snapshot is None:
        described = json.loads(files[SNAPSHOT])
        described["files"] = {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                              for name, data in files.items() if name != SNAPSHOT}
        snapshot = json.dumps(described, indent=2).encode()
    with tarfile.open(target, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [(SNAPSHOT, snapshot), *((n, d) for n, d in files.items() if n != SNAPSHOT)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return target


def resealed(description: dict) -> bytes:
    """A manifest or segment description as JSON, with its own checksum made right where the format has one."""
    if "checksum" in description:
        description["checksum"] = layout.json_checksum(description)
    return json.dumps(description, indent=2).encode()


def test_import_refuses_an_archive_whose_segments_hold_the_same_keys(exported, tmp_path):
    path, archive = exported
    files = members(archive)
    version = layout.current_version(path)
    manifest = json.loads(files[f"versions/{version}/manifest.json"])
    first, second = manifest["segments"]
    # The second segment becomes a copy of the first (its own name in segment.json); the counts and every
    # checksum agree, so only the keys the two segments share tell.
    files = {n: d for n, d in files.items() if not n.startswith(f"segments/{second}/")}
    for name, data in list(files.items()):
        if name.startswith(f"segments/{first}/"):
            if name.endswith(layout.SEGMENT_META):
                data = resealed({**json.loads(data), "name": second})
            files[name.replace(first, second)] = data
    count = json.loads(files[f"segments/{first}/segment.json"])["count"]
    files[f"versions/{version}/manifest.json"] = resealed({**manifest, "count": 2 * count})
    crafted = repack(tmp_path / "crafted.tar.gz", files)

    result = indexer("import", crafted, "--index", tmp_path / "new")
    one_line_error(result, IndexCorruptError.exit_code, "two segments hold the same key", "nothing imported")
    assert not (tmp_path / "new").exists()
    shutil.copytree(path, tmp_path / "existing")
    before = tree_digest(tmp_path / "existing")
    result = indexer("import", crafted, "--index", tmp_path / "existing", "--as-version")
    one_line_error(result, IndexCorruptError.exit_code, "two segments hold the same key")
    assert tree_digest(tmp_path / "existing") == before


def test_import_refuses_json_members_over_the_size_limit(exported, tmp_path, monkeypatch):
    path, archive = exported
    files = members(archive)
    version = layout.current_version(path)
    limit = max(len(files[SNAPSHOT]), len(files[f"versions/{version}/manifest.json"])) + 100
    monkeypatch.setattr(archive_module, "MAX_JSON_BYTES", limit)
    assert indexer("import", archive, "--index", tmp_path / "fits").exit_code == 0  # the real archive is under it

    padded = repack(tmp_path / "padded.tar.gz", files, snapshot=files[SNAPSHOT] + b" " * 101)
    one_line_error(indexer("import", padded, "--index", tmp_path / "a"), IndexCorruptError.exit_code,
                   f"snapshot.json is {len(files[SNAPSHOT]) + 101} bytes, over the limit of {limit}")
    name = f"versions/{version}/manifest.json"
    big_manifest = repack(tmp_path / "manifest.tar.gz", {**files, name: files[name] + b" " * (limit - len(files[name]) + 1)})
    one_line_error(indexer("import", big_manifest, "--index", tmp_path / "b"), IndexCorruptError.exit_code,
                   f"{name} is {limit + 1} bytes, over the limit of {limit}")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_import_of_a_deeply_nested_snapshot_is_one_line(exported, tmp_path):
    _, archive = exported
    deep = repack(tmp_path / "deep.tar.gz", members(archive), snapshot=b"[" * 200_000 + b"]" * 200_000)
    one_line_error(indexer("import", deep, "--index", tmp_path / "deep"), IndexCorruptError.exit_code,
                   "unreadable snapshot.json (nested too deeply)", "nothing imported")
    assert not (tmp_path / "deep").exists()


def test_import_retries_into_the_folder_a_killed_import_left(exported, tmp_path):
    path, archive = exported
    files = members(archive)
    target = tmp_path / "restored"
    # What an import killed before publishing leaves: the lock file, its staging folder, a segment renamed
    # into place (under the name the retry gives it too), an empty versions/ and a pointer not yet renamed.
    partial = target / layout.STAGING / "4242-0badc0de" / "segments" / "s000002"
    partial.mkdir(parents=True)
    (partial / layout.DOCUMENTS).write_bytes(b"SQLite format 3\x00 cut short")
    first = json.loads(files[f"versions/{layout.current_version(path)}/manifest.json"])["segments"][0]
    (target / layout.SEGMENTS / first).mkdir(parents=True)
    (target / layout.SEGMENTS / first / layout.KEYS).write_bytes(files[f"segments/{first}/{layout.KEYS}"][:20])
    (target / layout.VERSIONS).mkdir()
    (target / layout.LOCK).write_text("pid 4242, import since 2024-01-01T00:00:00Z")
    (target / "CURRENT.4242.tmp").write_text("v000002\n")

    result = indexer("import", archive, "--index", target, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["documents"] == 10
    assert check_index(target)["problems"] == []
    assert stored(target) == stored(path)
    assert sorted(layout.list_segments(target)) == sorted(layout.read_manifest(
        layout.version_dir(target, layout.current_version(target))).segments)
    assert not (target / layout.STAGING).exists() or not any((target / layout.STAGING).iterdir())
