"""The HTTP service's routes (see :mod:`indexer.server` for the app around them: keys, limits, metrics, errors).

Every route reads what it serves from the :class:`Service` that
``create_app`` keeps in ``app.state.service``; a route raises the library's
errors (:mod:`indexer.errors`) and the app's handler answers each with the
``http_status`` its class carries.
"""

from __future__ import annotations

import hmac
import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from .build import rebuild_index
from .edit import delete_documents, upsert_documents
from .errors import DocumentNotFoundError, IndexerError
from .index import Index
from .query import MODES, Hit, parse_condition
from .settings import WriteOptions
from .sources import DocumentSource

MAX_K = 1000
MAX_QUERIES = 256
MAX_QUERY_CHARS = 2000
MAX_DOCUMENTS = 10_000
# How long an upsert or delete queues behind another write before answering 409 (a small write takes well under a second).
SMALL_WRITE_WAIT = 10.0
# The search page: one self-contained file (no external scripts, fonts or styles), its mode list filled in here.
PAGE = Path(__file__).with_name("page.html")


class SearchRequest(BaseModel):
    # Strict: true is not the integer 1, nor are "3" and 3.0 integers.
    model_config = ConfigDict(strict=True)

    query: str | None = Field(None, max_length=MAX_QUERY_CHARS)
    queries: list[str] | None = Field(None, max_length=MAX_QUERIES)
    k: int = Field(10, ge=1, le=MAX_K)
    mode: str = "dense"
    fusion: str = "score"
    where: list[str] = Field(default_factory=list, max_length=32)
    text_chars: int | None = Field(None, ge=0, description="Cut each hit's text to this many characters; hits then say `text_truncated`.")
    include_text: bool = Field(True, description="false: hits without their text.")


class UpsertRequest(BaseModel):
    """Documents in the source's own record shape, or as ``GET /documents/{id}`` returns them."""

    documents: list[dict[str, Any]] = Field(..., min_length=1, max_length=MAX_DOCUMENTS)


class DuplicateKey(ValueError):
    """A JSON object in a request body gives one key twice."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for ``json.loads``: a dict, or DuplicateKey (json.loads alone keeps the last value silently)."""
    found = dict(pairs)
    if len(found) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return found


class StrictJSONRequest(Request):
    """A request whose ``json()`` refuses a key given twice with a 422 naming it."""

    async def json(self) -> Any:
        try:
            return json.loads(await self.body(), object_pairs_hook=unique_keys)
        except DuplicateKey as exc:
            raise HTTPException(422, f"duplicate key {exc.args[0]!r} in the request body") from None


class StrictJSONRoute(APIRoute):
    """A route whose JSON body is read by ``StrictJSONRequest``: a key given twice, at any depth, is a 422."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict


class Service:
    """What the routes share: the index served from ``path`` (resolved), the API key, the metrics and the last fault."""

    def __init__(self, path: Path, api_key: str | None, public: bool, max_response_bytes: int, metrics: Any, shards: Any = None):
        self.path = path  # every write gets this absolute Path, never the text the user typed
        self.api_key = api_key
        self.public = public
        self.max_response_bytes = max_response_bytes
        self.metrics = metrics
        # Answers at once; /health says when the files are proven. With ``shards`` (a ShardPool) the vectors are there.
        self.searcher = Index(path, verify="background", shards=shards)
        self.fault: str | None = None
        self.page = PAGE.read_text(encoding="utf-8").replace("__MODES__", json.dumps(list(MODES)))

    def authorised(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        return bool(self.api_key) and hmac.compare_digest(header.encode(), f"Bearer {self.api_key}".encode())

    def current(self) -> Index:
        """The index, switched to a newer published version if there is one.

        If the version on disk cannot be read (``CURRENT`` broken, files
        missing), keep serving the loaded one and report the fault on /health.
        """
        try:
            self.searcher.refresh()
            self.fault = None
        except IndexerError as exc:
            self.fault = str(exc)
        return self.searcher


async def service(request: Request) -> Service:
    return request.app.state.service


Served = Annotated[Service, Depends(service)]


async def require_writer(request: Request) -> None:
    served: Service = request.app.state.service
    if not served.api_key:
        raise HTTPException(403, "writes are disabled: the server has no API key (set INDEXER_API_KEY)")
    if not served.authorised(request):
        raise HTTPException(401, "missing or wrong API key (Authorization: Bearer <key>)")


def hit_shown(hit: Hit, text_chars: int | None, include_text: bool) -> dict[str, Any]:
    """A hit as /search answers it: its text whole, cut to ``text_chars`` (with ``text_truncated``), or left out."""
    shown = hit.to_dict()
    if not include_text:
        del shown["text"]
    elif text_chars is not None:
        shown["text"] = hit.text[:text_chars]
        shown["text_truncated"] = len(hit.text) > text_chars
    return shown


def json_size(value: Any) -> int:
    """Bytes of ``value`` as compact UTF-8 JSON."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str).encode())


