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
from indexer.integrations.langchain import IndexerVectorStore, external_encoder  # noqa: E402


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


# Three near-duplicates ("boots"), other documents on the same need, and a kitchen aside for filters.
GEAR = [
    ("b1", "Waterproof leather hiking boots keep your feet dry on muddy trails.", {"group": "boots", "shop": "outdoors"}),
    ("b2", "Waterproof leather hiking boots that keep feet dry on muddy trails.", {"group": "boots", "shop": "outdoors"}),
    ("b3", "These waterproof leather hiking boots keep your feet dry on muddy mountain trails.", {"group": "boots", "shop": "outdoors"}),
    ("g1", "Gaiters stop mud and rain water from getting into your shoes on wet paths.", {"group": "gaiters", "shop": "outdoors"}),
    ("s1", "Merino wool socks stay warm even when wet and cushion long hikes.", {"group": "socks", "shop": "outdoors"}),
    ("j1", "A breathable rain jacket keeps you dry in a mountain storm.", {"group": "jacket", "shop": "outdoors"}),
    ("p1", "Trekking poles take the strain off your knees on steep descents.", {"group": "poles", "shop": "outdoors"}),
    ("k1", "A waterproof apron keeps you dry while washing muddy vegetables.", {"group": "apron", "shop": "kitchen"}),
    ("k2", "Rubber kitchen clogs keep your feet dry on a wet kitchen floor.", {"group": "clogs", "shop": "kitchen"}),
    ("k3", "A cast iron skillet sears steak evenly.", {"group": "skillet", "shop": "kitchen"}),
]
BOOTS_QUERY = "waterproof boots that keep feet dry on muddy trails"


@pytest.fixture(scope="module")
def gear_store(tmp_path_factory):
    """The gear corpus in an index embedded with the real model: near-duplicates must be near for MMR to matter."""
    store = IndexerVectorStore(tmp_path_factory.mktemp("gear") / "gear")
    ids, texts, metadatas = zip(*GEAR)
    store.add_texts(list(texts), list(metadatas), ids=list(ids))
    return store


def test_mmr_retriever_returns_k_and_lambda_one_is_similarity_order(gear_store):
    store = gear_store
    for k, fetch_k in ((3, 8), (5, 10), (4, 2)):  # fetch_k below k still gives k
        mmr = store.as_retriever(search_type="mmr", search_kwargs={"k": k, "fetch_k": fetch_k, "lambda_mult": 0.5})
        found = mmr.invoke(BOOTS_QUERY)
        assert len(found) == k and len({d.id for d in found}) == k
        assert all(d == store.get_by_ids([d.id])[0] for d in found)  # whole documents, as stored
    similar = store.similarity_search(BOOTS_QUERY, k=6)
    relevant_only = store.as_retriever(search_type="mmr", search_kwargs={"k": 6, "fetch_k": 10, "lambda_mult": 1.0})
    assert relevant_only.invoke(BOOTS_QUERY) == similar
    vector = list(Index(store.path).encoder.encode_queries([BOOTS_QUERY])[0])
    assert store.max_marginal_relevance_search_by_vector(vector, k=6, fetch_k=10, lambda_mult=1.0) == similar
    with pytest.raises(ArgumentError, match="lambda_mult"):
        store.max_marginal_relevance_search(BOOTS_QUERY, lambda_mult=1.5)


def test_mmr_picks_fewer_near_duplicates_than_similarity_search(gear_store):
    store = gear_store

    def duplicates(documents):
        return sum(d.metadata["group"] == "boots" for d in documents)

    similar = store.similarity_search(BOOTS_QUERY, k=3)
    assert duplicates(similar) == 3  # what MMR is for: the top 3 say one thing three times
    for mode in ("dense", "hybrid", "keyword"):
        diverse = store.as_retriever(search_type="mmr", search_kwargs={"k": 3, "fetch_k": 10, "lambda_mult": 0.25, "mode": mode})
        picked = diverse.invoke(BOOTS_QUERY)
        assert len(picked) == 3 and duplicates(picked) == 1, (mode, [d.id for d in picked])
    vector = list(Index(store.path).encoder.encode_queries([BOOTS_QUERY])[0])
    by_vector = store.max_marginal_relevance_search_by_vector(vector, k=3, fetch_k=10, lambda_mult=0.25)
    assert duplicates(by_vector) == 1 and by_vector[0] == similar[0]  # the most relevant comes first


def test_mmr_honours_filters(gear_store):
    store = gear_store
    kitchen = {"shop": "kitchen"}
    for mode in ("dense", "hybrid"):
        retriever = store.as_retriever(search_type="mmr",
                                       search_kwargs={"k": 3, "fetch_k": 10, "lambda_mult": 0.25, "filter": kitchen, "mode": mode})
        assert {d.id for d in retriever.invoke(BOOTS_QUERY)} == {"k1", "k2", "k3"}  # all there are, nothing else
    not_boots = store.max_marginal_relevance_search(BOOTS_QUERY, k=4, fetch_k=10, filter={"group": {"$ne": "boots"}, "shop": "outdoors"})
    assert {d.id for d in not_boots} == {"g1", "s1", "j1", "p1"}
    vector = list(Index(store.path).encoder.encode_queries([BOOTS_QUERY])[0])
    assert {d.id for d in store.max_marginal_relevance_search_by_vector(vector, k=5, filter=kitchen)} == {"k1", "k2", "k3"}
    assert store.max_marginal_relevance_search(" ", k=2) == []


class CountingEmbedding(DeterministicFakeEmbedding):
    """LangChain's fake embeddings, remembering every text embedded as a document."""

    embedded: list = []

    def embed_documents(self, texts):
        self.embedded.extend(texts)
        return super().embed_documents(texts)


def test_mmr_uses_stored_vectors_and_embeds_only_where_the_structure_keeps_codes(tmp_path):
    texts = [f"note {word}" for word in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")]
    ids = [f"t{i}" for i in range(len(texts))]
    fake = CountingEmbedding(size=16, embedded=[])
    # Built whole as 8-bit scalar codes (no exact vectors kept); the upsert after it goes to a small Flat segment.
    quantised = IndexerVectorStore(tmp_path / "sq8", fake, settings=IndexSettings(index_type="SQ8"))
    quantised.add_texts(texts[:6], ids=ids[:6])
    quantised.add_texts(texts[6:], ids=ids[6:])
    exact = IndexerVectorStore(tmp_path / "flat", fake)
    exact.add_texts(texts, ids=ids)
    truth = np.array(fake.embed_documents(texts), dtype=np.float32)
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)

    for store, reembedded in ((exact, []), (quantised, texts[:6])):
        fake.embedded.clear()
        found = store.max_marginal_relevance_search("note beta", k=8, fetch_k=8, lambda_mult=0.5)
        assert sorted(d.id for d in found) == sorted(ids)
        assert sorted(fake.embedded) == sorted(reembedded)  # only the SQ8 segment's documents are embedded again
        found_ids, vectors = Index(store.path, encoder=external_encoder(fake)).get_vectors(["t7", "missing", "t0", "t7"])
        assert found_ids == ["t7", "t0"]
        assert np.allclose(vectors, truth[[7, 0]], atol=1e-6)  # stored vectors back exactly, or embedded exactly again
