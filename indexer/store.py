"""The SQLite side of an index: one row per document, keyed by its FAISS id.

Table ``documents``: ``key`` (INTEGER PRIMARY KEY, equal to the vector's FAISS
id), ``id`` (the document's own id, unique), ``text`` and ``metadata`` (the
document's other fields as JSON). Written in WAL mode; a published version is
never written again, so readers open it with SQLite's ``immutable`` flag and
take no locks at all.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable, Sequence

import sqlite_utils

from .errors import IndexCorruptError

TABLE = "documents"


class DocumentStore:
    """Documents by FAISS key, in one SQLite file."""

    def __init__(self, db: sqlite_utils.Database):
        self.db = db
        self._lock = threading.Lock()

    @classmethod
    def create(cls, path: str | Path) -> "DocumentStore":
        """A new, empty store at ``path`` (which must not exist)."""
        db = sqlite_utils.Database(str(path))
        db.enable_wal()
        db[TABLE].create(
            {"key": int, "id": str, "text": str, "metadata": str},
            pk="key",
            not_null={"id", "text"},
        )
        db[TABLE].create_index(["id"], unique=True)
        return cls(db)

    @classmethod
    def open_readonly(cls, path: str | Path) -> "DocumentStore":
        """Open a published (immutable) store for reading, without locks."""
        path = Path(path)
        if not path.is_file():
            raise IndexCorruptError(f"{path}: document store is missing")
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?immutable=1", uri=True, check_same_thread=False)
        return cls(sqlite_utils.Database(conn))

    def add(self, keys: Sequence[int], ids: Sequence[str], texts: Sequence[str], metadata: Sequence[dict[str, Any]]) -> None:
        """Insert documents; ``keys[i]`` is the FAISS id of document ``ids[i]``."""
        rows = (
            {"key": int(k), "id": i, "text": t, "metadata": json.dumps(m, ensure_ascii=False)}
            for k, i, t, m in zip(keys, ids, texts, metadata)
        )
        self.db[TABLE].insert_all(rows, batch_size=1000)

    def fetch(self, keys: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Rows for ``keys`` as ``{key: {"id", "text", "metadata"}}``, in one query."""
        wanted = json.dumps([int(k) for k in keys])
        sql = f"SELECT key, id, text, metadata FROM {TABLE} WHERE key IN (SELECT value FROM json_each(?))"
        with self._lock:
            rows = self.db.execute(sql, [wanted]).fetchall()
        return {key: {"id": doc_id, "text": text, "metadata": json.loads(meta or "{}")} for key, doc_id, text, meta in rows}

    def count(self) -> int:
        with self._lock:
            return self.db.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close."""
        with self._lock:
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError:
                pass  # read-only (immutable) connections have no WAL to checkpoint
            self.db.conn.close()
