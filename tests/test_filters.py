"""Typed metadata filters (text form and Python tuples), hostile filters, and the meaning of hybrid fused scores."""

from __future__ import annotations

import json
import random

import pytest
import sqlite_utils
from helpers import DATASET, run_cli, write_jsonl

from indexer import Index, IndexSettings, build_index, parse_condition
from indexer.errors import ArgumentError
from indexer.query import DENSE_WEIGHT, score_fusion
from indexer.store import DocumentStore

PRODUCTS = [json.loads(line) for line in (DATASET / "corpus.jsonl").read_text().splitlines()]

# Fields of mixed JSON types, as an index gets them from a CSV read as text plus JSONL upserts with numbers.
MIXED = [
    {"id": "n10", "text": "ten as a number", "price": 10, "tag": "x", "ok": True, "size": "M", "note": None, "tags": ["a"]},
    {"id": "n25", "text": "twenty-five as a number", "price": 25.5, "tag": "5", "ok": False, "size": "L"},
    {"id": "t5", "text": "five as text", "price": "5", "tag": "y", "ok": True},
    {"id": "t129", "text": "a hundred and twenty-nine as text", "price": "129.99", "tag": "x"},
    {"id": "none", "text": "no price at all", "tag": "z"},
]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("mixed")
    build_index(write_jsonl(folder / "mixed.jsonl", MIXED), folder / "idx", IndexSettings(model=str(tiny_model)))
    with Index(folder / "idx") as index:
        yield index


@pytest.fixture(scope="module")
def sample(sample_index):
    """The sample index, opened once for the module (read only)."""
    with Index(sample_index) as index:
        yield index


def ids(index, *conditions, mode="dense"):
    where = [parse_condition(c) if isinstance(c, str) else c for c in conditions]
    return {hit.id for hit in index.search("anything", k=100, mode=mode, where=where)}


def product_ids(predicate):
    return {p["product_id"] for p in PRODUCTS if predicate(p)}


def test_field_types_lists_each_fields_json_kinds(mixed):
    store = mixed._served.segments[0].store
    assert store.field_types() == {
        "price": {"number", "text"},
        "tag": {"text"},
        "ok": {"boolean"},
        "size": {"text"},
        "note": {"null"},
        "tags": {"array"},
    }
    cached = store._field_types
    store.field_types()["price"].add("mutated")  # callers get copies
    assert store._field_types is cached and store.field_types()["price"] == {"number", "text"}


def test_field_types_of_a_writable_store_follow_its_writes(tmp_path):
    store = DocumentStore.create(tmp_path / "documents.db")
    insert = "INSERT INTO documents (key, id, text, metadata) VALUES (?, ?, ?, ?)"
    store.db.execute(insert, [1, "a", "alpha", json.dumps({"price": 3})])
    assert store.field_types() == {"price": {"number"}}
    store.db.execute(insert, [2, "b", "beta", json.dumps({"price": "4", "colour": "red"})])
    assert store.field_types() == {"price": {"number", "text"}, "colour": {"text"}}
    store.db.conn.commit()
    other = DocumentStore(sqlite_utils.Database(tmp_path / "documents.db"))
    with other.db.conn:
        other.db.execute(insert, [3, "c", "gamma", json.dumps({"flag": True})])
    assert store.field_types()["flag"] == {"boolean"}  # another connection's commit is seen too
    other.close()
    store.close()


def test_text_values_take_the_fields_type(sample, mixed):
    assert ids(sample, "price<30") == product_ids(lambda p: p["price"] < 30)
    assert ids(sample, "price>=129.99", "category=outdoors") == product_ids(lambda p: p["price"] >= 129.99 and p["category"] == "outdoors")
    # Numbers compare with numbers only, text with text only: never across types.
    assert ids(mixed, "price<30") == {"n10", "n25"}
    assert ids(mixed, "price=5") == set()  # "5" reads as a number and the field holds numbers: the text "5" is not 5
    assert ids(mixed, ("price", "=", "5")) == {"t5"}  # a str from the library is text
    assert ids(mixed, "price=129.99") == set() and ids(mixed, ("price", "=", "129.99")) == {"t129"}
    assert ids(mixed, "tag=5") == {"n25"}  # a text field: "5" stays text
    assert ids(mixed, "ok=true") == {"n10", "t5"} and ids(mixed, "ok=FALSE") == {"n25"}
    assert ids(mixed, ("ok", "=", True)) == {"n10", "t5"}
    assert ids(mixed, "size>=M") == {"n10"}  # text ordering where the value is not a number
    assert ids(mixed, "id=t5") == {"t5"} and ids(mixed, "id in t5,n10,nope") == {"t5", "n10"}


