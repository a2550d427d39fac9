"""The SQLite side of an index: one row per document, keyed by its FAISS id.

Table ``documents``: ``key`` (INTEGER PRIMARY KEY, equal to the vector's FAISS
id), ``id`` (the document's own id, unique), ``text``, ``metadata`` (the
document's other fields as JSON), ``fields`` (its text fields as written, JSON)
and ``origin`` ("source" or "upsert": where the document came from; stores
written before these two columns existed read as fields ``{}``, origin "source"). ``documents_fts`` is an FTS5 full-text index
of ``text`` (external content) for keyword search, fed a chunk at a time
by ``add`` in the statement after the rows' (per-row triggers cost 2.5x as
much; format-1 stores still carry them), so that it is built while a write
streams, beside the other stages, and merged into one b-tree by ``finish``;
the unique index on ``id`` is made there too, in one sorted pass. A store is
written once, under staging/, without a journal (see ``_staging``); a
published version is never written again, so readers open it with SQLite's
``immutable`` flag and take no locks at all.
"""

from __future__ import annotations

import functools
import json
import queue
import re
import sqlite3
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import IndexCorruptError

if TYPE_CHECKING:
    import sqlite_utils

TABLE = "documents"
KEYWORDS = "documents_fts"
FILTER_OPERATORS = ("=", "!=", "<", "<=", ">", ">=", "in")
# A field name with a double quote cannot be quoted in an SQLite JSON path; control characters are never meant,
# and a lone surrogate cannot be passed to SQLite at all.
FIELD_NAME_FORBIDDEN = re.compile(r'["\x00-\x1f\x7f-\x9f\ud800-\udfff]')
# Ids bound per statement in id look-ups (SQLite allows 32,766 parameters since 3.32).
ID_BATCH = 500
# json_each/json_type's names for JSON types, and the kinds filters and field_types() speak of.
JSON_KINDS = {"integer": "number", "real": "number", "text": "text", "true": "boolean", "false": "boolean",
              "null": "null", "array": "array", "object": "object"}
KIND_SQL_TYPES = {"number": "'integer', 'real'", "text": "'text'", "boolean": "'true', 'false'"}
COLUMNS = ("key", "id", "text", "metadata", "fields", "origin")
KEYWORD_TOKENIZER = "porter unicode61"
# Bytes of strings one insert statement carries at most (one document over it goes alone): far below
# SQLite's limit of 1e9 bytes a value, far above what makes a statement's overhead count.
INSERT_BYTES = 64 * 2**20
FEEDER_DEPTH = 4  # chunks of rows waiting for the keyword index (see KeywordFeeder)


