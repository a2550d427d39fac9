"""Reading documents from JSONL, CSV/TSV, JSON and folders of .txt files.

Every reader yields :class:`Document` objects one at a time, so a corpus is
never held in memory as raw text and parsed records at once. JSONL, CSV and
text folders stream line by line; a ``.json`` file is a single value, so it is
parsed whole (prefer JSONL for large corpora). Any of the file formats may be
gzip-compressed (``corpus.jsonl.gz``).

Field defaults: the id is ``id``, else ``_id``, else the first field ending in
``_id``; the text is ``text``, else ``title`` and ``description`` joined with a
space. Defaults are settled on the first record and then hold for every record.
Every other field is kept as metadata.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import SourceError

ID_FIELDS = ("id", "_id")
TEXT_FIELDS = ("text",)
TITLE_FIELDS = ("title", "description")


ORIGINS = ("source", "upsert")


@dataclass
class Document:
    """One document: its own id, the text to embed, the other fields.

    ``fields`` holds the record's text fields as written (``text`` is them
    joined), so a document reads back as it came in. ``origin`` is "source"
    for documents read from the index's source by build or rebuild, "upsert"
    for documents added by upsert (kept across rebuilds, see build.py).
    """

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)
    origin: str = "source"


class DocumentSource:
    """The documents of a file or a folder of .txt files, read lazily.

    Iterating yields :class:`Document` objects and raises :class:`SourceError`
    naming the file and line on malformed input, a missing id or text field, an
    empty text or a duplicate id. After the first record, ``id_field`` and
    ``text_fields`` hold the fields actually used.
    """

    def __init__(self, path: str | Path, id_field: str | None = None, text_fields: Iterable[str] | None = None):
        self.path = Path(path)
        self.id_field = id_field
        self.text_fields = list(text_fields or [])
        if not self.path.exists():
            raise SourceError(f"{self.path}: no such file or folder")
        self.format = "folder" if self.path.is_dir() else source_format(self.path)

    def __iter__(self) -> Iterator[Document]:
        seen: set[str] = set()
        try:
            for where, record in read_records(self.path, self.format):
                doc = self._document(where, record)
                if doc.id in seen:
                    raise SourceError(f"{where}: duplicate id {doc.id!r}")
                seen.add(doc.id)
                yield doc
        except UnicodeDecodeError as exc:
            raise SourceError(f"{self.path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise SourceError(f"{self.path}: cannot read ({exc.strerror or exc})") from None

    def _settle(self, where: str, record: dict[str, Any]) -> None:
        if self.id_field is None:
            self.id_field = next((f for f in ID_FIELDS if f in record), None) or next(
                (f for f in record if f.endswith("_id")), None
            )
            if self.id_field is None:
                raise SourceError(f"{where}: no id field (looked for id, _id, *_id); name one with --id-field")
        if not self.text_fields:
            if any(f in record for f in TEXT_FIELDS):
                self.text_fields = [f for f in TEXT_FIELDS if f in record]
            else:
                self.text_fields = [f for f in TITLE_FIELDS if f in record]
            if not self.text_fields:
                raise SourceError(f"{where}: no text field (looked for text, title, description); name one with --text-field")

    def _document(self, where: str, record: Any) -> Document:
        if not isinstance(record, dict):
            raise SourceError(f"{where}: expected an object with fields, got {type(record).__name__}")
        if self.id_field is None or not self.text_fields:
            self._settle(where, record)
        doc_id = record.get(self.id_field)
        if doc_id is None or doc_id == "":
            raise SourceError(f"{where}: missing id field {self.id_field!r}")
        if isinstance(doc_id, (dict, list)):
            raise SourceError(f"{where}: id field {self.id_field!r} must be a string or number")
        parts = []
        for name in self.text_fields:
            if name not in record:
                raise SourceError(f"{where}: missing text field {name!r}")
            value = record[name]
            if value is not None and str(value).strip():
                parts.append(str(value).strip())
        if not parts:
            raise SourceError(f"{where}: empty text in field(s) {', '.join(self.text_fields)}")
        used = {self.id_field, *self.text_fields}
        metadata = {k: v for k, v in record.items() if k not in used}
        return Document(str(doc_id), " ".join(parts), metadata)


def read_records(path: Path, kind: str | None = None) -> Iterator[tuple[str, Any]]:
    """Raw records of a source with their location ("file:line"), any format."""
    kind = kind or ("folder" if path.is_dir() else source_format(path))
    readers = {
        "folder": _text_folder_records,
        "jsonl": _jsonl_records,
        "csv": _csv_records,
        "tsv": _tsv_records,
        "json": _json_records,
    }
    return readers[kind](path)


def source_format(path: Path) -> str:
    """The format of a source file, from its suffix (``.gz`` looked through)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    formats = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".json": "json"}
    if suffix not in formats:
        raise SourceError(
            f"{path}: unknown source format {suffix or '(no suffix)'!r}; use .jsonl, .csv, .tsv, .json or a folder of .txt files"
        )
    return formats[suffix]


def open_text(path: Path) -> io.TextIOBase:
    """A UTF-8 text stream of ``path``, gunzipped if it ends in .gz."""
    try:
        if path.suffix.lower() == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
        return open(path, encoding="utf-8", newline="")
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    with open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{path}:{number}: malformed JSON ({exc.msg}, column {exc.colno})") from None
            yield f"{path}:{number}", record


def _delimited_records(path: Path, delimiter: str) -> Iterator[tuple[str, Any]]:
    csv.field_size_limit(sys.maxsize)
    with open_text(path) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            for row in reader:
                if None in row:
                    raise SourceError(f"{path}:{reader.line_num}: more values than header fields")
                yield f"{path}:{reader.line_num}", row
        except csv.Error as exc:
            raise SourceError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def _csv_records(path: Path) -> Iterator[tuple[str, Any]]:
    return _delimited_records(path, ",")


def _tsv_records(path: Path) -> Iterator[tuple[str, Any]]:
    return _delimited_records(path, "\t")


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    with open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno})") from None
    if isinstance(data, list):
        for number, record in enumerate(data, 1):
            yield f"{path}: record {number}", record
    elif isinstance(data, dict):
        # An {id: text} map (a label file) or an {id: record} map.
        for key, value in data.items():
            record = dict(value) if isinstance(value, dict) else {"text": value}
            record.setdefault("id", key)
            yield f"{path}: key {key!r}", record
    else:
        raise SourceError(f"{path}: expected a list of records or an {{id: text}} object")


def _text_folder_records(path: Path) -> Iterator[tuple[str, Any]]:
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise SourceError(f"{path}: folder holds no .txt files")
    for file in files:
        relative = file.relative_to(path).as_posix()
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise SourceError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise SourceError(f"{file}: cannot read ({exc.strerror or exc})") from None
        yield str(file), {"id": relative[: -len(".txt")], "text": text, "path": relative}
