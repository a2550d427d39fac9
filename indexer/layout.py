"""The on-disk format: immutable versions inside an index folder, published atomically.

::

    INDEX/
      CURRENT              name of the published version, e.g. "v000003"
      versions/
        v000003/
          manifest.json    settings, dimension, count, checksums (see Manifest)
          documents.db     SQLite: key, id, text, metadata
          vectors.faiss    FAISS index whose ids are the SQLite keys
      staging/             versions being written; never read
      cache.db             embedding cache shared by all versions (see cache.py)
      LOCK                 held (flock) by the one writer; names its pid

A writer builds a whole version under ``staging/``, fsyncs it, renames it into
``versions/`` and then replaces ``CURRENT`` with ``os.replace``. Writers
serialise on ``LOCK``; readers take no lock. A reader reads
``CURRENT`` once and opens that folder, which never changes afterwards, so it
always sees one complete version: never a half-written one, never FAISS from
one version and SQLite from another.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import IndexCorruptError, IndexLockedError, IndexNotFoundError
from .settings import IndexSettings

FORMAT_VERSION = 1
DEFAULT_INDEX_ROOT = "indexes"
POINTER = "CURRENT"
VERSIONS = "versions"
STAGING = "staging"
MANIFEST = "manifest.json"
DOCUMENTS = "documents.db"
VECTORS = "vectors.faiss"
CACHE = "cache.db"
LOCK = "LOCK"
VERSION_NAME = re.compile(r"^v(\d{6,})$")


@dataclass
class Manifest:
    """What a version holds and how it was made."""

    settings: IndexSettings
    dimension: int
    count: int
    content_digest: str = ""
    model_fingerprint: str = ""
    cache_generation: int = 0
    vector_index: str = "Flat"
    search_params: dict[str, int] = field(default_factory=dict)
    tuned_recall: float | None = None
    version: str = ""
    created_at: str = ""
    files: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["settings"] = self.settings.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        data = dict(data)
        data["settings"] = IndexSettings.from_dict(data.get("settings", {}))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# What a manifest must hold, and of which JSON types, before anything reads it.
REQUIRED_MANIFEST_FIELDS = {"settings": dict, "dimension": int, "count": int, "files": dict, "version": str}


def index_path(name: str | Path, root: str | Path = DEFAULT_INDEX_ROOT) -> Path:
    """The folder of an index: a bare name (a string without a path separator) means ``indexes/NAME``.

    A ``Path`` is always taken as a path, so a location resolved once (``twin/``
    becomes ``Path("twin")``) is never read again as the bare name ``twin``.
    """
    if isinstance(name, Path):
        return name
    text = str(name)
    if os.sep not in text and "/" not in text and text not in (".", ".."):
        return Path(root) / text
    return Path(text)


def current_version(path: Path) -> str:
    """The name of the published version of the index at ``path``."""
    version = read_pointer(path)
    if version is None:
        if path.is_dir():
            raise IndexNotFoundError(f"{path}: not an index (no published version)")
        raise IndexNotFoundError(f"{path}: no such index")
    if not VERSION_NAME.match(version) or not (path / VERSIONS / version).is_dir():
        on_disk = ", ".join(list_versions(path)) or "none"
        raise IndexCorruptError(
            f"{path / POINTER}: points to missing version {version[:40]!r} (versions on disk: {on_disk}); "
            "run 'indexer rollback INDEX --to VERSION' or build again"
        )
    return version


def read_pointer(path: Path) -> str | None:
    """What ``CURRENT`` says, unchecked; None when there is no pointer."""
    try:
        return (path / POINTER).read_text(errors="replace").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def version_dir(path: Path, version: str) -> Path:
    return path / VERSIONS / version


def list_versions(path: Path) -> list[str]:
    """Published version names, oldest first."""
    folder = path / VERSIONS
    if not folder.is_dir():
        return []
    return sorted((p.name for p in folder.iterdir() if VERSION_NAME.match(p.name)), key=lambda n: int(n[1:]))


def next_version_number(path: Path) -> int:
    """The number the next published version will get."""
    versions = list_versions(path)
    return int(versions[-1][1:]) + 1 if versions else 1


def read_manifest(folder: Path) -> Manifest:
    """The manifest of a version folder, checked for the fields and types every reader relies on."""
    where = folder / MANIFEST
    try:
        data = json.loads(where.read_text())
    except FileNotFoundError:
        raise IndexCorruptError(f"{where}: manifest is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise IndexCorruptError(f"{where}: unreadable manifest ({getattr(exc, 'msg', type(exc).__name__)})") from None
    if not isinstance(data, dict):
        raise IndexCorruptError(f"{where}: not a manifest (a JSON {type(data).__name__}, not an object)")
    if data.get("format_version") != FORMAT_VERSION:
        raise IndexCorruptError(
            f"{folder}: index format {data.get('format_version')!r} is not supported (this indexer reads format {FORMAT_VERSION})"
        )
    for name, kind in REQUIRED_MANIFEST_FIELDS.items():
        if not isinstance(data.get(name), kind) or isinstance(data.get(name), bool):
            raise IndexCorruptError(f"{where}: not a manifest ({name!r} is missing or not a {kind.__name__})")
    try:
        return Manifest.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise IndexCorruptError(f"{where}: not a manifest ({exc})") from None


def damaged_files(folder: Path, manifest: Manifest, names: Iterable[str] | None = None) -> list[str]:
    """What is wrong with the files of a version (``names``, default every file the manifest lists)."""
    problems = []
    for name in names if names is not None else manifest.files:
        if name not in manifest.files:
            problems.append(f"manifest has no checksum for {name}")
        elif not (folder / name).is_file():
            problems.append(f"{name} is missing")
        elif file_checksum(folder / name) != manifest.files[name]:
            problems.append(f"{name} does not match its checksum")
    return problems


def verified_manifest(path: Path, version: str) -> Manifest:
    """The manifest of ``version`` after checking every file it lists; IndexCorruptError if any is damaged.

    Every write that carries data over from a version calls this first, so a
    damaged file is never copied into a new version under fresh checksums.
    """
    folder = version_dir(path, version)
    manifest = read_manifest(folder)
    problems = damaged_files(folder, manifest, {DOCUMENTS, VECTORS, *manifest.files})
    if problems:
        raise IndexCorruptError(
            f"{path}: version {version} is damaged ({problems[0]}); nothing written. "
            "Run 'indexer check INDEX --all', then 'indexer rollback' to a sound version or build again"
        )
    return manifest


def new_staging(path: Path) -> Path:
    """A fresh, empty folder for writing a version of the index at ``path``."""
    folder = path / STAGING / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    return folder


def file_checksum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def publish(path: Path, staging: Path, manifest: Manifest) -> str:
    """Seal ``staging`` as the next version and make it current, atomically.

    Writes the manifest (with file checksums), fsyncs every file and folder on
    the way, renames the folder into ``versions/`` and swaps ``CURRENT``. Old
    versions are pruned separately (``prune``): a failure there must not make a
    published write look failed.
    """
    version = f"v{next_version_number(path):06d}"
    manifest.version = version
    manifest.created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest.files = {p.name: file_checksum(p) for p in sorted(staging.iterdir()) if p.is_file()}
    (staging / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n")
    for item in staging.iterdir():
        _fsync_file(item)
    _fsync_dir(staging)
    (path / VERSIONS).mkdir(exist_ok=True)
    os.rename(staging, version_dir(path, version))
    _fsync_dir(path / VERSIONS)
    point_to(path, version)
    return version


def point_to(path: Path, version: str) -> None:
    """Make ``version`` the current one: write a new pointer, then rename it over the old."""
    pointer_tmp = path / f"{POINTER}.{os.getpid()}.tmp"
    pointer_tmp.write_text(version + "\n")
    _fsync_file(pointer_tmp)
    os.replace(pointer_tmp, path / POINTER)
    _fsync_dir(path)


def prune(path: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` versions; the current one always stays."""
    current = current_version(path)
    versions = list_versions(path)
    doomed = [v for v in versions[: max(len(versions) - max(keep, 1), 0)] if v != current]
    for version in doomed:
        shutil.rmtree(version_dir(path, version), ignore_errors=True)
    return doomed


@contextmanager
def writer_lock(path: Path, wait: float = 0.0, action: str = "write") -> Iterator[None]:
    """Hold the index's writer lock; wait up to ``wait`` seconds for it, else fail fast.

    The lock is an ``flock`` on ``INDEX/LOCK``, so the kernel releases it when
    the holder dies, even by SIGKILL. Staging folders left by a dead writer are
    removed once the lock is taken.
    """
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                    hint = "" if wait else "; retry later or pass --wait SECONDS"
                    raise IndexLockedError(f"{path}: locked by another writer ({holder}){hint}") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {action} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}".encode(), 0)
        shutil.rmtree(path / STAGING, ignore_errors=True)
        yield
    finally:
        os.close(fd)


def discard(folder: Path) -> None:
    """Remove a folder that will not be published (a staging folder, or a new index that failed)."""
    shutil.rmtree(folder, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
