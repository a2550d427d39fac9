"""indexer: an embedded semantic-search index.

Documents are embedded with a BERT-family model (masked mean pooling, unit
vectors), searched with FAISS by inner product, and stored beside their text in
SQLite; every change is published as an immutable version.

    >>> from indexer import Index, build_index
    >>> build_index("dataset/corpus.jsonl", "products")      # indexes/products
    >>> index = Index("products")                           # load once
    >>> index.search("waterproof hiking boots", k=3)        # search many times
"""

from .errors import (
    ArgumentError,
    IndexCorruptError,
    IndexerError,
    IndexLockedError,
    IndexNotFoundError,
    ModelError,
    SourceError,
)
from .build import BuildReport, build_index, delete_documents, embed_source, rebuild_index, rollback_index, upsert_documents
from .check import check_index
from .evaluate import Judgement, evaluate_index, read_judgements
from .index import Index, index_info
from .query import Hit, parse_condition
from .ray_engine import RayOptions
from .settings import DEFAULT_MODEL, IndexSettings
from .sources import Document, DocumentSource

__all__ = [
    "ArgumentError",
    "BuildReport",
    "DEFAULT_MODEL",
    "Document",
    "DocumentSource",
    "Hit",
    "Judgement",
    "Index",
    "IndexCorruptError",
    "IndexLockedError",
    "IndexNotFoundError",
    "IndexSettings",
    "IndexerError",
    "ModelError",
    "RayOptions",
    "SourceError",
    "build_index",
    "check_index",
    "delete_documents",
    "embed_source",
    "evaluate_index",
    "index_info",
    "parse_condition",
    "read_judgements",
    "rebuild_index",
    "rollback_index",
    "upsert_documents",
]
