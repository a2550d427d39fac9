"""Segments: immutable slices of an index, each with its documents, keyword index and vectors.

A write streams documents into a ``SegmentWriter`` (SQLite rows, and the
vectors into a spool), which then builds the segment's FAISS structure and
keyword index and seals it into ``segments/`` (``layout.seal_segment``). ``Segment`` is one
opened for reading. Which segments a version lists, and which of their
documents it deletes, is the manifest's business (``snapshot``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import layout
from . import vectors as structures
from .errors import IndexCorruptError
from .store import DocumentStore
from .vectors import ONDISK_SUFFIX, VectorIndex, VectorSpool, build_from_spool, choose_structure

# A segment made by a small write or a merge of small segments is exact (Flat) below this many documents,
# whatever the index type: searching it costs less than a graph would, and it needs no tuning.
SMALL_SEGMENT = 10_000


class SegmentWriter:
    """A new segment being written in a staging folder of the index at ``path``; keys run from ``base`` up."""

    def __init__(self, path: Path, name: str, base: int, dimension: int, embedding: str):
        self.path, self.name, self.base, self.dimension, self.embedding = path, name, base, dimension, embedding
        self.folder = layout.new_staging(path)
        self.store = DocumentStore.create(self.folder / layout.DOCUMENTS)
        self.spool = VectorSpool(self.folder, dimension)
        self.count = 0
        self.timings: dict[str, float] = {}  # seconds building and tuning the vector structure took (``seal``)

    def add(self, documents: Sequence[Any], vectors: np.ndarray) -> np.ndarray:
        """Store ``documents`` with their vectors under the next keys; returns the keys."""
        keys = self.add_documents(documents)
        self.spool.append(vectors, keys)
        return keys

    def add_documents(self, documents: Sequence[Any]) -> np.ndarray:
        """Store ``documents`` whose vectors come later (``seal(built=...)``); returns their keys."""
        keys = np.arange(self.base + self.count, self.base + self.count + len(documents), dtype=np.int64)
        self.store.add(keys, documents)
        self.count += len(documents)
        return keys

    @property
    def ondisk_path(self) -> Path:
        """Where an IVF structure kept on disk puts its inverted lists."""
        return self.folder / Path(layout.VECTORS).with_suffix(ONDISK_SUFFIX)

    def seal(self, structure: str, built: tuple[VectorIndex, dict[str, float]] | None = None) -> layout.SegmentMeta:
        """Build the FAISS ``structure`` from the spooled vectors (or take ``built``), write, checksum and publish the segment."""
        self.spool.close()
        if not self.count:  # a merge whose documents were all deleted
            built, structure = (structures.create(self.dimension), {}), "Flat"
        vectors, tuning = built or build_from_spool(self.spool, structure)
        self.timings = {name: round(tuning[f"{name}_seconds"], 3) for name in ("structure", "tune") if f"{name}_seconds" in tuning}
        self.spool.remove()
        vectors.save(self.folder / layout.VECTORS)
        self.store.index_keywords()
        keys, lengths = self.store.token_lengths()
        self.store.close()
        np.save(self.folder / layout.KEYS, keys)
        np.save(self.folder / layout.LENGTHS, lengths.astype(np.int32))
        meta = layout.SegmentMeta(self.name, self.base, self.count, self.dimension, self.embedding, structure,
                                  vectors.search_params, tuning.get("tuned_recall"))
        layout.seal_segment(self.path, self.folder, meta)
        return meta

    def discard(self) -> None:
        with contextlib.suppress(Exception):  # already closed, or the disk is gone: the folder goes anyway
            self.store.close()
        self.spool.close()
        layout.discard(self.folder)


def segment_structure(index_type: str, count: int, dimension: int, memory: int | None, *, whole: bool) -> str:
    """The FAISS structure of a segment of ``count`` documents: the index type's, or Flat for a small partial segment.

    ``whole`` is a segment that holds the whole index (a build, a full
    compaction): it gets the index type's structure at any size.
    """
    if not whole and count < SMALL_SEGMENT:
        return "Flat"
    return choose_structure(index_type, count, dimension, memory)


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
        return layout.segment_problems(self.folder, self.meta, checksums=True, names=(layout.DOCUMENTS, layout.VECTORS), memo=True)

    def holds(self, keys: np.ndarray) -> np.ndarray:
        """Which of ``keys`` are this segment's."""
        if not len(self.keys):
            return np.zeros(len(keys), dtype=bool)
        positions = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return self.keys[positions] == keys

    def close(self) -> None:
        self.store.close()