def test_not_equal_and_in_lists(mixed):
    # != never matches a document without the field, or whose field holds another type (SQL's NULL semantics).
    assert ids(mixed, "price!=10") == {"n25"}
    assert ids(mixed, ("price", "!=", "5")) == {"t129"}
    assert ids(mixed, "tag!=x") == {"n25", "t5", "none"}
    # in: each element typed on its own.
    assert ids(mixed, "price in 10,129.99,abc") == {"n10"}
    assert ids(mixed, ("price", "in", [10, "129.99"])) == {"n10", "t129"}
    assert ids(mixed, "tag in 5,z") == {"n25", "none"}
    assert ids(mixed, "ok in true") == {"n10", "t5"}


@pytest.mark.parametrize(
    "condition, message",
    [
        ("price<thirty", "filter price<thirty: field 'price' holds numbers; 'thirty' is not a number"),
        ("price<0 OR 1=1", "filter price<0 OR 1=1: field 'price' holds numbers; '0 OR 1=1' is not a number"),
        ("price=nan", "'nan' is not a number"),
        ("category<30", "field 'category' holds text, not numbers, so < would compare '30' alphabetically"),
        ("colour=red", "filter colour=red: no document has a field 'colour'; fields: id, category, price"),
        ("price in 10,ten", "'ten' is not a number"),
        (("price", "<", "30"), "field 'price' holds numbers; '30' is text"),
        (("category", "=", 5), "field 'category' holds text; 5 is a number"),
        (("id", "=", 1), "field 'id' holds text; 1 is a number"),
        (("price", "<", float("nan")), "NaN compares with nothing"),
        (("price", "<", None), "values are numbers, text or booleans, not NoneType"),
        (("price", "in", "10"), "'in' takes a list of values"),
        (("price", "~", 10), "unknown operator '~'"),
        (('pri"ce', "=", 1), "cannot be filtered on"),
        (("pri\x00ce", "=", 1), "cannot be filtered on"),
        (("pri\nce", "=", 1), "cannot be filtered on"),
        (("", "=", 1), "cannot be filtered on"),
    ],
)
def test_conditions_that_cannot_compare_are_errors(sample, condition, message):
    where = [parse_condition(condition) if isinstance(condition, str) else condition]
    for mode in ("dense", "keyword", "hybrid"):
        with pytest.raises(ArgumentError) as caught:
            sample.search("kitchen gadget", k=3, mode=mode, where=where)
        assert message in str(caught.value) and "\n" not in str(caught.value)


def test_type_errors_on_mixed_and_unfilterable_fields(mixed):
    with pytest.raises(ArgumentError, match="field 'price' holds numbers and text; True is a boolean"):
        mixed.search("x", where=[("price", "=", True)])
    with pytest.raises(ArgumentError, match="field 'ok' holds true/false; 'yes' is not true or false"):
        mixed.search("x", where=[parse_condition("ok=yes")])
    with pytest.raises(ArgumentError, match="field 'tags' holds arrays; filters compare numbers, text and true/false"):
        mixed.search("x", where=[parse_condition("tags=a")])
    with pytest.raises(ArgumentError, match="field 'note' holds nulls"):
        mixed.search("x", where=[parse_condition("note=null")])


def test_integers_beyond_64_bits_compare_as_floats(sample, mixed):
    everything = product_ids(lambda p: True)
    assert ids(sample, "price<99999999999999999999") == everything
    assert ids(sample, "price>-99999999999999999999") == everything
    assert ids(sample, ("price", "<", 10**30)) == everything
    assert ids(sample, ("price", ">", -(10**400))) == everything  # beyond even a float: -infinity
    assert ids(sample, "price>1e400") == set()
    assert ids(sample, "price in 99999999999999999999,129.99") == product_ids(lambda p: p["price"] == 129.99)
    assert ids(mixed, ("price", "in", [10**400, 10])) == {"n10"}
    assert parse_condition("price<99999999999999999999") == ("price", "<", 1e20)
    assert parse_condition("price<=20") == ("price", "<=", 20) and parse_condition("x in a, 3") == ("x", "in", ["a", 3])


