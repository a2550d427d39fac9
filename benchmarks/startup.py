"""Start-up and single-question latency: the torch backend against ONNX Runtime, beside sentence-transformers.

1. Fresh processes: the wall time and peak memory of `indexer query INDEX QUESTION -k 10` on the bundled
   sample, a new process each run, torch and ONNX runs alternating. Each backend has its own cache folder
   (XDG_CACHE_HOME): torch's holds no ONNX export, so the torch backend answers (from the trace its first
   load saved); ONNX's holds the export `build --backend onnx` made. A warm-up run of each first: the
   first load on a machine times the forwards and saves the trace, and the agreement check is remembered.
2. One process: the 100 sample questions one at a time, each embedded (p50, p99): by what a search on
   each backend runs (torch: the saved trace; onnx: the export), by the torch backend's full model, and by
   sentence-transformers (`SentenceTransformer.encode`); and the whole search (embed, FAISS, SQLite).

    python benchmarks/startup.py [--runs 7] [--rounds 3]
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import HERE, cpu_flags, machine, percentile, save

SAMPLE = HERE.parent / "dataset"
QUESTION = "boots that keep my feet dry on muddy mountain trails"


def timed_process(command: list[str], cache: Path) -> tuple[float, float]:
    """Wall seconds and peak resident MB of one run of ``command`` with its own cache folder."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env={**os.environ, "XDG_CACHE_HOME": str(cache)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read().decode()}")
    process.stderr.close()
    return seconds, usage.ru_maxrss / 1024


def fresh_processes(indexes: dict[str, tuple[Path, Path]], runs: int) -> dict[str, dict]:
    found: dict[str, list[tuple[float, float]]] = {backend: [] for backend in indexes}
    for run in range(runs + 1):
        for backend, (index, cache) in indexes.items():
            measured = timed_process([sys.executable, "-m", "indexer", "query", str(index), QUESTION, "-k", "10"], cache)
            if run:  # run 0 is the warm-up
                found[backend].append(measured)
    return {backend: {"wall_s": [round(s, 2) for s, _ in rows], "wall_s_median": round(statistics.median(s for s, _ in rows), 3),
                      "wall_s_min": round(min(s for s, _ in rows), 3), "wall_s_max": round(max(s for s, _ in rows), 3),
                      "peak_mb_median": round(statistics.median(m for _, m in rows))}
            for backend, rows in found.items()}


def latencies(run, questions: list[str], rounds: int) -> dict[str, float]:
    for question in questions[:10]:  # warm-up: kernels are compiled per input shape
        run(question)
    seconds = []
    for _ in range(rounds):
        for question in questions:
            started = time.perf_counter()
            run(question)
            seconds.append(time.perf_counter() - started)
    milliseconds = [s * 1000 for s in seconds]
    return {"p50_ms": round(percentile(milliseconds, 50), 2), "p99_ms": round(percentile(milliseconds, 99), 2)}


def in_process(indexes: dict[str, tuple[Path, Path]], rounds: int) -> list[dict]:
    from sentence_transformers import SentenceTransformer

    from indexer import Index
    from indexer.encoder import Encoder, resolve_model_path

    questions = [json.loads(line)["query"] for line in (SAMPLE / "queries.jsonl").read_text().splitlines()]
    rows = []
    for backend, (index_path, cache) in indexes.items():
        os.environ["XDG_CACHE_HOME"] = str(cache)  # the cache folder is read at each use
        with Index(index_path) as index:
            rows.append({"what": f"{backend}: embed one question ({type(index.encoder).__name__})",
                         **latencies(lambda q: index.encoder.encode_queries([q]), questions, rounds)})
            rows.append({"what": f"{backend}: search (embed, FAISS, SQLite), k=10",
                         **latencies(lambda q: index.search(q, k=10), questions, rounds)})
    model = Encoder()
    rows.append({"what": "torch: embed one question (Encoder, the model itself)",
                 **latencies(lambda q: model.encode_queries([q]), questions, rounds)})
    reference = SentenceTransformer(resolve_model_path("all-MiniLM-L6-v2"), device="cpu")
    rows.append({"what": "sentence-transformers: embed one question (encode)",
                 **latencies(lambda q: reference.encode([q], normalize_embeddings=True), questions, rounds)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="fresh processes per backend, after one warm-up each")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the 100 sample questions in one process")
    args = parser.parse_args()
    print(f"{machine()}; CPU flags: {cpu_flags() or 'none listed'}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        indexes = {}
        for backend in ("torch", "onnx"):
            cache, index = folder / f"cache-{backend}", folder / f"products-{backend}"
            subprocess.run([sys.executable, "-m", "indexer", "build", str(SAMPLE / "corpus.jsonl"), "--index", str(index),
                            "--backend", backend], env={**os.environ, "XDG_CACHE_HOME": str(cache)}, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            indexes[backend] = (index, cache)
        processes = fresh_processes(indexes, args.runs)
        for backend, row in processes.items():
            print(f"fresh `indexer query` process, {backend}: {json.dumps(row)}", flush=True)
        rows = in_process(indexes, args.rounds)
    for row in rows:
        print(json.dumps(row), flush=True)
    print(f"saved {save('startup', {'cpu_flags': cpu_flags(), 'runs': args.runs, 'processes': processes, 'in_process': rows})}")


if __name__ == "__main__":
    main()
