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
    IndexNotFoundError,
    ModelError,
    SourceError,
)
from .index import BuildReport, Index, build_index, embed_source, index_info
from .query import Hit
from .settings import DEFAULT_MODEL, IndexSettings
from .sources import Document, DocumentSource

__all__ = [
    "ArgumentError",
    "BuildReport",
    "DEFAULT_MODEL",
    "Document",
    "DocumentSource",
    "Hit",
    "Index",
    "IndexCorruptError",
    "IndexNotFoundError",
    "IndexSettings",
    "IndexerError",
    "ModelError",
    "SourceError",
    "build_index",
    "embed_source",
    "index_info",
]
