"""One published version, opened: its segments and deleted keys, searched as if they were one index.

Dense search runs in every segment with the deleted keys (and documents a
filter rules out) excluded by a FAISS ID selector, so each segment returns its
own top k among live documents, and the lists are merged by score: over Flat
segments that is exactly what one structure over the live documents returns.

Small Flat segments (the one-document segments of upserts, up to
``POOLED_SEGMENT`` vectors each) are searched together with one matrix product
instead of one FAISS call each: a FAISS call has a fixed cost of a few tenths
of a millisecond, which ten small segments would add to every query.

Keyword search is BM25 computed here, not by each segment's FTS5, with
collection statistics over the live documents of all segments: document
count, average length and each term's document frequency, deleted documents
left out. Lucene sums its statistics over segments the same way (it counts
deleted documents until a merge drops them; we drop them at once, which the
deletion sets make cheap). Term frequencies and document lengths come from
each segment's FTS5 index, so scores equal FTS5's own ``bm25()`` on one
segment without deletions, and a segmented index scores exactly as a fresh
build of its live documents.
"""

from __future__ import annotations

import math
import sqlite3
import threading
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import layout
from .errors import IndexCorruptError
from .segments import Segment
from .store import KEYWORD_TOKENIZER

BM25_K1 = 1.2
BM25_B = 0.75
OPEN_ATTEMPTS = 5
POOLED_SEGMENT = 4096
# Float32 rounding of a unit vector's inner product with itself stays far inside this.
COSINE_SLACK = 1e-3


