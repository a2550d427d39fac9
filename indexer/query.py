"""The query module: embed questions, search vectors and/or keywords, filter, fetch the documents.

Modes: ``dense`` (cosine of embeddings), ``keyword`` (BM25 over the words of
the question, with FTS5's tokenizer and formula and statistics over every live
document of the index, see ``snapshot``) and ``hybrid``, which fuses the two top-100 lists.
The default fusion ("score") gives each document

    0.6 * max(cosine, 0) + 0.4 * bm25 / (best bm25 among the query's keyword hits)

a number in [0, 1]: the dense part is the cosine (clamped to [0, 1]), the keyword
part is the document's BM25 as a share of the best keyword match for that
query among the documents searched (after filters), and a document missing
from a list (no query word, or not in the dense top 100) gets 0 for that part.
So a document found only by dense search scores 0.6 x its cosine, and 1.0 means
cosine 1 and the best keyword match. It keeps how far ahead a rare exact term
puts a document in BM25, which reciprocal rank fusion (``fusion="rrf"``) throws
away; benchmarks/quality.py compares the two.

Filters select documents by their fields before ranking, so ``k`` hits come
back whenever ``k`` documents match. They are typed by the index's own values
(``Snapshot.field_types``): see ``typed_conditions``.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ArgumentError
from .settings import FUSIONS, MODES
from .sources import quoted, surrogate_fault
from .store import FIELD_NAME_FORBIDDEN, FILTER_OPERATORS, Filter

if TYPE_CHECKING:
    from .encoder import Encoder
    from .snapshot import Snapshot

HYBRID_DEPTH = 100
RRF_K = 60
DENSE_WEIGHT = 0.6
Condition = tuple[str, str, Any]
COMPARABLE = ("number", "text", "boolean")
ORDERING = ("<", "<=", ">", ">=")
NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
INTEGER = re.compile(r"[+-]?[0-9]+")
INT64 = (-(2**63), 2**63 - 1)
KNOWN_FIELDS_SHOWN = 20


@dataclass
class Hit:
    """One search result: the document's id, its score, text and other fields.

    The score is the cosine similarity in dense mode and BM25 in keyword mode.
    In hybrid mode with score fusion (the default) it is
    ``0.6 * max(cosine, 0) + 0.4 * bm25 / best_bm25``, in [0, 1], where
    ``best_bm25`` is the highest BM25 among the query's keyword hits and a
    part is 0 for a document that list lacks (see ``score_fusion``); with
    ``fusion="rrf"`` it is the sum of 1 / (60 + rank) over the two lists.
    """

    id: str
    score: float
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TextCondition(tuple):
    """A condition written as text: equal to its ``(field, operator, value)``
    tuple, and remembering the filter as written (``text``) and each value as
    written (``written``: a str, or a list for ``in``), so that the value is
    typed from the field's own values when the search runs."""

    text: str
    written: str | list[str]

    def __new__(cls, field_: str, operator: str, value: Any, text: str, written: str | list[str]) -> TextCondition:
        condition = super().__new__(cls, (field_, operator, value))
        condition.text, condition.written = text, written
        return condition

    def __reduce__(self) -> tuple:
        return TextCondition, (*self, self.text, self.written)


def parse_condition(text: str) -> Condition:
    """``"price<=20"``, ``"category=books"``, ``"lang in en,de"`` -> (field, operator, value).

    The value reads as a number where it is one (``20``, ``-4.5``, ``1e3``),
    else it stays text. That is a guess for display and for callers that
    look at the tuple: the search types each value from the field's own values
    (``"30"`` against a field of numbers is 30, against text "30";
    ``true``/``false`` against booleans), see ``typed_conditions``.
    """
    match = re.fullmatch(r"\s*([^=!<>\s]+)\s*(!=|<=|>=|=|<|>|\s+in\s+)\s*(.*?)\s*", text)
    if not match:
        raise ArgumentError(f"filter {text!r} is not FIELD=VALUE (or !=, <, <=, >, >=, FIELD in A,B)")
    name, operator, value = match.group(1), match.group(2).strip(), match.group(3)
    if operator == "in":
        written = [v.strip() for v in value.split(",")]
        return TextCondition(name, operator, [_typed(v) for v in written], text.strip(), written)
    return TextCondition(name, operator, _typed(value), text.strip(), value)


def _typed(value: str) -> Any:
    """``value`` as a number if it reads as one (integers beyond 64 bits as floats), else as written."""
    if not NUMBER.fullmatch(value):
        return value
    if INTEGER.fullmatch(value):
        try:
            number = int(value)
        except ValueError:  # more digits than Python converts
            return float(value)
        return number if INT64[0] <= number <= INT64[1] else float(value)
    return float(value)


