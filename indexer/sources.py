"""Reading documents from JSONL, CSV/TSV, JSON and folders of text files (.txt, .md, .markdown, .rst).

Every reader yields :class:`Document` objects one at a time, so a corpus is
never held in memory as raw text and parsed records at once. JSONL, CSV and
text folders stream line by line; a ``.json`` file is a single value, so it is
parsed whole (prefer JSONL for large corpora). Any of the file formats may be
gzip-compressed (``corpus.jsonl.gz``).

Field defaults: the id is ``id``, else ``_id``, else the first field ending in
``_id``; the text is ``text``, else ``title`` and ``description`` joined with a
space. Defaults are settled on the first record and then hold for every record.
Every other field is kept as metadata. An id holding a control character
(NUL, a line break, a tab, DEL...) is refused: SQLite's JSON functions cut a
string at NUL, and a line break in an id breaks every line-based output.

In a folder, each text file is a document whose id is its path less the
suffix. Empty (or blank) files and files of other types are skipped; the
source's ``warnings`` then say how many, and why.

Every text format is read as UTF-8 with an optional byte-order mark (what
spreadsheets export), gzipped or not. Repeated keys in a JSON object are
refused (a repeated top-level key of a ``.json`` object is a duplicate id), as
json would silently keep the last.

Text field values: a string; a number or boolean, written as JSON writes it
(``12.5``, ``true``); or a list of those, joined with a space (paragraphs,
tags). An object, or a list holding anything else, is refused. A document's
``fields`` keeps the text fields as written (a list stays a list). A record
whose text and metadata (as stored: JSON) are over ``max_document_bytes``
UTF-8 bytes together is refused: only the model's first few hundred tokens are
embedded, and a 50 MB "document" is usually a mistake. (``fields`` is not
counted again: it is the text as written.)

Metadata may nest lists and objects at most ``MAX_NESTING`` levels deep, so
that nothing downstream (JSON encoding, filters) recurses without bound.

CSV and TSV values are all text, so each metadata column gets a type from a
first pass over the file, as ``sqlite-utils insert --csv --detect-types``
does: integer if every non-empty value is ``-?(0|[1-9][0-9]*)``, float if every
non-empty value is a finite plain decimal (optional minus, digits, one dot,
optional exponent; no ``nan``/``inf``), else text. "007" or "+5" keeps a
column text, so codes keep their leading zeros, and so does a value of more
than 18 integer digits (a code: it would not fit 64 bits, a float would round
it). Empty cells of a numeric column become null; of a text column they stay
"". The id and text fields are never converted.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SourceError
from .settings import MAX_DOCUMENT_BYTES

ID_FIELDS = ("id", "_id")
TEXT_FIELDS = ("text",)
TITLE_FIELDS = ("title", "description")
# Deepest nesting of lists and objects allowed in a metadata value (a flat list is 1).
MAX_NESTING = 64
# CSV/TSV type detection (see the module docstring). At most 18 integer digits, so
# integers fit 64 bits (SQLite's) and no long code becomes a rounded float.
INTEGER = re.compile(r"-?(?:0|[1-9][0-9]{0,17})")
DECIMAL = re.compile(r"-?(?:(?:0|[1-9][0-9]{0,17})(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
TYPE_CHUNK_ROWS = 10_000  # rows whose values are checked at once, column by column
# A lone UTF-16 surrogate is no Unicode text: UTF-8, the tokenizer and SQLite all refuse it. Python strings get
# one from a JSON escape ("\ud800" with no pair), or from bytes that are not UTF-8 in a file name or an argument.
SURROGATE = re.compile(r"[\ud800-\udfff]")
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # in JSON text; a proper pair decodes to one character
# Unicode's control characters (category Cc): C0, DEL and C1. None may be in an id (see the module docstring).
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# The files a folder source reads, as text.
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
# The keys of a record in the document shape GET /documents/{id} returns.
DOCUMENT_KEYS = frozenset({"id", "text", "metadata", "fields"})


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
    """The documents of a file or a folder of text files, read lazily.

    Iterating yields :class:`Document` objects and raises :class:`SourceError`
    naming the file and line on malformed input, a missing or bad id, a missing
    text field, an empty text, an oversized record, too deep metadata or a
    duplicate id. After the first record, ``id_field`` and ``text_fields`` hold
    the fields actually used; after the last, ``warnings`` holds one-line notes
    on what was skipped (a folder's empty files and files of other types).
    """

    def __init__(
        self,
        path: str | Path,
        id_field: str | None = None,
        text_fields: Iterable[str] | None = None,
        *,
        max_document_bytes: int = MAX_DOCUMENT_BYTES,
    ):
        self.path: Path | str = Path(path)
        self.id_field = id_field
        self.text_fields = list(text_fields or [])
        self.max_document_bytes = max_document_bytes
        self.warnings: list[str] = []
        self._records: list[Any] | None = None
        if fault := name_fault(str(self.path)):  # it is recorded in the manifest, as UTF-8
            raise SourceError(f"in the source's name {str(self.path)!r}, {fault}; rename it")
        if not self.path.exists():
            raise SourceError(f"{self.path}: no such file or folder")
        self.format = "folder" if self.path.is_dir() else source_format(self.path)

    @classmethod
    def from_records(
        cls,
        records: list[Any],
        *,
        name: str = "documents",
        id_field: str | None = None,
        text_fields: Iterable[str] | None = None,
        max_document_bytes: int = MAX_DOCUMENT_BYTES,
    ) -> DocumentSource:
        """The documents of in-memory JSON objects (an HTTP request's), located as "NAME: record N".

        A record is either in the source's own shape (id and text fields as
        named, the rest metadata) or in the shape a stored document reads back
        as: ``{"id", "text", "metadata", "fields"}`` (see ``_stored_document``).
        ``path`` is ``name``, for messages.
        """
        source = cls.__new__(cls)
        source.path = name
        source.id_field = id_field
        source.text_fields = list(text_fields or [])
        source.max_document_bytes = max_document_bytes
        source.warnings = []
        source._records = list(records)
        source.format = "records"
        return source

    def __iter__(self) -> Iterator[Document]:
        seen: set[str] = set()
        self.warnings = []
        if self._records is not None:
            records = ((f"{self.path}: record {n}", refuse_surrogates(f"{self.path}: record {n}", r)) for n, r in enumerate(self._records, 1))
        elif self.format == "folder":
            records = _text_folder_records(self.path, self.warnings)
        else:
            records = read_records(self.path, self.format)
        try:
            types = _column_types(self.path, DELIMITERS[self.format]) if self.format in DELIMITERS else {}
            for where, record in records:
                doc = self._document(where, record, types)
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

    def _document(self, where: str, record: Any, types: dict[str, type] | None = None) -> Document:
        if not isinstance(record, dict):
            raise SourceError(f"{where}: expected an object with fields, got {type(record).__name__}")
        if self._records is not None and _is_stored_document(record):
            return self._stored_document(where, record)
        if self.id_field is None or not self.text_fields:
            self._settle(where, record)
        doc_id = _document_id(where, record.get(self.id_field), self.id_field)
        parts = []
        for name in self.text_fields:
            if name not in record:
                raise SourceError(f"{where}: missing text field {name!r}")
            if part := text_value(where, name, record[name]):
                parts.append(part)
        if not parts:
            raise SourceError(f"{where}: empty text in field(s) {', '.join(self.text_fields)}")
        text = " ".join(parts)
        used = {self.id_field, *self.text_fields}
        # Every text field is there: a record with no other field has no metadata (most sources, a record each).
        metadata = {k: v for k, v in record.items() if k not in used} if len(record) > len(used) else {}
        for name, kind in (types or {}).items():
            if name in metadata:
                value = metadata[name]
                try:
                    metadata[name] = kind(value) if value else None
                except ValueError:  # only if the file changed between the typing pass and this one
                    raise SourceError(f"{where}: {name!r} is {value!r}, not a number; did the file change while read?") from None
        self._check(where, text, metadata)
        fields = {name: record[name] for name in self.text_fields}
        return Document(doc_id, text, metadata, fields)

    def _stored_document(self, where: str, record: dict[str, Any]) -> Document:
        """A record in the shape GET /documents/{id} returns: ``{"id", "text", "metadata", "fields"}``.

        Without "text", the text is the fields' values joined as a source's
        text fields are, in the index's text-field order where those are named.
        """
        doc_id = _document_id(where, record.get("id"), "id")
        fields = record.get("fields") or {}
        parts = {name: text_value(where, name, value) for name, value in fields.items()}
        if "text" in record:
            text = text_value(where, "text", record["text"])
        else:
            order = [n for n in self.text_fields if n in parts] + [n for n in parts if n not in self.text_fields]
            text = " ".join(parts[n] for n in order if parts[n])
        if not text:
            raise SourceError(f"{where}: empty text")
        metadata = record.get("metadata") or {}
        self._check(where, text, metadata)
        return Document(doc_id, text, dict(metadata), dict(fields))

    def _check(self, where: str, text: str, metadata: dict[str, Any]) -> None:
        """Refuse a text, or a text and its metadata as stored, over ``max_document_bytes``, and metadata nested over
        ``MAX_NESTING`` levels."""
        limit = self.max_document_bytes
        # At most 4 UTF-8 bytes a character: only what may be over the limit is encoded to count its bytes.
        if len(text) * 4 > limit and (size := _utf8_size(text)) > limit:
            raise SourceError(f"{where}: text is {size} bytes, over the limit of {limit} (--max-document-bytes)")
        for name, value in metadata.items():
            if isinstance(value, (dict, list)):
                _check_nesting(where, name, value)
            elif isinstance(value, float) and not math.isfinite(value):
                raise SourceError(f"{where}: field {name!r} is {value}, which JSON cannot hold")
        if not metadata:
            return
        try:  # after the nesting check: json.dumps recurses
            stored = json.dumps(metadata, ensure_ascii=False)  # as the store writes it
        except (TypeError, ValueError) as exc:  # records in memory (an API's) may hold any Python object
            raise SourceError(f"{where}: metadata is not JSON ({exc})") from None
        if (len(text) + len(stored)) * 4 > limit and (size := _utf8_size(text) + _utf8_size(stored)) > limit:
            raise SourceError(f"{where}: text and metadata are {size} bytes ({_utf8_size(stored)} of metadata as stored), "
                              f"over the limit of {limit} (--max-document-bytes)")


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def text_value(where: str, name: str, value: Any) -> str:
    """The text a text field's value contributes, stripped ("" for null): see the module docstring."""
    if isinstance(value, str):
        return value.strip()
    if value is None:
        return ""
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return " ".join(s for s in map(str.strip, value) if s)
        if all(_is_scalar(v) for v in value):
            return " ".join(s for s in (_scalar_text(v) for v in value) if s)
        got = next(_json_type(v) for v in value if not _is_scalar(v))
        raise SourceError(f"{where}: text field {name!r} must be a string or a list of strings, got a list holding {got}")
    if _is_scalar(value):
        return _scalar_text(value)
    raise SourceError(f"{where}: text field {name!r} must be a string or a list of strings, got {_json_type(value)}")


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float))  # bool is an int


