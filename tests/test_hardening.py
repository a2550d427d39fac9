"""Damaged, missing and full storage, and what writes do with upserted documents: real CLI processes on real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import fill, run_cli, tree_digest, write_jsonl

from indexer import Index, build_index, check_index, delete_documents, layout, rebuild_index, upsert_documents
from indexer.settings import IndexSettings


def records(n: int, start: int = 0, prefix: str = "doc") -> list[dict]:
    return [{"id": f"{prefix}{i}", "text": f"{prefix} number {i} about topic {i % 7}", "n": i} for i in range(start, start + n)]


@pytest.fixture
def tiny_index(tmp_path, tiny_model):
    """A 40-document flat index of the tiny model, built from tmp_path/source.jsonl."""
    source = write_jsonl(tmp_path / "source.jsonl", records(40))
    path = tmp_path / "idx"
    build_index(source, path, IndexSettings(model=str(tiny_model)))
    return path


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


def one_error_line(result: subprocess.CompletedProcess, code: int) -> str:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("indexer: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


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
        message = one_error_line(run_cli(verb, str(path), *args, check=False), 6)
        assert "v000001 is damaged" in message and f"{damaged} does not match its checksum" in message and "nothing written" in message
    assert tree_digest(path) == before
    problems = check_index(path, all_versions=True)["problems"]
    assert {p.split(":")[0] for p in problems} == {"v000001"} and all(damaged in p for p in problems)
    # A damaged file that also changed size is named as such.
    with open(base_segment(path) / damaged, "ab") as f:
        f.write(b"\0" * 16)
    message = one_error_line(run_cli("delete", str(path), "doc4", check=False), 6)
    assert f"{damaged} has the wrong size" in message


def test_writes_refuse_a_missing_documents_file_and_rebuild_creates_nothing_in_it(tiny_index):
    folder = base_segment(tiny_index)
    (folder / layout.DOCUMENTS).unlink()
    before = tree_digest(tiny_index)
    assert "documents.db is missing" in one_error_line(run_cli("delete", str(tiny_index), "doc1", check=False), 6)
    extra = write_jsonl(tiny_index.parent / "extra.jsonl", records(1, 100))
    one_error_line(run_cli("upsert", str(tiny_index), str(extra), check=False), 6)
    # A rebuild must carry upserted documents over, which it cannot read: it refuses and names the way out.
    message = one_error_line(run_cli("rebuild", str(tiny_index), check=False), 6)
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
        one_error_line(run_cli(*command, check=False), 6)
    result = run_cli("check", str(tiny_index), check=False)
    assert result.returncode == 6 and "manifest" in result.stderr and "Traceback" not in result.stderr


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
    write_jsonl(source, [{**r, "n": -1} for r in records(301)])  # every document changed, so every text goes to the cache
    result = run_cli("rebuild", str(path), "--json")
    one_warning(result)
    assert json.loads(result.stdout)["encoded"] == 301 and (path / "cache.db.broken").exists()
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
    assert json.loads(run_cli("rebuild", str(path), "--json").stdout)["encoded"] == 1  # doc1 is back
    write_jsonl(source, [{**r, "n": -2} for r in records(301)])
    changed = json.loads(run_cli("rebuild", str(path), "--json").stdout)
    assert (changed["encoded"], changed["reused"]) == (300, 1)  # the new cache holds doc1
    write_jsonl(source, [{**r, "n": -3} for r in records(301)])
    again = json.loads(run_cli("rebuild", str(path), "--json").stdout)
    assert (again["encoded"], again["reused"]) == (0, 301)  # the new cache works


# A broken CURRENT pointer can be repaired with the tool.


def test_current_pointing_at_a_missing_version_is_recoverable(tmp_path, tiny_model):
    source = write_jsonl(tmp_path / "source.jsonl", records(30))
    path = tmp_path / "idx"
    build_index(source, path, IndexSettings(model=str(tiny_model)))
    upsert_documents(path, write_jsonl(tmp_path / "new.jsonl", records(1, 50)))
    (path / layout.POINTER).write_text("v000009\n")
    one_error_line(run_cli("query", str(path), "x", check=False), 6)
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
        message = one_error_line(run_cli(*command, check=False), 5)
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
    assert "no space left on device" in one_error_line(run_cli("upsert", str(path), str(big), check=False), 8)
    assert "no space left on device" in one_error_line(
        run_cli("build", str(big), "--index", str(path), "--model", str(tiny_model), check=False), 8)
    assert tree_digest(path) == before and not (path / layout.STAGING).exists()
    assert check_index(path)["problems"] == []
    (small_disk / "filler").unlink()
    run_cli("upsert", str(path), str(big))


@pytest.mark.slow
@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_a_cache_on_a_full_disk_never_fails_a_write(small_disk, tmp_path, tiny_model, index_type):
    """The cache (a symlink onto a full disk) cannot be used; the version still publishes, with one warning.

    HNSW is rebuilt on upsert: its new vectors come from the write itself, not the cache.
    """
    source = write_jsonl(tmp_path / "source.jsonl", records(40))
    path = tmp_path / "idx"
    build_index(source, path, IndexSettings(model=str(tiny_model), index_type=index_type))
    cache = path / layout.CACHE
    shutil.move(cache, small_disk / layout.CACHE)
    cache.symlink_to(small_disk / layout.CACHE)
    fill(small_disk, leave=0)
    changed = write_jsonl(tmp_path / "changed.jsonl", [{**r, "n": -1} for r in records(40)])
    result = run_cli("upsert", str(path), str(changed), "--json")
    report = json.loads(result.stdout)
    assert report["published"] is True and report["version"] == "v000002" and report["encoded"] == 40
    assert layout.current_version(path) == "v000002"
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("indexer: warning: ") and "cache" in warnings[0], result.stderr
    assert check_index(path)["problems"] == []
