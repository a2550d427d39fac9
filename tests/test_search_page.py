"""The search page at GET /: self-contained HTML, and driven in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from helpers import headless_chromium, served

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from indexer.query import MODES  # noqa: E402
from indexer.server import create_app  # noqa: E402


def test_page_is_one_self_contained_file(sample_index):
    client = TestClient(create_app(sample_index))
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    # Nothing fetched from elsewhere: no external scripts, styles, fonts or images; works offline.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "@import" not in page and "url(" not in page
    assert all(f'"{mode}"' in page for mode in MODES)


def test_page_is_served_without_a_key_where_searches_need_one(sample_index):
    client = TestClient(create_app(sample_index, api_key="k" * 32, public=True))
    assert client.get("/").status_code == 200
    assert client.post("/search", json={"query": "coffee"}).status_code == 401


@pytest.fixture
def browser():
    with headless_chromium("--window-size=1000,760") as driver:
        yield driver


@pytest.mark.process
def test_search_page_in_a_real_browser(sample_index, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    def search(query: str, mode: str, where: str = "") -> None:
        browser.find_element(By.NAME, "q").clear()
        browser.find_element(By.NAME, "q").send_keys(query)
        browser.find_element(By.NAME, "where").clear()
        browser.find_element(By.NAME, "where").send_keys(where)
        Select(browser.find_element(By.ID, "mode")).select_by_value(mode)
        before = browser.find_element(By.ID, "message").text
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait.until(lambda _: (text := browser.find_element(By.ID, "message").text) not in (before, "searching…") and text)

    def hit_ids() -> list[str]:
        return [e.text for e in browser.find_elements(By.CSS_SELECTOR, "li.hit .id")]

    with served(sample_index) as base:
        browser.get(base + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda _: "documents" in browser.find_element(By.ID, "status").text)
        assert browser.find_element(By.ID, "status").text == "version v000001 · 99 documents"

        search("make cappuccino at home", "dense")
        assert hit_ids()[0] == "P0026" and len(hit_ids()) == 10
        first = browser.find_element(By.CSS_SELECTOR, "li.hit")
        assert "espresso" in first.find_element(By.CSS_SELECTOR, ".text").text.lower()
        assert "category" in first.find_element(By.CSS_SELECTOR, "dl").text  # the document's fields are shown

        search("espresso", "keyword", "price<1000")
        assert hit_ids() and browser.find_element(By.ID, "message").get_attribute("class") == "info"

        search("espresso", "hybrid", "price<<3")
        message = browser.find_element(By.ID, "message")
        assert message.get_attribute("class") == "error" and message.text.startswith("400:") and "price<<3" in message.text
        assert hit_ids() == []
        if os.environ.get("INDEXER_SCREENSHOT"):  # how the README's screenshot is made
            search("waterproof boots for muddy trails", "hybrid")
            browser.save_screenshot(str(Path(os.environ["INDEXER_SCREENSHOT"])))
