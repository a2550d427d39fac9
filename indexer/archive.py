"""Snapshots: one version of an index as a ``.tar.gz`` with checksums (``export_index``), and back (``import_index``).

An archive holds ``snapshot.json`` first (what it is, and the SHA-256 and
size of every other member), then the version's folder and every segment it
lists, under the names they have in the index::

    snapshot.json
    versions/v000007/manifest.json, deleted.npy
    segments/s000001/segment.json, documents.db, vectors.faiss, keys.npy, lengths.npy

Versions and segments are immutable, so exporting one is consistent while
readers and writers carry on: every file is opened before the first byte is
written (a writer pruning the version meanwhile cannot take it away), and
each is checked against the checksum its manifest or segment recorded on the
way into the archive. Importing checks every member against
``snapshot.json``, then the unpacked version as ``indexer check`` would,
before anything is published; a damaged, truncated, inconsistent or foreign
archive publishes nothing. JSON members are read whole, so each may hold at
most ``MAX_JSON_BYTES``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from . import layout
from .check import check_version
from .errors import ArgumentError, DiskFullError, IndexCorruptError, IndexNotFoundError
from .settings import WriteOptions
from .write import BuildReport, disk_full, existing_index, transaction

SNAPSHOT = "snapshot.json"
SNAPSHOT_FORMAT = 1
SNAPSHOT_KIND = "indexer-snapshot"
# gzip's fastest level: vectors hardly compress at any level, and backups should cost what copying costs.
COMPRESS_LEVEL = 1
# A member's name: a version's or a segment's folder, then a plain file name.
MEMBER = re.compile(r"^(versions/v\d{6,}|segments/s\d{6,})/[A-Za-z0-9][A-Za-z0-9._-]*$")
BLOCK = 1 << 20
# The most a JSON member (snapshot.json, a manifest, a segment description) may hold: a real one is kilobytes.
MAX_JSON_BYTES = 64 << 20


@dataclass
class Member:
    """A file on its way into an archive: its name there, the open file, and the checksum it must have."""

    name: str
    file: IO[bytes]
    sha256: str
    size: int


@dataclass
class ImportReport:
    """What ``import_index`` published: ``version`` of ``index``, from ``source_version`` of the archive."""

    index: str
    version: str
    source_version: str
    documents: int
    segments: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "version": self.version, "source_version": self.source_version,
                "documents": self.documents, "segments": self.segments, "warnings": self.warnings}


def export_index(index: str | Path, output: str | Path, *, version: str | None = None) -> dict[str, Any]:
    """Write ``version`` (default: the current one) of ``index`` to ``output`` (a ``.tar.gz``), atomically.

    Returns ``{"index", "version", "archive", "documents", "files", "bytes"}``.
    """
    path = existing_index(index)
    output = Path(output)
    if not output.name.endswith((".tar.gz", ".tgz")):
        raise ArgumentError(f"{output}: an archive's name must end in .tar.gz or .tgz")
    for attempt in range(3):
        name = version or layout.current_version(path)
        try:
            manifest, members = _open_version(path, name)
            break
        except FileNotFoundError:
            # Only a writer pruning this version between reading CURRENT and opening its files gets here.
            if version is not None:
                raise IndexNotFoundError(f"{path}: no version {name}; 'indexer info {path}' lists the versions on disk") from None
            if attempt == 2:
                raise IndexNotFoundError(f"{path}: version {name} is gone (pruned by a writer while exporting)") from None
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        files = {m.name: {"sha256": m.sha256, "size": m.size} for m in members}
        snapshot = {"kind": SNAPSHOT_KIND, "format": SNAPSHOT_FORMAT, "index": path.name, "version": name,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "documents": manifest.count,
                    "files": files}
        with tarfile.open(tmp, "w:gz", compresslevel=COMPRESS_LEVEL, format=tarfile.PAX_FORMAT) as tar:
            for member in [_in_memory(SNAPSHOT, json.dumps(snapshot, indent=2).encode()), *members]:
                _add(tar, member)
        layout.fsync_file(tmp)
        os.replace(tmp, output)
    except IndexCorruptError as exc:
        raise IndexCorruptError(f"{path}: version {name}: {exc}; nothing exported") from None
    except OSError as exc:
        if disk_full(exc, tmp.parent):
            raise DiskFullError(f"{output}: no space left on device; nothing exported") from None
        raise ArgumentError(f"{output}: cannot write the archive ({exc.strerror or exc})") from None
    finally:
        for member in members:
            member.file.close()
        tmp.unlink(missing_ok=True)
    return {"index": str(path), "version": name, "archive": str(output), "documents": manifest.count,
            "files": len(members) + 1, "bytes": output.stat().st_size}


def _open_version(path: Path, name: str) -> tuple[layout.Manifest, list[Member]]:
    """The manifest of version ``name`` and every file it and its segments hold, opened."""
    folder = layout.version_dir(path, name)
    if not folder.is_dir():
        raise FileNotFoundError(folder)
    members: list[Member] = []
    try:
        manifest_bytes = (folder / layout.MANIFEST).read_bytes()
        manifest = layout.read_manifest(folder)
        if manifest.legacy:
            raise ArgumentError(f"{path}: version {name} is in index format 1; any write (or 'indexer compact') converts it first")
        members.append(_in_memory(f"{layout.VERSIONS}/{name}/{layout.MANIFEST}", manifest_bytes))
        for file, checksum in sorted(manifest.files.items()):
            members.append(_opened(f"{layout.VERSIONS}/{name}/{file}", folder / file, checksum))
        for segment in manifest.segments:
            where = layout.segment_dir(path, segment)
            meta_bytes = (where / layout.SEGMENT_META).read_bytes()
            meta = layout.read_segment_meta(where)
            members.append(_in_memory(f"{layout.SEGMENTS}/{segment}/{layout.SEGMENT_META}", meta_bytes))
            for file, checksum in sorted(meta.files.items()):
                members.append(_opened(f"{layout.SEGMENTS}/{segment}/{file}", where / file, checksum))
    except BaseException:
        for member in members:
            member.file.close()
        raise
    return manifest, members


def _in_memory(name: str, data: bytes) -> Member:
    return Member(name, io.BytesIO(data), hashlib.sha256(data).hexdigest(), len(data))


def _opened(name: str, file: Path, checksum: str) -> Member:
    handle = open(file, "rb")  # noqa: SIM115 (the Member holds it open until the archive is written)
    return Member(name, handle, checksum, os.fstat(handle.fileno()).st_size)


class _Hashing(io.RawIOBase):
    """A reader that hashes what passes through it."""

    def __init__(self, source: IO[bytes]):
        self.source, self.digest = source, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.source.read(len(buffer))
        self.digest.update(data)
        buffer[: len(data)] = data
        return len(data)


def _add(tar: tarfile.TarFile, member: Member) -> None:
    """Add ``member``, failing unless the bytes written have its checksum."""
    info = tarfile.TarInfo(member.name)
    info.size, info.mtime, info.mode = member.size, int(time.time()), 0o644
    reader = _Hashing(member.file)
    tar.addfile(info, reader)
    if reader.digest.hexdigest() != member.sha256:
        raise IndexCorruptError(f"{member.name} does not match its checksum")


def import_index(archive: str | Path, index: str | Path, *, as_version: bool = False,
                 options: WriteOptions | None = None) -> ImportReport:
    """Publish the version held in ``archive`` (from ``export_index``) as a new index at ``index``.

    With ``as_version``, ``index`` may exist already: the snapshot becomes its
    new current version (its segments take fresh names; older versions stay
    for ``rollback`` as ``keep`` allows). Every member is checked against the
    archive's checksums, and everything is written to disk (fsynced), before
    anything is published.
    """
    options = options or WriteOptions()
    archive = Path(archive)
    if not archive.is_file():
        raise ArgumentError(f"{archive}: no such file")
    path = layout.index_path(index)
    if path.exists() and not path.is_dir():
        raise ArgumentError(f"{path}: not a folder")
    if path.is_dir() and not layout.holds_index(path) and layout.foreign_names(path):
        # Only what an index writes (what a killed first write leaves) may be there: never the user's own files.
        raise ArgumentError(f"{path}: a folder that is neither empty nor an index; import into a new or empty folder")
    path.mkdir(parents=True, exist_ok=True)
    with transaction(path, "import", options.wait) as txn:
        existing = layout.holds_index(path)
        if existing and not as_version:
            raise ArgumentError(f"{path}: an index is there already; pass --as-version to publish the snapshot as its new version")
        if not existing:  # segments a killed write left (no version lists them) would be in the way of the archive's
            for name in layout.list_segments(path):
                layout.discard(layout.segment_dir(path, name))
        staging = layout.new_staging(path)
        try:
            snapshot = _extract(archive, staging)
        except OSError as exc:
            if disk_full(exc, path):
                raise
            raise ArgumentError(f"{archive}: cannot be unpacked into {path} ({exc.strerror or exc}); nothing imported") from None
        source_version = snapshot["version"]
        folder = staging / layout.VERSIONS / source_version
        manifest = layout.read_manifest(folder)
        segments = sorted(p.name for p in (staging / layout.SEGMENTS).iterdir()) if (staging / layout.SEGMENTS).is_dir() else []
        if manifest.legacy or not segments or sorted(manifest.segments) != segments or manifest.version != source_version:
            raise IndexCorruptError(f"{archive}: its manifest does not list the segments it holds; nothing imported")
        # Every file was checked against snapshot.json; these say that what the index records agrees with it,
        # and the staging folder, laid out as an index, passes what 'indexer check' checks.
        problems = _disagreeing(snapshot, f"{layout.VERSIONS}/{source_version}", manifest.files, [layout.DELETED])
        metas = {name: layout.read_segment_meta(staging / layout.SEGMENTS / name) for name in manifest.segments}
        for name, meta in metas.items():
            problems += _disagreeing(snapshot, f"{layout.SEGMENTS}/{name}", meta.files, [])
        problems = problems or check_version(staging, source_version)
        if problems:
            raise IndexCorruptError(f"{archive}: {problems[0]}; nothing imported")
        # Into an existing index the segments come under fresh names (it may have segments of the same names).
        renamed = {name: txn.allocate() if existing else name for name in manifest.segments}
        (path / layout.SEGMENTS).mkdir(exist_ok=True)
        for old, new in renamed.items():
            where, meta = staging / layout.SEGMENTS / old, metas[old]
            meta.name = new
            meta.checksum = layout.json_checksum(meta.to_dict())
            (where / layout.SEGMENT_META).write_text(json.dumps(meta.to_dict(), indent=2) + "\n")
            layout.fsync_file(where / layout.SEGMENT_META)
            layout.fsync_dir(where)
            os.rename(where, layout.segment_dir(path, new))
        layout.fsync_dir(path / layout.SEGMENTS)
        manifest.segments = [renamed[name] for name in manifest.segments]
        report = BuildReport(index=str(path), version="", documents=manifest.count)
        if existing:
            version_staging = layout.new_staging(path)
            os.replace(folder / layout.DELETED, version_staging / layout.DELETED)
            report.version = layout.publish(path, version_staging, manifest)
        else:  # a new index keeps the version's name
            layout.fsync_dir(folder)
            (path / layout.VERSIONS).mkdir(exist_ok=True)
            os.rename(folder, layout.version_dir(path, source_version))
            layout.fsync_dir(path / layout.VERSIONS)
            layout.point_to(path, source_version)
            report.version = source_version
        txn.tidy(options.keep, report)
    return ImportReport(str(path), report.version, source_version, manifest.count, manifest.segments, report.warnings)


def _disagreeing(snapshot: dict[str, Any], folder: str, recorded: dict[str, str], required: list[str]) -> list[str]:
    """Files of ``folder`` whose checksum in a manifest or segment (``recorded``) is not the archive's, or is missing."""
    files = snapshot["files"]
    return [f"{folder}/{name} does not match its recorded checksum" for name in sorted({*recorded, *required})
            if name not in recorded or files.get(f"{folder}/{name}", {}).get("sha256") != recorded[name]]


