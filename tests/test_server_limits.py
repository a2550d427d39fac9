"""The HTTP service's bounds: the size of a search answer, the /metrics series, strict request bodies, offline API docs."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from helpers import served, write_jsonl

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from indexer import IndexSettings, build_index  # noqa: E402
from indexer.server import create_app  # noqa: E402

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"content-type": "application/json"}
BIG = 100_000  # characters in each large document's text


@pytest.fixture(scope="module")
def big_index(tmp_path_factory, tiny_model):
    """Five documents of 100,000 characters that all hold "zebra", and one short one."""
    folder = tmp_path_factory.mktemp("limits")
    records = [{"id": f"big{i}", "text": f"zebra number {i} " + "é" * (BIG - 15), "shelf": i} for i in range(5)]
    records.append({"id": "small", "text": "a small note", "shelf": 9})
    path = folder / "idx"
    build_index(write_jsonl(folder / "docs.jsonl", records), path, IndexSettings(model=str(tiny_model)))
    return path


def test_an_answer_over_the_response_budget_is_refused_in_one_line(big_index):
    # Five hits of 100,000 two-byte characters: about 1 MB of answer, against a 300 kB budget.
    client = TestClient(create_app(big_index, max_response_bytes=300_000))
    response = client.post("/search", json={"queries": ["zebra"], "k": 5, "mode": "keyword"})
    assert response.status_code == 413
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    size = int(re.search(r"would be ([\d,]+) bytes", detail).group(1).replace(",", ""))
    assert 5 * 2 * BIG - 100 <= size < 5 * 2 * BIG + 2000
    assert "300,000" in detail and "text_chars" in detail and "include_text" in detail and "k" in detail
    # Within the budget the texts come whole, with no flag.
    one = client.post("/search", json={"query": "zebra", "k": 1, "mode": "keyword"})
    assert one.status_code == 200 and len(one.content) <= 300_000
    assert set(one.json()["hits"][0]) == {"id", "score", "text", "metadata"} and len(one.json()["hits"][0]["text"]) == BIG


def test_texts_cut_to_text_chars_are_flagged_and_include_text_false_leaves_them_out(big_index):
    client = TestClient(create_app(big_index, max_response_bytes=300_000))
    cut = client.post("/search", json={"query": "zebra", "k": 6, "mode": "keyword", "text_chars": 20})
    assert cut.status_code == 200
    hits = {hit["id"]: hit for hit in cut.json()["hits"]}
    assert set(hits) >= {f"big{i}" for i in range(5)}
    assert all(len(hits[f"big{i}"]["text"]) == 20 and hits[f"big{i}"]["text_truncated"] is True for i in range(5))
    assert hits["big3"]["text"] == "zebra number 3 " + "é" * 5 and hits["big3"]["metadata"] == {"shelf": 3}
    whole = client.post("/search", json={"query": "small note", "k": 1, "mode": "keyword", "text_chars": 20}).json()["hits"][0]
    assert (whole["text"], whole["text_truncated"]) == ("a small note", False)
    bare = client.post("/search", json={"queries": ["zebra", "number"], "k": 5, "mode": "keyword", "include_text": False})
    assert bare.status_code == 200
    assert all(set(hit) == {"id", "score", "metadata"} for result in bare.json()["results"] for hit in result["hits"])
    for payload in ({"text_chars": -1}, {"text_chars": "20"}, {"include_text": "no"}):
        assert client.post("/search", json={"query": "zebra", **payload}).status_code == 422


def test_metrics_series_stay_bounded_under_made_up_methods_and_paths(big_index):
    client = TestClient(create_app(big_index))
    for i in range(50):
        client.request(f"BREW{i}", "/search")
        client.request(f"BREW{i}", f"/no/such/path/{i}")
        client.get(f"/no/such/path/{i}")
    metrics = client.get("/metrics").text
    series = [line for line in metrics.splitlines() if line.startswith("indexer_requests_total{")]
    assert len(series) <= 5, series
    assert not any("BREW" in line or "/no/such" in line for line in series)
    assert 'route="unmatched",method="other",status="404"} 50' in metrics
    assert 'route="unmatched",method="GET",status="404"} 50' in metrics


@pytest.mark.parametrize(
    "route, body, key",
    [
        ("/search", '{"query": "zebra", "k": 2, "k": 5}', "k"),
        ("/search", '{"query": "zebra", "query": "note"}', "query"),
        ("/documents", '{"documents": [{"id": "d", "text": "t", "fields": {"title": "a", "title": "b"}}]}', "title"),
        ("/documents", '{"documents": [{"id": "d", "text": "t", "meta": [{"x": {"y": 1, "y": 2}}]}]}', "y"),
        ("/documents", '{"documents": [], "documents": [{"id": "d", "text": "t"}]}', "documents"),
    ],
)
def test_duplicate_keys_at_any_depth_are_refused_naming_the_key(big_index, route, body, key):
    client = TestClient(create_app(big_index, api_key=KEY))
    response = client.post(route, content=body, headers={**JSON, **AUTH})
    assert response.status_code == 422 and response.json() == {"detail": f"duplicate key {key!r} in the request body"}


@pytest.mark.parametrize("payload", [{"k": True}, {"k": False}, {"k": 3.0}, {"k": "3"}, {"text_chars": True}])
def test_booleans_and_other_non_integers_are_refused_where_an_integer_is_expected(big_index, payload):
    client = TestClient(create_app(big_index))
    response = client.post("/search", json={"query": "zebra", "mode": "keyword", **payload})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", next(iter(payload))] and error["type"] == "int_type"


def test_the_request_limits_still_hold_with_strict_parsing(big_index):
    client = TestClient(create_app(big_index, api_key=KEY))
    assert client.post("/search", json={"query": "zebra", "k": 3, "mode": "keyword"}).status_code == 200
    deep = '{"query": "zebra", "where": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert client.post("/search", content=deep, headers=JSON).status_code in (400, 422)
    huge = client.post("/search", content=b"x", headers={**JSON, "content-length": str(64 * 2**20)})
    assert huge.status_code == 413


def external(page: str) -> list[str]:
    """The URLs in ``page`` that point to another host."""
    return re.findall(r"""(?:https?:)?//[^\s"'<>)]+""", page)


