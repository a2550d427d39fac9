"""A write to an index: the writer lock, the version it starts from, new segments and deletions, publishing.

Every write verb (``build``, ``edit``, ``compact``) runs inside ``transaction``:
it takes the writer lock, opens the current version (converting a format-1
index on the way), lets the verb add segments (``new_segment``) and delete
keys, and ``publish`` writes a manifest listing the segments and the
deletion set, then moves ``CURRENT``. A segment is sealed into ``segments/``
as soon as it is complete, but nothing lists it until its version is
published; whatever a failed or killed write leaves behind is removed by the
next write's pruning. Failures after ``CURRENT`` moved (pruning, cache
bookkeeping) are warnings on the report, never errors.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import layout
from .cache import EmbeddingCache, cache_holds_vectors
from .check import check_version
from .errors import DISK_FULL_ERRNOS, ArgumentError, DiskFullError, IndexCorruptError, IndexerError, IndexNotFoundError
from .ingest import CHUNK_SIZE, document_chunks
from .segments import HeldVectors, Segment, SegmentWriter
from .settings import Embedding, IndexSettings, WriteOptions
from .snapshot import Snapshot
from .sources import Document
from .store import fields_json
from .vectors import parse_memory, streamed_structure

# Below this much free space, a vague write error (SQLite's "disk I/O error", FAISS's "write error") means a full disk.
FULL_BELOW = 1 << 20


@dataclass
class BuildReport:
    """What a write did; ``to_dict()`` is what ``--json`` prints.

    ``encoded`` texts went through the model, ``reused`` came from the cache,
    ``deleted`` documents of the previous version are gone from this one,
    ``kept_upserts`` documents written by upsert were carried over a rebuild.
    ``published`` is false when the write changed nothing (nothing to delete,
    the same documents again, or ``if_changed`` with an unchanged source).
    ``segments`` is how many the current version lists after the write (the
    new one, or the one left current) and ``merged`` how many a compaction
    after the write merged. ``stages`` are the seconds
    each ingest stage was busy (read, tokenize, encode, write: they overlap),
    building the segment's vector structure took (seal) and, where the write
    loaded the model for its first text to encode, that load took (load).
    ``warnings`` are one-line notes on what went wrong but did not stop the
    write (a damaged embedding cache set aside, clean-up after publishing, a
    merge after it that could not load the model).
    """

    index: str
    version: str
    documents: int
    encoded: int = 0
    reused: int = 0
    deleted: int = 0
    seconds: float = 0.0
    published: bool = True
    kept_upserts: int = 0
    segments: int = 0
    merged: int = 0
    stages: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Transaction:
    """One write in progress under the writer lock (see ``transaction``)."""

    def __init__(self, path: Path, action: str):
        self.path, self.action = path, action
        self.warnings: list[str] = []
        self.current: Snapshot | None = None
        self.segments: list[layout.SegmentMeta] = []
        self.deleted = np.empty(0, dtype=np.int64)
        self.next_key = 0
        self.converted = False
        self.cache: EmbeddingCache | None = None  # the write's own cache, if it opened one: tidying up uses it too
        self._writers: list[SegmentWriter] = []
        self._allocated: list[str] = []

    # The version the write starts from -----------------------------------------------------------

    def open_current(self, *, repairable: bool = False, hint: str = "") -> Snapshot | None:
        """Open the current version, converting a format-1 one into a segment first.

        With ``repairable`` (a build, a rebuild that keeps no upserts), a new
        index gives None, and a ``CURRENT`` that points to a missing or
        damaged version starts from nothing, with a warning: the write
        repairs the index. Otherwise such a version is an error, ending with ``hint``.
        """
        if repairable and layout.read_pointer(self.path) is None:
            return None
        try:
            version = layout.current_version(self.path)
            manifest = layout.verified_manifest(self.path, version, checksums=True, memo=True)
        except IndexCorruptError as exc:
            if not repairable:
                raise IndexCorruptError(f"{exc}{hint}") from None
            self.warnings.append(f"{exc}; building a new version from the source")
            return None
        if manifest.legacy:
            self._convert(manifest)
        else:
            self.segments = [layout.read_segment_meta(folder) for folder in layout.segment_folders(self.path, manifest)]
        self.current = Snapshot.open(self.path, version, vectors=False) if not manifest.legacy else self.current
        self.deleted = self.current.deleted.copy()
        self.next_key = max([manifest.next_key] + [int(s.keys[-1]) + 1 for s in self.current.segments if len(s.keys)])
        return self.current

    def _convert(self, manifest: layout.Manifest) -> None:
        """Make the format-1 version's files one segment (hard links, a copy where links fail), in memory until published."""
        legacy = layout.verified_manifest(self.path, manifest.version, checksums=True)
        folder = layout.version_dir(self.path, legacy.version)
        old = Snapshot.open(self.path, legacy.version, vectors=False)
        source = old.segments[0]
        staging = layout.new_staging(self.path)
        for item in folder.iterdir():
            if item.is_file() and item.name != layout.MANIFEST:
                try:
                    os.link(item, staging / item.name)
                except OSError:
                    shutil.copyfile(item, staging / item.name)
        np.save(staging / layout.KEYS, source.keys)
        np.save(staging / layout.LENGTHS, source.lengths.astype(np.int32))
        settings = legacy.settings
        meta = layout.SegmentMeta(
            self.allocate(), int(source.keys[0]) if len(source.keys) else 0, len(source.keys), legacy.dimension,
            Embedding(legacy.model_fingerprint, settings.pooling, settings.max_length, settings.precision).key,
            legacy.vector_index, legacy.search_params, legacy.tuned_recall,
        )
        old.close()
        layout.seal_segment(self.path, staging, meta)
        self.segments = [meta]
        converted = replace(legacy, segments=[meta.name], next_key=meta.base + meta.count, format_version=layout.FORMAT_VERSION)
        segment = Segment.open(layout.segment_dir(self.path, meta.name), vectors=False)
        self.current = Snapshot(self.path, converted, [segment], np.empty(0, dtype=np.int64))
        self.converted = True
        self.warnings.append(f"{self.path}: converted from index format 1 to format {layout.FORMAT_VERSION}")

    @property
    def manifest(self) -> layout.Manifest | None:
        return self.current.manifest if self.current is not None else None

    # Changes ---------------------------------------------------------------------------------------

    def allocate(self) -> str:
        """A fresh segment name."""
        names = layout.list_segments(self.path) + [s.name for s in self.segments] + self._allocated
        self._allocated.append(f"s{max((int(n[1:]) for n in names), default=0) + 1:06d}")
        return self._allocated[-1]

    def new_segment(self, dimension: int, embedding: str, cache: EmbeddingCache | None = None,
                    settings: IndexSettings | None = None) -> SegmentWriter:
        """A writer for a new segment whose keys follow every key in use; ``cache``: see ``SegmentWriter``. With
        ``settings``, its structure is built while it is written where the index type allows (``streamed_structure``)."""
        plan = None
        if settings is not None and settings.vectors == "float32":  # codes are trained on a sample of every vector
            index_type, memory = settings.index_type, parse_memory(settings.memory)
            plan = functools.partial(streamed_structure, index_type, dimension=dimension, memory=memory)
        writer = SegmentWriter(self.path, self.allocate(), self.next_key, dimension, embedding, cache, plan, self.warnings)
        self._writers.append(writer)
        return writer

    def held_vectors(self, embedding: str) -> HeldVectors:
        """The vectors the current version's segments keep, by text (see ``cache``), for texts this write meets again."""
        return HeldVectors(self.path, [s.meta for s in self.current.segments] if self.current is not None else [], embedding,
                           self.warnings)

    def add_segment(self, meta: layout.SegmentMeta) -> None:
        """List a sealed segment in the version being written."""
        self.segments.append(meta)
        self.next_key = max(self.next_key, meta.base + meta.count)

    def replace_segments(self, names: set[str], meta: layout.SegmentMeta, dropped: np.ndarray) -> None:
        """List ``meta`` in place of the segments ``names``; their deleted keys (``dropped``) leave the deletion set."""
        position = min(i for i, s in enumerate(self.segments) if s.name in names)
        self.segments = [s for s in self.segments if s.name not in names]
        self.segments.insert(position, meta)
        self.deleted = np.setdiff1d(self.deleted, dropped)
        self.next_key = max(self.next_key, meta.base + meta.count)

    def delete(self, keys) -> None:
        self.deleted = np.union1d(self.deleted, np.asarray(keys, dtype=np.int64))

    def _emptied(self) -> dict[str, tuple[int, int]]:
        """Listed segments of the current version whose every document is deleted: name -> their span in ``deleted``."""
        listed = {s.name for s in self.segments}
        emptied = {}
        for segment in self.current.segments if self.current is not None else []:
            if segment.name in listed and len(segment.keys):
                # Keys are unique across segments and no other segment's key falls between a segment's first and
                # last, so a deletion set holding as many keys in that span as the segment has deletes all of them.
                first, last = np.searchsorted(self.deleted, [segment.keys[0], segment.keys[-1] + 1])
                if last - first == len(segment.keys):
                    emptied[segment.name] = (int(first), int(last))
        return emptied

    @property
    def replaces_all(self) -> bool:
        """Whether no segment listed before this write keeps a live document (a new segment would be the whole index)."""
        old = {s.name for s in self.current.segments} if self.current is not None else set()
        return not ({s.name for s in self.segments if s.name in old} - set(self._emptied()))

    def reset(self) -> None:
        """Start the version from nothing: no segments, no deletions (keys keep counting up)."""
        self.segments, self.deleted = [], np.empty(0, dtype=np.int64)

    @property
    def count(self) -> int:
        return sum(s.count for s in self.segments) - len(self.deleted)

    # Publishing ------------------------------------------------------------------------------------

    def publish(self, settings: IndexSettings, dimension: int, fingerprint: str, report: BuildReport, keep: int) -> str:
        """Write the manifest and deletion set as the next version and make it current, then tidy up."""
        # Segments whose documents are all deleted are listed no more (one stays if nothing else would be).
        doomed = dict(list(self._emptied().items())[: len(self.segments) - 1])
        if doomed:
            self.segments = [s for s in self.segments if s.name not in doomed]
            spans = np.zeros(len(self.deleted), dtype=bool)
            for first, last in doomed.values():
                spans[first:last] = True
            self.deleted = self.deleted[~spans]
        staging = layout.new_staging(self.path)
        np.save(staging / layout.DELETED, self.deleted)
        largest = max(self.segments, key=lambda s: s.count)
        manifest = layout.Manifest(
            settings=settings, dimension=dimension, count=self.count, model_fingerprint=fingerprint,
            segments=[s.name for s in self.segments], deleted=len(self.deleted), next_key=self.next_key,
            vector_index=largest.vector_index, search_params=largest.search_params, tuned_recall=largest.tuned_recall,
        )
        version = layout.publish(self.path, staging, manifest)
        report.version, report.published, report.documents, report.segments = version, True, manifest.count, len(self.segments)
        self.tidy(keep, report)
        return version

    def tidy(self, keep: int, report: BuildReport) -> None:
        """Prune old versions and unlisted segments, and cache entries no remaining segment uses; failures become warnings."""
        try:
            layout.prune(self.path, keep)
            listed = [int(name[1:]) for v in layout.list_versions(self.path)
                      for name in layout.read_manifest(layout.version_dir(self.path, v)).segments]
            if listed and (self.path / layout.CACHE).exists():
                cache = self.cache if self.cache is not None else EmbeddingCache(self.path / layout.CACHE, 0)
                try:
                    cache.prune(min(listed))
                finally:
                    if cache is not self.cache:
                        cache.close()
                        report.warnings += cache.warnings
        except (OSError, sqlite3.Error, RuntimeError, IndexerError) as exc:
            reason = "no space left on device" if disk_full(exc, self.path) else (str(exc).splitlines() or [type(exc).__name__])[0]
            report.warnings.append(f"{self.path}: published {report.version}, but tidying up after it failed ({reason}); the next write retries")

    def close_cache(self) -> None:
        """End the write's use of its cache: writers left unsealed are discarded first (their fresh vectors go to it)."""
        for writer in self._writers:
            writer.discard()  # a writer already sealed has no folder left to discard
        if self.cache is not None:
            self.cache.close()

    def close(self) -> None:
        for writer in self._writers:
            writer.discard()
        layout.discard(self.path / layout.STAGING)  # under the lock, whatever is there was never published
        if self.current is not None:
            self.current.close()


