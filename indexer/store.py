"""The SQLite side of an index: one row per document, keyed by its FAISS id.

Table ``documents``: ``key`` (INTEGER PRIMARY KEY, equal to the vector's FAISS
id), ``id`` (the document's own id, unique), ``text`` and ``metadata`` (the
document's other fields as JSON). ``documents_fts`` is an FTS5 full-text index
of ``text`` (external content, kept in step by triggers) for keyword search. Written in WAL mode; a published version is
never written again, so readers open it with SQLite's ``immutable`` flag and
take no locks at all.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import sqlite_utils

from .errors import ArgumentError, IndexCorruptError

TABLE = "documents"
KEYWORDS = "documents_fts"
FILTER_OPERATORS = ("=", "!=", "<", "<=", ">", ">=", "in")


class DocumentStore:
    """Documents by FAISS key, in one SQLite file."""

    def __init__(self, db: sqlite_utils.Database):
        self.db = db
        self._lock = threading.Lock()

    @classmethod
    def create(cls, path: str | Path) -> "DocumentStore":
        """A new, empty store at ``path`` (which must not exist)."""
        db = _open_writable(path)
        db[TABLE].create(
            {"key": int, "id": str, "text": str, "metadata": str},
            pk="key",
            not_null={"id", "text"},
        )
        db[TABLE].create_index(["id"], unique=True)
        db.executescript(
            f"""
            CREATE VIRTUAL TABLE {KEYWORDS} USING fts5(text, content='{TABLE}', content_rowid='key', tokenize='porter unicode61');
            CREATE TRIGGER {TABLE}_ai AFTER INSERT ON {TABLE} BEGIN
              INSERT INTO {KEYWORDS}(rowid, text) VALUES (new.key, new.text);
            END;
            CREATE TRIGGER {TABLE}_ad AFTER DELETE ON {TABLE} BEGIN
              INSERT INTO {KEYWORDS}({KEYWORDS}, rowid, text) VALUES ('delete', old.key, old.text);
            END;
            """
        )
        return cls(db)

    @classmethod
    def copy(cls, published: str | Path, path: str | Path) -> "DocumentStore":
        """A writable copy, at ``path``, of the published store ``published``."""
        shutil.copyfile(published, path)
        return cls(_open_writable(path))

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

    def keys_for_ids(self, ids: Sequence[str]) -> dict[str, int]:
        """``{id: key}`` for the given document ids that are present."""
        sql = f"SELECT id, key FROM {TABLE} WHERE id IN (SELECT value FROM json_each(?))"
        with self._lock:
            return dict(self.db.execute(sql, [json.dumps(list(ids))]).fetchall())

    def delete_keys(self, keys: Sequence[int]) -> None:
        with self._lock, self.db.conn:
            self.db.execute(f"DELETE FROM {TABLE} WHERE key IN (SELECT value FROM json_each(?))", [json.dumps([int(k) for k in keys])])

    def next_key(self) -> int:
        """A key above every key in use."""
        with self._lock:
            return (self.db.execute(f"SELECT max(key) FROM {TABLE}").fetchone()[0] or 0) + 1

    def keys(self) -> list[int]:
        with self._lock:
            return [row[0] for row in self.db.execute(f"SELECT key FROM {TABLE} ORDER BY key")]

    def key_texts(self, chunk: int = 10_000) -> Iterator[tuple[list[int], list[str]]]:
        """Every document's (key, text), in chunks of keys and texts."""
        cursor = self.db.execute(f"SELECT key, text FROM {TABLE} ORDER BY key")
        while rows := cursor.fetchmany(chunk):
            yield [row[0] for row in rows], [row[1] for row in rows]

    def content_digest(self) -> str:
        """SHA-256 of every (id, text, metadata), in id order: equal digests, equal content."""
        digest = hashlib.sha256()
        for row in self.db.execute(f"SELECT id, text, metadata FROM {TABLE} ORDER BY id"):
            digest.update(json.dumps(row, ensure_ascii=False).encode())
        return digest.hexdigest()

    def count_missing_in(self, other: str | Path) -> int:
        """How many document ids of the store file ``other`` are not in this one."""
        uri = f"{Path(other).resolve().as_uri()}?immutable=1"
        with self._lock:
            self.db.execute("ATTACH DATABASE ? AS other", [uri])
            try:
                sql = f"SELECT count(*) FROM other.{TABLE} WHERE id NOT IN (SELECT id FROM main.{TABLE})"
                return self.db.execute(sql).fetchone()[0]
            finally:
                self.db.execute("DETACH DATABASE other")

    def keyword_search(self, query: str, k: int, keys: np.ndarray | None = None) -> tuple[list[int], list[float]]:
        """Top-``k`` keys by BM25 for the words of ``query`` (any of them), best first, with scores.

        Every word is quoted, so FTS5 syntax in the query (quotes, ``*``, ``:``,
        ``-``, ``AND``, parentheses) is matched as text, never parsed.
        ``keys`` restricts the search to those documents.
        """
        words = re.findall(r"\w+", query)
        if not words:
            return [], []
        match = " OR ".join('"' + word + '"' for word in words)
        sql = f"SELECT {KEYWORDS}.rowid, bm25({KEYWORDS}) AS rank FROM {KEYWORDS} WHERE {KEYWORDS} MATCH ?"
        params: list[Any] = [match]
        if keys is not None:
            sql += f" AND {KEYWORDS}.rowid IN (SELECT value FROM json_each(?))"
            params.append(json.dumps(np.asarray(keys).tolist()))
        sql += " ORDER BY rank LIMIT ?"
        params.append(int(k))
        with self._lock:
            rows = self.db.execute(sql, params).fetchall()
        return [row[0] for row in rows], [-row[1] for row in rows]

    def filter_keys(self, conditions: Sequence[tuple[str, str, Any]]) -> np.ndarray:
        """Keys of the documents whose fields meet every ``(field, operator, value)``.

        ``field`` is ``id`` or a metadata field; operators are ``FILTER_OPERATORS``
        (``in`` takes a list). Field paths and values are bound parameters.
        """
        clauses, params = [], []
        for field_, operator, value in conditions:
            if operator not in FILTER_OPERATORS:
                raise ArgumentError(f"unknown filter operator {operator!r}; use one of {', '.join(FILTER_OPERATORS)}")
            column = "id" if field_ == "id" else "json_extract(metadata, ?)"
            if field_ != "id":
                params.append('$."' + field_.replace('"', '""') + '"')
            if operator == "in":
                clauses.append(f"{column} IN (SELECT value FROM json_each(?))")
                params.append(json.dumps(list(value)))
            else:
                clauses.append(f"{column} {operator} ?")
                params.append(value)
        sql = f"SELECT key FROM {TABLE}" + (" WHERE " + " AND ".join(clauses) if clauses else "")
        with self._lock:
            return np.fromiter((row[0] for row in self.db.execute(sql, params)), dtype=np.int64)

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


def _open_writable(path: str | Path) -> sqlite_utils.Database:
    # A URI connection, so that immutable stores of other versions can be ATTACHed read-only.
    conn = sqlite3.connect(Path(path).resolve().as_uri(), uri=True, check_same_thread=False)
    db = sqlite_utils.Database(conn)
    db.enable_wal()
    return db
