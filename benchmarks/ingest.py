"""Build speed: the pipelined ingest against the code before it, and against sentence-transformers + FAISS.

One run, side by side, each build a fresh ``indexer build`` process:

1. A tiny random BERT (the model costs almost nothing, so what shows is
   everything around it) over --documents Debian descriptions (repeated with
   a copy number past the 60,456 there are): this checkout against the
   commit --before (checked out from git into a temporary worktree), one
   untimed build each, then rounds interleaved, best round each; docs/s and
   the ratio of times.
2. The real model (all-MiniLM-L6-v2) over the first --real-documents
   descriptions: ``indexer build`` against the hand-rolled
   sentence-transformers + FAISS flat script of ``peers.py``.
3. Stage by stage, from this checkout's ``--json`` report: seconds each stage
   was busy (read, tokenize, encode, write overlap; seal follows them).

4. A free encoder (the ceiling of everything around the model): an
   ``ExternalEncoder`` that returns the real model's vectors of the first
   --free-base Debian descriptions (computed once with all-MiniLM-L6-v2 and
   kept in results/), plus small noise (0.01 per component, from a table of
   8,191 rows hashed by original and copy number, renormalised) for the
   copies; documents are those descriptions, then again with " (copy N)"
   (all texts distinct). Builds of --free sizes (flat at 200,000, auto at
   1,000,000 by default, and 1,000,000 again with structureless random
   vectors, where tuning works hardest) in fresh processes: docs/s, each
   stage's busy seconds, the share of the build spent tuning, the build's
   peak RSS, bytes on disk per part (segments, embedding cache), and, in
   another process, recall@10 of the structure against exact search on 200
   noisy document vectors.

    python benchmarks/ingest.py [--documents 100000] [--real-documents 5000] [--rounds 3] [--before REV]
                                [--free 200000:flat,1000000:auto,1000000:auto:random] [--free-base 20000] [--only-free]
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
import zlib
from itertools import repeat
from pathlib import Path

import numpy as np
from common import COPY, HERE, RESULTS, copied_texts, cpu_flags, debian_corpus, debian_documents, machine, save, tiny_model, write_jsonl

ROOT = HERE.parent
BEFORE = "ddd6b45698aabbdec213d627f6537d334091828e"  # the code issue 29 measures the tiny-model build against


def build(code: Path, source: Path, index: Path, *options: str) -> tuple[float, dict]:
    """``indexer build`` with the package at ``code`` in a fresh process: (wall seconds, its --json report)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(code)}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "indexer", "build", str(source), "--index", str(index), "--json", *options],
                            capture_output=True, text=True, env=env, cwd=code)
    wall = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"build with {code} failed:\n{result.stderr}")
    return wall, json.loads(result.stdout)


def hand_rolled(source: Path, folder: Path) -> float:
    """peers.py's sentence-transformers + FAISS script in a fresh process: wall seconds."""
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import peers; from pathlib import Path; " \
           f"peers.build_hand_rolled(Path({str(source)!r}), Path({str(folder)!r}))"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - started


NOISE_ROWS = 8191  # a prime, so the (original, copy) pairs spread over all rows; 12.5 MB


def real_vectors(base: int) -> Path:
    """The real model's vectors of the first ``base`` Debian descriptions, computed once (a few minutes) and kept."""
    path = RESULTS / f"debian-minilm-{base}.npy"
    if not path.exists():
        from indexer.encoder import Encoder

        print(f"embedding the first {base} Debian descriptions with the real model (once)...", flush=True)
        RESULTS.mkdir(exist_ok=True)
        np.save(path, Encoder().encode_texts([r["text"] for r in debian_corpus(base)]))
    return path


def free_encoder(base: int, vectors_kind: str):
    """The free encoder: the real model's vectors of the first ``base`` Debian descriptions (copies: plus noise), or,
    for ``random``, vectors without any structure (standard normal, one generator per chunk, seeded by its first text)."""
    from indexer.external import ExternalEncoder

    vectors = np.load(real_vectors(base))
    row_of = {text: i for i, text in enumerate(r["text"] for r in debian_corpus(base))}
    # Noise for copies from a table (a row per (original, copy number) pair, hashed): drawing 384 normals a
    # document would cost the encoder more than the rest of the pipeline's Python together.
    noise = np.random.default_rng(0).standard_normal((NOISE_ROWS, vectors.shape[1]), dtype=np.float32) * 0.01

    def embed(texts: list[str]) -> np.ndarray:
        if vectors_kind == "random":
            out = np.random.default_rng(zlib.crc32(texts[0].encode())).standard_normal((len(texts), vectors.shape[1]), dtype=np.float32)
            return out / np.linalg.norm(out, axis=1, keepdims=True)
        rows = np.fromiter(map(row_of.get, texts, repeat(-1)), dtype=np.int64, count=len(texts))
        copies = np.flatnonzero(rows < 0)
        if len(copies):  # a copy is its original's row; any other text (a question) some row
            parts = [texts[i].rpartition(COPY) for i in copies.tolist()]
            rows[copies] = [row_of.get(head, zlib.crc32(tail.encode()) % len(vectors)) for head, _, tail in parts]
            numbers = np.fromiter((int(tail[:-1]) if tail[:-1].isdigit() else 0 for _, _, tail in parts), dtype=np.int64, count=len(parts))
        out = vectors[rows]
        if len(copies):
            out[copies] += noise[(rows[copies] * 7919 + numbers * 104729) % NOISE_ROWS]
        return out

    return ExternalEncoder(embed, lambda text: embed([text])[0], name="free", config={"base": base, "vectors": vectors_kind})


