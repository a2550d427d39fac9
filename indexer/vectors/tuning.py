"""Recall of an approximate structure against exact search: what tuning its search knobs measures (no FAISS)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Tuning aims above the target so that queries unlike the tuning sample still reach it.
TUNING_RECALL = 0.97
TUNING_QUERIES = 256
# Rows a build reads from its spool at a time for tuning's exact neighbours (vectors.build_from_spool).
EXACT_ROWS = 4096


def midpoint_queries(sample: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Unit vectors near the middle of random pairs of sample vectors, plus noise.

    Real questions sit between documents rather than on them; the noise keeps
    the tuning from favouring points that are already in the index.
    """
    rng = np.random.default_rng(seed)
    a = sample[rng.integers(0, len(sample), count)]
    b = sample[rng.integers(0, len(sample), count)]
    noise = rng.normal(size=a.shape) / np.sqrt(a.shape[1])
    queries = (a + b + noise).astype(np.float32)
    queries /= np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    return queries


def exact_neighbours(queries: np.ndarray, chunks: Iterator[tuple[np.ndarray, np.ndarray]], k: int) -> np.ndarray:
    """Keys of the exact top-``k`` inner products, streaming over (vectors, keys) chunks."""
    count = len(queries)
    best_scores = np.full((count, k), -np.inf, dtype=np.float32)
    best_keys = np.full((count, k), -1, dtype=np.int64)
    for vectors, keys in chunks:
        scores = queries @ vectors.T
        floor = best_scores.min(axis=1)
        if np.isinf(floor).any():  # the first chunks: a partition of every score
            merged_scores = np.hstack([best_scores, scores])
            merged_keys = np.hstack([best_keys, np.broadcast_to(keys, scores.shape)])
            top = np.argpartition(-merged_scores, k - 1, axis=1)[:, :k]
            best_scores = np.take_along_axis(merged_scores, top, axis=1)
            best_keys = np.take_along_axis(merged_keys, top, axis=1)
            continue
        # Then only the few scores above each query's k-th best so far, merged with its k best by one sort.
        rows, columns = np.nonzero(scores > floor[:, None])
        if not len(rows):
            continue
        owners = np.concatenate([np.repeat(np.arange(count), k), rows])
        merged_scores = np.concatenate([best_scores.ravel(), scores[rows, columns]])
        merged_keys = np.concatenate([best_keys.ravel(), np.asarray(keys)[columns]])
        order = np.lexsort((-merged_scores, owners))
        take = order[(np.searchsorted(owners[order], np.arange(count))[:, None] + np.arange(k)).ravel()]
        best_scores, best_keys = merged_scores[take].reshape(count, k), merged_keys[take].reshape(count, k)
    return best_keys


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true top-k keys that ``found`` holds, averaged over queries."""
    hits = sum(len(np.intersect1d(f[f >= 0], t[t >= 0])) for f, t in zip(found, truth))
    return hits / max(int((truth >= 0).sum()), 1)
