"""Segments: immutable slices of an index, each with its documents, keyword index and vectors.

A write streams documents into a ``SegmentWriter`` (SQLite rows, and the
vectors into a spool), which then builds the segment's FAISS structure and
keyword index and seals it into ``segments/`` (``layout.seal_segment``). ``Segment`` is one
opened for reading. Which segments a version lists, and which of their
documents it deletes, is the manifest's business (``snapshot``).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import layout
from . import vectors as structures
from .cache import EmbeddingCache, digest_keys
from .errors import IndexCorruptError
from .settings import IndexSettings
from .store import DocumentStore
from .vectors import (
    ONDISK_SUFFIX,
    TUNING_RECALL,
    StreamedBuild,
    VectorIndex,
    VectorSpool,
    build_from_spool,
    choose_structure,
    parse_memory,
    quantised_structure,
)

# A segment made by a small write or a merge of small segments is exact (Flat) below this many documents,
# whatever the index type: searching it costs less than a graph would, and it needs no tuning.
SMALL_SEGMENT = 10_000
# A tuning stopped at its bound this far under its target recall is worth a warning.
LOW_RECALL_MARGIN = 0.05


class SegmentWriter:
    """A new segment being written in a staging folder of the index at ``path``; keys run from ``base`` up.

    With a ``cache``, the writer decides where its vectors stay findable by
    text (see ``cache``): a structure that keeps whole vectors gets the
    texts' digests beside it (``hashes.npy``); one that keeps only codes
    puts its vectors in ``cache.db`` as it seals; a writer discarded unsealed
    puts there the vectors the model encoded for it (``fresh``), so the next
    try does not encode them again.
    """

    def __init__(self, path: Path, name: str, base: int, dimension: int, embedding: str, cache: EmbeddingCache | None = None,
                 plan: Callable[[int], str | None] | None = None, warnings: list[str] | None = None):
        self.path, self.name, self.base, self.dimension, self.embedding = path, name, base, dimension, embedding
        self.cache = cache
        self.warnings = warnings if warnings is not None else []  # the write's: a tuning stopped short says so here
        self.folder = layout.new_staging(path)
        self.store = DocumentStore.create(self.folder / layout.DOCUMENTS)
        self.spool = VectorSpool(self.folder, dimension)
        # With a ``plan`` (see vectors.streamed_structure), the structure is built while vectors arrive.
        self.streamed = StreamedBuild(self.spool, plan, structures.create) if plan is not None else None
        self.count = 0
        self._digests: list[np.ndarray | None] = []  # per add, in key order
        self._fresh: list[np.ndarray] = []  # keys whose vectors the model encoded
        self.timings: dict[str, float] = {}  # seconds building and tuning the vector structure took (``seal``)

    @property
    def number(self) -> int:
        return int(self.name[1:])

    def add(self, documents: Sequence[Any], vectors: np.ndarray, *, digests: np.ndarray | None = None,
            fresh: np.ndarray | None = None) -> np.ndarray:
        """Store ``documents`` with their vectors under the next keys; returns the keys. ``digests``: their texts'
        (see ``cache``); ``fresh``: the rows among them the model encoded."""
        keys = self.add_documents(documents, digests=digests)
        self.add_vectors(vectors, keys, fresh=None if fresh is None else keys[np.asarray(fresh, dtype=np.int64)])
        return keys

    def add_vectors(self, vectors: np.ndarray, keys: np.ndarray, *, fresh: np.ndarray | None = None) -> None:
        """The vectors of documents stored before (``add_documents``), in any order; ``fresh``: the keys among
        them whose vectors the model encoded."""
        self.spool.append(vectors, keys)
        if self.streamed is not None:
            self.streamed.wrote(self.spool.count)
        if fresh is not None and len(fresh):
            self._fresh.append(np.asarray(fresh, dtype=np.int64))

    def add_documents(self, documents: Sequence[Any], *, digests: np.ndarray | None = None) -> np.ndarray:
        """Store ``documents`` whose vectors come later (``add_vectors``); returns their keys."""
        keys = np.arange(self.base + self.count, self.base + self.count + len(documents), dtype=np.int64)
        self.store.add(keys, documents)
        self.count += len(documents)
        self._digests.append(digests if digests is not None and len(digests) == len(documents) else None)
        return keys

    @property
    def ondisk_path(self) -> Path:
        """Where an IVF structure kept on disk puts its inverted lists."""
        return self.folder / Path(layout.VECTORS).with_suffix(ONDISK_SUFFIX)

    def seal(self, structure: str, built: tuple[VectorIndex, dict[str, float]] | None = None) -> layout.SegmentMeta:
        """Build the FAISS ``structure`` from the spooled vectors (or take ``built``), write, checksum and publish the segment."""
        self.spool.close()
        self.store.rows_written()  # the keyword index merges beside the structure's work
        if not self.count:  # a merge whose documents were all deleted
            built, structure = (structures.create(self.dimension), {}), "Flat"
        streamed, self.streamed = self.streamed, None
        if streamed is not None and built is not None:
            streamed.abandon()
        trim_heap()  # before the structure is filled: what the write's threads freed goes back to the system
        vectors, tuning = built or build_from_spool(self.spool, structure, streamed)
        if streamed is not None and vectors is streamed.vectors:
            structure, streamed.vectors = streamed.structure, None  # its kind, with the lists fixed while it streamed
        self.timings = {name: round(tuning[f"{name}_seconds"], 3) for name in ("structure", "tune") if f"{name}_seconds" in tuning}
        recall = tuning.get("tuned_recall")
        if tuning.get("at_bound") and recall < TUNING_RECALL - LOW_RECALL_MARGIN:
            knobs = ", ".join(f"{name} {value}" for name, value in vectors.search_params.items())
            self.warnings.append(f"{self.path}: segment {self.name} ({structure}) reaches recall@10 {recall} of exact search "
                                 f"at {knobs}, the most its tuning tries; vectors with little cluster structure search "
                                 "better with --index-type flat")
        digests = self._all_digests()
        if digests is not None and vectors.keeps_vectors:
            np.save(self.folder / layout.HASHES, digests)
            self.cache.release(self.number)  # what this write found in cache.db, the segment now keeps
        elif digests is not None:  # only codes kept (or lists on disk): the whole vectors stay in the cache
            self._cache_spooled(digests, None)
        self.spool.remove()
        with layout.EarlyChecksums() as early:
            vectors.save(self.folder / layout.VECTORS)
            # The structure's files (and the digests) are complete: checksummed while SQLite finishes.
            early.add(p for p in self.folder.iterdir() if p.is_file() and not p.name.startswith(layout.DOCUMENTS))
            search_params = vectors.search_params
            del vectors, built  # the structure (1.5 GB at 1M) is on disk: not held while SQLite sorts and merges
            trim_heap()  # and its memory goes back to the system, not to malloc's free lists
            self.store.finish()
            keys, lengths = self.store.token_lengths()
            self.store.close()
            np.save(self.folder / layout.KEYS, keys)
            np.save(self.folder / layout.LENGTHS, lengths.astype(np.int32))
            meta = layout.SegmentMeta(self.name, self.base, self.count, self.dimension, self.embedding, structure,
                                      search_params, tuning.get("tuned_recall"))
            layout.seal_segment(self.path, self.folder, meta, early=early)
        return meta

    def _all_digests(self) -> np.ndarray | None:
        """Every document's digest, in key order; None without a cache or where one add came without them."""
        if self.cache is None or any(d is None for d in self._digests):
            return None
        return np.concatenate(self._digests) if self._digests else np.empty((0, 2), dtype=np.uint64)

    def _cache_spooled(self, digests: np.ndarray, fresh: np.ndarray | None) -> None:
        """Put the spooled vectors of the keys ``fresh`` (all when None) into ``cache.db``, a chunk at a time."""
        self.spool.close()
        for vectors, keys in self.spool.chunks():
            if fresh is not None:
                wanted = np.isin(keys, fresh)
                vectors, keys = vectors[wanted], keys[wanted]
            if len(keys):
                self.cache.put(digest_keys(digests[keys - self.base]), vectors, self.number)

    def discard(self) -> None:
        """Remove the unsealed segment; the vectors the model encoded for it go to the cache first (best effort)."""
        if self.streamed is not None:
            self.streamed.abandon()
        digests = self._all_digests()
        if digests is not None and self._fresh and self.spool.vectors_path.exists():
            with contextlib.suppress(Exception):  # a cache that cannot take them costs the next try their encoding
                self._cache_spooled(digests, np.concatenate(self._fresh))
        with contextlib.suppress(Exception):  # already closed, or the disk is gone: the folder goes anyway
            self.store.close()
        self.spool.close()
        layout.discard(self.folder)