def answer_size(version: str, answers: list[dict[str, Any]]) -> int:
    """About how many bytes the /search answer holding ``answers`` is, without serialising it whole.

    Each document's text is measured once, however many queries it answers.
    """
    texts: dict[str, int] = {}
    size = json_size({"version": version, "results": [{**answer, "hits": []} for answer in answers]})
    for answer in answers:
        for hit in answer["hits"]:
            size += 1  # the comma
            if "text" not in hit:
                size += json_size(hit)
                continue
            if hit["id"] not in texts:
                texts[hit["id"]] = json_size(hit["text"])
            size += json_size({**hit, "text": ""}) - 2 + texts[hit["id"]]
    return size


router = APIRouter(route_class=StrictJSONRoute)
writer = [Depends(require_writer)]


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def search_page(served: Served) -> str:
    """The search page: a query box, mode, k and filters over POST /search, with the version and count from /health."""
    return served.page


@router.post("/search")
def search(body: SearchRequest, served: Served) -> dict[str, Any]:
    """Top-k hits for `query` (one answer) or `queries` (a list), with the `query --json` hit shape.

    An answer over the server's byte limit is a 413: ask for fewer hits, `text_chars` or `include_text: false`.
    """
    if (body.query is None) == (body.queries is None):
        raise HTTPException(422, "give exactly one of query or queries")
    if body.mode not in MODES:
        raise HTTPException(422, f"mode must be one of {', '.join(MODES)}")
    if body.queries and any(len(q) > MAX_QUERY_CHARS for q in body.queries):
        raise HTTPException(422, f"queries are limited to {MAX_QUERY_CHARS} characters")
    questions = [body.query] if body.query is not None else body.queries
    conditions = [parse_condition(w) for w in body.where]
    index = served.current()
    results = index.search_many(questions, body.k, body.mode, conditions, fusion=body.fusion)
    answers = [{"query": q, "hits": [hit_shown(h, body.text_chars, body.include_text) for h in hits]}
               for q, hits in zip(questions, results)]
    size = answer_size(index.version, answers)
    if size > served.max_response_bytes:
        raise HTTPException(413, f"the answer would be {size:,} bytes, over the server's limit of {served.max_response_bytes:,}: "
                                 "ask for fewer hits (k), shorter texts (text_chars) or none (include_text: false)")
    payload = answers[0] if body.query is not None else {"results": answers}
    return {"version": index.version, **payload}


@router.get("/documents/{doc_id:path}")
def get_document(doc_id: str, served: Served) -> dict[str, Any]:
    """One document by its id (ids may contain "/"): `{id, text, metadata, fields}`, a shape POST /documents accepts."""
    document = served.current().get_document(doc_id)
    if document is None:
        raise DocumentNotFoundError(f"no document with id {doc_id!r}")
    return document


@router.post("/documents", dependencies=writer)
def upsert(body: UpsertRequest, served: Served) -> dict[str, Any]:
    """Add or replace documents, each in the source's record shape or as `{id, text, metadata, fields}`; publishes a new version.

    Documents written here are kept by later rebuilds (see docs/operations.md, "Rebuilds and upserts").
    """
    index = served.current()
    settings = index.settings
    documents = DocumentSource.from_records(
        body.documents, name="documents", id_field=settings.id_field, text_fields=settings.text_fields,
        max_document_bytes=settings.max_document_bytes,
    )
    return upsert_documents(served.path, documents, encoder=index.encoder, options=WriteOptions(wait=SMALL_WRITE_WAIT)).to_dict()


@router.delete("/documents/{doc_id:path}", dependencies=writer)
def delete(doc_id: str, served: Served) -> dict[str, Any]:
    """Delete one document; publishes a new version."""
    try:
        return delete_documents(served.path, [doc_id], options=WriteOptions(wait=SMALL_WRITE_WAIT)).to_dict()
    except DocumentNotFoundError:  # the library's message names the server's folder and a CLI option
        raise DocumentNotFoundError(f"no document with id {doc_id!r}") from None


@router.post("/rebuild", dependencies=writer)
def rebuild(served: Served) -> dict[str, Any]:
    """Rebuild from the recorded source, encoding only what changed."""
    return rebuild_index(served.path, if_changed=True, encoder=served.current().encoder).to_dict()


@router.get("/info")
def info(served: Served) -> dict[str, Any]:
    """Version, counts, model and settings of the version being served."""
    return served.current().info()


@router.get("/health")
def health(served: Served) -> JSONResponse:
    """"ok" (200); "damaged" (503) when the served version's files failed their checksums (searches then answer 503);
    "degraded" (503) with the error while the index on disk is unreadable and the loaded version is served.
    ``verified`` is false while the check of the served version's files is still reading."""
    index = served.current()
    integrity = index.integrity()
    body = {"status": "ok", "version": index.version, "documents": len(index), "verified": integrity["verified"]}
    if integrity["fault"]:
        return JSONResponse({**body, "status": "damaged", "error": integrity["fault"]}, status_code=503)
    if served.fault:
        return JSONResponse({**body, "status": "degraded", "error": served.fault}, status_code=503)
    return JSONResponse(body)


@router.get("/metrics", response_class=PlainTextResponse)
def prometheus(served: Served) -> str:
    index = served.current()
    return served.metrics.render(index.version, len(index))
