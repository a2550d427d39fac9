"""Load on the HTTP service while new versions are published: loopback only, bounded in time.

Builds the sample index in a temporary folder, starts `indexer serve` on a
free 127.0.0.1 port, then for --seconds runs --clients threads that POST
/search in a loop while one writer thread upserts documents and asks for
rebuilds through the API. Reports requests/s, p50/p99 latency, the versions
the searches saw and the error count (which must be 0).

    python benchmarks/load.py [--seconds 30] [--clients 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from common import HERE, machine, percentile, save, serve
from common import call as common_call

KEY = "load-test-key"


def call(base: str, path: str, payload: dict | None = None, method: str = "POST") -> dict:
    return common_call(base, path, payload, method, key=KEY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    queries = [json.loads(line)["query"] for line in (HERE.parent / "dataset" / "queries.jsonl").read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "products"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "INDEXER_API_KEY": KEY}
        subprocess.run([sys.executable, "-m", "indexer", "build", str(HERE.parent / "dataset" / "corpus.jsonl"), "--index", str(index)],
                       check=True, env=env, capture_output=True)
        with serve(index, KEY, start_timeout=120) as base:
            latencies: list[float] = []
            errors: list[str] = []
            versions: set[str] = set()
            writes = {"upserts": 0, "rebuilds": 0}
            stop = time.monotonic() + args.seconds
            lock = threading.Lock()

            def searcher(number: int) -> None:
                i = number
                while time.monotonic() < stop:
                    started = time.perf_counter()
                    try:
                        body = call(base, "/search", {"query": queries[i % len(queries)], "k": 5})
                        with lock:
                            latencies.append((time.perf_counter() - started) * 1000)
                            versions.add(body["version"])
                    except (OSError, urllib.error.HTTPError, ValueError) as exc:
                        with lock:
                            errors.append(repr(exc))
                    i += args.clients

            def writer() -> None:
                n = 0
                while time.monotonic() < stop:
                    try:
                        doc = {"product_id": f"L{n}", "title": f"Load item {n}", "description": "Added during the load test."}
                        call(base, "/documents", {"documents": [doc]})
                        writes["upserts"] += 1
                        if n % 3 == 2:
                            call(base, "/rebuild", {})
                            writes["rebuilds"] += 1
                    except (OSError, urllib.error.HTTPError, ValueError) as exc:
                        with lock:
                            errors.append("write " + repr(exc))
                    n += 1

            threads = [threading.Thread(target=searcher, args=(i,)) for i in range(args.clients)] + [threading.Thread(target=writer)]
            started = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.monotonic() - started
    result = {
        "seconds": round(elapsed, 1),
        "clients": args.clients,
        "searches": len(latencies),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50), 2) if latencies else None,
        "p99_ms": round(percentile(latencies, 99), 2) if latencies else None,
        "errors": len(errors),
        "versions_seen": len(versions),
        **writes,
    }
    print(machine())
    for name, value in result.items():
        print(f"{name:<16}{value}")
    if errors:
        print("first errors:", errors[:3])
    save("load", result)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
