"""Editing an index in place: ``upsert`` and ``delete``.

A write of a few documents costs what it changes: an upsert writes one new
segment holding its new or changed documents and deletes the keys they
replace; a delete only adds keys to the deletion set. Neither reads or copies
the index's other segments, so the bytes written do not grow with the index.
A compaction may follow (``compact.after_write``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import collector, layout
from .cache import EmbeddingCache
from .compact import after_write
from .errors import DocumentNotFoundError, SourceError
from .external import check_encoder, encoder_for_write
from .ingest import CachedEncoder, LocalEngine
from .segments import segment_structure
from .settings import WriteOptions
from .sources import Document, DocumentSource
from .write import BuildReport, Diff, existing_index, since, transaction

if TYPE_CHECKING:
    from .encoder import Encoder


def upsert_documents(
    index: str | Path,
    source: str | Path | DocumentSource,
    *,
    id_field: str | None = None,
    text_fields: Sequence[str] | None = None,
    options: WriteOptions | None = None,
    encoder: Encoder | None = None,
) -> BuildReport:
    """Add the documents of ``source`` to ``index``, replacing those whose id is already there.

    ``source`` is a file or folder, or a ``DocumentSource`` (e.g. records sent
    to the HTTP service). Fields default to the ones the index was built
    with. Upserted documents are kept by later rebuilds. ``encoder`` is used
    instead of loading the model when it matches the index's settings.
    Nothing is published when every document is already there as given.
    ``options``: device, versions kept, lock wait, progress bar (``WriteOptions``).
    """
    options = options or WriteOptions()
    started = time.monotonic()
    path = existing_index(index)
    with transaction(path, "upsert", options.wait) as txn, collector.frozen():  # see collector: the load and the write skip what they start with
        current = txn.open_current()
        manifest = current.manifest
        settings = manifest.settings
        if isinstance(source, DocumentSource):
            documents = source
        else:
            documents = DocumentSource(source, id_field or settings.id_field, text_fields or settings.text_fields,
                                       max_document_bytes=settings.max_document_bytes)
        encoder = encoder_for_write(settings, device=options.device, reuse=encoder)  # the model loads only if a text must be encoded
        check_encoder(encoder, manifest.model_fingerprint, path)
        cache = txn.cache = EmbeddingCache(path / layout.CACHE, encoder.dimension)
        try:
            writer = txn.new_segment(encoder.dimension, encoder.embedding.key, cache, settings)
            cached = CachedEncoder(encoder, cache, writer.number, txn.held_vectors(encoder.embedding.key))
            diff = Diff(current, carry=True, keep_upserts=False)
            stages, _ = LocalEngine(progress=options.progress).fill(diff.changed(_as_upserts(documents)), cached, writer, whole=False)
            if not diff.read:
                raise SourceError(f"{documents.path}: no documents")
            report = BuildReport(str(path), manifest.version, len(current), cached.encoded, cached.reused, stages=stages,
                                 segments=len(current.segments), warnings=txn.warnings)
            if not writer.count:
                report.published = False
            else:
                txn.delete(diff.replaced())
                structure = segment_structure(settings, writer.count, encoder.dimension, whole=txn.replaces_all)
                txn.add_segment(writer.seal(structure))
                txn.publish(settings, encoder.dimension, encoder.fingerprint, report, options.keep)
                after_write(txn, report, settings, options.keep, encoder=encoder)
        finally:
            txn.close_cache()
    report.warnings += cache.warnings + documents.warnings
    report.seconds = since(started)
    return report


def _as_upserts(documents: Iterable[Document]) -> Iterator[Document]:
    for doc in documents:
        doc.origin = "upsert"
        yield doc


def delete_documents(
    index: str | Path,
    ids: Sequence[str],
    *,
    missing_ok: bool = False,
    options: WriteOptions | None = None,
) -> BuildReport:
    """Remove the documents with these ids from ``index``.

    An id that is not in the index is an error (nothing is deleted) unless
    ``missing_ok``; when nothing is left to delete, nothing is published.
    ``options``: versions kept and lock wait (``WriteOptions``).
    """
    options = options or WriteOptions()
    started = time.monotonic()
    path = existing_index(index)
    ids = [str(i) for i in ids]
    with transaction(path, "delete", options.wait) as txn:
        current = txn.open_current()
        manifest = current.manifest
        found = current.keys_for_ids(ids)
        missing = [i for i in ids if i not in found]
        if missing and not missing_ok:
            shown = ", ".join(repr(i) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise DocumentNotFoundError(f"{path}: no document with id {shown}; nothing deleted (use --missing-ok to skip)")
        report = BuildReport(str(path), manifest.version, len(current), deleted=len(found), segments=len(current.segments),
                             warnings=txn.warnings)
        if not found:
            report.published = False
        else:
            txn.delete(list(found.values()))
            txn.publish(manifest.settings, manifest.dimension, manifest.model_fingerprint, report, options.keep)
            after_write(txn, report, manifest.settings, options.keep)
    report.seconds = since(started)
    return report
