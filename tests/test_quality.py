"""Evaluation metrics, keyword and hybrid search, metadata filters and hostile queries."""

from __future__ import annotations

import json
import math

import pytest
from helpers import DATASET, run_cli, write_jsonl

from indexer import Index, IndexSettings, build_index, evaluate_index, parse_condition, read_judgements
from indexer.errors import ArgumentError, SourceError
from indexer.evaluate import Judgement, mrr_at, ndcg_at, recall_at, score_rankings


def test_metrics_match_hand_computed_values():
    ranked = ["a", "b", "c", "d", "e"]
    graded = {"b": 2.0, "d": 1.0, "z": 1.0}
    assert recall_at(ranked, graded, 1) == 0.0
    assert recall_at(ranked, graded, 10) == pytest.approx(2 / 3)
    assert mrr_at(ranked, graded, 10) == 0.5
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    ideal = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at(ranked, graded, 10) == pytest.approx(dcg / ideal)
    assert ndcg_at(ranked, graded, 10) == pytest.approx(0.5406, abs=1e-4)
    assert ndcg_at(["b", "d", "z"], graded, 10) == pytest.approx(1.0)
    assert mrr_at(["x"], graded) == 0.0 and ndcg_at(["x"], graded) == 0.0
    means, per_query = score_rankings(
        [Judgement("q1", "one", {"a": 1.0}), Judgement("q2", "two", {"c": 1.0})], [["a", "b"], ["b", "c"]]
    )
    assert means["recall@1"] == 0.5 and means["mrr@10"] == 0.75
    assert means["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 2, abs=1e-4)
    assert [q["query_id"] for q in per_query] == ["q1", "q2"]


def test_judgements_in_notebook_beir_and_csv_formats(tmp_path):
    notebook = read_judgements(DATASET / "queries.jsonl")
    first = json.loads((DATASET / "queries.jsonl").read_text().splitlines()[0])
    assert len(notebook) == 35 and notebook[0].relevant == {first["product_id"]: 1.0} and notebook[0].text == first["query"]
    write_jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"}, {"_id": "q3", "text": "unjudged"}])
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t1\nq2\td3\t1\nq2\td4\t0\n")
    beir = read_judgements(tmp_path / "queries.jsonl", tmp_path / "qrels.tsv")
    assert [(j.query_id, j.relevant) for j in beir] == [("q1", {"d1": 2.0, "d2": 1.0}), ("q2", {"d3": 1.0})]
    (tmp_path / "truth.csv").write_text("question,course,document\nhow do I join?,zoomcamp,abc123\n")
    assert read_judgements(tmp_path / "truth.csv")[0].relevant == {"abc123": 1.0}
    (tmp_path / "bad.jsonl").write_text('{"query": "x", "product_id": "P1"}\n{"query": "y"}\n')
    with pytest.raises(SourceError, match=r"bad\.jsonl:2: missing relevant-document field 'product_id'"):
        read_judgements(tmp_path / "bad.jsonl")
    # A blank query is named where it is read, not found by the search after the model has loaded.
    (tmp_path / "blank.jsonl").write_text('{"query": "x", "product_id": "P1"}\n{"query": " ", "product_id": "P2"}\n')
    with pytest.raises(SourceError, match=r"blank\.jsonl:2: empty query text field 'query'"):
        read_judgements(tmp_path / "blank.jsonl")
    write_jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": ""}])
    with pytest.raises(SourceError, match=r"queries\.jsonl:2: empty query text field 'text'"):
        read_judgements(tmp_path / "queries.jsonl", tmp_path / "qrels.tsv")


CODES = [
    {"id": f"err{n}", "text": f"Error code ZQ-{n} means the coolant pump of the reactor is overheating and must be serviced."}
    for n in range(7710, 7730)
] + [
    {"id": "target-code", "text": "Log entry ZQ-7788 recorded by the night shift."},
    {"id": "target-paraphrase", "text": "Resetting a forgotten account password from the sign-in page."},
    {"id": "billing", "text": "Invoices are emailed at the start of every month."},
    {"id": "shipping", "text": "Parcels ship within two working days."},
]


@pytest.fixture(scope="module")
def codes_index(tmp_path_factory):
    folder = tmp_path_factory.mktemp("codes")
    path = folder / "codes"
    build_index(write_jsonl(folder / "codes.jsonl", CODES), path)
    return Index(path)


def top_ids(index, query, mode, k=3):
    return [hit.id for hit in index.search(query, k=k, mode=mode)]


def test_hybrid_finds_what_each_mode_alone_misses(codes_index):
    code_query = "coolant pump overheating error ZQ-7788"
    paraphrase = "I cannot remember my login credentials"
    assert "target-code" not in top_ids(codes_index, code_query, "dense")
    assert top_ids(codes_index, code_query, "keyword")[0] == "target-code"
    assert "target-paraphrase" not in top_ids(codes_index, paraphrase, "keyword")
    assert top_ids(codes_index, paraphrase, "dense")[0] == "target-paraphrase"
    assert "target-code" in top_ids(codes_index, code_query, "hybrid")
    assert "target-paraphrase" in top_ids(codes_index, paraphrase, "hybrid")


@pytest.mark.parametrize(
    "hostile",
    ['"', "*", "a:b", "-x", "AND", "OR NOT", "(", ")", '"unbalanced quote', "NEAR(a b)", "col:*",
     "'; DROP TABLE documents; --", "^", "ZQ-7788*", "pump AND (reactor", "{x y}", "\x00"],
)
def test_hostile_queries_never_error(codes_index, hostile):
    for mode in ("keyword", "hybrid", "dense"):
        hits = codes_index.search(hostile, k=5, mode=mode)
        assert isinstance(hits, list) and len(hits) <= 5
    assert codes_index.search("zq 7788 (", k=1, mode="keyword")[0].id == "target-code"


@pytest.mark.parametrize("blank", ["", "   ", "\n\t"])
def test_blank_queries_are_refused_in_every_mode(codes_index, blank):
    for mode in ("keyword", "hybrid", "dense"):
        with pytest.raises(ArgumentError, match="empty question"):
            codes_index.search(blank, k=5, mode=mode)
        with pytest.raises(ArgumentError, match="empty question"):
            codes_index.search_many(["pump", blank], k=5, mode=mode)


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_filters_return_k_results_when_matches_are_rare(tmp_path, index_type):
    path = tmp_path / "products"
    build_index(DATASET / "corpus.jsonl", path, IndexSettings(index_type=index_type))
    index = Index(path)
    products = [json.loads(line) for line in (DATASET / "corpus.jsonl").read_text().splitlines()]
    baby = {p["product_id"] for p in products if p["category"] == "baby"}
    for mode in ("dense", "keyword", "hybrid"):
        hits = index.search("waterproof hiking boots for rocky trails", k=len(baby), mode=mode, where=[("category", "=", "baby")])
        if mode == "keyword":
            assert {h.id for h in hits} <= baby  # BM25 only returns documents sharing a word
        else:
            assert {h.id for h in hits} == baby
    cheap_kitchen = {p["product_id"] for p in products if p["category"] == "kitchen" and p["price"] < 30}
    hits = index.search("boots", k=50, where=[parse_condition("category=kitchen"), parse_condition("price<30")])
    assert {h.id for h in hits} == cheap_kitchen
    several = index.search("boots", k=3, where=[parse_condition("category in toys,pets")])
    assert len(several) == 3 and all(h.metadata["category"] in ("toys", "pets") for h in several)
    assert index.search("boots", k=3, where=[("category", "=", "x' OR 1=1 --")]) == []
    assert index.search("boots", k=3, where=[("id", "!=", "P0001")])[0].id != "P0001"


def test_condition_parsing():
    assert parse_condition("price<=20") == ("price", "<=", 20)
    assert parse_condition("category = home") == ("category", "=", "home")
    assert parse_condition("rating>4.5") == ("rating", ">", 4.5)
    assert parse_condition("lang in en, de,3") == ("lang", "in", ["en", "de", 3])
    with pytest.raises(ArgumentError, match="is not FIELD=VALUE"):
        parse_condition("no operator here")


def test_evaluate_cli_and_library(tmp_path, sample_index):
    judgements = read_judgements(DATASET / "queries.jsonl")
    means, per_query = evaluate_index(Index(sample_index), judgements, mode="dense")
    assert means["recall@10"] == 1.0 and 0.9 <= means["ndcg@10"] <= 1.0 and len(per_query) == 35
    out = tmp_path / "per-query.jsonl"
    result = json.loads(
        run_cli("evaluate", str(sample_index), "--queries", str(DATASET / "queries.jsonl"), "--mode", "dense",
                "--mode", "hybrid", "--per-query", str(out), "--json").stdout
    )
    assert result["queries"] == 35 and set(result["modes"]) == {"dense", "hybrid"}
    assert result["modes"]["dense"] == means
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 70 and {"mode", "query_id", "ndcg@10", "top10", "relevant"} <= set(rows[0])
    table = run_cli("evaluate", str(sample_index), "--queries", str(DATASET / "queries.jsonl")).stdout
    assert "ndcg@10" in table and "dense" in table
    hybrid = run_cli("query", str(sample_index), "boots", "--mode", "hybrid", "--where", "category=outdoors", "--json").stdout
    assert all(h["metadata"]["category"] == "outdoors" for h in json.loads(hybrid)["hits"])


def test_keyword_table_follows_upsert_and_delete(tmp_path, tiny_model):
    from indexer import delete_documents, upsert_documents

    path = tmp_path / "idx"
    build_index(write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "text": "alpha beta"}, {"id": 2, "text": "gamma delta"}]), path,
                IndexSettings(model=str(tiny_model)))
    upsert_documents(path, write_jsonl(tmp_path / "u.jsonl", [{"id": 1, "text": "omega"}, {"id": 3, "text": "alpha again"}]))
    index = Index(path)
    assert [h.id for h in index.search("alpha", mode="keyword")] == ["3"]
    assert [h.id for h in index.search("omega", mode="keyword")] == ["1"]
    delete_documents(path, ["3"])
    index.refresh()
    assert index.search("alpha", mode="keyword") == []
    assert [h.id for h in index.search("gamma", mode="keyword")] == ["2"]