def _scalar_text(value: str | int | float) -> str:
    # As JSON writes it: true/false, not Python's True/False.
    if isinstance(value, str):
        return value.strip()
    return json.dumps(value) if isinstance(value, bool) else str(value)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "list"}.get(type(value), type(value).__name__)


def _document_id(where: str, value: Any, name: str) -> str:
    if value is None:
        raise SourceError(f"{where}: missing id field {name!r}")
    if value == "":
        raise SourceError(f"{where}: empty id field {name!r}")
    if isinstance(value, (dict, list)):
        raise SourceError(f"{where}: id field {name!r} must be a string or number")
    doc_id = str(value)
    if fault := id_fault(doc_id):
        raise SourceError(f"{where}: id {quoted(doc_id)} {fault}")
    return doc_id


def id_fault(doc_id: str) -> str | None:
    """What makes ``doc_id`` no id, in words (a control character, shown escaped); None if nothing does.

    For every reader of ids (sources, the HTTP server, deletes), so that all refuse the same ones.
    """
    if not (found := CONTROL.search(doc_id)):
        return None
    return f"holds the control character {found.group()!r} at character {found.start() + 1}; an id may hold no control characters"


def _is_stored_document(record: dict[str, Any]) -> bool:
    """Whether ``record`` is in the shape GET /documents/{id} returns (see ``DocumentSource.from_records``)."""
    return (
        "id" in record
        and ("text" in record or "fields" in record)
        and record.keys() <= DOCUMENT_KEYS
        and isinstance(record.get("metadata", {}), dict)
        and isinstance(record.get("fields", {}), dict)
    )


