"""The README and docs/ are tested: their examples run, and the references cover the CLI and the HTTP routes.

Every ```sh / ```bash / ```console / ```python block of README.md and docs/*.md runs, unless the line before it is
``<!-- not run: REASON -->`` (a marker without a reason fails). Each file's blocks run in order in one temporary
folder that looks like a clone after ``make demo``: a copy of dataset/, indexes/products built from it, and .venv
linked to this checkout's virtualenv (so ``. .venv/bin/activate`` works); .venv/bin is first on PATH, the hub is
offline and XDG_CACHE_HOME lies in the temporary folder. Later blocks of a file use what earlier ones made. Shell
blocks run with ``bash -euo pipefail``, Python blocks with the venv's python, from that folder. A failure names
the file, the block's first line and its output.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"sh", "bash", "shell", "console"}
PYTHON = {"python", "py"}
NOT_RUN = re.compile(r"^<!--\s*not run\b:?(.*?)-->\s*$")
FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")
BLOCK_TIMEOUT = 300


@dataclass
class Block:
    file: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None  # the reason given by a not-run marker

    def where(self) -> str:
        return f"{self.file.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path``, with the not-run marker on the line before it, if any."""
    lines = path.read_text(encoding="utf-8").split("\n")
    found, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, lang = match.group(1), match.group(2).lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence)), None)
        assert end is not None, f"{path.relative_to(REPO)}:{i + 1}: code block never closed"
        before = lines[i - 1].strip() if i > 0 else ""
        marker = NOT_RUN.match(before)
        skip = marker.group(1).strip() if marker else None
        if marker and not skip:
            pytest.fail(f"{path.relative_to(REPO)}:{i + 1}: '<!-- not run -->' needs a reason: <!-- not run: WHY -->")
        found.append(Block(path, i + 1, lang, "\n".join(lines[i + 1:end]) + "\n", skip))
        i = end + 1
    return found


def runnable(block: Block) -> bool:
    return block.skip is None and block.lang in SHELL | PYTHON


def shell_code(block: Block) -> str:
    if block.lang != "console":
        return block.code
    # A console block: the commands are the lines after a "$ " prompt; the rest is output.
    return "\n".join(line[2:] for line in block.code.split("\n") if line.startswith("$ ")) + "\n"


