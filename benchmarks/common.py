"""What the benchmarks share: the real Debian data, peak memory, percentiles, results files."""

from __future__ import annotations

import gzip
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEBIAN = HERE.parent.parent / "shared" / "data" / "debian-descriptions"


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    records = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            records.append(json.loads(line))
            if limit is not None and len(records) == limit:
                break
    return records


def debian_corpus(limit: int | None = None, folder: Path = DEBIAN) -> list[dict]:
    """Debian package descriptions as ``{"_id", "text"}`` records, in file order."""
    return [{"_id": r["_id"], "text": r["text"]} for r in read_jsonl(folder / "corpus.jsonl.gz", limit)]


COPY = " (copy "


def copied_texts(base: list[str], count: int) -> list[str]:
    """``count`` distinct texts: ``base``, then ``base`` again with a copy number (" (copy 1)", ...), as often as it takes."""
    return [base[i % len(base)] + (f"{COPY}{i // len(base)})" if i >= len(base) else "") for i in range(count)]


def debian_documents(n: int) -> list[dict]:
    """``n`` documents ``{"id", "text"}``: the Debian descriptions, then again with a copy number (all texts distinct)."""
    return [{"id": f"d{i}", "text": text} for i, text in enumerate(copied_texts([r["text"] for r in debian_corpus()], n))]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def debian_queries(doc_ids: set[str], limit: int, folder: Path = DEBIAN) -> list[tuple[str, str]]:
    """(query text, relevant document id) for queries whose document is among ``doc_ids``."""
    relevant: dict[str, str] = {}
    with gzip.open(folder / "qrels.tsv.gz", "rt") as f:
        next(f)
        for line in f:
            query_id, doc_id, _ = line.rstrip("\n").split("\t")
            if doc_id in doc_ids:
                relevant[query_id] = doc_id
    pairs = []
    for record in read_jsonl(folder / "queries.jsonl.gz"):
        if record["_id"] in relevant:
            pairs.append((record["text"], relevant[record["_id"]]))
            if len(pairs) == limit:
                break
    return pairs


def ndcg_at_10(ranked: list[list[str]], relevant: list[str]) -> float:
    """Mean nDCG@10 with one relevant document per query."""
    gains = [1.0 / np.log2(r.index(doc) + 2) if doc in r[:10] else 0.0 for r, doc in zip(ranked, relevant)]
    return float(np.mean(gains))


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident memory of this process (or of its finished children), in MB."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return usage.ru_maxrss / 1024


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def machine() -> str:
    return f"{os.cpu_count()} CPUs, {platform.machine()}, {platform.python_implementation()} {platform.python_version()}"


def cpu_flags() -> str:
    """The CPU's vector-instruction flags (AVX, AVX-512, AMX): which kernels torch, ONNX Runtime and FAISS can run."""
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    return " ".join(sorted(f for f in flags if f.startswith(("avx", "amx"))))


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2))
    return path


def tiny_model(folder: Path) -> Path:
    """A random 2-layer, 32-wide BERT with the real tokenizer, saved in ``folder``: the model costs almost nothing."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from indexer.encoder import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def call(base: str, path: str, payload: dict | None = None, method: str = "POST", *, key: str, timeout: float = 120) -> dict:
    """One JSON request to a running ``indexer serve`` with its API key."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"content-type": "application/json", "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


@contextmanager
def serve(index: Path, key: str, start_timeout: float = 300, *options: str) -> Iterator[str]:
    """Run ``indexer serve INDEX [options]`` on a free loopback port with API ``key``; yield its base URL once /health
    answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "indexer", "serve", str(index), "--port", str(port), *options],
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "INDEXER_API_KEY": key},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                call(base, "/health", method="GET", key=key)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("indexer serve did not start") from None
                time.sleep(0.2)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=60)
