"""The embedding cache: vectors already computed, so rebuilds encode only what changed.

A text's vector is named by the first 128 bits of SHA-256 of (model
fingerprint, pooling, max length, text) (``embedding_digests``), so a vector is
reused only when the very same model would embed the very same text the very
same way. It is looked for in two places, never stored in both:

* the segments that keep whole vectors (Flat, HNSW, IVF-Flat): each lists
  the digests of its documents' texts in ``hashes.npy``, and the vector is
  read back from its structure (``segments.HeldVectors``), proven by the
  segment's checksums. A build over 1M documents adds 16 MB of digests, not a
  second 1.5 GB copy of its vectors;
* ``cache.db`` (this module), table ``embeddings(key, vector, used)``, for
  what no such segment holds: the vectors of a segment whose structure keeps
  only codes (IVF-SQ8, IVF-PQ), those a Ray build encoded, and those a
  failed or interrupted write had encoded (put here as it ends, so the next
  try does not encode them again). ``used`` is the number of the newest
  segment that holds the text; entries no kept version uses are pruned
  after each publish.

The cache is disposable: nothing published depends on it. A file SQLite calls
damaged or not a database is set aside as ``cache.db.broken`` and started
afresh (the texts are then encoded again); a cache that cannot be read or
written at all (an I/O error, a full disk under it) is left alone for the rest
of the write, which goes on without it. Each of these adds one line to ``warnings``.

Every row is proven before its vector is used: the blob is the float32 vector
followed by an 8-byte check (``row_checks``) of the vector and its key, so a
flipped bit, a negated component or a vector moved to another text's row is
ignored (and encoded again, with one warning), never copied into a segment
under fresh checksums; so is a vector that is not of unit length. Rows written
before the check existed (4 bytes a dimension) are ignored the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TABLE = "embeddings"
BROKEN_SUFFIX = ".broken"
# SQLite's result codes for a damaged file and for a file that is no database at all.
DAMAGED_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
# ... and for a file that cannot be read or written just now.
UNUSABLE_CODES = {sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM}
UNIT_TOLERANCE = 1e-3


# Odd 64-bit multipliers, one per vector word, for ``row_checks`` (fixed: the checks are stored).
_MULTIPLIERS = np.random.default_rng(20261207).integers(0, 1 << 63, size=4096, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
CHECK_BYTES = 8
KEY_BYTES = 16  # of the SHA-256 that names a text's vector: collisions stay below 1e-20 at a billion texts


def row_checks(keys: Sequence[str], vectors: np.ndarray) -> np.ndarray:
    """One uint64 per row binding a vector to its key: a weighted sum (mod 2**64) of its float32 words, xor the key's
    first 64 bits. Any change to one word changes it (odd multipliers), as does a vector under another key."""
    words = np.ascontiguousarray(vectors, dtype=np.float32).view(np.uint32).astype(np.uint64)
    with np.errstate(over="ignore"):
        mixed = (words * np.resize(_MULTIPLIERS, words.shape[1])).sum(axis=1, dtype=np.uint64)
    heads = np.frombuffer(bytes.fromhex("".join(key[:16] for key in keys)), dtype=">u8").astype(np.uint64)
    return mixed ^ heads


def embedding_digests(prefix: str, texts: Sequence[str]) -> np.ndarray:
    """The first 128 bits of SHA-256(``prefix`` + text) of each text, as (n, 2) uint64: what names a vector in the
    cache and in a segment's ``hashes.npy`` (``prefix``: model fingerprint, pooling, max length)."""
    head = hashlib.sha256(prefix.encode())
    out = bytearray()
    for text in texts:
        digest = head.copy()
        digest.update(text.encode())
        out += digest.digest()[:KEY_BYTES]
    return np.frombuffer(bytes(out), dtype=">u8").reshape(len(texts), 2).astype(np.uint64)


def digest_keys(digests: np.ndarray) -> list[str]:
    """The cache keys (hex) of ``digests``."""
    hexed = np.ascontiguousarray(digests, dtype=np.uint64).astype(">u8").tobytes().hex()
    return [hexed[i : i + 2 * KEY_BYTES] for i in range(0, len(hexed), 2 * KEY_BYTES)]


def cache_holds_vectors(path: Path) -> bool:
    """Whether the cache file at ``path`` exists and holds at least one row (False if it cannot be read)."""
    if not path.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            return db.execute(f"SELECT 1 FROM {TABLE} LIMIT 1").fetchone() is not None
    except sqlite3.Error:
        return False