class Snapshot:
    """The segments a version lists, minus its deleted keys."""

    def __init__(self, path: Path, manifest: layout.Manifest, segments: list[Segment], deleted: np.ndarray):
        self.path, self.manifest, self.segments = path, manifest, segments
        self.deleted = np.asarray(deleted, dtype=np.int64)
        self.version = manifest.version
        # Per segment: its deleted keys, and the live documents' count and total token length.
        self._deleted = [self.deleted[segment.holds(self.deleted)] for segment in segments]
        self._live = [segment.meta.count - len(gone) for segment, gone in zip(segments, self._deleted)]
        tokens = 0
        for segment, gone in zip(segments, self._deleted):
            tokens += int(segment.lengths.sum()) - int(segment.lengths[np.searchsorted(segment.keys, gone)].sum())
        self.tokens = tokens
        self._field_types: dict[str, set[str]] | None = None
        self._pool: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @classmethod
    def open(cls, path: Path, version: str | None = None, *, vectors: bool = True,
             loaded: dict[str, Segment] | None = None, only: Collection[str] | None = None) -> Snapshot:
        """Open ``version`` (default the current one) of the index at ``path``.

        ``loaded`` holds segments already open, by uid, to reuse instead of
        reading them again (``Index.refresh`` opens only the new segments);
        ``only`` names the segments to open (a shard's), with the version's
        whole deletion set. A
        writer may publish, and prune the version just read from ``CURRENT``,
        between reading the pointer and opening the folder; then read it again.
        """
        for attempt in range(OPEN_ATTEMPTS):
            pointer = layout.read_pointer(path)
            try:
                name = version or layout.current_version(path)
                return cls._open(path, layout.read_manifest(layout.version_dir(path, name)), vectors, loaded or {}, only)
            except IndexCorruptError:
                if version or attempt == OPEN_ATTEMPTS - 1 or layout.read_pointer(path) == pointer:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _open(cls, path: Path, manifest: layout.Manifest, vectors: bool, loaded: dict[str, Segment],
              only: Collection[str] | None = None) -> Snapshot:
        if manifest.legacy:
            return cls(path, manifest, [Segment.open(layout.version_dir(path, manifest.version), vectors=vectors, legacy=manifest)],
                       np.empty(0, dtype=np.int64))
        segments: list[Segment] = []
        try:
            for folder in layout.segment_folders(path, manifest):
                if only is not None and folder.name not in only:
                    continue
                meta = layout.read_segment_meta(folder)
                known = loaded.get(meta.uid)
                segments.append(known if known is not None and (known.vectors is not None or not vectors)
                                else Segment.open(folder, vectors=vectors))
            deleted = read_deleted(layout.version_dir(path, manifest.version), manifest.files.get(layout.DELETED))
        except BaseException:
            for segment in segments:
                if segment.meta.uid not in loaded:
                    segment.close()
            raise
        return cls(path, manifest, segments, deleted)

    def __len__(self) -> int:
        return sum(self._live)

    def problems(self) -> list[str]:
        """Faults of the segments' stores and vectors against their checksums (a format-1 version: its files)."""
        if self.manifest.legacy:
            folder = layout.version_dir(self.path, self.version)
            return layout.damaged_files(folder, self.manifest, sorted({layout.DOCUMENTS, layout.VECTORS} & set(self.manifest.files)))
        return [problem for segment in self.segments for problem in segment.problems()]

    @property
    def dimension(self) -> int:
        return self.manifest.dimension

    def live_keys(self) -> np.ndarray:
        """Every live key, sorted."""
        parts = [segment.keys[~np.isin(segment.keys, gone)] for segment, gone in zip(self.segments, self._deleted)]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def is_live(self, keys: np.ndarray) -> np.ndarray:
        return ~np.isin(keys, self.deleted)

    # Documents -------------------------------------------------------------------------------------

    def fetch(self, keys) -> dict[int, dict[str, Any]]:
        """Rows for ``keys``, from the segments that hold them (see ``DocumentStore.fetch``)."""
        keys = np.asarray(list(keys), dtype=np.int64)
        rows: dict[int, dict[str, Any]] = {}
        for segment in self.segments:
            mine = keys[segment.holds(keys)]
            if len(mine):
                rows.update(segment.store.fetch(mine.tolist()))
        return rows

    def keys_for_ids(self, ids: Sequence[str]) -> dict[str, int]:
        """``{id: key}`` of the live documents with these ids."""
        return {doc_id: row[0] for doc_id, row in self.rows_for_ids(ids).items()}

    def rows_for_ids(self, ids: Sequence[str]) -> dict[str, tuple]:
        """``{id: (key, text, metadata JSON, fields JSON, origin)}`` of the live documents with these ids, as stored."""
        found: dict[str, tuple] = {}
        for segment in self.segments:
            for doc_id, rows in segment.store.raw_rows_for_ids(ids).items():
                for row in rows:
                    if not np.isin(row[0], self.deleted):
                        found[doc_id] = row
        return found

    def keys_of_origin(self, origin: str) -> np.ndarray:
        """Live keys of the documents written by ``origin`` ("source" or "upsert")."""
        parts = [segment.store.keys_of_origin(origin) for segment in self.segments]
        keys = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        return keys[self.is_live(keys)]

    # Filters ---------------------------------------------------------------------------------------

    def field_types(self) -> dict[str, set[str]]:
        """Each metadata field of the segments' documents with the kinds of value it holds (``DocumentStore.field_types``)."""
        if self._field_types is None:
            merged: dict[str, set[str]] = {}
            for segment in self.segments:
                for name, kinds in segment.store.field_types().items():
                    merged.setdefault(name, set()).update(kinds)
            self._field_types = merged
        return {name: set(kinds) for name, kinds in self._field_types.items()}

    def filter_keys(self, conditions) -> np.ndarray:
        """Live keys of the documents meeting every condition (``DocumentStore.filter_keys``), sorted."""
        parts = [segment.store.filter_keys(conditions) for segment in self.segments]
        keys = np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)
        return keys[self.is_live(keys)]

    # Dense -----------------------------------------------------------------------------------------

    def dense(self, embedded: np.ndarray, k: int, allowed: np.ndarray | None, knobs: dict[str, int | None]) -> list[tuple[list[int], list[float]]]:
        """(keys, cosines) of the top-``k`` live vectors per query, among ``allowed`` keys if given, merged over segments."""
        scores_parts, keys_parts = [], []
        pooled = self._pooled()
        if pooled is not None:
            scores, keys = search_pool(pooled, embedded, k, allowed)
            check_cosines(self.path, "of the small segments", scores, keys)
            scores_parts.append(scores)
            keys_parts.append(keys)
        for segment, gone, live in zip(self.segments, self._deleted, self._live):
            if pooled is not None and is_pooled(segment):
                continue
            if allowed is not None:
                mine = allowed[segment.holds(allowed)]
                wanted, excluded, permitted = len(mine), None, mine
            else:
                wanted, excluded, permitted = live, (gone if len(gone) else None), None
            if not wanted:
                continue
            depth = min(k, wanted)
            scores, keys = segment.vectors.search(embedded, depth, allowed=permitted, excluded=excluded, **knobs)
            if (keys >= 0).sum(axis=1).min() < depth and (permitted is not None or excluded is not None):
                # An approximate structure can miss rare matches: search those exhaustively.
                scores, keys = segment.vectors.search(embedded, depth, allowed=permitted, excluded=excluded,
                                                      nprobe=1 << 30, efSearch=max(segment.meta.count, 16))
            if segment.vectors.keeps_vectors:
                check_cosines(self.path, segment.name, scores, keys)
            scores_parts.append(scores)
            keys_parts.append(keys)
        if not keys_parts:
            return [([], []) for _ in range(len(embedded))]
        return merge_hits(np.hstack(scores_parts), np.hstack(keys_parts), k)

    def _pooled(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(vectors, keys, live) of the small Flat segments, stacked; None unless there are at least two."""
        small = [segment for segment in self.segments if is_pooled(segment)]
        if len(small) < 2:
            return None
        if self._pool is None:  # built once per snapshot; threads racing here build equal pools
            vectors = np.vstack([segment.vectors.all_vectors() for segment in small])
            keys = np.concatenate([segment.vectors.keys() for segment in small])
            self._pool = (vectors, keys, self.is_live(keys))
        return self._pool

    # Keyword ---------------------------------------------------------------------------------------

    def keyword(self, query: str, k: int, allowed: np.ndarray | None = None) -> tuple[list[int], list[float]]:
        """Top-``k`` (keys, BM25 scores) for the words of ``query`` (any of them), best first; ``allowed`` restricts the documents."""
        terms = query_terms(query)
        if not terms or not len(self):
            return [], []
        found = self.postings(terms)
        return bm25(found, frequencies(found), len(self), self.tokens, k, allowed)

    def postings(self, terms: Sequence[str]) -> dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """Per term, per segment: the live documents' keys holding it, its count in each and their token lengths."""
        per_term: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {term: [] for term in terms}
        for segment, gone in zip(self.segments, self._deleted):
            for term, (keys, counts) in segment.store.postings(terms).items():
                if len(gone):
                    keep = ~np.isin(keys, gone)
                    keys, counts = keys[keep], counts[keep]
                lengths = segment.lengths[np.searchsorted(segment.keys, keys)]
                per_term[term].append((keys, counts, lengths))
        return per_term

    def stored_sample(self, count: int) -> tuple[list[str], np.ndarray] | None:
        """Up to ``count`` stored texts and their vectors as a segment keeps them whole; None if no segment does."""
        for segment in self.segments:
            if segment.vectors.keeps_vectors:
                keys = segment.vectors.keys()[:count]
                rows = segment.store.fetch(keys)
                keys = np.array([k for k in keys if int(k) in rows], dtype=np.int64)
                return [rows[int(k)]["text"] for k in keys], segment.vectors.reconstruct(keys)
        return None

    def close(self, keep: dict[str, Segment] | None = None) -> None:
        """Close the segments' stores, except those in ``keep`` (by uid), which another snapshot still uses."""
        for segment in self.segments:
            if not keep or segment.meta.uid not in keep:
                segment.close()


def frequencies(postings: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]) -> dict[str, int]:
    """Each term's document frequency in ``postings`` (``Snapshot.postings``)."""
    return {term: sum(len(keys) for keys, _, _ in parts) for term, parts in postings.items()}


