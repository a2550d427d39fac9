"""The command line starts fast: commands that need no model import no torch, and bad arguments fail before any loading."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
from helpers import DATASET, run_cli

CORPUS = str(DATASET / "corpus.jsonl")
HEAVY = ("torch", "transformers", "ray")
COMMANDS = ["build", "rebuild", "upsert", "delete", "rollback", "check", "query", "evaluate", "serve", "info", "embed", "export", "import"]

pytestmark = pytest.mark.process  # every test here starts indexer in a process of its own


def run_traced(*args: str, cwd=None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime -m indexer ARGS``; the result (stderr without the import lines) and every module imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "indexer", *args],
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    modules, other = set(), []
    for line in result.stderr.splitlines():
        if line.startswith("import time:"):
            modules.add(line.rsplit("|", 1)[1].strip())
        else:
            other.append(line)
    assert "indexer.cli" in modules, result.stderr[-2000:]  # the trace was read
    result.stderr = "".join(line + "\n" for line in other)
    return result, modules


def heavy_imports(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def assert_usage_error(result, modules, message):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("indexer: error: ") and message in lines[0], result.stderr
    assert heavy_imports(modules) == []


@pytest.fixture(scope="module")
def index_with_two_versions(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("startup") / "idx"
    for _ in range(2):
        run_cli("build", CORPUS, "--index", str(path), "--model", str(tiny_model))
    return path


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_imports_no_model_library(command):
    result, modules = run_traced(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    assert heavy_imports(modules) == []


def test_commands_without_a_model_import_no_model_library(index_with_two_versions):
    path = str(index_with_two_versions)
    outputs = {}
    archive = str(index_with_two_versions.parent / "backup.tar.gz")
    for args in (["info", path], ["check", path], ["rollback", path, "--to", "v000001"], ["delete", path, "P0001"],
                 ["export", path, "-o", archive], ["import", archive, "--index", path + "-restored"]):
        result, modules = run_traced(*args)
        assert result.returncode == 0, (args, result.stderr)
        assert heavy_imports(modules) == [], args
        outputs[args[0]] = result.stdout
    assert "v000002" in outputs["info"] and ": ok (v000002)" in outputs["check"]
    assert "now serving v000001" in outputs["rollback"]
    assert "deleted from" in outputs["delete"] and "98 documents" in outputs["delete"]
    assert "exported v000003 (98 documents" in outputs["export"] and "imported v000003 as v000003" in outputs["import"]


@pytest.mark.skipif(importlib.util.find_spec("pandas") is None, reason="pandas is not installed here")
def test_a_write_imports_sqlite_utils_without_pandas(tmp_path, tiny_model):
    result, modules = run_traced("build", CORPUS, "--index", str(tmp_path / "idx"), "--model", str(tiny_model))
    assert result.returncode == 0, result.stderr
    assert "sqlite_utils" in modules and not [m for m in modules if m.split(".")[0] == "pandas"]


def test_import_indexer_is_lazy():
    code = (
        "import sys, indexer\n"
        "assert not any(m.split('.')[0] in ('torch', 'transformers', 'ray') for m in sys.modules), 'eager'\n"
        "from indexer import Index, build_index, IndexSettings\n"
        "missing = [name for name in indexer.__all__ if not hasattr(indexer, name)]\n"
        "assert not missing, missing\n"
        "assert indexer.Index is Index\n"
        "assert 'torch' not in sys.modules, 'the library imports torch only to load the model'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    import indexer

    with pytest.raises(AttributeError):
        indexer.no_such_name  # noqa: B018


def test_k_below_one_fails_before_the_model_loads(index_with_two_versions):
    result, modules = run_traced("query", str(index_with_two_versions), "x", "-k", "0")
    assert_usage_error(result, modules, "'-k'")


@pytest.mark.parametrize(
    "args, message",
    [
        (["build", CORPUS], "missing option '--index'"),
        (["build"], "missing argument 'SOURCE'"),
        (["info"], "missing argument 'INDEX'"),
        (["build", CORPUS, "--index", "x", "--no-such-option"], "no such option: --no-such-option"),
        # Spelled as build spells it: where this command wants it.
        (["upsert", CORPUS, "--index", "x"], "no such option: --index; INDEX is an argument here: indexer upsert [OPTIONS] INDEX SOURCE"),
        (["delete", "-i", "x", "P1"], "no such option: -i; INDEX is an argument here: indexer delete [OPTIONS] INDEX ID..."),
        (["build", "--source", CORPUS], "no such option: --source; SOURCE is an argument here: indexer build [OPTIONS] SOURCE"),
        (["delete", "x", "--ids", "P1"], "no such option: --ids; ID is an argument here: indexer delete [OPTIONS] INDEX ID..."),
        (["query", "x", "--question", "q"], "no such option: --question; QUESTION is an argument here: indexer query [OPTIONS] INDEX QUESTION..."),
        (["no-such-command"], "no such command 'no-such-command'"),
        (["query", "x", "fine", " "], "empty question: give some words to search for"),
        (["query", "x", "q", "--mode", "magic"], "'magic' is not one of 'dense', 'keyword', 'hybrid'"),
        (["query", "x", "q", "--fusion", "sum"], "'sum' is not one of 'score', 'rrf'"),
        (["evaluate", "x", "--queries", "q.jsonl", "--mode", "hybrid-sum"], "'hybrid-sum' is not one of"),
        (["build", CORPUS, "--index", "x", "--pooling", "max"], "'max' is not one of 'mean', 'cls'"),
        (["build", CORPUS, "--index", "x", "--precision", "fp64"], "'fp64' is not one of 'fp32', 'bf16', 'fp16', 'int8'"),
        (["build", CORPUS, "--index", "x", "--engine", "spark"], "'spark' is not one of 'local', 'ray'"),
        (["build", CORPUS, "--index", "x", "--batch-size", "0"], "'--batch-size'"),
        (["build", CORPUS, "--index", "x", "--max-length", "513"], "'--max-length'"),
        (["build", CORPUS, "--index", "x", "--memory", "lots"], "memory budget 'lots'"),
        (["build", CORPUS, "--index", "x", "--replicas", "2"], "--replicas needs --engine ray"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(tmp_path, args, message):
    result, modules = run_traced(*args, cwd=tmp_path)
    assert_usage_error(result, modules, message)
    assert not (tmp_path / "x").exists() and not (tmp_path / "indexes").exists()


def test_version_is_the_installed_package_and_needs_no_model():
    from importlib.metadata import version

    result, modules = run_traced("--version")
    assert (result.returncode, result.stdout) == (0, f"indexer {version('indexer')}\n") and heavy_imports(modules) == []


def test_help_names_the_arguments():
    usage = " ".join(run_cli("build", "--help").stdout.split())
    assert "Usage: indexer build [OPTIONS] SOURCE " in usage and "{" not in usage and "INDEX" in usage
    assert "Usage: indexer query [OPTIONS] INDEX QUESTION..." in " ".join(run_cli("query", "--help").stdout.split())
    assert "INDEX" in run_cli("info", "--help").stdout
