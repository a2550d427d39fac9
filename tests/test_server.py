"""The HTTP service: every endpoint and error case through FastAPI's test client, and a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import DATASET, free_port, run_cli, write_jsonl

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from indexer import IndexSettings, build_index  # noqa: E402
from indexer.errors import ArgumentError  # noqa: E402
from indexer.server import MAX_K, create_app, parse_duration  # noqa: E402

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def products(tmp_path):
    path = tmp_path / "products"
    build_index(DATASET / "corpus.jsonl", path)
    return path


@pytest.fixture
def client(products):
    return TestClient(create_app(products, api_key=KEY))


def test_search_one_and_many_with_filters(client, sample_queries):
    one = client.post("/search", json={"query": sample_queries[0]["query"], "k": 3})
    assert one.status_code == 200
    body = one.json()
    assert body["version"] == "v000001" and body["query"] == sample_queries[0]["query"]
    assert sample_queries[0]["product_id"] in [h["id"] for h in body["hits"]]
    assert set(body["hits"][0]) == {"id", "score", "text", "metadata"}
    many = client.post("/search", json={"queries": ["espresso", "dog bed"], "k": 2, "mode": "hybrid", "where": ["category in kitchen,pets"]})
    results = many.json()["results"]
    assert [r["query"] for r in results] == ["espresso", "dog bed"]
    assert all(h["metadata"]["category"] in ("kitchen", "pets") for r in results for h in r["hits"])


@pytest.mark.parametrize(
    "payload, status, message",
    [
        ({"query": "x", "k": MAX_K + 1}, 422, "less than or equal"),
        ({"query": "x", "k": 0}, 422, "greater than or equal"),
        ({"query": "x" * 2001}, 422, "at most 2000"),
        ({"queries": ["x"] * 257}, 422, "at most 256"),
        ({"query": "x", "queries": ["y"]}, 422, "exactly one of query or queries"),
        ({}, 422, "exactly one of query or queries"),
        ({"query": "x", "mode": "magic"}, 422, "mode must be one of"),
        ({"query": "x", "where": ["no operator"]}, 400, "is not FIELD=VALUE"),
        ({"query": "x", "fusion": "average"}, 400, "unknown fusion"),
        ({"query": ""}, 400, "empty question"),
        ({"queries": ["x", " \n"], "mode": "keyword"}, 400, "empty question"),
        # A lone surrogate is no text: pydantic refuses it in a str field, the search in a list's items.
        ({"query": "half a pair \ud83d"}, 422, "valid string"),
        ({"queries": ["x", "\udc00"]}, 400, "a lone UTF-16 surrogate"),
        ({"query": "x", "where": ["category=\udc00"]}, 400, "a lone UTF-16 surrogate"),
    ],
)
def test_search_limits_and_bad_requests(client, payload, status, message):
    # Sent as JSON with ASCII escapes: the client's own encoding cannot carry a lone surrogate.
    response = client.post("/search", content=json.dumps(payload), headers={"content-type": "application/json"})
    assert response.status_code == status and message in json.dumps(response.json())


def test_malformed_json_is_422_not_500(client):
    response = client.post("/search", content=b'{"query": ', headers={"content-type": "application/json"})
    assert response.status_code == 422


@pytest.mark.parametrize("body", ['{"query": "x", "k": NaN}', '{"query": "half a pair \\ud800"}'])
def test_a_body_failing_validation_is_answered_422_in_strict_json(client, body):
    """The answer leaves out the input, which may hold what JSON (NaN) or UTF-8 (a lone surrogate) cannot: both were 500s."""
    response = client.post("/search", content=body, headers={"content-type": "application/json"})

    def refuse(constant):
        raise AssertionError(f"{constant} in the answer")

    assert response.status_code == 422 and json.loads(response.content.decode("ascii"), parse_constant=refuse)["detail"]


def test_documents_upsert_get_delete_and_rebuild(client):
    assert client.get("/documents/P0026").json()["text"].startswith("Espresso Machine")
    assert client.get("/documents/NOPE").status_code == 404
    new = {"product_id": "P0900", "title": "Canoe", "description": "Open canoe for two paddlers.", "category": "outdoors"}
    assert client.post("/documents", json={"documents": [new]}).status_code == 401  # no key
    assert client.post("/documents", json={"documents": [new]}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    report = client.post("/documents", json={"documents": [new]}, headers=AUTH).json()
    assert (report["version"], report["documents"], report["encoded"]) == ("v000002", 100, 1)
    assert client.post("/search", json={"query": "canoe for paddlers", "k": 1}).json()["hits"][0]["id"] == "P0900"
    assert client.get("/documents/P0900").json()["metadata"] == {"category": "outdoors"}
    bad = client.post("/documents", json={"documents": [{"title": "no id", "description": "x"}]}, headers=AUTH)
    assert bad.status_code == 400 and "missing id field 'product_id'" in bad.json()["detail"]
    lone = client.post("/documents", content=json.dumps({"documents": [{**new, "product_id": "P0901", "tags": ["\ud800"]}]}),
                       headers={**AUTH, "content-type": "application/json"})
    assert lone.status_code == 400 and "documents: record 1: '\\ud800' holds \\ud800" in lone.json()["detail"]
    assert client.post("/documents", json={"documents": []}, headers=AUTH).status_code == 422
    assert client.delete("/documents/P0900", headers=AUTH).json()["deleted"] == 1
    assert client.get("/documents/P0900").status_code == 404
    gone = client.delete("/documents/P0900", headers=AUTH)
    assert (gone.status_code, gone.json()) == (404, {"detail": "no document with id 'P0900'"})
    rebuilt = client.post("/rebuild", headers=AUTH).json()
    assert rebuilt["documents"] == 99 and rebuilt["encoded"] == 0
    assert client.delete("/documents/P0001").status_code == 401


def test_writes_are_403_without_a_configured_key(products):
    client = TestClient(create_app(products))
    assert client.post("/rebuild").status_code == 403
    assert client.delete("/documents/P0001", headers=AUTH).status_code == 403
    assert client.post("/search", json={"query": "boots"}).status_code == 200


def test_concurrent_write_is_409(client, products):
    from indexer import layout

    with layout.writer_lock(products, action="test"):
        response = client.post("/rebuild", headers=AUTH)
    assert response.status_code == 409 and "locked by another writer" in response.json()["detail"]


def test_small_writes_queue_behind_another_writer(client, products):
    import threading

    from indexer import layout

    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with layout.writer_lock(products, action="test"):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    threading.Timer(1.0, release.set).start()
    started = time.monotonic()
    response = client.post("/documents", headers=AUTH, json={"documents": [{"product_id": "Q1", "title": "Queued", "description": "A write that waited."}]})
    holder.join()
    assert response.status_code == 200 and response.json()["published"] and time.monotonic() - started >= 0.9
    assert client.delete("/documents/Q1", headers=AUTH).status_code == 200


def test_info_health_metrics_openapi_and_live_versions(client, products, tmp_path):
    assert client.get("/health").json() in ({"status": "ok", "version": "v000001", "documents": 99, "verified": verified}
                                            for verified in (False, True))  # True once the background check is done
    info = client.get("/info").json()
    assert info["settings"]["model"] == "sentence-transformers/all-MiniLM-L6-v2" and info["rows"] == 99
    client.post("/search", json={"query": "boots"})
    metrics = client.get("/metrics").text
    assert 'indexer_requests_total{route="/search",method="POST",status="200"}' in metrics
    assert "indexer_request_seconds_bucket" in metrics and "indexer_index_version 1" in metrics and "indexer_documents 99" in metrics
    assert "/search" in client.get("/openapi.json").json()["paths"]
    (tmp_path / "one.jsonl").write_text(json.dumps({"product_id": "P0999", "title": "Kite", "description": "Stunt kite."}) + "\n")
    run_cli("upsert", str(products), str(tmp_path / "one.jsonl"))  # another process publishes
    assert client.get("/health").json()["version"] == "v000002"


def test_public_binding_needs_a_key(products):
    with pytest.raises(ArgumentError, match="beyond loopback without an API key"):
        create_app(products, public=True)
    client = TestClient(create_app(products, api_key=KEY, public=True))
    assert client.get("/health").status_code == 401
    assert client.get("/health", headers=AUTH).status_code == 200


def test_body_size_and_durations(client):
    huge = client.post("/search", content=b"x", headers={"content-length": str(64 * 2**20), "content-type": "application/json"})
    assert huge.status_code == 413
    assert parse_duration("90s") == 90 and parse_duration("30m") == 1800 and parse_duration("6h") == 21600
    with pytest.raises(ArgumentError):
        parse_duration("soon")


def test_real_server_over_http(products):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INDEXER_API_KEY": KEY}
    server = subprocess.Popen([sys.executable, "-m", "indexer", "serve", str(products), "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    assert json.load(response)["status"] == "ok"
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stdout.read() if server.poll() is not None else "timeout"
                time.sleep(0.3)
        request = urllib.request.Request(f"{base}/search", data=json.dumps({"query": "make cappuccino at home", "k": 1}).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.load(response)["hits"][0]["id"] == "P0026"
        rebuild = urllib.request.Request(f"{base}/rebuild", method="POST", headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(rebuild, timeout=120) as response:
            assert json.load(response)["encoded"] == 0
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    # uvicorn finishes its graceful shutdown, then re-raises the SIGTERM it caught.
    assert server.returncode in (0, -15) and "Application shutdown complete" in output, output
    assert '"path": "/search"' in output  # structured access log


def test_serve_on_a_taken_port_says_so_in_one_line_before_loading(tmp_path, tiny_model):
    import socket

    path = tmp_path / "idx"
    build_index(write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "fine"}]), path, IndexSettings(model=str(tiny_model)))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", str(path), "--port", str(port), check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"indexer: error: 127.0.0.1:{port}: cannot listen (Address already in use)"]
    result = run_cli("serve", str(path), "--host", "no-such-host.invalid", check=False)
    assert result.returncode == 2 and result.stderr.strip().startswith("indexer: error: no-such-host.invalid: not an address to listen on")


def test_scheduled_rebuilds_publish_and_survive_failures(tmp_path, caplog):
    import logging
    import threading

    from indexer import layout
    from indexer.server import rebuild_periodically

    source = tmp_path / "corpus.jsonl"
    source.write_text((DATASET / "corpus.jsonl").read_text())
    path = tmp_path / "idx"
    build_index(source, path)
    source.write_text(source.read_text() + json.dumps({"product_id": "P0950", "title": "Sled", "description": "Wooden sled."}) + "\n")
    stop = threading.Event()
    caplog.set_level(logging.INFO, logger="indexer.rebuild")
    worker = threading.Thread(target=rebuild_periodically, args=(path, 0.2, stop))
    worker.start()
    try:
        deadline = time.monotonic() + 120
        while layout.current_version(path) == "v000001" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert layout.current_version(path) == "v000002"
        source.write_text("{broken\n")  # the next rebuilds fail; the thread must keep going
        while "scheduled rebuild failed" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join(timeout=120)
    assert "scheduled rebuild failed" in caplog.text and "malformed JSON" in caplog.text
    assert layout.current_version(path) == "v000002" and not worker.is_alive()


def test_api_key_from_environment_or_file(tmp_path, monkeypatch):
    from indexer.server import api_key_from_environment

    monkeypatch.delenv("INDEXER_API_KEY", raising=False)
    monkeypatch.delenv("INDEXER_API_KEY_FILE", raising=False)
    assert api_key_from_environment() is None
    (tmp_path / "key").write_text("from-file\n")
    monkeypatch.setenv("INDEXER_API_KEY_FILE", str(tmp_path / "key"))
    assert api_key_from_environment() == "from-file"
    monkeypatch.setenv("INDEXER_API_KEY", "from-env")
    assert api_key_from_environment() == "from-env"
    monkeypatch.delenv("INDEXER_API_KEY")
    monkeypatch.setenv("INDEXER_API_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ArgumentError, match="cannot read the API key file"):
        api_key_from_environment()


def test_serve_refuses_a_public_address_without_a_key(products):
    env = {k: v for k, v in os.environ.items() if not k.startswith("INDEXER_API_KEY")}
    result = subprocess.run([sys.executable, "-m", "indexer", "serve", str(products), "--host", "0.0.0.0", "--port", str(free_port())],
                            env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "beyond loopback without an API key" in result.stderr and "Traceback" not in result.stderr
