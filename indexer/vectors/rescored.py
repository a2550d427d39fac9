"""Quantised vectors searched first, their best candidates rescored with the whole vectors kept on disk.

``--vectors int8`` keeps 8-bit scalar codes in memory (FAISS SQ8: ``SQ8``,
``HNSW32_SQ8``, ``IVF<n>,SQ8``), a quarter of float32's bytes; ``--vectors
binary`` keeps one bit a dimension (the sign; FAISS ``IndexBinaryFlat``,
searched by Hamming distance), a 32nd. Either finds
``k x oversample`` candidates, whose exact inner products are then computed
from the float32 vectors, kept beside the structure in key order
(``vectors-full.npy``, their keys in ``vectors-keys.npy``) and read a run of
rows at a time (``DiskVectors``): a search reads only its candidates' rows,
so they stay on disk, not in RAM. (Not a memory map: each fault there maps the
64 KB around the row, and 50 questions over 100k vectors took 100 MB of RSS.)
``oversample`` is tuned like ``efSearch`` (after the structure's own knob) to
reach TUNING_RECALL of exact float32 search, and recorded with the others.

The structure string is ``rescore:<spec>``, ``spec`` a FAISS factory string
(``B...`` for binary codes); ``quantised_structure`` makes it from a float32 one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import faiss
import numpy as np

from ..errors import ArgumentError, IndexCorruptError
from ..settings import VECTOR_STORAGE as STORAGE
from .faiss_index import FaissIndex, selecting, tune_knob
from .tuning import TUNING_QUERIES, exact_neighbours, midpoint_queries, recall_at_k

NAME = "rescore"
OVERSAMPLING = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
KNOB_OVERSAMPLE = 4  # candidates a hit while the structure's own knob is tuned
FULL_SUFFIX, KEYS_SUFFIX = "-full.npy", "-keys.npy"
MISSING = -np.finfo(np.float32).max  # the score FAISS gives a missing hit (key -1)


def quantised_structure(structure: str, storage: str) -> str:
    """The structure that keeps ``storage`` codes in place of the float32 FAISS ``structure``
    (``Flat``, ``HNSW<m>``, ``IVF<n>,Flat``; IVF codes take int8 rescoring as they are)."""
    if storage == "float32":
        return structure
    if storage not in STORAGE:
        raise ArgumentError(f"unknown vector storage {storage!r}; choose one of {', '.join(STORAGE)}")
    hnsw = re.fullmatch(r"HNSW(\d+)", structure)
    ivf = re.fullmatch(r"(IVF\d+),(Flat|SQ8|PQ\d+)", structure)
    if storage == "int8" and (structure == "Flat" or hnsw or ivf):
        spec = "SQ8" if structure == "Flat" else f"{structure}_SQ8" if hnsw else f"{ivf.group(1)},{'SQ8' if ivf.group(2) == 'Flat' else ivf.group(2)}"
    elif storage == "binary" and (structure == "Flat" or hnsw or ivf):
        # Searched exhaustively whatever the type: Hamming distance over 48 bytes a vector costs 6 ms a question
        # at 1M on 2 cores, FAISS's binary IVF takes no id selector (no filters, no deletions), and a binary HNSW
        # graph lost half the recall that oversampling then has to win back (efSearch 1,024 for 0.95).
        spec = "BFlat"
    else:
        raise ArgumentError(f"--vectors {storage} works with the index types flat, hnsw, ivf and auto, not {structure!r}")
    return f"{NAME}:{spec}"


class BinaryCodes:
    """The sign bits of unit vectors in a FAISS binary index (``BFlat``) under integer keys, searched exhaustively; what
    ``RescoredIndex`` needs of a first stage, as ``FaissIndex`` offers it for float codes."""

    def __init__(self, index: faiss.IndexBinary, search_params: dict[str, int] | None = None):
        self.index = index
        self.search_params = dict(search_params or {})

    @classmethod
    def create(cls, dimension: int, spec: str) -> BinaryCodes:
        if dimension % 8:
            raise ArgumentError(f"--vectors binary needs a dimension divisible by 8, not {dimension}")
        return cls(faiss.IndexBinaryIDMap(faiss.index_binary_factory(dimension, spec)))  # no reverse map: 50 bytes a key

    @staticmethod
    def codes(vectors: np.ndarray) -> np.ndarray:
        return np.packbits(np.asarray(vectors) > 0, axis=1)

    @property
    def dimension(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def is_trained(self) -> bool:
        return self.index.is_trained

    def training_sample(self) -> int:
        return 0

    def train(self, sample: np.ndarray) -> None:
        pass

    def add(self, vectors: np.ndarray, keys: np.ndarray) -> None:
        if len(vectors):
            self.index.add_with_ids(self.codes(vectors), np.asarray(keys, dtype=np.int64))

    def knob(self) -> None:
        return None  # exhaustive

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, excluded: np.ndarray | None = None,
               **knobs: int | None) -> tuple[np.ndarray, np.ndarray]:
        params = selecting(faiss.SearchParameters(), allowed, excluded)
        return self.index.search(self.codes(queries), k, params=params)

    def save(self, path: str | Path) -> None:
        faiss.write_index_binary(self.index, str(path))

    @classmethod
    def load(cls, path: Path) -> BinaryCodes:
        return cls(faiss.read_index_binary(str(path)))


class RescoredIndex:
    """Codes searched first, then rescored with the whole vectors (see the module); a ``VectorIndex``."""

    def __init__(self, coarse: FaissIndex | BinaryCodes, search_params: dict[str, int] | None = None,
                 full: np.ndarray | None = None, full_keys: np.ndarray | None = None):
        self.coarse = coarse
        self.search_params = dict(search_params or {})
        coarse.search_params = {k: v for k, v in self.search_params.items() if k != "oversample"}
        self._full = full if full is not None else np.empty((0, coarse.dimension), dtype=np.float32)
        self._full_keys = full_keys if full_keys is not None else np.empty(0, dtype=np.int64)
        self._added: list[tuple[np.ndarray, np.ndarray]] = []  # vectors added since the last look at them

    @classmethod
    def create(cls, dimension: int, spec: str) -> RescoredIndex:
        return cls(BinaryCodes.create(dimension, spec) if spec.startswith("B") else FaissIndex.create(dimension, spec))

    @classmethod
    def load(cls, path: str | Path, search_params: dict[str, int] | None = None, mmap: bool = False) -> RescoredIndex:
        """The codes in ``path`` (read into memory) and the whole vectors beside it (read as searches need them)."""
        path = Path(path)
        if not path.is_file():
            raise IndexCorruptError(f"{path}: vector file is missing")
        with path.open("rb") as file:
            binary = file.read(2) == b"IB"  # FAISS's tag of a binary index
        try:  # the codes' own search parameters are set from ``search_params`` by __init__
            coarse = BinaryCodes.load(path) if binary else FaissIndex.load(path, None, mmap)
            full, keys = DiskVectors(whole_files(path)[0]), np.load(whole_files(path)[1], mmap_mode="r")
        except (RuntimeError, OSError, ValueError) as exc:
            raise IndexCorruptError(f"{path}: unreadable quantised vectors ({str(exc).splitlines()[0]})") from None
        if full.shape != (len(keys), coarse.dimension) or len(keys) != len(coarse):
            raise IndexCorruptError(f"{path}: {full.shape} whole vectors and {len(keys)} keys for {len(coarse)} codes")
        return cls(coarse, search_params, full, keys)

    @property
    def dimension(self) -> int:
        return self.coarse.dimension

    def __len__(self) -> int:
        return len(self.coarse)

    @property
    def is_trained(self) -> bool:
        return self.coarse.is_trained

    def training_sample(self) -> int:
        return max(self.coarse.training_sample(), TUNING_QUERIES * 2)

    def train(self, sample: np.ndarray) -> None:
        self.coarse.train(sample)

    def add(self, vectors: np.ndarray, keys: np.ndarray) -> None:
        self.coarse.add(vectors, keys)
        if len(vectors):
            self._added.append((np.array(vectors, dtype=np.float32), np.array(keys, dtype=np.int64)))

    @property
    def keeps_vectors(self) -> bool:
        return True  # the whole vectors, on disk

    @property
    def is_flat(self) -> bool:
        return False

    def all_vectors(self) -> np.ndarray:
        return every_row(self._whole()[0])

    def keys(self) -> np.ndarray:
        return np.asarray(self._whole()[1])

    def reconstruct(self, keys: np.ndarray) -> np.ndarray:
        full, full_keys = self._whole()
        keys = np.asarray(keys, dtype=np.int64)
        if not len(keys):
            return np.empty((0, self.dimension), dtype=np.float32)
        rows = np.minimum(np.searchsorted(full_keys, keys), max(len(full_keys) - 1, 0))
        if not len(full_keys) or (full_keys[rows] != keys).any():
            raise KeyError("a key these vectors do not hold")
        return take(full, rows)

    def _whole(self) -> tuple[np.ndarray | DiskVectors, np.ndarray]:
        """The whole vectors in key order and their keys; vectors added since are sorted in first, a chunk at a
        time (memory: all of them, once, and a chunk)."""
        if self._added:
            self._added.insert(0, (every_row(self._full), self._full_keys))
            keys = np.concatenate([k for _, k in self._added])
            order = np.argsort(keys, kind="stable")
            place = np.empty_like(order)
            place[order] = np.arange(len(order))
            full = np.empty((len(keys), self.dimension), dtype=np.float32)
            first = 0
            while self._added:
                vectors, _ = self._added.pop(0)
                full[place[first : first + len(vectors)]] = vectors
                first += len(vectors)
            self._full, self._full_keys = full, keys[order]
        return self._full, self._full_keys

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, excluded: np.ndarray | None = None,
               **knobs: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, keys) per query: ``k x oversample`` candidates by their codes, ranked by exact inner
        product; missing hits have key -1."""
        oversample = int(knobs.pop("oversample", None) or self.search_params.get("oversample", 1))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        depth = max(min(k * oversample, len(self)), k)
        _, candidates = self.coarse.search(queries, depth, allowed, excluded, **knobs)
        full, full_keys = self._whole()
        found = candidates >= 0
        rows = np.searchsorted(full_keys, np.where(found, candidates, full_keys[0] if len(full_keys) else 0))
        scores = np.full(candidates.shape, MISSING, dtype=np.float32)
        owners = np.nonzero(found)[0]
        scores[found] = np.einsum("nd,nd->n", take(full, rows[found]), queries[owners])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(candidates, order, axis=1)

    def tune(self, sample: np.ndarray, vector_chunks, k: int = 10) -> dict[str, float]:
        """The structure's own knob (nprobe, efSearch), the cheapest whose rescored recall@k reaches TUNING_RECALL
        with ``KNOB_OVERSAMPLE`` candidates a hit; then the least ``oversample`` that does at that knob (see
        ``faiss_index.tune_knob``). The knob is judged after rescoring, not on the codes' own ranking: rescoring
        repairs the order the codes get wrong (1M near-duplicates: nprobe 256 on the codes alone, 64 rescored)."""
        queries = midpoint_queries(sample, TUNING_QUERIES)
        k = min(k, len(self))
        if not k:
            return {}
        truth = exact_neighbours(queries, vector_chunks(), k)

        def recall(**knobs: int) -> float:
            return recall_at_k(self.search(queries, k, **knobs)[1], truth)

        coarse: dict[str, int] = {}
        if (knob := self.coarse.knob()) is not None:
            name, values = knob
            coarse = {name: int(tune_knob(lambda value: recall(oversample=KNOB_OVERSAMPLE, **{name: value}), values)["value"])}
            self.coarse.search_params = dict(coarse)
        result = tune_knob(lambda value: recall(oversample=value, **coarse), OVERSAMPLING)
        self.search_params = {**coarse, "oversample": int(result.pop("value"))}
        return {**self.search_params, **result}

    def save(self, path: str | Path) -> None:
        """The codes at ``path``, the whole vectors and their keys beside it (``whole_files``)."""
        path = Path(path)
        self.coarse.save(path)
        full, keys = self._whole()
        vectors_path, keys_path = whole_files(path)
        np.save(vectors_path, every_row(full))  # in memory after a build: saved as it is, not copied (1.5 GB at 1M)
        np.save(keys_path, keys)


