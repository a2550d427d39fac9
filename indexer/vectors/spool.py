"""Vectors spooled to disk while a build streams, so the structure is chosen, trained and filled after the last one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np


class VectorSpool:
    """Vectors and keys appended to two flat files while a build streams, read back in chunks.

    Lets a build choose, train and fill its FAISS structure after it has seen
    every document, holding only one chunk of vectors in memory at a time.
    """

    def __init__(self, folder: Path, dimension: int):
        self.dimension = dimension
        self.vectors_path = folder / "spool.f32"
        self.keys_path = folder / "spool.i64"
        # Held open for the whole build (closed by close()): a context manager cannot span the calls to append().
        self._vectors = open(self.vectors_path, "wb")  # noqa: SIM115
        self._keys = open(self.keys_path, "wb")  # noqa: SIM115
        self.count = 0

    def append(self, vectors: np.ndarray, keys: np.ndarray) -> None:
        """Append, flushed: a streamed build (``streamed``) reads what is written as it grows."""
        self._vectors.write(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
        self._keys.write(np.asarray(keys, dtype=np.int64).tobytes())
        self._vectors.flush()
        self._keys.flush()
        self.count += len(keys)

    def close(self) -> None:
        self._vectors.close()
        self._keys.close()

    def chunks(self, size: int = 16384, *, start: int = 0, stop: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(vectors, keys) of rows ``start`` to ``stop`` (default: all), ``size`` rows at a time."""
        with open(self.vectors_path, "rb") as vf, open(self.keys_path, "rb") as kf:
            vf.seek(start * self.dimension * 4)
            kf.seek(start * 8)
            left = (self.count if stop is None else stop) - start
            while left > 0:
                keys = np.frombuffer(kf.read(min(size, left) * 8), dtype=np.int64)
                left -= len(keys)
                if not len(keys):
                    return
                vectors = np.frombuffer(vf.read(len(keys) * self.dimension * 4), dtype=np.float32)
                yield vectors.reshape(len(keys), self.dimension), keys

    def sample(self, size: int, seed: int = 0, *, upto: int | None = None) -> np.ndarray:
        """Up to ``size`` random vectors (of the first ``upto``), read row by row (a memory map of the spool would count
        it all in the process's memory while mapped)."""
        count = self.count if upto is None else upto
        rows = np.sort(np.random.default_rng(seed).choice(count, min(size, count), replace=False))
        width = self.dimension * 4
        out = np.empty((len(rows), self.dimension), dtype=np.float32)
        with open(self.vectors_path, "rb") as f:
            for i, row in enumerate(rows.tolist()):
                f.seek(row * width)
                out[i] = np.frombuffer(f.read(width), dtype=np.float32)
        return out

    def remove(self) -> None:
        self.close()
        self.vectors_path.unlink(missing_ok=True)
        self.keys_path.unlink(missing_ok=True)
