"""The HTTP service: one index served to search backends over JSON (FastAPI).

Searches read whichever version is current when they start (each request
checks ``CURRENT``, so versions published by any process are picked up
without a restart); writes go through the library and its one-writer lock.
An upsert or delete writes one small segment or deletion set (nothing large
is rewritten), so one that finds another write in progress waits for it up
to ``SMALL_WRITE_WAIT`` seconds before answering 409; a rebuild answers 409 at once. Write endpoints need
``Authorization: Bearer <key>`` with the key from ``INDEXER_API_KEY`` (or the
file named by ``INDEXER_API_KEY_FILE``); with no key configured they answer
403. Bound beyond loopback, every endpoint needs the key and the server will
not start without one.

Errors map to status codes here and only here: a bad request 400 (422 for a
malformed body, one with a key given twice, or a boolean where a number
belongs), an unknown document or index 404, a held writer lock 409, a body over
``MAX_BODY_BYTES`` (counted as it streams, chunked or not) or a search answer
over ``MAX_RESPONSE_BYTES`` 413, a damaged index 503, a full disk 507, anything
else 500; every one of them is logged and counted in ``/metrics``. When the
index on disk becomes unreadable the server keeps serving the version it has
loaded and ``/health`` answers 503. The API docs (``/docs``, ``/redoc``) load
their scripts from the fastapi-offline package, so they work with no network.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import layout
from .build import rebuild_index
from .edit import delete_documents, upsert_documents
from .errors import ArgumentError, DiskFullError, IndexCorruptError, IndexerError, IndexLockedError, IndexNotFoundError
from .index import Index
from .query import MODES, Hit, parse_condition
from .sources import DocumentSource

MAX_K = 1000
MAX_QUERIES = 256
MAX_QUERY_CHARS = 2000
MAX_DOCUMENTS = 10_000
MAX_BODY_BYTES = 16 * 2**20
# A search answer larger than this is refused (413) before it is serialised: 4 queries x 100 hits of 1 MB texts made 400 MB.
MAX_RESPONSE_BYTES = 16 * 2**20
# How long an upsert or delete queues behind another write before answering 409 (a small write takes well under a second).
SMALL_WRITE_WAIT = 10.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Methods counted under their own name in /metrics; any other is "other", so clients cannot mint series.
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
# The search page: one self-contained file (no external scripts, fonts or styles), its mode list filled in here.
PAGE = Path(__file__).with_name("page.html")

access_log = logging.getLogger("indexer.access")


def api_key_from_environment() -> str | None:
    """The API key: ``INDEXER_API_KEY``, else the contents of the file ``INDEXER_API_KEY_FILE``."""
    if os.environ.get("INDEXER_API_KEY"):
        return os.environ["INDEXER_API_KEY"]
    key_file = os.environ.get("INDEXER_API_KEY_FILE")
    if key_file:
        try:
            return Path(key_file).read_text(encoding="utf-8-sig").strip() or None
        except OSError as exc:
            raise ArgumentError(f"{key_file}: cannot read the API key file ({exc.strerror})") from None
    return None


class SearchRequest(BaseModel):
    # Strict: true is not the integer 1, nor are "3" and 3.0 integers.
    model_config = ConfigDict(strict=True)

    query: Optional[str] = Field(None, max_length=MAX_QUERY_CHARS)
    queries: Optional[list[str]] = Field(None, max_length=MAX_QUERIES)
    k: int = Field(10, ge=1, le=MAX_K)
    mode: str = "dense"
    fusion: str = "score"
    where: list[str] = Field(default_factory=list, max_length=32)
    text_chars: Optional[int] = Field(None, ge=0, description="Cut each hit's text to this many characters; hits then say `text_truncated`.")
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


class BodyTooLarge(StarletteHTTPException):
    """The request body grew past the limit while it was being read (a 413 FastAPI passes through as is)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit} bytes", headers={"connection": "close"})


