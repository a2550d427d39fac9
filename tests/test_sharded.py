"""Sharded serving on Ray Serve (a local Ray started by the test): shards answer exactly as one process, switch
versions together, and a killed replica is replaced."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from helpers import one_line_error, run_cli, write_jsonl

from indexer import Index, IndexSettings, build_index, delete_documents, upsert_documents
from indexer.errors import ShardUnavailableError
from indexer.query import search_texts
from indexer.sharded import place
from indexer.snapshot import Snapshot

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.slow

MODES = ("dense", "keyword", "hybrid")
FILTERS = (None, [("n", "=", 1)], [("kind", "in", ["b", "c"]), ("n", "<", 2)])


def document(i: int) -> dict:
    return {"id": f"d{i}", "text": f"document {i} about {['boots', 'tents', 'stoves', 'maps'][i % 4]} and topic {i % 9}",
            "n": i % 3, "kind": "abc"[i % 3]}


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_model):
    """Three segments (a build, two upserts) and deletions."""
    folder = tmp_path_factory.mktemp("sharded")
    path = folder / "idx"
    build_index(write_jsonl(folder / "a.jsonl", [document(i) for i in range(300)]), path, IndexSettings(model=str(tiny_model)))
    upsert_documents(path, write_jsonl(folder / "b.jsonl", [document(i) for i in range(300, 420)]))
    upsert_documents(path, write_jsonl(folder / "c.jsonl", [document(i) for i in range(420, 470)] + [document(5)]))
    delete_documents(path, ["d7", "d301", "d430"])
    return path


@pytest.fixture(scope="module")
def pool(index):
    from indexer.sharded import ShardPool

    started = ShardPool(index, shards=2, replicas=1)
    yield started
    started.close()


def answers(opened: Index, questions: list[str]) -> tuple[list[list[str]], np.ndarray]:
    """Ids and scores of the top 10 for each question in every mode, with and without filters."""
    hits = [opened.search(q, k=10, mode=mode, where=where) for q in questions for mode in MODES for where in FILTERS]
    return [[h.id for h in found] for found in hits], np.array([h.score for found in hits for h in found])


def same(got: tuple, expected: tuple) -> bool:
    """The same hits in the same order, scores equal to float32 rounding (a shard may search a segment by FAISS
    that one process searches in its pool of small segments by a matrix product)."""
    return got[0] == expected[0] and np.allclose(got[1], expected[1], rtol=0, atol=1e-5)


def test_placement_balances_by_size_and_keeps_segments_where_they_are():
    assert place({"s1": 100, "s2": 60, "s3": 50}, 2) == {"s1": 0, "s2": 1, "s3": 1}
    assert place({"s1": 100, "s2": 60, "s3": 50, "s4": 5}, 2, {"s1": 0, "s2": 1, "s3": 1}) == {"s1": 0, "s2": 1, "s3": 1, "s4": 0}
    # A merge left the shards further apart than the largest segment: placed afresh.
    assert place({"s1": 100, "s2": 90, "s4": 5}, 2, {"s1": 0, "s2": 0, "s3": 1}) == {"s1": 0, "s2": 1, "s4": 1}


def test_two_shards_answer_exactly_as_one_process(index, pool):
    from fastapi.testclient import TestClient

    from indexer.server import create_app

    questions = [document(i)["text"] for i in range(0, 470, 10)][:47] + ["boots", "tents and maps", "topic 4"]
    with Index(index) as local, Index(index, encoder=local.encoder, shards=pool) as sharded:
        assert sorted(set(pool.placement.values())) == [0, 1] and len(sharded) == len(local) == 467
        assert same(answers(sharded, questions), answers(local, questions))
        client = TestClient(create_app(index, shards=pool))
        body = client.post("/search", json={"query": "stoves", "k": 5, "mode": "hybrid", "where": ["n=2"]}).json()
        assert [h["id"] for h in body["hits"]] == [h.id for h in local.search("stoves", k=5, mode="hybrid", where=[("n", "=", 2)])]
        assert client.get("/health").json()["documents"] == 467


def test_a_write_switches_every_shard_with_no_mixed_answer(index, pool, tmp_path):
    questions = ["document 480 about new things", "boots topic 3", "maps"]
    seen: list[tuple[str, list]] = []
    with Index(index, shards=pool) as sharded:
        writer = threading.Thread(target=upsert_documents, args=(index, write_jsonl(tmp_path / "new.jsonl", [
            {"id": f"n{i}", "text": f"document {480 + i} about new things", "n": 1, "kind": "a"} for i in range(30)])))
        writer.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (writer.is_alive() or len({v for v, _ in seen}) < 2):
            sharded.refresh()
            served = sharded._served
            seen.append((served.version, search_texts(sharded.encoder, served, questions, 10, "dense")))
        writer.join()
        assert len({v for v, _ in seen}) == 2  # the version before the write and the one after
        for version, got in seen:  # each answer is one version's, on every shard
            with _opened(index, version) as alone:
                expected = search_texts(sharded.encoder, alone, questions, 10, "dense")
                assert [[h.id for h in hits] for hits in got] == [[h.id for h in hits] for hits in expected]
                assert np.allclose([h.score for hits in got for h in hits], [h.score for hits in expected for h in hits], atol=1e-5)
        assert seen[-1][1][0][0].id.startswith("n")


class _opened:
    """A version opened in this process, closed after."""

    def __init__(self, path, version):
        self.snapshot = Snapshot.open(path, version)

    def __enter__(self) -> Snapshot:
        return self.snapshot

    def __exit__(self, *exc) -> None:
        self.snapshot.close()


def test_a_killed_replica_is_replaced_and_no_answer_is_wrong(index, pool):
    with Index(index) as local, Index(index, encoder=local.encoder, shards=pool) as sharded:
        expected = answers(local, ["boots topic 2"])
        pid = pool.result(pool.call(1, "pid"))
        os.kill(pid, signal.SIGKILL)
        answered = 0
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and answered < 3:
            try:
                got = answers(sharded, ["boots topic 2"])
            except ShardUnavailableError:  # allowed while no replica of the shard is up
                time.sleep(0.5)
                continue
            assert same(got, expected)
            answered += 1
        assert answered == 3 and pool.result(pool.call(1, "pid")) != pid


def test_workers_do_not_combine_with_shards_nor_shards_with_a_local_engine(index):
    result = run_cli("serve", str(index), "--engine", "ray", "--shards", "2", "--workers", "2", check=False)
    one_line_error(result, 2, "--workers", "--replicas")
    one_line_error(run_cli("serve", str(index), "--shards", "2", check=False), 2, "--shards needs --engine ray")

