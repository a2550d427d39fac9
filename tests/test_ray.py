"""Ray engine: a build on Ray (local mode) equals the embedded build; IVF assembly in parts equals one piece."""

from __future__ import annotations

import functools
import json

import faiss
import numpy as np
import pytest
from helpers import DATASET, run_cli, write_jsonl

from indexer import Index, IndexSettings, build_index
from indexer.ray_engine import RayOptions, pool_size
from indexer.vectors import FaissIndex, build_from_shards, sample_from_shards

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow


def three_views(tmp_path):
    """About 300 real documents: each product's title, its description, and both with its category."""
    products = [json.loads(line) for line in (DATASET / "corpus.jsonl").read_text().splitlines()]
    records = []
    for p in products:
        records.append({"id": f"{p['product_id']}-t", "text": p["title"], "kind": "title"})
        records.append({"id": f"{p['product_id']}-d", "text": p["description"], "kind": "description"})
        records.append({"id": f"{p['product_id']}-a", "text": f"{p['title']}. {p['description']} ({p['category']})", "kind": "all"})
    path = tmp_path / "views.jsonl"
    write_jsonl(path, records)
    return path


def vectors_by_id(index: Index) -> dict[str, np.ndarray]:
    found = {}
    for segment in index._served.segments:
        keys = segment.vectors.keys()
        rows = segment.store.fetch(keys)
        found.update({rows[int(k)]["id"]: segment.vectors.index.reconstruct(int(k)) for k in keys})
    return found


def test_ray_build_equals_the_embedded_build(tmp_path):
    source = three_views(tmp_path)
    build_index(source, tmp_path / "local", IndexSettings(index_type="flat"))
    result = run_cli("build", str(source), "--index", str(tmp_path / "on-ray"), "--engine", "ray", "--replicas", "2", "--json", process=True)
    report = json.loads(result.stdout)
    assert report["documents"] == 297 and report["encoded"] == 297
    assert "Traceback" not in result.stderr

    queries = [json.loads(line)["query"] for line in (DATASET / "queries.jsonl").read_text().splitlines()]
    with Index(tmp_path / "local") as local, Index(tmp_path / "on-ray") as on_ray:
        expected, got = vectors_by_id(local), vectors_by_id(on_ray)
        assert sorted(got) == sorted(expected) and len(got) == 297
        difference = max(float(np.abs(got[i] - expected[i]).max()) for i in expected)
        assert difference < 1e-5
        for question in queries:
            assert [h.id for h in on_ray.search(question, k=10)] == [h.id for h in local.search(question, k=10)]
        assert on_ray.get_document("P0001-t")["metadata"]["kind"] == "title"
    assert "ok" in run_cli("check", str(tmp_path / "on-ray")).stdout.lower()

    # A rebuild on Ray writes only the changed documents and encodes only the text its cache lacks.
    lines = source.read_text().splitlines()
    changed, retagged = json.loads(lines[0]), json.loads(lines[1])
    changed["text"] = "Waterproof boots for muddy trails, resoled"
    retagged["kind"] = "retagged"  # same text: its vector comes from the cache
    source.write_text("\n".join([json.dumps(changed), json.dumps(retagged)] + lines[2:]) + "\n")
    report = json.loads(run_cli("rebuild", str(tmp_path / "on-ray"), "--engine", "ray", "--json", process=True).stdout)
    assert (report["encoded"], report["reused"], report["documents"], report["segments"]) == (1, 1, 297, 2)
    run_cli("check", str(tmp_path / "on-ray"))


def test_replicas_stream_back_every_texts_vector(tmp_path, encoder):
    from indexer.ray_engine import encoded
    from indexer.shards import ShardWriter

    texts = ["a lamp by the river", "pepper and salt", "violin lessons for beginners", "boots", "a kettle that whistles"]
    writer = ShardWriter(tmp_path / "work", rows=2)
    writer.write_documents(np.arange(3), texts[:3])
    writer.write_documents(np.arange(3, 5), texts[3:])
    assert writer.documents_written == 3
    batches = list(encoded(writer.documents_dir, IndexSettings(), RayOptions(replicas=1)))
    vectors, keys = np.concatenate([v for v, _ in batches]), np.concatenate([k for _, k in batches])
    assert vectors.dtype == np.float32 and sorted(keys.tolist()) == list(range(5))
    assert np.abs(vectors[np.argsort(keys)] - encoder.encode_texts(texts)).max() < 1e-5