class DocumentStore:
    """Documents by FAISS key, in one SQLite file."""

    def __init__(self, db: sqlite_utils.Database | Reader):
        self.db = db
        self._lock = threading.Lock()
        self._keywords: KeywordFeeder | None = None  # a new store's (``create``)

    @classmethod
    def create(cls, path: str | Path) -> DocumentStore:
        """A new, empty store at ``path`` (which must not exist)."""
        db = _open_writable(path)
        db[TABLE].create(
            {"key": int, "id": str, "text": str, "metadata": str, "fields": str, "origin": str},
            pk="key",
            not_null={"id", "text", "origin"},
            defaults={"origin": "source"},
        )
        db.execute(f"CREATE VIRTUAL TABLE {KEYWORDS} USING fts5(text, content='{TABLE}', content_rowid='key', tokenize='{KEYWORD_TOKENIZER}')")
        # Fewer merges while chunks stream in; ``finish`` merges everything once.
        db.execute(f"INSERT INTO {KEYWORDS}({KEYWORDS}, rank) VALUES('automerge', 16)")
        store = cls(db)
        store._keywords = KeywordFeeder(path)
        return store

    def rows_written(self) -> None:
        """Every row of a new store is in: its keyword index, once complete, merges into one b-tree (what searches
        read fastest) in its own thread, beside what the caller does next (``finish`` waits for it)."""
        if self._keywords is not None:
            self._keywords.end()

    def finish(self) -> None:
        """Make a new store ready to publish, once every row is in: the keyword index complete and merged
        (``rows_written``), and the unique index on ids (sources refuse a repeated id as they read)."""
        if self._keywords is not None:
            self._keywords.close()
            self._keywords = None
        with self._lock, self.db.conn:
            self.db.execute(f"CREATE UNIQUE INDEX idx_{TABLE}_id ON {TABLE} (id)")

    @classmethod
    def open_readonly(cls, path: str | Path) -> DocumentStore:
        """Open a published (immutable) store for reading, without locks."""
        path = Path(path)
        if not path.is_file():
            raise IndexCorruptError(f"{path}: document store is missing")
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?immutable=1", uri=True, check_same_thread=False)
        return cls(Reader(conn))

    def add(self, keys: Sequence[int], documents: Sequence[Any]) -> None:
        """Insert documents (objects with ``id``, ``text``, ``metadata``, ``fields``, ``origin``); ``keys[i]`` is the FAISS id of ``documents[i]``."""
        if not documents:
            return
        # Statements of about INSERT_BYTES of strings each (see _insert_sql), not executemany: that takes the GIL back
        # for every row, and in the pipeline's writing thread each of those waits on the other stages (60k Debian
        # documents: 2.5 s, not 0.6 s).
        strings = ([d.id for d in documents], [d.text for d in documents],
                   [json.dumps(d.metadata, ensure_ascii=False) if d.metadata else "{}" for d in documents],
                   [fields_json(d.text, d.fields) for d in documents], [d.origin for d in documents])
        # A column with one value in every row (no metadata, one text field, all from the source: the usual case)
        # binds once, not as a run of row offsets: a third of the statement's work.
        shared = tuple(n > 1 and column.count(column[0]) == len(column) for n, column in enumerate(strings))
        encoded = [list(map(str.encode, column)) for column, one in zip(strings, shared) if not one]
        lengths = np.array([np.fromiter(map(len, column), dtype=np.int64, count=len(documents)) for column in encoded],
                           dtype=np.int64).reshape(len(encoded), len(documents))
        constants = [column[0] for column, one in zip(strings, shared) if one]
        keys = np.asarray(keys, dtype=np.int64)
        sizes = lengths.sum(axis=0)
        groups = (np.cumsum(sizes) - sizes) // INSERT_BYTES
        bounds = [0, *(np.flatnonzero(np.diff(groups)) + 1).tolist(), len(documents)]
        sql = _insert_sql(shared)
        if self._keywords is not None:  # a failed feeder's error first: its rollback left the file as it stood
            self._keywords.raise_error()
        with self._lock, self.db.conn:
            for first, last in zip(bounds, bounds[1:]):
                columns = [c[first:last] for c in encoded]
                self.db.execute(sql, [*_insert_values(keys[first:last], columns, lengths[:, first:last]), *constants])
        if self._keywords is not None:
            self._keywords.index(keys)
        else:
            with self._lock, self.db.conn:
                self.db.execute(_INDEX_KEYWORDS, [json.dumps(keys.tolist())])

    def fetch(self, keys: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Rows for ``keys`` as ``{key: {"id", "text", "metadata", "fields", "origin"}}``, in one query."""
        wanted = json.dumps([int(k) for k in keys])
        sql = f"SELECT {self._columns} FROM {TABLE} WHERE key IN (SELECT value FROM json_each(?))"
        with self._lock:
            rows = self.db.execute(sql, [wanted]).fetchall()
        return {row[0]: _row(row) for row in rows}

    @functools.cached_property
    def _columns(self) -> str:
        # Stores written before fields/origin existed are read with their defaults.
        present = self._present_columns()
        defaults = {"fields": "'{}'", "origin": "'source'"}
        return ", ".join(c if c in present else f"{defaults[c]} AS {c}" for c in COLUMNS)

    def _present_columns(self) -> set[str]:
        return {row[1] for row in self.db.execute(f"PRAGMA table_info({TABLE})")}

    def keys_for_ids(self, ids: Sequence[str]) -> dict[str, int]:
        """``{id: key}`` for the given document ids that are present."""
        return {doc_id: key for doc_id, key in self._select_by_ids("id, key", ids)}

    def keys(self) -> np.ndarray:
        """Every key, sorted."""
        with self._lock:
            return np.fromiter((row[0] for row in self.db.execute(f"SELECT key FROM {TABLE} ORDER BY key")), dtype=np.int64)

    def keys_of_origin(self, origin: str) -> np.ndarray:
        with self._lock:
            rows = self.db.execute(f"SELECT key FROM {TABLE} WHERE {self._origin} = ?", [origin])
            return np.fromiter((row[0] for row in rows), dtype=np.int64)

    @functools.cached_property
    def _origin(self) -> str:
        return "origin" if "origin" in self._present_columns() else "'source'"

    def raw_rows_for_ids(self, ids: Sequence[str]) -> dict[str, list[tuple]]:
        """``{id: [(key, text, metadata JSON, fields JSON, origin), ...]}`` for the ids present, as stored."""
        found: dict[str, list[tuple]] = {}
        for doc_id, text, metadata, fields, origin, key in self._select_by_ids(f"id, {self._columns.split(', ', 2)[2]}, key", ids):
            found.setdefault(doc_id, []).append((key, text, metadata or "{}", fields or "{}", origin))
        return found

    def _select_by_ids(self, columns: str, ids: Sequence[str]) -> list[tuple]:
        """Rows (``columns``) whose id is exactly one of ``ids``.

        Ids are bound one parameter each, not passed through ``json_each``: SQLite's JSON functions cut a
        string at NUL, so ``"a\\u0000b"`` would match the document ``"a"``. Rows are checked again in
        Python so that no comparison SQLite makes looser than ``==`` can widen the match.
        """
        wanted = list(dict.fromkeys(str(i) for i in ids))
        exact = set(wanted)
        rows: list[tuple] = []
        with self._lock:
            for first in range(0, len(wanted), ID_BATCH):
                batch = wanted[first : first + ID_BATCH]
                sql = f"SELECT {columns} FROM {TABLE} WHERE id IN ({', '.join('?' * len(batch))})"
                rows += [row for row in self.db.execute(sql, batch) if row[0] in exact]
        return rows

    def rows(self, chunk: int = 4096) -> Iterator[tuple[np.ndarray, list[dict[str, Any]]]]:
        """Every document as (keys, rows) chunks, in key order."""
        cursor = self.db.execute(f"SELECT {self._columns} FROM {TABLE} ORDER BY key")
        while batch := cursor.fetchmany(chunk):
            yield np.fromiter((row[0] for row in batch), dtype=np.int64, count=len(batch)), [_row(row) for row in batch]

    def token_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, keyword tokens per document), sorted by key: what BM25 calls document length.

        Read from FTS5's own ``docsize`` table, one SQLite varint per document,
        decoded with numpy.
        """
        with self._lock:
            rows = self.db.execute(f"SELECT id, sz FROM {KEYWORDS}_docsize ORDER BY id").fetchall()
        keys = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
        return keys, decode_varints([row[1] for row in rows])

    def postings(self, terms: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """For each keyword term (as FTS5 indexes it) that some document holds, the keys of those documents and how often."""
        found = {}
        with self._lock:
            if not getattr(self, "_vocabulary", False):
                # A temp table: published stores are opened immutable, but the temp schema is always writable.
                self.db.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.{KEYWORDS}_terms USING fts5vocab(main, {KEYWORDS}, instance)")
                self._vocabulary = True
            for term in terms:
                rows = self.db.execute(f"SELECT doc FROM temp.{KEYWORDS}_terms WHERE term = ?", [term]).fetchall()
                if rows:  # most terms are absent from a small segment: no numpy work for those
                    found[term] = np.unique(np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows)), return_counts=True)
        return found

    def field_types(self) -> dict[str, set[str]]:
        """Each top-level metadata field, with the kinds of JSON value it holds across the documents.

        Kinds: ``number``, ``text``, ``boolean``, ``null``, ``array``,
        ``object``; ``id`` (a column, always text) is not listed. One SQL
        statement over every document's metadata, remembered until the store
        changes: a published (immutable) store never does, and a writable one
        is read again after any write, by this connection or another.
        """
        with self._lock:
            # data_version moves with other connections' commits, total_changes with this one's writes.
            state = (self.db.execute("PRAGMA data_version").fetchone()[0], self.db.conn.total_changes)
            cached = getattr(self, "_field_types", None)
            if cached is None or cached[0] != state:
                sql = (f"SELECT field.key, field.type FROM {TABLE}, json_each({TABLE}.metadata) AS field "
                       "WHERE field.key IS NOT NULL GROUP BY field.key, field.type")
                found: dict[str, set[str]] = {}
                for name, json_type in self.db.execute(sql):
                    found.setdefault(str(name), set()).add(JSON_KINDS[json_type])
                cached = self._field_types = (state, found)
        return {name: set(kinds) for name, kinds in cached[1].items()}

    def filter_keys(self, filters: Sequence[Filter]) -> np.ndarray:
        """Keys of the documents whose fields meet every filter (made by ``query.typed_conditions``, which checks
        them: this only turns them into SQL).

        A number compares only with fields holding JSON numbers, a str only
        with text, a bool only with true/false, so nothing matches across
        types; a document without the field meets no condition, ``!=``
        included (SQL's NULL). Integers beyond 64 bits compare as floats.
        Operators come from a fixed table; field paths and values are bound parameters.
        """
        clauses: list[str] = []
        params: list[Any] = []
        for where in filters:
            operator = _SQL_OPERATORS[where.operator]
            by_kind: dict[str, list[Any]] = {}
            for value in where.values:
                kind, bound = _bindable(value)
                by_kind.setdefault(kind, []).append(bound)
            path = None if where.field == "id" else '$."' + where.field + '"'  # no quote in the name (the check)
            alternatives = []
            for kind, values in by_kind.items():
                if path is None:
                    if kind != "text":
                        continue  # ids are text
                    alternative, column = "", "id"
                else:
                    alternative, column = f"json_type(metadata, ?) IN ({KIND_SQL_TYPES[kind]}) AND ", "json_extract(metadata, ?)"
                    params += [path, path]
                if where.operator == "in":
                    alternatives.append(f"({alternative}{column} IN (SELECT value FROM json_each(?)))")
                    params.append(self._json_list(values))
                else:
                    alternatives.append(f"({alternative}{column} {operator} ?)")
                    params.append(values[0])
            clauses.append("(" + " OR ".join(alternatives) + ")" if alternatives else "0")
        sql = f"SELECT key FROM {TABLE}" + (" WHERE " + " AND ".join(clauses) if clauses else "")
        with self._lock:
            return np.fromiter((row[0] for row in self.db.execute(sql, params)), dtype=np.int64)

    @staticmethod
    def _json_list(values: Sequence[Any]) -> str:
        """``values`` as a JSON array for json_each; infinities as 9e999, which SQLite reads as such."""
        return "[" + ",".join("9e999" if v == float("inf") else "-9e999" if v == float("-inf") else json.dumps(v) for v in values) + "]"

    def count(self) -> int:
        with self._lock:
            return self.db.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]

    def close(self) -> None:
        if self._keywords is not None:  # a store given up before it was finished
            self._keywords.close(abandon=True)
            self._keywords = None
        with self._lock:
            self.db.conn.close()


