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

The routes are in :mod:`indexer.routes`; this module holds the app around them
(keys, limits, metrics, error handlers) and the process that runs it. Each
library error answers the ``http_status`` its class carries (indexer.errors):
a bad request 400 (422 for a malformed body, one with a key given twice, or a
boolean where a number belongs), an unknown document or index 404, a held
writer lock 409, a body over ``MAX_BODY_BYTES`` (counted as it streams,
chunked or not) or a search answer over ``MAX_RESPONSE_BYTES`` 413, a damaged
index 503, a full disk 507, anything
else 500; every one of them is logged and counted in ``/metrics``. When the
index on disk becomes unreadable the server keeps serving the version it has
loaded and ``/health`` answers 503. The API docs (``/docs``, ``/redoc``) load
their scripts from the fastapi-offline package, so they work with no network.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import layout
from .build import rebuild_index
from .errors import ArgumentError, IndexerError
from .routes import (
    MAX_DOCUMENTS,
    MAX_K,
    MAX_QUERIES,
    MAX_QUERY_CHARS,
    PAGE,
    SMALL_WRITE_WAIT,
    SearchRequest,
    Service,
    StrictJSONRoute,
    UpsertRequest,
    router,
)

if TYPE_CHECKING:
    from .sharded import ShardPool

# Names the routes module holds, importable from here as before.
__all__ = [
    "MAX_BODY_BYTES", "MAX_DOCUMENTS", "MAX_K", "MAX_QUERIES", "MAX_QUERY_CHARS", "MAX_RESPONSE_BYTES", "METHODS", "PAGE",
    "SMALL_WRITE_WAIT", "SearchRequest", "StrictJSONRoute", "UpsertRequest", "api_key_from_environment", "app_from_environment",
    "check_address", "create_app", "parse_duration", "rebuild_periodically", "serve",
]

MAX_BODY_BYTES = 16 * 2**20
# A search answer larger than this is refused (413) before it is serialised: 4 queries x 100 hits of 1 MB texts made 400 MB.
MAX_RESPONSE_BYTES = 16 * 2**20
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Methods counted under their own name in /metrics; any other is "other", so clients cannot mint series.
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})

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


async def guard_and_measure(request: Request, call_next) -> Response:
    """Middleware: the API key where the server is public, then the answer (500 for a bug) logged and counted."""
    started = time.perf_counter()
    served: Service = request.app.state.service
    # The page holds no data (it asks for the key when /search answers 401), so it is served to anyone.
    if served.public and not served.authorised(request) and request.url.path != "/":
        response = JSONResponse({"detail": "missing or wrong API key (Authorization: Bearer <key>)"}, status_code=401)
    else:
        try:
            response = await call_next(request)
        except Exception as exc:  # a bug: answer 500, and still log and count it
            logging.getLogger("indexer.server").exception("unhandled error")
            response = JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)
    seconds = time.perf_counter() - started
    route = request.scope.get("route")
    served.metrics.observe(getattr(route, "path", "unmatched"), request.method, response.status_code, seconds)
    access_log.info(json.dumps({"method": request.method, "path": request.url.path, "status": response.status_code,
                                "ms": round(seconds * 1000, 2), "client": request.client.host if request.client else None}))
    return response


async def user_error(request: Request, exc: IndexerError) -> Response:
    """A library error: the status its class carries (``http_status``, see indexer.errors)."""
    return JSONResponse({"detail": str(exc)}, status_code=exc.http_status)


async def malformed(request: Request, exc: RequestValidationError) -> Response:
    # FastAPI's own answer echoes the input, which may hold what JSON cannot (NaN) or UTF-8 cannot (a lone
    # surrogate, from a "\ud800" escape): it failed with a 500. Without it, in ASCII escapes, anything goes.
    errors = [{key: value for key, value in error.items() if key != "input"} for error in exc.errors()]
    return Response(json.dumps({"detail": jsonable_encoder(errors)}), status_code=422, media_type="application/json")


async def too_deep(request: Request, exc: RecursionError) -> Response:
    return JSONResponse({"detail": "request JSON is nested too deeply"}, status_code=400)


def create_app(index: str | Path, api_key: str | None = None, public: bool = False,
               max_response_bytes: int = MAX_RESPONSE_BYTES, shards: ShardPool | None = None) -> FastAPI:
    """The FastAPI application serving ``index``; ``public`` means bound beyond loopback; ``shards``: the pool whose
    shards hold the vectors (``indexer.sharded``)."""
    if public and not api_key:
        raise ArgumentError("refusing to listen beyond loopback without an API key (set INDEXER_API_KEY)")
    # Resolved once: every write gets this absolute Path, never the text the user typed.
    path = layout.index_path(index).resolve()
    app = FastAPIOffline(title="indexer", description="Semantic search over one index.", version="1")
    app.state.service = Service(path, api_key, public, max_response_bytes, Metrics(), shards)
    app.router.route_class = StrictJSONRoute
    app.include_router(router)
    app.add_middleware(BodyLimit)
    app.middleware("http")(guard_and_measure)
    app.add_exception_handler(IndexerError, user_error)
    app.add_exception_handler(RequestValidationError, malformed)
    app.add_exception_handler(RecursionError, too_deep)
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
    index: str | Path, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, rebuild_every: str | None = None,
    *, shards: int | None = None, replicas: int = 1, ray_address: str | None = None,
) -> None:
    """Run the service with uvicorn until interrupted (graceful shutdown on SIGTERM/SIGINT); with ``shards``, the
    vectors in that many shard deployments on Ray Serve of ``replicas`` each (``indexer.sharded``)."""
    import uvicorn

    check_address(host, port)
    public = host not in LOOPBACK
    api_key = api_key_from_environment()
    index = layout.index_path(index).resolve()  # resolved once, for the app, its workers and the rebuild thread alike
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if rebuild_every:
        stop = threading.Event()
        threading.Thread(target=rebuild_periodically, args=(index, parse_duration(rebuild_every), stop), daemon=True).start()
    if shards is not None:
        if workers > 1:
            raise ArgumentError("--workers serves the whole index from each process; with --engine ray use --replicas")
        if public and not api_key:
            raise ArgumentError("refusing to listen beyond loopback without an API key (set INDEXER_API_KEY)")
        from .sharded import ShardPool

        pool = ShardPool(index, shards=shards, replicas=replicas, address=ray_address)
        try:
            uvicorn.run(create_app(index, api_key, public, shards=pool), host=host, port=port, access_log=False)
        finally:
            pool.close()
    elif workers > 1:
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
