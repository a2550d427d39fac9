"""FAISS behind ``FaissIndex``: inner-product search over unit vectors, any FAISS factory structure.

Each vector carries the integer key of its SQLite row: IVF structures store
ids themselves; the others sit behind an ``IndexIDMap2`` (which must not wrap
IVF: its removal assumes the inner ids shift down). A structure is a FAISS
factory string: ``Flat`` (exact, the default), ``HNSW32``, ``IVF<n>,Flat``,
``IVF<n>,SQ8``, ``IVF<n>,PQ<m>``, or any other string the user gives;
``choose_structure`` turns the CLI's kinds (flat, hnsw, ivf, ivfpq, auto) into one.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from ..errors import ArgumentError, IndexCorruptError
from .tuning import TUNING_QUERIES, TUNING_RECALL, exact_neighbours, midpoint_queries, recall_at_k

TRAINING_SAMPLE = 100_000
# k-means points per IVF list and iterations: 64 and 10 train 1,024 lists on 1M MiniLM vectors in 2.2 s (FAISS's
# defaults, 256 and 25, in 4x that) with the same recall after tuning (benchmarks/ingest.py).
TRAINING_PER_LIST = 64
TRAINING_ITERATIONS = 10
EXACT_UP_TO = 100_000
# Past this, ``auto`` builds IVF, not HNSW: on 2 cores an HNSW32 graph over 1M vectors takes 84 s to build,
# 1,024 IVF lists 8.5 s, with recall@10 0.998 at nprobe 8 (measured on the free-encoder vectors of benchmarks/ingest.py).
HNSW_UP_TO = 250_000
STREAM_AFTER = 10_000  # segments.SMALL_SEGMENT: a smaller partial segment is Flat whatever the type
WHOLE_VECTORS_UP_TO = 2_000_000  # past this, ``auto`` keeps 8-bit codes (IVF-SQ8), not whole vectors
HNSW_LINKS = 32
FEW_QUERIES = 8
IVF_PROBED_SHARE = 4  # tuning tries nprobe up to nlist / this
ONDISK_SUFFIX = ".ivfdata"


def ivf_lists(count: int, per_root: int = 4) -> int:
    """IVF cells for ``count`` vectors: about ``per_root`` sqrt(n), a power of two, with 39+ points per cell to train on."""
    lists = 2 ** round(math.log2(max(per_root * math.sqrt(max(count, 1)), 1)))
    return int(max(1, min(lists, count // 39 or 1)))


def pq_subquantizers(dimension: int, bytes_per_vector: int | None = None) -> int:
    """PQ sub-vectors: the largest divisor of ``dimension`` within the byte budget (default d/8)."""
    target = bytes_per_vector or max(dimension // 8, 1)
    return max(m for m in range(1, dimension + 1) if dimension % m == 0 and m <= target)


def choose_structure(index_type: str, count: int, dimension: int, memory: int | None = None) -> str:
    """The FAISS factory string for ``index_type`` at this size and memory budget.

    ``auto`` in the spirit of autofaiss: exact search while it is small and
    fits; HNSW while its graph fits and builds in seconds; IVF over whole
    vectors (sqrt(n) lists: cheap to build, tuned to recall by nprobe) while
    they fit; then IVF with 8-bit scalar quantisation; then IVF with product
    quantisation sized to the budget.
    """
    kind = index_type.lower()
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{HNSW_LINKS}"
    if kind == "ivf":
        return f"IVF{ivf_lists(count)},Flat"
    if kind == "ivfpq":
        return f"IVF{ivf_lists(count)},PQ{pq_subquantizers(dimension)}"
    if kind != "auto":
        return index_type
    budget = memory or 2**62
    flat_bytes = count * dimension * 4
    if count <= EXACT_UP_TO and flat_bytes <= budget:
        return "Flat"
    if count <= HNSW_UP_TO and flat_bytes + count * HNSW_LINKS * 2 * 4 <= budget:
        return f"HNSW{HNSW_LINKS}"
    if count <= WHOLE_VECTORS_UP_TO and flat_bytes + count * 8 <= budget:
        return f"IVF{ivf_lists(count, per_root=1)},Flat"
    if count * (dimension + 16) <= budget:
        return f"IVF{ivf_lists(count)},SQ8"
    per_vector = max(budget // max(count, 1) - 16, 1)
    return f"IVF{ivf_lists(count)},PQ{pq_subquantizers(dimension, per_vector)}"


def streamed_structure(index_type: str, count: int, dimension: int, memory: int | None = None) -> str | None:
    """The structure a write can start building while it streams, once ``count`` vectors make the choice certain:
    Flat or HNSW (asked for) past a small segment's size; for ``auto``, IVF over whole vectors past HNSW's range while they
    fit (1,024 lists: the final count is not known yet; ``streamed.same_kind`` accepts it for any IVF-Flat choice).
    None: not yet, or not a structure that can (IVF codes need a sample of every vector, IVF lists the final count)."""
    kind = index_type.lower()
    if kind in ("flat", "hnsw") and count >= STREAM_AFTER:
        return choose_structure(kind, count, dimension, memory)
    if kind == "auto" and count > HNSW_UP_TO and whole_vector_ivf(choose_structure(kind, count, dimension, memory)):
        return f"IVF{ivf_lists(4 * HNSW_UP_TO, per_root=1)},Flat"
    return None


def whole_vector_ivf(structure: str) -> bool:
    """Whether ``structure`` is IVF lists over whole vectors (``IVF<n>,Flat``), whatever the number of lists."""
    return structure.startswith("IVF") and structure.endswith(",Flat")


def ivf_bytes(structure: str, count: int, dimension: int) -> int | None:
    """Memory the inverted lists of an IVF ``structure`` take for ``count`` vectors (codes and ids); None if not IVF."""
    inner = FaissIndex.create(dimension, structure).inner
    if not isinstance(inner, faiss.IndexIVF):
        return None
    return count * (inner.code_size + 8)


class FaissIndex:
    """A FAISS inner-product index whose ids are document store keys (a ``FaissIndex``)."""

    def __init__(self, index: faiss.Index, search_params: dict[str, int] | None = None):
        self.index = index
        self.search_params = dict(search_params or {})

    @classmethod
    def create(cls, dimension: int, structure: str = "Flat") -> FaissIndex:
        """An empty inner-product index of the given FAISS factory ``structure``."""
        try:
            inner = faiss.index_factory(dimension, structure, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError:
            raise ArgumentError(f"{structure!r} is not an index type (flat, hnsw, ivf, ivfpq, auto) or FAISS factory string") from None
        if isinstance(inner, faiss.IndexIVF):
            return cls(inner)
        return cls(faiss.IndexIDMap2(inner))

    @classmethod
    def load(cls, path: str | Path, search_params: dict[str, int] | None = None, mmap: bool = False) -> FaissIndex:
        """Read a saved index; ``mmap`` maps it instead of reading it (for counts)."""
        path = Path(path)
        if not path.is_file():
            raise IndexCorruptError(f"{path}: vector file is missing")
        flags, quiet = (faiss.IO_FLAG_MMAP if mmap else 0), contextlib.nullcontext()
        if path.with_suffix(ONDISK_SUFFIX).exists():
            # Inverted lists kept on disk (a merged distributed build); FAISS finds them beside the index
            # and printf's that it did so, which would corrupt a command's JSON on stdout.
            flags, quiet = faiss.IO_FLAG_ONDISK_SAME_DIR, stdout_silenced()
        try:
            with quiet:
                return cls(faiss.read_index(str(path), flags), search_params)
        except RuntimeError as exc:
            raise IndexCorruptError(f"{path}: unreadable FAISS index ({str(exc).splitlines()[0]})") from None

    @property
    def dimension(self) -> int:
        return self.index.d

    @property
    def inner(self) -> faiss.Index:
        """The search structure, without its id map."""
        index = faiss.downcast_index(self.index)
        return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def is_trained(self) -> bool:
        return self.index.is_trained

    def training_sample(self) -> int:
        """Vectors to sample before filling: enough to train an untrained structure and to tune an approximate one; none for exact search."""
        if not self.index.is_trained:
            inner = self.inner  # IVF over whole vectors trains only its lists; codes need the whole sample
            lists = inner.nlist if isinstance(inner, faiss.IndexIVFFlat) else TRAINING_SAMPLE // TRAINING_PER_LIST
            return max(min(TRAINING_SAMPLE, lists * TRAINING_PER_LIST), TUNING_QUERIES * 2)
        return TUNING_QUERIES * 2 if isinstance(self.inner, (faiss.IndexHNSW, faiss.IndexIVF)) else 0

    def train(self, sample: np.ndarray) -> None:
        if not self.index.is_trained:
            inner = self.inner
            if isinstance(inner, faiss.IndexIVF):
                inner.cp.niter = TRAINING_ITERATIONS
            self.index.train(np.ascontiguousarray(sample, dtype=np.float32))

    def add(self, vectors: np.ndarray, keys: np.ndarray) -> None:
        """Add ``vectors`` (n x d, float32, unit length) under integer ``keys``."""
        if len(vectors):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(keys, dtype=np.int64))

    @property
    def fills_by_list(self) -> bool:
        """Whether this is an empty, trained IVF over whole vectors, which ``fill_by_list`` fills to the byte."""
        inner = self.inner
        return (isinstance(inner, faiss.IndexIVFFlat) and inner.is_trained and inner.ntotal == 0
                and isinstance(faiss.downcast_InvertedLists(inner.invlists), faiss.ArrayInvertedLists))

    def assign(self, vectors: np.ndarray) -> np.ndarray:
        """The IVF list of each vector (its nearest centroid): what ``add`` would put it in."""
        return self.inner.quantizer.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)[1].ravel()

    def fill_by_list(self, chunks, lists: np.ndarray) -> None:
        """Add every (vectors, keys) of ``chunks`` to the IVF list ``lists`` gives it (``assign``, in the same order),
        each list allocated once at its final size. ``add`` grows lists by doubling, and the outgrown buffers stay
        in malloc's heap: 1M vectors (1.5 GB) peaked at 2.3 GB that way, at 1.6 GB this way, with the same lists."""
        inner = self.inner
        invlists = faiss.downcast_InvertedLists(inner.invlists)
        counts = np.bincount(lists, minlength=inner.nlist)
        for number in np.flatnonzero(counts).tolist():
            invlists.resize(number, int(counts[number]))
        filled = np.zeros(inner.nlist, dtype=np.int64)
        first = 0
        for vectors, keys in chunks:
            mine = lists[first : first + len(keys)]
            first += len(keys)
            order = np.argsort(mine, kind="stable")
            codes = np.ascontiguousarray(vectors[order], dtype=np.float32).view(np.uint8)
            ids = np.ascontiguousarray(np.asarray(keys, dtype=np.int64)[order])
            numbers, starts, sizes = np.unique(mine[order], return_index=True, return_counts=True)
            for number, start, size in zip(numbers.tolist(), starts.tolist(), sizes.tolist()):
                invlists.update_entries(number, int(filled[number]), size, faiss.swig_ptr(ids[start : start + size]),
                                        faiss.swig_ptr(codes[start : start + size]))
                filled[number] += size
        inner.ntotal = int(counts.sum())
        self.index.ntotal = inner.ntotal

    @property
    def keeps_vectors(self) -> bool:
        """Whether the structure holds every vector whole, so ``reconstruct`` gives it back exactly (Flat, HNSW, IVF-Flat in memory)."""
        inner = self.inner
        if isinstance(inner, faiss.IndexIVFFlat):
            return not isinstance(faiss.downcast_InvertedLists(inner.invlists), faiss.OnDiskInvertedLists)
        return isinstance(inner, (faiss.IndexFlat, faiss.IndexHNSWFlat))

    @property
    def is_flat(self) -> bool:
        """Whether search is exhaustive over plain vectors (``all_vectors`` gives them)."""
        return isinstance(self.inner, faiss.IndexFlat)

    def all_vectors(self) -> np.ndarray:
        """Every vector of a Flat index, in the order of ``keys()``."""
        return self.inner.reconstruct_n(0, self.index.ntotal)

    def reconstruct(self, keys: np.ndarray) -> np.ndarray:
        """The stored vectors of ``keys`` (see ``keeps_vectors``)."""
        keys = np.asarray(keys, dtype=np.int64)
        if not len(keys):
            return np.empty((0, self.dimension), dtype=np.float32)
        inner = self.inner
        if isinstance(inner, faiss.IndexIVF) and inner.direct_map.type == faiss.DirectMap.NoMap:
            inner.make_direct_map(True)  # a hash table from id to list entry, built once
        return self.index.reconstruct_batch(keys)

    def keys(self) -> np.ndarray:
        """Every stored key, in storage order."""
        index = faiss.downcast_index(self.index)
        if isinstance(index, faiss.IndexIVF):
            lists = index.invlists
            parts = [
                faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                for i in range(index.nlist)
                if lists.list_size(i)
            ]
            return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        return faiss.vector_to_array(index.id_map)

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, excluded: np.ndarray | None = None, **knobs: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, keys) per query row; missing hits have key -1.

        ``allowed`` restricts results to those keys, ``excluded`` leaves those
        out (give one or the other). ``nprobe`` (IVF) and ``efSearch`` (HNSW)
        override the stored defaults for this call.
        """
        params = self._parameters({**self.search_params, **{k_: v for k_, v in knobs.items() if v}}, allowed, excluded)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if len(queries) >= FEW_QUERIES:
            return self.index.search(queries, k, params=params)
        # A few queries gain nothing from FAISS's OpenMP threads, which only contend with torch's (measured ~1 ms).
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self.index.search(queries, k, params=params)
        finally:
            faiss.omp_set_num_threads(threads)

    def _parameters(self, knobs: dict[str, int], allowed: np.ndarray | None, excluded: np.ndarray | None = None):
        inner = self.inner
        if isinstance(inner, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW()
            if knobs.get("efSearch"):
                params.efSearch = int(knobs["efSearch"])
        elif isinstance(inner, faiss.IndexIVF):
            params = faiss.SearchParametersIVF()
            if knobs.get("nprobe"):
                params.nprobe = min(int(knobs["nprobe"]), inner.nlist)
        elif allowed is None and excluded is None:
            return None
        else:
            params = faiss.SearchParameters()
        return selecting(params, allowed, excluded)

    def tune(self, sample: np.ndarray, vector_chunks, k: int = 10) -> dict[str, float]:
        """Pick the cheapest nprobe / efSearch whose recall@k against exact search reaches TUNING_RECALL.

        The queries are midpoints of random pairs of ``sample`` vectors (not the
        vectors themselves, which would find themselves); exact neighbours come
        from a brute-force pass over ``vector_chunks()``, which yields
        (vectors, keys) chunks. Stores the choice as the default search params.
        """
        if (knob := self.knob()) is None:
            return {}
        name, values = knob
        queries = midpoint_queries(sample, TUNING_QUERIES)
        k = min(k, len(self))
        truth = exact_neighbours(queries, vector_chunks(), k)
        result = tune_knob(lambda value: recall_at_k(self.search(queries, k, **{name: value})[1], truth), values)
        self.search_params = {name: int(result.pop("value"))}
        return {name: self.search_params[name], **result}

    def knob(self) -> tuple[str, list[int]] | None:
        """The search knob of this structure and the values tuning tries, cheapest first; None for exact search."""
        inner = self.inner
        if isinstance(inner, faiss.IndexHNSW):
            return "efSearch", [16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024]
        if isinstance(inner, faiss.IndexIVF):
            # At most a quarter of the lists: past that the structure costs what exact search does (vectors without
            # cluster structure), and the tuning as much as the build (see benchmarks/ingest.py's random vectors).
            return "nprobe", sorted({min(2**i, max(inner.nlist // IVF_PROBED_SHARE, 1)) for i in range(0, 20)})
        return None

    def save(self, path: str | Path) -> None:
        faiss.write_index(self.index, str(path))


def selecting(params, allowed: np.ndarray | None, excluded: np.ndarray | None):
    """``params`` (FAISS search parameters) restricted to the keys ``allowed``, or to all but ``excluded``."""
    if allowed is not None:
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
        params.sel, params._selector = selector, selector  # keep it alive as long as the parameters
    elif excluded is not None:
        batch = faiss.IDSelectorBatch(np.ascontiguousarray(excluded, dtype=np.int64))
        selector = faiss.IDSelectorNot(batch)
        params.sel, params._selector = selector, (selector, batch)
    return params


def tune_knob(recall_at, values: list[int]) -> dict[str, float]:
    """The cheapest of ``values`` whose ``recall_at(value)`` reaches TUNING_RECALL, tried in order: ``value``,
    ``tuned_recall``, and ``at_bound`` (1.0 where the last value was tried and still fell short)."""
    tried: list[tuple[int, float]] = []
    for value in values:
        tried.append((value, recall_at(value)))
        if tried[-1][1] >= TUNING_RECALL:
            break
        # Quantised vectors (PQ) cap recall below the target: stop where more search stops helping.
        if len(tried) >= 3 and tried[-1][1] - tried[-3][1] < 0.002:
            break
    best = max(recall for _, recall in tried)
    value, recall = next((v, r) for v, r in tried if r >= min(TUNING_RECALL, best - 0.002))
    # Every value tried and still short: the bound stopped it (structureless vectors), not a cap of quantised ones.
    bounded = len(tried) == len(values) and best < TUNING_RECALL and value == values[-1]
    return {"value": value, "tuned_recall": round(recall, 4), "at_bound": float(bounded)}


@contextlib.contextmanager
def stdout_silenced() -> Iterator[None]:
    """Send what C code writes to file descriptor 1 to /dev/null for the duration (Python's own output is flushed first)."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def sample_from_shards(shards, count: int, size: int, seed: int = 0) -> np.ndarray:
    """Up to ``size`` random vectors out of ``count`` spread over ``shards`` (callables yielding (vectors, keys))."""
    rng = np.random.default_rng(seed)
    keep = size / max(count, 1)
    parts = []
    for shard in shards:
        for vectors, _ in shard():
            parts.append(vectors[rng.random(len(vectors)) < keep])
    sample = np.concatenate(parts) if parts else np.empty((0, 0), dtype=np.float32)
    return np.ascontiguousarray(sample[:size])


def build_from_shards(shards, dimension: int, count: int, structure: str, ondisk: Path | None = None,
                      threads: int = 2) -> tuple[FaissIndex, dict[str, float]]:
    """Create, train, fill and tune a structure from vector shards (callables yielding (vectors, keys)).

    Flat and graph structures take the shards one after another. IVF
    structures are trained once on a sample; each shard fills its own copy of
    the trained index (``threads`` at a time) and the copies are merged: in
    memory, or with ``ondisk`` (a file path) into inverted lists kept in that
    file, which ``FaissIndex.load`` opens from the same folder.
    """
    vectors = FaissIndex.create(dimension, structure)
    size = vectors.training_sample()  # exact search needs none: no pass over the shards for it
    sample = sample_from_shards(shards, count, size) if size else np.empty((0, dimension), dtype=np.float32)
    vectors.train(sample)

    def all_chunks():
        for shard in shards:
            yield from shard()

    if not isinstance(vectors.inner, faiss.IndexIVF):
        for chunk, keys in all_chunks():
            vectors.add(chunk, keys)
        return vectors, vectors.tune(sample, all_chunks)

    trained = faiss.clone_index(vectors.index)  # empty: the merged index grows while later shards fill copies

    def fill(shard) -> faiss.Index:
        part = FaissIndex(faiss.clone_index(trained))
        for chunk, keys in shard():
            part.add(chunk, keys)
        return part.index

    threads = max(1, threads)
    files: list[str] = []
    with ThreadPoolExecutor(threads) as pool:
        for first in range(0, len(shards), threads):  # a wave at a time, so memory holds `threads` parts at most
            for part in pool.map(fill, shards[first : first + threads]):
                if ondisk is None:
                    vectors.index.merge_from(part, 0)
                else:
                    files.append(str(ondisk.with_name(f"{ondisk.stem}.shard{len(files)}.faiss")))
                    faiss.write_index(part, files[-1])
    if ondisk is not None:
        with stdout_silenced():  # FAISS printf's each resize of the lists file
            merge_ondisk(vectors.index, files, str(ondisk))
        for name in files:
            Path(name).unlink()
    return vectors, vectors.tune(sample, all_chunks)
