"""indexer against a hand-rolled sentence-transformers + FAISS script, same model, same data, one run.

The first N Debian package descriptions and Debian queries whose answer is
among them. Each system builds in a fresh process and is queried in another
fresh process: build wall time (process start and model load included),
single-query p50/p99 (embed + search + text), the query process's peak RSS,
and nDCG@10. txtai and Chroma are not installed here; the issue's figures
for them, measured on this machine kind, are printed for reference.

    python benchmarks/peers.py [--documents 5000] [--queries 500]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import debian_corpus, debian_queries, machine, ndcg_at_10, peak_rss_mb, percentile, save

QUOTED = {  # from the issue: build s, p50 ms, p99 ms, query RSS MB, nDCG@10 (5,000 docs, 500 queries)
    "txtai (faiss + sqlite), quoted": (71.0, 16.8, 33.1, 605, 0.724),
    "Chroma (HNSW), quoted": (87.4, 14.7, 20.6, 598, 0.720),
}


def build_hand_rolled(source: Path, folder: Path) -> None:
    """What the BERT-embeddings notebooks do: encode everything, FAISS flat inner product, texts beside."""
    import faiss
    from sentence_transformers import SentenceTransformer

    from indexer.encoder import resolve_model_path

    records = [json.loads(line) for line in source.read_text().splitlines()]
    model = SentenceTransformer(resolve_model_path("all-MiniLM-L6-v2"), device="cpu")
    vectors = model.encode([r["text"] for r in records], batch_size=64, normalize_embeddings=True)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    faiss.write_index(index, str(folder / "hand.faiss"))
    (folder / "hand.json").write_text(json.dumps([[r["_id"], r["text"]] for r in records]))


def query_hand_rolled(folder: Path, questions: list[str]):
    import faiss
    from sentence_transformers import SentenceTransformer

    from indexer.encoder import resolve_model_path

    model = SentenceTransformer(resolve_model_path("all-MiniLM-L6-v2"), device="cpu")
    index = faiss.read_index(str(folder / "hand.faiss"))
    records = json.loads((folder / "hand.json").read_text())

    def search(question: str) -> list[str]:
        vector = model.encode([question], normalize_embeddings=True)
        _, rows = index.search(vector, 10)
        return [records[i][0] for i in rows[0] if i >= 0 and records[i][1]]

    return search


def query_indexer(folder: Path, questions: list[str]):
    from indexer import Index

    index = Index(folder / "indexer")
    return lambda question: [hit.id for hit in index.search(question, k=10)]


def run_queries(system: str, folder: Path, pairs: list[tuple[str, str]]) -> dict:
    questions = [q for q, _ in pairs]
    search = {"hand": query_hand_rolled, "indexer": query_indexer}[system](folder, questions)
    for question in questions[:20]:
        search(question)
    latencies, ranked = [], []
    for question in questions:
        started = time.perf_counter()
        ranked.append(search(question))
        latencies.append((time.perf_counter() - started) * 1000)
    return {
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "rss_mb": peak_rss_mb(),
        "ndcg": ndcg_at_10(ranked, [d for _, d in pairs]),
    }


def fresh(*args: str) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=5000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--phase", choices=["main", "build-hand", "query"], default="main")
    parser.add_argument("--system", default="")
    parser.add_argument("--folder", type=Path)
    args = parser.parse_args()

    corpus = debian_corpus(args.documents)
    pairs = debian_queries({r["_id"] for r in corpus}, args.queries)
    if args.phase == "build-hand":
        build_hand_rolled(args.folder / "corpus.jsonl", args.folder)
        return
    if args.phase == "query":
        print(json.dumps(run_queries(args.system, args.folder, pairs)))
        return

    me = str(Path(__file__).resolve())
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = folder / "corpus.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in corpus))
        # Interleave: hand-rolled build, indexer build, then the two query runs.
        builds = {
            "hand": fresh(me, "--phase", "build-hand", "--folder", str(folder), "--documents", str(args.documents))[0],
            "indexer": fresh("-m", "indexer", "build", str(source), "--index", str(folder / "indexer"))[0],
        }
        for system in ("hand", "indexer"):
            _, out = fresh(me, "--phase", "query", "--system", system, "--folder", str(folder),
                           "--documents", str(args.documents), "--queries", str(args.queries))
            results[system] = {"build_s": builds[system], **json.loads(out)}

    names = {"hand": "sentence-transformers + FAISS flat, hand-rolled", "indexer": "indexer (flat, fp32, defaults)"}
    print(f"{args.documents} Debian descriptions, {len(pairs)} queries, {machine()}")
    print(f"{'system':<50}{'build s':>9}{'p50 ms':>8}{'p99 ms':>8}{'RSS MB':>8}{'nDCG@10':>9}")
    for system, r in results.items():
        print(f"{names[system]:<50}{r['build_s']:>9.1f}{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}{r['rss_mb']:>8.0f}{r['ndcg']:>9.3f}")
    for name, (b, p50, p99, rss, ndcg) in QUOTED.items():
        print(f"{name:<50}{b:>9.1f}{p50:>8.1f}{p99:>8.1f}{rss:>8.0f}{ndcg:>9.3f}")
    ours, hand = results["indexer"], results["hand"]
    fastest_build = min(hand["build_s"], *(q[0] for q in QUOTED.values()))
    fastest_p50 = min(hand["p50_ms"], *(q[1] for q in QUOTED.values()))
    ratios = {
        "build vs fastest peer": ours["build_s"] / fastest_build,
        "build vs hand-rolled (this run)": ours["build_s"] / hand["build_s"],
        "p50 vs fastest peer": ours["p50_ms"] / fastest_p50,
        "p50 vs hand-rolled (this run)": ours["p50_ms"] / hand["p50_ms"],
        "query RSS vs hand-rolled (this run)": ours["rss_mb"] / hand["rss_mb"],
        "nDCG@10 difference vs hand-rolled": ours["ndcg"] - hand["ndcg"],
    }
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    save("peers", {"documents": args.documents, "queries": len(pairs), "results": results, "ratios": ratios})


if __name__ == "__main__":
    main()