def free_build(source: Path, index: Path, index_type: str, base: int, vectors_kind: str) -> None:
    """In a fresh process: build ``source`` with the free encoder and print the report."""
    from indexer import IndexSettings, build_index

    report = build_index(source, index, IndexSettings(index_type=index_type), encoder=free_encoder(base, vectors_kind))
    print(json.dumps(report.to_dict()))


def free_recall(index: Path, base: int, vectors_kind: str) -> None:
    """In another process: recall@10 of the built structure against exact search, on 200 stored vectors plus noise."""
    from indexer import Index

    noise = np.random.default_rng(0)
    with Index(index, encoder=free_encoder(base, vectors_kind)) as opened:
        (segment,) = opened._served.segments
        stored = segment.vectors
        keys = stored.keys()
        picked = np.random.default_rng(1).choice(len(keys), 200, replace=False)
        queries = stored.reconstruct(keys[picked]) + noise.standard_normal((200, stored.dimension), dtype=np.float32) * 0.05
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        exact = np.full((200, 10), -np.inf, dtype=np.float32), np.full((200, 10), -1, dtype=np.int64)
        for first in range(0, len(keys), 65536):
            chunk = keys[first : first + 65536]
            scores = np.hstack([exact[0], queries @ stored.reconstruct(chunk).T])
            found = np.hstack([exact[1], np.broadcast_to(chunk, (200, len(chunk)))])
            top = np.argpartition(-scores, 9, axis=1)[:, :10]
            exact = np.take_along_axis(scores, top, axis=1), np.take_along_axis(found, top, axis=1)
        _, approximate = stored.search(queries, 10)
        recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate.tolist(), exact[1].tolist())])
        print(json.dumps({"structure": segment.meta.vector_index, "search_params": segment.meta.search_params,
                          "tuned_recall": segment.meta.tuned_recall, "recall_at_10": round(float(recall), 4)}))


def in_process(call: str, tmp: Path) -> tuple[dict, float, int]:
    """``ingest.<call>`` in a fresh Python: its last line of output as JSON, wall seconds and peak RSS in bytes."""
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import ingest; from pathlib import Path; ingest.{call}"
    out, err = tmp / "free.out", tmp / "free.err"
    started = time.perf_counter()
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-c", code], stdout=stdout, stderr=stderr,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})  # this checkout's code
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{call} failed:\n{err.read_text()}")
    return json.loads(out.read_text().strip().splitlines()[-1]), wall, usage.ru_maxrss * 1024


