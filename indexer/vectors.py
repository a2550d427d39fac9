"""The FAISS side of an index: inner-product search over unit vectors.

Vectors are L2-normalised before they get here, so inner product is cosine
similarity. The default structure is exact search (``IndexFlatIP``) behind an
``IndexIDMap2``, so each vector carries the integer key of its SQLite row.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from .errors import IndexCorruptError


class VectorIndex:
    """A FAISS inner-product index whose ids are document store keys."""

    def __init__(self, index: faiss.Index):
        self.index = index

    @classmethod
    def create(cls, dimension: int) -> "VectorIndex":
        """An empty exact inner-product index for ``dimension``-d vectors."""
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dimension)))

    @classmethod
    def load(cls, path: str | Path, mmap: bool = False) -> "VectorIndex":
        """Read a saved index; ``mmap`` maps it instead of reading it (for counts)."""
        path = Path(path)
        if not path.is_file():
            raise IndexCorruptError(f"{path}: vector file is missing")
        try:
            return cls(faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0))
        except RuntimeError as exc:
            raise IndexCorruptError(f"{path}: unreadable FAISS index ({str(exc).splitlines()[0]})") from None

    @property
    def dimension(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    def add(self, vectors: np.ndarray, keys: np.ndarray) -> None:
        """Add ``vectors`` (n x d, float32, unit length) under integer ``keys``."""
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(keys, dtype=np.int64))

    def remove(self, keys: np.ndarray) -> int:
        """Remove the vectors stored under ``keys``; returns how many were removed."""
        return self.index.remove_ids(np.asarray(keys, dtype=np.int64))

    def keys(self) -> np.ndarray:
        """Every stored key (the id map), in storage order."""
        return faiss.vector_to_array(self.index.id_map)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, keys) per query row; missing hits have key -1."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def save(self, path: str | Path) -> None:
        faiss.write_index(self.index, str(path))
