"""Parquet shards: what a distributed build passes between its stages.

A build on Ray writes its documents as ``documents/part-NNNNN.parquet``
(``key``, ``id``, ``text``, ``metadata`` as JSON), its workers write
``vectors/*.parquet`` (``key``, ``id``, ``vector`` as a plain
``fixed_size_list<float32>[dimension]``), and the index is assembled from
those. ``key`` is the document's SQLite key and its FAISS id. Needs pyarrow
(the ``ray`` extra).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DOCUMENTS = "documents"
VECTORS = "vectors"
KNOWN = "known-"  # vector shards the build already had (from its cache), not written by workers


def vector_table(keys: np.ndarray, ids: Sequence[str], vectors: np.ndarray):
    """A pyarrow table of (key, id, vector) with the vectors as ``fixed_size_list<float32>``."""
    import pyarrow as pa

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    return pa.table({"key": pa.array(keys, pa.int64()), "id": pa.array(list(ids), pa.string()), "vector": column})


def vectors_of(table) -> np.ndarray:
    """The ``vector`` column of a shard table as an (n, d) float32 array, without a copy where possible."""
    column = table.column("vector")
    if hasattr(column, "combine_chunks"):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


class ShardWriter:
    """Writes numbered Parquet shards of documents and of vectors into one folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        (self.folder / DOCUMENTS).mkdir(parents=True, exist_ok=True)
        (self.folder / VECTORS).mkdir(parents=True, exist_ok=True)
        self._documents = 0
        self._vectors = 0

    @property
    def documents_dir(self) -> Path:
        return self.folder / DOCUMENTS

    @property
    def vectors_dir(self) -> Path:
        return self.folder / VECTORS

    def write_documents(self, keys: np.ndarray, ids: Sequence[str], texts: Sequence[str], metadata: Sequence[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not len(keys):
            return
        table = pa.table(
            {
                "key": pa.array(keys, pa.int64()),
                "id": pa.array(list(ids), pa.string()),
                "text": pa.array(list(texts), pa.string()),
                "metadata": pa.array([json.dumps(m, ensure_ascii=False) for m in metadata], pa.string()),
            }
        )
        pq.write_table(table, self.documents_dir / f"part-{self._documents:05d}.parquet")
        self._documents += 1

    def write_vectors(self, keys: np.ndarray, ids: Sequence[str], vectors: np.ndarray) -> None:
        """A vector shard written here rather than by a worker (vectors the build already had)."""
        import pyarrow.parquet as pq

        if not len(keys):
            return
        pq.write_table(vector_table(keys, ids, vectors), self.vectors_dir / f"{KNOWN}{self._vectors:05d}.parquet")
        self._vectors += 1

    @property
    def documents_written(self) -> int:
        return self._documents


def vector_shards(folder: Path, batch_rows: int = 65536, known: bool = True) -> list[Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]]:
    """One callable per vector shard file (without ``known``: only those workers wrote), each yielding (vectors, keys) batches."""
    import pyarrow.parquet as pq

    def reader(path: Path) -> Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]:
        def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=["key", "vector"]):
                yield vectors_of(batch), batch.column("key").to_numpy()

        return batches

    return [reader(path) for path in sorted(Path(folder).rglob("*.parquet")) if known or not path.name.startswith(KNOWN)]
