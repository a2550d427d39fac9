"""Encoding on a Ray cluster: Ray Data reads document shards, a pool of encoder actors writes vector shards.

Each actor holds one replica of our own ``Encoder`` (same tokenisation,
length-sorted batching, pooling and normalisation as the embedded path), so
the vectors are the ones a local build makes. Needs the ``ray`` extra.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ArgumentError, IndexerError
from .external import load_encoder
from .settings import IndexSettings
from .shards import vector_table

# Rows handed to one actor call; the encoder sorts them by length inside.
ROWS_PER_CALL = 2048
# Batches an encoder actor works on at once: one tokenised while the other runs on the model.
CALLS_IN_FLIGHT = 2
# CPUs per node left to Ray Data's read and write tasks: actors reserving every CPU starve them (a deadlock on 2 CPUs).
CPUS_FOR_IO = 1.0


@dataclass
class RayOptions:
    """Where and how wide a Ray build runs.

    ``address``: a running cluster (``auto``, ``ray://host:10001``, ``host:6379``);
    None starts Ray on this machine for the build. ``replicas``: encoder actors
    (default one per node, or one per ``gpus_per_replica`` GPUs). ``work_dir``:
    where the shards go; on a cluster of several nodes it must be storage every
    node reaches (an NFS mount, for instance).
    """

    address: str | None = None
    replicas: int | None = None
    gpus_per_replica: float = 0.0
    work_dir: str | None = None


@dataclass
class PoolSize:
    replicas: int
    cpus_per_replica: float
    threads_per_replica: int


def pool_size(nodes: list[dict[str, float]], options: RayOptions) -> PoolSize:
    """How many encoder actors, and what each reserves, for nodes with these resources.

    Each node keeps ``CPUS_FOR_IO`` CPUs free for reading and writing; CPU
    replicas share the rest (fractions allowed), GPU replicas take
    ``gpus_per_replica`` GPUs and a quarter of a CPU each.
    """
    cpus = [node.get("CPU", 0.0) for node in nodes]
    total_cpus = sum(cpus)
    if total_cpus <= 0:
        raise ArgumentError("the Ray cluster has no CPUs")
    if options.replicas is not None and options.replicas < 1:
        raise ArgumentError(f"--replicas must be at least 1, got {options.replicas}")
    if options.gpus_per_replica:
        total_gpus = sum(node.get("GPU", 0.0) for node in nodes)
        fits = int(total_gpus // options.gpus_per_replica)
        if fits < 1:
            raise ArgumentError(f"the Ray cluster has {total_gpus:g} GPUs; a replica needs {options.gpus_per_replica:g}")
        replicas = options.replicas or fits
        if replicas > fits:
            raise ArgumentError(f"{replicas} replicas of {options.gpus_per_replica:g} GPUs do not fit in {total_gpus:g} GPUs")
        return PoolSize(replicas, 0.25, max(1, int(total_cpus // replicas)))
    replicas = options.replicas or sum(1 for c in cpus if c > 0)
    free = sum(max(c - CPUS_FOR_IO, c / 2) for c in cpus if c > 0)
    return PoolSize(replicas, round(free / replicas, 3), max(1, int(total_cpus // replicas)))


class EncodeBatch:
    """A Ray Data actor: one encoder replica turning (key, id, text) batches into (key, id, vector) tables.

    Ray Data hands it ``CALLS_IN_FLIGHT`` batches at once, on as many
    threads: a batch is tokenised while the one before it runs on the model
    (one batch at a time, behind a lock), so a replica overlaps its stages as
    a local build's pipeline does, instead of leaving the GPU idle while it
    tokenises.
    """

    def __init__(self, settings: dict, device: str, threads: int):
        settings = IndexSettings.from_dict(settings)
        if settings.backend == "torch":
            import torch

            torch.set_num_threads(threads)
        self.encoder = load_encoder(settings, device)
        self.model = threading.Lock()

    def __call__(self, batch):
        tokens = self.encoder.tokenize(batch.column("text").to_pylist())
        with self.model:
            vectors = self.encoder.embed_tokens(tokens)
        return vector_table(batch.column("key").to_numpy(), batch.column("id").to_pylist(), vectors)


def encode_shards(documents_dir: Path, vectors_dir: Path, settings: IndexSettings, options: RayOptions) -> None:
    """Embed every document shard in ``documents_dir`` into vector shards in ``vectors_dir``, on Ray."""
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        _connect(ray, options)
    try:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        if len(nodes) > 1 and not options.work_dir:
            raise ArgumentError("a Ray cluster of several nodes needs --ray-work-dir on storage every node can reach")
        size = pool_size(nodes, options)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        for name in ("ray", "ray.data"):  # Ray's notices would bury the build's one-line report
            logging.getLogger(name).setLevel(logging.ERROR)
        documents = ray.data.read_parquet(str(documents_dir)).select_columns(["key", "id", "text"])
        vectors = documents.map_batches(
            EncodeBatch,
            batch_format="pyarrow",
            batch_size=ROWS_PER_CALL,
            compute=ray.data.ActorPoolStrategy(size=size.replicas, max_concurrent_calls_per_actor=CALLS_IN_FLIGHT,
                                               enable_true_multi_threading=True),
            num_cpus=size.cpus_per_replica,
            num_gpus=options.gpus_per_replica or None,
            fn_constructor_kwargs={
                "settings": settings.to_dict(),
                "device": "cuda" if options.gpus_per_replica else "cpu",
                "threads": size.threads_per_replica,
            },
        )
        vectors.write_parquet(str(vectors_dir))
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else exc
        if isinstance(cause, IndexerError):  # a replica's one-line error (a model or device it cannot load), as ours
            raise type(cause)(str(cause)) from None
        raise
    finally:
        if started_here:
            ray.shutdown()


def _connect(ray, options: RayOptions) -> None:
    where = options.address or "this machine"
    host, _, port = (options.address or "").removeprefix("ray://").rpartition(":")
    if host and port.isdigit():
        # Ray retries an unreachable head for a minute, logging each try; a plain connect fails fast and quietly.
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise ArgumentError(f"cannot reach Ray at {where}: {exc.strerror or exc}") from None
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        ray.init(
            address=options.address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            configure_logging=True,
        )
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ArgumentError(f"cannot start or reach Ray at {where}: {str(exc).splitlines()[0]}") from None


def _import_ray():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import ray
            import ray.data  # noqa: F401
    except ImportError:
        raise ArgumentError("--engine ray needs the ray extra: pip install 'indexer[ray]'") from None
    return ray


class RayEngine:
    """How a write fills its new segment through Ray's encoder pool (``ingest_on_ray``); the same ``fill`` as
    ``ingest.LocalEngine``, giving the structure it assembled from the vector shards."""

    def __init__(self, settings: IndexSettings, options: RayOptions, memory: int | None):
        self.settings, self.options, self.memory = settings, options, memory

    def fill(self, documents, cached, writer, *, whole: bool):
        """No stage seconds (Ray's own dashboard has them), and (vectors, tuning, structure), or None if nothing was written."""
        return {}, ingest_on_ray(documents, cached, writer, self.settings, self.options, self.memory, whole=whole)


def ingest_on_ray(documents, cached, writer, settings: IndexSettings, options: RayOptions, memory: int | None, *, whole: bool):
    """The ingest pipeline with Ray's encoder pool in place of the local encoder, writing into the segment ``writer``.

    This process reads the documents (so errors name the file and line as
    always) and stores them in the segment as its single writer, looks their
    texts up in the embedding cache, writes the texts to encode as document
    shards and the cached vectors as vector shards; Ray's encoder actors add
    their vector shards; the segment's FAISS structure is assembled from all
    vector shards, and the new vectors enter the cache if it keeps only codes. Returns (vectors,
    tuning, structure) for ``writer.seal``; None when there was nothing to write.
    """
    from .ingest import CHUNK_SIZE, document_chunks
    from .segments import segment_structure
    from .shards import ShardWriter, vector_shards
    from .vectors import build_from_shards, create, ivf_bytes

    work = Path(options.work_dir) / f"{writer.path.name}-{writer.folder.name}" if options.work_dir else writer.folder / "shards"
    shards = ShardWriter(work)
    try:
        for docs in document_chunks(documents):
            ids, texts = [d.id for d in docs], [d.text for d in docs]
            digests, hit, known = cached.lookup(texts)
            keys = writer.add_documents(docs, digests=digests)
            shards.write_vectors(keys[hit], [ids[i] for i in np.flatnonzero(hit)], known[hit])
            rows = np.flatnonzero(~hit)
            shards.write_documents(keys[rows], [ids[i] for i in rows], [texts[i] for i in rows], [docs[i].metadata for i in rows])
            cached.encoded += len(rows)
        if not writer.count:
            return None
        structure = segment_structure(settings.index_type, writer.count, cached.dimension, memory, whole=whole)
        # An IVF structure over the memory budget keeps its lists on disk.
        spills = memory is not None and (ivf_bytes(structure, writer.count, cached.dimension) or 0) > memory
        if shards.documents_written:
            encode_shards(shards.documents_dir, shards.vectors_dir, settings, options)
            if spills or not create(cached.dimension, structure).keeps_vectors:  # else the segment keeps them (see cache)
                for shard in vector_shards(shards.vectors_dir, CHUNK_SIZE, known=False):
                    for vectors, keys in shard():
                        rows = writer.store.fetch(keys)
                        cached.remember([rows[int(k)]["text"] for k in keys], vectors)
        vectors, tuning = build_from_shards(vector_shards(shards.vectors_dir), cached.dimension, writer.count, structure,
                                            writer.ondisk_path if spills else None)
        return vectors, tuning, structure
    finally:
        shutil.rmtree(work, ignore_errors=True)