def test_cli_filters_exit_cleanly(sample_index):
    ok = run_cli("query", str(sample_index), "x", "-k", "100", "--where", "price<99999999999999999999", "--json")
    assert {h["id"] for h in json.loads(ok.stdout)["hits"]} == product_ids(lambda p: True)
    bad = run_cli("query", str(sample_index), "x", "--where", "price<thirty", check=False)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == "indexer: error: filter price<thirty: field 'price' holds numbers; 'thirty' is not a number\n"
    unknown = run_cli("query", str(sample_index), "x", "--mode", "hybrid", "--where", "colour=red", check=False)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr and "no document has a field 'colour'" in unknown.stderr


def test_http_filters_are_400_not_500(sample_index):
    from fastapi.testclient import TestClient

    from indexer.server import create_app

    client = TestClient(create_app(sample_index))
    big = client.post("/search", json={"query": "x", "k": 100, "where": ["price<99999999999999999999"]})
    assert big.status_code == 200 and len(big.json()["hits"]) == len(PRODUCTS)
    for where, message in ((["price<thirty"], "'thirty' is not a number"), (['pri"ce<3'], "cannot be filtered on"),
                           (["pri\x00ce<3"], "cannot be filtered on"), (["colour=red"], "no document has a field")):
        response = client.post("/search", json={"query": "x", "mode": "hybrid", "where": where})
        assert response.status_code == 400 and message in response.json()["detail"]


def test_hybrid_score_of_a_document_only_dense_found_is_its_weighted_cosine(sample):
    where = [parse_condition("price<20")]
    assert sample.search("kitchen gadget", k=5, mode="keyword", where=where) == []  # no cheap product has either word
    dense = sample.search("kitchen gadget", k=5, mode="dense", where=where)
    hybrid = sample.search("kitchen gadget", k=5, mode="hybrid", where=where)
    assert hybrid[0].id == dense[0].id and "Cat Feeder" in hybrid[0].text
    assert [h.id for h in hybrid] == [d.id for d in dense]
    for h, d in zip(hybrid, dense):
        assert h.score == pytest.approx(DENSE_WEIGHT * max(d.score, 0.0))
    assert hybrid[0].score < 0.5


def test_hybrid_score_combines_cosine_and_bm25_share(sample):
    query = "espresso machine with milk frother"
    dense = {h.id: h.score for h in sample.search(query, k=len(PRODUCTS), mode="dense")}
    keyword = {h.id: h.score for h in sample.search(query, k=len(PRODUCTS), mode="keyword")}
    best = max(keyword.values())
    for hit in sample.search(query, k=20, mode="hybrid"):
        expected = DENSE_WEIGHT * max(dense[hit.id], 0.0) + (1 - DENSE_WEIGHT) * keyword.get(hit.id, 0.0) / best
        assert hit.score == pytest.approx(expected) and 0.0 <= hit.score <= 1.0


def test_fused_scores_are_bounded_and_monotone():
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 12)
        dense = (list(range(n)), [rng.uniform(-1, 1) for _ in range(n)])
        words = rng.sample(range(2 * n), rng.randint(0, n))
        keyword = (words, [rng.uniform(0.01, 30) for _ in words])
        keys, scores = score_fusion(dense, keyword, k=100)
        assert all(0.0 <= s <= 1.0 for s in scores) and scores == sorted(scores, reverse=True)
        fused = dict(zip(keys, scores))
        target = rng.choice(keys)
        # A higher cosine, or a higher BM25, never lowers a document's score.
        if target in dense[0]:
            cosine = dense[1][dense[0].index(target)]
            better = (dense[0], [c + 0.2 if key == target else c for key, c in zip(*dense)])
            raised = dict(zip(*score_fusion(better, keyword, 100)))[target]
            assert raised > fused[target] if 0 <= cosine <= 0.8 else raised >= fused[target] - 1e-12
        if target in keyword[0]:
            better = (keyword[0], [b * 1.5 if key == target else b for key, b in zip(*keyword)])
            assert dict(zip(*score_fusion(dense, better, 100)))[target] >= fused[target] - 1e-12
    # Found by one list only: that list's weight times its part, never 1.
    assert score_fusion(([1], [0.31]), ([], []), 10) == ([1], [pytest.approx(DENSE_WEIGHT * 0.31)])
    assert score_fusion(([], []), ([4], [7.5]), 10) == ([4], [pytest.approx(1 - DENSE_WEIGHT)])
    assert score_fusion(([1], [-0.2]), ([], []), 10)[1] == [0.0]
    assert score_fusion(([1, 2], [1.0, 0.5]), ([1, 2], [8.0, 2.0]), 10) == ([1, 2], [pytest.approx(1.0), pytest.approx(0.6 * 0.5 + 0.4 * 0.25)])