def _extract(archive: Path, staging: Path) -> dict[str, Any]:
    """Unpack ``archive`` into ``staging``, checking each member against ``snapshot.json``; returns it."""

    def refuse(reason: str) -> IndexCorruptError:
        return IndexCorruptError(f"{archive}: {reason}; nothing imported")

    try:
        with tarfile.open(archive, "r:gz") as tar:
            first = tar.next()
            if first is None or first.name != SNAPSHOT or not first.isfile():
                raise refuse("not an indexer snapshot (it does not start with snapshot.json)")
            snapshot = _snapshot(_read_json(tar, first, refuse), refuse)
            expected, seen = snapshot["files"], set()
            for member in tar:
                if member is first:  # iterating a tar file starts from its first member again
                    continue
                if member.name not in expected or member.name in seen or not member.isfile():
                    raise refuse(f"unexpected member {member.name!r}")
                if member.size != expected[member.name]["size"]:
                    raise refuse(f"{member.name} does not have the size snapshot.json gives")
                if member.name.endswith(".json"):  # the import reads it whole
                    _check_json_size(member, refuse)
                target = staging / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                digest, size, source = hashlib.sha256(), 0, tar.extractfile(member)
                with open(target, "wb") as out:
                    while block := source.read(BLOCK):
                        digest.update(block)
                        size += len(block)
                        out.write(block)
                    out.flush()
                    os.fsync(out.fileno())
                if digest.hexdigest() != expected[member.name]["sha256"] or size != expected[member.name]["size"]:
                    raise refuse(f"{member.name} does not match its checksum")
                seen.add(member.name)
            while tar.fileobj.read(BLOCK):  # to the end of the gzip stream, whose length and CRC are checked there
                pass
    except (tarfile.TarError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise refuse(f"damaged or truncated archive ({str(exc) or type(exc).__name__})") from None
    except OSError as exc:
        if exc.errno is not None:  # the disk, not the archive (gzip's BadGzipFile has no errno)
            raise
        raise refuse(f"damaged or truncated archive ({exc})") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise refuse(f"{missing[0]} is missing (truncated?)")
    return snapshot


def _read_json(tar: tarfile.TarFile, member: tarfile.TarInfo, refuse) -> Any:
    """The JSON value of ``member``, read whole once its size is known to be at most ``MAX_JSON_BYTES``."""
    _check_json_size(member, refuse)
    try:
        return json.loads(tar.extractfile(member).read())
    except RecursionError:
        raise refuse(f"unreadable {member.name} (nested too deeply)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise refuse(f"unreadable {member.name} ({getattr(exc, 'msg', None) or exc.reason})") from None
    except ValueError as exc:  # an integer over Python's 4300 digits
        raise refuse(f"unreadable {member.name} ({exc})") from None


def _check_json_size(member: tarfile.TarInfo, refuse) -> None:
    if member.size > MAX_JSON_BYTES:
        raise refuse(f"{member.name} is {member.size} bytes, over the limit of {MAX_JSON_BYTES} for a JSON file")


def _snapshot(data: Any, refuse) -> dict[str, Any]:
    """``snapshot.json``'s content, checked: one version folder, plain member names, a checksum and size for each."""
    if not isinstance(data, dict) or data.get("kind") != SNAPSHOT_KIND:
        raise refuse("not an indexer snapshot")
    if data.get("format") != SNAPSHOT_FORMAT:
        raise refuse(f"snapshot format {data.get('format')!r}; this indexer reads format {SNAPSHOT_FORMAT}")
    version, files = data.get("version"), data.get("files")
    if not isinstance(version, str) or not layout.VERSION_NAME.match(version) or not isinstance(files, dict):
        raise refuse("snapshot.json does not name a version and its files")
    for name, entry in files.items():
        folder = name.split("/")[:2]
        if (not MEMBER.match(name) or (folder[0] == layout.VERSIONS and folder[1] != version)
                or not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("size"), int)):
            raise refuse(f"snapshot.json lists an unexpected file {name!r}")
    if f"{layout.VERSIONS}/{version}/{layout.MANIFEST}" not in files:
        raise refuse("snapshot.json lists no manifest")
    return data