def test_docs_and_every_asset_they_load_are_served_by_the_app_itself(big_index):
    client = TestClient(create_app(big_index))
    for docs in ("/docs", "/redoc"):
        page = client.get(docs)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assets = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", page.text)
        assert assets and not external(page.text), external(page.text)
        for asset in assets:
            assert asset.startswith("/"), asset
            assert client.get(asset).status_code == 200, asset
    assert "/search" in client.get("/openapi.json").json()["paths"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def offline_browser():
    """Headless chromium that cannot resolve any host but loopback."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no chromium and chromedriver here (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes, failed ones too
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_docs_list_the_routes_in_a_real_browser_offline(big_index, offline_browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with served(big_index) as base:
        offline_browser.get(base + "/docs")
        WebDriverWait(offline_browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
        paths = {e.get_attribute("data-path") for e in offline_browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        assert {"/search", "/documents", "/documents/{doc_id}", "/health", "/metrics"} <= paths
        events = [json.loads(entry["message"])["message"] for entry in offline_browser.get_log("performance")]
        requested = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
        remote = [url for url in requested if re.match("(https?|wss?):", url) and not url.startswith(base + "/")]
        assert f"{base}/openapi.json" in requested and not remote, remote


def test_search_page_shows_big_texts_cut_short(big_index, offline_browser):
    """The page asks for texts cut to 2,000 characters: a page of big documents stays within the answer's budget."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    with served(big_index) as base:
        offline_browser.get(base + "/")
        offline_browser.find_element(By.NAME, "q").send_keys("zebra")
        Select(offline_browser.find_element(By.ID, "mode")).select_by_value("keyword")
        offline_browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(offline_browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "li.hit .text"))
        texts = [e.text for e in offline_browser.find_elements(By.CSS_SELECTOR, "li.hit .text")]
        assert len(texts) == 5 and all(t.startswith("zebra number") and t.endswith("é …") and len(t) == 2002 for t in texts)
