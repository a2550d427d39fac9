"""The embedding cache: vectors already computed, so rebuilds encode only what changed.

One SQLite file per index, ``cache.db``, table ``embeddings(key, vector, used)``.
The key is the hex SHA-256 of (model fingerprint, pooling, max length, text), so a
vector is reused only when the very same model would embed the very same text
the very same way. ``used`` is the number of the newest version that holds the
text; entries no kept version uses are pruned after each publish.

The cache is disposable: nothing published depends on it. A file SQLite calls
damaged or not a database is set aside as ``cache.db.broken`` and started
afresh (the texts are then encoded again); a cache that cannot be read or
written at all (an I/O error, a full disk under it) is left alone for the rest
of the write, which goes on without it; a cached vector that is not of unit
length is ignored. Each of these adds one line to ``warnings``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import sqlite_utils

TABLE = "embeddings"
BROKEN_SUFFIX = ".broken"
# SQLite's result codes for a damaged file and for a file that is no database at all.
DAMAGED_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
# ... and for a file that cannot be read or written just now.
UNUSABLE_CODES = {sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM}
UNIT_TOLERANCE = 1e-3


def embedding_keys(prefix: str, texts: Sequence[str]) -> list[str]:
    """Cache keys of ``texts`` under ``prefix`` (model fingerprint, pooling, max length)."""
    head = hashlib.sha256(prefix.encode())
    keys = []
    for text in texts:
        digest = head.copy()
        digest.update(text.encode())
        keys.append(digest.hexdigest())
    return keys


class EmbeddingCache:
    """Unit vectors by embedding key, in one SQLite file written only under the writer lock.

    ``warnings`` collects one line for each time the file had to be set aside.
    """

    def __init__(self, path: str | Path, dimension: int):
        self.path = Path(path)
        self.dimension = dimension
        self.warnings: list[str] = []
        self.usable = True
        self._lock = threading.RLock()
        self._safely(None, self._open)

    def _open(self) -> None:
        # The ingest pipeline looks vectors up in its reading thread and stores them in its writing thread.
        self.db = sqlite_utils.Database(sqlite3.connect(str(self.path), check_same_thread=False))
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
        """The cached vectors among ``keys``, in one query (only well-formed unit vectors)."""
        if not keys:
            return {}
        wanted = json.dumps(list(keys))
        sql = f"SELECT key, vector FROM {TABLE} WHERE key IN (SELECT value FROM json_each(?))"
        rows = self._safely([], lambda: self.db.execute(sql, [wanted]).fetchall())
        found = {key: np.frombuffer(vector, dtype=np.float32) for key, vector in rows if len(vector) == 4 * self.dimension}
        if found:
            norms = np.linalg.norm(np.stack(list(found.values())), axis=1)
            found = {key: v for (key, v), norm in zip(found.items(), norms) if abs(norm - 1.0) <= UNIT_TOLERANCE}
        return found

    def put(self, keys: Sequence[str], vectors: np.ndarray, used: int) -> None:
        # One statement, the vectors in one blob cut by substr: executemany takes the GIL back for every row,
        # which in the pipeline's writing thread waits on the other stages (see DocumentStore.add).
        if vectors.shape != (len(keys), self.dimension):
            raise ValueError(f"{len(keys)} keys and vectors of shape {vectors.shape} for a cache of dimension {self.dimension}")
        blob = np.ascontiguousarray(vectors, dtype=np.float32).tobytes()
        width = 4 * self.dimension
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

    def prune(self, oldest_kept: int) -> int:
        """Drop entries that no version numbered ``oldest_kept`` or later uses."""

        def delete() -> int:
            with self.db.conn:
                return self.db.execute(f"DELETE FROM {TABLE} WHERE used < ?", [oldest_kept]).rowcount

        return self._safely(0, delete)

    def __len__(self) -> int:
        return self._safely(0, lambda: self.db.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0])

    def close(self) -> None:
        if not hasattr(self, "db"):
            return
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.DatabaseError:
            pass
        self.db.conn.close()
