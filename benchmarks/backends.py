"""Encoder backends side by side: torch fp32, ONNX Runtime fp32 and int8 (and torch int8), in one process.

For each: encoding speed (docs/s over the corpus, after a warm-up), how far
its vectors are from torch fp32's (max abs difference, lowest cosine), and
dense nDCG@10 over an index built with it. Sets: the bundled sample
(dataset/corpus.jsonl, dataset/queries.jsonl: one product per question) and
the first N Debian descriptions with the Debian queries whose document is
among them (../shared/data).

    python benchmarks/backends.py [--documents 5000] [--queries 500]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from common import DEBIAN, debian_corpus, debian_queries, machine, ndcg_at_10, save, write_jsonl

from indexer import Index, IndexSettings, build_index
from indexer.external import load_encoder

SAMPLE = Path(__file__).resolve().parent.parent / "dataset"
CHOICES = [("torch", "fp32"), ("onnx", "fp32"), ("onnx", "int8"), ("torch", "int8")]


def sample_set() -> tuple[list[dict], list[tuple[str, str]]]:
    products = [json.loads(line) for line in (SAMPLE / "corpus.jsonl").read_text().splitlines()]
    documents = [{"id": p["product_id"], "text": f"{p['title']} {p['description']}"} for p in products]
    questions = [json.loads(line) for line in (SAMPLE / "queries.jsonl").read_text().splitlines()]
    return documents, [(q["query"], q["product_id"]) for q in questions]


def debian_set(documents: int, queries: int) -> tuple[list[dict], list[tuple[str, str]]]:
    corpus = [{"id": r["_id"], "text": r["text"]} for r in debian_corpus(documents)]
    return corpus, debian_queries({r["id"] for r in corpus}, queries)


def measure(name: str, documents: list[dict], pairs: list[tuple[str, str]], folder: Path) -> list[dict]:
    source = write_jsonl(folder / f"{name}.jsonl", documents)
    texts = [d["text"] for d in documents]
    rows, reference = [], None
    for backend, precision in CHOICES:
        settings = IndexSettings(backend=backend, precision=precision)
        encoder = load_encoder(settings)
        encoder.encode_texts(texts[:64])  # warm-up (kernels compiled per shape)
        started = time.perf_counter()
        vectors = encoder.encode_texts(texts)
        seconds = time.perf_counter() - started
        reference = vectors if reference is None else reference
        path = folder / f"{name}-{backend}-{precision}"
        build_index(source, path, settings)
        with Index(path, encoder=encoder) as index:
            ranked = [[h.id for h in hits] for hits in index.search_many([q for q, _ in pairs], k=10)]
        rows.append({"set": name, "backend": backend, "precision": precision, "docs_per_s": round(len(texts) / seconds, 1),
                     "max_abs_diff": float(np.abs(vectors - reference).max()),
                     "min_cosine": float((vectors * reference).sum(axis=1).min()),
                     "ndcg_at_10": round(ndcg_at_10(ranked, [doc for _, doc in pairs]), 4)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=5000)
    parser.add_argument("--queries", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        rows = measure("sample", *sample_set(), folder)
        if DEBIAN.exists():
            rows += measure(f"debian-{args.documents}", *debian_set(args.documents, args.queries), folder)
    print(f"saved {save('backends', {'machine_detail': machine(), 'rows': rows})}")


if __name__ == "__main__":
    main()