class BodyLimit:
    """ASGI middleware: answer 413 once a request body passes ``limit`` bytes, however it is sent.

    ``Content-Length`` is checked up front; a chunked body is counted as it
    streams, so it is never read whole into memory.
    """

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            response = JSONResponse({"detail": f"request body over {self.limit} bytes"}, status_code=413, headers={"connection": "close"})
            return await response(scope, receive, send)
        await self.app(scope, counted_receive, send)


class Metrics:
    """Request counts, a latency histogram and index gauges, as Prometheus text."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter = Counter()
        self.buckets: Counter = Counter()
        self.latency_sum = 0.0
        self.latency_count = 0

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(route, method if method in METHODS else "other", status)] += 1
            self.latency_sum += seconds
            self.latency_count += 1
            for bound in LATENCY_BUCKETS:
                if seconds <= bound:
                    self.buckets[bound] += 1

    def render(self, version: str, documents: int) -> str:
        lines = ["# TYPE indexer_requests_total counter"]
        with self.lock:
            for (route, method, status), count in sorted(self.requests.items()):
                lines.append(f'indexer_requests_total{{route="{route}",method="{method}",status="{status}"}} {count}')
            lines.append("# TYPE indexer_request_seconds histogram")
            for bound in LATENCY_BUCKETS:
                lines.append(f'indexer_request_seconds_bucket{{le="{bound}"}} {self.buckets[bound]}')
            lines.append(f'indexer_request_seconds_bucket{{le="+Inf"}} {self.latency_count}')
            lines.append(f"indexer_request_seconds_sum {self.latency_sum:.6f}")
            lines.append(f"indexer_request_seconds_count {self.latency_count}")
        lines += [
            "# TYPE indexer_index_version gauge",
            f"indexer_index_version {int(version[1:])}",
            "# TYPE indexer_documents gauge",
            f"indexer_documents {documents}",
        ]
        return "\n".join(lines) + "\n"


STATUS_CODES: dict[type[IndexerError], int] = {
    IndexNotFoundError: 404,
    IndexLockedError: 409,
    IndexCorruptError: 503,
    DiskFullError: 507,
}


def status_code(exc: IndexerError) -> int:
    """The HTTP status of a user-facing error: 400 unless ``STATUS_CODES`` says otherwise."""
    return next((code for cls, code in STATUS_CODES.items() if isinstance(exc, cls)), 400)


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


def create_app(index: str | Path, api_key: str | None = None, public: bool = False,
               max_response_bytes: int = MAX_RESPONSE_BYTES) -> FastAPI:
    """The FastAPI application serving ``index``; ``public`` means bound beyond loopback."""
    if public and not api_key:
        raise ArgumentError("refusing to listen beyond loopback without an API key (set INDEXER_API_KEY)")
    # Resolved once: every write below gets this absolute Path, never the text the user typed.
    path = layout.index_path(index).resolve()
    searcher = Index(path, verify="background")  # answers at once; /health says when the files are proven
    metrics = Metrics()
    fault: dict[str, str | None] = {"error": None}
    app = FastAPIOffline(title="indexer", description="Semantic search over one index.", version="1")
    app.router.route_class = StrictJSONRoute
    app.add_middleware(BodyLimit)
    page = PAGE.read_text(encoding="utf-8").replace("__MODES__", json.dumps(list(MODES)))

    def authorised(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        return bool(api_key) and hmac.compare_digest(header.encode(), f"Bearer {api_key}".encode())

    def require_writer(request: Request) -> None:
        if not api_key:
            raise HTTPException(403, "writes are disabled: the server has no API key (set INDEXER_API_KEY)")
        if not authorised(request):
            raise HTTPException(401, "missing or wrong API key (Authorization: Bearer <key>)")

    @app.middleware("http")
    async def guard_and_measure(request: Request, call_next):
        started = time.perf_counter()
        # The page holds no data (it asks for the key when /search answers 401), so it is served to anyone.
        if public and not authorised(request) and request.url.path != "/":
            response = JSONResponse({"detail": "missing or wrong API key (Authorization: Bearer <key>)"}, status_code=401)
        else:
            try:
                response = await call_next(request)
            except Exception as exc:  # a bug: answer 500, and still log and count it
                logging.getLogger("indexer.server").exception("unhandled error")
                response = JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)
        seconds = time.perf_counter() - started
        route = request.scope.get("route")
        metrics.observe(getattr(route, "path", "unmatched"), request.method, response.status_code, seconds)
        access_log.info(json.dumps({"method": request.method, "path": request.url.path, "status": response.status_code,
                                    "ms": round(seconds * 1000, 2), "client": request.client.host if request.client else None}))
        return response

    @app.exception_handler(IndexerError)
    async def user_error(request: Request, exc: IndexerError):
        return JSONResponse({"detail": str(exc)}, status_code=status_code(exc))

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError):
        # FastAPI's own answer echoes the input, which may hold what JSON cannot (NaN) or UTF-8 cannot (a lone
        # surrogate, from a "\ud800" escape): it failed with a 500. Without it, in ASCII escapes, anything goes.
        errors = [{key: value for key, value in error.items() if key != "input"} for error in exc.errors()]
        return Response(json.dumps({"detail": jsonable_encoder(errors)}), status_code=422, media_type="application/json")

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, exc: RecursionError):
        return JSONResponse({"detail": "request JSON is nested too deeply"}, status_code=400)

    def current() -> Index:
        """The index, switched to a newer published version if there is one.

        If the version on disk cannot be read (``CURRENT`` broken, files
        missing), keep serving the loaded one and report the fault on /health.
        """
        try:
            searcher.refresh()
            fault["error"] = None
        except IndexerError as exc:
            fault["error"] = str(exc)
        return searcher

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def search_page() -> str:
        """The search page: a query box, mode, k and filters over POST /search, with the version and count from /health."""
        return page

    @app.post("/search")
    def search(body: SearchRequest) -> dict[str, Any]:
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
        index = current()
        results = index.search_many(questions, body.k, body.mode, conditions, fusion=body.fusion)
        answers = [{"query": q, "hits": [hit_shown(h, body.text_chars, body.include_text) for h in hits]}
                   for q, hits in zip(questions, results)]
        size = answer_size(index.version, answers)
        if size > max_response_bytes:
            raise HTTPException(413, f"the answer would be {size:,} bytes, over the server's limit of {max_response_bytes:,}: "
                                     "ask for fewer hits (k), shorter texts (text_chars) or none (include_text: false)")
        payload = answers[0] if body.query is not None else {"results": answers}
        return {"version": index.version, **payload}

    @app.get("/documents/{doc_id:path}")
    def get_document(doc_id: str) -> dict[str, Any]:
        """One document by its id (ids may contain "/"): `{id, text, metadata, fields}`, a shape POST /documents accepts."""
        document = current().get_document(doc_id)
        if document is None:
            raise HTTPException(404, f"no document with id {doc_id!r}")
        return document

    @app.post("/documents", dependencies=[Depends(require_writer)])
    def upsert(body: UpsertRequest) -> dict[str, Any]:
        """Add or replace documents, each in the source's record shape or as `{id, text, metadata, fields}`; publishes a new version.

        Documents written here are kept by later rebuilds (see README, "Rebuilds and upserts").
        """
        index = current()
        settings = index.settings
        documents = DocumentSource.from_records(
            body.documents, name="documents", id_field=settings.id_field, text_fields=settings.text_fields,
            max_document_bytes=settings.max_document_bytes,
        )
        return upsert_documents(path, documents, encoder=index.encoder, wait=SMALL_WRITE_WAIT).to_dict()

    @app.delete("/documents/{doc_id:path}", dependencies=[Depends(require_writer)])
    def delete(doc_id: str) -> dict[str, Any]:
        """Delete one document; publishes a new version."""
        try:
            return delete_documents(path, [doc_id], wait=SMALL_WRITE_WAIT).to_dict()
        except ArgumentError:  # the library's message names the server's folder and a CLI option
            raise HTTPException(404, f"no document with id {doc_id!r}") from None

    @app.post("/rebuild", dependencies=[Depends(require_writer)])
    def rebuild() -> dict[str, Any]:
        """Rebuild from the recorded source, encoding only what changed."""
        return rebuild_index(path, if_changed=True, encoder=current().encoder).to_dict()

    @app.get("/info")
    def info() -> dict[str, Any]:
        """Version, counts, model and settings of the version being served."""
        return current().info()

    @app.get("/health")
    def health() -> JSONResponse:
        """"ok" (200); "damaged" (503) when the served version's files failed their checksums (searches then answer 503);
        "degraded" (503) with the error while the index on disk is unreadable and the loaded version is served.
        ``verified`` is false while the check of the served version's files is still reading."""
        index = current()
        integrity = index.integrity()
        body = {"status": "ok", "version": index.version, "documents": len(index), "verified": integrity["verified"]}
        if integrity["fault"]:
            return JSONResponse({**body, "status": "damaged", "error": integrity["fault"]}, status_code=503)
        if fault["error"]:
            return JSONResponse({**body, "status": "degraded", "error": fault["error"]}, status_code=503)
        return JSONResponse(body)

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> str:
        index = current()
        return metrics.render(index.version, len(index))

    return app