def _check_nesting(where: str, name: str, value: dict | list) -> None:
    """Refuse a metadata value nested over ``MAX_NESTING`` levels or holding an object with a repeated key.

    Walked with a stack, not recursion; only lists and objects are visited.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_NESTING:
            raise SourceError(f"{where}: field {name!r} is nested more than {MAX_NESTING} levels deep")
        if isinstance(item, _Repeated):
            raise SourceError(f"{where}: duplicate field {item.key!r} in field {name!r}")
        children = item.values() if isinstance(item, dict) else item
        if any(isinstance(child, float) and not math.isfinite(child) for child in children):
            raise SourceError(f"{where}: field {name!r} holds NaN or Infinity, which JSON cannot hold")
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


class _Repeated(dict):
    """A JSON object that repeated a key; ``key`` is the first repeat (json would keep the last value)."""

    key: str


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: a dict, or a ``_Repeated`` one where a key came twice."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    repeated = _Repeated(obj)
    seen: set[str] = set()
    repeated.key = next(k for k, _ in pairs if k in seen or seen.add(k))
    return repeated


# One decoder for every record: json.loads with a hook builds a new one per call (a third of parsing a short line).
_DECODER = json.JSONDecoder(object_pairs_hook=_json_object)


def _lone_surrogate(text: str) -> re.Match | None:
    """The first lone surrogate in ``text`` (see ``SURROGATE``); an ASCII text, the usual case, is not searched."""
    return None if text.isascii() else SURROGATE.search(text)


def surrogate_fault(text: str) -> str | None:
    """What makes ``text`` no Unicode text (a lone surrogate), in words; None if nothing does."""
    if not (found := _lone_surrogate(text)):
        return None
    return f"holds \\u{ord(found.group()):04x} at character {found.start() + 1}, a lone UTF-16 surrogate, which is not Unicode text"


def name_fault(name: str) -> str | None:
    """What makes a file name no text, in words: bytes that are not UTF-8 (which Python holds as lone surrogates)."""
    if not (found := _lone_surrogate(name)):
        return None
    code = ord(found.group())
    what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"  # as os.fsdecode made it
    return f"{what} at character {found.start() + 1} is not UTF-8"


def refuse_surrogates(where: str, record: Any) -> Any:
    """``record``, unless a string in it (a key or a value, at any depth) holds a lone surrogate: then SourceError."""
    stack = [record]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if fault := surrogate_fault(item):
                raise SourceError(f"{where}: {quoted(item)} {fault}")
        elif isinstance(item, Mapping):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return record


def quoted(text: str, limit: int = 40) -> str:
    """``text`` quoted for a one-line message, cut to ``limit`` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _refuse_repeats(where: str, record: Any) -> None:
    if isinstance(record, _Repeated):
        raise SourceError(f"{where}: duplicate field {record.key!r}")


