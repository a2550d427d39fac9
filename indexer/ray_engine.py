"""Encoding on a Ray cluster: Ray Data reads document shards, a pool of encoder actors embeds them, the vectors stream back.

Each actor holds one replica of our own ``Encoder`` (same tokenisation,
length-sorted batching, pooling and normalisation as the embedded path), so
the vectors are the ones a local build makes. Needs the ``ray`` extra.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ArgumentError, IndexerError
from .external import load_encoder
from .settings import IndexSettings
from .shards import ShardWriter, vector_table, vectors_of

# Rows handed to one actor call; the encoder sorts them by length inside.
ROWS_PER_CALL = 2048
# Batches an encoder actor works on at once: one tokenised while the other runs on the model.
CALLS_IN_FLIGHT = 2
# Spooled vectors per part of an IVF assembled on disk (parts fill copies of the trained index, then merge).
SPILL_PART = 262_144
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
    """A Ray Data actor: one encoder replica turning (key, text) batches into (key, vector) tables.

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
        return vector_table(batch.column("key").to_numpy(), vectors)


def encoded(documents_dir: Path, settings: IndexSettings, options: RayOptions) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(vectors, keys) of every document shard in ``documents_dir``, embedded on Ray, as the replicas finish them."""
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
        # A block per shard (a call's worth of documents, see ingest_on_ray): Ray Data hands a block to one replica,
        # and reads small files as one block, which left every replica but one idle.
        shards = len(list(documents_dir.glob("*.parquet")))
        documents = ray.data.read_parquet(str(documents_dir)).select_columns(["key", "text"]).repartition(shards)
        vectors = documents.map_batches(
            EncodeBatch,
            batch_format="pyarrow",
            batch_size=None,  # a call a block, not blocks bundled into one call
            # Without a bound on the blocks queued at an actor, the first one ready takes them all.
            compute=ray.data.ActorPoolStrategy(size=size.replicas, max_concurrent_calls_per_actor=CALLS_IN_FLIGHT,
                                               max_tasks_in_flight_per_actor=CALLS_IN_FLIGHT, enable_true_multi_threading=True),
            num_cpus=size.cpus_per_replica,
            num_gpus=options.gpus_per_replica or None,
            fn_constructor_kwargs={
                "settings": settings.to_dict(),
                "device": "cuda" if options.gpus_per_replica else "cpu",
                "threads": size.threads_per_replica,
            },
        )
        # Streamed back as each block is done, so this process fills the segment while the replicas work on.
        for batch in vectors.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield vectors_of(batch), batch.column("key").to_numpy()
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
    ``ingest.LocalEngine``."""

    def __init__(self, settings: IndexSettings, options: RayOptions, memory: int | None):
        self.settings, self.options, self.memory = settings, options, memory

    def fill(self, documents, cached, writer, *, whole: bool):
        """No stage seconds (Ray's own dashboard has them), and what ``ingest_on_ray`` returns."""
        return {}, ingest_on_ray(documents, cached, writer, self.settings, self.options, self.memory, whole=whole)


def ingest_on_ray(documents, cached, writer, settings: IndexSettings, options: RayOptions, memory: int | None, *, whole: bool):
    """The ingest pipeline with Ray's encoder pool in place of the local encoder, writing into the segment ``writer``.

    This process reads the documents (so errors name the file and line as
    always) and stores them in the segment as its single writer, looks their
    texts up in the embedding cache (the vectors found go straight to the
    segment) and writes the texts to encode as document shards; Ray's encoder
    replicas embed them and their vectors stream back into the segment, whose
    structure is then built as a local build's is (while they stream, where
    the structure allows). Returns None; or, for an IVF structure over the
    memory budget, (vectors, tuning, structure) for ``writer.seal``: that one
    is assembled with its inverted lists on disk.
    """
    from .ingest import document_chunks
    from .segments import segment_structure
    from .vectors import build_from_shards, ivf_bytes

    work = Path(options.work_dir) / f"{writer.path.name}-{writer.folder.name}" if options.work_dir else writer.folder / "shards"
    shards = ShardWriter(work, ROWS_PER_CALL)
    try:
        for docs in document_chunks(documents):
            texts = [d.text for d in docs]
            digests, hit, known = cached.lookup(texts)
            keys = writer.add_documents(docs, digests=digests)
            writer.add_vectors(known[hit], keys[hit])
            rows = np.flatnonzero(~hit)
            shards.write_documents(keys[rows], [texts[i] for i in rows.tolist()])
            cached.encoded += len(rows)
        if shards.documents_written:
            for vectors, keys in encoded(shards.documents_dir, settings, options):
                writer.add_vectors(vectors, keys, fresh=keys)
        if not writer.count:
            return None
        structure = segment_structure(settings, writer.count, cached.dimension, whole=whole)
        if memory is None or settings.vectors != "float32" or (ivf_bytes(structure, writer.count, cached.dimension) or 0) <= memory:
            return None
        writer.spool.close()
        parts = [functools.partial(writer.spool.chunks, start=first, stop=min(first + SPILL_PART, writer.count))
                 for first in range(0, writer.count, SPILL_PART)]
        vectors, tuning = build_from_shards(parts, cached.dimension, writer.count, structure, writer.ondisk_path)
        return vectors, tuning, structure
    finally:
        shutil.rmtree(work, ignore_errors=True)