def parse_duration(text: str) -> float:
    """Seconds in ``"90s"``, ``"30m"``, ``"6h"``, ``"1d"``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        seconds = float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise ArgumentError(f"duration {text!r} is not like 90s, 30m, 6h or 1d")
    return seconds


def rebuild_periodically(index: str | Path, every: float, stop: threading.Event) -> None:
    """Rebuild from the recorded source every ``every`` seconds; log, never raise."""
    log = logging.getLogger("indexer.rebuild")
    while not stop.wait(every):
        try:
            report = rebuild_index(index, if_changed=True)
            log.info(json.dumps({"event": "scheduled rebuild", **report.to_dict()}))
        except Exception as exc:  # a failed rebuild must never stop the service
            log.error(json.dumps({"event": "scheduled rebuild failed", "error": str(exc)}))


def serve(
    index: str | Path, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, rebuild_every: str | None = None
) -> None:
    """Run the service with uvicorn until interrupted (graceful shutdown on SIGTERM/SIGINT)."""
    import uvicorn

    check_address(host, port)
    public = host not in LOOPBACK
    api_key = api_key_from_environment()
    index = layout.index_path(index).resolve()  # resolved once, for the app, its workers and the rebuild thread alike
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if rebuild_every:
        stop = threading.Event()
        threading.Thread(target=rebuild_periodically, args=(index, parse_duration(rebuild_every), stop), daemon=True).start()
    if workers > 1:
        os.environ["INDEXER_SERVE_INDEX"] = str(index)
        os.environ["INDEXER_SERVE_PUBLIC"] = "1" if public else ""
        if public and not api_key:
            raise ArgumentError("refusing to listen beyond loopback without an API key (set INDEXER_API_KEY)")
        uvicorn.run("indexer.server:app_from_environment", factory=True, host=host, port=port, workers=workers, access_log=False)
    else:
        uvicorn.run(create_app(index, api_key, public), host=host, port=port, access_log=False)


def check_address(host: str, port: int) -> None:
    """Refuse an address that cannot be listened on now: uvicorn would say so only once the index and model are loaded."""
    try:  # "" is every interface, as uvicorn takes it
        family, kind, protocol, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ArgumentError(f"{host}: not an address to listen on ({getattr(exc, 'strerror', None) or exc})") from None
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        if family == socket.AF_INET6:  # as asyncio binds "::": beside an IPv4 listener on the same port
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            shown = f"[{host}]" if ":" in host else host or "*"
            raise ArgumentError(f"{shown}:{port}: cannot listen ({exc.strerror or exc})") from None


def app_from_environment() -> FastAPI:
    """Factory for uvicorn worker processes (``serve --workers N``)."""
    return create_app(Path(os.environ["INDEXER_SERVE_INDEX"]), api_key_from_environment(), bool(os.environ.get("INDEXER_SERVE_PUBLIC")))