def typed_conditions(conditions: Iterable[Condition], field_types: dict[str, set[str]]) -> list[Filter]:
    """``conditions`` checked against the index's fields and typed as ``store.Filter`` for ``DocumentStore.filter_keys``:
    the one place filters are checked.

    ``field_types`` is ``DocumentStore.field_types()``; ``id`` is always a
    text field. Raises ArgumentError, naming the filter, for a field name with
    a double quote or a control character, an unknown operator, a field no
    document has (listing the known ones), or a value that cannot compare
    with the field's values.

    Conditions from ``parse_condition`` are typed from the field: a value
    that reads as a number is a number if the field holds numbers; ``true``
    or ``false`` (any case) is a boolean if it holds booleans; anything else is
    text if it holds text. Text ordering (``<``, ``>``...) against a value that
    reads as a number, on a field holding text but no numbers, is refused:
    it would compare alphabetically ("129.99" < "30").

    Other conditions keep their Python types, which must be among the field's:
    ``int``/``float`` for numbers, ``str`` for text, ``bool`` for booleans
    (so ``("price", "<", 20)`` is refused if every price is text, and
    ``("price", "<", "20")`` if every price is a number); ``in`` takes a list.
    Each value then compares only with documents whose field holds that
    type, so a field holding numbers in some documents and text in others
    never matches across types.
    """
    typed: list[Filter] = []
    for condition in conditions:
        try:
            field_, operator, value = condition
        except (TypeError, ValueError):
            raise ArgumentError(f"filter {condition!r} is not a (field, operator, value) triple") from None
        label = _printable(condition.text if isinstance(condition, TextCondition) else f"{field_} {operator} {value!r}")
        if not isinstance(field_, str) or not field_ or FIELD_NAME_FORBIDDEN.search(field_):
            raise ArgumentError(f"filter {label}: field name {field_!r} cannot be filtered on "
                                "(empty, or holds a double quote, a control character or a lone surrogate)")
        if operator not in FILTER_OPERATORS:
            raise ArgumentError(f"filter {label}: unknown operator {operator!r}; use one of {', '.join(FILTER_OPERATORS)}")
        types = {"text"} if field_ == "id" else field_types.get(field_)
        if types is None:
            known = ["id", *sorted(field_types)]
            shown = ", ".join(known[:KNOWN_FIELDS_SHOWN]) + (f" and {len(known) - KNOWN_FIELDS_SHOWN} more" if len(known) > KNOWN_FIELDS_SHOWN else "")
            raise ArgumentError(f"filter {label}: no document has a field {field_!r}; fields: {shown}")
        if not types & set(COMPARABLE):
            raise ArgumentError(f"filter {label}: field {field_!r} holds {_holds(types)}; filters compare numbers, text and true/false")
        if isinstance(condition, TextCondition):
            written = condition.written if operator == "in" else [condition.written]
            values = [_from_text(w, operator, field_, types, label) for w in written]
        else:
            if operator == "in" and (isinstance(value, (str, bytes)) or not isinstance(value, Iterable)):
                raise ArgumentError(f"filter {label}: 'in' takes a list of values")
            values = [_from_python(v, field_, types, label) for v in (value if operator == "in" else [value])]
        if fault := next((f for v in values if isinstance(v, str) and (f := surrogate_fault(v))), None):
            raise ArgumentError(f"filter {label}: the value {fault}")
        typed.append(Filter(field_, operator, tuple(values)))
    return typed


