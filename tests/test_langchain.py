"""The LangChain adapter: LangChain's own standard vector store tests, and what they do not cover."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("langchain_core")
langchain_tests = pytest.importorskip("langchain_tests.integration_tests")
from langchain_core.documents import Document  # noqa: E402
from langchain_core.embeddings import DeterministicFakeEmbedding  # noqa: E402

from indexer import Index, IndexSettings, index_info  # noqa: E402
from indexer.errors import ArgumentError, ModelError  # noqa: E402
from indexer.integrations.langchain import IndexerVectorStore  # noqa: E402


class TestStandardVectorStore(langchain_tests.VectorStoreIntegrationTests):
    """LangChain's standard synchronous suite, unmodified, with its deterministic fake embeddings."""

    @pytest.fixture()
    def vectorstore(self, tmp_path):
        yield IndexerVectorStore(tmp_path / "store", self.get_embeddings())

    @property
    def has_async(self) -> bool:
        return False


NOTES = [
    ("n1", "Rivers carve deep valleys through soft rock over millions of years.", {"topic": "geology", "year": 2019}),
    ("n2", "An espresso machine forces hot water through finely ground coffee.", {"topic": "coffee", "year": 2021}),
    ("n3", "Glaciers grind mountains into U-shaped valleys.", {"topic": "geology", "year": 2023}),
    ("n4", "A moka pot brews strong coffee on the stove.", {"topic": "coffee", "year": 2024}),
]


@pytest.fixture
def own_model_store(tmp_path, tiny_model):
    store = IndexerVectorStore(tmp_path / "notes", settings=IndexSettings(model=str(tiny_model)))
    ids, texts, metadatas = zip(*NOTES)
    assert store.add_texts(list(texts), list(metadatas), ids=list(ids)) == list(ids)
    return store


def test_own_model_filters_modes_vectors_and_retriever(own_model_store, tiny_model):
    store = own_model_store
    assert index_info(store.path)["settings"]["model"] == str(tiny_model)  # the index's own model embeds
    geology = store.similarity_search("valleys", k=4, filter={"topic": "geology"})
    assert {d.id for d in geology} == {"n1", "n3"} and all(d.metadata["topic"] == "geology" for d in geology)
    assert [d.id for d in store.similarity_search("valleys", k=4, filter={"year": {"$gte": 2021}, "topic": {"$ne": "coffee"}})] == ["n3"]
    keyword = store.similarity_search_with_score("espresso", k=4, mode="keyword")
    assert [d.id for d, _ in keyword] == ["n2"] and keyword[0][1] > 0
    retriever = store.as_retriever(search_kwargs={"k": 2, "mode": "hybrid", "filter": {"topic": "coffee"}})
    assert {d.id for d in retriever.invoke("espresso coffee")} == {"n2", "n4"}
    assert store.similarity_search(" ", k=2) == [] and retriever.invoke("") == []  # a blank query finds nothing

    index = Index(store.path)
    vector = index.encoder.encode_queries(["moka pot on the stove"])[0]
    by_vector = store.similarity_search_with_score_by_vector(list(vector * 3.0), k=1)  # scaled: searched as a unit vector
    by_text = store.similarity_search_with_score("moka pot on the stove", k=1)
    assert by_vector[0][0] == by_text[0][0] and abs(by_vector[0][1] - by_text[0][1]) < 1e-5

    assert store.get_by_ids(["n4", "missing", "n1"]) == [
        Document(id="n4", page_content=NOTES[3][1], metadata=NOTES[3][2]),
        Document(id="n1", page_content=NOTES[0][1], metadata=NOTES[0][2]),
    ]
    store.delete(["n1", "missing"])
    assert [d.id for d in store.similarity_search("valleys", k=4, filter={"topic": "geology"})] == ["n3"]
    with pytest.raises(ArgumentError, match="unknown operator"):
        store.similarity_search("x", filter={"year": {"$regex": "20"}})


def test_external_embeddings_are_recorded_and_required_and_no_torch_is_loaded(tmp_path):
    path = tmp_path / "fake"
    code = (
        "import sys, json\n"
        "from langchain_core.embeddings import DeterministicFakeEmbedding\n"
        "from indexer.integrations.langchain import IndexerVectorStore\n"
        f"store = IndexerVectorStore({str(path)!r}, DeterministicFakeEmbedding(size=8))\n"
        "store.add_texts(['alpha', 'beta', 'gamma'], ids=['a', 'b', 'c'])\n"
        "hits = store.similarity_search('beta', k=2)\n"
        "print(json.dumps({'hits': [d.id for d in hits], 'torch': 'torch' in sys.modules}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["hits"][0] == "b" and out["torch"] is False  # our model (and torch) never loaded

    info = index_info(path)
    assert info["settings"]["model"] == "external:langchain_core.embeddings.fake.DeterministicFakeEmbedding"
    with pytest.raises(ModelError, match="external encoder"):
        Index(path)  # our model cannot embed queries for it
    fake = DeterministicFakeEmbedding(size=8)
    store = IndexerVectorStore(path, fake)
    stored = np.array(fake.embed_documents(["gamma"])[0], dtype=np.float32)
    hit = store.similarity_search_with_score_by_vector(list(stored), k=1)[0]
    assert hit[0].id == "c" and abs(hit[1] - 1.0) < 1e-5  # the external vectors, stored (as unit vectors)

    # Another encoder (same class, other settings: another fingerprint) is refused, not mixed in.
    with pytest.raises(ModelError, match="external encoder"):
        IndexerVectorStore(path, DeterministicFakeEmbedding(size=8), embedding_name="other").add_texts(["delta"], ids=["d"])
    assert [d.id for d in store.get_by_ids(["d"])] == []
    with pytest.raises(ModelError, match="another configuration"):  # same class, another size: another fingerprint
        IndexerVectorStore(path, DeterministicFakeEmbedding(size=4)).similarity_search("alpha")


def test_from_texts_builds_the_index_and_needs_a_path(tmp_path):
    fake = DeterministicFakeEmbedding(size=8)
    store = IndexerVectorStore.from_texts(["red apple", "green pear"], fake, [{"kind": "apple"}, {"kind": "pear"}],
                                          ids=["x", "y"], index=tmp_path / "fruit")
    assert [d.id for d in store.similarity_search("green pear", k=1)] == ["y"]
    assert store.similarity_search_with_relevance_scores("green pear", k=1)[0][1] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ArgumentError, match="index=PATH"):
        IndexerVectorStore.from_texts(["a"], fake)
