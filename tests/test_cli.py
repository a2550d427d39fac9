"""The ``indexer`` command, run as a real subprocess on real files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import DATASET, run_cli, tree_digest, write_jsonl

from indexer import layout

CORPUS = str(DATASET / "corpus.jsonl")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working folder holding indexes/products, built by the CLI with a bare index name."""
    cwd = tmp_path_factory.mktemp("cli")
    result = run_cli("build", CORPUS, "--index", "products", "--json", cwd=cwd)
    report = json.loads(result.stdout)
    assert report == {
        "index": "indexes/products",
        "version": "v000001",
        "documents": 99,
        "encoded": 99,
        "reused": 0,
        "deleted": 0,
        "seconds": report["seconds"],
        "published": True,
        "kept_upserts": 0,
        "segments": 1,
        "merged": 0,
        "stages": report["stages"],
        "warnings": [],
    }
    assert set(report["stages"]) == {"read", "tokenize", "encode", "write", "seal", "structure", "tune"}
    assert report["stages"]["structure"] + report["stages"]["tune"] <= report["stages"]["seal"]
    assert layout.read_pointer(cwd / "indexes" / "products") == "v000001"
    return cwd


def test_query_json_has_the_documented_shape(workdir, sample_queries):
    questions = [q["query"] for q in sample_queries[:3]]
    result = run_cli("query", "products", *questions, "-k", "3", "--json", cwd=workdir)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["query"] for line in lines] == questions
    for line, expected in zip(lines, sample_queries):
        assert set(line) == {"query", "hits"}
        assert len(line["hits"]) == 3
        for hit in line["hits"]:
            assert set(hit) == {"id", "score", "text", "metadata"}
            assert isinstance(hit["score"], float) and -1.0 <= hit["score"] <= 1.0
            assert set(hit["metadata"]) == {"category", "price"}
        assert expected["product_id"] in [h["id"] for h in line["hits"]]


def test_query_table(workdir):
    result = run_cli("query", "products", "make cappuccino at home", "-k", "2", cwd=workdir)
    assert "make cappuccino at home" in result.stdout
    assert "P0026" in result.stdout and "Espresso Machine" in result.stdout


