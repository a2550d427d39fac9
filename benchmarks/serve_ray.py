"""Sharded serving: `indexer serve` against `serve --engine ray --shards 1` and `--shards 2` on the same index.

Builds the first --documents Debian descriptions with the default model
(once, in a temporary folder, as two segments: a build of the first half,
an upsert of the rest), then for each way of serving: starts the
server, runs --clients threads that POST /search (dense, k=10, Debian
synopses) for --seconds, and reports searches/s, p50/p99 latency, the
resident memory of the server process and of each shard replica (Ray Serve's
`ServeReplica` processes), and, sharded, the seconds from an upsert's answer
(a new version published) to /health reporting that version (every shard
has opened it and the ingress switched).

    python benchmarks/serve_ray.py [--documents 5000] [--seconds 20] [--clients 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import call, cpu_flags, debian_corpus, debian_queries, machine, percentile, save, serve, write_jsonl

KEY = "serve-ray-key"
WAYS = {"serve": (), "ray, 1 shard": ("--engine", "ray", "--shards", "1"), "ray, 2 shards": ("--engine", "ray", "--shards", "2")}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def replicas() -> dict[int, float]:
    """RSS in MB of each Ray Serve shard replica process on this machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"ServeReplica" in (entry / "cmdline").read_bytes() and b"shard" in (entry / "cmdline").read_bytes():
                    found[int(entry.name)] = rss_mb(int(entry.name))
            except OSError:
                continue
    return found


def server_pid(port: str) -> int:
    out = subprocess.run(["pgrep", "-f", f"indexer serve .* --port {port}"], capture_output=True, text=True).stdout.split()
    return int(out[0])


def load(base: str, questions: list[str], seconds: float, clients: int) -> tuple[int, list[float]]:
    latencies: list[float] = []
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def client(offset: int) -> None:
        n = offset
        while time.monotonic() < stop:
            started = time.perf_counter()
            call(base, "/search", {"query": questions[n % len(questions)], "k": 10}, key=KEY)
            with lock:
                latencies.append(time.perf_counter() - started)
            n += clients

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(latencies), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args()
    print(f"{machine()}; CPU flags: {cpu_flags() or 'none listed'}", flush=True)
    corpus = debian_corpus(args.documents)
    questions = [q for q, _ in debian_queries({r["_id"] for r in corpus}, 500)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        records = [{"id": r["_id"], "text": r["text"]} for r in corpus]
        half = len(records) // 2
        index = Path(tmp) / "idx"
        # Two segments of half the documents each (a build, then an upsert), so that two shards hold one each.
        first, rest = write_jsonl(Path(tmp) / "first.jsonl", records[:half]), write_jsonl(Path(tmp) / "rest.jsonl", records[half:])
        for command in (["build", str(first), "--index", str(index)], ["upsert", str(index), str(rest)]):
            subprocess.run([sys.executable, "-m", "indexer", *command], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                           capture_output=True)
        for name, options in WAYS.items():
            with serve(index, KEY, 600, *options) as base:
                port = base.rsplit(":", 1)[1]
                load(base, questions, 3, args.clients)  # warm
                count, latencies = load(base, questions, args.seconds, args.clients)
                row = {"serving": name, "searches_per_s": round(count / args.seconds, 1),
                       "p50_ms": round(percentile(latencies, 50) * 1000, 1), "p99_ms": round(percentile(latencies, 99) * 1000, 1),
                       "server_rss_mb": round(rss_mb(server_pid(port))), "replica_rss_mb": sorted(round(v) for v in replicas().values())}
                if options:
                    before = call(base, "/health", method="GET", key=KEY)["version"]
                    written = call(base, "/documents", {"documents": [{"id": "new", "text": "a new document"}]}, key=KEY)
                    published = time.perf_counter()
                    while call(base, "/health", method="GET", key=KEY)["version"] in (before,):
                        time.sleep(0.01)
                    row["publish_to_switch_s"] = round(time.perf_counter() - published, 3)
                    row["version"] = written["version"]
                    call(base, "/documents/new", method="DELETE", key=KEY)
                rows.append(row)
                print(row, flush=True)
    print(f"\n{'serving':<14} {'searches/s':>10} {'p50 ms':>7} {'p99 ms':>7} {'server MB':>9}  replicas MB   publish->switch s")
    for row in rows:
        print(f"{row['serving']:<14} {row['searches_per_s']:>10} {row['p50_ms']:>7} {row['p99_ms']:>7} {row['server_rss_mb']:>9}  "
              f"{str(row['replica_rss_mb']):<13} {row.get('publish_to_switch_s', '')}")
    save("serve_ray", {"cpu_flags": cpu_flags(), "documents": args.documents, "rows": rows})


if __name__ == "__main__":
    main()