def free_builds(sizes: list[tuple[int, str, str]], base: int, tmp: Path) -> list[dict]:
    """Each size built by ``free_build`` in a fresh process (wall, peak RSS, disk besides its report), then its
    recall measured by ``free_recall`` in another."""
    texts = copied_texts([r["text"] for r in debian_corpus(base)], max(n for n, _, _ in sizes))
    real_vectors(base)
    rows = []
    for count, index_type, vectors_kind in sizes:
        source = write_jsonl(tmp / f"free-{count}.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts[:count])])
        index = tmp / f"free-{count}-{index_type}-{vectors_kind}"
        report, wall, peak = in_process(f"free_build(Path({str(source)!r}), Path({str(index)!r}), {index_type!r}, {base}, "
                                        f"{vectors_kind!r})", tmp)
        disk = {part: sum(f.stat().st_size for f in (index / part).rglob("*") if f.is_file())
                for part in ("segments",)}
        disk["cache"] = sum(f.stat().st_size for f in index.glob("cache.db*"))
        disk["all"] = sum(f.stat().st_size for f in index.rglob("*") if f.is_file())
        recall, _, _ = in_process(f"free_recall(Path({str(index)!r}), {base}, {vectors_kind!r})", tmp)
        stages = report["stages"]
        rows.append({"documents": count, "index_type": index_type, "vectors": vectors_kind, "wall_s": round(wall, 1),
                     "docs_per_s": round(count / report["seconds"]), "reported_s": report["seconds"],
                     "stages": stages, "tune_share": round(stages.get("tune", 0.0) / report["seconds"], 3),
                     "peak_rss_mb": round(peak / 2**20), "disk_mb": {k: round(v / 2**20) for k, v in disk.items()}, **recall})
        print(json.dumps(rows[-1]), flush=True)
        source.unlink()
        shutil.rmtree(index)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--real-documents", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default=BEFORE, help="git revision to compare with")
    parser.add_argument("--free", default="200000:flat,1000000:auto,1000000:auto:random",
                        help="size:index type[:random] of each free-encoder build (random: vectors without structure)")
    parser.add_argument("--free-base", type=int, default=20000, help="Debian descriptions the free encoder has real vectors of")
    parser.add_argument("--only-free", action="store_true", help="only the free-encoder builds")
    args = parser.parse_args()
    print(f"{machine()}; CPU flags: {cpu_flags() or 'none listed'}", flush=True)
    sizes = [(int(n), kind, (rest or ["debian"])[0]) for n, kind, *rest in (part.split(":") for part in args.free.split(",") if part)]
    if args.only_free:
        with tempfile.TemporaryDirectory() as tmp:
            save("ingest-free", {"cpu_flags": cpu_flags(), "free_base": args.free_base,
                                 "free": free_builds(sizes, args.free_base, Path(tmp))})
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before = tmp / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(before), args.before], check=True)
        try:
            model = tiny_model(tmp / "tiny")
            source = write_jsonl(tmp / "corpus.jsonl", debian_documents(args.documents))
            tiny: dict[str, list[tuple[float, dict]]] = {"before": [], "now": []}
            # One untimed build each first: a model's first load on a machine times its forward choices (a cost
            # paid once, not per build), and the corpus and the code come into the page cache alike for both.
            for name, code in (("before", before), ("now", ROOT)):
                build(code, source, tmp / f"tiny-{name}-warm", "--model", str(model))
                shutil.rmtree(tmp / f"tiny-{name}-warm")
            for round_ in range(args.rounds):
                for name, code in (("before", before), ("now", ROOT)):
                    tiny[name].append(build(code, source, tmp / f"tiny-{name}-{round_}", "--model", str(model)))
            best = {name: min(runs, key=lambda run: run[0]) for name, runs in tiny.items()}

            hand = ours = float("nan")
            if args.real_documents:
                corpus = debian_corpus(args.real_documents)
                real = write_jsonl(tmp / "real.jsonl", [{"id": r["_id"], "text": r["text"]} for r in corpus])
                peers_source = write_jsonl(tmp / "peers.jsonl", corpus)  # peers.py reads _id and text
                (tmp / "hand").mkdir()
                hand = min(hand_rolled(peers_source, tmp / "hand") for _ in range(args.rounds))
                ours = min(build(ROOT, real, tmp / f"real-{i}")[0] for i in range(args.rounds))
            free = free_builds(sizes, args.free_base, tmp) if sizes else []
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)

    print(f"tiny model, {args.documents} documents, best of {args.rounds} fresh processes (wall s, docs/s):")
    for name, (wall, report) in best.items():
        print(f"  {name:<7} {wall:7.1f} s  {args.documents / wall:8.0f} docs/s  (reported {report['seconds']} s)")
    ratio = best["now"][0] / best["before"][0]
    print(f"  now / before: {ratio:.3f}")
    print("  stages now (busy seconds; read, tokenize, encode and write overlap):",
          ", ".join(f"{k} {v:.1f}" for k, v in best["now"][1].get("stages", {}).items()))
    print(f"real model, {args.real_documents} documents, best of {args.rounds} (wall s, process start and model load included):")
    print(f"  indexer build                 {ours:7.1f} s  {args.real_documents / ours:6.0f} docs/s")
    print(f"  sentence-transformers + FAISS {hand:7.1f} s  {args.real_documents / hand:6.0f} docs/s")
    print(f"  indexer / hand-rolled: {ours / hand:.3f}")
    save("ingest", {
        "cpu_flags": cpu_flags(), "documents": args.documents, "before": args.before,
        "tiny_before_s": best["before"][0], "tiny_now_s": best["now"][0], "tiny_ratio": ratio,
        "stages_now": best["now"][1].get("stages"), "real_documents": args.real_documents,
        "real_indexer_s": ours, "real_hand_rolled_s": hand, "real_ratio": ours / hand, "free_base": args.free_base, "free": free,
    })


if __name__ == "__main__":
    main()
