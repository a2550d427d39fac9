"""Parquet shards: what a Ray build hands its encoder replicas.

A build on Ray writes the texts it must encode as ``documents/part-NNNNN.parquet``
(``key``, ``text``); the replicas return (``key``, ``vector``) tables, the
vectors as a plain ``fixed_size_list<float32>[dimension]``, which stream
back into the segment. ``key`` is the document's SQLite key and its FAISS id.
Needs pyarrow (the ``ray`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

DOCUMENTS = "documents"


def vector_table(keys: np.ndarray, vectors: np.ndarray):
    """A pyarrow table of (key, vector) with the vectors as ``fixed_size_list<float32>``."""
    import pyarrow as pa

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    return pa.table({"key": pa.array(keys, pa.int64()), "vector": column})


def vectors_of(table) -> np.ndarray:
    """The ``vector`` column of a table as an (n, d) float32 array, without a copy where possible."""
    column = table.column("vector")
    if hasattr(column, "combine_chunks"):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


class ShardWriter:
    """Writes numbered Parquet shards of the documents to encode into one folder, ``rows`` documents a shard at most."""

    def __init__(self, folder: Path, rows: int):
        self.folder, self.rows = Path(folder), rows
        self.documents_dir.mkdir(parents=True, exist_ok=True)
        self.documents_written = 0

    @property
    def documents_dir(self) -> Path:
        return self.folder / DOCUMENTS

    def write_documents(self, keys: np.ndarray, texts: Sequence[str]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        for first in range(0, len(keys), self.rows):
            part = slice(first, first + self.rows)
            table = pa.table({"key": pa.array(keys[part], pa.int64()), "text": pa.array(list(texts[part]), pa.string())})
            pq.write_table(table, self.documents_dir / f"part-{self.documents_written:05d}.parquet")
            self.documents_written += 1
