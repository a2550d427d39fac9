"""Quantised vectors: float32 against int8 and binary codes with rescoring (``indexer build --vectors``).

One run, each build and each measurement a fresh process:

1. 1,000,000 documents with the free encoder of ``ingest.py`` (the real
   model's vectors of the first --base Debian descriptions; the copies plus
   small noise), ``--index-type auto`` (IVF at this size).
2. The first --debian Debian descriptions with their real vectors (the same
   cached file: exactly what the model gives), ``auto`` (Flat at this size).
3. nDCG@10 on the Debian 5k set: the first 5,000 descriptions and the
   --ndcg-queries BEIR queries whose relevant description is among them.

For each set and each of float32, int8 and binary: build seconds, bytes on
disk, and in a query process that opens the index and answers --queries
real questions (Debian synopses embedded by all-MiniLM-L6-v2, one at a time,
``Index.search_by_vector``, k=10): its resident memory after opening the
index and answering (VmRSS; RssAnon and RssFile apart: the whole vectors
of int8 and binary are mapped from disk, and a search reads only its
candidates' pages), the growth of VmRSS from opening the index (what the
index costs the process, without the interpreter and the encoder), p50/p99
latency, and recall@10 against exact float32 search (brute force over the
whole vectors, after the memory was read).

    python benchmarks/quantise.py [--documents 1000000] [--debian 20000] [--queries 200] [--ndcg-queries 500]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import HERE, copied_texts, cpu_flags, debian_corpus, debian_queries, machine, ndcg_at_10, percentile, save, write_jsonl

ROOT = HERE.parent
STORAGE = ("float32", "int8", "binary")


def memory() -> dict[str, int]:
    """This process's VmRSS, RssAnon and RssFile in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[name].split()[0]) * 1024 for name in ("VmRSS", "RssAnon", "RssFile")}


def build(source: Path, index: Path, storage: str, base: int) -> None:
    """In a fresh process: build ``source`` with the free encoder, vectors kept as ``storage``; print the report."""
    import ingest

    from indexer import IndexSettings, build_index

    report = build_index(source, index, IndexSettings(index_type="auto", vectors=storage), encoder=ingest.free_encoder(base, "debian"))
    print(json.dumps(report.to_dict()))


def queries(index: Path, base: int, questions: Path, relevant: Path | None) -> None:
    """In a fresh process: open ``index``, answer the ``questions`` (vectors) one at a time; memory, latency, recall
    against exact search and, with ``relevant`` (the id each should find), nDCG@10."""
    import ingest

    from indexer import Index

    vectors = np.load(questions)
    encoder = ingest.free_encoder(base, "debian")
    before = memory()
    with Index(index, encoder=encoder) as opened:
        opened.search_by_vector(vectors[0], k=10)  # the first search opens what opening left for later
        seconds, found = [], []
        for vector in vectors:
            started = time.perf_counter()
            hits = opened.search_by_vector(vector, k=10)
            seconds.append(time.perf_counter() - started)
            found.append([hit.id for hit in hits])
        after = memory()
        (segment,) = opened._served.segments
        structure, search_params = segment.meta.vector_index, segment.meta.search_params
        keys = np.asarray(segment.keys)
        best = np.full((len(vectors), 10), -np.inf, dtype=np.float32), np.full((len(vectors), 10), -1, dtype=np.int64)
        for first in range(0, len(keys), 65536):  # exact float32 search over the whole vectors
            chunk = keys[first : first + 65536]
            scores = np.hstack([best[0], vectors @ segment.vectors.reconstruct(chunk).T])
            held = np.hstack([best[1], np.broadcast_to(chunk, (len(vectors), len(chunk)))])
            top = np.argpartition(-scores, 9, axis=1)[:, :10]
            best = np.take_along_axis(scores, top, axis=1), np.take_along_axis(held, top, axis=1)
        rows = segment.store.fetch(np.unique(best[1]))
        exact = [{rows[int(k)]["id"] for k in row} for row in best[1]]
    recall = float(np.mean([len(set(f) & e) / 10 for f, e in zip(found, exact)]))
    result = {"structure": structure, "search_params": search_params, "rss_mb": round(after["VmRSS"] / 2**20),
              "rss_anon_mb": round(after["RssAnon"] / 2**20), "rss_file_mb": round(after["RssFile"] / 2**20),
              "index_rss_mb": round((after["VmRSS"] - before["VmRSS"]) / 2**20),
              "p50_ms": round(percentile(seconds, 50) * 1000, 2), "p99_ms": round(percentile(seconds, 99) * 1000, 2),
              "recall_at_10": round(recall, 4)}
    if relevant is not None:
        result["ndcg_at_10"] = round(ndcg_at_10(found, json.loads(relevant.read_text())), 4)
    print(json.dumps(result))


