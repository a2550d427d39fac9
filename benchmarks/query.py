"""Query latency and throughput through the library API on a large index.

Opens an index once (building it first from the Debian corpus if the path
does not hold one), then times end-to-end single queries (embed + search +
fetch text) for p50/p99, the three parts separately, batch throughput, dense
nDCG@10 of the real Debian queries, and the process's peak RSS.

    python benchmarks/query.py [--index PATH] [--documents 60456] [--queries 500] [--index-type flat]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import DEBIAN, RESULTS, debian_corpus, debian_queries, machine, ndcg_at_10, peak_rss_mb, percentile, save


def ensure_index(path: Path, documents: int, index_type: str) -> None:
    if (path / "CURRENT").exists():
        return
    source = RESULTS / f"debian-{documents}.jsonl"
    RESULTS.mkdir(exist_ok=True)
    if not source.exists():
        import json

        source.write_text("".join(json.dumps(r) + "\n" for r in debian_corpus(documents)))
    print(f"building {path} from {documents} documents (once)...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "indexer", "build", str(source), "--index", str(path), "--index-type", index_type], check=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, default=RESULTS / "debian-index")
    parser.add_argument("--documents", type=int, default=60456)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--index-type", default="flat")
    args = parser.parse_args()
    ensure_index(args.index, args.documents, args.index_type)

    from indexer import Index

    started = time.perf_counter()
    index = Index(args.index)
    open_seconds = time.perf_counter() - started
    doc_ids = {r["_id"] for r in debian_corpus(len(index), DEBIAN)}
    pairs = debian_queries(doc_ids, args.queries)
    questions = [q for q, _ in pairs]
    for question in questions[:20]:
        index.search(question, k=10)

    total, embed, faiss_ms, fetch = [], [], [], []
    ranked = []
    served = index._served
    for question in questions:
        t0 = time.perf_counter()
        hits = index.search(question, k=10)
        total.append((time.perf_counter() - t0) * 1000)
        ranked.append([h.id for h in hits])
    for question in questions:
        t0 = time.perf_counter()
        vector = served.encoder.encode_texts([question])
        t1 = time.perf_counter()
        _, keys = served.vectors.search(vector, 10)
        t2 = time.perf_counter()
        served.store.fetch(keys[0].tolist())
        t3 = time.perf_counter()
        embed.append((t1 - t0) * 1000)
        faiss_ms.append((t2 - t1) * 1000)
        fetch.append((t3 - t2) * 1000)
    started = time.perf_counter()
    for start in range(0, len(questions), 64):
        index.search_many(questions[start : start + 64], k=10)
    batch_qps = len(questions) / (time.perf_counter() - started)

    result = {
        "documents": len(index),
        "structure": index.manifest.vector_index,
        "queries": len(questions),
        "open_s": round(open_seconds, 2),
        "single_p50_ms": round(percentile(total, 50), 2),
        "single_p99_ms": round(percentile(total, 99), 2),
        "embed_p50_ms": round(percentile(embed, 50), 2),
        "faiss_p50_ms": round(percentile(faiss_ms, 50), 2),
        "fetch_p50_ms": round(percentile(fetch, 50), 2),
        "batch_queries_per_s": round(batch_qps, 1),
        "ndcg@10": round(ndcg_at_10(ranked, [d for _, d in pairs]), 4),
        "peak_rss_mb": round(peak_rss_mb()),
    }
    print(f"{machine()}; index {args.index}")
    for name, value in result.items():
        print(f"{name:<22}{value}")
    save(f"query-{len(index)}-{args.index_type}", result)


if __name__ == "__main__":
    main()