class Diff:
    """The source compared with the current version by id, a chunk of ids at a time.

    ``changed`` yields the documents to write (new, or different in text,
    metadata, fields or origin; every document when nothing carries over) and
    notes the current keys it saw; ``replaced`` and ``removed`` are then the
    keys to delete. With ``keep_upserts``, a document written by upsert
    shadows the source record with its id and stays even if the source lacks it.
    """

    def __init__(self, current: Snapshot | None, *, carry: bool, keep_upserts: bool):
        self.current, self.carry, self.keep_upserts = current, carry, keep_upserts
        self.read = 0
        self.kept = 0
        self._seen: list[int] = []
        self._replaced: list[int] = []

    def changed(self, documents: Iterable[Document]) -> Iterator[Document]:
        for docs in document_chunks(documents):
            self.read += len(docs)
            live = self.current.rows_for_ids([d.id for d in docs]) if self.current is not None else {}
            for doc in docs:
                row = live.get(doc.id)
                if row is not None:
                    key, text, metadata, fields, origin = row
                    self._seen.append(key)
                    if origin == "upsert" and self.keep_upserts:
                        continue
                    # Rows stored before format 3 hold a one-field object where fields_json now gives the name alone.
                    if self.carry and (text, metadata, origin) == (doc.text, _json(doc.metadata), doc.origin) and (
                            fields == fields_json(doc.text, doc.fields) or fields == _json(doc.fields)):
                        continue
                    self._replaced.append(key)
                yield doc
        if not self.carry and self.keep_upserts and self.current is not None:
            # Nothing carries over, so the upserted documents go into the new segment with the source's.
            upserted = self.current.keys_of_origin("upsert")
            for first in range(0, len(upserted), CHUNK_SIZE):
                rows = self.current.fetch(upserted[first : first + CHUNK_SIZE])
                yield from (Document(r["id"], r["text"], r["metadata"], r["fields"], origin="upsert") for r in rows.values())

    def replaced(self) -> np.ndarray:
        return np.asarray(self._replaced, dtype=np.int64)

    def removed(self) -> np.ndarray:
        """Live keys of the current version whose ids the source no longer has (upserted ones aside, if kept)."""
        if self.current is None:
            return np.empty(0, dtype=np.int64)
        gone = np.setdiff1d(self.current.live_keys(), np.asarray(self._seen, dtype=np.int64))
        if self.keep_upserts:
            upserted = self.current.keys_of_origin("upsert")
            self.kept = len(upserted)
            gone = np.setdiff1d(gone, upserted)
        return gone


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


