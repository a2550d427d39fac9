"""Reading an index: open once, search many times, pick up new versions with ``refresh()``."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from . import layout
from .errors import IndexCorruptError, ModelError
from .query import Condition, Hit, search_texts
from .settings import IndexSettings
from .store import DocumentStore
from .vectors import VectorIndex

if TYPE_CHECKING:
    from .encoder import Encoder

OPEN_ATTEMPTS = 5


@dataclass
class ServedVersion:
    """One published version, loaded: what a search reads, swapped whole on refresh."""

    version: str
    manifest: layout.Manifest
    vectors: VectorIndex
    store: DocumentStore
    encoder: Encoder | None = None


def load_version(path: Path) -> ServedVersion:
    """Load the current version of the index at ``path``.

    A writer may publish, and prune the version just read from ``CURRENT``,
    between reading the pointer and opening the folder; then read it again.
    """
    for attempt in range(OPEN_ATTEMPTS):
        version = layout.current_version(path)
        folder = layout.version_dir(path, version)
        try:
            manifest = layout.read_manifest(folder)
            return ServedVersion(
                version,
                manifest,
                VectorIndex.load(folder / layout.VECTORS, manifest.search_params),
                DocumentStore.open_readonly(folder / layout.DOCUMENTS),
            )
        except IndexCorruptError:
            if folder.exists() or attempt == OPEN_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def index_info(index: str | Path) -> dict[str, Any]:
    """The current version's manifest and counts, without loading the model."""
    path = layout.index_path(index)
    folder = layout.version_dir(path, layout.current_version(path))
    manifest = layout.read_manifest(folder)
    vectors = VectorIndex.load(folder / layout.VECTORS, mmap=True)
    store = DocumentStore.open_readonly(folder / layout.DOCUMENTS)
    try:
        return describe(path, manifest, len(vectors), store.count())
    finally:
        store.close()


def describe(path: Path, manifest: layout.Manifest, vectors: int, rows: int) -> dict[str, Any]:
    return {
        "index": str(path),
        **manifest.to_dict(),
        "vectors": vectors,
        "rows": rows,
        "versions": layout.list_versions(path),
    }


class Index:
    """An opened index: load once, search many times.

    ``Index("products")`` opens ``indexes/products``; the model recorded in the
    manifest is loaded so queries are embedded exactly as the documents were.
    Passing ``model`` only checks that it is the index's model. Searches are
    safe from many threads; ``refresh()`` switches to a newly published
    version without blocking them.
    """

    def __init__(self, path: str | Path, model: str | None = None, device: str | None = None):
        from .encoder import Encoder, canonical_model_name  # torch: only once a model is needed

        self.path = layout.index_path(path)
        self.device = device
        self._served = load_version(self.path)
        settings = self._served.manifest.settings
        if model is not None and canonical_model_name(model) != settings.model:
            raise ModelError(
                f"{self.path}: index was built with model {settings.model!r}, not {canonical_model_name(model)!r}; "
                "queries must use the index's own model (leave out --model)"
            )
        self._served.encoder = Encoder.from_settings(settings, device)
        self._check_dimension(self._served)
        self._refresh_lock = threading.Lock()

    @property
    def encoder(self) -> Encoder:
        return self._served.encoder

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
        return len(self._served.vectors)

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
        served = self._served  # one version for the whole call, even if refresh() swaps it meanwhile
        return search_texts(
            served.encoder, served.vectors, served.store, list(queries), k, mode, where, fusion, nprobe=nprobe, efSearch=ef_search
        )

    def refresh(self) -> bool:
        """Switch to the index's current version if a newer one was published; True if it changed."""
        from .encoder import Encoder

        with self._refresh_lock:
            if layout.current_version(self.path) == self._served.version:
                return False
            served = load_version(self.path)
            served.encoder = Encoder.from_settings(served.manifest.settings, self.device, reuse=self.encoder)
            self._check_dimension(served)
            # The old version's store is left to the garbage collector: searches may still be reading it.
            self._served = served
            return True

    def get_document(self, doc_id: str) -> dict[str, Any] | None:
        """``{"id", "text", "metadata", "fields"}`` of one document by its own id, or None.

        ``fields`` are its text fields as written; the shape is one ``upsert`` accepts back.
        """
        store = self._served.store
        keys = store.keys_for_ids([doc_id])
        if not keys:
            return None
        row = store.fetch(keys.values())[keys[doc_id]]
        return {name: row[name] for name in ("id", "text", "metadata", "fields")}

    def info(self) -> dict[str, Any]:
        """The manifest of the version this object serves, with live counts."""
        served = self._served
        return describe(self.path, served.manifest, len(served.vectors), served.store.count())

    def close(self) -> None:
        self._served.store.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_dimension(self, served: ServedVersion) -> None:
        if served.encoder.dimension != served.vectors.dimension:
            raise IndexCorruptError(
                f"{self.path}: model gives {served.encoder.dimension}-d vectors but the index holds {served.vectors.dimension}-d"
            )
