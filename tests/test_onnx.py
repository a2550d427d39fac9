"""The ONNX Runtime backend: an export of the real model embeds as the torch backend does, and answers an index's
questions without torch where it agrees with the vectors the index holds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import DATASET

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from indexer import Index  # noqa: E402
from indexer.encoder import (
    TextTokenizer,  # noqa: E402
    onnx_backend,  # noqa: E402
)

TEXTS = [json.loads(line)["description"] for line in (DATASET / "corpus.jsonl").read_text().splitlines()]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache folder of this test's own, here and in the processes it starts (exports live there)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_tokenizer_read_from_files_alone_equals_transformers(tiny_model):
    long = ["word " * 20_000 + "é" * 5, "x" * 100_000, "Ünïcödé and \t tabs\ncontrol\x07 characters"]
    for model in ("all-MiniLM-L6-v2", str(tiny_model)):
        files, full = TextTokenizer(model, files_only=True), TextTokenizer(model)
        assert (files.max_length, files.limit, files.tokenizer.pad_token_id) == (full.max_length, full.limit, full.tokenizer.pad_token_id)
        assert files.tokenize(TEXTS + long) == full.tokenize(TEXTS + long)


def test_an_export_embeds_as_the_torch_backend(encoder, cache):
    path = onnx_backend.export("all-MiniLM-L6-v2")
    assert path == onnx_backend.export_path(encoder.fingerprint) and path.is_file()
    onnx = onnx_backend.OnnxEncoder("all-MiniLM-L6-v2", encoder.fingerprint)
    assert onnx.embedding.key == encoder.embedding.key + "|onnx" and onnx.dimension == 384
    expected, got = encoder.encode_texts(TEXTS), onnx.encode_texts(TEXTS)
    assert np.abs(got - expected).max() < 1e-5
    assert (got * expected).sum(axis=1).min() >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


@pytest.mark.process
def test_a_question_is_answered_without_torch_where_an_export_agrees(products, encoder, cache):
    onnx_backend.export("all-MiniLM-L6-v2")
    question = "boots that keep my feet dry on muddy trails"
    with Index(products, encoder=encoder) as by_torch:
        expected = [(h.id, round(h.score, 5)) for h in by_torch.search(question, k=5)]
    code = ("import json, sys; from indexer import Index; index = Index(sys.argv[1]); "
            "hits = [(h.id, round(h.score, 5)) for h in index.search(sys.argv[2], k=5)]; "
            "print(json.dumps({'hits': hits, 'encoder': type(index.encoder).__name__, "
            "'loaded': sorted(m for m in ('torch', 'transformers') if m in sys.modules)}))")
    done = subprocess.run([sys.executable, "-c", code, str(products), question], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["encoder"] == "OnnxEncoder" and answer["loaded"] == []
    assert [tuple(hit) for hit in answer["hits"]] == expected


def test_an_export_that_disagrees_with_the_index_is_not_used(products, encoder, tiny_model, cache):
    # Another model's export filed under this model's fingerprint: its vectors are not the index's.
    wrong = onnx_backend.export(str(tiny_model))
    target = onnx_backend.export_path(encoder.fingerprint)
    target.parent.mkdir(parents=True)
    shutil.copy(wrong, target)
    with Index(products) as index:
        assert type(index.encoder).__name__ == "Encoder"
        assert index.search("espresso machine", k=1)


def test_build_and_embed_on_the_onnx_backend_agree_with_torch(tmp_path, encoder, sample_index, cache):
    from helpers import run_cli

    corpus = DATASET / "corpus.jsonl"
    report = json.loads(run_cli("build", corpus, "--index", tmp_path / "onnx", "--backend", "onnx", "--json").stdout)
    assert report["documents"] == report["encoded"] == len(TEXTS)
    with Index(tmp_path / "onnx") as on_onnx, Index(sample_index, encoder=encoder) as on_torch:
        assert on_onnx.settings.backend == "onnx" and type(on_onnx.encoder).__name__ == "OnnxEncoder"
        assert on_onnx._served.segments[0].meta.embedding == encoder.embedding.key + "|onnx"
        (texts, got), (same, expected) = on_onnx._served.stored_sample(len(TEXTS)), on_torch._served.stored_sample(len(TEXTS))
        assert texts == same and len(texts) == len(TEXTS)
        assert np.abs(got - expected).max() < 1e-5 and (got * expected).sum(axis=1).min() >= 0.99999
        for question in ["boots for muddy trails", "espresso at home", "a bed for a large dog"]:
            assert [h.id for h in on_onnx.search(question, k=5)] == [h.id for h in on_torch.search(question, k=5)]
    assert "ok" in run_cli("check", tmp_path / "onnx").stdout

    for backend in ("torch", "onnx"):
        run_cli("embed", corpus, "--output", tmp_path / f"{backend}.npy", "--backend", backend)
    onnx_vectors, torch_vectors = np.load(tmp_path / "onnx.npy"), np.load(tmp_path / "torch.npy")
    assert onnx_vectors.shape == torch_vectors.shape == (len(TEXTS), 384)
    assert (onnx_vectors * torch_vectors).sum(axis=1).min() >= 0.99999


def test_the_onnx_backend_refuses_what_it_cannot_run(tmp_path):
    from helpers import one_line_error, run_cli

    corpus = str(DATASET / "corpus.jsonl")
    refused = run_cli("build", corpus, "--index", tmp_path / "x", "--backend", "onnx", "--precision", "bf16", check=False)
    one_line_error(refused, 4, "onnx backend embeds in fp32 or int8")
    assert not (tmp_path / "x").exists()
    unknown = run_cli("build", corpus, "--index", tmp_path / "x", "--backend", "tpu", check=False)
    assert unknown.returncode == 2 and "'tpu' is not one of 'torch', 'onnx'" in unknown.stderr


def test_an_int8_export_builds_and_answers_as_its_own_embedding(tmp_path, tiny_index, tiny_model, cache):
    from helpers import records, run_cli

    source = tmp_path / "source.jsonl"
    run_cli("build", source, "--index", tmp_path / "int8", "--model", tiny_model, "--backend", "onnx", "--precision", "int8")
    assert onnx_backend.export_path(onnx_backend.fingerprint(str(tiny_model)), "int8").is_file()
    with Index(tmp_path / "int8") as quantised, Index(tiny_index) as exact:
        assert type(quantised.encoder).__name__ == "OnnxEncoder" and quantised.encoder.precision == "int8"
        assert quantised._served.segments[0].meta.embedding.endswith("|int8|onnx")
        (texts, got), (same, expected) = quantised._served.stored_sample(40), exact._served.stored_sample(40)
        assert texts == same and (got * expected).sum(axis=1).min() > 0.9  # close to fp32, not equal to it
        assert np.abs(got - expected).max() > 1e-4
        assert quantised.search(records(40)[7]["text"], k=1)[0].id == "doc7"


def test_every_backend_is_an_encoder_backend_made_by_its_name(tiny_model, cache):
    from indexer.encoder import BACKEND_LOADERS, EncoderBackend, load
    from indexer.external import DeferredEncoder, ExternalEncoder
    from indexer.models import ModelFacts
    from indexer.settings import BACKENDS, IndexSettings

    assert tuple(BACKEND_LOADERS) == BACKENDS  # the CLI's choices are the backends there are
    made = {}
    for backend in BACKENDS:
        made[backend] = load(IndexSettings(model=str(tiny_model), backend=backend))
        assert isinstance(made[backend], EncoderBackend) and made[backend].embedding.backend == backend
    np.testing.assert_allclose(made["onnx"].encode_queries(["a lamp by the river"]),
                               made["torch"].encode_queries(["a lamp by the river"]), atol=1e-5, rtol=0)
    facts = ModelFacts(made["torch"].fingerprint, 32, 128)
    deferred = DeferredEncoder(IndexSettings(model=str(tiny_model)), facts)
    external = ExternalEncoder(lambda texts: [[1.0, 0.0]] * len(texts), lambda text: [0.0, 1.0], name="two")
    assert isinstance(deferred, EncoderBackend) and isinstance(external, EncoderBackend)
    assert deferred.embedding == made["torch"].embedding


def test_each_backend_answers_the_others_fp32_index_and_writes_keep_the_index_backend(tmp_path, tiny_model, cache, monkeypatch):
    """As docs/operations.md says: questions of an fp32 index go to whichever backend agrees with its vectors; a write
    embeds with the backend the index records, and a build with the other re-encodes everything."""
    from helpers import one_line_error, records, run_cli, write_jsonl

    from indexer.encoder import cpu_kernels

    source = write_jsonl(tmp_path / "source.jsonl", records(40))
    run_cli("build", source, "--index", tmp_path / "onnx", "--model", tiny_model, "--backend", "onnx")
    with Index(tmp_path / "onnx") as index:
        assert type(index.encoder).__name__ == "OnnxEncoder"
        expected = [(h.id, round(h.score, 4)) for h in index.search("document number seven", k=5)]

    # Where ONNX Runtime is missing, the model on torch answers (it agrees), and a write is refused, data untouched.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets where it is not installed
    with Index(tmp_path / "onnx") as index:  # the trace the export's load of the model saved
        assert type(index.encoder).__name__ == "TracedEncoder"
        assert [(h.id, round(h.score, 4)) for h in index.search("document number seven", k=5)] == expected
    for trace in (cache / "indexer" / cpu_kernels.TRACES_FOLDER).iterdir():
        trace.unlink()
    monkeypatch.setattr(cpu_kernels, "_TRACES", {})
    monkeypatch.setattr(cpu_kernels, "_LOADED", {})
    with Index(tmp_path / "onnx") as index:
        assert type(index.encoder).__name__ == "Encoder" and index.encoder.backend == "torch"
        assert [(h.id, round(h.score, 4)) for h in index.search("document number seven", k=5)] == expected
    before = sorted(p.name for p in (tmp_path / "onnx").rglob("*"))
    one_line_error(run_cli("upsert", tmp_path / "onnx", write_jsonl(tmp_path / "new.jsonl", records(41)[40:]), check=False),
                   4, "the onnx backend needs onnxruntime")
    assert sorted(p.name for p in (tmp_path / "onnx").rglob("*")) == before
    monkeypatch.delitem(sys.modules, "onnxruntime")

    # A build with the other backend is a change of embedding: every document encoded again, the new backend recorded.
    report = json.loads(run_cli("build", source, "--index", tmp_path / "onnx", "--model", tiny_model, "--json").stdout)
    assert report["encoded"] == 40 and report["reused"] == 0
    with Index(tmp_path / "onnx") as index:
        assert index.settings.backend == "torch"
        assert [(h.id, round(h.score, 4)) for h in index.search("document number seven", k=5)] == expected


def test_int8_on_onnx_keeps_the_sample_quality_of_fp32(tmp_path, sample_index, cache):
    """The int8 choice's quality floor, with the real model: the sample's 35 judged questions, dense."""
    from helpers import run_cli

    from indexer.evaluate import evaluate_index, read_judgements

    run_cli("build", DATASET / "corpus.jsonl", "--index", tmp_path / "int8", "--backend", "onnx", "--precision", "int8")
    judgements = read_judgements(DATASET / "queries.jsonl")
    with Index(tmp_path / "int8") as quantised, Index(sample_index) as exact:
        assert type(quantised.encoder).__name__ == "OnnxEncoder" and quantised.encoder.precision == "int8"
        int8, _ = evaluate_index(quantised, judgements, mode="dense")
        fp32, _ = evaluate_index(exact, judgements, mode="dense")
    assert int8["recall@10"] == 1.0 and int8["ndcg@10"] >= fp32["ndcg@10"] - 0.02


def test_a_model_folder_that_ships_its_onnx_file_is_run_as_it_is(tmp_path, tiny_model, cache, monkeypatch):
    """A folder with onnx/model.onnx (sentence-transformers' layout: ids, mask and token types in, token_embeddings
    out) is built with and answers questions without an export, so without the onnx package."""
    import torch
    from helpers import records, run_cli, write_jsonl
    from transformers import AutoModel

    from indexer.encoder import Encoder

    class SentenceTransformersLayout(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
            return hidden, hidden[:, 0]

    folder = shutil.copytree(tiny_model, tmp_path / "shipped")
    (folder / "onnx").mkdir()
    ids = torch.tensor([[101, 2023, 2003, 102], [101, 2023, 102, 0]])
    axes = {0: "batch", 1: "width"}
    with torch.no_grad():
        torch.onnx.export(SentenceTransformersLayout(AutoModel.from_pretrained(folder).eval()), (ids, (ids != 0).long(), ids * 0),
                          str(folder / "onnx" / "model.onnx"), input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["token_embeddings", "sentence_embedding"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes, "token_embeddings": axes})
    monkeypatch.setitem(sys.modules, "onnx", None)  # an export would need it
    source = write_jsonl(tmp_path / "source.jsonl", records(40))
    run_cli("build", source, "--index", tmp_path / "idx", "--model", folder, "--backend", "onnx")
    assert not (cache / "indexer" / "onnx").exists() or not any((cache / "indexer" / "onnx").rglob("model.onnx"))
    reference = Encoder(str(folder))
    with Index(tmp_path / "idx") as index:
        assert type(index.encoder).__name__ == "OnnxEncoder" and index.encoder.dimension == 32
        texts, stored = index._served.stored_sample(40)
        assert (stored * reference.encode_texts(texts)).sum(axis=1).min() >= 0.99999
        assert index.search(records(40)[7]["text"], k=1)[0].id == "doc7"
