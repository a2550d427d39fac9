"""The one ingest pipeline: documents in chunks -> embedding cache -> encoder -> a sink.

Every write that embeds documents (build, rebuild, upsert, compaction's
fallback) and the export command (``embed``) runs ``ingest``; they differ only
in the documents they feed it and the sink that takes each chunk with its
vectors: a ``SegmentWriter`` for an index, an ``ArrayFile`` for an export.
The Ray engine (``ray_engine.ingest_on_ray``) is the same pipeline with the
encoder replaced by a pool of remote replicas.
"""

from __future__ import annotations

import json
import os
import sys
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from .cache import EmbeddingCache, embedding_keys
from .errors import ArgumentError, SourceError
from .settings import IndexSettings
from .sources import Document, DocumentSource

if TYPE_CHECKING:
    from .encoder import Encoder

CHUNK_SIZE = 4096
Sink = Callable[[list[Document], np.ndarray], object]


class CachedEncoder:
    """An encoder in front of an index's embedding cache.

    Vectors found in the cache are reused, the others encoded and cached;
    both are marked as used by segment number ``segment`` (see ``cache``).
    """

    def __init__(self, encoder: Encoder, cache: EmbeddingCache, segment: int):
        self.encoder = encoder
        self.cache = cache
        self.segment = segment
        self.prefix = encoder.embedding_config + "|"
        self.encoded = 0
        self.reused = 0

    @property
    def dimension(self) -> int:
        return self.encoder.dimension

    def lookup(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Cache keys of ``texts``, a mask of those the cache holds, and their vectors (counted as reused)."""
        keys = embedding_keys(self.prefix, texts)
        cached = self.cache.get(keys)
        hit = np.fromiter((key in cached for key in keys), dtype=bool, count=len(keys))
        known = [cached[key] for key in keys if key in cached]
        self.reused += len(known)
        if known:
            self.cache.mark_used([key for key in keys if key in cached], self.segment)
        return keys, hit, np.stack(known) if known else np.empty((0, self.dimension), dtype=np.float32)

    def remember(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Put freshly encoded vectors of ``texts`` into the cache."""
        self.cache.put(embedding_keys(self.prefix, texts), vectors, self.segment)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        _, hit, known = self.lookup(texts)
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        out[hit] = known
        missing = np.flatnonzero(~hit)
        if len(missing):
            fresh = [texts[i] for i in missing]
            out[missing] = self.encoder.encode_texts(fresh)
            self.remember(fresh, out[missing])
        self.encoded += len(missing)
        return out


def document_chunks(documents: Iterable[Document]) -> Iterator[list[Document]]:
    """Documents in lists of ``CHUNK_SIZE``, so memory stays bounded."""
    stream = iter(documents)
    while docs := list(islice(stream, CHUNK_SIZE)):
        yield docs


def ingest(documents: Iterable[Document], encoder: Encoder | CachedEncoder, sink: Sink, *, progress: bool = False) -> int:
    """Embed ``documents`` a chunk at a time and hand each chunk with its vectors to ``sink``; returns how many."""
    count = 0
    with tqdm(desc="indexing", unit="doc", disable=not progress, file=sys.stderr) as bar:
        for docs in document_chunks(documents):
            sink(docs, encoder.encode_texts([d.text for d in docs]))
            count += len(docs)
            bar.update(len(docs))
    return count


class ArrayFile:
    """A sink that collects ids and vectors and writes them as ``.pt`` or ``.npy`` (with ``.ids.json``), atomically."""

    SUFFIXES = (".pt", ".npy")

    def __init__(self, output: str | Path):
        self.output = Path(output)
        if self.output.suffix not in self.SUFFIXES:
            raise ArgumentError(f"{self.output}: output must end in .pt or .npy")
        self.ids: list[str] = []
        self.parts: list[np.ndarray] = []

    def __call__(self, docs: list[Document], vectors: np.ndarray) -> None:
        self.ids.extend(d.id for d in docs)
        self.parts.append(vectors)

    def write(self) -> None:
        matrix = np.concatenate(self.parts)
        output = self.output
        tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
        if output.suffix == ".pt":
            import torch

            torch.save({"ids": self.ids, "embeddings": torch.from_numpy(matrix)}, tmp)
        else:
            with open(tmp, "wb") as f:
                np.save(f, matrix)
            ids_path = output.with_name(output.name + ".ids.json")
            ids_tmp = ids_path.with_name(f".{ids_path.name}.tmp")
            ids_tmp.write_text(json.dumps(self.ids, ensure_ascii=False))
            os.replace(ids_tmp, ids_path)
        os.replace(tmp, output)


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
    from .encoder import Encoder

    settings = settings or IndexSettings()
    sink = ArrayFile(output)
    documents = DocumentSource(source, settings.id_field, settings.text_fields, max_document_bytes=settings.max_document_bytes)
    count = ingest(documents, Encoder.from_settings(settings, device), sink, progress=progress)
    if not count:
        raise SourceError(f"{documents.path}: no documents")
    sink.write()
    return count
