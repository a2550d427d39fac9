"""What a small write costs as the index grows: one-document upserts and deletes at two sizes.

A tiny random BERT (2 layers, 32 wide, the real tokenizer) embeds, so the
model costs almost nothing and what is measured is the index. For each of
--sizes (default 20k and 300k documents, Debian package descriptions repeated
with a copy number past the 60,456 there are) and each index type (flat,
hnsw), in one run:

* build the index (CLI);
* one-document upsert and delete through the CLI, each a fresh process (median
  of --cli-repeats), with the bytes the process wrote (``/proc/self/io``:
  ``wchar``, every write() call, and ``write_bytes``, what reached the block layer);
  and two CLI writes that encode nothing: an upsert of the same document with a
  new field, and ``rebuild --if-changed`` of the unchanged source;
* the same through the library in this process (median of 10);
* the same through a running ``indexer serve`` (POST /documents, DELETE
  /documents/ID; median of 10);
* search p50 (dense, and hybrid up to --hybrid-up-to documents; --queries
  queries) over the base segment plus 10 one-document segments (the merge
  policy held off), then over the compacted index;

and keyword (BM25) nDCG@10 on 1,000 Debian queries after 20 small writes (50
upserts and 10 deletes each) against a fresh build of the same documents.

Prints a table, the ratios the writes issue sets targets for, and writes
benchmarks/results/writes.json.

    python benchmarks/writes.py [--sizes 20000 300000] [--cli-repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    DEBIAN,
    cpu_flags,
    debian_corpus,
    debian_documents,
    debian_queries,
    machine,
    ndcg_at_10,
    percentile,
    save,
    serve,
    tiny_model,
    write_jsonl,
)
from common import call as common_call

KEY = "writes-benchmark-key"
IO_PROBE = (
    "import atexit, sys\n"
    "def report():\n"
    "    sys.stderr.write('IO ' + open('/proc/self/io').read().replace('\\n', ' ') + '\\n')\n"
    "atexit.register(report)\n"
    "from indexer.cli import app\n"
    "sys.argv = ['indexer', *sys.argv[1:]]\n"
    "app()\n"
)




def io_counters() -> dict[str, int]:
    return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}


def cli(*args: str) -> tuple[dict, float, dict[str, int]]:
    """Run one indexer command in a fresh process: (its --json report, wall seconds, its /proc/self/io counters)."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", IO_PROBE, *args, "--json"], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.monotonic() - started
    if result.returncode:
        raise SystemExit(f"indexer {' '.join(args)} failed:\n{result.stderr}")
    line = next(line for line in result.stderr.splitlines() if line.startswith("IO "))
    fields = line[3:].split()
    io = {fields[i].rstrip(":"): int(fields[i + 1]) for i in range(0, len(fields), 2)}
    return json.loads(result.stdout), wall, io


def call(base: str, path: str, payload: dict | None = None, method: str = "POST") -> dict:
    return common_call(base, path, payload, method, key=KEY, timeout=300)


def median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def measure_cli(index: Path, tmp: Path, repeats: int, tag: str) -> dict:
    upserts, deletes, relabels, rebuilds = [], [], [], []
    for i in range(repeats):
        record = {"id": f"cli-{tag}-{i}", "text": f"a freshly packaged tool number {i} for {tag}"}
        _, wall, io = cli("upsert", str(index), str(write_jsonl(tmp / "one.jsonl", [record])))
        upserts.append((wall, io["wchar"], io["write_bytes"]))
        # The same text with a new field: its vector is in the embedding cache, so the model is never loaded.
        report, wall, _ = cli("upsert", str(index), str(write_jsonl(tmp / "one.jsonl", [{**record, "label": "moved"}])))
        assert report["encoded"] == 0 and report["published"], report
        relabels.append(wall)
        _, wall, io = cli("delete", str(index), f"cli-{tag}-{i}")
        deletes.append((wall, io["wchar"], io["write_bytes"]))
        report, wall, _ = cli("rebuild", str(index), "--if-changed")  # the source is unchanged: nothing is published
        assert not report["published"], report
        rebuilds.append(wall)
    return {
        f"cli_{verb}_s": median([w for w, _, _ in rows]) for verb, rows in (("upsert", upserts), ("delete", deletes))
    } | {"cli_metadata_upsert_s": median(relabels), "cli_unchanged_rebuild_s": median(rebuilds)} | {
        f"cli_{verb}_wchar_mb": round(median([c for _, c, _ in rows]) / 1e6, 3) for verb, rows in (("upsert", upserts), ("delete", deletes))
    } | {
        f"cli_{verb}_write_bytes_mb": round(median([b for _, _, b in rows]) / 1e6, 3) for verb, rows in (("upsert", upserts), ("delete", deletes))
    }