def in_process(call: str, tmp: Path) -> dict:
    """``quantise.<call>`` in a fresh Python with this checkout's code: its last line of output as JSON."""
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import quantise; from pathlib import Path; quantise.{call}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    if result.returncode:
        raise SystemExit(f"{call} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(name: str, texts: list[str], base: int, questions: Path, relevant: Path | None, tmp: Path) -> list[dict]:
    """Build ``texts`` once per storage and measure each; a row per storage."""
    source = write_jsonl(tmp / f"{name}.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])
    rows = []
    for storage in STORAGE:
        index = tmp / f"{name}-{storage}"
        started = time.perf_counter()
        report = in_process(f"build(Path({str(source)!r}), Path({str(index)!r}), {storage!r}, {base})", tmp)
        wall = time.perf_counter() - started
        disk = sum(f.stat().st_size for f in index.rglob("*") if f.is_file())
        codes = sum(f.stat().st_size for f in (index / "segments").rglob("vectors.faiss"))
        relevant_arg = f"Path({str(relevant)!r})" if relevant is not None else "None"
        measured = in_process(f"queries(Path({str(index)!r}), {base}, Path({str(questions)!r}), {relevant_arg})", tmp)
        rows.append({"set": name, "documents": len(texts), "vectors": storage, "build_s": round(wall, 1),
                     "reported_s": report["seconds"], "disk_mb": round(disk / 2**20), "codes_mb": round(codes / 2**20), **measured})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(index)
    source.unlink()
    return rows


def question_vectors(texts: list[str], path: Path) -> Path:
    """The real model's vectors of ``texts``, saved at ``path``."""
    from indexer.encoder import Encoder

    np.save(path, Encoder().encode_texts(texts))
    return path


def main() -> None:
    import ingest

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=1_000_000)
    parser.add_argument("--debian", type=int, default=20_000, help="Debian descriptions (at most --base)")
    parser.add_argument("--base", type=int, default=20_000, help="Debian descriptions the free encoder has real vectors of")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--ndcg-queries", type=int, default=500)
    args = parser.parse_args()
    print(f"{machine()}; CPU flags: {cpu_flags() or 'none listed'}", flush=True)
    ingest.real_vectors(args.base)
    corpus = debian_corpus(args.base)
    texts = [r["text"] for r in corpus]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Questions: Debian synopses whose description is not among the first 5,000 (those are nDCG's).
        asked = debian_queries({r["_id"] for r in corpus[5000:]}, args.queries)
        pairs = debian_queries({r["_id"] for r in corpus[:5000]}, args.ndcg_queries)
        questions = question_vectors([q for q, _ in asked], tmp / "questions.npy")
        ndcg_questions = question_vectors([q for q, _ in pairs], tmp / "ndcg-questions.npy")
        ids = {r["_id"]: f"d{i}" for i, r in enumerate(corpus[:5000])}
        relevant = tmp / "relevant.json"
        relevant.write_text(json.dumps([ids[doc] for _, doc in pairs]))
        rows = []
        if args.documents:
            rows += measure("free", copied_texts(texts, args.documents), args.base, questions, None, tmp)
        rows += measure("debian", texts[: args.debian], args.base, questions, None, tmp)
        rows += measure("debian-5k", texts[:5000], args.base, ndcg_questions, relevant, tmp)
    print(f"\n{'set':<10} {'docs':>8} {'vectors':<8} {'build s':>8} {'disk MB':>8} {'codes MB':>9} {'RSS MB':>7} "
          f"{'index MB':>9} {'p50 ms':>7} {'p99 ms':>7} {'recall':>7} {'nDCG':>6}")
    for row in rows:
        print(f"{row['set']:<10} {row['documents']:>8} {row['vectors']:<8} {row['build_s']:>8} {row['disk_mb']:>8} "
              f"{row['codes_mb']:>9} {row['rss_mb']:>7} {row['index_rss_mb']:>9} {row['p50_ms']:>7} {row['p99_ms']:>7} "
              f"{row['recall_at_10']:>7} {row.get('ndcg_at_10', ''):>6}")
    print("\nratios to float32 (index RSS growth; recall@10 against exact float32; nDCG difference):")
    for name in dict.fromkeys(row["set"] for row in rows):
        mine = {row["vectors"]: row for row in rows if row["set"] == name}
        for storage in ("int8", "binary"):
            ratio = mine[storage]["index_rss_mb"] / max(mine["float32"]["index_rss_mb"], 1)
            ndcg = (f", nDCG {mine[storage]['ndcg_at_10'] - mine['float32']['ndcg_at_10']:+.4f}"
                    if "ndcg_at_10" in mine[storage] else "")
            print(f"  {name:<10} {storage:<7} RSS x{ratio:.3f}, recall@10 {mine[storage]['recall_at_10']}{ndcg}")
    save("quantise", {"cpu_flags": cpu_flags(), "rows": rows})


if __name__ == "__main__":
    main()
