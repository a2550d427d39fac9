"""Building an index from its source: ``build`` and ``rebuild``.

Both read the whole source and compare it with the current version by id:
documents that are new or changed go into one new segment through the ingest
pipeline (so only texts the embedding cache lacks are encoded), documents that
changed or left the source are deleted, unchanged ones stay in their segments.
A rebuild of an unchanged source writes a manifest, or nothing with
``if_changed``. When the embedding configuration (model weights, pooling, max
length, precision) or the index type changed, nothing carries over: the new
version is one new segment. A compaction may follow (``compact.after_write``).

``build`` publishes exactly its source; ``rebuild`` keeps documents written by
upsert (they shadow a source record with the same id) until they are deleted
or the rebuild is told to ``prune_upserts``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import collector, layout, vectors
from .cache import EmbeddingCache
from .compact import after_write
from .errors import ArgumentError, SourceError
from .external import encoder_for_write, is_external, load_encoder, load_tokenizer
from .ingest import CachedEncoder, LocalEngine, ReadAhead
from .segments import segment_structure
from .settings import IndexSettings, WriteOptions
from .sources import DocumentSource
from .store import import_sqlite_utils
from .vectors import parse_memory
from .write import BuildReport, Diff, Transaction, since, transaction

if TYPE_CHECKING:
    from .encoder import Encoder
    from .external import ExternalEncoder
    from .ray_engine import RayOptions


def build_index(
    source: str | Path | DocumentSource,
    index: str | Path,
    settings: IndexSettings | None = None,
    *,
    options: WriteOptions | None = None,
    if_changed: bool = False,
    ray: RayOptions | None = None,
    encoder: Encoder | ExternalEncoder | None = None,
    only_if_new: bool = False,
) -> BuildReport:
    """Embed every document of ``source`` and publish it as a new version of ``index``.

    The new version holds exactly the documents of ``source`` (documents added
    by upsert are not kept; ``rebuild_index`` keeps them). Texts the index has
    embedded before with the same model settings are reused. ``options``:
    device, versions kept, lock wait, progress bar (``WriteOptions``). With
    ``if_changed``, nothing is published when the documents equal the
    current version's. With ``ray``, the texts to encode go through a pool of
    encoder replicas on a Ray cluster (see ``ray_engine``). ``source`` may be
    a ``DocumentSource`` (records in memory; no source is recorded for
    rebuilds then). ``encoder`` is used instead of loading the model; an
    ``ExternalEncoder`` makes the index one of its vectors (``settings.model``
    becomes its ``external:NAME``). With ``only_if_new``, an index that has a
    version already is left alone (decided under the writer lock; the report
    says ``published`` False).
    """
    settings = replace(settings or IndexSettings())
    if encoder is not None and is_external(encoder.model_name):
        settings.model = encoder.model_name
    return _build(layout.index_path(index), source, settings, options or WriteOptions(), action="build",
                  if_changed=if_changed, encoder=encoder, ray=ray, only_if_new=only_if_new)


def rebuild_index(
    index: str | Path,
    source: str | Path | None = None,
    *,
    options: WriteOptions | None = None,
    if_changed: bool = False,
    encoder: Encoder | None = None,
    ray: RayOptions | None = None,
    prune_upserts: bool = False,
) -> BuildReport:
    """Re-read the index's source (or ``source``) with its recorded settings and publish the result.

    Only new or changed documents are written (and their texts encoded only if
    the index has not embedded them before; on Ray with ``ray``). Documents that left the source
    are deleted; documents written by upsert are kept (and win over a source
    record with the same id) unless ``prune_upserts``.
    """
    path = layout.index_path(index)
    manifest = layout.read_manifest(layout.version_dir(path, layout.current_version(path)))
    settings = replace(manifest.settings)
    source = source or settings.source
    if not source:
        raise ArgumentError(f"{path}: no source recorded; pass one")
    return _build(path, source, settings, options or WriteOptions(), action="rebuild", if_changed=if_changed,
                  encoder=encoder, ray=ray, prune_upserts=prune_upserts)


@dataclass
class _Plan:
    """What a build decided before it writes: the encoder, the comparison with the current version, whether that
    version's segments carry over, and the documents to read (already being read ahead, for a new index)."""

    encoder: Encoder | ExternalEncoder
    diff: Diff
    carry: bool
    documents: Iterable
    memory: int | None