def measure_library(index: Path, tmp: Path, encoder, tag: str, repeats: int = 10) -> dict:
    from indexer import delete_documents, upsert_documents

    upserts, deletes, written = [], [], []
    for i in range(repeats):
        doc = write_jsonl(tmp / "one.jsonl", [{"id": f"lib-{tag}-{i}", "text": f"a library-written tool number {i}"}])
        before = io_counters()["wchar"]
        started = time.monotonic()
        upsert_documents(index, doc, encoder=encoder)
        upserts.append(time.monotonic() - started)
        written.append(io_counters()["wchar"] - before)
        started = time.monotonic()
        delete_documents(index, [f"lib-{tag}-{i}"])
        deletes.append(time.monotonic() - started)
    return {"library_upsert_s": median(upserts), "library_delete_s": median(deletes), "library_upsert_wchar_mb": round(median(written) / 1e6, 3)}


def measure_http(index: Path, tag: str, repeats: int = 10) -> dict:
    with serve(index, KEY) as base:
        call(base, "/search", {"query": "warm up", "k": 3})
        upserts, deletes = [], []
        for i in range(repeats):
            started = time.monotonic()
            call(base, "/documents", {"documents": [{"id": f"http-{tag}-{i}", "text": f"a tool sent over HTTP, number {i}"}]})
            upserts.append(time.monotonic() - started)
            started = time.monotonic()
            call(base, f"/documents/http-{tag}-{i}", method="DELETE")
            deletes.append(time.monotonic() - started)
        return {"http_upsert_s": median(upserts), "http_delete_s": median(deletes)}


def measure_search(index: Path, tmp: Path, encoder, queries: list[str], modes: tuple[str, ...]) -> dict:
    from indexer import Index, compact_index, index_info, upsert_documents
    from indexer import compact as policy

    compact_index(index)  # one base segment, then ten small ones
    held, policy.MAX_SEGMENTS = policy.MAX_SEGMENTS, 1 << 30  # keep the 10 small segments apart
    try:
        for i in range(10):
            upsert_documents(index, write_jsonl(tmp / "one.jsonl", [{"id": f"seg-{i}", "text": f"segment tool {i}"}]), encoder=encoder)
    finally:
        policy.MAX_SEGMENTS = held
    segments = len(index_info(index)["segments"])

    def p50(mode: str) -> float:
        with Index(index) as searcher:
            for q in queries[:20]:
                searcher.search(q, k=10, mode=mode)
            times = []
            for q in queries:
                started = time.perf_counter()
                searcher.search(q, k=10, mode=mode)
                times.append(time.perf_counter() - started)
        return percentile(times, 50) * 1000

    segmented = {mode: p50(mode) for mode in modes}
    compact_index(index)
    compacted = {mode: p50(mode) for mode in modes}
    return {"search_segments": segments,
            **{f"search_{m}_p50_ms_segmented": round(v, 3) for m, v in segmented.items()},
            **{f"search_{m}_p50_ms_compacted": round(v, 3) for m, v in compacted.items()}}


