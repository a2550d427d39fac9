"""Writes that encode nothing never load the model; what stands in for it is checked against the model's files.

A tiny random BERT copied per test (so its files can be changed), real
indexes, real subprocesses with their own ``XDG_CACHE_HOME`` (where
``models.json`` remembers what a load of the model's files gave).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import write_jsonl

from indexer import layout
from indexer.errors import ModelError
from indexer.models import MODELS_FILE, ModelFacts
from indexer.settings import IndexSettings

RECORDS = [{"id": f"d{i}", "text": f"document number {i} about {word}", "shelf": "a"}
           for i, word in enumerate(["rivers", "granite", "lanterns", "orchards", "quartz", "timber"])]


@pytest.fixture
def model(tiny_model, tmp_path):
    return shutil.copytree(tiny_model, tmp_path / "model")


@pytest.fixture
def env(tmp_path, monkeypatch):
    # This process and the ones it starts remember in the same place, so they choose the same forward.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "indexer", *args], env=env, capture_output=True, text=True, timeout=300)


def write(env: dict, call: str) -> dict:
    """Run one library write in a fresh process; its report, and whether torch was imported."""
    code = ("import json, sys; from dataclasses import asdict; from indexer import rebuild_index, upsert_documents; "
            f"report = {call}; print(json.dumps({{**asdict(report), 'torch': 'torch' in sys.modules}}))")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def remembered(tmp_path) -> dict:
    return json.loads((tmp_path / "cache" / "indexer" / MODELS_FILE).read_text())


def stored_vector(path, doc_id: str) -> np.ndarray:
    from indexer.snapshot import Snapshot

    snapshot = Snapshot.open(path)
    key = np.array([snapshot.keys_for_ids([doc_id])[doc_id]])
    segment = next(s for s in snapshot.segments if s.holds(key).all())
    return segment.vectors.reconstruct(key)[0]


@pytest.mark.process
def test_writes_that_encode_nothing_never_load_the_model(model, env, tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", RECORDS)
    path = tmp_path / "index"
    assert cli(env, "build", str(source), "--index", str(path), "--model", str(model)).returncode == 0
    (facts,) = remembered(tmp_path).values()  # the build's load, remembered
    manifest = layout.read_manifest(layout.version_dir(path, layout.current_version(path)))
    assert (facts["fingerprint"], facts["dimension"], facts["max_length"]) == (manifest.model_fingerprint, 32, 128)

    unchanged = write(env, f"rebuild_index({str(path)!r}, if_changed=True)")
    assert (unchanged["torch"], unchanged["published"], unchanged["encoded"], unchanged["segments"]) == (False, False, 0, 1)
    built = stored_vector(path, "d1")

    # New metadata, same text: the vector comes from the embedding cache, and a version is published.
    moved = write_jsonl(tmp_path / "moved.jsonl", [{**RECORDS[1], "shelf": "b"}])
    upserted = write(env, f"upsert_documents({str(path)!r}, {str(moved)!r})")
    assert (upserted["torch"], upserted["published"], upserted["encoded"], upserted["reused"]) == (False, True, 0, 1)
    assert "load" not in upserted["stages"]
    assert stored_vector(path, "d1").tobytes() == built.tobytes()

    # A new text: the model loads then, on the first text to encode, and embeds exactly as a loaded one does.
    text = "a lantern that floats down the river"
    fresh = write(env, f"upsert_documents({str(path)!r}, {str(write_jsonl(tmp_path / 'new.jsonl', [{'id': 'new', 'text': text}]))!r})")
    assert (fresh["torch"], fresh["published"], fresh["encoded"]) == (True, True, 1)
    assert fresh["stages"]["load"] > 0 and fresh["stages"]["tokenize"] < fresh["stages"]["load"]
    from indexer.encoder import Encoder

    assert stored_vector(path, "new").tobytes() == Encoder(str(model)).encode_texts([text])[0].tobytes()
    assert cli(env, "check", str(path)).returncode == 0


def save_new_weights(model) -> None:
    """New weights of the same shape saved over the old file, its size and modification time put back (as a
    fine-tune copied in with its times kept, or an image rebuilt reproducibly, would leave them)."""
    from safetensors.torch import load_file, save_file

    file = model / "model.safetensors"
    before = file.stat()
    weights = load_file(file)
    save_file({name: tensor + 0.01 if tensor.is_floating_point() else tensor for name, tensor in weights.items()},
              str(file), metadata={"format": "pt"})
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (file.stat().st_size, file.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)


@pytest.mark.process
def test_changed_model_files_are_loaded_and_never_taken_for_the_remembered_ones(model, env, tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", RECORDS)
    path = tmp_path / "index"
    assert cli(env, "build", str(source), "--index", str(path), "--model", str(model)).returncode == 0
    before = layout.current_version(path)
    save_new_weights(model)

    moved = write_jsonl(tmp_path / "moved.jsonl", [{**RECORDS[1], "shelf": "b"}])
    refused = cli(env, "upsert", str(path), str(moved))
    assert refused.returncode == 4, refused.stderr
    assert refused.stderr.count("\n") == 1 and "changed since this index was built; run rebuild" in refused.stderr
    assert layout.current_version(path) == before

    # The refused upsert remembered the new files' facts: the rebuild knows from them that nothing carries over.
    rebuilt = write(env, f"rebuild_index({str(path)!r})")
    assert (rebuilt["torch"], rebuilt["encoded"], rebuilt["reused"]) == (True, len(RECORDS), 0)
    assert len(remembered(tmp_path)) == 2  # both versions of the files, each under its own identity
    assert write(env, f"rebuild_index({str(path)!r}, if_changed=True)")["torch"] is False


@pytest.mark.process
def test_a_wrong_memo_fails_the_write_that_loads_the_model_and_is_put_right(model, env, tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", RECORDS)
    path = tmp_path / "index"
    assert cli(env, "build", str(source), "--index", str(path), "--model", str(model)).returncode == 0
    (old,) = remembered(tmp_path).values()
    save_new_weights(model)
    moved = write_jsonl(tmp_path / "moved.jsonl", [{**RECORDS[1], "shelf": "b"}])
    assert cli(env, "upsert", str(path), str(moved)).returncode == 4  # loads, and remembers the new files' facts
    # A memo that says the new files give the old fingerprint: a write that encodes trusts it until the model loads.
    memo = tmp_path / "cache" / "indexer" / MODELS_FILE
    memo.write_text(json.dumps({key: old for key in remembered(tmp_path)}))
    before = layout.current_version(path)
    new = write_jsonl(tmp_path / "new.jsonl", [{"id": "new", "text": "a text nobody has encoded yet"}])
    failed = cli(env, "upsert", str(path), str(new))
    assert failed.returncode == 4 and failed.stderr.count("\n") == 1, failed.stderr
    assert "do not give what models.json remembers of them; run the write again" in failed.stderr
    assert layout.current_version(path) == before
    again = cli(env, "upsert", str(path), str(new))  # put right by the failed load: the weights changed, says it
    assert again.returncode == 4 and "changed since this index was built; run rebuild" in again.stderr


def test_a_model_that_disagrees_with_what_was_remembered_fails_the_write(model):
    from indexer.external import DeferredEncoder

    facts = ModelFacts("0" * 64, 32, 128)
    deferred = DeferredEncoder(IndexSettings(model=str(model), max_length=64), facts, device="cpu")
    assert (deferred.dimension, deferred.max_length) == (32, 64)
    with pytest.raises(ModelError, match="do not give what models.json remembers"):
        deferred.tokenize(["anything"])
    # What a load would refuse at once, without a model, is refused at once.
    with pytest.raises(ModelError, match="unknown pooling"):
        DeferredEncoder(IndexSettings(model=str(model), pooling="max"), facts)
    with pytest.raises(ModelError, match="fp16 needs a CUDA device"):
        DeferredEncoder(IndexSettings(model=str(model), precision="fp16"), facts, device="cpu")
    with pytest.raises(ModelError, match="int8 runs on the CPU only"):
        DeferredEncoder(IndexSettings(model=str(model), precision="int8"), facts, device="cuda:1")


@pytest.mark.process
def test_an_unreadable_or_foreign_memo_only_costs_a_load(model, env, tmp_path):
    from indexer.models import remembered_facts

    source = write_jsonl(tmp_path / "docs.jsonl", RECORDS)
    path = tmp_path / "index"
    memo = tmp_path / "cache" / "indexer" / MODELS_FILE
    memo.parent.mkdir(parents=True)
    memo.write_text("[not, json")
    assert cli(env, "build", str(source), "--index", str(path), "--model", str(model)).returncode == 0
    (key,) = remembered(tmp_path)  # rewritten whole
    right = remembered(tmp_path)[key]
    assert remembered_facts(str(model)) == ModelFacts(**right)
    # Each foreign value is no memo at all (this process reads the same file the writes below read) ...
    wrongs = [{"fingerprint": "short"}, {"fingerprint": "z" * 64}, {"dimension": float("inf")},
              {"dimension": 10**9}, {"max_length": 0}, {"max_length": None}]
    for wrong in wrongs:
        memo.write_text(json.dumps({key: {**right, **wrong}}))
        assert remembered_facts(str(model)) is None, wrong
    # ... so a write that needs the model's facts loads it, and puts the memo right.
    moved = write_jsonl(tmp_path / "moved.jsonl", [{**RECORDS[1], "shelf": "b"}])
    report = write(env, f"upsert_documents({str(path)!r}, {str(moved)!r})")
    assert (report["torch"], report["published"], report["reused"]) == (True, True, 1)
    assert remembered(tmp_path)[key] == right


def test_a_merge_after_a_published_write_that_cannot_load_the_model_is_a_warning(model, env, tmp_path, monkeypatch):
    from indexer import compact, upsert_documents
    from indexer.build import build_index

    path = tmp_path / "index"
    build_index(write_jsonl(tmp_path / "docs.jsonl", RECORDS), path, IndexSettings(model=str(model)))

    def unloadable(*args, **kwargs):
        raise ModelError(f"cannot load model {str(model)!r}: gone; put it back")

    monkeypatch.setattr(compact, "merge", unloadable)
    monkeypatch.setattr(compact, "merge_plan", lambda segments, deleted: [s.name for s in segments])
    report = upsert_documents(path, write_jsonl(tmp_path / "new.jsonl", [{"id": "n", "text": "a new text"}]))
    assert report.published and layout.current_version(path) == report.version == "v000002"
    assert report.warnings == [f"{path}: published v000002, but the merge after it failed (cannot load model "
                               f"{str(model)!r}: gone); 'indexer compact' merges"]


@pytest.mark.process
def test_a_deferred_build_with_other_options_is_the_build_a_loaded_model_makes(model, env, tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", RECORDS)
    reports, manifests, embeddings = [], [], []
    for name in ("deferred", "loaded"):
        path = tmp_path / name
        assert cli(env, "build", str(source), "--index", str(path), "--model", str(model)).returncode == 0
        if name == "loaded":
            (tmp_path / "cache" / "indexer" / MODELS_FILE).unlink()  # nothing remembered: the model loads first
        report = json.loads(cli(env, "build", str(source), "--index", str(path), "--model", str(model),
                                "--max-length", "16", "--pooling", "cls", "--json").stdout)
        reports.append({k: report[k] for k in ("documents", "encoded", "reused", "deleted", "published", "segments")})
        manifests.append(layout.read_manifest(layout.version_dir(path, layout.current_version(path))))
        embeddings.append([layout.read_segment_meta(folder).embedding for folder in layout.segment_folders(path, manifests[-1])])
    assert reports[0] == reports[1] == {"documents": 6, "encoded": 6, "reused": 0, "deleted": 0, "published": True, "segments": 1}
    assert manifests[0].settings == manifests[1].settings and manifests[0].settings.max_length == 16
    assert manifests[0].model_fingerprint == manifests[1].model_fingerprint
    assert embeddings[0] == embeddings[1] and "|cls|16|" in embeddings[0][0]