def bm25(postings: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]], frequency: dict[str, int], live: int,
         tokens: int, k: int, allowed: np.ndarray | None) -> tuple[list[int], list[float]]:
    """Top-``k`` (keys, BM25 scores) of the documents in ``postings``, among ``allowed`` if given, with the collection
    statistics of ``live`` documents of ``tokens`` tokens in all, and each term's document ``frequency`` among them
    (those of the whole version: a shard's postings score as the whole index's would)."""
    average = tokens / live
    all_keys, all_scores = [], []
    for term, parts in postings.items():
        if not frequency.get(term):
            continue
        idf = math.log((live - frequency[term] + 0.5) / (frequency[term] + 0.5))
        idf = idf if idf > 0 else 1e-6  # FTS5's floor: a term in most documents still counts a little
        for keys, counts, lengths in parts:
            if allowed is not None:
                keep = np.isin(keys, allowed)
                keys, counts, lengths = keys[keep], counts[keep], lengths[keep]
            tf = counts.astype(np.float64)
            all_keys.append(keys)
            all_scores.append(idf * tf * (BM25_K1 + 1) / (tf + BM25_K1 * (1 - BM25_B + BM25_B * lengths / average)))
    if not all_keys:
        return [], []
    keys, inverse = np.unique(np.concatenate(all_keys), return_inverse=True)
    scores = np.bincount(inverse, weights=np.concatenate(all_scores), minlength=len(keys))
    order = np.lexsort((keys, -scores))[:k]
    return keys[order].tolist(), scores[order].tolist()


