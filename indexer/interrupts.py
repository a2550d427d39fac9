"""Ctrl-C during a write: taken at a safe point between batches, never inside a lock.

Python raises KeyboardInterrupt wherever the main thread happens to be, for
example inside a ``Future``'s condition lock; a thread pool's shutdown then
waits forever for a worker blocked on that lock (1 of 23 interrupted builds
hung so). Inside ``deferred()`` a first Ctrl-C is only recorded: the pipeline
calls ``check()`` between chunks and batches, which raises KeyboardInterrupt
there, so the write ends within a batch's time, its ``finally`` clauses run and
the lock is released. A second Ctrl-C ends the process at once (exit 130): the
kernel releases the lock, and the next write removes what was left in ``staging/``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C
_requested = threading.Event()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Take Ctrl-C (SIGINT) at the next ``check()`` rather than where it lands; in the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def record(signum: int, frame: object) -> None:
        if _requested.is_set():
            sys.stderr.write("indexer: interrupted again; stopping at once\n")
            sys.stderr.flush()
            os._exit(EXIT_CODE)
        _requested.set()

    previous = signal.signal(signal.SIGINT, record)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested.clear()


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed inside ``deferred()``."""
    if _requested.is_set():
        raise KeyboardInterrupt
