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
    ShardUnavailableError,
    SourceError,
)
from .settings import DEFAULT_MODEL, IndexSettings, WriteOptions

if TYPE_CHECKING:
    from .archive import ImportReport, export_index, import_index
    from .build import build_index, rebuild_index
    from .check import check_index
    from .compact import compact_index
    from .edit import delete_documents, upsert_documents
    from .evaluate import Judgement, evaluate_index, read_judgements
    from .index import Index, index_info
    from .ingest import embed_source
    from .query import Hit, parse_condition
    from .ray_engine import RayOptions
    from .sources import Document, DocumentSource
    from .write import BuildReport, rollback_index

# The rest is imported on first use (PEP 562), so that commands which load no
# model (``indexer --help``, ``info``, ``check``...) never import torch.
_LAZY = {
    **dict.fromkeys(["ImportReport", "export_index", "import_index"], "archive"),
    **dict.fromkeys(["build_index", "rebuild_index"], "build"),
    **dict.fromkeys(["BuildReport", "rollback_index"], "write"),
    **dict.fromkeys(["delete_documents", "upsert_documents"], "edit"),
    "compact_index": "compact",
    "embed_source": "ingest",
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
    "ImportReport",
    "IndexCorruptError",
    "IndexLockedError",
    "IndexNotFoundError",
    "IndexSettings",
    "IndexerError",
    "ModelError",
    "RayOptions",
    "ShardUnavailableError",
    "SourceError",
    "WriteOptions",
    "build_index",
    "check_index",
    "compact_index",
    "delete_documents",
    "embed_source",
    "evaluate_index",
    "export_index",
    "import_index",
    "index_info",
    "parse_condition",
    "read_judgements",
    "rebuild_index",
    "rollback_index",
    "upsert_documents",
]