@contextmanager
def transaction(path: Path, action: str, wait: float) -> Iterator[Transaction]:
    """Hold the writer lock for one write; clean up whatever is not published.

    A new index whose first write fails is removed again (only if no version
    was published: decided under the lock; and only a folder that was
    missing or empty before). Running out of disk space
    anywhere in the write becomes one DiskFullError.
    """
    # Only a folder this write creates (or found new) is removed again: never one that holds anything else.
    found_new = layout.is_new(path)
    try:
        with layout.writer_lock(path, wait, action):
            created = found_new and not layout.holds_index(path)
            txn = Transaction(path, action)
            try:
                yield txn
            except BaseException:
                txn.close()
                if created and not layout.list_versions(path):  # never remove what was published
                    forget_new_index(path)
                raise
            txn.close()
    except (OSError, sqlite3.Error, RuntimeError) as exc:
        if not disk_full(exc, path):
            raise
        raise DiskFullError(f"{path}: no space left on device during {action}; nothing was published, the current version is unchanged") from None


def forget_new_index(path: Path) -> None:
    """Remove a new index whose first write failed; an embedding cache holding vectors stays (with the lock file, still
    held), so that a first build stopped by Ctrl-C or an error does not encode again what it already had."""
    if not cache_holds_vectors(path / layout.CACHE):
        layout.discard(path)
        return
    for item in path.iterdir():
        if item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
        elif item.name != layout.LOCK and not item.name.startswith(layout.CACHE):
            item.unlink(missing_ok=True)