class KeywordFeeder:
    """Feeds a new store's FTS5 keyword index in a thread of its own, on a connection of its own, a chunk of
    committed rows at a time (``index``), so that the write stage's thread goes on with the next chunk meanwhile.

    The two connections take SQLite's write lock in turn (a busy timeout);
    neither holds the GIL while SQLite works, so on a write of 1M documents
    the keyword index costs the write stage almost nothing of its 15 s. At
    most ``FEEDER_DEPTH`` chunks wait. After the last (``end``) it merges the
    index while the segment's structure is finished. The first error is
    raised by the next ``index`` or by ``close``.
    """

    def __init__(self, path: str | Path):
        self._conn = _staging(sqlite3.connect(str(path), check_same_thread=False, timeout=600, isolation_level=None))
        self._queue: queue.Queue[str | None] = queue.Queue(FEEDER_DEPTH)
        self._error: BaseException | None = None
        self._abandoned = self._ended = False
        self._thread = threading.Thread(target=self._run, name="ingest-keywords", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (keys := self._queue.get()) is not None:
            self._write(_INDEX_KEYWORDS, [keys])
        self._write(f"INSERT INTO {KEYWORDS}({KEYWORDS}) VALUES('optimize')", [])  # the last chunk is in (``end``)

    def _write(self, sql: str, parameters: list) -> None:
        if self._error is not None or self._abandoned:
            return
        try:
            with self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.execute(sql, parameters)
        except BaseException as exc:  # raised in the write stage's thread
            self._error = exc

    def index(self, keys: np.ndarray) -> None:
        """Index the keyword text of these committed rows (soon, in the thread)."""
        self.raise_error()
        self._queue.put(json.dumps(np.asarray(keys).tolist()))

    def raise_error(self) -> None:
        """Raise the thread's first error, if it met one."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def end(self) -> None:
        """No more chunks: once the last is indexed, the thread merges the index (SQLite's ``optimize``) and ends."""
        if not self._ended:
            self._ended = True
            self._queue.put(None)

    def close(self, *, abandon: bool = False) -> None:
        """Wait for the chunks queued and the merge (neither if ``abandon``), end the thread and its connection;
        raise its error."""
        self._abandoned = abandon
        self.end()
        self._thread.join()
        self._conn.close()
        if not abandon:
            self.raise_error()


class Reader:
    """What reading needs of ``sqlite_utils.Database``: a connection and ``execute``. A search process then never
    imports sqlite_utils, which imports pandas where it is installed (0.3 s of a one-question process)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, parameters)


def decode_varints(blobs: Sequence[bytes]) -> np.ndarray:
    """One SQLite varint (big-endian, 7 bits a byte, high bit set on all but the last) per blob, as int64."""
    if not blobs:
        return np.empty(0, dtype=np.int64)
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8).astype(np.int64)
    ends = np.cumsum([len(b) for b in blobs]) - 1
    starts = np.concatenate([[0], ends[:-1] + 1])
    # Each byte's place counted from the end of its varint decides its shift.
    owner = np.repeat(np.arange(len(blobs)), np.diff(np.concatenate([starts, [len(data)]])))
    place = ends[owner] - np.arange(len(data))
    return np.bincount(owner, weights=(data & 0x7F) << (7 * place), minlength=len(blobs)).astype(np.int64)


@dataclass(frozen=True)
class Filter:
    """One filter condition as ``query.typed_conditions`` checked it: ``field`` is ``id`` or a top-level metadata
    field (empty of what ``FIELD_NAME_FORBIDDEN`` matches), ``operator`` one of ``FILTER_OPERATORS``, ``values``
    numbers, str or bools (one, or the list ``in`` takes)."""

    field: str
    operator: str
    values: tuple[Any, ...]


_SQL_OPERATORS = {operator: operator for operator in FILTER_OPERATORS}  # SQL text from this table, never from a caller


def _bindable(value: Any) -> tuple[str, Any]:
    """(kind, value to bind) of one checked filter value: booleans as 0/1, integers beyond SQLite's 64 bits as floats."""
    if isinstance(value, bool):
        return "boolean", int(value)
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        try:
            return "number", float(value)
        except OverflowError:
            return "number", float("inf") if value > 0 else float("-inf")
    return ("text", value) if isinstance(value, str) else ("number", value)


def _row(row: Sequence[Any]) -> dict[str, Any]:
    _, doc_id, text, metadata, fields, origin = row
    return {"id": doc_id, "text": text, "metadata": json.loads(metadata or "{}"), "fields": read_fields(text, fields), "origin": origin}


def fields_json(text: str, fields: dict[str, Any]) -> str:
    """How a document's text fields are stored: a JSON object; or, where the one text field is the whole text (a
    source with one text field), since index format 3 that field's name alone, as a JSON string: the text is not
    stored twice, nor escaped into JSON a document at a time."""
    if len(fields) == 1:
        ((name, value),) = fields.items()
        if value == text and isinstance(value, str):
            return _name_json(name)
    return json.dumps(fields, ensure_ascii=False)


def read_fields(text: str, stored: str | None) -> dict[str, Any]:
    """The text fields of a document stored with ``fields_json`` (or before the column existed: none)."""
    fields = json.loads(stored or "{}")
    return {fields: text} if isinstance(fields, str) else fields


_name_json = functools.lru_cache(maxsize=256)(functools.partial(json.dumps, ensure_ascii=False))


@functools.lru_cache(maxsize=8)
def _insert_sql(shared: tuple[bool, ...]) -> str:
    """The statement inserting a chunk of rows, where ``shared[i]`` says column ``i + 1`` (id, text, metadata,
    fields, origin) has one value in every row.

    Each other column's values are bound as one parameter, UTF-8 bytes end to end, cut by substr (which counts
    bytes in a blob, so a NUL character survives, as it would not through JSON; an empty blob binds as NULL, hence
    ifnull); then the rows as JSON [key, start, length, ...] (a start and length for each such column); then each
    shared column's one value.
    """
    rows = shared.count(False) + 1  # the parameter holding the rows' JSON; the shared values follow it
    values, cut, constant = [], 0, rows
    for one in shared:
        if one:
            constant += 1
            values.append(f"?{constant}")
        else:
            cut += 1
            values.append(f"ifnull(CAST(substr(?{cut}, json_extract(value, '$[{2 * cut - 1}]'), "
                          f"json_extract(value, '$[{2 * cut}]')) AS TEXT), '')")
    return (f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) SELECT json_extract(value, '$[0]'), {', '.join(values)} "
            f"FROM json_each(?{rows})")


_INDEX_KEYWORDS = (f"INSERT INTO {KEYWORDS}(rowid, text) SELECT key, text FROM {TABLE} "
                   "WHERE key IN (SELECT value FROM json_each(?))")


def _insert_values(keys: np.ndarray, columns: list[list[bytes]], lengths: np.ndarray) -> list:
    """The row parameters of ``_insert_sql`` for rows with these ``keys``, string ``columns`` and their ``lengths`` (a row each)."""
    rows = np.empty((len(keys), 1 + 2 * len(columns)), dtype=np.int64)
    rows[:, 0] = keys
    rows[:, 1::2] = (np.cumsum(lengths, axis=1) - lengths + 1).T
    rows[:, 2::2] = lengths.T
    return [*(b"".join(column) for column in columns), json.dumps(rows.tolist())]


def import_sqlite_utils():
    """The sqlite_utils module, imported without pandas where that is safe.

    sqlite_utils imports pandas where it is installed (Ray's data extra brings
    it), only to accept DataFrames, which nothing here gives it: 0.25 s and
    70 MB of every write process (at 1M documents, a twentieth of the peak).
    So while this is the process's only thread (none other can be importing
    pandas or asking whether it is installed), pandas reads as missing during
    sqlite_utils' import; elsewhere (a server's worker, an application's
    thread) sqlite_utils is imported as it is. A first build imports it before
    its read-ahead thread starts.
    """
    if "sqlite_utils" not in sys.modules and "pandas" not in sys.modules and threading.active_count() == 1:
        sys.modules["pandas"] = None  # type: ignore[assignment]  # the import system's "not installed"
        try:
            import sqlite_utils
        finally:
            del sys.modules["pandas"]
    import sqlite_utils

    return sqlite_utils


def database(conn: sqlite3.Connection) -> sqlite_utils.Database:
    """``sqlite_utils.Database(conn)`` (see ``import_sqlite_utils``)."""
    return import_sqlite_utils().Database(conn)


def _open_writable(path: str | Path) -> sqlite_utils.Database:
    # Waits for the keyword feeder's connection (KeywordFeeder), which holds the write lock for a chunk at a time.
    conn = sqlite3.connect(Path(path).resolve().as_uri(), uri=True, check_same_thread=False, timeout=600)
    return database(_staging(conn))


def _staging(conn: sqlite3.Connection) -> sqlite3.Connection:
    """A connection to a new store, which nothing reads until it is sealed.

    Sealing fsyncs every file, so commits need not wait for the disk. And a
    store is never used after a failed statement: any error fails its write,
    whose staging folder is then removed whole, so it keeps no journal at all
    (a rollback leaves the file as the statement left it). Every page is
    written once (WAL wrote it twice, to the log and back): 0.90x the wall
    time of a 200k-document build with a free encoder. A journal in memory
    would hold the pages FTS5's final merge rewrites: 190 MB more at the peak
    of a 1M-document build.
    """
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    return conn
