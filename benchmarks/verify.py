"""What proving an index's files costs: opening, writing and checking a 1M-document MiniLM-sized segment.

Builds one flat segment of N documents (the Debian descriptions, repeated
with a copy number) whose vectors are 384-d random unit vectors from an
external encoder (the model's cost is not what is measured), then times, each
in a fresh process and with the page cache warm (the usual case on a server),
then cold (dropped, where this runs as root):

* ``open, files unproven``: the snapshot alone (manifest, deletion set,
  segment description, key and length files checked; store and vectors loaded);
* ``open, verify=open``: ``Index(...)``, the store and vectors checked against
  their checksums before the first search (the library's and the CLI's default);
* ``open, verify=background``: ``Index(...)`` returning at once, and how long the
  check in its thread takes (the server's way);
* ``upsert of one document``: the first write of a process proves the version
  it starts from; a second write in the same process reads nothing again;
* ``indexer check``: every file against its checksum, and the keys.

    python benchmarks/verify.py [--documents 1000000]
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

from common import debian_documents, machine, save, write_jsonl

# Run in a child process: ``python verify.py --child STEP INDEX``; prints one JSON line.
CHILD = r"""
import json, sys, time
import numpy as np
step, path = sys.argv[1], sys.argv[2]
started = time.perf_counter()
from indexer.external import ExternalEncoder

def vectors(texts):
    rng = np.random.default_rng(len(texts))
    out = rng.standard_normal((len(texts), 384)).astype(np.float32)
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).tolist()

encoder = ExternalEncoder(vectors, lambda text: vectors([text])[0], name="random-384")
imported = time.perf_counter()
result = {}
if step == "snapshot":
    from indexer.snapshot import Snapshot
    Snapshot.open(__import__("pathlib").Path(path)).close()
elif step in ("open", "background"):
    from indexer import Index
    index = Index(path, encoder=encoder, verify=step)
    result["returned"] = time.perf_counter() - imported
    if step == "background":
        index._checking.join()
        result["verified"] = index.integrity()["verified"]
elif step == "upsert":
    from indexer import upsert_documents
    from indexer.sources import DocumentSource
    for n in range(2):
        t = time.perf_counter()
        upsert_documents(path, DocumentSource.from_records([{"id": f"new{n}", "text": f"a new document {n}"}]), encoder=encoder)
        result[f"write {n + 1}"] = time.perf_counter() - t
elif step == "check":
    from indexer import check_index
    assert check_index(path)["problems"] == []
result["seconds"] = time.perf_counter() - imported
print(json.dumps(result))
"""


def child(step: str, index: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, step, str(index)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=None, help="folder for the corpus and index (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="verify-bench-"))
    index = work / "idx"
    if not index.exists():
        source = write_jsonl(work / "corpus.jsonl", debian_documents(args.documents))
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", BUILD, str(source), str(index)], check=True)
        print(f"built {args.documents:,} documents in {time.perf_counter() - started:.0f} s")
    segment = next((index / "segments").iterdir())
    sizes = {p.name: p.stat().st_size for p in segment.iterdir() if p.is_file()}
    print(f"{machine()}; segment {segment.name}: " + ", ".join(f"{name} {size / 2**20:,.0f} MiB" for name, size in sorted(sizes.items())))
    results: dict[str, dict] = {}
    for cache in ("warm", "cold"):
        if cache == "cold" and not drop_caches():
            print("cold: cannot drop the page cache here (needs root); skipped")
            continue
        for step in ("snapshot", "open", "background", "upsert", "check"):
            if cache == "cold":
                drop_caches()
            else:
                child("snapshot", index)  # the files in the page cache
            results[f"{cache} {step}"] = child(step, index)
            print(f"{cache:>4} {step:<10} " + ", ".join(f"{k} {v:.2f} s" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in results[f'{cache} {step}'].items()))
    save("verify", {"documents": args.documents, "sizes": sizes, "results": results})


BUILD = r"""
import sys
import numpy as np
from indexer import build_index
from indexer.external import ExternalEncoder

def vectors(texts):
    rng = np.random.default_rng(len(texts))
    out = rng.standard_normal((len(texts), 384)).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)

encoder = ExternalEncoder(lambda texts: vectors(texts).tolist(), lambda text: vectors([text])[0].tolist(), name="random-384")
build_index(sys.argv[1], sys.argv[2], encoder=encoder)
"""

if __name__ == "__main__":
    main()
