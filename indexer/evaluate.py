"""Measuring an index: recall@1/10/100, MRR@10 and nDCG@10 over a set of judged queries.

Two query formats:

* the classic notebooks': a JSONL or CSV file with one query per line, its
  text in ``query`` (or ``question``/``text``) and the id of the relevant
  document in a field such as ``product_id`` (``relevant_field``; default: the
  first ``*_id`` field other than the query's own id, else ``document``);
* BEIR: ``queries.jsonl`` (``_id``, ``text``) with a ``qrels`` TSV
  (``query-id``, ``corpus-id``, ``score``); graded scores count in nDCG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SourceError
from .sources import open_text, read_records

QUERY_TEXT_FIELDS = ("query", "question", "text")
QUERY_ID_FIELDS = ("query_id", "_id", "id", "qid")


@dataclass
class Judgement:
    """A query and the grades of its relevant documents (grade > 0)."""

    query_id: str
    text: str
    relevant: dict[str, float]


def recall_at(ranked: Sequence[str], relevant: dict[str, float], k: int) -> float:
    """Share of the relevant documents found in the top ``k``."""
    return len(set(ranked[:k]) & set(relevant)) / len(relevant)


def mrr_at(ranked: Sequence[str], relevant: dict[str, float], k: int = 10) -> float:
    """1 / rank of the first relevant document in the top ``k`` (0 if none)."""
    return next((1.0 / rank for rank, doc in enumerate(ranked[:k], 1) if doc in relevant), 0.0)


def ndcg_at(ranked: Sequence[str], relevant: dict[str, float], k: int = 10) -> float:
    """Normalised discounted cumulative gain with graded relevance (gain = grade, as trec_eval)."""
    dcg = sum(relevant.get(doc, 0.0) / math.log2(rank + 1) for rank, doc in enumerate(ranked[:k], 1))
    ideal = sum(grade / math.log2(rank + 1) for rank, grade in enumerate(sorted(relevant.values(), reverse=True)[:k], 1))
    return dcg / ideal if ideal else 0.0


def metrics_at(k: int) -> dict[str, Any]:
    """The metrics reported for cutoff ``k`` (10 by default)."""
    return {
        "recall@1": lambda r, rel: recall_at(r, rel, 1),
        f"recall@{k}": lambda r, rel: recall_at(r, rel, k),
        "recall@100": lambda r, rel: recall_at(r, rel, 100),
        f"mrr@{k}": lambda r, rel: mrr_at(r, rel, k),
        f"ndcg@{k}": lambda r, rel: ndcg_at(r, rel, k),
    }


def score_rankings(
    judgements: Sequence[Judgement], rankings: Sequence[Sequence[str]], k: int = 10
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Mean of every metric over the queries, and each query's own values."""
    metrics = metrics_at(k)
    per_query = []
    for judgement, ranked in zip(judgements, rankings):
        values = {name: metric(ranked, judgement.relevant) for name, metric in metrics.items()}
        per_query.append({"query_id": judgement.query_id, "query": judgement.text, **values,
                          "relevant": sorted(judgement.relevant), f"top{k}": list(ranked[:k])})
    means = {name: round(sum(q[name] for q in per_query) / max(len(per_query), 1), 4) for name in metrics}
    return means, per_query


def evaluate_index(
    index: Any,
    judgements: Sequence[Judgement],
    k: int = 10,
    mode: str = "dense",
    batch: int = 256,
    fusion: str = "score",
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Search every judged query on an open ``Index`` and score the rankings (depth 100)."""
    depth = max(k, 100)
    rankings: list[list[str]] = []
    for start in range(0, len(judgements), batch):
        chunk = [j.text for j in judgements[start : start + batch]]
        rankings.extend([hit.id for hit in hits] for hits in index.search_many(chunk, depth, mode, fusion=fusion))
    return score_rankings(judgements, rankings, k)


def read_judgements(
    queries: str | Path,
    qrels: str | Path | None = None,
    relevant_field: str | None = None,
    text_field: str | None = None,
) -> list[Judgement]:
    """Judged queries from either format (see the module docstring)."""
    records = list(read_records(Path(queries)))
    if not records:
        raise SourceError(f"{queries}: no queries")
    first = records[0][1]
    text_field = text_field or next((f for f in QUERY_TEXT_FIELDS if f in first), None)
    id_field = next((f for f in QUERY_ID_FIELDS if f in first), None)
    if text_field is None or text_field not in first:
        raise SourceError(f"{records[0][0]}: no query text field (looked for {', '.join(QUERY_TEXT_FIELDS)})")
    if qrels is not None:
        grades = _read_qrels(Path(qrels))
        if id_field is None:
            raise SourceError(f"{records[0][0]}: no query id field to match the qrels (looked for {', '.join(QUERY_ID_FIELDS)})")
        return [
            Judgement(str(r[id_field]), _query_text(where, r, text_field), grades[str(r[id_field])])
            for where, r in records
            if grades.get(str(r[id_field]))
        ]
    relevant_field = relevant_field or next(
        (f for f in first if f.endswith("_id") and f != id_field), "document" if "document" in first else None
    )
    if relevant_field is None:
        raise SourceError(f"{records[0][0]}: no relevant-document field; name it with --relevant-field or pass --qrels")
    judgements = []
    for number, (where, record) in enumerate(records, 1):
        if relevant_field not in record or record[relevant_field] in (None, ""):
            raise SourceError(f"{where}: missing relevant-document field {relevant_field!r}")
        query_id = str(record[id_field]) if id_field else str(number)
        judgements.append(Judgement(query_id, _query_text(where, record, text_field), {str(record[relevant_field]): 1.0}))
    return judgements


def _query_text(where: str, record: dict, text_field: str) -> str:
    """The record's query text; SourceError, naming the record, if it is missing or blank (searches refuse those)."""
    text = record.get(text_field)
    if text is None or not str(text).strip():
        raise SourceError(f"{where}: empty query text field {text_field!r}")
    return str(text)


def _read_qrels(path: Path) -> dict[str, dict[str, float]]:
    grades: dict[str, dict[str, float]] = {}
    with open_text(path) as f:
        for number, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if number == 1 and parts[0] == "query-id" or not line.strip():
                continue
            if len(parts) != 3:
                raise SourceError(f"{path}:{number}: expected query-id, corpus-id, score separated by tabs")
            try:
                grade = float(parts[2])
            except ValueError:
                raise SourceError(f"{path}:{number}: score {parts[2]!r} is not a number") from None
            if grade > 0:
                grades.setdefault(parts[0], {})[parts[1]] = grade
    return grades
