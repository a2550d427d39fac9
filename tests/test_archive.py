"""Snapshots: ``indexer export`` / ``indexer import`` round trips, and archives that must be refused."""

from __future__ import annotations

import io
import json
import sqlite3
import tarfile

import faiss
import numpy as np
import pytest
from helpers import run_cli, tree_digest, write_jsonl

from indexer import IndexSettings, build_index, check_index, delete_documents, layout, upsert_documents
from indexer.archive import SNAPSHOT
from indexer.cli import EXIT_CODES
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
    assert refused.returncode == EXIT_CODES[ArgumentError] and "--as-version" in refused.stderr
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
    assert result.returncode == EXIT_CODES[IndexCorruptError], result.stderr
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
    assert result.returncode == EXIT_CODES[ArgumentError] and "neither empty nor an index" in result.stderr
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    missing_folder = run_cli("export", str(segmented), "-o", str(tmp_path / "nowhere" / "x.tar.gz"), check=False)
    assert missing_folder.returncode == EXIT_CODES[ArgumentError] and "cannot write the archive" in missing_folder.stderr
    assert "Traceback" not in missing_folder.stderr