def _printable(text: str) -> str:
    """``text`` with control and other unprintable characters escaped, so an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _holds(types: set[str]) -> str:
    names = {"number": "numbers", "text": "text", "boolean": "true/false", "array": "arrays", "object": "objects", "null": "nulls"}
    shown = [t for t in COMPARABLE if t in types] or [t for t in ("array", "object", "null") if t in types]
    return " and ".join(names[t] for t in shown)


def _is_not(types: set[str]) -> str:
    names = {"number": "a number", "text": "text", "boolean": "true or false"}
    return " or ".join(names[t] for t in COMPARABLE if t in types)


def _from_text(written: str, operator: str, field_: str, types: set[str], label: str) -> Any:
    if "number" in types and NUMBER.fullmatch(written):
        return _typed(written)
    if "boolean" in types and written.lower() in ("true", "false"):
        return written.lower() == "true"
    if "text" in types:
        if operator in ORDERING and NUMBER.fullmatch(written):
            raise ArgumentError(
                f"filter {label}: field {field_!r} holds text, not numbers, so {operator} would compare {written!r} "
                "alphabetically; store it as numbers (rebuild the index) to compare numbers"
            )
        return written
    raise ArgumentError(f"filter {label}: field {field_!r} holds {_holds(types)}; {written!r} is not {_is_not(types)}")


def _from_python(value: Any, field_: str, types: set[str], label: str) -> Any:
    if isinstance(value, (bool, np.bool_)):
        kind, value = "boolean", bool(value)
    elif isinstance(value, numbers.Integral):
        kind, value = "number", int(value)
    elif isinstance(value, numbers.Real):
        kind, value = "number", float(value)
        if value != value:
            raise ArgumentError(f"filter {label}: NaN compares with nothing")
    elif isinstance(value, str):
        kind = "text"
    else:
        raise ArgumentError(f"filter {label}: values are numbers, text or booleans, not {type(value).__name__}")
    if kind not in types:
        article = {"number": "a number", "text": "text", "boolean": "a boolean"}[kind]
        raise ArgumentError(f"filter {label}: field {field_!r} holds {_holds(types)}; {value!r} is {article}")
    return value


def check_queries(queries: Sequence[str]) -> None:
    """Raise ArgumentError for a question that is empty or blank (its vector is near every document: its hits
    would mean nothing) or holds a lone surrogate (neither the tokenizer nor SQLite takes one)."""
    for q in queries:
        if isinstance(q, str) and not q.strip():
            raise ArgumentError("empty question: give some words to search for")
        if isinstance(q, str) and (fault := surrogate_fault(q)):
            raise ArgumentError(f"query {quoted(q)} {fault}")


def search_texts(
    encoder: Encoder,
    snapshot: Snapshot,
    queries: Sequence[str],
    k: int = 10,
    mode: str = "dense",
    where: Sequence[Condition] | None = None,
    fusion: str = "score",
    vectors: np.ndarray | None = None,
    **knobs: int | None,
) -> list[list[Hit]]:
    """Top-``k`` hits for each query, best first; all queries embedded in one batch.

    ``where`` holds (field, operator, value) filters, checked and typed by
    ``typed_conditions``; ``vectors`` (unit rows, one per query) are searched
    instead of embedding the queries; ``knobs`` are FAISS search parameters
    for this call (``nprobe``, ``efSearch``).
    """
    if k < 1:
        raise ArgumentError(f"k must be at least 1, got {k}")
    if mode not in MODES:
        raise ArgumentError(f"unknown search mode {mode!r}; choose one of {', '.join(MODES)}")
    if fusion not in FUSIONS:
        raise ArgumentError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
    if vectors is None:
        check_queries(queries)
    conditions = typed_conditions(where, snapshot.field_types()) if where else None
    if not len(queries):
        return []
    allowed = snapshot.filter_keys(conditions) if conditions else None
    if allowed is not None and not len(allowed):
        return [[] for _ in queries]
    depth = max(k, HYBRID_DEPTH) if mode == "hybrid" else k
    if mode != "keyword":
        dense = snapshot.dense(encoder.encode_queries(queries) if vectors is None else vectors, depth, allowed, knobs)
    if mode != "dense":
        keyword = [snapshot.keyword(q, depth, allowed) for q in queries]
    if mode == "dense":
        ranked = dense
    elif mode == "keyword":
        ranked = keyword
    elif fusion == "rrf":
        ranked = [reciprocal_rank_fusion([d[0], w[0]], k) for d, w in zip(dense, keyword)]
    else:
        ranked = [score_fusion(d, w, k) for d, w in zip(dense, keyword)]
    rows = snapshot.fetch({key for keys, _ in ranked for key in keys[:k]})
    return [
        [Hit(rows[key]["id"], float(score), rows[key]["text"], rows[key]["metadata"]) for key, score in zip(keys[:k], scores[:k]) if key in rows]
        for keys, scores in ranked
    ]


def score_fusion(
    dense: tuple[list[int], list[float]], keyword: tuple[list[int], list[float]], k: int, weight: float = DENSE_WEIGHT
) -> tuple[list[int], list[float]]:
    """The top ``k`` keys by ``weight * cosine + (1 - weight) * bm25 / best_bm25``, with those scores.

    ``dense`` holds (keys, cosines), ``keyword`` (keys, BM25 scores, higher
    is better); cosines are clamped to [0, 1], ``best_bm25`` is the highest
    BM25 in ``keyword``. A key that a list lacks gets 0 for that part, so
    every score is in [0, 1], rises with the cosine and with the BM25, and a
    document only one list found never scores more than that list's weight.
    ``weight`` 0.6 is the one default, chosen on the bundled sample and
    course-faq (README, Retrieval quality).
    """
    fused = {key: weight * min(max(cosine, 0.0), 1.0) for key, cosine in zip(*dense)}
    best = max(keyword[1], default=0.0)
    if best > 0:
        for key, bm25 in zip(*keyword):
            fused[key] = fused.get(key, 0.0) + (1.0 - weight) * max(bm25, 0.0) / best
    ranked = sorted(fused.items(), key=lambda item: -item[1])[:k]
    return [key for key, _ in ranked], [score for _, score in ranked]


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int, constant: int = RRF_K) -> tuple[list[int], list[float]]:
    """Keys ranked by the sum of 1 / (constant + rank) over ``rankings``; the top ``k``."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, key in enumerate(ranking, 1):
            fused[key] = fused.get(key, 0.0) + 1.0 / (constant + rank)
    best = sorted(fused.items(), key=lambda item: -item[1])[:k]
    return [key for key, _ in best], [score for _, score in best]