def disk_full(exc: BaseException, path: Path) -> bool:
    """Whether ``exc`` means the disk or quota under ``path`` ran out.

    The OS says ENOSPC; SQLite says SQLITE_FULL, or only "disk I/O error"
    when its shared-memory file cannot grow; FAISS says "write error". For
    the vague ones, the filesystem's free space decides.
    """
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
    if code == sqlite3.SQLITE_FULL or "No space left on device" in str(exc):
        return True
    if code == sqlite3.SQLITE_IOERR or isinstance(exc, RuntimeError):
        try:
            stat = os.statvfs(path if path.exists() else path.parent)
        except OSError:
            return False
        return stat.f_bavail * stat.f_frsize < FULL_BELOW
    return False


def existing_index(index: str | Path) -> Path:
    """The folder of an index that must exist already (writes other than build never create one)."""
    path = layout.index_path(index)
    if not path.is_dir():
        raise IndexNotFoundError(f"{path}: no such index")
    if not layout.holds_index(path):
        raise IndexNotFoundError(f"{path}: not an index (no versions in it)")
    return path


def rollback_index(index: str | Path, to: str | None = None, *, options: WriteOptions | None = None) -> dict[str, str]:
    """Make an earlier version current again (by default the one before the current one).

    When ``CURRENT`` points to a missing version, the default is the newest
    sound version on disk; every target is checked before it is served. Its
    segments are still on disk: pruning keeps every segment a kept version lists.
    """
    path = existing_index(index)
    with layout.writer_lock(path, (options or WriteOptions()).wait, "rollback"):
        versions = layout.list_versions(path)
        pointer = layout.read_pointer(path)
        current = pointer if pointer in versions else None
        if to is None:
            if current is None:
                sound = [v for v in versions if not check_version(path, v)]
                if not sound:
                    raise IndexCorruptError(f"{path}: no sound version on disk to roll back to; build the index again")
                to = sound[-1]
            else:
                older = [v for v in versions if int(v[1:]) < int(current[1:])]
                if not older:
                    raise ArgumentError(f"{path}: no version older than {current} to roll back to")
                to = older[-1]
        if to not in versions:
            raise ArgumentError(f"{path}: no version {to!r}; versions on disk: {', '.join(versions) or 'none'}")
        problems = check_version(path, to)
        if problems:
            raise IndexCorruptError(f"{path}: version {to} is damaged, not rolling back: {problems[0]}")
        layout.point_to(path, to)
    return {"index": str(path), "version": to, "previous": pointer or ""}


def since(started: float) -> float:
    return round(time.monotonic() - started, 3)
