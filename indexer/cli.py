"""The ``indexer`` command: each command is a thin shell over the library function of the same name.

User errors (:class:`indexer.errors.IndexerError`) become one line on stderr
and the exit code in ``EXIT_CODES``; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from .errors import ArgumentError, IndexCorruptError, IndexerError, IndexNotFoundError, ModelError, SourceError
from .settings import DEFAULT_MODEL, IndexSettings

EXIT_CODES: dict[type[IndexerError], int] = {
    ArgumentError: 2,
    SourceError: 3,
    ModelError: 4,
    IndexNotFoundError: 5,
    IndexCorruptError: 6,
}

app = typer.Typer(
    help="Build and search semantic indexes: BERT embeddings in FAISS beside SQLite.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOption = Annotated[str, typer.Option("--model", "-m", help="Hugging Face model name or local folder.")]
PoolingOption = Annotated[str, typer.Option(help="Pooling of token vectors: mean or cls.")]
MaxLengthOption = Annotated[
    Optional[int], typer.Option(help="Tokens per text (default: the model's own limit, at most 512).")
]
BatchSizeOption = Annotated[int, typer.Option(help="Texts per model batch.")]
IdFieldOption = Annotated[Optional[str], typer.Option(help="Field holding the document id (default: id, _id or *_id).")]
TextFieldOption = Annotated[
    Optional[list[str]],
    typer.Option("--text-field", help="Field(s) to embed, joined with a space; repeat for several (default: text, else title + description)."),
]
DeviceOption = Annotated[Optional[str], typer.Option(help="cpu, cuda, mps... (default: the best available).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn IndexerError into a one-line message and its exit code."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except IndexerError as exc:
            typer.echo(f"indexer: error: {exc}", err=True)
            code = next((c for cls, c in EXIT_CODES.items() if isinstance(exc, cls)), 1)
            raise typer.Exit(code) from None

    return run


def _settings(model: str, pooling: str, max_length: int | None, batch_size: int, id_field: str | None, text_field: list[str] | None) -> IndexSettings:
    return IndexSettings(
        model=model,
        pooling=pooling,
        max_length=max_length,
        batch_size=batch_size,
        id_field=id_field,
        text_fields=list(text_field or []),
    )


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False))


@app.command()
@user_errors
def build(
    source: Annotated[Path, typer.Argument(help="JSONL, CSV, TSV or JSON file (optionally .gz), or a folder of .txt files.")],
    index: Annotated[str, typer.Option("--index", "-i", help="Index folder; a bare name means indexes/NAME.")],
    model: ModelOption = DEFAULT_MODEL,
    pooling: PoolingOption = "mean",
    max_length: MaxLengthOption = None,
    batch_size: BatchSizeOption = 64,
    id_field: IdFieldOption = None,
    text_field: TextFieldOption = None,
    device: DeviceOption = None,
    keep: Annotated[int, typer.Option(help="Versions to keep on disk.")] = 3,
    as_json: JsonOption = False,
) -> None:
    """Embed every document of SOURCE and publish it as a new version of an index."""
    from .index import build_index

    settings = _settings(model, pooling, max_length, batch_size, id_field, text_field)
    report = build_index(source, index, settings, device=device, keep=keep, progress=sys.stderr.isatty())
    if as_json:
        _print_json(report.to_dict())
    else:
        typer.echo(f"built {report.index} {report.version}: {report.documents} documents in {report.seconds:.1f}s")


@app.command()
@user_errors
def query(
    index: Annotated[str, typer.Argument(help="Index folder or name.")],
    questions: Annotated[list[str], typer.Argument(help="One or more questions.")],
    k: Annotated[int, typer.Option("-k", "--top-k", help="Hits per question.")] = 10,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Refuse to run unless the index uses this model.")] = None,
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Return the top-k documents for each question (one JSON object per line with --json)."""
    from .index import Index

    searcher = Index(index, model=model, device=device)
    results = searcher.search_many(questions, k)
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


@app.command()
@user_errors
def info(
    index: Annotated[str, typer.Argument(help="Index folder or name.")],
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
        ("max length", settings["max_length"]),
        ("fields", f"id={settings['id_field']} text={'+'.join(settings['text_fields'])}"),
        ("source", settings["source"]),
        ("versions", ", ".join(data["versions"])),
    ]
    for name, value in lines:
        typer.echo(f"{name:<11}{value}")


@app.command()
@user_errors
def embed(
    source: Annotated[Path, typer.Argument(help="JSONL, CSV, TSV or JSON file, or a folder of .txt files.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="FILE.pt (torch.save of ids + tensor) or FILE.npy (+ FILE.npy.ids.json).")],
    model: ModelOption = DEFAULT_MODEL,
    pooling: PoolingOption = "mean",
    max_length: MaxLengthOption = None,
    batch_size: BatchSizeOption = 64,
    id_field: IdFieldOption = None,
    text_field: TextFieldOption = None,
    device: DeviceOption = None,
) -> None:
    """Write the embeddings of SOURCE to a file, without building an index."""
    from .index import embed_source

    settings = _settings(model, pooling, max_length, batch_size, id_field, text_field)
    count = embed_source(source, output, settings, device=device, progress=sys.stderr.isatty())
    typer.echo(f"wrote {count} embeddings to {output}")
