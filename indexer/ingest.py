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
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from . import collector, interrupts
from .cache import EmbeddingCache, digest_keys, embedding_digests
from .errors import DISK_FULL_ERRNOS, ArgumentError, DiskFullError, SourceError
from .settings import IndexSettings
from .sources import Document, DocumentSource

if TYPE_CHECKING:
    from .encoder import Encoder
    from .segments import HeldVectors

CHUNK_SIZE = 4096
PIPELINE_DEPTH = 2
# At most this many chunks are read and tokenised ahead while the model loads (see ReadAhead): about what the
# tokenizer gets through on one core in the seconds a model takes to load, and a bound on memory.
READ_AHEAD_CHUNKS = 4
STAGES = ("read", "tokenize", "encode", "write")
# A sink takes each chunk's documents, their vectors, and keywords ``digests`` (see cache) and ``fresh`` (rows the model encoded).
Sink = Callable[..., object]


class CachedEncoder:
    """An encoder in front of what an index has embedded before (or of nothing, for ``embed``).

    Vectors are found first in the segments that keep them (``held``, by
    their texts' digests, see ``cache``), then in the embedding cache
    (``cache.db``); the others are encoded. The pipeline calls ``prepare``
    (look up, tokenise what is missing) and ``encode`` (the model) from its
    threads. Fresh vectors are not cached here: the segment written keeps
    them (``SegmentWriter``), or puts them in ``cache.db`` where its
    structure does not, or the write fails.
    """

    def __init__(self, encoder: Encoder | None, cache: EmbeddingCache | None = None, segment: int = 0,
                 held: HeldVectors | None = None, *, embedding: str | None = None, dimension: int | None = None):
        # No ``encoder`` (only ``embedding`` and ``dimension``): a merge, which looks up and loads a model itself.
        self.encoder = encoder
        self.cache = cache
        self.held = held
        self.segment = segment
        key = embedding if embedding is not None else encoder.embedding.key
        self.prefix = key + "|" if cache is not None or held is not None else ""
        self.dimension = dimension if dimension is not None else encoder.dimension
        self.encoded = 0
        self.reused = 0

    def lookup(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The digests of ``texts`` (none without a cache), a mask of those found, and a vector per text (the found
        rows filled; counted as reused). The one look-up every write makes (``ingest``, merges, the Ray engine)."""
        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        hit = np.zeros(len(texts), dtype=bool)
        if not self.prefix:
            return np.empty((0, 2), dtype=np.uint64), hit, vectors
        digests = embedding_digests(self.prefix, texts)
        if self.held is not None and self.held.metas:
            hit, found = self.held.find(digests)
            vectors[hit] = found[hit]
        rest = np.flatnonzero(~hit)
        if self.cache is not None and len(rest):
            keys = digest_keys(digests[rest])
            cached = self.cache.get(keys)
            if cached:
                rows = [i for i, key in zip(rest, keys) if key in cached]
                vectors[rows] = np.stack([cached[key] for key in keys if key in cached])
                hit[rows] = True
                self.cache.mark_used([key for key in keys if key in cached], self.segment)
        self.reused += int(hit.sum())
        return digests, hit, vectors

    def prepare(self, texts: Sequence[str], tokens: list[list[int]] | None = None) -> Chunk:
        """A chunk of ``texts`` with its known vectors filled in and the token ids of the texts still to encode.

        ``tokens``: the token ids of all ``texts``, if they were tokenised already (``ReadAhead``).
        """
        digests, hit, vectors = self.lookup(texts)
        missing = np.flatnonzero(~hit)
        if tokens is None:
            tokens = self.encoder.tokenize([texts[i] for i in missing]) if len(missing) else []
        elif len(missing) < len(texts):
            tokens = [tokens[i] for i in missing]
        return Chunk(digests, vectors, missing, tokens)

    def encode(self, chunk: Chunk) -> np.ndarray:
        """Run the model over the chunk's missing texts; returns the chunk's vectors, all filled."""
        if len(chunk.missing):
            chunk.vectors[chunk.missing] = self.encoder.embed_tokens(chunk.tokens)
        self.encoded += len(chunk.missing)
        return chunk.vectors

    def remember_chunk(self, chunk: Chunk) -> None:
        """Put the chunk's freshly encoded vectors into ``cache.db`` (a chunk a failed write never handed on)."""
        if self.cache is not None and len(chunk.missing) and len(chunk.digests):
            self.cache.put(digest_keys(chunk.digests[chunk.missing]), chunk.vectors[chunk.missing], self.segment)


@dataclass
class Chunk:
    """The texts of up to ``CHUNK_SIZE`` documents on their way through the pipeline."""

    digests: np.ndarray  # (n, 2) uint64 names of their vectors (see cache); empty without a cache
    vectors: np.ndarray  # rows of known texts filled by ``prepare``, the rest by ``encode``
    missing: np.ndarray  # rows the model encodes
    tokens: list[list[int]]  # their token ids


@dataclass
class IngestStats:
    """How many documents went through, and the seconds each stage was busy (stages overlap)."""

    documents: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    def rounded(self) -> dict[str, float]:
        return {stage: round(seconds, 3) for stage, seconds in self.seconds.items()}

    def timed(self, stage: str, started: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] += now - started
        return now


def document_chunks(documents: Iterable[Document]) -> Iterator[list[Document]]:
    """Documents in lists of ``CHUNK_SIZE``, so memory stays bounded."""
    stream = iter(documents)
    while docs := list(islice(stream, CHUNK_SIZE)):
        yield docs


class ReadAhead:
    """The first chunks of ``documents``, read and tokenised in a thread while the model loads.

    Loading the model (importing its code, reading the weights, choosing
    the forward) takes seconds on one core, mostly holding the GIL; the
    tokenizer, loaded first, runs outside it on another. A build whose
    documents are all written (a first build: nothing to compare or reuse)
    gives ``ingest`` this in place of its documents. Reading stops after
    ``chunks`` chunks, or when ``ingest`` starts (after the chunk in hand);
    iterating gives each chunk with its token ids in order, then the rest
    with None (the pipeline tokenises what the cache lacks). An error while
    reading ahead is raised where its chunk is reached, as the pipeline
    would raise it. ``seconds`` holds its busy time by stage (``ingest``
    adds it to its own).
    """

    def __init__(self, documents: Iterable[Document], tokenize: Callable[[list[str]], list[list[int]]], *,
                 chunks: int = READ_AHEAD_CHUNKS):
        self._chunks = document_chunks(documents)
        self._read: deque[tuple[list[Document], list[list[int]]]] = deque()
        self.seconds = {"read": 0.0, "tokenize": 0.0}
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read_ahead, args=(tokenize, chunks), name="ingest-read-ahead", daemon=True)
        self._thread.start()

    def _read_ahead(self, tokenize: Callable[[list[str]], list[list[int]]], chunks: int) -> None:
        try:
            while len(self._read) < chunks and not self._stop.is_set():
                started = time.perf_counter()
                docs = next(self._chunks, None)
                read = time.perf_counter()
                self.seconds["read"] += read - started
                if docs is None:
                    return
                self._read.append((docs, tokenize([d.text for d in docs])))
                self.seconds["tokenize"] += time.perf_counter() - read
        except BaseException as exc:  # raised to the pipeline when it reaches this chunk
            self._error = exc

    def close(self) -> None:
        """Stop reading ahead, once the chunk in hand is done."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[tuple[list[Document], list[list[int]] | None]]:
        self.close()
        while self._read:  # handed out one by one, so each is freed once the pipeline is done with it
            yield self._read.popleft()
        if self._error is not None:
            raise self._error
        for docs in self._chunks:
            yield docs, None


def ingest(documents: Iterable[Document] | ReadAhead, encoder: Encoder | CachedEncoder, sink: Sink, *,
           progress: bool = False) -> IngestStats:
    """Embed ``documents`` a chunk at a time and hand each chunk with its vectors to ``sink``, in order.

    Three stages overlap, joined by queues ``PIPELINE_DEPTH`` chunks deep (so
    memory stays bounded): a reading thread parses the next chunks, looks
    them up in the cache and tokenises what is missing; this thread runs the
    model; a writing thread hands finished chunks to ``sink`` (the fresh
    vectors of chunks it never got go to the cache). The tokenizer, the model and SQLite release the
    GIL, so the stages run on different cores (on CPU the model runs its
    batches side by side, one thread each, so a core taken by another stage
    holds up one batch, not all of them). The first error of any stage
    is raised here, unchanged, and nothing after it is written.
    """
    cached = encoder if isinstance(encoder, CachedEncoder) else CachedEncoder(encoder)
    stats = IngestStats()
    loaded = getattr(cached.encoder, "load_seconds", 0.0)  # a deferred model's load (external.DeferredEncoder)
    chunks = iter(documents) if isinstance(documents, ReadAhead) else ((docs, None) for docs in document_chunks(documents))
    failed = threading.Event()  # set by the first error: the other stages do no more work

    def stage(work: Callable) -> Callable:
        def run(*args):
            try:
                return work(*args)
            except BaseException:
                failed.set()
                raise
        return run

    @stage
    def prepare() -> tuple[list[Document], Chunk] | None:
        if failed.is_set():
            return None
        started = time.perf_counter()
        docs, tokens = next(chunks, (None, None))
        read = stats.timed("read", started)
        if docs is None:
            return None
        chunk = cached.prepare([d.text for d in docs], tokens)
        stats.timed("tokenize", read)
        return docs, chunk

    @stage
    def write(docs: list[Document], chunk: Chunk) -> None:
        if failed.is_set():
            cached.remember_chunk(chunk)  # the write ends, but what was encoded stays cached for the next try
            return
        started = time.perf_counter()
        sink(docs, chunk.vectors, digests=chunk.digests, fresh=chunk.missing)
        stats.timed("write", started)

    reader = ThreadPoolExecutor(1, thread_name_prefix="ingest-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="ingest-write")
    try:
        with collector.frozen(), tqdm(desc="indexing", unit="doc", disable=not progress, file=sys.stderr) as bar:
            ahead = deque(reader.submit(prepare) for _ in range(PIPELINE_DEPTH))
            behind: deque[Future] = deque()
            while (prepared := ahead.popleft().result()) is not None:
                interrupts.check()
                docs, chunk = prepared
                ahead.append(reader.submit(prepare))
                started = time.perf_counter()
                cached.encode(chunk)
                stats.timed("encode", started)
                behind.append(writer.submit(write, docs, chunk))
                interrupts.check()
                while behind and (len(behind) > PIPELINE_DEPTH or behind[0].done()):
                    behind.popleft().result()
                stats.documents += len(docs)
                bar.update(len(docs))
            while behind:
                behind.popleft().result()
    except BaseException:
        failed.set()
        raise
    finally:
        # After an error nothing more is read or written; a stage already running finishes first.
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)
    if isinstance(documents, ReadAhead):
        for stage, seconds in documents.seconds.items():
            stats.seconds[stage] += seconds
    loaded = getattr(cached.encoder, "load_seconds", 0.0) - loaded
    if loaded:  # it happens where the first text is tokenised: said apart
        stats.seconds["tokenize"] -= loaded
        stats.seconds["load"] = loaded
    return stats


class LocalEngine:
    """How a write fills its new segment in this process: the pipeline (``ingest``) into the segment writer, whose
    structure is built as vectors stream or when it is sealed. ``ray_engine.RayEngine`` is the other engine."""

    def __init__(self, *, progress: bool = False):
        self.progress = progress

    def fill(self, documents: Iterable[Document] | ReadAhead, cached: CachedEncoder, writer, *, whole: bool):
        """Stage seconds, and None: the segment builds its own structure (``whole`` does not change that here)."""
        return ingest(documents, cached, writer.add, progress=self.progress).rounded(), None


class ArrayFile:
    """A sink that collects ids and vectors and writes them as ``.pt`` or ``.npy`` (with ``.ids.json``), atomically."""

    SUFFIXES = (".pt", ".npy")

    def __init__(self, output: str | Path):
        self.output = Path(output)
        if self.output.suffix not in self.SUFFIXES:
            raise ArgumentError(f"{self.output}: output must end in .pt or .npy")
        # Said before the encoding, not after it.
        if not self.output.parent.is_dir():
            raise ArgumentError(f"{self.output}: no folder {self.output.parent} to write it in")
        if self.output.is_dir():
            raise ArgumentError(f"{self.output}: is a folder")
        self.ids: list[str] = []
        self.parts: list[np.ndarray] = []

    def __call__(self, docs: list[Document], vectors: np.ndarray, **_: object) -> None:
        self.ids.extend(d.id for d in docs)
        self.parts.append(vectors)

    def write(self) -> None:
        """Write the file (and a .npy's ids beside it) under temporary names, then rename them into place."""
        output = self.output
        ids_path = output.with_name(output.name + ".ids.json")
        tmp, ids_tmp = (path.with_name(f".{path.name}.{os.getpid()}.tmp") for path in (output, ids_path))
        try:
            matrix = np.concatenate(self.parts)
            if output.suffix == ".pt":
                import torch

                with open(tmp, "wb") as f:  # given a path, torch reports a full disk as a RuntimeError
                    torch.save({"ids": self.ids, "embeddings": torch.from_numpy(matrix)}, f)
            else:
                with open(tmp, "wb") as f:
                    np.save(f, matrix)
                ids_tmp.write_text(json.dumps(self.ids, ensure_ascii=False))
                os.replace(ids_tmp, ids_path)
            os.replace(tmp, output)
        except OSError as exc:
            for path in (tmp, ids_tmp):
                path.unlink(missing_ok=True)
            if exc.errno in DISK_FULL_ERRNOS:
                raise DiskFullError(f"{output}: the disk is full") from None
            raise ArgumentError(f"{output}: cannot write ({exc.strerror or exc})") from None


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
    from .external import load_encoder

    settings = settings or IndexSettings()
    sink = ArrayFile(output)
    documents = DocumentSource(source, settings.id_field, settings.text_fields, max_document_bytes=settings.max_document_bytes)
    count = ingest(documents, load_encoder(settings, device), sink, progress=progress).documents
    if not count:
        raise SourceError(f"{documents.path}: no documents")
    sink.write()
    return count