def _deep_line(text: str) -> int:
    """The line on which ``text`` (JSON) first nests over ``MAX_NESTING`` levels, for messages (1 if it never does)."""
    depth = 0
    for match in re.finditer(r'"(?:[^"\\]|\\.)*"|[\[{]|[\]}]', text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > MAX_NESTING:
                return text.count("\n", 0, match.start()) + 1
        elif token in ("]", "}"):
            depth -= 1
    return 1


def read_records(path: Path, kind: str | None = None) -> Iterator[tuple[str, Any]]:
    """Raw records of a source with their location ("file:line"), any format."""
    kind = kind or ("folder" if path.is_dir() else source_format(path))
    return READERS[kind](path)


def source_format(path: Path) -> str:
    """The format of a source file, from its suffix (``.gz`` looked through)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    if suffix not in FORMAT_SUFFIXES:
        raise SourceError(
            f"{path}: unknown source format {suffix or '(no suffix)'!r}; use .jsonl, .csv, .tsv, .json or a folder of text files"
        )
    return FORMAT_SUFFIXES[suffix]


def open_text(path: Path) -> io.TextIOBase:
    """A UTF-8 text stream of ``path`` (a leading byte-order mark dropped), gunzipped if it ends in .gz."""
    try:
        if path.suffix.lower() == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _parse_json(text: str, path: Path, line: int | None = None) -> Any:
    """One JSON value; errors name ``path`` and ``line`` (for a whole file, the line the error is on)."""
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        # A .json file holding JSON Lines parses up to the end of its first line.
        lines = line is None and exc.msg == "Extra data" and exc.colno == 1 and text.lstrip().startswith("{")
        hint = "; one record a line is JSON Lines: name the file .jsonl" if lines else ""
        raise SourceError(f"{path}:{line or exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno}){hint}") from None
    except RecursionError:
        raise SourceError(f"{path}:{line or _deep_line(text)}: JSON nested too deeply") from None
    except ValueError as exc:  # an integer over Python's 4300 digits
        raise SourceError(f"{path}{f':{line}' if line else ''}: malformed JSON ({exc})") from None


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    name, decode = str(path), _DECODER.decode
    with open_text(path) as f:
        for number, line in enumerate(f, 1):
            try:
                record = decode(line)
            except (ValueError, RecursionError):  # a blank line, or an error _parse_json words
                if not line.strip():
                    continue
                record = _parse_json(line, path, number)
            where = f"{name}:{number}"
            _refuse_repeats(where, record)
            if "\\u" in line and SURROGATE_ESCAPE.search(line):
                refuse_surrogates(where, record)
            yield where, record


# Read after a CSV/TSV file's last line. The csv module reads a quoted field that never closes on to the end
# of the file, silently taking every later row into it; it then takes this in too, which tells.
END_OF_FILE = "\x00\x01end of file\x01\x00"


def _delimited_records(path: Path, delimiter: str) -> Iterator[tuple[str, Any]]:
    csv.field_size_limit(sys.maxsize)
    with open_text(path) as f:
        reader = csv.DictReader(itertools.chain(f, [END_OF_FILE]), delimiter=delimiter)
        try:
            header = reader.fieldnames or []
            if header == [END_OF_FILE]:
                return
            if any(END_OF_FILE in name for name in header):
                raise SourceError(f"{path}:1: a quoted field starts in the header and never ends")
            if len(set(header)) < len(header):
                repeated = next(name for i, name in enumerate(header) if name in header[:i])
                raise SourceError(f"{path}:1: duplicate field {repeated!r} in the header")
            held = None  # each row is handed on once the next is read: the last one read may be the end's
            for row in reader:
                if held is not None:
                    yield held
                if None in row:
                    raise SourceError(f"{path}:{reader.line_num}: more values than header fields")
                held = f"{path}:{reader.line_num}", row
        except csv.Error as exc:
            raise SourceError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    if held is not None and held[1].get(header[0]) != END_OF_FILE:
        raise SourceError(f"{path}:{_row_start(reader.line_num, held[1])}: a quoted field starts in this row and never ends")


def _row_start(line: int, row: dict) -> int:
    """The line the row that swallowed ``END_OF_FILE`` (read as line ``line``) starts on: ``line`` less the
    line breaks the row holds, and one more where the file's last line has no line break of its own."""
    field = next(value for value in row.values() if isinstance(value, str) and value.endswith(END_OF_FILE))
    breaks = sum(value.count("\n") for value in row.values() if isinstance(value, str))
    return line - breaks - (0 if field.endswith("\n" + END_OF_FILE) else 1)


def _csv_records(path: Path) -> Iterator[tuple[str, Any]]:
    return _delimited_records(path, ",")


def _tsv_records(path: Path) -> Iterator[tuple[str, Any]]:
    return _delimited_records(path, "\t")


DELIMITERS = {"csv": ",", "tsv": "\t"}


def _column_types(path: Path, delimiter: str) -> dict[str, type]:
    """The numeric columns of a CSV/TSV file, each int or float (see the module docstring); others are text.

    One pass over the file, ``TYPE_CHUNK_ROWS`` rows at a time, checking each
    column's distinct values at once; a column drops out at its first text value.
    """
    csv.field_size_limit(sys.maxsize)
    with open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, [])
            kinds: dict[int, type] = dict.fromkeys(range(len(header)), int)
            filled: set[int] = set()  # columns with a non-empty value: an all-empty column stays text
            while kinds and (rows := list(itertools.islice(reader, TYPE_CHUNK_ROWS))):
                columns = list(itertools.zip_longest(*rows, fillvalue=""))
                for i in [i for i in kinds if i < len(columns)]:
                    values = set(columns[i]) - {""}
                    if not values:
                        continue
                    filled.add(i)
                    if kinds[i] is int and all(map(INTEGER.fullmatch, values)):
                        continue
                    if all(map(DECIMAL.fullmatch, values)) and all(map(math.isfinite, map(float, values))):
                        kinds[i] = float
                    else:
                        del kinds[i]
        except csv.Error as exc:
            raise SourceError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    return {header[i]: kind for i, kind in kinds.items() if i in filled}


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    with open_text(path) as f:
        text = f.read()
    data = _parse_json(text, path)
    escapes = SURROGATE_ESCAPE.search(text) is not None
    del text
    if isinstance(data, list):
        for number, record in enumerate(data, 1):
            _refuse_repeats(f"{path}: record {number}", record)
            if escapes:
                refuse_surrogates(f"{path}: record {number}", record)
            yield f"{path}: record {number}", record
    elif isinstance(data, dict):
        # An {id: text} map (a label file) or an {id: record} map; a repeated key is a repeated id.
        if isinstance(data, _Repeated):
            raise SourceError(f"{path}: duplicate id {data.key!r}")
        for key, value in data.items():
            _refuse_repeats(f"{path}: key {key!r}", value)
            record = dict(value) if isinstance(value, dict) else {"text": value}
            record.setdefault("id", key)
            if escapes:
                refuse_surrogates(f"{path}: key {key!r}", record)
            yield f"{path}: key {key!r}", record
    else:
        raise SourceError(f"{path}: expected a list of records or an {{id: text}} object")


