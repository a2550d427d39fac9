"""Build speed: the pipelined ingest against the code before it, and against sentence-transformers + FAISS.

One run, side by side, each build a fresh ``indexer build`` process:

1. A tiny random BERT (the model costs almost nothing, so what shows is
   everything around it) over --documents Debian descriptions (repeated with
   a copy number past the 60,456 there are): this checkout against the
   commit --before (checked out from git into a temporary worktree), rounds
   interleaved, best round each; docs/s and the ratio of times.
2. The real model (all-MiniLM-L6-v2) over the first --real-documents
   descriptions: ``indexer build`` against the hand-rolled
   sentence-transformers + FAISS flat script of ``peers.py``.
3. Stage by stage, from this checkout's ``--json`` report: seconds each stage
   was busy (read, tokenize, encode, write overlap; seal follows them).

    python benchmarks/ingest.py [--documents 100000] [--real-documents 5000] [--rounds 2] [--before REV]
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

from common import HERE, cpu_flags, debian_corpus, debian_documents, machine, save, tiny_model, write_jsonl

ROOT = HERE.parent
BEFORE = "c0603d623175e0f9b9bd564044237cc7cd244f9c"  # main before the pipelined ingest (issue 14)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--real-documents", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", default=BEFORE, help="git revision to compare with")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before = tmp / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(before), args.before], check=True)
        try:
            model = tiny_model(tmp / "tiny")
            source = write_jsonl(tmp / "corpus.jsonl", debian_documents(args.documents))
            tiny: dict[str, list[tuple[float, dict]]] = {"before": [], "now": []}
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
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)

    print(f"{machine()}; CPU flags: {cpu_flags() or 'none listed'}")
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
        "real_indexer_s": ours, "real_hand_rolled_s": hand, "real_ratio": ours / hand,
    })


if __name__ == "__main__":
    main()