@pytest.fixture(scope="module")
def demo_clone(tmp_path_factory):
    """A folder as ``make demo`` leaves a clone: dataset/, .venv and indexes/products (built once per run)."""
    root = tmp_path_factory.mktemp("docs-demo")
    shutil.copytree(REPO / "dataset", root / "dataset")
    cache = tmp_path_factory.mktemp("docs-cache")
    result = subprocess.run([str(VENV / "bin" / "indexer"), "build", "dataset/corpus.jsonl", "--index", "products"],
                            cwd=root, env=_env(cache), capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    return root, cache


def _env(cache: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("INDEXER_", "VIRTUAL_ENV", "PYTHON")) and key != "XDG_CACHE_HOME"}
    env.update(PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", XDG_CACHE_HOME=str(cache), PYTHONDONTWRITEBYTECODE="1")
    return env


@pytest.mark.process
@pytest.mark.parametrize("path", DOCS, ids=[str(path.relative_to(REPO)) for path in DOCS])
def test_examples_run(path, demo_clone, tmp_path):
    demo, cache = demo_clone
    folder = tmp_path / "clone"
    shutil.copytree(demo, folder)
    (folder / ".venv").symlink_to(VENV)
    env = _env(cache)
    todo = [block for block in blocks(path) if runnable(block)]
    for number, block in enumerate(todo):
        if block.lang in PYTHON:
            script = tmp_path / f"block{number}.py"
            script.write_text(block.code)
            command = [str(VENV / "bin" / "python"), str(script)]
        else:
            command = ["bash", "-euo", "pipefail", "-c", shell_code(block)]
        returncode, output = _run(command, folder, env)
        if returncode is None:
            pytest.fail(f"{block.where()}: {block.lang} block ran over {BLOCK_TIMEOUT} s:\n{output}", pytrace=False)
        if returncode != 0:
            pytest.fail(f"{block.where()}: {block.lang} block failed (exit {returncode}):\n{output}", pytrace=False)


def _run(command: list[str], folder: Path, env: dict[str, str]) -> tuple[int | None, str]:
    """Run one block in its own process group; whatever it left running (a server in the background) is stopped.
    Returns its exit status (None if it ran over BLOCK_TIMEOUT) and the end of its output."""
    process = subprocess.Popen(command, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=BLOCK_TIMEOUT)
        returncode: int | None = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        returncode = None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return returncode, output[-4000:]


def test_not_run_markers_have_reasons():
    for path in DOCS:
        for block in blocks(path):
            if block.skip is not None:
                assert block.skip, block.where()


def test_readme_is_the_front_door():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move detail into docs/"


def test_cli_reference_is_generated_from_the_app():
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import cli_reference
    finally:
        sys.path.remove(str(REPO / "docs"))
    text = cli_reference.CLI_MD.read_text(encoding="utf-8")
    assert cli_reference.rewrite(text) == text, "docs/cli.md is out of date: run .venv/bin/python docs/cli_reference.py"


def test_cli_reference_names_every_command_and_option():
    import typer

    from indexer.cli import app

    text = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    group = typer.main.get_command(app)
    missing = [opt for param in group.params for opt in [*param.opts, *param.secondary_opts] if opt not in text]
    for name, command in group.commands.items():
        if f"## `indexer {name}`" not in text:
            missing.append(f"indexer {name}")
        for param in command.params:
            if param.param_type_name == "argument":
                names = [(param.metavar or param.name).upper()]
            else:
                names = [*param.opts, *param.secondary_opts]
            missing += [f"indexer {name} {opt}" for opt in names if not re.search(rf"`[^`]*{re.escape(opt)}\b", text)]
    assert not missing, f"docs/cli.md does not name: {missing}"


@pytest.mark.process
def test_http_doc_names_every_route(demo_clone):
    pytest.importorskip("fastapi")
    from indexer.server import create_app

    demo, _ = demo_clone
    app = create_app(demo / "indexes" / "products")
    text = (REPO / "docs" / "http.md").read_text(encoding="utf-8")
    documented = {re.sub(r"\{[^}]*\}", "{}", match) for match in re.findall(r"`((?:GET|POST|PUT|PATCH|DELETE) /[^`]*)`", text)}
    missing = []
    for route in app.routes:
        if not getattr(route, "include_in_schema", False):
            continue
        path = re.sub(r"\{[^}]*\}", "{}", route.path)
        missing += [f"{method} {route.path}" for method in sorted(route.methods - {"HEAD", "OPTIONS"})
                    if f"{method} {path}" not in documented]
    assert app.openapi()["paths"], "no routes in the OpenAPI schema"
    assert not missing, f"docs/http.md does not name: {missing}"


def test_paths_named_in_the_docs_exist():
    """A file the docs point to (a test, a benchmark script, a module) is still there: moving it means updating them."""
    pattern = re.compile(r"\b((?:tests|benchmarks|indexer|docs|dataset)/[\w./-]*\.(?:py|html|png|md|jsonl))\b")
    missing = sorted({f"{path.relative_to(REPO)}: {name}" for path in DOCS
                      for name in pattern.findall(path.read_text(encoding="utf-8")) if not (REPO / name).exists()})
    assert not missing, f"the docs name files that do not exist: {missing}"


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of ``path``: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    headings = re.findall(r"^#+\s+(.*)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_links_between_the_docs_resolve():
    broken = []
    for path in DOCS:
        for target, anchor in re.findall(r"\]\(([\w./-]*\.md)?(?:#([\w-]+))?\)", path.read_text(encoding="utf-8")):
            linked = (path.parent / target).resolve() if target else path
            if not linked.exists() or (anchor and anchor not in _anchors(linked)):
                broken.append(f"{path.relative_to(REPO)}: {target}#{anchor}")
    assert not broken, f"links that lead nowhere: {broken}"