def merge_hits(scores: np.ndarray, keys: np.ndarray, k: int) -> list[tuple[list[int], list[float]]]:
    """(keys, scores) of the best ``k`` of each row of hits (key -1: none), ties by key: however the hits were split
    (segments, shards), the same answer."""
    scores = np.where(keys >= 0, scores, -np.inf)
    order = np.lexsort((keys, -scores), axis=1)[:, :k]
    scores, keys = np.take_along_axis(scores, order, axis=1), np.take_along_axis(keys, order, axis=1)
    return [(row_keys[row_keys >= 0].tolist(), row_scores[row_keys >= 0].tolist()) for row_scores, row_keys in zip(scores, keys)]


def check_cosines(path: Path, segment: str, scores: np.ndarray, keys: np.ndarray) -> None:
    """IndexCorruptError if unit vectors gave a cosine outside [-1, 1]: the segment's vectors are damaged.

    A last guard for what the checksums have not proven yet (a background check still reading).
    """
    found = np.abs(scores[keys >= 0])
    if len(found) and float(found.max()) > 1 + COSINE_SLACK:
        raise IndexCorruptError(f"{path}: segment {segment} gives a cosine of {float(found.max()):.4f}, outside [-1, 1]: "
                                "its vectors are damaged; run 'indexer check INDEX'")


def is_pooled(segment: Segment) -> bool:
    """Whether ``segment`` is searched in the pool of small Flat segments rather than by its own FAISS structure."""
    return segment.vectors is not None and segment.meta.count <= POOLED_SEGMENT and segment.vectors.is_flat


def search_pool(pool: tuple[np.ndarray, np.ndarray, np.ndarray], embedded: np.ndarray, k: int,
                allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, keys) per query over the pooled vectors, live and ``allowed`` ones only; missing hits have key -1."""
    vectors, keys, usable = pool
    if allowed is not None:
        usable = usable & np.isin(keys, allowed)
    scores = np.asarray(embedded, dtype=np.float32) @ vectors.T
    scores[:, ~usable] = -np.inf
    depth = min(k, len(keys))
    top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth] if depth < len(keys) else np.tile(np.arange(len(keys)), (len(scores), 1))
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.lexsort((keys[top], -top_scores), axis=1)  # best first, ties by key as FAISS breaks them
    top, top_scores = np.take_along_axis(top, order, axis=1), np.take_along_axis(top_scores, order, axis=1)
    return top_scores, np.where(np.isfinite(top_scores), keys[top], -1)


def read_deleted(folder: Path, checksum: str | None = None) -> np.ndarray:
    """The sorted deleted keys of a version folder (checked against ``checksum`` if given)."""
    if checksum is not None and (folder / layout.DELETED).is_file() and not layout.verified(folder / layout.DELETED, checksum):
        raise IndexCorruptError(f"{folder / layout.DELETED}: deletion set does not match its checksum")
    try:
        deleted = np.load(folder / layout.DELETED)
    except FileNotFoundError:
        raise IndexCorruptError(f"{folder}: {layout.DELETED} is missing") from None
    except (OSError, ValueError) as exc:
        raise IndexCorruptError(f"{folder / layout.DELETED}: unreadable deletion set ({exc})") from None
    if deleted.dtype != np.int64 or deleted.ndim != 1:
        raise IndexCorruptError(f"{folder / layout.DELETED}: not a deletion set")
    return deleted


_terms_lock = threading.Lock()
_terms_db: sqlite3.Connection | None = None


def query_terms(text: str) -> list[str]:
    """The distinct keyword terms of ``text`` as the index's FTS5 tokenizer makes them (lower case, stemmed)."""
    global _terms_db
    with _terms_lock:
        if _terms_db is None:
            _terms_db = sqlite3.connect(":memory:", check_same_thread=False)
            _terms_db.execute(f"CREATE VIRTUAL TABLE q USING fts5(text, tokenize={KEYWORD_TOKENIZER!r})")
            _terms_db.execute("CREATE VIRTUAL TABLE q_terms USING fts5vocab(q, row)")
        _terms_db.execute("DELETE FROM q")
        _terms_db.execute("INSERT INTO q (text) VALUES (?)", [text])
        return [row[0] for row in _terms_db.execute("SELECT term FROM q_terms")]

