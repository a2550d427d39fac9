"""The ``indexer`` command: each command is a thin shell over the library function of the same name.

User errors (:class:`indexer.errors.IndexerError`) become one line on stderr
and the exit code its class carries (``exit_code``); anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import functools
import gc
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

try:
    from typer._click.exceptions import ClickException
except ImportError:  # typer before it carried its own copy of click
    from click.exceptions import ClickException

from . import collector, interrupts
from .errors import (
    ArgumentError,
    IndexCorruptError,
    IndexerError,
)
from .settings import (
    BACKENDS,
    DEFAULT_MODEL,
    ENGINES,
    FUSIONS,
    MAX_DOCUMENT_BYTES,
    MAX_LENGTH_CAP,
    MODES,
    POOLINGS,
    PRECISIONS,
    VECTOR_STORAGE,
    IndexSettings,
    WriteOptions,
)

# At exit the interpreter's last collections walk every object left (~0.7 s after loading a model); the process is
# ending, so they free nothing that matters. Registered first, this runs after every other exit handler.
atexit.register(gc.freeze)


class Commands(TyperGroup):
    """The ``indexer`` command group: a usage error is one line too, ``indexer: error: ...``, exit 2.

    Click and typer would print the usage and a boxed message; everything else
    (help, exit codes of the commands) is theirs.
    """

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # a bare ``indexer``: the help, as typer shows it
                if exc.format_message():
                    exc.show()
            else:
                typer.echo(f"indexer: error: {_usage_message(exc)}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("indexer: error: aborted", err=True)
            sys.exit(1)
        # Without standalone mode a command's typer.Exit comes back as its exit code.
        sys.exit(code if isinstance(code, int) else 0)


class Command(TyperCommand):
    """A command whose usage line names its arguments as the help does: ``SOURCE``, not typer's ``{SOURCE}``."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [re.sub(r"^\{(.+)\}(\.\.\.)?$", r"\1\2", piece) for piece in super().collect_usage_pieces(ctx)]


def _counted(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _usage_message(exc: ClickException) -> str:
    """Click's message on one line, in the style of our own: lower case, no full stop, where to get help."""
    message = " ".join(exc.format_message().replace("Value error, ", "").split()).rstrip(".")
    if message[1:2].islower():
        message = message[0].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return message
    argument = _argument_meant(ctx, exc.option_name) if type(exc).__name__ == "NoSuchOption" else None
    if argument:
        # ``upsert --index products`` after ``build --index products``: say where this command wants it.
        usage = " ".join(ctx.command.collect_usage_pieces(ctx))
        return f"no such option: {exc.option_name}; {argument} is an argument here: {ctx.command_path} {usage}"
    return f"{message} (see '{ctx.command_path} --help')"


def _argument_meant(ctx: Any, option: str) -> str | None:
    """The argument of ctx's command (as its usage line names it) that ``option`` stands for: by its own name
    (``--id``: ID) or in a sibling command (``--index``, ``-i``: INDEX); None if none."""
    siblings = ctx.parent.command.commands.values() if ctx.parent is not None else ()
    names = {param.name for command in siblings for param in command.params if option in param.opts} | {option.lstrip("-")}
    arguments = (param for param in ctx.command.params if param.param_type_name == "argument")
    return next((param.metavar or param.name.upper() for param in arguments
                 if names & {param.name, (param.metavar or "").lower()}), None)


def _choice(name: str, values: Sequence[str]) -> Any:
    """An Enum of ``values``: --help lists them and typer refuses any other before a command runs."""
    return enum.Enum(name, [(value, value) for value in values], type=str)


def _value(choice: Any) -> Any:
    return getattr(choice, "value", choice)


Pooling = _choice("Pooling", POOLINGS)
Precision = _choice("Precision", PRECISIONS)
Backend = _choice("Backend", BACKENDS)
Engine = _choice("Engine", ENGINES)
Mode = _choice("Mode", MODES)
Fusion = _choice("Fusion", FUSIONS)
Storage = _choice("Storage", VECTOR_STORAGE)
# evaluate compares modes side by side, hybrid with either fusion: hybrid-score is hybrid.
EvaluateMode = _choice("EvaluateMode", (*MODES, *(f"hybrid-{fusion}" for fusion in FUSIONS)))

app = typer.Typer(
    cls=Commands,
    help="Build and search semantic indexes: BERT embeddings in FAISS beside SQLite.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _show_version(shown: bool) -> None:
    if shown:
        from importlib.metadata import version

        typer.echo(f"indexer {version('indexer')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Show the version and exit.")] = False,
) -> None:
    """Build and search semantic indexes: BERT embeddings in FAISS beside SQLite."""