class EmbeddingCache:
    """Unit vectors by embedding key, in one SQLite file written only under the writer lock.

    ``warnings`` collects one line for each time the file had to be set aside.
    """

    def __init__(self, path: str | Path, dimension: int):
        self.path = Path(path)
        self.dimension = dimension
        self.warnings: list[str] = []
        self.usable = True
        self.rejected = 0
        self._lock = threading.RLock()
        self._safely(None, self._open)

    def _open(self) -> None:
        # The ingest pipeline looks vectors up in its reading thread and stores them in its writing thread.
        from .store import database  # sqlite_utils only here: searches import this module (segments) and must not pay for it

        self.db = database(sqlite3.connect(str(self.path), check_same_thread=False))
        self.db.enable_wal()
        # WAL with NORMAL never corrupts the file; a power cut may lose the last commits, which are only a cache's.
        self.db.execute("PRAGMA synchronous=NORMAL")
        if TABLE not in self.db.table_names():
            self.db[TABLE].create({"key": str, "vector": bytes, "used": int}, pk="key")
            self.db[TABLE].create_index(["used"])

    def _safely(self, default: Any, operation: Callable[[], Any]) -> Any:
        """Run ``operation``. A damaged file is set aside and the operation run again on a new one;
        an unusable one ends the cache's use for this write. Either way ``default`` stands in for a lost answer."""
        with self._lock:
            if not self.usable:
                return default
            try:
                return operation()
            except sqlite3.DatabaseError as exc:
                code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
                if code in DAMAGED_CODES and self._set_aside(exc):
                    return self._safely(default, operation)
                if code in DAMAGED_CODES | UNUSABLE_CODES:
                    self._give_up(exc)
                    return default
                raise

    def _set_aside(self, exc: sqlite3.DatabaseError) -> bool:
        """Move a damaged file out of the way and open a new one; False if that fails too."""
        if hasattr(self, "db"):
            self.db.conn.close()
        aside = self.path.with_name(self.path.name + BROKEN_SUFFIX)
        try:
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            self._open()
        except (OSError, sqlite3.DatabaseError):
            return False
        self.warnings.append(f"{self.path}: embedding cache unreadable ({exc}); set aside as {aside.name}, started a new one")
        return True

    def _give_up(self, exc: Exception) -> None:
        self.usable = False
        self.warnings.append(f"{self.path}: embedding cache unusable ({exc}); this write goes on without it")

    def get(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached vectors among ``keys``, in one query: only rows whose check holds and whose vector is of unit length."""
        if not keys:
            return {}
        wanted = json.dumps(list(keys))
        sql = f"SELECT key, vector FROM {TABLE} WHERE key IN (SELECT value FROM json_each(?))"
        rows = self._safely([], lambda: self.db.execute(sql, [wanted]).fetchall())
        width = 4 * self.dimension
        rows = [(key, blob) for key, blob in rows if isinstance(key, str) and isinstance(blob, bytes) and len(blob) == width + CHECK_BYTES]
        if not rows:
            return {}
        blobs = np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.uint8).reshape(len(rows), width + CHECK_BYTES)
        vectors = blobs[:, :width].copy().view(np.float32)
        stored = blobs[:, width:].copy().view("<u8").ravel()
        names = [key for key, _ in rows]
        try:
            sound = stored == row_checks(names, vectors)
        except ValueError:  # a key that is not hex: not a row this cache wrote
            sound = np.zeros(len(rows), dtype=bool)
        sound &= np.abs(np.linalg.norm(vectors, axis=1) - 1.0) <= UNIT_TOLERANCE
        if not sound.all():
            self.rejected += int((~sound).sum())
        return {key: vector for key, vector, ok in zip(names, vectors, sound) if ok}

    def report_rejected(self) -> None:
        """Add one warning for the rows ``get`` found damaged so far (they were encoded again or taken from a segment)."""
        if self.rejected:
            self.warnings.append(f"{self.path}: {self.rejected} cached vectors failed their check and were not used")
            self.rejected = 0

    def put(self, keys: Sequence[str], vectors: np.ndarray, used: int) -> None:
        # One statement, the vectors in one blob cut by substr: executemany takes the GIL back for every row,
        # which in the pipeline's writing thread waits on the other stages (see DocumentStore.add).
        if vectors.shape != (len(keys), self.dimension):
            raise ValueError(f"{len(keys)} keys and vectors of shape {vectors.shape} for a cache of dimension {self.dimension}")
        if not keys:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        rows = np.empty((len(keys), 4 * self.dimension + CHECK_BYTES), dtype=np.uint8)
        rows[:, : 4 * self.dimension] = vectors.view(np.uint8).reshape(len(keys), -1)
        rows[:, 4 * self.dimension :] = row_checks(keys, vectors).astype("<u8").view(np.uint8).reshape(len(keys), -1)
        blob = rows.tobytes()
        width = rows.shape[1]
        sql = (f"INSERT OR REPLACE INTO {TABLE} (key, vector, used) "
               "SELECT value, substr(?, key * ? + 1, ?), ? FROM json_each(?)")

        def insert() -> None:
            with self.db.conn:
                self.db.execute(sql, [blob, width, width, used, json.dumps(list(keys))])

        self._safely(None, insert)

    def mark_used(self, keys: Sequence[str], used: int) -> None:
        """Record that version number ``used`` holds these texts."""

        def update() -> None:
            with self.db.conn:
                self.db.execute(
                    f"UPDATE {TABLE} SET used = max(used, ?) WHERE key IN (SELECT value FROM json_each(?))",
                    [used, json.dumps(list(keys))],
                )

        self._safely(None, update)

    def release(self, used: int) -> None:
        """Drop the entries segment number ``used`` holds now: those its write found here (see ``SegmentWriter.seal``)."""

        def delete() -> None:
            with self.db.conn:
                self.db.execute(f"DELETE FROM {TABLE} WHERE used = ?", [used])

        self._safely(None, delete)

    def prune(self, oldest_kept: int) -> int:
        """Drop entries that no version numbered ``oldest_kept`` or later uses."""

        def delete() -> int:
            with self.db.conn:
                return self.db.execute(f"DELETE FROM {TABLE} WHERE used < ?", [oldest_kept]).rowcount

        return self._safely(0, delete)

    def __len__(self) -> int:
        return self._safely(0, lambda: self.db.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0])

    def close(self) -> None:
        self.report_rejected()
        if not hasattr(self, "db"):
            return
        with contextlib.suppress(sqlite3.DatabaseError):
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.conn.close()
