"""The HTTP service: every endpoint and error case through FastAPI's test client, a real server, hostile or unlucky
conditions (paths, damaged indexes, big bodies, odd ids, round trips) and its bounds (the size of a search answer, the
/metrics series, strict request bodies, offline API docs)."""

from __future__ import annotations

import json
import logging
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import DATASET, free_port, headless_chromium, run_cli, served, write_jsonl

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from indexer import Index, IndexSettings, build_index, layout  # noqa: E402
from indexer.errors import ArgumentError  # noqa: E402
from indexer.server import MAX_BODY_BYTES, MAX_K, create_app, parse_duration, rebuild_periodically  # noqa: E402

# The HTTP service: every endpoint and error case through FastAPI's test client, and a real server.

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


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
    run_cli("upsert", str(products), str(tmp_path / "one.jsonl"), process=True)  # another process publishes
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


@pytest.mark.process
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
        result = run_cli("serve", str(path), "--port", str(port), check=False, process=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"indexer: error: 127.0.0.1:{port}: cannot listen (Address already in use)"]
    result = run_cli("serve", str(path), "--host", "no-such-host.invalid", check=False, process=True)
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


# The HTTP service under hostile or unlucky conditions: paths, damaged indexes, big bodies, odd ids, round trips.



def test_writes_land_in_the_served_index_not_a_bare_name(tmp_path, tiny_model, monkeypatch):
    """`serve twin/` must write into ./twin, never into indexes/twin."""
    monkeypatch.chdir(tmp_path)
    settings = IndexSettings(model=str(tiny_model))
    source = write_jsonl(tmp_path / "source.jsonl", [{"id": f"d{i}", "text": f"text {i}"} for i in range(5)])
    build_index(source, Path("twin"), settings)
    build_index(source, "twin", settings)  # indexes/twin, the other index
    other = layout.version_dir(Path("indexes/twin"), "v000001")
    before = sorted(p.name for p in other.iterdir())
    for spelling in ("twin/", "./twin"):
        client = TestClient(create_app(spelling, api_key=KEY))
        assert client.post("/documents", json={"documents": [{"id": "new", "text": "fresh"}]}, headers=AUTH).status_code == 200
        assert client.delete("/documents/d1", headers=AUTH).status_code == 200
        assert client.post("/rebuild", headers=AUTH).status_code == 200
        with Index(Path("twin")) as served:
            assert served.get_document("new") is not None and served.get_document("d1") is not None  # rebuild restored d1
        client.delete("/documents/new", headers=AUTH)
    assert layout.list_versions(Path("indexes/twin")) == ["v000001"] and sorted(p.name for p in other.iterdir()) == before


def test_the_readme_scenario_keeps_documents_posted_between_scheduled_rebuilds(tmp_path, tiny_model):
    source = write_jsonl(tmp_path / "source.jsonl", [{"id": f"d{i}", "text": f"text {i}"} for i in range(10)])
    path = tmp_path / "idx"
    build_index(source, path, IndexSettings(model=str(tiny_model)))
    client = TestClient(create_app(path, api_key=KEY))
    posted = {"id": "api", "text": "posted through the API", "metadata": {"lang": "en"}}
    assert client.post("/documents", json={"documents": [posted]}, headers=AUTH).status_code == 200
    write_jsonl(source, [{"id": f"d{i}", "text": f"text {i}"} for i in range(11)])  # the source changes meanwhile
    stop = threading.Event()
    worker = threading.Thread(target=rebuild_periodically, args=(path, 0.2, stop), daemon=True)
    worker.start()
    deadline = time.monotonic() + 120
    while layout.current_version(path) == "v000002" and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    worker.join(timeout=60)
    assert layout.current_version(path) >= "v000003"
    assert client.get("/documents/d10").status_code == 200
    assert client.get("/documents/api").json() == {**posted, "fields": {}}
    assert client.get("/info").json()["count"] == 12


def test_documents_round_trip_get_post_get(tmp_path):
    path = tmp_path / "products"
    build_index(DATASET / "corpus.jsonl", path)
    client = TestClient(create_app(path, api_key=KEY))
    first = client.get("/documents/P0026").json()
    assert set(first) == {"id", "text", "metadata", "fields"}
    assert set(first["fields"]) == {"title", "description"} and first["text"].startswith(first["fields"]["title"])
    assert first["metadata"] == {"category": "kitchen", "price": first["metadata"]["price"]}
    edited = {"id": first["id"], "metadata": first["metadata"], "fields": {**first["fields"], "title": "Espresso Machine Deluxe"}}
    assert client.post("/documents", json={"documents": [edited]}, headers=AUTH).status_code == 200
    second = client.get("/documents/P0026").json()
    assert second["fields"]["title"] == "Espresso Machine Deluxe" and second["text"].startswith("Espresso Machine Deluxe ")
    assert second["metadata"] == first["metadata"]
    # GET -> POST -> GET gives back exactly what GET gave
    assert client.post("/documents", json={"documents": [second]}, headers=AUTH).status_code == 200
    assert client.get("/documents/P0026").json() == second
    # and the source's own record shape still works
    record = {"product_id": "P0900", "title": "Canoe", "description": "Open canoe for two.", "category": "outdoors", "price": 900}
    assert client.post("/documents", json={"documents": [record]}, headers=AUTH).status_code == 200
    assert client.get("/documents/P0900").json() == {
        "id": "P0900", "text": "Canoe Open canoe for two.", "metadata": {"category": "outdoors", "price": 900},
        "fields": {"title": "Canoe", "description": "Open canoe for two."},
    }
    hit = client.post("/search", json={"query": "canoe for two paddlers", "k": 1}).json()["hits"][0]
    assert hit["id"] == "P0900"


