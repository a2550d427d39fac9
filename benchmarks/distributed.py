"""Ray engine overhead: `indexer build --engine ray` against the embedded path on this machine.

Takes the first N Debian package descriptions and builds them twice per round,
alternating, each as a fresh CLI process (model load, and for Ray starting a
local Ray instance, included): `--engine local` and `--engine ray`. Prints
wall times, docs/s and their ratio, and checks that both indexes hold the
same vectors. Writes benchmarks/results/distributed.json.

    python benchmarks/distributed.py [--documents 2000] [--rounds 1] [--replicas N]
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

from common import debian_corpus, machine, save

ROOT = Path(__file__).resolve().parent.parent


def timed_build(source: Path, index: Path, engine: str, replicas: int | None) -> float:
    """``indexer build`` of this checkout in a fresh process: wall seconds."""
    command = [sys.executable, "-m", "indexer", "build", str(source), "--index", str(index), "--engine", engine, "--json"]
    if replicas and engine == "ray":
        command += ["--replicas", str(replicas)]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - started
    print(f"{engine}: {seconds:.1f} s", flush=True)
    return seconds


def same_vectors(first: Path, second: Path) -> float:
    """Largest absolute difference between the two indexes' vectors, matched by document id."""
    import numpy as np

    from indexer import Index

    def by_id(path: Path) -> dict[str, np.ndarray]:
        found = {}
        with Index(path) as index:
            for segment in index._served.segments:
                keys = segment.vectors.keys()
                rows = segment.store.fetch(keys)
                found.update({rows[int(k)]["id"]: segment.vectors.index.reconstruct(int(k)) for k in keys})
        return found

    a, b = by_id(first), by_id(second)
    assert a.keys() == b.keys()
    return max(float(np.abs(a[i] - b[i]).max()) for i in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=None)
    args = parser.parse_args()
    records = [{"id": r["_id"], "text": r["text"]} for r in debian_corpus(args.documents)]
    times: dict[str, list[float]] = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "corpus.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in records))
        for round_ in range(args.rounds):
            for engine in ("local", "ray"):
                times[engine].append(timed_build(source, tmp / f"{engine}-{round_}", engine, args.replicas))
        difference = same_vectors(tmp / "local-0", tmp / "ray-0")
    best = {engine: min(values) for engine, values in times.items()}
    print(f"{len(records)} Debian descriptions, {machine()}, best of {args.rounds}")
    print(f"{'engine':<8} {'build s':>8} {'docs/s':>8}")
    for engine, seconds in best.items():
        print(f"{engine:<8} {seconds:8.1f} {len(records) / seconds:8.1f}")
    ratio = best["ray"] / best["local"]
    print(f"ray build time / embedded build time: {ratio:.2f}x")
    print(f"max abs vector difference ray vs embedded: {difference:.2e}")
    save("distributed", {"documents": len(records), "rounds": args.rounds, "seconds": times, "best_s": best,
                 "ray_over_local": ratio, "max_abs_difference": difference})


if __name__ == "__main__":
    main()
