"""The query module: embed questions, search the vectors, fetch the documents."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from .encoder import Encoder
from .errors import ArgumentError
from .store import DocumentStore
from .vectors import VectorIndex


@dataclass
class Hit:
    """One search result: the document's id, its cosine score, text and other fields."""

    id: str
    score: float
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def search_texts(
    encoder: Encoder,
    vectors: VectorIndex,
    store: DocumentStore,
    queries: Sequence[str],
    k: int = 10,
    **knobs: int | None,
) -> list[list[Hit]]:
    """Top-``k`` hits for each query, best first; all queries embedded in one batch.

    ``knobs`` are FAISS search parameters for this call (``nprobe``, ``efSearch``).
    """
    if k < 1:
        raise ArgumentError(f"k must be at least 1, got {k}")
    if not len(queries):
        return []
    return search_vectors(vectors, store, encoder.encode_texts(queries), k, **knobs)


def search_vectors(
    vectors: VectorIndex, store: DocumentStore, embedded: np.ndarray, k: int, **knobs: int | None
) -> list[list[Hit]]:
    """Top-``k`` hits for each row of ``embedded`` (unit query vectors)."""
    scores, keys = vectors.search(embedded, min(k, max(len(vectors), 1)), **knobs)
    rows = store.fetch(np.unique(keys[keys >= 0]).tolist())
    results = []
    for row_scores, row_keys in zip(scores.tolist(), keys.tolist()):
        hits = []
        for score, key in zip(row_scores, row_keys):
            doc = rows.get(key)
            if doc is not None:
                hits.append(Hit(doc["id"], float(score), doc["text"], doc["metadata"]))
        results.append(hits)
    return results
