"""indexer: an embedded semantic-search index.

Documents are embedded with a BERT-family model (masked mean pooling, unit
vectors), searched with FAISS by inner product, and stored beside their text in
SQLite; every change is published as an immutable version.

    >>> from indexer import Index, build_index
    >>> build_index("dataset/corpus.jsonl", "products")      # indexes/products
    >>> index = Index("products")                           # load once
    >>> index.search("waterproof hiking boots", k=3)        # search many times
"""

import importlib
from typing import TYPE_CHECKING

from .errors import (
    ArgumentError,
    DiskFullError,
    IndexCorruptError,
    IndexerError,
    IndexLockedError,
    IndexNotFoundError,
    ModelError,
    SourceError,
)
from .settings import DEFAULT_MODEL, IndexSettings

if TYPE_CHECKING:
    from .build import BuildReport, build_index, delete_documents, embed_source, rebuild_index, rollback_index, upsert_documents
    from .check import check_index
    from .evaluate import Judgement, evaluate_index, read_judgements
    from .index import Index, index_info
    from .query import Hit, parse_condition
    from .ray_engine import RayOptions
    from .sources import Document, DocumentSource

# The rest is imported on first use (PEP 562), so that commands which load no
# model (``indexer --help``, ``info``, ``check``...) never import torch.
_LAZY = {
    **dict.fromkeys(
        ["BuildReport", "build_index", "delete_documents", "embed_source", "rebuild_index", "rollback_index", "upsert_documents"],
        "build",
    ),
    "check_index": "check",
    **dict.fromkeys(["Judgement", "evaluate_index", "read_judgements"], "evaluate"),
    **dict.fromkeys(["Index", "index_info"], "index"),
    **dict.fromkeys(["Hit", "parse_condition"], "query"),
    "RayOptions": "ray_engine",
    **dict.fromkeys(["Document", "DocumentSource"], "sources"),
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "ArgumentError",
    "BuildReport",
    "DEFAULT_MODEL",
    "DiskFullError",
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