def test_a_replica_tokenises_one_batch_while_the_model_runs_another(tiny_model):
    """Two calls in flight on an actor (as Ray Data makes them): both come back right, the model runs one at a time."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa

    from indexer.ray_engine import CALLS_IN_FLIGHT, EncodeBatch
    from indexer.shards import vectors_of

    replica = EncodeBatch(IndexSettings(model=str(tiny_model)).to_dict(), "cpu", 1)
    embed, running, most = replica.encoder.embed_tokens, [0], [0]
    guard = threading.Lock()

    def counted(tokens):
        with guard:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return embed(tokens)
        finally:
            with guard:
                running[0] -= 1

    replica.encoder.embed_tokens = counted
    batches = [[f"text {b}-{i} about " + "lamps and rivers " * (i % 9) for i in range(300)] for b in range(6)]
    tables = [pa.table({"key": np.arange(300) + 300 * b, "text": texts})
              for b, texts in enumerate(batches)]
    with ThreadPoolExecutor(CALLS_IN_FLIGHT) as pool:
        results = list(pool.map(replica, tables))
    assert most[0] == 1
    for texts, table, result in zip(batches, tables, results):
        assert result.column("key").to_pylist() == table.column("key").to_pylist()
        np.testing.assert_allclose(vectors_of(result), embed(replica.encoder.tokenize(texts)), atol=1e-6, rtol=0)


def test_ray_build_over_the_memory_budget_keeps_ivf_lists_on_disk(tmp_path, tiny_model):
    words = "river stone lamp garden engine violin harbour pepper cloud market silver ladder".split()
    rng = np.random.default_rng(3)
    records = [{"id": f"d{i}", "text": " ".join(rng.choice(words, 6))} for i in range(3000)]
    source = write_jsonl(tmp_path / "docs.jsonl", records)
    index = tmp_path / "big"
    built = run_cli("build", str(source), "--index", str(index), "--model", str(tiny_model), "--index-type", "IVF16,Flat",
                    "--memory", "100KB", "--engine", "ray", "--json", process=True)
    assert json.loads(built.stdout)["documents"] == 3000
    segment = next((index / "segments").iterdir())
    assert (segment / "vectors.ivfdata").stat().st_size > 3000 * 32 * 4
    assert "vectors.ivfdata" in json.loads((segment / "segment.json").read_text())["files"]
    assert not (index / "staging").exists()
    run_cli("check", str(index))
    hits = json.loads(run_cli("query", str(index), records[7]["text"], "-k", "3", "--json").stdout)["hits"]
    assert hits[0]["text"] == records[7]["text"] and hits[0]["score"] > 0.999

    # Edits of an on-disk index rebuild the structure from the cache, in memory.
    write_jsonl(tmp_path / "new.jsonl", [{"id": "d7", "text": "violin violin violin"}])
    run_cli("upsert", str(index), str(tmp_path / "new.jsonl"))
    run_cli("delete", str(index), "d8")
    run_cli("check", str(index), "--all")
    with Index(index) as opened:
        assert len(opened) == 2999 and opened.get_document("d7")["text"] == "violin violin violin"

    # The on-disk lists are no segment's whole vectors: those went into the cache, so another structure encodes nothing.
    rebuilt = run_cli("build", str(source), "--index", str(index), "--model", str(tiny_model), "--index-type", "flat", "--json")
    assert (json.loads(rebuilt.stdout)["encoded"], json.loads(rebuilt.stdout)["reused"]) == (0, 3000)


def clustered_vectors(n: int, dimension: int, seed: int) -> np.ndarray:
    centres = np.random.default_rng(dimension).normal(size=(64, dimension))
    rng = np.random.default_rng(seed)
    vectors = (centres[rng.integers(0, 64, n)] + 0.5 * rng.normal(size=(n, dimension))).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("on_disk", [False, True])
def test_merged_ivf_shards_search_like_one_piece(tmp_path, on_disk):
    dimension, count = 32, 12_000
    vectors = clustered_vectors(count, dimension, seed=1)
    keys = np.arange(count, dtype=np.int64)
    # five parts of uneven size
    shards = [functools.partial(iter, [(vectors[first : first + 2500], keys[first : first + 2500])]) for first in range(0, count, 2500)]
    assert len(shards) == 5

    ondisk = tmp_path / "merged.ivfdata" if on_disk else None
    merged, _ = build_from_shards(shards, dimension, count, "IVF64,Flat", ondisk)
    merged.save(tmp_path / "merged.faiss")
    if on_disk:
        merged = FaissIndex.load(tmp_path / "merged.faiss")
        assert isinstance(faiss.downcast_InvertedLists(merged.inner.invlists), faiss.OnDiskInvertedLists)

    whole = FaissIndex.create(dimension, "IVF64,Flat")
    whole.train(sample_from_shards(shards, count, 100_000))
    whole.add(vectors, keys)

    queries = clustered_vectors(200, dimension, seed=2)
    for index in (merged.index, whole.index):
        index.nprobe = 8
    found = merged.index.search(queries, 10)
    expected = whole.index.search(queries, 10)
    assert np.array_equal(found[1], expected[1])
    assert np.array_equal(found[0], expected[0])
    assert merged.index.ntotal == count


def test_pool_leaves_cpus_for_ray_reads():
    one_small_box = pool_size([{"CPU": 2.0}], RayOptions())
    assert one_small_box.replicas == 1 and one_small_box.cpus_per_replica == 1.0 and one_small_box.threads_per_replica == 2
    two_replicas = pool_size([{"CPU": 2.0}], RayOptions(replicas=2))
    assert two_replicas.cpus_per_replica == 0.5 and two_replicas.threads_per_replica == 1
    cluster = pool_size([{"CPU": 16.0}, {"CPU": 16.0}], RayOptions())
    assert cluster.replicas == 2 and cluster.cpus_per_replica == 15.0
    gpus = pool_size([{"CPU": 8.0, "GPU": 4.0}], RayOptions(gpus_per_replica=1))
    assert gpus.replicas == 4 and gpus.cpus_per_replica == 0.25


def test_ray_flags_need_the_ray_engine(tmp_path):
    source = DATASET / "corpus.jsonl"
    result = run_cli("build", str(source), "--index", str(tmp_path / "x"), "--replicas", "2", check=False)
    assert result.returncode != 0 and "--replicas needs --engine ray" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x").exists()
    result = run_cli("build", str(source), "--index", str(tmp_path / "x"), "--engine", "spark", check=False)
    assert result.returncode == 2 and "'spark' is not one of 'local', 'ray'" in result.stderr
    too_many = run_cli("build", str(source), "--index", str(tmp_path / "x"), "--engine", "ray", "--gpus-per-replica", "1", check=False, process=True)
    assert too_many.returncode != 0 and "GPUs" in too_many.stderr and "Traceback" not in too_many.stderr
