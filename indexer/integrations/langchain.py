"""A LangChain ``VectorStore`` over an indexer index (extra ``[langchain]``: langchain-core only).

    from indexer.integrations.langchain import IndexerVectorStore

    store = IndexerVectorStore("indexes/notes")          # the index's own model embeds
    store.add_texts(["Rivers carve valleys."], metadatas=[{"topic": "geology"}], ids=["n1"])
    store.similarity_search("how are valleys made", k=4, filter={"topic": "geology"})
    store.as_retriever(search_kwargs={"k": 4, "mode": "hybrid"})
    store.as_retriever(search_type="mmr", search_kwargs={"k": 4, "fetch_k": 20, "lambda_mult": 0.5})

Every call goes to the index on disk (writes as upserts and deletes, each a
new version; searches on the current version): the store holds no copy of
the documents. Given a LangChain ``Embeddings`` object, the index stores and
searches that object's vectors instead of running our model (see
``indexer.external``); an index is made with one or the other for good.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore

from .. import layout
from ..build import build_index
from ..edit import delete_documents, upsert_documents
from ..errors import ArgumentError, IndexNotFoundError
from ..external import ExternalEncoder, load_encoder
from ..index import Index
from ..query import Condition, Hit
from ..settings import IndexSettings, WriteOptions
from ..sources import DocumentSource

# Settings of LangChain's Embeddings classes that decide which vectors come out (OpenAI, Hugging Face, Ollama, the fakes...).
IDENTITY_FIELDS = ("model", "model_name", "model_id", "repo_id", "deployment", "dimensions", "size",
                   "query_instruction", "embed_instruction")
# LangChain's filter operators (as Chroma and PGVector spell them) and ours (``--where``).
OPERATORS = {"$eq": "=", "$ne": "!=", "$lt": "<", "$lte": "<=", "$gt": ">", "$gte": ">=", "$in": "in"}


def conditions(filter: dict[str, Any] | None) -> list[Condition] | None:
    """``{"topic": "geology", "year": {"$gte": 2020}}`` as our ``where`` conditions (all must hold)."""
    if not filter:
        return None
    found: list[Condition] = []
    for name, value in filter.items():
        if isinstance(value, dict):
            for operator, operand in value.items():
                if operator not in OPERATORS:
                    raise ArgumentError(f"filter on {name!r}: unknown operator {operator!r}; use one of {', '.join(OPERATORS)}")
                found.append((name, OPERATORS[operator], operand))
        else:
            found.append((name, "=", value))
    return found


def external_encoder(embedding: Embeddings, name: str | None = None) -> ExternalEncoder:
    """An ``ExternalEncoder`` for a LangChain ``Embeddings``: named by its class, the settings that pick its model in the fingerprint.

    Only ``IDENTITY_FIELDS`` count: a device, a cache folder, a retry count or
    a client object change no vector and must not make an index unusable.
    """
    kind = type(embedding)
    fields = getattr(embedding, "__dict__", {})
    config = {key: fields[key] for key in IDENTITY_FIELDS if fields.get(key) is not None}
    return ExternalEncoder(embedding.embed_documents, embedding.embed_query,
                           name=name or f"{kind.__module__}.{kind.__qualname__}", config=config)


class IndexerVectorStore(VectorStore):
    """LangChain's ``VectorStore`` interface over the index at ``index`` (created by the first ``add_texts``).

    ``embedding``: a LangChain ``Embeddings`` whose vectors the index holds
    (it is called once here to learn its dimension); without it the index's
    own model embeds (``settings`` for a new index, default all-MiniLM-L6-v2).
    Search keyword arguments: ``k``, ``filter`` (a dict, see ``conditions``),
    ``mode`` ("dense", "keyword", "hybrid") and ``fusion``; maximal marginal
    relevance (``search_type="mmr"``) takes them too, with ``fetch_k`` and ``lambda_mult``.
    """

    def __init__(self, index: str | Path, embedding: Embeddings | None = None, *, settings: IndexSettings | None = None,
                 device: str | None = None, embedding_name: str | None = None):
        self.path = layout.index_path(index)
        self.settings = settings or IndexSettings()
        self.device = device
        self._embedding = embedding
        self._encoder = external_encoder(embedding, embedding_name) if embedding is not None else None
        if self._encoder is not None:
            self.settings = replace(self.settings, model=self._encoder.model_name)
        self._index: Index | None = None

    @property
    def embeddings(self) -> Embeddings | None:
        return self._embedding

    # Writing ---------------------------------------------------------------------------------------

    def add_texts(self, texts: Iterable[str], metadatas: list[dict] | None = None, *, ids: list[str | None] | None = None,
                  **kwargs: Any) -> list[str]:
        """Upsert ``texts`` under ``ids`` (made up where missing); returns the ids."""
        texts = list(texts)
        ids = [i if i else uuid.uuid4().hex for i in (ids or [None] * len(texts))]
        metadatas = metadatas or [{}] * len(texts)
        if not (len(ids) == len(metadatas) == len(texts)):
            raise ArgumentError(f"{len(texts)} texts, {len(metadatas)} metadatas and {len(ids)} ids: give one of each per text")
        if not texts:
            return []
        records = [{"id": str(i), "text": t, "metadata": dict(m or {})} for i, t, m in zip(ids, texts, metadatas)]
        source = DocumentSource.from_records(records, name="langchain documents", max_document_bytes=self.settings.max_document_bytes)
        if self._searcher() is None:
            self._encoder = load_encoder(self.settings, self.device, reuse=self._encoder)
            # Another process may create the index meanwhile: then these documents go in as an upsert after all.
            options = WriteOptions(device=self.device)
            if build_index(source, self.path, self.settings, options=options, encoder=self._encoder, only_if_new=True).published:
                return [str(i) for i in ids]
        upsert_documents(self.path, source, options=WriteOptions(device=self.device), encoder=self._searcher().encoder)
        return [str(i) for i in ids]

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """Delete the documents with these ids (ids not in the index are ignored)."""
        if ids is None:
            raise ArgumentError("give the ids of the documents to delete")
        if ids and self._searcher() is not None:
            delete_documents(self.path, list(ids), missing_ok=True)
        return True

    # Reading ---------------------------------------------------------------------------------------

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        index = self._searcher()
        return [_document(d["id"], d["text"], d["metadata"]) for d in index.get_documents(ids)] if index else []

    def similarity_search(self, query: str, k: int = 4, filter: dict[str, Any] | None = None, **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score(query, k, filter, **kwargs)]

    def similarity_search_with_score(self, query: str, k: int = 4, filter: dict[str, Any] | None = None, *,
                                     mode: str = "dense", fusion: str = "score", **kwargs: Any) -> list[tuple[Document, float]]:
        """Documents with their scores: cosine in dense mode, BM25 in keyword mode, the fused score in hybrid."""
        index = self._searcher()
        # A blank query (a multi-query retriever's empty line) finds nothing, as on an empty store; our search refuses it.
        searchable = index is not None and query.strip()
        hits = index.search(query, k=k, mode=mode, where=conditions(filter), fusion=fusion) if searchable else []
        return _scored(hits)

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4, filter: dict[str, Any] | None = None,
                                    **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score_by_vector(embedding, k, filter)]

    def similarity_search_with_score_by_vector(self, embedding: list[float], k: int = 4,
                                               filter: dict[str, Any] | None = None) -> list[tuple[Document, float]]:
        index = self._searcher()
        return _scored(index.search_by_vector(embedding, k=k, where=conditions(filter)) if index else [])

    def max_marginal_relevance_search(self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5,
                                      filter: dict[str, Any] | None = None, *, mode: str = "dense", fusion: str = "score",
                                      **kwargs: Any) -> list[Document]:
        """``k`` of the ``fetch_k`` best documents (found as ``similarity_search`` finds them), picked by maximal marginal relevance.

        Each pick maximises ``lambda_mult * relevance - (1 - lambda_mult) * redundancy``: relevance is the cosine to the
        query (in keyword and hybrid mode too: the mode only finds the candidates), redundancy the highest cosine to a
        document already picked, from the vectors the index stores (``Index.get_vectors``), not the texts embedded again.
        """
        _check_lambda(lambda_mult)
        index = self._searcher()
        if index is None or not query.strip():  # as in similarity_search_with_score
            return []
        hits = index.search(query, k=max(k, fetch_k), mode=mode, where=conditions(filter), fusion=fusion)
        # Dense scores are the cosines already; other modes' scores are not, so the query is embedded for them.
        query_vector = None if mode == "dense" else index.encoder.encode_queries([query])[0]
        return _diverse(index, hits, query_vector, k, lambda_mult)

    def max_marginal_relevance_search_by_vector(self, embedding: list[float], k: int = 4, fetch_k: int = 20,
                                                lambda_mult: float = 0.5, filter: dict[str, Any] | None = None,
                                                **kwargs: Any) -> list[Document]:
        """``max_marginal_relevance_search`` for a query vector (dense search)."""
        _check_lambda(lambda_mult)
        index = self._searcher()
        if index is None:
            return []
        return _diverse(index, index.search_by_vector(embedding, k=max(k, fetch_k), where=conditions(filter)), None, k, lambda_mult)

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        return lambda cosine: (1.0 + cosine) / 2.0  # dense scores are cosines, in [-1, 1]

    @classmethod
    def from_texts(cls, texts: list[str], embedding: Embeddings | None = None, metadatas: list[dict] | None = None, *,
                   ids: list[str] | None = None, index: str | Path | None = None, **kwargs: Any) -> IndexerVectorStore:
        """A store over ``index`` (required) holding ``texts``."""
        if index is None:
            raise ArgumentError("IndexerVectorStore.from_texts needs index=PATH")
        store = cls(index, embedding, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store

    def _searcher(self) -> Index | None:
        """The index, opened once (with the encoder already loaded) and on its newest version; None while there is none."""
        if self._index is None:
            if layout.read_pointer(self.path) is None:
                return None
            try:
                self._index = Index(self.path, device=self.device, encoder=self._encoder)
            except IndexNotFoundError:
                return None
            self._encoder = self._index.encoder
        else:
            self._index.refresh()
        return self._index


def _document(doc_id: str, text: str, metadata: dict[str, Any]) -> Document:
    return Document(id=doc_id, page_content=text, metadata=metadata)


def _scored(hits: list[Hit]) -> list[tuple[Document, float]]:
    return [(_document(hit.id, hit.text, hit.metadata), hit.score) for hit in hits]


def _check_lambda(lambda_mult: float) -> None:
    if not 0.0 <= lambda_mult <= 1.0:
        raise ArgumentError(f"lambda_mult must be between 0 (most diverse) and 1 (most relevant), got {lambda_mult}")


def _diverse(index: Index, hits: list[Hit], query_vector: np.ndarray | None, k: int, lambda_mult: float) -> list[Document]:
    """``k`` of ``hits`` by maximal marginal relevance; relevance is the hits' scores, or the cosine to ``query_vector`` if given."""
    found, vectors = index.get_vectors([hit.id for hit in hits])
    # A document that another thread's refresh of the index deleted meanwhile has no vector left: it drops out.
    kept = set(found)
    hits = [hit for hit in hits if hit.id in kept]
    relevance = np.array([hit.score for hit in hits], dtype=np.float32) if query_vector is None else vectors @ query_vector
    return [_document(hits[i].id, hits[i].text, hits[i].metadata) for i in mmr_order(relevance, vectors, k, lambda_mult)]


def mmr_order(relevance: np.ndarray, vectors: np.ndarray, k: int, lambda_mult: float) -> list[int]:
    """Positions of up to ``k`` rows of ``vectors`` (unit length) in the order maximal marginal relevance picks them.

    The first is the most relevant (as in LangChain's ``maximal_marginal_relevance``); each next one maximises
    ``lambda_mult * relevance - (1 - lambda_mult) * its highest cosine to a row already picked``, ties to the earlier row.
    """
    count = min(k, len(relevance))
    if count < 1:
        return []
    cosines = vectors @ vectors.T
    picked = [int(np.argmax(relevance))]
    taken = np.zeros(len(relevance), dtype=bool)
    taken[picked[0]] = True
    redundancy = cosines[picked[0]].copy()
    while len(picked) < count:
        gain = np.where(taken, -np.inf, lambda_mult * relevance - (1.0 - lambda_mult) * redundancy)
        best = int(np.argmax(gain))
        picked.append(best)
        taken[best] = True
        np.maximum(redundancy, cosines[best], out=redundancy)
    return picked
