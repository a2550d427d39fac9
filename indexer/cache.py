"""The embedding cache: vectors already computed, so rebuilds encode only what changed.

One SQLite file per index, ``cache.db``, table ``embeddings(key, vector, used)``.
The key is the hex SHA-256 of (model fingerprint, pooling, max length, text), so a
vector is reused only when the very same model would embed the very same text
the very same way. ``used`` is the number of the newest version that holds the
text; entries no kept version uses are pruned after each publish.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Sequence

import numpy as np
import sqlite_utils

TABLE = "embeddings"


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
    """Unit vectors by embedding key, in one SQLite file written only under the writer lock."""

    def __init__(self, path: str | Path, dimension: int):
        self.dimension = dimension
        self.db = sqlite_utils.Database(str(path))
        self.db.enable_wal()
        if TABLE not in self.db.table_names():
            self.db[TABLE].create({"key": str, "vector": bytes, "used": int}, pk="key")
            self.db[TABLE].create_index(["used"])

    def get(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached vectors among ``keys``, in one query."""
        if not keys:
            return {}
        wanted = json.dumps(list(keys))
        rows = self.db.execute(
            f"SELECT key, vector FROM {TABLE} WHERE key IN (SELECT value FROM json_each(?))", [wanted]
        ).fetchall()
        return {key: np.frombuffer(vector, dtype=np.float32) for key, vector in rows if len(vector) == 4 * self.dimension}

    def put(self, keys: Sequence[str], vectors: np.ndarray, used: int) -> None:
        rows = [(k, np.ascontiguousarray(v, dtype=np.float32).tobytes(), used) for k, v in zip(keys, vectors)]
        with self.db.conn:
            self.db.conn.executemany(f"INSERT OR REPLACE INTO {TABLE} (key, vector, used) VALUES (?, ?, ?)", rows)

    def mark_used(self, keys: Sequence[str], used: int) -> None:
        """Record that version number ``used`` holds these texts."""
        with self.db.conn:
            self.db.execute(
                f"UPDATE {TABLE} SET used = max(used, ?) WHERE key IN (SELECT value FROM json_each(?))",
                [used, json.dumps(list(keys))],
            )

    def prune(self, oldest_kept: int) -> int:
        """Drop entries that no version numbered ``oldest_kept`` or later uses."""
        with self.db.conn:
            return self.db.execute(f"DELETE FROM {TABLE} WHERE used < ?", [oldest_kept]).rowcount

    def __len__(self) -> int:
        return self.db.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]

    def close(self) -> None:
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError:
            pass
        self.db.conn.close()
