"""The query module: embed questions, search vectors and/or keywords, filter, fetch the documents.

Modes: ``dense`` (cosine of embeddings), ``keyword`` (SQLite FTS5 BM25 over
the words of the question) and ``hybrid``, which fuses the two top-100 lists:
by default by adding each list's scores min-max normalised to [0, 1]
("relative score fusion"), or by reciprocal rank fusion (``fusion="rrf"``).
Score fusion keeps how far ahead a rare exact term puts a document in BM25,
which rank fusion throws away; benchmarks/quality.py compares the two. Filters select documents by their fields before ranking, so
``k`` hits come back whenever ``k`` documents match.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from .encoder import Encoder
from .errors import ArgumentError
from .store import DocumentStore
from .vectors import VectorIndex

MODES = ("dense", "keyword", "hybrid")
FUSIONS = ("score", "rrf")
HYBRID_DEPTH = 100
RRF_K = 60
Condition = tuple[str, str, Any]


@dataclass
class Hit:
    """One search result: the document's id, its score, text and other fields.

    The score is the cosine similarity in dense mode, BM25 in keyword mode and
    the fused score in hybrid mode.
    """

    id: str
    score: float
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_condition(text: str) -> Condition:
    """``"price<=20"``, ``"category=books"``, ``"lang in en,de"`` -> (field, operator, value).

    Values that read as numbers are compared as numbers.
    """
    match = re.fullmatch(r"\s*([^=!<>\s]+)\s*(!=|<=|>=|=|<|>|\s+in\s+)\s*(.*?)\s*", text)
    if not match:
        raise ArgumentError(f"filter {text!r} is not FIELD=VALUE (or !=, <, <=, >, >=, FIELD in A,B)")
    name, operator, value = match.group(1), match.group(2).strip(), match.group(3)
    if operator == "in":
        return name, operator, [_typed(v.strip()) for v in value.split(",")]
    return name, operator, _typed(value)


def _typed(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def search_texts(
    encoder: Encoder,
    vectors: VectorIndex,
    store: DocumentStore,
    queries: Sequence[str],
    k: int = 10,
    mode: str = "dense",
    where: Sequence[Condition] | None = None,
    fusion: str = "score",
    **knobs: int | None,
) -> list[list[Hit]]:
    """Top-``k`` hits for each query, best first; all queries embedded in one batch.

    ``where`` holds (field, operator, value) filters; ``knobs`` are FAISS search
    parameters for this call (``nprobe``, ``efSearch``).
    """
    if k < 1:
        raise ArgumentError(f"k must be at least 1, got {k}")
    if mode not in MODES:
        raise ArgumentError(f"unknown search mode {mode!r}; choose one of {', '.join(MODES)}")
    if fusion not in FUSIONS:
        raise ArgumentError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
    if not len(queries):
        return []
    allowed = store.filter_keys(where) if where else None
    if allowed is not None and not len(allowed):
        return [[] for _ in queries]
    depth = max(k, HYBRID_DEPTH) if mode == "hybrid" else k
    if mode != "keyword":
        dense = dense_keys(vectors, encoder.encode_texts(queries), depth, allowed, knobs)
    if mode != "dense":
        keyword = [store.keyword_search(q, depth, allowed) for q in queries]
    if mode == "dense":
        ranked = dense
    elif mode == "keyword":
        ranked = keyword
    elif fusion == "rrf":
        ranked = [reciprocal_rank_fusion([d[0], w[0]], k) for d, w in zip(dense, keyword)]
    else:
        ranked = [relative_score_fusion([d, w], k) for d, w in zip(dense, keyword)]
    rows = store.fetch({key for keys, _ in ranked for key in keys[:k]})
    return [
        [Hit(rows[key]["id"], float(score), rows[key]["text"], rows[key]["metadata"]) for key, score in zip(keys[:k], scores[:k]) if key in rows]
        for keys, scores in ranked
    ]


def dense_keys(
    vectors: VectorIndex, embedded: np.ndarray, k: int, allowed: np.ndarray | None, knobs: dict[str, int | None]
) -> list[tuple[list[int], list[float]]]:
    """(keys, cosines) of the top-``k`` vectors per query, among ``allowed`` keys if given."""
    k = min(k, max(len(vectors), 1))
    scores, keys = vectors.search(embedded, k, allowed=allowed, **knobs)
    wanted = min(k, len(allowed)) if allowed is not None else k
    if allowed is not None and (keys >= 0).sum(axis=1).min() < wanted:
        # An approximate structure can miss rare matches: search those exhaustively.
        scores, keys = vectors.search(embedded, k, allowed=allowed, nprobe=1 << 30, efSearch=max(len(vectors), 16))
    return [(row_keys[row_keys >= 0].tolist(), row_scores[row_keys >= 0].tolist()) for row_scores, row_keys in zip(scores, keys)]


def relative_score_fusion(results: Sequence[tuple[list[int], list[float]]], k: int) -> tuple[list[int], list[float]]:
    """Keys ranked by the sum of their min-max normalised scores over ``results``; the top ``k``."""
    fused: dict[int, float] = {}
    for keys, scores in results:
        if not keys:
            continue
        low, high = min(scores), max(scores)
        for key, score in zip(keys, scores):
            fused[key] = fused.get(key, 0.0) + ((score - low) / (high - low) if high > low else 1.0)
    best = sorted(fused.items(), key=lambda item: -item[1])[:k]
    return [key for key, _ in best], [score for _, score in best]


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int, constant: int = RRF_K) -> tuple[list[int], list[float]]:
    """Keys ranked by the sum of 1 / (constant + rank) over ``rankings``; the top ``k``."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, key in enumerate(ranking, 1):
            fused[key] = fused.get(key, 0.0) + 1.0 / (constant + rank)
    best = sorted(fused.items(), key=lambda item: -item[1])[:k]
    return [key for key, _ in best], [score for _, score in best]

