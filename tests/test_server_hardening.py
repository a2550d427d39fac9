"""The HTTP service under hostile or unlucky conditions: paths, damaged indexes, big bodies, odd ids, round trips."""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import DATASET, write_jsonl

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from indexer import Index, build_index, layout  # noqa: E402
from indexer.server import MAX_BODY_BYTES, create_app, rebuild_periodically  # noqa: E402
from indexer.settings import IndexSettings  # noqa: E402

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
            except (ConnectionResetError, socket.timeout):
                pass
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert sent < 4 * MAX_BODY_BYTES  # refused while streaming, long before 300 MiB
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:  # still serving
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert conn.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        server.terminate()
        server.wait(timeout=30)
