"""What embeds a search's questions (``external.load_query_encoder``): on the torch backend, the TorchScript trace an
earlier load saved, run without transformers, once it agrees with the index's stored vectors; else the model itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer import Index
from indexer.encoder import cpu_kernels

QUESTIONS = ["a lamp by the river", "document number seven", "boots"]


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A cache folder of this test's own, with no forward choice or trace remembered in this process either."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernels, "_CHOSEN", {})
    monkeypatch.setattr(cpu_kernels, "_TRACES", {})
    monkeypatch.setattr(cpu_kernels, "_LOADED", {})
    return tmp_path / "cache" / "indexer"


def forget_traces() -> None:
    """As in a new process: traces come from their files."""
    cpu_kernels._TRACES.clear()
    cpu_kernels._LOADED.clear()


def masked_trace(encoder) -> Path:
    """The file of the trace (with attention mask) a load of the model saved."""
    return cpu_kernels.trace_path(f"{cpu_kernels.machine_key(encoder._path, encoder._stamp)}|{encoder._mask_form}")


def hits(index: Index) -> list[list[tuple[str, float]]]:
    return [[(h.id, round(h.score, 5)) for h in found] for found in index.search_many(QUESTIONS, k=5)]


def test_a_search_runs_the_saved_trace_once_it_agrees_and_the_model_where_it_does_not(tiny_index, fresh_cache):
    with Index(tiny_index) as first:  # the model itself: its load chooses a forward and saves the trace
        assert type(first.encoder).__name__ == "Encoder"
        expected, trace = hits(first), masked_trace(first.encoder)
    forget_traces()
    with Index(tiny_index) as second:
        assert type(second.encoder).__name__ == "TracedEncoder" and second.encoder.backend == "torch"
        assert hits(second) == expected
    # The verdict is remembered for that file, so the next open embeds no sample.
    assert list(json.loads((fresh_cache / "agreements.json").read_text()).values()) == [True]

    # A trace file that computes other vectors (here: the same shape, other numbers) is not used.
    class Other(torch.nn.Module):
        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return torch.ones(ids.shape[0], ids.shape[1], 32) * ids.unsqueeze(-1)

    ids = torch.tensor([[101, 7592, 102]])
    torch.jit.save(torch.jit.trace(Other(), (ids, torch.ones_like(ids))), str(trace))
    forget_traces()
    with Index(tiny_index) as third:
        assert type(third.encoder).__name__ == "Encoder"
        assert hits(third) == expected


def test_a_damaged_trace_file_leaves_the_question_to_the_model(tiny_index, fresh_cache):
    with Index(tiny_index) as first:
        expected, trace = hits(first), masked_trace(first.encoder)
        key = cpu_kernels.machine_key(first.encoder._path, first.encoder._stamp)
    # Whatever timing chose here, a traced (or packed) forward is remembered: a remembered eager one is never traced again.
    cpu_kernels.remember_choice(key, "traced", first.encoder.query_threads)
    trace.write_bytes(trace.read_bytes()[: trace.stat().st_size // 2])
    forget_traces()
    with Index(tiny_index) as index:
        assert type(index.encoder).__name__ == "Encoder" and hits(index) == expected
    # The load that timed nothing (its choice was remembered) saved a sound trace again for the next process.
    forget_traces()
    with Index(tiny_index) as again:
        assert type(again.encoder).__name__ == "TracedEncoder" and hits(again) == expected


@pytest.mark.process
def test_a_later_search_process_imports_torch_but_not_transformers(tiny_index, tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    code = ("import json, sys; from indexer import Index; index = Index(sys.argv[1]); "
            "hits = [(h.id, round(h.score, 5)) for h in index.search(sys.argv[2], k=5)]; "
            "print(json.dumps({'hits': hits, 'encoder': type(index.encoder).__name__, "
            "'loaded': sorted(m for m in ('torch', 'transformers', 'sqlite_utils') if m in sys.modules)}))")
    answers = [json.loads(subprocess.run([sys.executable, "-c", code, str(tiny_index), "a lamp by the river"], env=env,
                                         capture_output=True, text=True, check=True, timeout=300).stdout) for _ in range(2)]
    assert answers[0]["encoder"] == "Encoder" and answers[0]["loaded"] == ["torch", "transformers"]
    assert answers[1]["encoder"] == "TracedEncoder" and answers[1]["loaded"] == ["torch"]
    assert answers[1]["hits"] == answers[0]["hits"] and len(answers[1]["hits"]) == 5


def test_the_saved_trace_embeds_as_the_model(tiny_model, fresh_cache):
    from indexer.encoder import Encoder, traced_backend
    from indexer.settings import IndexSettings

    model = Encoder(str(tiny_model))
    forget_traces()
    traced, _ = traced_backend.from_saved(IndexSettings(model=str(tiny_model)), model.fingerprint)
    texts = [f"text {i} " + "about boots and coffee, " * (i % 17) for i in range(60)]
    assert traced.embedding == model.embedding and traced.dimension == model.dimension
    np.testing.assert_allclose(traced.encode_texts(texts), model.encode_texts(texts), atol=1e-5, rtol=0)
    np.testing.assert_allclose(traced.encode_queries(texts[:1]), model.encode_queries(texts[:1]), atol=1e-5, rtol=0)
