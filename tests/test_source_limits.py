"""Limits on what a source or an archive may hold: control characters in ids, folders of mixed files,
the size of a whole record, and imports of archives that only a deep check, a size cap or a depth cap catches."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import shutil
import tarfile

import pytest
from helpers import tree_digest, write_jsonl
from typer.testing import CliRunner

from indexer import IndexSettings, build_index, check_index, layout, upsert_documents
from indexer import archive as archive_module
from indexer.archive import SNAPSHOT
from indexer.cli import EXIT_CODES, app
from indexer.errors import IndexCorruptError, SourceError
from indexer.snapshot import Snapshot
from indexer.sources import DocumentSource, id_fault


def indexer(*args: str):
    """``indexer ARGS`` in this process (typer's CliRunner), so a test may lower a limit with monkeypatch."""
    return CliRunner().invoke(app, [str(a) for a in args], prog_name="indexer")


def one_line_error(result, code: int, *parts: str) -> str:
    """The one error line of a refused command, after checking its exit code, that no traceback came and ``parts``."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("indexer: error: "), result.stderr
    assert all(part in lines[0] for part in parts), lines[0]
    return lines[0]


# 1. An id may hold no control character, in any source format.


@pytest.mark.parametrize(
    "name, content, shown",
    [
        ("nul.jsonl", json.dumps({"id": "ok", "text": "fine"}) + "\n" + json.dumps({"id": "invoice-42\u0000x", "text": "t"}) + "\n",
         "nul.jsonl:2: id 'invoice-42\\x00x' holds the control character '\\x00' at character 11"),
        ("newline.csv", 'id,text\nok,fine\n"a\nb",t\n', "newline.csv:4: id 'a\\nb' holds the control character '\\n'"),
    ],
)
def test_an_id_with_a_control_character_fails_the_build(tmp_path, tiny_model, name, content, shown):
    source = tmp_path / name
    source.write_text(content)
    result = indexer("build", source, "--index", tmp_path / "idx", "--model", tiny_model)
    one_line_error(result, EXIT_CODES[SourceError], shown)
    assert not (tmp_path / "idx").exists()


def test_every_format_refuses_control_characters_in_ids(tmp_path):
    (tmp_path / "tab.tsv").write_text('id\ttext\n"a\tb"\tt\n')
    (tmp_path / "del.json").write_text(json.dumps({"a\u007fb": "text"}))
    (tmp_path / "c1.jsonl").write_text(json.dumps({"id": "a\u0085b", "text": "t"}) + "\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "line\nbreak.txt").write_text("text")
    for name, message in [("tab.tsv", r"tab\.tsv:2: id 'a\\tb' holds the control character '\\t'"),
                          ("del.json", r"del\.json: key 'a\\x7fb': id 'a\\x7fb' holds the control character '\\x7f'"),
                          ("c1.jsonl", r"c1\.jsonl:1: id 'a\\x85b' holds the control character '\\x85'"),
                          ("docs", r"docs: in the file name 'line\\nbreak\.txt', holds the control character '\\n'")]:
        with pytest.raises(SourceError, match=message) as caught:
            list(DocumentSource(tmp_path / name))
        assert "\n" not in str(caught.value)
    with pytest.raises(SourceError, match=r"^batch: record 1: id 'x\\ry' holds"):
        list(DocumentSource.from_records([{"id": "x\ry", "text": "t"}], name="batch"))
    assert id_fault("invoice-42") is None and id_fault("naïve ✓ 42") is None
    assert id_fault("a\u0000b") == "holds the control character '\\x00' at character 2; an id may hold no control characters"


# 13. A folder source reads Markdown and reStructuredText, and skips empty files and other types with a warning.


def test_a_folder_with_empty_markdown_and_other_files_builds(tmp_path, tiny_model):
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "empty.txt").touch()
    (notes / "blank.md").write_text("  \n\n")
    (notes / "plain.txt").write_text("plain text")
    (notes / "readme.md").write_text("# Rivers\n\nAbout rivers.")
    (notes / "sub" / "guide.rst").write_text("Guide\n=====\n\nMountains.")
    (notes / "long.markdown").write_text("*long* form")
    (notes / "scan.pdf").write_bytes(b"%PDF-1.4")
    (notes / ".DS_Store").write_bytes(b"\x00")  # hidden: not content, not worth a word
    result = indexer("build", notes, "--index", tmp_path / "idx", "--model", tiny_model, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["documents"] == 4
    assert f"indexer: warning: {notes}: skipped 2 empty files, 1 file of an unknown type (.pdf)" in result.stderr
    assert stored(tmp_path / "idx") == {"long": "*long* form", "plain": "plain text", "readme": "# Rivers\n\nAbout rivers.",
                                        "sub/guide": "Guide\n=====\n\nMountains."}
    source = DocumentSource(notes)
    assert len(list(source)) == 4
    assert source.warnings == [f"{notes}: skipped 2 empty files, 1 file of an unknown type (.pdf)"]


def test_a_folder_of_nothing_readable_says_what_it_holds(tmp_path):
    (tmp_path / "scans").mkdir()
    for name in ("a.pdf", "b.pdf", "c.docx"):
        (tmp_path / "scans" / name).write_bytes(b"binary")
    with pytest.raises(SourceError, match=r"scans: folder holds no \.txt files, nor \.md, \.markdown or \.rst; "
                                          r"it holds 3 files of an unknown type \(2 \.pdf, 1 \.docx\)$"):
        list(DocumentSource(tmp_path / "scans"))


def stored(path) -> dict[str, str]:
    """id -> text of every live document the current version of the index at ``path`` serves."""
    snapshot = Snapshot.open(path, vectors=False)
    try:
        rows = snapshot.fetch(snapshot.live_keys())
        return {row["id"]: row["text"] for row in rows.values()}
    finally:
        snapshot.close()


# 7d. The byte limit covers a whole record: its metadata as stored, not only its text.


def test_metadata_over_the_byte_limit_is_refused(tmp_path, tiny_model):
    source = write_jsonl(tmp_path / "d.jsonl", [{"id": "small", "text": "short", "tags": ["x"] * 10},
                                                {"id": "heavy", "text": "short", "notes": "é" * 600}])
    result = indexer("build", source, "--index", tmp_path / "idx", "--model", tiny_model, "--max-document-bytes", 1000)
    one_line_error(result, EXIT_CODES[SourceError],
                   "d.jsonl:2: text and metadata are 1218 bytes (1213 of metadata as stored), over the limit of 1000")
    assert not (tmp_path / "idx").exists()
    nested = DocumentSource.from_records([{"id": "a", "text": "t", "m": {"deep": [["y" * 200]]}}], name="batch", max_document_bytes=200)
    with pytest.raises(SourceError, match=r"^batch: record 1: text and metadata are 224 bytes \(223 of metadata as stored\)"):
        list(nested)
    stored_shape = DocumentSource.from_records([{"id": "a", "text": "t", "metadata": {"m": "z" * 300}}], name="put", max_document_bytes=200)
    with pytest.raises(SourceError, match=r"^put: record 1: text and metadata are 310 bytes \(309 of metadata as stored\)"):
        list(stored_shape)
    # Counting what is stored needs it as JSON: a Python object an API handed in is refused on one line, not later.
    dated = DocumentSource.from_records([{"id": "a", "text": "t", "metadata": {"day": datetime.date(2024, 1, 1)}}], name="api")
    with pytest.raises(SourceError, match=r"^api: record 1: metadata is not JSON \(Object of type date is not JSON serializable\)$"):
        list(dated)


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
    one_line_error(result, EXIT_CODES[IndexCorruptError], "two segments hold the same key", "nothing imported")
    assert not (tmp_path / "new").exists()
    shutil.copytree(path, tmp_path / "existing")
    before = tree_digest(tmp_path / "existing")
    result = indexer("import", crafted, "--index", tmp_path / "existing", "--as-version")
    one_line_error(result, EXIT_CODES[IndexCorruptError], "two segments hold the same key")
    assert tree_digest(tmp_path / "existing") == before


def test_import_refuses_json_members_over_the_size_limit(exported, tmp_path, monkeypatch):
    path, archive = exported
    files = members(archive)
    version = layout.current_version(path)
    limit = max(len(files[SNAPSHOT]), len(files[f"versions/{version}/manifest.json"])) + 100
    monkeypatch.setattr(archive_module, "MAX_JSON_BYTES", limit)
    assert indexer("import", archive, "--index", tmp_path / "fits").exit_code == 0  # the real archive is under it

    padded = repack(tmp_path / "padded.tar.gz", files, snapshot=files[SNAPSHOT] + b" " * 101)
    one_line_error(indexer("import", padded, "--index", tmp_path / "a"), EXIT_CODES[IndexCorruptError],
                   f"snapshot.json is {len(files[SNAPSHOT]) + 101} bytes, over the limit of {limit}")
    name = f"versions/{version}/manifest.json"
    big_manifest = repack(tmp_path / "manifest.tar.gz", {**files, name: files[name] + b" " * (limit - len(files[name]) + 1)})
    one_line_error(indexer("import", big_manifest, "--index", tmp_path / "b"), EXIT_CODES[IndexCorruptError],
                   f"{name} is {limit + 1} bytes, over the limit of {limit}")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_import_of_a_deeply_nested_snapshot_is_one_line(exported, tmp_path):
    _, archive = exported
    deep = repack(tmp_path / "deep.tar.gz", members(archive), snapshot=b"[" * 200_000 + b"]" * 200_000)
    one_line_error(indexer("import", deep, "--index", tmp_path / "deep"), EXIT_CODES[IndexCorruptError],
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
