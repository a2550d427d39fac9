"""Retrieval quality on the two real sets, dense vs keyword (BM25) vs hybrid, through the CLI.

course-faq: the FAQ records (question + answer text embedded; the one
repeated id keeps its first record) against the 4,627 generated questions.
debian-descriptions: all 60,456 descriptions against the first 2,000 BEIR
queries (synopsis -> description). Each set is built once into
benchmarks/results/ (rebuilds reuse the embedding cache), then
`indexer evaluate` runs dense, keyword (FTS5 BM25), hybrid (score fusion) and hybrid-rrf.

    python benchmarks/quality.py [--debian-queries 2000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

from common import DEBIAN, RESULTS, machine, save

FAQ = DEBIAN.parent / "course-faq"


def cli(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "indexer", *args], check=True, capture_output=True, text=True, env=env).stdout


def prepare_faq(folder: Path) -> tuple[Path, Path]:
    records, seen = [], set()
    for record in json.loads((FAQ / "documents-with-ids.json").read_text()):
        if record["id"] not in seen:
            seen.add(record["id"])
            records.append(record)
    source = folder / "faq.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    return source, FAQ / "ground-truth-data.csv"


def prepare_debian_queries(folder: Path, count: int) -> Path:
    path = folder / f"debian-queries-{count}.jsonl"
    with gzip.open(DEBIAN / "queries.jsonl.gz", "rt") as f, open(path, "w") as out:
        for number, line in enumerate(f):
            if number == count:
                break
            out.write(line)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debian-queries", type=int, default=2000)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    modes = ["--mode", "dense", "--mode", "keyword", "--mode", "hybrid", "--mode", "hybrid-rrf"]

    faq_source, faq_truth = prepare_faq(RESULTS)
    faq_index = str(RESULTS / "faq-index")
    cli("build", str(faq_source), "--index", faq_index, "--text-field", "question", "--text-field", "text")
    faq = json.loads(cli("evaluate", faq_index, "--queries", str(faq_truth), *modes, "--json"))

    debian_index = str(RESULTS / "debian-index")
    cli("build", str(DEBIAN / "corpus.jsonl.gz"), "--index", debian_index)
    queries = prepare_debian_queries(RESULTS, args.debian_queries)
    debian = json.loads(cli("evaluate", debian_index, "--queries", str(queries), "--qrels", str(DEBIAN / "qrels.tsv.gz"), *modes, "--json"))

    print(machine())
    for name, result in (("course-faq", faq), ("debian-descriptions", debian)):
        print(f"{name}: {result['queries']} queries")
        for mode, values in result["modes"].items():
            print(f"  {mode:<11}" + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
    save("quality", {"course-faq": faq, "debian-descriptions": debian})


if __name__ == "__main__":
    main()
