"""Helpers shared by the tests: paths, running the CLI in a subprocess, writing sources, digests."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from indexer import layout

ROOT = Path(__file__).resolve().parent.parent
DATASET = ROOT / "dataset"


def run_cli(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m indexer ARGS`` in a real subprocess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "indexer", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"indexer {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tree_digest(path):
    """A digest of what an index serves: its pointer and every file of every version and segment.

    (The writer lock's note and the embedding cache may change on a failed write.)
    """
    digest = hashlib.sha256()
    files = [path / layout.POINTER, *(p for folder in (layout.VERSIONS, layout.SEGMENTS) for p in (path / folder).rglob("*") if p.is_file())]
    for file in sorted(files):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def fill(folder: Path, leave: int) -> None:
    """Fill the filesystem of ``folder`` until about ``leave`` bytes are free."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    (folder / "filler").write_bytes(b"\0" * max(free - leave, 0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(index: Path, **env: str):
    """``indexer serve INDEX`` in a real subprocess on a free loopback port, once /health answers: yields its base URL."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "indexer", "serve", str(index), "--port", str(port)],
                              env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the server did not start: {server.stdout.read() if server.poll() is not None else 'timeout'}")
                time.sleep(0.3)
        yield base
    finally:
        server.terminate()
        server.communicate(timeout=30)
