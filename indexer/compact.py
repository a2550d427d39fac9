"""Compaction: merging segments into one and dropping deleted documents.

After every write, ``after_write`` asks the policy (``merge_plan``):

* deleted documents over ``DELETED_SHARE`` (20%) of the documents the
  segments hold: merge every segment (a full compaction);
* more than ``MAX_SEGMENTS`` (10) segments: merge the ``MERGE_WIDTH`` (10)
  smallest into one, so a stream of small writes costs small merges, as in
  Lucene's tiered policy, and the large segment is left alone.

``indexer compact`` merges every segment whatever the policy says. A merge
writes one new segment with the live documents of the segments it merges,
with the structure the index type calls for at its new size, re-tuned
(``segments.segment_structure``), and publishes a version that lists it in
their place. Vectors come from the merged segments' own FAISS structures
where those keep whole vectors (Flat, HNSW, IVF-Flat), else from the
embedding cache (rows whose check holds, see ``cache``), else from the model.
The segments it merges are checked against their checksums first, so a
damaged file or cache row never goes into a new segment under fresh checksums.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import interrupts, layout
from .cache import EmbeddingCache, embedding_digests
from .errors import IndexCorruptError
from .external import load_encoder
from .ingest import CachedEncoder
from .segments import Segment, segment_structure
from .settings import IndexSettings, WriteOptions
from .sources import Document
from .write import BuildReport, Transaction, disk_full, existing_index, since, transaction

if TYPE_CHECKING:
    from .encoder import Encoder

MAX_SEGMENTS = 10
MERGE_WIDTH = 10
DELETED_SHARE = 0.2


def merge_plan(segments: list[layout.SegmentMeta], deleted: np.ndarray) -> list[str]:
    """Names of the segments the policy would merge now; empty when none."""
    held = sum(s.count for s in segments)
    if len(deleted) and len(deleted) > DELETED_SHARE * held:
        return [s.name for s in segments]
    if len(segments) > MAX_SEGMENTS:
        return [s.name for s in sorted(segments, key=lambda s: s.count)[:MERGE_WIDTH]]
    return []


def compact_index(index: str | Path, *, options: WriteOptions | None = None) -> BuildReport:
    """Merge every segment of ``index`` into one without its deleted documents, and publish it.

    Readers go on reading the version they have; nothing is published when
    the index is one segment without deletions already. ``options``: versions kept, lock wait, and the device
    for a model merges may need (``WriteOptions``).
    """
    options = options or WriteOptions()
    started = time.monotonic()
    path = existing_index(index)
    with transaction(path, "compact", options.wait) as txn:
        current = txn.open_current()
        manifest = current.manifest
        report = BuildReport(str(path), manifest.version, len(current), warnings=txn.warnings, segments=len(txn.segments))
        if len(txn.segments) == 1 and not len(txn.deleted) and not txn.converted:
            report.published = False
        else:
            if len(txn.segments) > 1 or len(txn.deleted):  # a format-1 index converted is one segment already
                report.merged = len(txn.segments)
                merge(txn, [s.name for s in txn.segments], manifest.settings, device=options.device)
            txn.publish(manifest.settings, manifest.dimension, manifest.model_fingerprint, report, options.keep)
    report.seconds = since(started)
    return report


def after_write(txn: Transaction, report: BuildReport, settings: IndexSettings, keep: int, *, encoder: Encoder | None = None) -> None:
    """Merge what the policy says after a published write, and publish that too (counted in ``report.merged``)."""
    names = merge_plan(txn.segments, txn.deleted)
    if not names:
        return
    published = report.version
    try:
        merge(txn, names, settings, encoder=encoder)
        txn.publish(settings, txn.manifest.dimension, txn.manifest.model_fingerprint, report, keep)
    except (Exception, KeyboardInterrupt) as exc:  # CURRENT has moved: whatever stops the merge (a model that cannot load,
        # a full disk, a damaged segment, Ctrl-C) leaves the write published, so it is a warning, never the write's error.
        if isinstance(exc, KeyboardInterrupt):
            reason = "interrupted"
        elif disk_full(exc, txn.path):
            reason = "no space left on device"
        else:
            reason = (str(exc).split(";")[0].splitlines() or [type(exc).__name__])[0]
        report.version, report.published = layout.read_pointer(txn.path) or published, True
        report.warnings.append(f"{txn.path}: published {published}, but the merge after it failed ({reason}); "
                               "'indexer compact' merges")
        return
    report.merged += len(names)


def merge(txn: Transaction, names: list[str], settings: IndexSettings, *, encoder: Encoder | None = None,
          device: str | None = None) -> None:
    """Write the live documents of the segments ``names`` as one new segment and list it in their place."""
    metas = [s for s in txn.segments if s.name in names]
    whole = len(metas) == len(txn.segments)
    dimension = metas[0].dimension
    for meta in metas:
        problems = layout.segment_problems(layout.segment_dir(txn.path, meta.name), meta, checksums=True, memo=True)
        if problems:
            raise IndexCorruptError(f"{txn.path}: {problems[0]}; nothing merged. Run 'indexer check INDEX --all'")
    own_cache = txn.cache is None  # the write's own cache when it has one, else one for the merge
    cache = txn.cache if txn.cache is not None else EmbeddingCache(txn.path / layout.CACHE, dimension)
    writer = txn.new_segment(dimension, metas[0].embedding, cache, settings)
    vectors = _Vectors(txn, cache, metas[0].embedding, dimension, writer.number, settings, encoder, device)
    dropped = []
    try:
        for meta in metas:
            segment = Segment.open(layout.segment_dir(txn.path, meta.name))
            try:
                for keys, rows in segment.store.rows():
                    interrupts.check()
                    live = ~np.isin(keys, txn.deleted)
                    dropped.append(keys[~live])
                    docs = [Document(r["id"], r["text"], r["metadata"], r["fields"], origin=r["origin"]) for r, ok in zip(rows, live) if ok]
                    if docs:
                        found, digests = vectors.of([d.text for d in docs], keys[live], segment)
                        writer.add(docs, found, digests=digests)
            finally:
                segment.close()
        structure = segment_structure(settings, writer.count, dimension, whole=whole)
        meta = writer.seal(structure)
    finally:
        if own_cache:
            cache.close()
            txn.warnings += cache.warnings
    txn.replace_segments(set(names), meta, np.concatenate(dropped) if dropped else np.empty(0, dtype=np.int64))


class _Vectors:
    """The vectors of documents being merged: from their segment's structure (proven by its checksum) where it keeps
    them whole, else where the index keeps them by text (other segments, the cache, rows proven by their checks), else
    from the model (loaded then)."""

    def __init__(self, txn: Transaction, cache: EmbeddingCache, embedding: str, dimension: int, segment_number: int,
                 settings: IndexSettings, encoder: Encoder | None, device: str | None):
        self.settings, self.encoder, self.device = settings, encoder, device
        self.cached = CachedEncoder(None, cache, segment_number, txn.held_vectors(embedding), embedding=embedding,
                                    dimension=dimension)

    def of(self, texts: list[str], keys: np.ndarray, segment: Segment) -> tuple[np.ndarray, np.ndarray]:
        """The vectors of ``texts`` (documents ``keys`` of ``segment``) and their digests (see ``cache``)."""
        if segment.vectors.keeps_vectors:
            return segment.vectors.reconstruct(keys), embedding_digests(self.cached.prefix, texts)
        digests, hit, out = self.cached.lookup(texts)
        missing = np.flatnonzero(~hit)
        if len(missing):
            out[missing] = self._encoder().encode_texts([texts[i] for i in missing])
        return out, digests

    def _encoder(self) -> Encoder:
        if self.encoder is None:
            self.encoder = load_encoder(self.settings, self.device)
        return self.encoder
