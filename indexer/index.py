"""Reading an index: open once, search many times, pick up new versions with ``refresh()``."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import layout
from .errors import ArgumentError, IndexCorruptError, ModelError
from .external import check_encoder, is_external, load_query_encoder
from .models import canonical_model_name
from .query import Condition, Hit, search_texts, typed_conditions
from .settings import IndexSettings
from .snapshot import Snapshot

if TYPE_CHECKING:
    from .encoder import Encoder
    from .external import ExternalEncoder
    from .sharded import ShardPool

# When an opened index proves its files (stores and vectors) against their checksums: before the first search, or
# in a thread while searches are served (the server: it starts at once; /health says when the check is done).
VERIFY_MODES = ("open", "background")


def damaged_message(path: Path, version: str, problem: str) -> str:
    return (f"{path}: version {version} is damaged ({problem}); not serving it. "
            "Run 'indexer check INDEX --all', then 'indexer rollback' to a sound version or build again")


def index_info(index: str | Path) -> dict[str, Any]:
    """The current version's manifest and counts, without loading the model or any vectors."""
    path = layout.index_path(index)
    snapshot = Snapshot.open(path, vectors=False)
    try:
        return describe(snapshot)
    finally:
        snapshot.close()


def check_filters(index: str | Path, where: Sequence[Condition]) -> None:
    """ArgumentError for a filter the index cannot answer (an unknown field, a value of the wrong type), read from
    the index alone: a command checks its filters so before it loads the model."""
    if not where:
        return
    snapshot = Snapshot.open(layout.index_path(index), vectors=False)
    try:
        typed_conditions(where, snapshot.field_types())
    finally:
        snapshot.close()


def describe(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "index": str(snapshot.path),
        **snapshot.manifest.to_dict(),
        "vectors": len(snapshot),
        "rows": len(snapshot),
        "segment_sizes": {segment.name: segment.meta.count for segment in snapshot.segments},
        "versions": layout.list_versions(snapshot.path),
    }