IndexArgument = Annotated[str, typer.Argument(metavar="INDEX", help="Index folder or name.")]
ModelOption = Annotated[str, typer.Option("--model", "-m", help="Hugging Face model name or local folder.")]
PoolingOption = Annotated[Pooling, typer.Option(help="Pooling of token vectors: mean or cls.")]
MaxLengthOption = Annotated[
    int | None,
    typer.Option(min=1, max=MAX_LENGTH_CAP, help=f"Tokens per text (default: the model's own limit, at most {MAX_LENGTH_CAP})."),
]
BatchSizeOption = Annotated[int | None, typer.Option(min=1, help="Most texts per model batch (default: no cap; batches are sized by tokens).")]
BatchTokensOption = Annotated[
    int | None, typer.Option(min=1, help="Most padded tokens per model batch (default: measured while encoding, from 1024 on CPU and 65536 on GPU).")
]
PrecisionOption = Annotated[Precision, typer.Option(help="fp32 (exact), bf16, fp16 (GPU) or int8 (CPU); see docs/benchmarks.md for quality cost.")]
BackendOption = Annotated[Backend, typer.Option(help="torch, or onnx (ONNX Runtime on the CPU, fp32 or int8; the onnx extra; the model is exported once).")]
IdFieldOption = Annotated[str | None, typer.Option(help="Field holding the document id (default: id, _id or *_id).")]
TextFieldOption = Annotated[
    list[str] | None,
    typer.Option("--text-field", help="Field(s) to embed, joined with a space; repeat for several (default: text, else title + description)."),
]
MaxDocumentBytesOption = Annotated[
    int, typer.Option(min=1, help="Refuse a document whose text is over this many UTF-8 bytes (recorded for later upserts).")
]
DeviceOption = Annotated[str | None, typer.Option(help="cpu, cuda, mps... (default: the best available).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
KeepOption = Annotated[int, typer.Option(min=1, help="Versions to keep on disk (the current one always stays).")]
WaitOption = Annotated[
    float, typer.Option(min=0, help="Seconds to wait for another writer to finish (default: fail at once, exit 7).")
]
IfChangedOption = Annotated[bool, typer.Option("--if-changed", help="Publish nothing if the documents are unchanged.")]
EngineOption = Annotated[Engine, typer.Option(help="Where texts are encoded: local (this process) or ray (a Ray cluster; the ray extra).")]
RayAddressOption = Annotated[
    str | None, typer.Option(help="Ray cluster to use with --engine ray (auto, ray://host:10001); default: start Ray here.")
]
ReplicasOption = Annotated[int | None, typer.Option(min=1, help="Encoder replicas on Ray (default: one per node, or per --gpus-per-replica GPUs).")]
GpusOption = Annotated[float, typer.Option(min=0, help="GPUs each Ray encoder replica takes (0: CPU replicas).")]
RayWorkDirOption = Annotated[
    str | None, typer.Option(help="Folder for the Parquet shards of a Ray build; on several nodes, storage all of them reach.")
]


# Commands that write an index (or run the ingest pipeline): Ctrl-C is taken between batches (see interrupts).
WRITING_COMMANDS = {"build", "rebuild", "upsert", "delete", "compact", "rollback", "embed", "import_"}


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn IndexerError into a one-line message and its exit code, and Ctrl-C during a write into exit 130."""
    writes = command.__name__ in WRITING_COMMANDS

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            # Objects made before the command, and by its loads, are left out of collection until it ends (see
            # collector): a one-question query spent 0.25 s in collections walking what importing torch made.
            with collector.frozen(), interrupts.deferred() if writes else contextlib.nullcontext():
                return command(*args, **kwargs)
        except IndexerError as exc:
            typer.echo(f"indexer: error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("indexer: interrupted; nothing published" if writes else "indexer: interrupted", err=True)
            raise typer.Exit(interrupts.EXIT_CODE) from None

    return run


def _settings(
    model: str,
    pooling: str,
    max_length: int | None,
    batch_size: int | None,
    batch_tokens: int | None,
    precision: str,
    id_field: str | None,
    text_field: list[str] | None,
    **more: Any,
) -> IndexSettings:
    return IndexSettings(
        model=model,
        pooling=_value(pooling),
        max_length=max_length,
        batch_size=batch_size,
        batch_tokens=batch_tokens,
        precision=_value(precision),
        id_field=id_field,
        text_fields=list(text_field or []),
        **more,
    )


def _write_options(device: str | None = None, keep: int = WriteOptions.keep, wait: float = WriteOptions.wait) -> WriteOptions:
    """The common write options as given, with a progress bar where stderr is a terminal."""
    return WriteOptions(device=device, keep=keep, wait=wait, progress=sys.stderr.isatty())


def _on_ray(engine: Any, ray_only: dict[str, Any]) -> bool:
    """Whether ``engine`` is ray; ArgumentError for an option of ``ray_only`` (name: value) given without it."""
    given = [name for name, value in ray_only.items() if value]
    if _value(engine) == "local" and given:
        raise ArgumentError(f"{given[0]} needs --engine ray")
    return _value(engine) == "ray"


def _ray_options(engine: Any, address: str | None, replicas: int | None, gpus: float, work_dir: str | None):
    if not _on_ray(engine, {"--ray-address": address, "--replicas": replicas, "--gpus-per-replica": gpus, "--ray-work-dir": work_dir}):
        return None
    from .ray_engine import RayOptions

    return RayOptions(address, replicas, gpus, work_dir)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False))


def _print_outcome(data: dict[str, Any], line: str, as_json: bool) -> None:
    """A command's result: ``data`` as JSON with --json, else the one ``line``."""
    if as_json:
        _print_json(data)
    else:
        typer.echo(line)


def _print_report(verb: str, report: Any, as_json: bool) -> None:
    for warning in report.warnings:
        typer.echo(f"indexer: warning: {warning}", err=True)
    if as_json:
        _print_json(report.to_dict())
    elif not report.published:
        typer.echo(f"{report.index}: unchanged, still {report.version} ({_counted(report.documents, 'document')}, {report.encoded} encoded)")
    else:
        typer.echo(
            f"{verb} {report.index} {report.version}: {_counted(report.documents, 'document')}, {report.encoded} encoded, "
            f"{report.reused} reused, {report.deleted} deleted"
            + (f", {report.kept_upserts} upserts kept" if report.kept_upserts else "")
            + f"; {_counted(report.segments, 'segment')}"
            + (f" ({report.merged} merged)" if report.merged else "")
            + f" in {report.seconds:.1f}s"
        )


@app.command(cls=Command)
@user_errors
def build(
    source: Annotated[
        Path, typer.Argument(metavar="SOURCE", help="JSONL, CSV, TSV or JSON file (optionally .gz), or a folder of text files (.txt, .md, .rst).")
    ],
    index: Annotated[str, typer.Option("--index", "-i", metavar="INDEX", help="Index folder; a bare name means indexes/NAME.")],
    model: ModelOption = DEFAULT_MODEL,
    pooling: PoolingOption = "mean",
    max_length: MaxLengthOption = None,
    batch_size: BatchSizeOption = None,
    batch_tokens: BatchTokensOption = None,
    precision: PrecisionOption = "fp32",
    backend: BackendOption = "torch",
    id_field: IdFieldOption = None,
    text_field: TextFieldOption = None,
    max_document_bytes: MaxDocumentBytesOption = MAX_DOCUMENT_BYTES,
    index_type: Annotated[
        str, typer.Option(help="flat (exact), hnsw, ivf, ivfpq, auto, or a FAISS factory string such as IVF1024,PQ32.")
    ] = "flat",
    memory: Annotated[str | None, typer.Option(help="Memory budget for --index-type auto, e.g. 2GB.")] = None,
    vectors: Annotated[Storage, typer.Option(
        help="Vectors in memory: float32 (whole), int8 or binary codes (4x, 32x less), whose best candidates are "
             "rescored with the whole vectors kept on disk.")] = IndexSettings.vectors,
    device: DeviceOption = None,
    keep: KeepOption = WriteOptions.keep,
    wait: WaitOption = WriteOptions.wait,
    if_changed: IfChangedOption = False,
    engine: EngineOption = "local",
    ray_address: RayAddressOption = None,
    replicas: ReplicasOption = None,
    gpus_per_replica: GpusOption = 0,
    ray_work_dir: RayWorkDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Embed every document of SOURCE and publish it as a new version of an index."""
    from .build import build_index
    from .vectors import parse_memory

    parse_memory(memory)  # a bad budget fails before the model loads
    settings = _settings(
        model, pooling, max_length, batch_size, batch_tokens, precision, id_field, text_field, backend=_value(backend),
        index_type=index_type, memory=memory, vectors=_value(vectors),
        max_document_bytes=max_document_bytes,
    )
    ray = _ray_options(engine, ray_address, replicas, gpus_per_replica, ray_work_dir)
    report = build_index(source, index, settings, options=_write_options(device, keep, wait), if_changed=if_changed, ray=ray)
    _print_report("built", report, as_json)


@app.command(cls=Command)
@user_errors
def rebuild(
    index: IndexArgument,
    source: Annotated[Path | None, typer.Option(help="Read this source instead of the one the index was built from.")] = None,
    device: DeviceOption = None,
    keep: KeepOption = WriteOptions.keep,
    wait: WaitOption = WriteOptions.wait,
    if_changed: IfChangedOption = False,
    prune_upserts: Annotated[
        bool, typer.Option("--prune-upserts", help="Drop the documents written by upsert; keep only the source's.")
    ] = False,
    engine: EngineOption = "local",
    ray_address: RayAddressOption = None,
    replicas: ReplicasOption = None,
    gpus_per_replica: GpusOption = 0,
    ray_work_dir: RayWorkDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Re-read the index's source with its own settings; encode only new or changed texts; keep upserted documents; publish."""
    from .build import rebuild_index

    ray = _ray_options(engine, ray_address, replicas, gpus_per_replica, ray_work_dir)
    report = rebuild_index(index, source, options=_write_options(device, keep, wait), if_changed=if_changed, ray=ray,
                           prune_upserts=prune_upserts)
    _print_report("rebuilt", report, as_json)


@app.command(cls=Command)
@user_errors
def upsert(
    index: IndexArgument,
    source: Annotated[Path, typer.Argument(metavar="SOURCE", help="Documents to add, or to replace where the id exists.")],
    id_field: IdFieldOption = None,
    text_field: TextFieldOption = None,
    device: DeviceOption = None,
    keep: KeepOption = WriteOptions.keep,
    wait: WaitOption = WriteOptions.wait,
    as_json: JsonOption = False,
) -> None:
    """Add or replace documents by id, publishing a new version (fields default to the index's)."""
    from .edit import upsert_documents

    report = upsert_documents(index, source, id_field=id_field, text_fields=text_field, options=_write_options(device, keep, wait))
    _print_report("upserted into", report, as_json)


@app.command(cls=Command)
@user_errors
def delete(
    index: IndexArgument,
    ids: Annotated[list[str], typer.Argument(metavar="ID", help="Ids of the documents to delete.")],
    missing_ok: Annotated[bool, typer.Option("--missing-ok", help="Skip ids that are not in the index.")] = False,
    keep: KeepOption = WriteOptions.keep,
    wait: WaitOption = WriteOptions.wait,
    as_json: JsonOption = False,
) -> None:
    """Delete documents by id, publishing a new version."""
    from .edit import delete_documents

    report = delete_documents(index, ids, missing_ok=missing_ok, options=_write_options(keep=keep, wait=wait))
    _print_report("deleted from", report, as_json)


@app.command(cls=Command)
@user_errors
def compact(
    index: IndexArgument,
    keep: KeepOption = WriteOptions.keep,
    wait: WaitOption = WriteOptions.wait,
    as_json: JsonOption = False,
) -> None:
    """Merge an index's segments into one without its deleted documents, publishing a new version (readers are never blocked)."""
    from .compact import compact_index

    report = compact_index(index, options=_write_options(keep=keep, wait=wait))
    _print_report("compacted", report, as_json)


@app.command(cls=Command)
@user_errors
def rollback(
    index: IndexArgument,
    to: Annotated[str | None, typer.Option("--to", help="Version to make current (default: the one before).")] = None,
    wait: WaitOption = WriteOptions.wait,
    as_json: JsonOption = False,
) -> None:
    """Make an earlier version of an index current again."""
    from .write import rollback_index

    result = rollback_index(index, to, options=_write_options(wait=wait))
    _print_outcome(result, f"{result['index']}: now serving {result['version']} (was {result['previous']})", as_json)


@app.command(cls=Command)
@user_errors
def check(
    index: IndexArgument,
    all_versions: Annotated[bool, typer.Option("--all", help="Check every version on disk, not only the current one.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Verify an index: checksums, FAISS count equals SQLite rows, every FAISS id has its row."""
    from .check import check_index

    result = check_index(index, all_versions)
    if as_json:
        _print_json(result)
    elif result["problems"]:
        for problem in result["problems"]:
            typer.echo(f"indexer: fault: {result['index']} {problem}", err=True)
    else:
        typer.echo(f"{result['index']}: ok ({', '.join(result['checked'])})")
    if result["problems"]:
        raise typer.Exit(IndexCorruptError.exit_code)


@app.command(cls=Command)
@user_errors
def query(
    index: IndexArgument,
    questions: Annotated[list[str], typer.Argument(metavar="QUESTION", help="One or more questions.")],
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="Hits per question.")] = 10,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Refuse to run unless the index uses this model.")] = None,
    mode: Annotated[Mode, typer.Option(help="dense (embeddings), keyword (BM25) or hybrid (both, fused).")] = "dense",
    fusion: Annotated[
        Fusion, typer.Option(help="How hybrid fuses: score (0.6 cosine + 0.4 BM25 as a share of the best, in [0, 1]) or rrf (reciprocal ranks).")
    ] = "score",
    where: Annotated[
        list[str] | None, typer.Option(help="Filter FIELD=VALUE (also !=, <, <=, >, >=, 'FIELD in A,B'); repeatable.")
    ] = None,
    nprobe: Annotated[int | None, typer.Option(min=1, help="IVF cells to visit (default: tuned at build).")] = None,
    ef_search: Annotated[int | None, typer.Option(min=1, help="HNSW search breadth (default: tuned at build).")] = None,
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Return the top-k documents for each question (one JSON object per line with --json)."""
    from .index import Index, check_filters
    from .query import check_queries, parse_condition

    check_queries(questions)  # before the model loads, as are the filters
    conditions = [parse_condition(w) for w in where or []]
    check_filters(index, conditions)
    searcher = Index(index, model=model, device=device)
    results = searcher.search_many(
        questions, k, _value(mode), conditions, nprobe=nprobe, ef_search=ef_search, fusion=_value(fusion)
    )
    if as_json:
        for question, hits in zip(questions, results):
            _print_json({"query": question, "hits": [h.to_dict() for h in hits]})
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for question, hits in zip(questions, results):
        table = Table(title=question, title_justify="left")
        for column in ("#", "score", "id", "text"):
            table.add_column(column, overflow="fold")
        for rank, hit in enumerate(hits, 1):
            text = hit.text if len(hit.text) <= 120 else hit.text[:117] + "..."
            table.add_row(str(rank), f"{hit.score:.3f}", hit.id, text)
        console.print(table)


@app.command(cls=Command)
@user_errors
def evaluate(
    index: IndexArgument,
    queries: Annotated[Path, typer.Option(help="Queries: JSONL/CSV with a relevant-id field, or BEIR queries.jsonl.")],
    qrels: Annotated[Path | None, typer.Option(help="BEIR qrels TSV (query-id, corpus-id, score).")] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Cutoff of recall, MRR and nDCG.")] = 10,
    mode: Annotated[
        list[EvaluateMode], typer.Option(help="dense, keyword, hybrid (score fusion) or hybrid-rrf; repeat to compare.")
    ] = ["dense"],  # noqa: B006 (typer reads this default and never changes it)
    relevant_field: Annotated[str | None, typer.Option(help="Field naming the relevant document (default: *_id).")] = None,
    per_query: Annotated[Path | None, typer.Option(help="Write each query's metrics and top hits here (JSONL).")] = None,
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Measure an index's retrieval quality: recall@1/k/100, MRR@k, nDCG@k."""
    from .evaluate import evaluate_index, read_judgements
    from .index import Index

    judgements = read_judgements(queries, qrels, relevant_field)
    searcher = Index(index, device=device)
    results = {}
    detail = []
    for name in map(_value, mode):
        search_mode, _, fusion = name.partition("-")
        results[name], rows = evaluate_index(searcher, judgements, k, search_mode, fusion=fusion or "score")
        detail.extend({"mode": name, **row} for row in rows)
    if per_query:
        per_query.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in detail))
    if as_json:
        _print_json({"index": str(searcher.path), "queries": len(judgements), "modes": results})
        return
    names = list(next(iter(results.values())))
    typer.echo(f"{len(judgements)} queries on {searcher.path}")
    typer.echo(f"{'mode':<9}" + "".join(f"{n:>12}" for n in names))
    for name, values in results.items():
        typer.echo(f"{name:<9}" + "".join(f"{values[n]:>12.4f}" for n in names))


@app.command(cls=Command)
@user_errors
def serve(
    index: IndexArgument,
    host: Annotated[str, typer.Option(help="Address to bind; beyond loopback an API key is required.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    rebuild_every: Annotated[str | None, typer.Option(help="Rebuild from the recorded source every 30m, 6h, ...")] = None,
    engine: Annotated[Engine, typer.Option(
        help="Where the vectors are searched: local (each worker holds them all) or ray (--shards deployments on Ray "
             "Serve; the ray extra).")] = "local",
    shards: Annotated[int | None, typer.Option(min=1, help="With --engine ray: shards, each holding a share of the segments "
                                                        "(default 1).")] = None,
    replicas: Annotated[int | None, typer.Option(min=1, help="With --engine ray: replicas of each shard (default 1).")] = None,
    ray_address: RayAddressOption = None,
) -> None:
    """Serve an index over HTTP (FastAPI; needs the server extra). API key from INDEXER_API_KEY."""
    try:
        from .server import serve as run_server
    except ImportError:
        raise ArgumentError("the server needs FastAPI and uvicorn: pip install 'indexer[server]'") from None
    sharded = _on_ray(engine, {"--shards": shards, "--replicas": replicas, "--ray-address": ray_address})
    if sharded and importlib.util.find_spec("ray") is None:
        raise ArgumentError("--engine ray needs Ray Serve: pip install 'indexer[ray]'")
    run_server(index, host, port, workers, rebuild_every, shards=(shards or 1) if sharded else None, replicas=replicas or 1,
               ray_address=ray_address)


@app.command(cls=Command)
@user_errors
def info(
    index: IndexArgument,
    as_json: JsonOption = False,
) -> None:
    """Show an index's manifest, counts and versions."""
    from .index import index_info

    data = index_info(index)
    if as_json:
        _print_json(data)
        return
    settings = data["settings"]
    lines = [
        ("index", data["index"]),
        ("version", f"{data['version']} (created {data['created_at']})"),
        ("documents", f"{data['rows']} rows, {data['vectors']} vectors of {data['dimension']} dimensions"),
        ("model", settings["model"]),
        ("pooling", settings["pooling"]),
        ("max length", f"{settings['max_length']} tokens, {settings['precision']}"),
        ("vectors", f"{data['vector_index']} {data['search_params'] or ''}".strip() + " (largest segment)"),
        ("segments", f"{len(data['segments'])}: " + ", ".join(f"{n} ({c})" for n, c in data["segment_sizes"].items())
         + f"; {data['deleted']} deleted"),
        ("fields", f"id={settings['id_field']} text={'+'.join(settings['text_fields'])}"),
        ("source", settings["source"]),
        ("versions", ", ".join(data["versions"])),
    ]
    for name, value in lines:
        typer.echo(f"{name:<11}{value}")


@app.command(cls=Command)
@user_errors
def embed(
    source: Annotated[Path, typer.Argument(metavar="SOURCE", help="JSONL, CSV, TSV or JSON file, or a folder of text files (.txt, .md, .rst).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="FILE.pt (torch.save of ids + tensor) or FILE.npy (+ FILE.npy.ids.json).")],
    model: ModelOption = DEFAULT_MODEL,
    pooling: PoolingOption = "mean",
    max_length: MaxLengthOption = None,
    batch_size: BatchSizeOption = None,
    batch_tokens: BatchTokensOption = None,
    precision: PrecisionOption = "fp32",
    backend: BackendOption = "torch",
    id_field: IdFieldOption = None,
    text_field: TextFieldOption = None,
    max_document_bytes: MaxDocumentBytesOption = MAX_DOCUMENT_BYTES,
    device: DeviceOption = None,
) -> None:
    """Write the embeddings of SOURCE to a file, without building an index."""
    from .ingest import embed_source

    settings = _settings(
        model, pooling, max_length, batch_size, batch_tokens, precision, id_field, text_field, backend=_value(backend),
        max_document_bytes=max_document_bytes
    )
    count = embed_source(source, output, settings, device=device, progress=sys.stderr.isatty())
    typer.echo(f"wrote {count} embeddings to {output}")


@app.command(cls=Command)
@user_errors
def export(
    index: IndexArgument,
    output: Annotated[Path, typer.Option("--output", "-o", help="Archive to write, FILE.tar.gz.")],
    version: Annotated[str | None, typer.Option("--version", help="Version to export (default: the current one).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Write one version of an index, with checksums, to a .tar.gz (readers and writers may keep running)."""
    from .archive import export_index

    result = export_index(index, output, version=version)
    _print_outcome(result, f"{result['index']}: exported {result['version']} ({_counted(result['documents'], 'document')}, "
                           f"{result['bytes']} bytes) to {result['archive']}", as_json)


@app.command("import", cls=Command)
@user_errors
def import_(
    archive: Annotated[Path, typer.Argument(metavar="ARCHIVE", help="A .tar.gz written by 'indexer export'.")],
    index: Annotated[str, typer.Option("--index", help="Index folder or name to publish it as.")],
    as_version: Annotated[bool, typer.Option("--as-version", help="Publish it as the new version of an existing index.")] = False,
    keep: KeepOption = WriteOptions.keep,
    wait: WaitOption = WriteOptions.wait,
    as_json: JsonOption = False,
) -> None:
    """Check every checksum of an exported archive, then publish it as a new index (or, --as-version, a new version)."""
    from .archive import import_index

    report = import_index(archive, index, as_version=as_version, options=_write_options(keep=keep, wait=wait))
    _print_outcome(report.to_dict(), f"{report.index}: imported {report.source_version} as {report.version} "
                                     f"({_counted(report.documents, 'document')})", as_json)
    for warning in report.warnings:
        typer.echo(f"indexer: warning: {warning}", err=True)
