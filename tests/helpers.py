"""Helpers shared by the tests: paths, running the CLI (in this process or a subprocess), writing sources, digests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from indexer import layout

ROOT = Path(__file__).resolve().parent.parent
DATASET = ROOT / "dataset"


def run_cli(*args: str, cwd: Path | None = None, check: bool = True, process: bool = False):
    """``indexer ARGS``: in this process (typer's CliRunner) unless ``process``, then ``python -m indexer ARGS`` in a
    real subprocess (for tests whose subject is the process: start-up imports, signals, locks between processes).

    Either way the result has ``returncode``, ``stdout`` and ``stderr``.
    """
    if process:
        result = run_process(*args, cwd=cwd)
    else:
        result = _run_in_process(*args, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"indexer {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def run_process(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m indexer ARGS`` in a real subprocess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "indexer", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _run_in_process(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    from typer.testing import CliRunner

    from indexer.cli import app

    args = [str(a) for a in args]
    with contextlib.chdir(cwd or os.getcwd()):
        result = CliRunner().invoke(app, args, prog_name="indexer")
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # What the interpreter would have printed: an uncaught exception is exit 1 with its traceback.
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["indexer", *args], result.exit_code, result.stdout, stderr)


def indexer(*args):
    """``indexer ARGS`` in this process (typer's CliRunner): click's Result (exit_code, stdout, stderr, output), so a
    test may lower a limit with monkeypatch first."""
    from typer.testing import CliRunner

    from indexer.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], prog_name="indexer")


def one_line_error(result, code: int, *parts: str) -> str:
    """The one error line of a refused command (from ``run_cli`` or ``indexer``), after checking its exit code, that
    no traceback came and that it names ``parts``."""
    got = result.returncode if hasattr(result, "returncode") else result.exit_code
    assert got == code, (got, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("indexer: error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert all(part in lines[0] for part in parts), lines[0]
    return lines[0]


def records(n: int, start: int = 0, prefix: str = "doc") -> list[dict]:
    """``n`` small records ``{prefix}{i}`` from ``start``, with a number ``n`` in their metadata."""
    return [{"id": f"{prefix}{i}", "text": f"{prefix} number {i} about topic {i % 7}", "n": i} for i in range(start, start + n)]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def stored(path) -> dict[str, str]:
    """id -> text of every live document the current version of the index at ``path`` serves."""
    from indexer.snapshot import Snapshot

    snapshot = Snapshot.open(path, vectors=False)
    try:
        rows = snapshot.fetch(snapshot.live_keys())
        return {row["id"]: row["text"] for row in rows.values()}
    finally:
        snapshot.close()


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
                    raise AssertionError(f"the server did not start: {server.stdout.read() if server.poll() is not None else 'timeout'}") from None
                time.sleep(0.3)
        yield base
    finally:
        server.terminate()
        server.communicate(timeout=30)


@contextmanager
def headless_chromium(*flags: str, log_requests: bool = False):
    """A headless chromium driven by selenium, with ``flags`` added (skips the test where chromium, chromedriver or
    selenium is missing); ``log_requests`` keeps every request the page makes, failed ones too."""
    import pytest

    chromium, chromedriver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("no chromium and chromedriver here (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", *flags):
        options.add_argument(flag)
    if log_requests:
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()