def bm25_after_small_writes(tmp: Path, model: Path, encoder, documents: int, batches: int = 20, queries: int = 1000) -> dict:
    """Keyword nDCG@10 on Debian after ``batches`` small writes (50 upserts, 10 deletes each) against a fresh build of the same documents."""
    from indexer import Index, build_index, delete_documents, index_info, upsert_documents
    from indexer.settings import IndexSettings

    records = [{"id": r["_id"], "text": r["text"]} for r in debian_corpus(documents)]
    held_out, base = records[: 50 * batches], records[50 * batches :]
    index = tmp / "bm25-segmented"
    build_index(write_jsonl(tmp / "bm25-base.jsonl", base), index, IndexSettings(model=str(model)))
    live = {r["id"]: r for r in base}
    for batch in range(batches):
        upsert_documents(index, write_jsonl(tmp / "bm25-batch.jsonl", held_out[50 * batch : 50 * (batch + 1)]), encoder=encoder)
        live.update((r["id"], r) for r in held_out[50 * batch : 50 * (batch + 1)])
        doomed = [r["id"] for r in base[10 * batch : 10 * (batch + 1)]]
        delete_documents(index, doomed)
        for doc_id in doomed:
            del live[doc_id]
    segments = len(index_info(index)["segments"])
    fresh = tmp / "bm25-fresh"
    build_index(write_jsonl(tmp / "bm25-live.jsonl", list(live.values())), fresh, IndexSettings(model=str(model)))
    pairs = debian_queries(set(live), queries)
    scores = {}
    for name, path in (("segmented", index), ("fresh", fresh)):
        with Index(path) as searcher:
            ranked = [[hit.id for hit in searcher.search(q, k=10, mode="keyword")] for q, _ in pairs]
        scores[name] = round(ndcg_at_10(ranked, [doc for _, doc in pairs]), 4)
    return {"bm25_documents": len(live), "bm25_segments": segments, "bm25_queries": len(pairs),
            "bm25_ndcg10_segmented": scores["segmented"], "bm25_ndcg10_fresh": scores["fresh"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 300_000])
    parser.add_argument("--types", nargs="+", default=["flat", "hnsw"])
    parser.add_argument("--cli-repeats", type=int, default=3)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--hybrid-up-to", type=int, default=50_000,
                        help="measure hybrid search only on indexes up to this size (keyword search over large segments is slow)")
    parser.add_argument("--bm25-documents", type=int, default=20_000, help="Debian documents for the keyword-quality check (0: skip)")
    args = parser.parse_args()
    from indexer.encoder import Encoder
    from indexer.settings import IndexSettings

    flags = cpu_flags()
    queries = [r["text"][:80] for r in debian_corpus(args.queries, DEBIAN)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny_model(tmp / "tiny-bert")
        encoder = Encoder.from_settings(IndexSettings(model=str(model)))
        for size in args.sizes:
            source = write_jsonl(tmp / f"corpus-{size}.jsonl", debian_documents(size))
            for kind in args.types:
                index = tmp / f"{kind}-{size}"
                _, build_s, _ = cli("build", str(source), "--index", str(index), "--model", str(model), "--index-type", kind)
                row = {"documents": size, "index_type": kind, "build_s": round(build_s, 1),
                       "index_mb": round(sum(p.stat().st_size for p in index.rglob("*") if p.is_file()) / 1e6, 1)}
                row |= measure_cli(index, tmp, args.cli_repeats, f"{kind}{size}")
                row |= measure_library(index, tmp, encoder, f"{kind}{size}")
                row |= measure_http(index, f"{kind}{size}")
                row |= measure_search(index, tmp, encoder, queries, ("dense", "hybrid") if size <= args.hybrid_up_to else ("dense",))
                rows.append(row)
                print(json.dumps(row), flush=True)
        quality = bm25_after_small_writes(tmp, model, encoder, args.bm25_documents) if args.bm25_documents else {}
    small, large = min(args.sizes), max(args.sizes)
    writes = ["cli_upsert_s", "cli_metadata_upsert_s", "cli_delete_s", "cli_unchanged_rebuild_s", "library_upsert_s", "library_delete_s", "http_upsert_s", "http_delete_s",
              "cli_upsert_wchar_mb", "cli_delete_wchar_mb"]
    print(f"\n{machine()}; CPU flags: {flags or 'none'}")
    columns = ["documents", "index_type", "build_s", "index_mb", *writes, "search_dense_p50_ms_segmented", "search_dense_p50_ms_compacted",
               "search_hybrid_p50_ms_segmented", "search_hybrid_p50_ms_compacted"]
    for row in rows:
        print("  ".join(f"{c}={row[c]}" for c in columns if c in row))
    ratios = {}
    for kind in args.types:
        a = next(r for r in rows if r["documents"] == small and r["index_type"] == kind)
        b = next(r for r in rows if r["documents"] == large and r["index_type"] == kind)
        ratios[kind] = {w: round(b[w] / a[w], 3) if a[w] else None for w in writes}
        ratios[kind]["search_dense_segmented_over_compacted"] = round(b["search_dense_p50_ms_segmented"] / b["search_dense_p50_ms_compacted"], 3)
        for r in (a, b):
            if "search_hybrid_p50_ms_segmented" in r:
                ratios[kind][f"search_hybrid_segmented_over_compacted_{r['documents']}"] = round(
                    r["search_hybrid_p50_ms_segmented"] / r["search_hybrid_p50_ms_compacted"], 3)
        print(f"{kind}: {large}/{small} ratios: " + ", ".join(f"{w}={v}" for w, v in ratios[kind].items()))
    if quality:
        print(f"keyword nDCG@10 on {quality['bm25_queries']} Debian queries, {quality['bm25_documents']} documents: "
              f"after 20 small writes ({quality['bm25_segments']} segments) {quality['bm25_ndcg10_segmented']}, "
              f"fresh build {quality['bm25_ndcg10_fresh']}")
    save("writes", {"cpu_flags": flags, "rows": rows, "ratios": ratios, "keyword_quality": quality})


if __name__ == "__main__":
    main()
