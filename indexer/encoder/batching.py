"""Texts in batches by token length: each batch pads only to its own longest text, within a token budget."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

# Batches of at most this many texts are queries: on CUDA they replay a CUDA graph captured once per shape
# (one launch instead of a hundred small kernels launched from Python, most of a short query's time); on CPU
# they run on the number of threads measured fastest for one query at load.
QUERY_TEXTS = 4


def flatten(token_ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(all ids in one array, where each text starts, each text's length)."""
    lengths = np.fromiter((len(ids) for ids in token_ids), dtype=np.int64, count=len(token_ids))
    flat = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int64, count=int(lengths.sum()))
    return flat, np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths


def padded(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Input ids and attention mask ([texts, width], int64) of texts held as one flat id array (``flatten``), padded
    with ``pad_id`` to ``width``: one numpy gather."""
    columns = np.arange(width)
    attention_mask = (columns < lengths[:, None]).astype(np.int64)
    if not len(flat):
        return np.full(attention_mask.shape, pad_id, dtype=np.int64), attention_mask
    return np.where(attention_mask, flat[np.minimum(starts[:, None] + columns, len(flat) - 1)], pad_id), attention_mask


def length_batches(order: np.ndarray, lengths: np.ndarray, batch_size: int | None, batch_tokens: int | BatchBudget,
                   *, uniform: bool = False) -> Iterator[np.ndarray]:
    """Slices of ``order`` (indices sorted by length, longest first) of at most ``batch_size`` texts (None: no cap)
    and ``batch_tokens`` padded tokens (a ``BatchBudget`` is read again for every batch).

    With ``uniform``, a batch that would mix lengths ends where its first
    length does if that leaves it at least half full: a batch of one length
    needs no padding and no attention mask.
    """
    start = 0
    while start < len(order):
        width = int(lengths[order[start]])
        size = max(1, min(batch_size or len(order), int(batch_tokens) // max(width, 1)))
        end = min(start + size, len(order))
        if uniform:
            same = start + int(np.count_nonzero(lengths[order[start:end]] == width))  # longest first: a prefix
            end = same if 2 * (same - start) >= size else end
        yield order[start:end]
        start = end


class BatchBudget:
    """Padded tokens per forward pass: doubled from ``tokens`` up to ``limit`` while that measurably pays.

    Each budget is timed on the batches the encoder runs anyway (at least
    ``MEASURE_SECONDS`` of them); while real tokens per second improve by more
    than ``GAIN``, the budget doubles, else it goes back to the best one and
    stays. Small batches stay in the CPU's cache and suit a real model on a
    few cores; a tiny model or a GPU wants large ones. With ``limit`` equal to
    ``tokens`` (``batch_tokens`` given) it never changes.
    """

    MEASURE_SECONDS = 0.25
    GAIN = 1.05

    def __init__(self, tokens: int, *, limit: int):
        self.tokens, self.limit = tokens, max(limit, tokens)
        self.settled = self.tokens >= self.limit
        self._best: tuple[float, int] | None = None
        self._measured = [0, 0.0]

    def __int__(self) -> int:
        return self.tokens

    def record(self, tokens: int, seconds: float) -> None:
        """Note a forward pass of ``tokens`` real tokens that took ``seconds``."""
        if self.settled:
            return
        self._measured[0] += tokens
        self._measured[1] += seconds
        if self._measured[1] < self.MEASURE_SECONDS:
            return
        rate = self._measured[0] / self._measured[1]
        self._measured = [0, 0.0]
        if self._best is None or rate > self._best[0] * self.GAIN:
            self._best = (rate, self.tokens)
            if self.tokens * 2 <= self.limit:
                self.tokens *= 2
                return
        self.tokens, self.settled = self._best[1], True
