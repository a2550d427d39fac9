"""Building, opening and searching an index: ties sources, encoder, store and vectors together."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from . import layout
from .encoder import Encoder, canonical_model_name
from .errors import ArgumentError, IndexCorruptError, ModelError, SourceError
from .query import Hit, search_texts
from .settings import IndexSettings
from .sources import Document, DocumentSource
from .store import DocumentStore
from .vectors import VectorIndex

CHUNK_SIZE = 4096


@dataclass
class BuildReport:
    """What a build did; ``to_dict()`` is what ``build --json`` prints."""

    index: str
    version: str
    documents: int
    encoded: int
    reused: int
    deleted: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_index(
    source: str | Path,
    index: str | Path,
    settings: IndexSettings | None = None,
    device: str | None = None,
    keep: int = 3,
    progress: bool = False,
) -> BuildReport:
    """Encode every document of ``source`` and publish it as a new version of ``index``.

    The version is written beside the published one and swapped in atomically
    only when complete, so on any error the existing index is untouched.
    """
    started = time.monotonic()
    settings = replace(settings or IndexSettings())
    path = layout.index_path(index)
    documents = DocumentSource(source, settings.id_field, settings.text_fields)
    encoder = open_encoder(settings, device)
    settings.model, settings.max_length = encoder.model_name, encoder.max_length
    settings.source = str(Path(source).resolve())
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    staging = layout.new_staging(path)
    try:
        store = DocumentStore.create(staging / layout.DOCUMENTS)
        vectors = VectorIndex.create(encoder.dimension)
        for docs, embedded in encoded_chunks(encoder, documents, progress):
            keys = np.arange(len(vectors), len(vectors) + len(docs), dtype=np.int64)
            store.add(keys, [d.id for d in docs], [d.text for d in docs], [d.metadata for d in docs])
            vectors.add(embedded, keys)
        if not len(vectors):
            raise SourceError(f"{documents.path}: no documents")
        store.close()
        vectors.save(staging / layout.VECTORS)
        settings.id_field, settings.text_fields = documents.id_field, documents.text_fields
        manifest = layout.Manifest(settings=settings, dimension=encoder.dimension, count=len(vectors))
        version = layout.publish(path, staging, manifest, keep)
    except BaseException:
        layout.discard(path if created else staging)
        raise
    count = len(vectors)
    return BuildReport(str(path), version, count, count, 0, 0, round(time.monotonic() - started, 3))


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
    import json

    import torch

    settings = settings or IndexSettings()
    output = Path(output)
    if output.suffix not in (".pt", ".npy"):
        raise ArgumentError(f"{output}: output must end in .pt or .npy")
    documents = DocumentSource(source, settings.id_field, settings.text_fields)
    encoder = open_encoder(settings, device)
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


def open_encoder(settings: IndexSettings, device: str | None = None) -> Encoder:
    return Encoder(settings.model, settings.pooling, settings.max_length, device, settings.batch_size)


def encoded_chunks(
    encoder: Encoder, documents: DocumentSource, progress: bool = False
) -> Iterator[tuple[list[Document], np.ndarray]]:
    """Documents in chunks of ``CHUNK_SIZE`` with their vectors, so memory stays bounded."""
    stream = iter(documents)
    with tqdm(desc="indexing", unit="doc", disable=not progress, file=sys.stderr) as bar:
        while docs := list(islice(stream, CHUNK_SIZE)):
            yield docs, encoder.encode_texts([d.text for d in docs])
            bar.update(len(docs))


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
    Passing ``model`` only checks that it is the index's model. Safe to share
    between threads for searching.
    """

    def __init__(self, path: str | Path, model: str | None = None, device: str | None = None):
        self.path = layout.index_path(path)
        self.version = layout.current_version(self.path)
        folder = layout.version_dir(self.path, self.version)
        self.manifest = layout.read_manifest(folder)
        settings = self.manifest.settings
        if model is not None and canonical_model_name(model) != settings.model:
            raise ModelError(
                f"{self.path}: index was built with model {settings.model!r}, not {canonical_model_name(model)!r}; "
                "queries must use the index's own model (leave out --model)"
            )
        self.vectors = VectorIndex.load(folder / layout.VECTORS)
        self.store = DocumentStore.open_readonly(folder / layout.DOCUMENTS)
        self.encoder = open_encoder(settings, device)
        if self.encoder.dimension != self.vectors.dimension:
            raise IndexCorruptError(
                f"{self.path}: model gives {self.encoder.dimension}-d vectors but the index holds {self.vectors.dimension}-d"
            )

    @property
    def settings(self) -> IndexSettings:
        return self.manifest.settings

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, query: str, k: int = 10) -> list[Hit]:
        """The top-``k`` documents for one question, best first."""
        return search_texts(self.encoder, self.vectors, self.store, [query], k)[0]

    def search_many(self, queries: Sequence[str], k: int = 10) -> list[list[Hit]]:
        """The top-``k`` documents for each question; questions are embedded in batches."""
        return search_texts(self.encoder, self.vectors, self.store, list(queries), k)

    def info(self) -> dict[str, Any]:
        """The manifest of the version this object serves, with live counts."""
        return describe(self.path, self.manifest, len(self.vectors), self.store.count())

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
