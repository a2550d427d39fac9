"""The vector side of an index: inner-product search over unit vectors, keyed by the documents' SQLite keys.

Vectors are L2-normalised before they get here, so inner product is cosine
similarity. Every structure is a ``VectorIndex``; ``LIBRARIES`` names the
library behind each (FAISS, ``faiss_index``, the only one today). A structure
string ``"name:spec"`` is made by the library registered as ``name``; any
other string is a FAISS factory string. A segment records its structure
string (``SegmentMeta.vector_index``), and ``load`` reads it with the same
library. A new ANN library is one module here and one line in ``LIBRARIES``.

- ``faiss_index``: ``FaissIndex``, the structure chooser and the IVF assembled from parts (on disk for a Ray build over its memory budget);
- ``rescored``: int8 or binary codes searched first, rescored with the whole vectors kept on disk (``--vectors``);
- ``spool``: vectors spooled to disk while a build streams;
- ``streamed``: the structure built in a thread while they stream;
- ``tuning``: recall against exact search, for tuning search knobs.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import ArgumentError
from .faiss_index import (
    ONDISK_SUFFIX,
    FaissIndex,
    build_from_shards,
    choose_structure,
    ivf_bytes,
    sample_from_shards,
    streamed_structure,
)
from .rescored import STORAGE, RescoredIndex, quantised_structure, whole_files
from .spool import VectorSpool
from .streamed import StreamedBuild
from .tuning import EXACT_ROWS, TUNING_QUERIES, TUNING_RECALL, exact_neighbours, midpoint_queries, recall_at_k


@runtime_checkable
class VectorIndex(Protocol):
    """What writes, searches and checks need of a vector structure. Implementations also offer the classmethods
    ``create(dimension, spec)`` and ``load(path, search_params, mmap)`` that ``create`` and ``load`` call."""

    search_params: dict[str, int]  # default search knobs (nprobe, efSearch), recorded in the segment

    @property
    def dimension(self) -> int: ...

    def __len__(self) -> int: ...

    @property
    def is_trained(self) -> bool: ...  # ready to add to (untrained: an IVF before its lists are trained)

    def training_sample(self) -> int: ...  # vectors to sample before filling (to train and tune); 0: none

    def train(self, sample: np.ndarray) -> None: ...

    def add(self, vectors: np.ndarray, keys: np.ndarray) -> None: ...

    @property
    def keeps_vectors(self) -> bool: ...  # whether reconstruct gives every vector back exactly

    @property
    def is_flat(self) -> bool: ...  # exhaustive over plain vectors: all_vectors gives them

    def all_vectors(self) -> np.ndarray: ...

    def reconstruct(self, keys: np.ndarray) -> np.ndarray: ...

    def keys(self) -> np.ndarray: ...

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, excluded: np.ndarray | None = None,
               **knobs: int | None) -> tuple[np.ndarray, np.ndarray]: ...

    def tune(self, sample: np.ndarray, vector_chunks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]],
             k: int = 10) -> dict[str, float]: ...

    def save(self, path: str | Path) -> None: ...


# Library name -> its VectorIndex class. The first is the default: structure strings without a registered prefix.
LIBRARIES: dict[str, type] = {"faiss": FaissIndex, "rescore": RescoredIndex}


def library(structure: str) -> tuple[type, str]:
    """The class that makes ``structure`` and the spec it is given (``structure`` without its ``name:`` prefix)."""
    name, colon, spec = structure.partition(":")
    if colon and name in LIBRARIES:
        return LIBRARIES[name], spec
    return next(iter(LIBRARIES.values())), structure


def create(dimension: int, structure: str = "Flat") -> VectorIndex:
    """An empty structure of ``dimension``-d vectors, as ``structure`` describes."""
    kind, spec = library(structure)
    return kind.create(dimension, spec)


def load(path: str | Path, structure: str = "Flat", search_params: dict[str, int] | None = None,
         mmap: bool = False) -> VectorIndex:
    """A saved structure, read by the library that made ``structure``; ``mmap`` maps it instead (for counts)."""
    kind, _ = library(structure)
    return kind.load(path, search_params, mmap)


def build_from_spool(spool: VectorSpool, structure: str, streamed: StreamedBuild | None = None) -> tuple[VectorIndex, dict[str, float]]:
    """Create, train, fill and tune a structure from every spooled vector (or take the one ``streamed`` built, if it
    is of the kind ``structure`` asks for); the tuning's result, with the seconds building the structure took
    after the stream (``structure_seconds``) and tuning it (``tune_seconds``)."""
    started = time.perf_counter()
    vectors = streamed.finish(structure) if streamed is not None else None
    if vectors is None:
        vectors = create(spool.dimension, structure)
        vectors.train(spool.sample(vectors.training_sample()))
        if getattr(vectors, "fills_by_list", False):  # IVF over whole vectors: lists allocated once (see there)
            vectors.fill_by_list(spool.chunks(), np.concatenate([vectors.assign(chunk) for chunk, _ in spool.chunks()]))
        else:
            for chunk, keys in spool.chunks():
                vectors.add(chunk, keys)
    filled = time.perf_counter()
    # All tuning needs of a sample: midpoints of random pairs (a training sample is 100 MB at 1M IVF lists).
    # Exact neighbours a few thousand rows at a time: at 16,384 the chunks read and their scores held 0.1 GB more at
    # the peak of a 1M-document seal (the structure is whole by now), for no speed.
    tuning = vectors.tune(spool.sample(TUNING_QUERIES * 2, seed=1), functools.partial(spool.chunks, EXACT_ROWS))
    return vectors, {**tuning, "structure_seconds": filled - started, "tune_seconds": time.perf_counter() - filled}


def parse_memory(text: str | None) -> int | None:
    """Bytes in ``"512MB"``, ``"4G"``, ``"1.5GiB"``; None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not match:
        raise ArgumentError(f"memory budget {text!r} is not a size like 512MB or 4GB")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2)]
    return int(float(match.group(1)) * scale)


__all__ = ["LIBRARIES", "ONDISK_SUFFIX", "STORAGE", "TUNING_QUERIES", "TUNING_RECALL", "FaissIndex", "RescoredIndex",
           "VectorIndex", "VectorSpool",
           "StreamedBuild", "build_from_shards", "build_from_spool", "choose_structure", "create", "exact_neighbours",
           "ivf_bytes", "library", "load", "midpoint_queries", "parse_memory", "quantised_structure", "recall_at_k",
           "sample_from_shards", "streamed_structure", "whole_files"]