class HeldVectors:
    """The vectors the segments ``metas`` of the index at ``path`` keep whole, found by their texts' digests.

    Only segments embedded as ``embedding`` that list their digests
    (``hashes.npy``) take part. A segment's digests are sorted on its first
    look-up; its vectors are read only when a digest is found there, after
    its digests, keys and vectors have matched their checksums (a segment
    that does not is passed over, with a warning: its texts are encoded again).
    """

    def __init__(self, path: Path, metas: Sequence[layout.SegmentMeta], embedding: str, warnings: list[str] | None = None):
        self.path = path
        self.metas = [m for m in metas if m.embedding == embedding and layout.HASHES in m.files]
        self.warnings = warnings if warnings is not None else []
        self._tables: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None] = {}
        self._vectors: dict[str, VectorIndex | None] = {}

    def find(self, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A mask of the ``digests`` some segment holds, and a vector per digest (the found rows filled)."""
        hit = np.zeros(len(digests), dtype=bool)
        found = np.empty((len(digests), self.metas[0].dimension if self.metas else 0), dtype=np.float32)
        for meta in self.metas:
            rest = np.flatnonzero(~hit)
            if not len(rest):
                break
            table = self._table(meta)
            if table is None:
                continue
            held, order, first, keys = table
            rows = order[np.minimum(np.searchsorted(first, digests[rest, 0]), len(order) - 1)]
            matched = (held[rows] == digests[rest]).all(axis=1)
            if not matched.any() or (vectors := self._load(meta)) is None:
                continue
            found[rest[matched]] = vectors.reconstruct(np.asarray(keys[rows[matched]]))
            hit[rest[matched]] = True
        return hit, found

    def _table(self, meta: layout.SegmentMeta) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """The segment's digests, their order by first word, the first words in that order, and its keys."""
        if meta.name not in self._tables:
            folder = layout.segment_dir(self.path, meta.name)
            try:
                held = np.load(folder / layout.HASHES, mmap_mode="r")
                if held.shape != (meta.count, 2) or not meta.count:
                    raise ValueError(f"{held.shape} digests for {meta.count} documents")
                order = np.argsort(held[:, 0], kind="stable")
                self._tables[meta.name] = (held, order, np.asarray(held[order, 0]), np.load(folder / layout.KEYS, mmap_mode="r"))
            except (OSError, ValueError) as exc:
                self._pass_over(meta, f"unreadable {layout.HASHES} ({exc})")
                self._tables[meta.name] = None
        return self._tables[meta.name]

    def _load(self, meta: layout.SegmentMeta) -> VectorIndex | None:
        """The segment's vector structure, once its files have matched their checksums; None if they do not."""
        if meta.name not in self._vectors:
            folder = layout.segment_dir(self.path, meta.name)
            problems = layout.segment_problems(folder, meta, checksums=True, names=(layout.HASHES, layout.KEYS, *layout.vector_files(meta)),
                                               memo=True)
            loaded = None
            if problems:
                self._pass_over(meta, problems[0])
            else:
                loaded = structures.load(folder / layout.VECTORS, meta.vector_index, meta.search_params)
                if not loaded.keeps_vectors:
                    loaded = None
            self._vectors[meta.name] = loaded
        return self._vectors[meta.name]

    def _pass_over(self, meta: layout.SegmentMeta, problem: str) -> None:
        self.warnings.append(f"{self.path}: segment {meta.name}: {problem}; its vectors are not reused")


def trim_heap() -> None:
    """Give back to the system the memory malloc holds free (glibc's ``malloc_trim``; elsewhere nothing).

    Each of a write's threads frees its chunks' buffers into a heap of its own,
    which glibc keeps: 0.1-0.2 GB at the end of a 1M-document write, held
    while the structure fills (benchmarks/ingest.py's peak RSS)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _glibc()


def segment_structure(settings: IndexSettings, count: int, dimension: int, *, whole: bool) -> str:
    """The structure of a segment of ``count`` documents: the index type's (within the memory budget), keeping its
    vectors as ``settings.vectors`` says; or Flat for a small partial segment.

    ``whole`` is a segment that holds the whole index (a build, a full
    compaction): it gets the index type's structure at any size. A small
    partial one is searched in the pool of small segments, float32 whatever
    ``vectors`` says, until a compaction merges it.
    """
    if not whole and count < SMALL_SEGMENT:
        return "Flat"
    structure = choose_structure(settings.index_type, count, dimension, parse_memory(settings.memory))
    return quantised_structure(structure, settings.vectors)


@dataclass
class Segment:
    """One segment opened for reading: its store, its vectors (unless opened without), keys and token lengths."""

    meta: layout.SegmentMeta
    folder: Path
    store: DocumentStore
    vectors: VectorIndex | None
    keys: np.ndarray
    lengths: np.ndarray

    @classmethod
    def open(cls, folder: Path, *, vectors: bool = True, legacy: layout.Manifest | None = None) -> Segment:
        """Open the segment in ``folder``; ``legacy`` is the manifest of a format-1 version folder opened as one."""
        if legacy is not None:
            store = DocumentStore.open_readonly(folder / layout.DOCUMENTS)
            keys, lengths = store.token_lengths()
            meta = layout.SegmentMeta(legacy.version, int(keys[0]) if len(keys) else 0, len(keys), legacy.dimension,
                                      vector_index=legacy.vector_index, search_params=legacy.search_params,
                                      tuned_recall=legacy.tuned_recall, uid=f"legacy-{legacy.version}-{legacy.created_at}")
        else:
            meta = layout.read_segment_meta(folder)
            # The key and length files decide which document a hit is and its BM25 length: small (12 bytes a
            # document), so they are checked at every open; the store and the vectors by ``problems`` (see Index).
            problems = (layout.segment_problems(folder, meta, checksums=False)
                        + layout.segment_problems(folder, meta, checksums=True, names=(layout.KEYS, layout.LENGTHS), memo=True))
            if problems:
                raise IndexCorruptError(f"{folder}: {problems[0]}")
            store = DocumentStore.open_readonly(folder / layout.DOCUMENTS)
            try:
                keys = np.load(folder / layout.KEYS, mmap_mode="r")
                lengths = np.load(folder / layout.LENGTHS, mmap_mode="r")
            except (OSError, ValueError) as exc:
                store.close()
                raise IndexCorruptError(f"{folder}: unreadable key or length file ({exc})") from None
            if len(keys) != meta.count or len(lengths) != meta.count:
                store.close()
                raise IndexCorruptError(f"{folder}: {len(keys)} keys and {len(lengths)} lengths for {meta.count} documents")
        loaded = structures.load(folder / layout.VECTORS, meta.vector_index, meta.search_params) if vectors else None
        return cls(meta, folder, store, loaded, np.asarray(keys), np.asarray(lengths))

    @property
    def name(self) -> str:
        return self.meta.name

    def problems(self) -> list[str]:
        """Faults of the files the open did not read through: the store and the vectors against their checksums."""
        if not self.meta.files:  # a format-1 version folder: its manifest's checksums, checked by the snapshot
            return []
        return layout.segment_problems(self.folder, self.meta, checksums=True, names=(layout.DOCUMENTS, *layout.vector_files(self.meta)),
                                       memo=True)

    def holds(self, keys: np.ndarray) -> np.ndarray:
        """Which of ``keys`` are this segment's."""
        if not len(self.keys):
            return np.zeros(len(keys), dtype=bool)
        positions = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return self.keys[positions] == keys

    def close(self) -> None:
        self.store.close()
