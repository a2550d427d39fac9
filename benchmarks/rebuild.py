"""Incremental rebuild benchmark: what a scheduled rebuild costs when little has changed.

Takes the first N Debian package descriptions (../shared/data/debian-descriptions,
or --corpus), builds an index, then measures in one run, each as a fresh CLI
process the way cron would run it:
  full build; rebuild of an unchanged source; rebuild after 1% of texts changed;
  upsert of 10 documents; delete of 10 documents.
Prints a table and writes JSON to benchmarks/results/rebuild.json.

    python benchmarks/rebuild.py [--documents 5000] [--corpus PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DEBIAN, debian_corpus

HERE = Path(__file__).resolve().parent
DEFAULT_CORPUS = DEBIAN / "corpus.jsonl.gz"


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def cli(*args: str) -> tuple[dict, float]:
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "indexer", *args, "--json"],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    ).stdout
    return json.loads(out), time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=5000)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    args = parser.parse_args()
    records = [{"id": r["_id"], "text": r["text"]} for r in debian_corpus(args.documents, args.corpus.parent)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source, index = write(tmp / "corpus.jsonl", records), str(tmp / "index")

        def step(name: str, *command: str) -> None:
            report, wall = cli(*command)
            rows.append({"step": name, "wall_s": round(wall, 2), **{k: report.get(k) for k in ("encoded", "reused", "deleted", "documents")}})

        step("build (cold cache)", "build", str(source), "--index", index)
        step("rebuild, unchanged", "rebuild", index)
        changed = max(1, len(records) // 100)
        for record in records[:changed]:
            record["text"] += " (updated)"
        write(source, records)
        step(f"rebuild, {changed} texts changed", "rebuild", index)
        step("upsert 10 documents", "upsert", index, str(write(tmp / "up.jsonl", [{"id": f"new{i}", "text": f"new package {i}"} for i in range(10)])))
        step("delete 10 documents", "delete", index, *[r["id"] for r in records[-10:]])
    print(f"{len(records)} documents from {args.corpus.name}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print(f"{'step':<32}{'wall s':>8}{'encoded':>9}{'reused':>8}{'deleted':>9}{'docs':>7}")
    for row in rows:
        print(f"{row['step']:<32}{row['wall_s']:>8.2f}{row['encoded']:>9}{row['reused']:>8}{row['deleted']:>9}{row['documents']:>7}")
    full, unchanged = rows[0]["wall_s"], rows[1]["wall_s"]
    print(f"unchanged rebuild / full build: {unchanged / full:.3f}")
    out = HERE / "results" / "rebuild.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"documents": len(records), "cpus": os.cpu_count(), "steps": rows}, indent=2))


if __name__ == "__main__":
    main()