def test_ids_with_slashes_are_reachable(tmp_path, tiny_model):
    folder = tmp_path / "notes"
    (folder / "team" / "a").mkdir(parents=True)
    (folder / "team" / "a" / "plan.txt").write_text("the plan for the launch")
    (folder / "readme.txt").write_text("read me first")
    path = tmp_path / "idx"
    build_index(folder, path, IndexSettings(model=str(tiny_model)))
    client = TestClient(create_app(path, api_key=KEY))
    assert client.get("/documents/team/a/plan").json()["text"] == "the plan for the launch"
    assert client.delete("/documents/team/a/plan", headers=AUTH).status_code == 200
    assert client.get("/documents/team/a/plan").status_code == 404
    assert client.delete("/documents/team/a/plan", headers=AUTH).status_code == 404


def test_a_broken_current_keeps_the_loaded_version_served_and_health_says_so(tmp_path, tiny_model):
    source = write_jsonl(tmp_path / "source.jsonl", [{"id": f"d{i}", "text": f"text {i}"} for i in range(5)])
    path = tmp_path / "idx"
    build_index(source, path, IndexSettings(model=str(tiny_model)))
    client = TestClient(create_app(path, api_key=KEY))
    (path / layout.POINTER).write_text("v000042\n")
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "degraded" and "v000042" in health.json()["error"]
    assert health.json()["version"] == "v000001"
    search = client.post("/search", json={"query": "text 3", "k": 2})
    assert search.status_code == 200 and search.json()["version"] == "v000001"
    assert client.get("/documents/d3").status_code == 200
    assert client.post("/documents", json={"documents": [{"id": "x", "text": "y"}]}, headers=AUTH).status_code == 503
    (path / layout.POINTER).write_text("v000001\n")
    assert client.get("/health").status_code == 200


def test_hostile_requests_are_4xx_logged_and_counted(tmp_path, tiny_model, caplog):
    source = write_jsonl(tmp_path / "source.jsonl", [{"id": f"d{i}", "text": f"text {i}", "price": i} for i in range(5)])
    path = tmp_path / "idx"
    build_index(source, path, IndexSettings(model=str(tiny_model)))
    client = TestClient(create_app(path, api_key=KEY))
    with caplog.at_level(logging.INFO, logger="indexer.access"):
        assert client.post("/search", json={"query": "x", "where": ["price<99999999999999999999"]}).status_code == 200
        assert client.post("/search", json={"query": "x", "where": ["pri\x00ce<3"]}).status_code == 400
        deep = '{"documents": [{"id": "a", "text": "b", "m": ' + "[" * 10_000 + "]" * 10_000 + "}]}"
        response = client.post("/documents", content=deep, headers={**AUTH, "content-type": "application/json"})
        assert response.status_code in (400, 422)
    statuses = [json.loads(r.getMessage())["status"] for r in caplog.records if r.name == "indexer.access"]
    assert statuses == [200, 400, response.status_code]
    metrics = client.get("/metrics").text
    assert 'route="/search",method="POST",status="400"} 1' in metrics
    assert f'route="/documents",method="POST",status="{response.status_code}"}} 1' in metrics


@pytest.mark.slow
def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(tmp_path, tiny_model):
    source = write_jsonl(tmp_path / "source.jsonl", [{"id": f"d{i}", "text": f"text {i}"} for i in range(5)])
    path = tmp_path / "idx"
    build_index(source, path, IndexSettings(model=str(tiny_model)))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "indexer", "serve", str(path), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "server did not start"
                time.sleep(0.2)
        chunk = b"x" * (1 << 20)
        sent, answer = 0, b""
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(b"POST /search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            try:
                while sent < 300 * (1 << 20):
                    conn.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                    sent += len(chunk)
                    if select.select([conn], [], [], 0)[0]:
                        break
            except (BrokenPipeError, ConnectionResetError):
                pass
            conn.settimeout(10)
            try:
                while b"\r\n\r\n" not in answer:
                    data = conn.recv(65536)
                    if not data:
                        break
                    answer += data
            except (TimeoutError, ConnectionResetError):
                pass
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert sent < 4 * MAX_BODY_BYTES  # refused while streaming, long before 300 MiB
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:  # still serving
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert conn.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        server.terminate()
        server.wait(timeout=30)


# The HTTP service's bounds: the size of a search answer, the /metrics series, strict request bodies, offline API docs.

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


@pytest.fixture
def offline_browser():
    """Headless chromium that cannot resolve any host but loopback."""
    with headless_chromium("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", log_requests=True) as driver:
        yield driver


@pytest.mark.process
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


@pytest.mark.process
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
