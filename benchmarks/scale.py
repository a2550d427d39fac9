"""Pipeline overhead at scale, without the model's cost: 1M documents through a tiny random BERT.

Creates a randomly initialised 2-layer, 32-d BERT (with the real tokenizer)
and a synthetic JSONL corpus, then runs `indexer build` in a child process
and reports its wall time and peak RSS (streaming: the text corpus is never
held in memory), then opens the index and reports single-query latency and
ANN recall@10 against exact search at the stored defaults.

    python benchmarks/scale.py [--documents 1000000] [--index-type auto]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from common import machine, peak_rss_mb, percentile, save, tiny_model

WORDS = (
    "package library tool server client daemon utility module plugin driver kernel network audio video image "
    "font theme editor viewer parser compiler debugger database cache proxy shell terminal python perl ruby java "
    "rust haskell lisp ocaml documentation development headers runtime static shared transitional dummy data "
    "files support bindings interface extension framework toolkit widget graphical command line console"
).split()




def write_corpus(path: Path, count: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(count):
            text = " ".join(rng.choices(WORDS, k=rng.randint(8, 30)))
            f.write(json.dumps({"id": f"d{i}", "text": text, "n": i}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=1_000_000)
    parser.add_argument("--index-type", default="auto")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny_model(tmp / "tiny-bert")
        source = tmp / "corpus.jsonl"
        write_corpus(source, args.documents)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "indexer", "build", str(source), "--index", str(tmp / "index"),
                        "--model", str(model), "--index-type", args.index_type, "--json"], check=True)
        build_seconds = time.perf_counter() - started
        build_rss = peak_rss_mb(children=True)

        import faiss

        from indexer import Index

        index = Index(tmp / "index")
        rng = random.Random(1)
        questions = [" ".join(rng.choices(WORDS, k=6)) for _ in range(args.queries)]
        latencies = []
        for question in questions:
            t0 = time.perf_counter()
            index.search(question, k=10)
            latencies.append((time.perf_counter() - t0) * 1000)
        vectors = index._served.vectors
        inner = vectors.inner
        storage = faiss.downcast_index(inner.storage) if isinstance(inner, faiss.IndexHNSW) else None
        recall = None
        if storage is not None or isinstance(inner, faiss.IndexFlat):
            flat = storage or inner
            everything = flat.reconstruct_n(0, flat.ntotal)
            keys = vectors.keys()
            queries = index.encoder.encode_texts(questions)
            exact = keys[np.argsort(-(queries @ everything.T), axis=1)[:, :10]]
            _, found = vectors.search(queries, 10)
            recall = float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)]))
        result = {
            "documents": args.documents,
            "structure": index.manifest.vector_index,
            "search_params": index.manifest.search_params,
            "build_s": round(build_seconds, 1),
            "build_peak_rss_mb": round(build_rss),
            "query_p50_ms": round(percentile(latencies, 50), 2),
            "query_p99_ms": round(percentile(latencies, 99), 2),
            "recall@10_vs_exact": recall,
            "index_bytes_on_disk": sum(p.stat().st_size for p in (tmp / "index").rglob("*") if p.is_file()),
        }
    print(machine())
    for name, value in result.items():
        print(f"{name:<22}{value}")
    save(f"scale-{args.documents}", result)


if __name__ == "__main__":
    main()