def _text_folder_records(path: Path, warnings: list[str]) -> Iterator[tuple[str, Any]]:
    """The text files under ``path``, one record each; what is skipped, and why, goes to ``warnings`` at the end."""
    files, other = [], Counter()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if file.suffix.lower() in TEXT_SUFFIXES:
            files.append(file)
        elif not any(part.startswith(".") for part in relative.parts):  # what file managers and git keep: not content
            other[file.suffix.lower() or "no suffix"] += 1
    if not files:
        held = f"; it holds {_others(other)}" if other else ""
        raise SourceError(f"{path}: folder holds no .txt files, nor .md, .markdown or .rst{held}")
    empty = 0
    for file in files:
        relative = file.relative_to(path).as_posix()
        if fault := name_fault(relative) or id_fault(relative):  # the name is the id
            raise SourceError(f"{path}: in the file name {relative!r}, {fault}; rename it")
        try:
            text = file.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise SourceError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise SourceError(f"{file}: cannot read ({exc.strerror or exc})") from None
        if not text.strip():
            empty += 1
            continue
        yield str(file), {"id": relative[: -len(file.suffix)], "text": text, "path": relative}
    skipped = ([_counted(empty, "empty file")] if empty else []) + ([_others(other)] if other else [])
    if skipped:
        warnings.append(f"{path}: skipped {', '.join(skipped)}")


def _others(other: Counter) -> str:
    """Files of other types, counted and named by suffix: "3 files of an unknown type (2 .pdf, 1 .docx)"."""
    total = sum(other.values())
    kinds = ", ".join(kind if len(other) == 1 else f"{n} {kind}" for kind, n in other.most_common())
    return f"{_counted(total, 'file')} of an unknown type ({kinds})"


def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# Input formats: a format's name -> its reader (a path -> ("file:line", raw record) pairs), and the file suffixes
# (``.gz`` looked through) that name a format. A new format is a reader above and a line in each.
READERS: dict[str, Callable[[Path], Iterator[tuple[str, Any]]]] = {
    "folder": lambda folder: _text_folder_records(folder, []),
    "jsonl": _jsonl_records,
    "csv": _csv_records,
    "tsv": _tsv_records,
    "json": _json_records,
}
FORMAT_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".json": "json"}
