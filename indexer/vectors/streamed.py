"""A vector structure built in its own thread while a write streams, instead of after it.

The write appends each chunk's vectors to the spool (``spool``) and says so
(``wrote``). Once ``plan(count)`` names a structure (it waits until the
count makes the choice certain: ``faiss_index.streamed_structure``), the
thread trains it on a random sample of the vectors spooled so far and then
adds every spooled chunk as it arrives (an IVF: finds each vector's list,
and fills the lists at the end, each allocated once), on one core (the write's other
stages hold the GIL, not the cores: FAISS runs beside them). ``finish``
waits for the last chunks and gives the structure if it is the kind the
write settles on at its final count, else None: the caller then builds from
the spool after the stream, as without streaming.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import numpy as np

from .faiss_index import whole_vector_ivf
from .spool import VectorSpool

CHUNK_ROWS = 16384


class StreamedBuild:
    """A structure filled from ``spool`` in a thread as it grows; ``plan(count)`` names it once it is sure (else None)."""

    def __init__(self, spool: VectorSpool, plan: Callable[[int], str | None], create: Callable[[int, str], object]):
        self.spool, self.plan, self.create = spool, plan, create
        self.structure: str | None = None
        self.vectors = None
        self._available = 0
        self._closed = self._abandoned = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="ingest-structure", daemon=True)
        self._thread.start()

    def wrote(self, count: int) -> None:
        """The spool holds ``count`` vectors now (flushed)."""
        with self._changed:
            self._available = count
            self._changed.notify()

    def _wait(self, enough: Callable[[], bool]) -> bool:
        """Wait until ``enough()`` or the stream ends; False if abandoned."""
        with self._changed:
            while not (enough() or self._closed):
                self._changed.wait()
            return not self._abandoned

    def _run(self) -> None:
        try:
            import faiss

            faiss.omp_set_num_threads(1)  # this thread's parallel regions only (OpenMP's setting is per thread)
            if not self._wait(lambda: self.plan(self._available) is not None):
                return
            self.structure = self.plan(self._available)
            if self.structure is None:  # the stream ended first
                return
            vectors = self.create(self.spool.dimension, self.structure)
            if not vectors.is_trained:
                needed = vectors.training_sample()
                if not self._wait(lambda: self._available >= needed):
                    return
                vectors.train(self.spool.sample(needed, upto=self._available))
            # IVF over whole vectors: each chunk is assigned its lists as it arrives, and the lists are filled once
            # at the end, each allocated at its final size (``FaissIndex.fill_by_list``).
            by_list = getattr(vectors, "fills_by_list", False)
            assigned: list[np.ndarray] = []
            added = 0
            while True:
                with self._changed:
                    while self._available == added and not self._closed:
                        self._changed.wait()
                    if self._abandoned:
                        return
                    target, closed = self._available, self._closed
                if closed:  # the stream has ended: what is left goes on every core
                    faiss.omp_set_num_threads(os.cpu_count() or 1)
                for chunk, keys in self.spool.chunks(CHUNK_ROWS, start=added, stop=target):
                    if by_list:
                        assigned.append(vectors.assign(chunk))
                    else:
                        vectors.add(chunk, keys)
                    if self._abandoned:
                        return
                added = target
                if closed:
                    break
            if by_list:
                vectors.fill_by_list(self.spool.chunks(CHUNK_ROWS), np.concatenate(assigned) if assigned else np.empty(0, np.int64))
            self.vectors = vectors
        except BaseException as exc:  # raised where the write asks for the structure
            self._error = exc

    def finish(self, structure: str) -> object | None:
        """The filled structure if it is ``structure``'s kind (see ``same_kind``), else None. Raises the thread's error."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self.vectors is None or not same_kind(self.structure, structure):
            return None
        return self.vectors

    def abandon(self) -> None:
        """Stop the thread (a failed write); nothing is kept."""
        with self._changed:
            self._closed = self._abandoned = True
            self._changed.notify()
        self._thread.join()


def same_kind(streamed: str | None, final: str) -> bool:
    """Whether a structure built as ``streamed`` serves where ``final`` was chosen: the same string, or IVF lists
    over whole vectors both (the number of lists was fixed before the final count was known; tuning sets nprobe)."""
    if streamed is None:
        return False
    return streamed == final or (whole_vector_ivf(streamed) and whole_vector_ivf(final))