def _build(path: Path, source, settings: IndexSettings, options: WriteOptions, *, action: str, if_changed: bool,
           encoder=None, ray=None, prune_upserts=False, only_if_new=False) -> BuildReport:
    """open -> plan -> encode (the engine fills a new segment) -> seal -> publish, under the writer lock."""
    started = time.monotonic()
    documents = source if isinstance(source, DocumentSource) else DocumentSource(
        source, settings.id_field, settings.text_fields, max_document_bytes=settings.max_document_bytes)
    with transaction(path, action, options.wait) as txn, contextlib.ExitStack() as stack:
        stack.enter_context(collector.frozen())  # see collector: the model's load and the write skip what they start with
        # A rebuild carries upserted documents over, so it must read them, unless told to drop them.
        current = txn.open_current(repairable=action == "build" or prune_upserts,
                                   hint="; or 'indexer rebuild INDEX --prune-upserts' publishes the source alone")
        if only_if_new and current is not None:
            return BuildReport(str(path), current.version, len(current), published=False, segments=len(current.segments),
                               warnings=txn.warnings)
        plan = _plan(txn, stack, documents, settings, options.device, keep_upserts=action == "rebuild" and not prune_upserts,
                     encoder=encoder, ray=ray)
        settings.source = None if isinstance(source, DocumentSource) else str(Path(source).resolve())
        cache = txn.cache = EmbeddingCache(path / layout.CACHE, plan.encoder.dimension)
        try:
            writer = txn.new_segment(plan.encoder.dimension, plan.encoder.embedding.key, cache, settings)
            cached = CachedEncoder(plan.encoder, cache, writer.number, txn.held_vectors(plan.encoder.embedding.key))
            engine = LocalEngine(progress=options.progress) if ray is None else _ray_engine(settings, ray, plan.memory)
            # Whether the new segment will be the whole index is known only after the diff; guessed from before it.
            stages, built = engine.fill(plan.documents, cached, writer, whole=txn.replaces_all)
            if not plan.diff.read:
                raise SourceError(f"{documents.path}: no documents")
            settings.id_field, settings.text_fields = documents.id_field, documents.text_fields
            removed = plan.diff.removed()
            report = BuildReport(str(path), current.version if current else "", txn.count, cached.encoded, cached.reused,
                                 deleted=len(removed), kept_upserts=plan.diff.kept, stages=stages, warnings=txn.warnings,
                                 segments=len(current.segments) if current else 0)  # the new version's, once one is published
            if plan.carry:
                txn.delete(np.concatenate([removed, plan.diff.replaced()]))
            _seal(txn, writer, built, settings, plan, stages)
            if if_changed and plan.carry and not writer.count and not len(removed):
                report.published = False
            else:
                txn.publish(settings, plan.encoder.dimension, plan.encoder.fingerprint, report, options.keep)
                after_write(txn, report, settings, options.keep, encoder=plan.encoder)
        finally:
            txn.close_cache()
    report.warnings += cache.warnings + documents.warnings
    report.seconds = since(started)
    return report


def _plan(txn: Transaction, stack: contextlib.ExitStack, documents: DocumentSource, settings: IndexSettings, device: str | None,
          *, keep_upserts: bool, encoder, ray) -> _Plan:
    """Load the encoder (or not yet, for a write to an index that may change little), check the settings before any
    document is encoded, and decide what carries over from the current version."""
    current = txn.current
    ahead = tokenizer = None
    if current is None and encoder is None and ray is None and not is_external(settings.model):
        tokenizer = load_tokenizer(settings, device)
    if tokenizer is not None:
        # Nothing to compare with or carry over: every document is written, so reading and tokenising
        # them starts now, beside the model's load (sqlite_utils first, while this is the only thread).
        import_sqlite_utils()
        diff = Diff(None, carry=False, keep_upserts=keep_upserts)
        ahead = stack.enter_context(ReadAhead(diff.changed(documents), tokenizer.tokenize))
    if current is not None and ray is None:  # the model loads once a text must be encoded (writes that change little)
        encoder = encoder_for_write(settings, device=device, reuse=encoder)
    else:
        encoder = load_encoder(settings, device, reuse=encoder, tokenizer=tokenizer)
    if ray is not None and is_external(encoder.model_name):
        raise ArgumentError(f"{encoder.model_name} runs in this process only; build it without --engine ray")
    settings.model, settings.max_length = encoder.model_name, encoder.max_length
    # A bad index type or memory budget fails now, not after the whole corpus is encoded.
    memory = parse_memory(settings.memory)
    vectors.create(encoder.dimension, segment_structure(settings, 1, encoder.dimension, whole=True))
    carry = current is not None and _carries_over(txn, encoder, settings)
    if not carry:
        txn.reset()
    if ahead is None:
        diff = Diff(current, carry=carry, keep_upserts=keep_upserts)
    return _Plan(encoder, diff, carry, ahead if ahead is not None else diff.changed(documents), memory)


def _seal(txn: Transaction, writer, built, settings: IndexSettings, plan: _Plan, stages: dict[str, float]) -> None:
    """Seal the new segment into the version (none if nothing was new: segments whose documents all changed or
    left are no longer listed, so the new one may be all there is)."""
    if not writer.count:
        return
    structure = built[2] if built else segment_structure(settings, writer.count, plan.encoder.dimension, whole=txn.replaces_all)
    sealing = time.monotonic()
    txn.add_segment(writer.seal(structure, built[:2] if built else None))
    stages["seal"] = since(sealing)
    stages.update(writer.timings)


def _ray_engine(settings: IndexSettings, ray: RayOptions, memory: int | None):
    from .ray_engine import RayEngine  # imports Ray's client only when asked for

    return RayEngine(settings, ray, memory)


def _carries_over(txn: Transaction, encoder: Encoder, settings: IndexSettings) -> bool:
    """Whether the current version's segments can stay: same embedding configuration, index type and vector storage."""
    manifest = txn.manifest
    same_vectors = all(s.embedding == encoder.embedding.key for s in txn.segments)
    return (same_vectors and manifest.settings.index_type == settings.index_type and manifest.settings.vectors == settings.vectors
            and manifest.dimension == encoder.dimension)
