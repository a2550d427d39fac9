"""The on-disk format: versions that list immutable segments, published atomically.

The files, what each write costs and how a write is made safe are described once, in docs/on-disk-format.md.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import DISK_FULL_ERRNOS, ArgumentError, IndexCorruptError, IndexLockedError, IndexNotFoundError
from .settings import IndexSettings

FORMAT_VERSION = 3  # 3: a document's one text field that is its whole text is stored by name (store.fields_json)
LEGACY_FORMAT = 1
READABLE_FORMATS = (LEGACY_FORMAT, 2, FORMAT_VERSION)
DEFAULT_INDEX_ROOT = "indexes"
POINTER = "CURRENT"
VERSIONS = "versions"
STAGING = "staging"
SEGMENTS = "segments"
SEGMENT_META = "segment.json"
DELETED = "deleted.npy"
KEYS = "keys.npy"
LENGTHS = "lengths.npy"
HASHES = "hashes.npy"
MANIFEST = "manifest.json"
DOCUMENTS = "documents.db"
VECTORS = "vectors.faiss"
CACHE = "cache.db"
LOCK = "LOCK"
VERSION_NAME = re.compile(r"^v(\d{6,})$")
SEGMENT_NAME = re.compile(r"^s(\d{6,})$")


@dataclass
class Manifest:
    """What a version holds and how it was made.

    ``segments`` names the segments it lists, oldest first; ``deleted`` is how
    many of their documents it deletes (the keys are in ``deleted.npy``);
    ``count`` is the live documents. ``next_key`` is the first key a new
    segment may use. ``vector_index``, ``search_params`` and ``tuned_recall``
    describe the largest segment (each segment keeps its own). A format-1
    manifest reads with ``segments`` empty: its version folder is its one segment.
    """

    settings: IndexSettings
    dimension: int
    count: int
    model_fingerprint: str = ""
    segments: list[str] = field(default_factory=list)
    deleted: int = 0
    next_key: int = 0
    vector_index: str = "Flat"
    search_params: dict[str, int] = field(default_factory=dict)
    tuned_recall: float | None = None
    version: str = ""
    created_at: str = ""
    files: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    checksum: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["settings"] = self.settings.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        data["settings"] = IndexSettings.from_dict(data.get("settings", {}))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def legacy(self) -> bool:
        return self.format_version == LEGACY_FORMAT


@dataclass
class SegmentMeta:
    """What a segment holds: ``count`` documents under keys ``keys.npy`` (all >= ``base``), in a FAISS ``vector_index``.

    ``embedding`` is the embedding configuration its vectors were made with
    (``settings.Embedding.key``); ``uid`` tells apart two segments that
    ever had the same name. ``files`` and ``sizes``: checksum and size of each file.
    """

    name: str
    base: int
    count: int
    dimension: int
    embedding: str = ""
    vector_index: str = "Flat"
    search_params: dict[str, int] = field(default_factory=dict)
    tuned_recall: float | None = None
    uid: str = ""
    files: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    checksum: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmentMeta:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# What a manifest must hold, and of which JSON types, before anything reads it.
REQUIRED_MANIFEST_FIELDS = {"settings": dict, "dimension": int, "count": int, "files": dict, "version": str}
REQUIRED_SEGMENT_FIELDS = {"name": str, "base": int, "count": int, "dimension": int, "files": dict}


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
    pointer = _read_pointer_file(path)
    if pointer is None:
        if path.is_dir():
            raise IndexNotFoundError(f"{path}: not an index (no published version)")
        raise IndexNotFoundError(f"{path}: no such index")
    version, _, checksum = pointer.partition(" ")
    if not VERSION_NAME.match(version) or not (path / VERSIONS / version).is_dir():
        on_disk = ", ".join(list_versions(path)) or "none"
        raise IndexCorruptError(
            f"{path / POINTER}: points to missing version {version[:40]!r} (versions on disk: {on_disk}); "
            "run 'indexer rollback INDEX --to VERSION' or build again"
        )
    if checksum:
        try:
            manifest = read_manifest(version_dir(path, version))
        except IndexCorruptError:
            manifest = None
        if manifest is not None and manifest.checksum != checksum:
            raise IndexCorruptError(
                f"{path / POINTER}: names {version} with a checksum its manifest does not have (the pointer or the manifest "
                "is damaged); run 'indexer check INDEX --all', then 'indexer rollback INDEX --to VERSION'"
            )
    return version


def read_pointer(path: Path) -> str | None:
    """The version ``CURRENT`` names, unchecked; None when there is no pointer."""
    pointer = _read_pointer_file(path)
    return pointer.partition(" ")[0] if pointer is not None else None


def _read_pointer_file(path: Path) -> str | None:
    try:
        return (path / POINTER).read_text(errors="replace").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def holds_index(path: Path) -> bool:
    """Whether ``path`` holds an index: a pointer, or at least one version (even with ``CURRENT`` broken)."""
    return read_pointer(path) is not None or bool(list_versions(path))


def foreign_names(path: Path) -> list[str]:
    """Names in the folder ``path`` that no index writes there (sorted), leaving out what a fresh volume or a
    file manager puts in any folder (``lost+found``, hidden files such as ``.DS_Store`` or ``.gitkeep``)."""
    ours = {POINTER, LOCK, VERSIONS, STAGING, SEGMENTS, "lost+found"}
    return sorted(name for name in os.listdir(path) if name not in ours and not name.startswith((CACHE, "."))
                  and not re.fullmatch(rf"{POINTER}\.\d+\.tmp", name))


def is_new(path: Path) -> bool:
    """Whether ``path`` is missing, or a folder with no index and nothing but what a failed or killed first write
    leaves (``LOCK``, ``staging/``, segments never published, a pointer's temporary file, an embedding cache)."""
    if not path.exists():
        return True
    return path.is_dir() and not holds_index(path) and not foreign_names(path)


def version_dir(path: Path, version: str) -> Path:
    return path / VERSIONS / version


def list_versions(path: Path) -> list[str]:
    """Published version names, oldest first."""
    return _numbered(path / VERSIONS, VERSION_NAME)


def _numbered(folder: Path, pattern: re.Pattern) -> list[str]:
    """Names in ``folder`` matching ``pattern`` (a letter and a number), by number."""
    if not folder.is_dir():
        return []
    return sorted((p.name for p in folder.iterdir() if pattern.match(p.name)), key=lambda n: int(n[1:]))


def next_version_number(path: Path) -> int:
    """The number the next published version will get."""
    versions = list_versions(path)
    return int(versions[-1][1:]) + 1 if versions else 1


def read_manifest(folder: Path) -> Manifest:
    """The manifest of a version folder, checked for the fields and types every reader relies on."""
    where = folder / MANIFEST
    data = _read_json(where, "manifest", missing=f"{where}: manifest is missing")
    if not isinstance(data, dict):
        raise IndexCorruptError(f"{where}: not a manifest (a JSON {type(data).__name__}, not an object)")
    if data.get("format_version") not in READABLE_FORMATS:
        raise IndexCorruptError(f"{folder}: index format {data.get('format_version')!r} is not supported "
                                f"(this indexer reads formats {', '.join(map(str, READABLE_FORMATS))})")
    for name, kind in REQUIRED_MANIFEST_FIELDS.items():
        if not isinstance(data.get(name), kind) or isinstance(data.get(name), bool):
            raise IndexCorruptError(f"{where}: not a manifest ({name!r} is missing or not a {kind.__name__})")
    segments = data.get("segments", [])
    if not isinstance(segments, list) or not all(isinstance(n, str) and SEGMENT_NAME.match(n) for n in segments):
        raise IndexCorruptError(f"{where}: not a manifest ('segments' is not a list of segment names)")
    if data["format_version"] != LEGACY_FORMAT and (not segments or DELETED not in data["files"]):
        raise IndexCorruptError(f"{where}: not a manifest (no segments, or no checksum of {DELETED})")
    check_json_checksum(where, data, "manifest")
    if VERSION_NAME.match(folder.name) and data["version"] != folder.name:
        # An older version's name would make a reader take this one for it (and a writer bring back what it deleted).
        raise IndexCorruptError(f"{where}: manifest names version {data['version'][:40]!r}, not its folder's {folder.name}")
    try:
        return Manifest.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise IndexCorruptError(f"{where}: not a manifest ({exc})") from None


def json_checksum(data: dict[str, Any]) -> str:
    """The checksum of a manifest or segment description: SHA-256 of its canonical JSON, its own ``checksum`` left out.

    Canonical (sorted keys, no spaces), so that what a reader trusts is covered
    whatever the file's layout; a change that leaves the parsed JSON equal is harmless.
    """
    body = {key: value for key, value in data.items() if key != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def check_json_checksum(where: Path, data: dict[str, Any], what: str) -> None:
    """IndexCorruptError unless ``data`` matches the checksum it holds (files written before checksums have none)."""
    stored = data.get("checksum")
    if stored is None:
        return
    if not isinstance(stored, str) or json_checksum(data) != stored:
        raise IndexCorruptError(f"{where}: {what} does not match its checksum")


def _read_json(where: Path, what: str, *, missing: str) -> Any:
    """The JSON in ``where``; IndexCorruptError (``missing`` when there is no file) if it cannot be read."""
    try:
        return json.loads(where.read_text())
    except FileNotFoundError:
        raise IndexCorruptError(missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise IndexCorruptError(f"{where}: unreadable {what} ({getattr(exc, 'msg', type(exc).__name__)})") from None


def segment_dir(path: Path, name: str) -> Path:
    return path / SEGMENTS / name


def segment_folders(path: Path, manifest: Manifest) -> list[Path]:
    """The folders of the segments ``manifest`` lists; a format-1 version is its own one segment."""
    if manifest.legacy:
        return [version_dir(path, manifest.version)]
    return [segment_dir(path, name) for name in manifest.segments]


def list_segments(path: Path) -> list[str]:
    """Segment names on disk, oldest first."""
    return _numbered(path / SEGMENTS, SEGMENT_NAME)


def read_segment_meta(folder: Path) -> SegmentMeta:
    """The ``segment.json`` of a segment folder, checked for the fields every reader relies on."""
    where = folder / SEGMENT_META
    data = _read_json(where, "segment description", missing=f"{folder}: segment is missing or has no {SEGMENT_META}")
    if not isinstance(data, dict) or any(
        not isinstance(data.get(name), kind) or isinstance(data.get(name), bool) for name, kind in REQUIRED_SEGMENT_FIELDS.items()
    ):
        raise IndexCorruptError(f"{where}: not a segment description")
    check_json_checksum(where, data, "segment description")
    if data["name"] != folder.name and SEGMENT_NAME.match(folder.name):
        raise IndexCorruptError(f"{where}: describes segment {data['name'][:40]!r}, not its folder's {folder.name}")
    return SegmentMeta.from_dict(data)


class EarlyChecksums:
    """Checksums of a staging segment's files that are complete before the rest (its vector structure), each
    computed and the file fsynced in a thread while the write finishes the others; ``seal_segment`` takes them.

    hashlib and fsync let go of the GIL: a 200k-document flat segment's
    300 MB of vectors are hashed and on disk while SQLite merges the
    keyword index, not after it.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checksum")
        self.pending: dict[str, Future[str]] = {}

    def add(self, paths: Iterable[Path]) -> None:
        """Start on these files; none may change afterwards."""
        for p in paths:
            self.pending[p.name] = self._pool.submit(_synced_checksum, p)

    def close(self) -> None:
        """Wait for the file in hand and drop the rest (after a failure their results are not wanted)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> EarlyChecksums:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _synced_checksum(path: Path) -> str:
    checksum = file_checksum(path)
    fsync_file(path)
    return checksum


def seal_segment(path: Path, staging: Path, meta: SegmentMeta, *, early: EarlyChecksums | None = None) -> Path:
    """Checksum, describe and fsync the segment written in ``staging``, then rename it into ``segments/``.
    ``early``: the files checksummed and fsynced already, or on their way."""
    done = early.pending if early is not None else {}
    files = sorted(p for p in staging.iterdir() if p.is_file())
    rest = [p for p in files if p.name not in done]
    # hashlib lets go of the GIL while it hashes: the files not checksummed early (the store, the most bytes) side by side.
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="checksum") as pool:
        checksums = dict(zip((p.name for p in rest), pool.map(file_checksum, rest)))
    checksums.update((name, future.result()) for name, future in done.items())
    meta.files = {p.name: checksums[p.name] for p in files}
    meta.sizes = {p.name: p.stat().st_size for p in files}
    meta.uid = uuid.uuid4().hex
    meta.checksum = json_checksum(meta.to_dict())
    (staging / SEGMENT_META).write_text(json.dumps(meta.to_dict(), indent=2) + "\n")
    for item in staging.iterdir():
        if item.name not in done:
            fsync_file(item)
    fsync_dir(staging)
    (path / SEGMENTS).mkdir(exist_ok=True)
    target = segment_dir(path, meta.name)
    os.rename(staging, target)
    fsync_dir(path / SEGMENTS)
    return target


def vector_files(meta: SegmentMeta) -> list[str]:
    """The files of a segment's vector structure: ``VECTORS`` and those beside it named after it (inverted lists
    kept on disk, the whole vectors of quantised codes)."""
    stem = Path(VECTORS).stem
    return [VECTORS, *sorted(n for n in meta.files if n != VECTORS and n.startswith(stem))]


def segment_problems(folder: Path, meta: SegmentMeta, *, checksums: bool, names: Iterable[str] | None = None,
                     memo: bool = False) -> list[str]:
    """What is wrong with a segment's files (``names``, default all): missing, a size or (with ``checksums``) a checksum that differs.

    With ``memo``, a file this process already found sound is not read again
    while its inode, size and change times are the same (``verified``).
    """
    problems = []
    for name in names if names is not None else (DOCUMENTS, VECTORS, KEYS, LENGTHS, *meta.files):
        if name not in meta.files:
            problems.append(f"segment {meta.name} has no checksum for {name}")
        elif not (folder / name).is_file():
            problems.append(f"segment {meta.name}: {name} is missing")
        elif name in meta.sizes and (folder / name).stat().st_size != meta.sizes[name]:
            problems.append(f"segment {meta.name}: {name} has the wrong size")
        elif checksums and not verified(folder / name, meta.files[name], memo=memo):
            problems.append(f"segment {meta.name}: {name} does not match its checksum")
    return list(dict.fromkeys(problems))


# Files this process found to match their checksums: (path, checksum) -> what stat said then.
_sound: dict[tuple[str, str], tuple[int, ...]] = {}
_sound_lock = threading.Lock()


def verified(path: Path, checksum: str, *, memo: bool = False) -> bool:
    """Whether the file at ``path`` matches ``checksum``; with ``memo``, a file found sound before and unchanged
    since (same device, inode, size, modification and change time) is not read again."""
    try:
        info = path.stat()
    except OSError:
        return False
    stamp = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    key = (str(path), checksum)
    with _sound_lock:
        if memo and _sound.get(key) == stamp:
            return True
    try:
        sound = file_checksum(path) == checksum
    except OSError:
        return False
    with _sound_lock:
        if sound:
            _sound[key] = stamp
        else:
            _sound.pop(key, None)
    return sound


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


def verified_manifest(path: Path, version: str, *, checksums: bool = False, memo: bool = False) -> Manifest:
    """The manifest of ``version`` after checking what it lists; IndexCorruptError if anything is damaged.

    Its own files (the deletion set) are checked against their checksums, its
    segments for presence and size, and with ``checksums`` against their
    checksums too (``memo``: see ``verified``). Every write checks the version
    it starts from so, and refuses a damaged one; a write that copies documents
    or vectors out of a segment (compaction, converting a format-1 version)
    thereby never carries a damaged file into a new segment under fresh checksums.
    """
    folder = version_dir(path, version)
    manifest = read_manifest(folder)
    names = {DOCUMENTS, VECTORS, *manifest.files} if manifest.legacy else {DELETED, *manifest.files}
    problems = damaged_files(folder, manifest, sorted(names))
    for name in manifest.segments:
        try:
            meta = read_segment_meta(segment_dir(path, name))
        except IndexCorruptError as exc:
            problems.append(str(exc))
            continue
        problems += segment_problems(segment_dir(path, name), meta, checksums=checksums, memo=memo)
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
    manifest.checksum = json_checksum(manifest.to_dict())
    (staging / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n")
    for item in staging.iterdir():
        fsync_file(item)
    fsync_dir(staging)
    (path / VERSIONS).mkdir(exist_ok=True)
    os.rename(staging, version_dir(path, version))
    fsync_dir(path / VERSIONS)
    point_to(path, version, manifest.checksum)
    return version


def point_to(path: Path, version: str, checksum: str | None = None) -> None:
    """Make ``version`` the current one: write a new pointer, then rename it over the old.

    The pointer names the version and its manifest's checksum (``checksum``,
    else read from the manifest), so a pointer damaged into another version's
    name is told from a rollback.
    """
    if checksum is None:
        checksum = read_manifest(version_dir(path, version)).checksum
    pointer_tmp = path / f"{POINTER}.{os.getpid()}.tmp"
    pointer_tmp.write_text(f"{version} {checksum}".rstrip() + "\n")
    fsync_file(pointer_tmp)
    os.replace(pointer_tmp, path / POINTER)
    fsync_dir(path)


def prune(path: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` versions (the current one always stays), then every segment no version lists.

    Segments are left alone while any remaining version's manifest cannot be
    read: what it lists is unknown. Runs under the writer lock, so a segment
    not listed anywhere is one a dead writer left behind, never one in progress.
    """
    current = current_version(path)
    versions = list_versions(path)
    doomed = [v for v in versions[: max(len(versions) - max(keep, 1), 0)] if v != current]
    for version in doomed:
        shutil.rmtree(version_dir(path, version), ignore_errors=True)
    listed: set[str] = set()
    for version in list_versions(path):
        try:
            listed.update(read_manifest(version_dir(path, version)).segments)
        except IndexCorruptError:
            return doomed
    for name in list_segments(path):
        if name not in listed:
            shutil.rmtree(segment_dir(path, name), ignore_errors=True)
    return doomed


@contextmanager
def writer_lock(path: Path, wait: float = 0.0, action: str = "write") -> Iterator[None]:
    """Hold the index's writer lock; wait up to ``wait`` seconds for it, else fail fast.

    The lock is an ``flock`` on ``INDEX/LOCK``, so the kernel releases it when
    the holder dies, even by SIGKILL. Staging folders left by a dead writer are
    removed once the lock is taken.
    """
    if path.exists() and not path.is_dir():
        raise ArgumentError(f"{path}: is a file, not an index folder")
    if path.is_dir() and not holds_index(path) and (foreign := foreign_names(path)):
        # ``--index .`` or ``--index data``: an index's files would land among the user's own.
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ArgumentError(f"{path}: holds files of its own ({shown}) and no index; name a new or empty folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:  # a full disk, which the write reports as such
            raise
        raise ArgumentError(f"{path}: cannot write the index folder ({exc.strerror or exc})") from None
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


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