class DiskVectors:
    """The rows of a float32 ``.npy`` file, read by ``take`` a run of consecutive rows at a time (``os.pread``: no
    file position, so threads share it), never held."""

    def __init__(self, path: Path):
        self._file = open(path, "rb")  # noqa: SIM115 - open as long as the vectors are (closed when collected)
        version = np.lib.format.read_magic(self._file)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = header(self._file)
        if len(shape) != 2 or fortran or dtype != np.float32:
            raise ValueError(f"{path.name} holds {dtype} of shape {shape}, not rows of float32")
        self.shape, self._offset = shape, self._file.tell()

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of sorted, distinct ``rows``."""
        width = self.shape[1] * 4
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        if not len(rows):
            return out
        starts = np.flatnonzero(np.diff(rows, prepend=rows[0] - 2) != 1)  # where each run of consecutive rows begins
        for first, last in zip(starts.tolist(), [*starts[1:].tolist(), len(rows)]):
            data = os.pread(self._file.fileno(), (last - first) * width, self._offset + int(rows[first]) * width)
            if len(data) != (last - first) * width:
                raise IndexCorruptError(f"{self._file.name}: shorter than its {self.shape[0]} vectors")
            out[first:last] = np.frombuffer(data, dtype=np.float32).reshape(last - first, -1)
        return out


def take(full: np.ndarray | DiskVectors, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` of whole vectors in memory or on disk (read there in file order, each once)."""
    if isinstance(full, np.ndarray):
        return full[rows]
    unique, inverse = np.unique(rows, return_inverse=True)
    return full.take(unique)[inverse]


def every_row(full: np.ndarray | DiskVectors) -> np.ndarray:
    """All the whole vectors, in key order: the array itself if they are in memory, else read from disk."""
    return full if isinstance(full, np.ndarray) else full.take(np.arange(full.shape[0]))


def whole_files(path: Path) -> tuple[Path, Path]:
    """Where a ``RescoredIndex`` saved at ``path`` keeps its whole vectors and their keys."""
    return path.with_name(path.stem + FULL_SUFFIX), path.with_name(path.stem + KEYS_SUFFIX)