def test_info_json_and_text(workdir):
    data = json.loads(run_cli("info", "products", "--json", cwd=workdir).stdout)
    assert (data["count"], data["rows"], data["vectors"], data["dimension"]) == (99, 99, 99, 384)
    assert data["settings"]["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert data["versions"] == ["v000001"]
    text = run_cli("info", "products", cwd=workdir).stdout
    assert "99 rows, 99 vectors of 384 dimensions" in text


def test_embed_writes_torch_and_numpy_files(workdir, encoder):
    texts = [json.loads(line) for line in (DATASET / "corpus.jsonl").read_text().splitlines()]
    expected = encoder.encode_texts([f"{t['title']} {t['description']}" for t in texts])
    run_cli("embed", CORPUS, "-o", "corpus.pt", cwd=workdir)
    saved = torch.load(workdir / "corpus.pt")
    assert saved["ids"] == [t["product_id"] for t in texts]
    assert isinstance(saved["embeddings"], torch.Tensor) and saved["embeddings"].shape == (99, 384)
    np.testing.assert_allclose(saved["embeddings"].numpy(), expected, atol=1e-5)
    run_cli("embed", CORPUS, "-o", "corpus.npy", cwd=workdir)
    np.testing.assert_allclose(np.load(workdir / "corpus.npy"), expected, atol=1e-5)
    assert json.loads((workdir / "corpus.npy.ids.json").read_text()) == saved["ids"]
    # An output with nowhere to go is said before the encoding, in one line.
    assert_user_error(run_cli("embed", CORPUS, "-o", "missing/corpus.npy", cwd=workdir, check=False), 2, "no folder missing to write it in")
    (workdir / "taken.pt").mkdir()
    assert_user_error(run_cli("embed", CORPUS, "-o", "taken.pt", cwd=workdir, check=False), 2, "taken.pt: is a folder")


@pytest.mark.parametrize("command", ["build", "query", "info", "embed"])
def test_every_command_has_help(command):
    result = run_cli(command, "--help")
    assert "Usage:" in result.stdout and len(result.stdout.splitlines()) > 3


def assert_user_error(result, code, message):
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("indexer: error: ") and message in lines[0], result.stderr


@pytest.mark.parametrize(
    "records, code, message",
    [
        ('{"id": "a", "text": "ok"}\n{"id": "b", "text": \n', 3, "bad.jsonl:2: malformed JSON"),
        ('{"id": "a", "text": "ok"}\n{"text": "no id"}\n', 3, "bad.jsonl:2: missing id field 'id'"),
        ('{"id": "a", "text": "ok"}\n{"id": "b", "body": "x"}\n', 3, "bad.jsonl:2: missing text field 'text'"),
        ('{"id": "a", "text": "ok"}\n{"id": "a", "text": "again"}\n', 3, "bad.jsonl:2: duplicate id 'a'"),
        ('{"id": "a", "text": "ok"}\n{"id": "b", "text": ""}\n', 3, "bad.jsonl:2: empty text"),
    ],
)
def test_bad_input_exits_with_one_line_and_leaves_index_untouched(workdir, tmp_path, records, code, message):
    before = tree_digest(workdir / "indexes" / "products")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(records)
    assert_user_error(run_cli("build", str(bad), "--index", "products", cwd=workdir, check=False), code, message)
    assert tree_digest(workdir / "indexes" / "products") == before


def test_unreadable_source_unknown_model_and_missing_index(workdir, tmp_path):
    before = tree_digest(workdir / "indexes" / "products")
    missing = run_cli("build", str(tmp_path / "none.jsonl"), "--index", "products", cwd=workdir, check=False)
    assert_user_error(missing, 3, "none.jsonl: no such file")
    fake_gzip = tmp_path / "fake.jsonl.gz"
    fake_gzip.write_text("plain text, not gzip")
    assert_user_error(run_cli("build", str(fake_gzip), "--index", "products", cwd=workdir, check=False), 3, "fake.jsonl.gz: cannot read")
    source = write_jsonl(tmp_path / "ok.jsonl", [{"id": 1, "text": "fine"}])
    unknown = run_cli("build", str(source), "--index", "products", "--model", "no-such-org/no-such-model", cwd=workdir, check=False)
    assert_user_error(unknown, 4, "cannot load model 'no-such-org/no-such-model'")
    # Spelled as a path: said at once, not after transformers has asked the hub for it.
    folder = run_cli("build", str(source), "--index", "products", "--model", str(tmp_path / "no-model"), cwd=workdir, check=False)
    assert_user_error(folder, 4, f"{tmp_path / 'no-model'}: no such model folder")
    assert tree_digest(workdir / "indexes" / "products") == before
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert_user_error(run_cli("build", str(source), "--index", str(notes), cwd=workdir, check=False), 2, f"{notes}: is a file, not an index folder")
    assert notes.read_text() == "mine"
    # A folder of the user's own files (``--index .``) gets no index's files among them.
    assert_user_error(run_cli("build", str(source), "--index", ".", cwd=tmp_path, check=False), 2,
                      ".: holds files of its own (fake.jsonl.gz, notes.txt, ok.jsonl) and no index; name a new or empty folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.jsonl.gz", "notes.txt", "ok.jsonl"]
    assert_user_error(run_cli("query", "nothing-here", "x", cwd=workdir, check=False), 5, "no such index")


@pytest.mark.parametrize("device, message", [
    ("gpu", "unknown device 'gpu'; use cpu, cuda, cuda:N or mps"),
    ("cuda:99", "device 'cuda:99': "),  # without CUDA, or with fewer than 100 CUDA devices: one line, not torch's traceback
    ("mps", "device 'mps': MPS is not available on this machine"),
])
def test_a_device_this_machine_lacks_is_one_line(workdir, tmp_path, device, message):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    before = tree_digest(workdir / "indexes" / "products")
    assert_user_error(run_cli("query", "products", "boots", "--device", device, cwd=workdir, check=False), 2, message)
    source = write_jsonl(tmp_path / "new.jsonl", [{"product_id": "N1", "title": "New", "description": "A new thing."}])
    assert_user_error(run_cli("upsert", "products", str(source), "--device", device, cwd=workdir, check=False), 2, message)
    assert tree_digest(workdir / "indexes" / "products") == before


def test_query_refuses_a_mismatched_model(workdir, tiny_model):
    result = run_cli("query", "products", "boots", "--model", str(tiny_model), cwd=workdir, check=False)
    assert_user_error(result, 4, "index was built with model 'sentence-transformers/all-MiniLM-L6-v2'")


def test_build_with_precision_and_ann_structure(tmp_path, sample_queries):
    index = str(tmp_path / "hnsw")
    run_cli("build", CORPUS, "--index", index, "--precision", "bf16", "--index-type", "hnsw", "--batch-tokens", "256")
    info = json.loads(run_cli("info", index, "--json").stdout)
    assert (info["settings"]["precision"], info["vector_index"]) == ("bf16", "HNSW32")
    assert info["search_params"]["efSearch"] >= 16 and info["tuned_recall"] >= 0.95
    questions = [q["query"] for q in sample_queries]
    lines = run_cli("query", index, *questions, "-k", "3", "--ef-search", "64", "--json").stdout.splitlines()
    found = [q["product_id"] in [h["id"] for h in json.loads(line)["hits"]] for q, line in zip(sample_queries, lines)]
    assert sum(found) >= len(sample_queries) - 1
    bad = run_cli("build", CORPUS, "--index", str(tmp_path / "x"), "--index-type", "NoSuch9", check=False)
    assert_user_error(bad, 2, "'NoSuch9' is not an index type")
    assert not (tmp_path / "x").exists()


@pytest.mark.process
def test_a_hub_model_in_the_hugging_face_cache_loads_without_asking_the_hub(tmp_path, tiny_model, monkeypatch):
    """By its name, transformers asked an unreachable hub about every file first (minutes of retries)."""
    import os
    import shutil
    import subprocess
    import sys

    import huggingface_hub.constants

    from indexer.encoder import resolve_model_path

    snapshot = tmp_path / "hf" / "hub" / "models--acme--tiny-bert" / "snapshots" / "abc123"
    shutil.copytree(tiny_model, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    no_sbert = snapshot.parents[1] / ".no_exist" / "abc123" / "sentence_bert_config.json"  # the hub's "none", as cached
    no_sbert.parent.mkdir(parents=True)
    no_sbert.touch()
    # Only a cache that holds all a load needs is used (else the hub is asked for the rest, as before).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    assert resolve_model_path("acme/tiny-bert") == str(snapshot)
    for missing in ("tokenizer.json", "model.safetensors"):
        (snapshot / missing).rename(tmp_path / missing)
        assert resolve_model_path("acme/tiny-bert") == "acme/tiny-bert"
        (tmp_path / missing).rename(snapshot / missing)
    no_sbert.unlink()  # whether it has a sentence_bert_config.json (its max length) is unknown
    assert resolve_model_path("acme/tiny-bert") == "acme/tiny-bert"
    no_sbert.touch()
    # Not offline, and a hub that refuses every connection: any question to it would show.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    source = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "boots that keep feet dry"}, {"id": "b", "text": "espresso"}])
    for args in (["build", str(source), "--index", str(tmp_path / "idx"), "--model", "acme/tiny-bert"], ["query", str(tmp_path / "idx"), "boots", "--json"]):
        result = subprocess.run([sys.executable, "-m", "indexer", *args], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "Hub" not in result.stderr and "127.0.0.1:9" not in result.stderr, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["hits"][0]["id"] == "a"
    assert json.loads(run_cli("info", str(tmp_path / "idx"), "--json").stdout)["settings"]["model"] == "acme/tiny-bert"