class Index:
    """An opened index: load once, search many times.

    ``Index("products")`` opens ``indexes/products``; the model recorded in the
    manifest is loaded so queries are embedded exactly as the documents were.
    Passing ``model`` only checks that it is the index's model; ``encoder``
    (an ``Encoder`` or ``ExternalEncoder``) is used instead of loading one when
    it embeds as the index does, and is required for an index made with an
    external encoder. Searches are safe from many threads; ``refresh()``
    switches to a newly published version without blocking them. With
    ``shards`` (an ``indexer.sharded.ShardPool``) the vectors are searched in
    its shards and this process holds none.
    """

    def __init__(self, path: str | Path, model: str | None = None, device: str | None = None, *,
                 encoder: Encoder | ExternalEncoder | None = None, verify: str = "open", shards: ShardPool | None = None):
        if verify not in VERIFY_MODES:
            raise ArgumentError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {verify!r}")
        self.path = layout.index_path(path)
        self.device = device
        self._fault: tuple[str, str] | None = None  # (version, what is wrong with it), found by a background check
        self._checking: threading.Thread | None = None
        self._shards = shards  # with a pool, the vectors are searched there (see indexer.sharded)
        self._served = self._open()
        try:
            self._check_files(self._served, background=verify == "background")
        except BaseException:
            self._served.close()
            raise
        settings = self._served.manifest.settings
        if model is not None and canonical_model_name(model) != settings.model:
            raise ModelError(
                f"{self.path}: index was built with model {settings.model!r}, not {canonical_model_name(model)!r}; "
                "queries must use the index's own model (leave out --model)"
            )
        self._encoder = load_query_encoder(settings, self._served.manifest.model_fingerprint, self._served.stored_sample,
                                           device, reuse=encoder)
        self._check_encoder(self._served, self._encoder)
        self._refresh_lock = threading.Lock()

    @property
    def encoder(self) -> Encoder:
        return self._encoder

    @property
    def version(self) -> str:
        return self._served.version

    @property
    def manifest(self) -> layout.Manifest:
        return self._served.manifest

    @property
    def settings(self) -> IndexSettings:
        return self._served.manifest.settings

    def __len__(self) -> int:
        return len(self._served)

    def search(
        self,
        query: str,
        k: int = 10,
        mode: str = "dense",
        where: Sequence[Condition] | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        fusion: str = "score",
    ) -> list[Hit]:
        """The top-``k`` documents for one question, best first.

        ``mode`` is dense, keyword or hybrid (``fusion`` "score" or "rrf"). ``where`` holds filters such as
        ``[("category", "=", "books"), ("price", "<", 20)]`` (see
        ``parse_condition`` for the text form). ``nprobe`` (IVF indexes) and
        ``ef_search`` (HNSW) trade speed for recall on this call; by default
        the values tuned at build time apply.
        """
        return self.search_many([query], k, mode, where, nprobe, ef_search, fusion)[0]

    def search_many(
        self,
        queries: Sequence[str],
        k: int = 10,
        mode: str = "dense",
        where: Sequence[Condition] | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        fusion: str = "score",
    ) -> list[list[Hit]]:
        """The top-``k`` documents for each question; questions are embedded in batches."""
        served, encoder = self._served, self._encoder  # one version for the whole call, even if refresh() swaps it meanwhile
        self._refuse_damaged(served)
        try:
            return search_texts(encoder, served, list(queries), k, mode, where, fusion, nprobe=nprobe, efSearch=ef_search)
        except sqlite3.DatabaseError as exc:  # a store damaged under a check still reading (verify="background")
            raise IndexCorruptError(damaged_message(self.path, served.version, f"its documents: {exc}")) from None

    def refresh(self) -> bool:
        """Switch to the index's current version if a newer one was published; True if it changed."""
        with self._refresh_lock:
            # The pointer unchanged (read without its checksum: a few microseconds on every request of the server).
            if layout.read_pointer(self.path) == self._served.version or layout.current_version(self.path) == self._served.version:
                return False
            # Segments this version shares with the one served are reused, so a small write loads only its small segment.
            loaded = {segment.meta.uid: segment for segment in self._served.segments}
            served = self._open(loaded)
            # A new version is served only once its files are proven (shared segments were, and are not read again).
            self._check_files(served, background=False)
            encoder = load_query_encoder(served.manifest.settings, served.manifest.model_fingerprint, served.stored_sample,
                                         self.device, reuse=self._encoder)
            self._check_encoder(served, encoder)
            # The old version's own segments are left to the garbage collector: searches may still be reading them.
            self._served, self._encoder = served, encoder
            return True

    def _open(self, loaded: dict[str, Any] | None = None) -> Snapshot:
        """The current version; with shards, opened without vectors here and by every shard before it is served."""
        if self._shards is None:
            return Snapshot.open(self.path, loaded=loaded)
        opened = Snapshot.open(self.path, loaded=loaded, vectors=False)
        try:
            return self._shards.open(opened)
        except BaseException:
            opened.close(keep=loaded)
            raise

    def get_document(self, doc_id: str) -> dict[str, Any] | None:
        """``{"id", "text", "metadata", "fields"}`` of one document by its own id, or None.

        ``fields`` are its text fields as written; the shape is one ``upsert`` accepts back.
        """
        found = self.get_documents([doc_id])
        return found[0] if found else None

    def get_documents(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """The documents with these ids, in that order, as ``get_document`` gives them; ids not in the index are left out."""
        served = self._served
        self._refuse_damaged(served)
        keys = served.keys_for_ids(list(ids))
        rows = served.fetch(keys.values()) if keys else {}
        return [{name: rows[keys[i]][name] for name in ("id", "text", "metadata", "fields")} for i in dict.fromkeys(ids) if i in keys]

    def search_by_vector(self, vector: Sequence[float], k: int = 10, where: Sequence[Condition] | None = None,
                         nprobe: int | None = None, ef_search: int | None = None) -> list[Hit]:
        """The top-``k`` documents for a query vector of the index's dimension (scaled to unit length first): dense search."""
        served, encoder = self._served, self._encoder
        self._refuse_damaged(served)
        query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        if query.shape[1] != encoder.dimension:
            raise ArgumentError(f"{self.path}: a query vector must have {encoder.dimension} numbers, not {query.shape[1]}")
        query = query / max(float(np.linalg.norm(query)), 1e-12)
        return search_texts(encoder, served, [""], k, "dense", where, vectors=query, nprobe=nprobe, efSearch=ef_search)[0]

    def info(self) -> dict[str, Any]:
        """The manifest of the version this object serves, with live counts."""
        return describe(self._served)

    def integrity(self) -> dict[str, Any]:
        """Whether the served version's files are proven: ``{"version", "verified", "fault"}``.

        ``verified`` is false while a background check (``verify="background"``)
        is still reading; ``fault`` names what a check found damaged (searches
        then fail with IndexCorruptError), else None.
        """
        served, fault, checking = self._served, self._fault, self._checking
        damaged = fault[1] if fault is not None and fault[0] == served.version else None
        return {"version": served.version, "verified": damaged is None and not (checking is not None and checking.is_alive()),
                "fault": damaged}

    def _check_files(self, served: Snapshot, *, background: bool) -> None:
        """Check the stores and vectors of ``served`` against their checksums: now (IndexCorruptError on a fault),
        or in a thread that records the fault, after which searches of that version fail."""
        if not background:
            problems = served.problems()
            if problems:
                raise IndexCorruptError(damaged_message(self.path, served.version, problems[0]))
            return

        def check() -> None:
            problems = served.problems()
            if problems:
                self._fault = (served.version, damaged_message(self.path, served.version, problems[0]))

        self._checking = threading.Thread(target=check, name="indexer-verify", daemon=True)
        self._checking.start()

    def _refuse_damaged(self, served: Snapshot) -> None:
        fault = self._fault
        if fault is not None and fault[0] == served.version:
            raise IndexCorruptError(fault[1])

    def close(self) -> None:
        self._served.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_encoder(self, served: Snapshot, encoder: Encoder | ExternalEncoder) -> None:
        """That ``encoder`` makes the vectors of the version ``served``: an external one's fingerprint, every segment's dimension."""
        if is_external(encoder.model_name):  # ours would need its weights hashed: a query process never pays for that
            check_encoder(encoder, served.manifest.model_fingerprint, self.path)
        for segment in served.segments:
            held = segment.vectors.dimension if segment.vectors is not None else segment.meta.dimension  # sharded: in the shards
            if encoder.dimension != held:
                raise IndexCorruptError(f"{self.path}: model gives {encoder.dimension}-d vectors but segment {segment.name} holds {held}-d")

    # Reconstructing from an IVF structure builds its id map on first use; two threads must not build it at once.
    _reconstruct_lock = threading.Lock()

    def get_vectors(self, ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """(the ids found, their unit vectors as rows in that order) for the documents with these ids; ids not in the index are left out.

        A structure that keeps vectors whole (``VectorIndex.keeps_vectors``) gives them back as stored; a quantised one
        (PQ, SQ codes, lists on disk) keeps no exact vectors, nor does a sharded index's ingress, so those documents'
        texts are embedded again.
        """
        served, encoder = self._served, self._encoder
        self._refuse_damaged(served)
        rows = served.rows_for_ids(list(ids))
        found = [doc_id for doc_id in dict.fromkeys(ids) if doc_id in rows]
        keys = np.array([rows[doc_id][0] for doc_id in found], dtype=np.int64)
        vectors = np.empty((len(found), served.dimension), dtype=np.float32)
        for segment in served.segments:
            mine = np.flatnonzero(segment.holds(keys))
            if not len(mine):
                continue
            if segment.vectors is not None and segment.vectors.keeps_vectors:
                with self._reconstruct_lock:
                    vectors[mine] = segment.vectors.reconstruct(keys[mine])
            else:
                vectors[mine] = encoder.encode_texts([rows[found[i]][1] for i in mine])
        return found, vectors
