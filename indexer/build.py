"""Writing an index: build, rebuild, upsert, delete, rollback.

Every write takes the index's writer lock, writes a complete new version in
``staging/`` and publishes it atomically (see ``layout``); on any error or
crash the published version is untouched, and a write that changes nothing
publishes nothing. Texts already embedded by the same model, pooling and max
length come from the embedding cache, so only new or changed texts are encoded.

Where documents come from decides what a rebuild does with them: ``build``
publishes exactly its source; ``rebuild`` re-reads the source and keeps the
documents written by ``upsert`` (they shadow a source record with the same id)
until they are deleted or the rebuild is told to ``prune_upserts``.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from . import layout
from .cache import EmbeddingCache, embedding_keys
from .check import check_version
from .errors import ArgumentError, DiskFullError, IndexCorruptError, IndexerError, IndexNotFoundError, ModelError, SourceError
from .settings import IndexSettings, embedding_config
from .sources import Document, DocumentSource
from .store import DocumentStore
from .vectors import ONDISK_SUFFIX, VectorIndex, VectorSpool, build_from_shards, build_from_spool, choose_structure, ivf_bytes, parse_memory

if TYPE_CHECKING:
    from .encoder import Encoder
    from .ray_engine import RayOptions

CHUNK_SIZE = 4096
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
    ``warnings`` are one-line notes on what went wrong but did not stop the
    write (a damaged embedding cache set aside, clean-up after publishing).
    """

    index: str
    version: str
    documents: int
    encoded: int
    reused: int
    deleted: int
    seconds: float
    published: bool = True
    kept_upserts: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CachedEncoder:
    """An encoder in front of an index's embedding cache."""

    def __init__(self, encoder: Encoder, cache: EmbeddingCache, version_number: int):
        self.encoder = encoder
        self.cache = cache
        self.version_number = version_number
        self.prefix = encoder.embedding_config + "|"
        self.encoded = 0
        self.reused = 0

    def lookup(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Cache keys of ``texts``, a mask of those the cache holds, and their vectors (counted as reused)."""
        keys = embedding_keys(self.prefix, texts)
        cached = self.cache.get(keys)
        hit = np.fromiter((key in cached for key in keys), dtype=bool, count=len(keys))
        known = [cached[key] for key in keys if key in cached]
        self.reused += len(known)
        return keys, hit, np.stack(known) if known else np.empty((0, self.encoder.dimension), dtype=np.float32)

    def remember_vectors(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Put freshly encoded vectors of ``texts`` into the cache for this version."""
        self.cache.put(embedding_keys(self.prefix, texts), vectors, self.version_number)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        _, hit, known = self.lookup(texts)
        out = np.empty((len(texts), self.encoder.dimension), dtype=np.float32)
        out[hit] = known
        missing = np.flatnonzero(~hit)
        if len(missing):
            fresh = [texts[i] for i in missing]
            out[missing] = self.encoder.encode_texts(fresh)
            self.remember_vectors(fresh, out[missing])
        self.encoded += len(missing)
        return out

    def remember(self, store: DocumentStore) -> None:
        """Mark every text of the new version, inherited ones included, as used by it."""
        for _, texts in store.key_texts():
            self.cache.mark_used(embedding_keys(self.prefix, texts), self.version_number)

    def forget_unused(self, path: Path) -> None:
        """Drop cache entries that no version left on disk uses.

        A version's texts are all marked with its ``cache_generation``: its own
        number, or for a delete (whose texts are a subset of the version before)
        that version's generation.
        """
        generations = [layout.read_manifest(layout.version_dir(path, v)).cache_generation for v in layout.list_versions(path)]
        self.cache.prune(min(generations))


def document_chunks(documents: Iterable[Document]) -> Iterator[list[Document]]:
    """Documents in lists of ``CHUNK_SIZE``, so memory stays bounded."""
    stream = iter(documents)
    while docs := list(islice(stream, CHUNK_SIZE)):
        yield docs


def encoded_chunks(encoder, documents: Iterable[Document], progress: bool = False) -> Iterator[tuple[list[Document], np.ndarray]]:
    """Documents in chunks of ``CHUNK_SIZE`` with their vectors."""
    with tqdm(desc="indexing", unit="doc", disable=not progress, file=sys.stderr) as bar:
        for docs in document_chunks(documents):
            yield docs, encoder.encode_texts([d.text for d in docs])
            bar.update(len(docs))


@contextmanager
def new_version(path: Path, action: str, wait: float) -> Iterator[Path]:
    """Hold the writer lock and a staging folder; clean up whatever is not published.

    Running out of disk space anywhere in the write becomes one DiskFullError.
    """
    try:
        with layout.writer_lock(path, wait, action):
            # Decided under the lock: a writer that waited must not take an index another one made for its own.
            created = layout.read_pointer(path) is None and not layout.list_versions(path)
            staging = layout.new_staging(path)
            try:
                yield staging
            except BaseException:
                if created and not layout.list_versions(path):  # never remove what was published
                    layout.discard(path)
                raise
            finally:
                layout.discard(staging)
    except (OSError, sqlite3.Error, RuntimeError) as exc:
        if not disk_full(exc, path):
            raise
        raise DiskFullError(f"{path}: no space left on device during {action}; nothing was published, the current version is unchanged") from None


def disk_full(exc: BaseException, path: Path) -> bool:
    """Whether ``exc`` means the disk or quota under ``path`` ran out.

    The OS says ENOSPC; SQLite says SQLITE_FULL, or only "disk I/O error"
    when its shared-memory file cannot grow; FAISS says "write error". For
    the vague ones, the filesystem's free space decides.
    """
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
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


def _previous(path: Path, action: str) -> tuple[layout.Manifest | None, list[str]]:
    """The current version's manifest before a build (None for a new index), and warnings.

    A ``CURRENT`` that points to a missing version does not stop a build: the
    build publishes a sound version and so repairs the index.
    """
    if layout.read_pointer(path) is None:
        return None, []
    try:
        return layout.read_manifest(layout.version_dir(path, layout.current_version(path))), []
    except IndexCorruptError as exc:
        if action != "build":
            raise
        return None, [f"{exc}; building a new version from the source"]


def build_index(
    source: str | Path,
    index: str | Path,
    settings: IndexSettings | None = None,
    *,
    device: str | None = None,
    keep: int = 3,
    wait: float = 0.0,
    if_changed: bool = False,
    progress: bool = False,
    ray: RayOptions | None = None,
) -> BuildReport:
    """Embed every document of ``source`` and publish it as a new version of ``index``.

    The new version holds exactly the documents of ``source`` (documents added
    by upsert are not kept; ``rebuild_index`` keeps them). Texts the index has
    embedded before with the same model settings are reused from its cache.
    With ``if_changed``, nothing is published when the documents equal the
    current version's. With ``ray``, the texts to encode go through a pool of
    encoder replicas on a Ray cluster (see ``ray_engine``).
    """
    settings = replace(settings or IndexSettings())
    return _build(layout.index_path(index), source, settings, device=device, keep=keep, wait=wait, if_changed=if_changed,
                  progress=progress, action="build", ray=ray)


def rebuild_index(
    index: str | Path,
    source: str | Path | None = None,
    *,
    device: str | None = None,
    keep: int = 3,
    wait: float = 0.0,
    if_changed: bool = False,
    progress: bool = False,
    encoder: Encoder | None = None,
    ray: RayOptions | None = None,
    prune_upserts: bool = False,
) -> BuildReport:
    """Re-read the index's source (or ``source``) with its recorded settings and publish the result.

    Only new or changed texts are encoded (on Ray with ``ray``). Documents that
    left the source are dropped; documents written by upsert are kept (and win
    over a source record with the same id) unless ``prune_upserts``.
    """
    path = layout.index_path(index)
    manifest = layout.read_manifest(layout.version_dir(path, layout.current_version(path)))
    settings = replace(manifest.settings)
    source = source or settings.source
    if not source:
        raise ArgumentError(f"{path}: no source recorded; pass one")
    return _build(path, source, settings, device=device, keep=keep, wait=wait, if_changed=if_changed, progress=progress,
                  action="rebuild", encoder=encoder, ray=ray, prune_upserts=prune_upserts)


def _build(path: Path, source, settings: IndexSettings, *, device, keep, wait, if_changed, progress, action,
           encoder=None, ray=None, prune_upserts=False) -> BuildReport:
    from .encoder import Encoder  # torch: imported only where a model is loaded

    started = time.monotonic()
    documents = DocumentSource(source, settings.id_field, settings.text_fields, max_document_bytes=settings.max_document_bytes)
    with new_version(path, action, wait) as staging:
        previous, warnings = _previous(path, action)
        encoder = Encoder.from_settings(settings, device, reuse=encoder)
        settings.model, settings.max_length = encoder.model_name, encoder.max_length
        settings.source = str(Path(source).resolve())
        # A bad index type or memory budget fails now, not after the whole corpus is encoded.
        memory = parse_memory(settings.memory)
        VectorIndex.create(encoder.dimension, choose_structure(settings.index_type, 1, encoder.dimension, memory))
        previous_store = _previous_store(path, previous, needed=action == "rebuild" and not prune_upserts, warnings=warnings)
        cache = EmbeddingCache(path / layout.CACHE, encoder.dimension)
        try:
            cached = CachedEncoder(encoder, cache, layout.next_version_number(path))
            kept = Counter()
            stream = documents if action == "build" or prune_upserts else _keeping_upserts(documents, previous_store, kept)
            store = DocumentStore.create(staging / layout.DOCUMENTS)
            if ray is None:
                vectors, tuning, structure = _embed_locally(cached, stream, documents, store, staging, settings, memory, progress)
            else:
                vectors, tuning, structure = _embed_on_ray(cached, stream, documents, store, staging, settings, memory, ray)
            settings.id_field, settings.text_fields = documents.id_field, documents.text_fields
            deleted = 0
            if previous_store is not None:
                deleted = store.count_missing_in(layout.version_dir(path, previous.version) / layout.DOCUMENTS)
            manifest = layout.Manifest(
                settings=settings,
                dimension=encoder.dimension,
                count=len(vectors),
                content_digest=store.content_digest(),
                model_fingerprint=encoder.fingerprint,
                cache_generation=cached.version_number,
                vector_index=structure,
                search_params=vectors.search_params,
                tuned_recall=tuning.get("tuned_recall"),
            )
            report = BuildReport(str(path), "", len(vectors), cached.encoded, cached.reused, deleted, 0.0,
                                 kept_upserts=kept["upsert"], warnings=warnings)
            if if_changed and previous is not None and _same_content(previous, manifest):
                store.close()
                report.version, report.published = previous.version, False
            else:
                report.version = _publish(path, staging, store, vectors, manifest, keep, cached, report)
        finally:
            if previous_store is not None:
                previous_store.close()
            cache.close()
    report.warnings += cache.warnings
    report.seconds = _since(started)
    return report


def _previous_store(path: Path, previous: layout.Manifest | None, *, needed: bool, warnings: list[str]) -> DocumentStore | None:
    """The previous version's documents (for its upserts and the count of deleted ones), verified first.

    A rebuild that must carry upserts over refuses a damaged previous version;
    otherwise its documents are only counted, and a damaged one is skipped.
    """
    if previous is None:
        return None
    folder = layout.version_dir(path, previous.version)
    problems = layout.damaged_files(folder, previous, [layout.DOCUMENTS])
    if problems:
        if needed:
            raise IndexCorruptError(
                f"{path}: version {previous.version} is damaged ({problems[0]}), so the documents written by upsert "
                "cannot be carried over; roll back to a sound version first, or rebuild with --prune-upserts"
            )
        warnings.append(f"{path}: version {previous.version} is damaged ({problems[0]}); deleted documents not counted")
        return None
    return DocumentStore.open_readonly(folder / layout.DOCUMENTS)


def _keeping_upserts(documents: DocumentSource, previous: DocumentStore | None, kept: Counter) -> Iterator[Document]:
    """The source's documents, then the previous version's upserted ones; an upserted id shadows the source's record."""
    if previous is None:
        yield from documents
        return
    upserted = {row["id"] for rows in previous.rows_of_origin("upsert") for row in rows}
    for doc in documents:
        if doc.id not in upserted:
            yield doc
    for rows in previous.rows_of_origin("upsert"):
        kept["upsert"] += len(rows)
        for row in rows:
            yield Document(row["id"], row["text"], row["metadata"], row["fields"], origin="upsert")


def _embed_locally(cached: CachedEncoder, stream: Iterable[Document], documents: DocumentSource, store: DocumentStore,
                   staging: Path, settings: IndexSettings, memory: int | None, progress: bool):
    """Store and embed the documents of ``stream`` in this process; returns (vectors, tuning, structure)."""
    spool = VectorSpool(staging, cached.encoder.dimension)
    for docs, embedded in encoded_chunks(cached, stream, progress):
        keys = np.arange(spool.count, spool.count + len(docs), dtype=np.int64)
        store.add(keys, docs)
        spool.append(embedded, keys)
    if not spool.count:
        raise SourceError(f"{documents.path}: no documents")
    spool.close()
    structure = choose_structure(settings.index_type, spool.count, cached.encoder.dimension, memory)
    vectors, tuning = build_from_spool(spool, structure)
    spool.remove()
    return vectors, tuning, structure


def _embed_on_ray(cached: CachedEncoder, stream: Iterable[Document], documents: DocumentSource, store: DocumentStore,
                  staging: Path, settings: IndexSettings, memory: int | None, options: RayOptions):
    """Store the documents here, encode the uncached ones on Ray, assemble from the shards.

    This process reads the source (so errors name the file and line as
    always), loads SQLite as the single writer with keys 0..n-1, writes the
    texts to encode as document shards and the cached vectors as vector
    shards; Ray's encoder actors add their vector shards; the FAISS structure
    is assembled from all vector shards, and the new vectors enter the cache.
    """
    from .ray_engine import encode_shards
    from .shards import ShardWriter, vector_shards

    work = Path(options.work_dir) / f"{staging.parent.parent.name}-{staging.name}" if options.work_dir else staging / "shards"
    shards = ShardWriter(work)
    dimension = cached.encoder.dimension
    count = 0
    try:
        for docs in document_chunks(stream):
            keys = np.arange(count, count + len(docs), dtype=np.int64)
            ids, texts = [d.id for d in docs], [d.text for d in docs]
            store.add(keys, docs)
            _, hit, known = cached.lookup(texts)
            shards.write_vectors(keys[hit], [ids[i] for i in np.flatnonzero(hit)], known)
            rows = np.flatnonzero(~hit)
            shards.write_documents(keys[rows], [ids[i] for i in rows], [texts[i] for i in rows], [docs[i].metadata for i in rows])
            cached.encoded += len(rows)
            count += len(docs)
        if not count:
            raise SourceError(f"{documents.path}: no documents")
        if shards.documents_written:
            encode_shards(shards.documents_dir, shards.vectors_dir, settings, options)
            _cache_new_vectors(cached, store, shards.vectors_dir)
        structure = choose_structure(settings.index_type, count, dimension, memory)
        # An IVF structure over the memory budget keeps its lists on disk.
        spills = memory is not None and (ivf_bytes(structure, count, dimension) or 0) > memory
        ondisk = staging / Path(layout.VECTORS).with_suffix(ONDISK_SUFFIX) if spills else None
        vectors, tuning = build_from_shards(vector_shards(shards.vectors_dir), dimension, count, structure, ondisk)
    finally:
        layout.discard(work)
    return vectors, tuning, structure


def _cache_new_vectors(cached: CachedEncoder, store: DocumentStore, folder: Path) -> None:
    """Put the vectors Ray's workers wrote into the embedding cache, so later builds reuse them."""
    from .shards import vector_shards

    for shard in vector_shards(folder, CHUNK_SIZE, known=False):
        for vectors, keys in shard():
            rows = store.fetch(keys)
            cached.remember_vectors([rows[int(k)]["text"] for k in keys], vectors)


def upsert_documents(
    index: str | Path,
    source: str | Path | DocumentSource,
    *,
    id_field: str | None = None,
    text_fields: Sequence[str] | None = None,
    device: str | None = None,
    keep: int = 3,
    wait: float = 0.0,
    progress: bool = False,
    encoder: Encoder | None = None,
) -> BuildReport:
    """Add the documents of ``source`` to ``index``, replacing those whose id is already there.

    ``source`` is a file or folder, or a ``DocumentSource`` (e.g. records sent
    to the HTTP service). Fields default to the ones the index was built
    with. Upserted documents are kept by later rebuilds. ``encoder`` is used
    instead of loading the model when it matches the index's settings.
    Nothing is published when every document is already there as given.
    """
    from .encoder import Encoder

    started = time.monotonic()
    path = _existing_index(index)
    with new_version(path, "upsert", wait) as staging:
        previous, store, vectors = _copy_current(path, staging)
        settings = previous.settings
        if isinstance(source, DocumentSource):
            documents = source
        else:
            documents = DocumentSource(source, id_field or settings.id_field, text_fields or settings.text_fields,
                                       max_document_bytes=settings.max_document_bytes)
        encoder = Encoder.from_settings(settings, device, reuse=encoder)
        if previous.model_fingerprint and encoder.fingerprint != previous.model_fingerprint:
            raise ModelError(
                f"{path}: the weights of {settings.model!r} changed since this index was built; "
                "run rebuild so every vector comes from the same model"
            )
        cache = EmbeddingCache(path / layout.CACHE, encoder.dimension)
        try:
            cached = CachedEncoder(encoder, cache, layout.next_version_number(path))
            fresh: dict[int, np.ndarray] = {}  # this write's vectors by key, for a structure rebuilt below
            for docs, embedded in encoded_chunks(cached, _as_upserts(documents), progress):
                replaced = list(store.keys_for_ids([d.id for d in docs]).values())
                store.delete_keys(replaced)
                first = store.next_key()
                keys = np.arange(first, first + len(docs), dtype=np.int64)
                store.add(keys, docs)
                if vectors.can_remove:
                    vectors.remove(np.asarray(replaced, dtype=np.int64))
                    vectors.add(embedded, keys)
                else:
                    for key in replaced:
                        fresh.pop(int(key), None)
                    fresh.update(zip(keys.tolist(), embedded))
            if not cached.encoded + cached.reused:
                raise SourceError(f"{documents.path}: no documents")
            report = BuildReport(str(path), previous.version, previous.count, cached.encoded, cached.reused, 0, 0.0)
            manifest = _manifest_after_edit(previous, store, vectors)
            if manifest.content_digest == previous.content_digest:
                store.close()
                report.published = False
            else:
                if not vectors.can_remove:
                    vectors = _rebuild_vectors(staging, store, cache, cached.prefix, manifest, fallback=vectors, fresh=fresh)
                manifest.count = report.documents = len(vectors)
                manifest.cache_generation = cached.version_number
                report.version = _publish(path, staging, store, vectors, manifest, keep, cached, report)
        finally:
            cache.close()
    report.warnings += cache.warnings
    report.seconds = _since(started)
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
    keep: int = 3,
    wait: float = 0.0,
) -> BuildReport:
    """Remove the documents with these ids from ``index``.

    An id that is not in the index is an error (nothing is deleted) unless
    ``missing_ok``; when nothing is left to delete, nothing is published.
    """
    started = time.monotonic()
    path = _existing_index(index)
    ids = [str(i) for i in ids]
    with new_version(path, "delete", wait) as staging:
        previous, store, vectors = _copy_current(path, staging)
        found = store.keys_for_ids(ids)
        missing = [i for i in ids if i not in found]
        if missing and not missing_ok:
            shown = ", ".join(repr(i) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ArgumentError(f"{path}: no document with id {shown}; nothing deleted (use --missing-ok to skip)")
        report = BuildReport(str(path), previous.version, previous.count, 0, 0, len(found), 0.0)
        if not found:
            store.close()
            report.published = False
        else:
            store.delete_keys(list(found.values()))
            manifest = _manifest_after_edit(previous, store, vectors)
            if vectors.can_remove:
                vectors.remove(np.asarray(list(found.values()), dtype=np.int64))
            else:
                settings = previous.settings
                prefix = embedding_config(previous.model_fingerprint, settings.pooling, settings.max_length, settings.precision)
                cache = EmbeddingCache(path / layout.CACHE, previous.dimension)
                try:
                    vectors = _rebuild_vectors(staging, store, cache, prefix + "|", manifest, fallback=vectors)
                finally:
                    cache.close()
                report.warnings += cache.warnings
            manifest.count = report.documents = len(vectors)
            report.version = _publish(path, staging, store, vectors, manifest, keep, None, report)
    report.seconds = _since(started)
    return report


def rollback_index(index: str | Path, to: str | None = None, *, wait: float = 0.0) -> dict[str, str]:
    """Make an earlier version current again (by default the one before the current one).

    When ``CURRENT`` points to a missing version, the default is the newest
    sound version on disk; every target is checked before it is served.
    """
    path = _existing_index(index)
    with layout.writer_lock(path, wait, "rollback"):
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


def embed_source(
    source: str | Path,
    output: str | Path,
    settings: IndexSettings | None = None,
    device: str | None = None,
    progress: bool = False,
) -> int:
    """Write the embeddings of ``source`` to ``output`` and return how many.

    ``.pt``: ``torch.save({"ids": [...], "embeddings": tensor})``, the layout the
    classic BERT-embeddings notebooks save. ``.npy``: the matrix, with the ids
    as a JSON list beside it in ``<output>.ids.json``. Written atomically.
    """
    import torch

    from .encoder import Encoder

    settings = settings or IndexSettings()
    output = Path(output)
    if output.suffix not in (".pt", ".npy"):
        raise ArgumentError(f"{output}: output must end in .pt or .npy")
    documents = DocumentSource(source, settings.id_field, settings.text_fields, max_document_bytes=settings.max_document_bytes)
    encoder = Encoder.from_settings(settings, device)
    ids: list[str] = []
    parts: list[np.ndarray] = []
    for docs, embedded in encoded_chunks(encoder, documents, progress):
        ids.extend(d.id for d in docs)
        parts.append(embedded)
    if not ids:
        raise SourceError(f"{documents.path}: no documents")
    matrix = np.concatenate(parts)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    if output.suffix == ".pt":
        torch.save({"ids": ids, "embeddings": torch.from_numpy(matrix)}, tmp)
    else:
        with open(tmp, "wb") as f:
            np.save(f, matrix)
        ids_path = output.with_name(output.name + ".ids.json")
        ids_tmp = ids_path.with_name(f".{ids_path.name}.tmp")
        ids_tmp.write_text(json.dumps(ids, ensure_ascii=False))
        os.replace(ids_tmp, ids_path)
    os.replace(tmp, output)
    return len(ids)


def _existing_index(index: str | Path) -> Path:
    """The folder of an index that must exist already (writes other than build never create one)."""
    path = layout.index_path(index)
    if not path.is_dir():
        raise IndexNotFoundError(f"{path}: no such index")
    return path


def _copy_current(path: Path, staging: Path) -> tuple[layout.Manifest, DocumentStore, VectorIndex]:
    """A writable copy of the current version's documents and its vectors, both verified against their checksums."""
    version = layout.current_version(path)
    manifest = layout.verified_manifest(path, version)
    folder = layout.version_dir(path, version)
    store = DocumentStore.copy(folder / layout.DOCUMENTS, staging / layout.DOCUMENTS)
    return manifest, store, VectorIndex.load(folder / layout.VECTORS, manifest.search_params)


def _rebuild_vectors(staging: Path, store: DocumentStore, cache: EmbeddingCache, prefix: str, manifest: layout.Manifest,
                     fallback: VectorIndex, fresh: dict[int, np.ndarray] | None = None) -> VectorIndex:
    """A fresh structure of the manifest's kind over every document, vectors from the cache.

    For structures that cannot remove vectors in place (HNSW); vectors the
    cache lacks come from ``fresh`` (this write's own, by key), else from
    ``fallback``, the verified previous version. Re-tunes the search defaults.
    """
    fresh = fresh or {}
    spool = VectorSpool(staging, manifest.dimension)
    for keys, texts in store.key_texts():
        wanted = embedding_keys(prefix, texts)
        found = cache.get(wanted)
        chunk = np.empty((len(keys), manifest.dimension), dtype=np.float32)
        hit = np.fromiter((key in found for key in wanted), dtype=bool, count=len(wanted))
        if hit.any():
            chunk[hit] = np.stack([found[key] for key in wanted if key in found])
        for row in np.flatnonzero(~hit):
            if keys[row] in fresh:
                chunk[row], hit[row] = fresh[keys[row]], True
        if not hit.all():
            chunk[~hit] = fallback.reconstruct(np.asarray(keys, dtype=np.int64)[~hit])
        spool.append(chunk, np.asarray(keys, dtype=np.int64))
    spool.close()
    vectors, tuning = build_from_spool(spool, manifest.vector_index)
    spool.remove()
    manifest.search_params, manifest.tuned_recall = vectors.search_params, tuning.get("tuned_recall")
    return vectors


def _manifest_after_edit(previous: layout.Manifest, store: DocumentStore, vectors: VectorIndex) -> layout.Manifest:
    return replace(previous, count=len(vectors), content_digest=store.content_digest(), files={}, settings=replace(previous.settings))


def _same_content(previous: layout.Manifest, manifest: layout.Manifest) -> bool:
    def identity(m: layout.Manifest) -> tuple:
        return m.content_digest, m.model_fingerprint, m.settings.pooling, m.settings.max_length, m.settings.precision

    return identity(previous) == identity(manifest)


def _seal(staging: Path, store: DocumentStore, vectors: VectorIndex) -> Path:
    store.close()
    vectors.save(staging / layout.VECTORS)
    return staging


def _publish(path: Path, staging: Path, store: DocumentStore, vectors: VectorIndex, manifest: layout.Manifest, keep: int,
             cached: CachedEncoder | None, report: BuildReport) -> str:
    """Publish the staged version, then tidy up: old versions, cache bookkeeping.

    Once ``CURRENT`` has moved the write has happened, so a failure while
    tidying up (a full disk, say) becomes a warning on the report, not an error.
    """
    version = layout.publish(path, _seal(staging, store, vectors), manifest)
    try:
        layout.prune(path, keep)
        if cached is not None:
            published = DocumentStore.open_readonly(layout.version_dir(path, version) / layout.DOCUMENTS)
            try:
                cached.remember(published)
            finally:
                published.close()
            cached.forget_unused(path)
    except (OSError, sqlite3.Error, RuntimeError, IndexerError) as exc:
        reason = "no space left on device" if disk_full(exc, path) else (str(exc).splitlines() or [type(exc).__name__])[0]
        report.warnings.append(f"{path}: published {version}, but tidying up after it failed ({reason}); the next write retries")
    return version


def _since(started: float) -> float:
    return round(time.monotonic() - started, 3)
