"""The explorer's web application (Starlette, served by uvicorn).

Routes:

- ``GET /``: the page (``static/index.html``; ``?graph=NAME`` opens a graph);
- ``GET /static/...``: its script and style, shipped in the package;
- ``GET /api/graphs``: ``{"graphs": [GraphEntry, ...]}``, the graphs under the served directory;
- ``GET /api/graphs/NAME``: the graph JSON file itself;
- ``PUT /api/graphs/NAME``: save an edited graph (supernodes, pinned ids, labels) over the existing
  file, after schema validation, atomically; ``application/json`` only, same origin only;
- ``GET /api/features/LAYER/FEATURE?scan=SET``: the feature card from the store (200 with
  ``"no_store": true`` and the build command when no store was built).

Safety (DESIGN.md, "server"): binds 127.0.0.1 unless told otherwise, and then answers only requests
addressed to a loopback host name (no DNS rebinding); every graph name is resolved inside the
served directory (:mod:`mechscope.server.files`); request bodies larger than
``ServeConfig.max_body_mb`` are refused with 413 before they are read whole; responses forbid
loading anything but the server's own files (Content-Security-Policy), so the page cannot reach the
network even by mistake.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from mechscope.errors import BadInputError, MechscopeError

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
except ImportError as e:  # the lean install: say which extra brings the web framework
    raise MechscopeError(f"the graph explorer needs the server extra ({e.name} is missing): "
                         "pip install 'mechscope[server]'") from e

from mechscope.server.cards import FeatureCards, NoStoreError
from mechscope.server.config import ServeConfig
from mechscope.server.files import GraphDirectory

__all__ = ["create_app", "run_server", "STATIC_DIR"]

STATIC_DIR = Path(__file__).parent / "static"
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                 b"base-uri 'none'; frame-ancestors 'none'; form-action 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]


class _BodyLimitAndHeaders:
    """ASGI middleware: refuse bodies over ``limit`` bytes with 413 (by Content-Length, or while
    reading a chunked body, before the application sees it) and add :data:`SECURITY_HEADERS`."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _too_large(self.limit)(scope, receive, send_with_headers)
        if scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send_with_headers)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await _too_large(self.limit)(scope, receive, send_with_headers)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send_with_headers)


def _too_large(limit: int) -> Response:
    return JSONResponse({"error": f"request body is larger than the limit of {limit} bytes "
                                  "(mechscope serve --max-body-mb)"}, status_code=413)


def _error(e: MechscopeError) -> JSONResponse:
    """403 for unsafe names, 404 for missing graphs, stores and features, 422 for other bad input
    (an invalid graph), 500 for a broken file on the server's side (a corrupt feature store)."""
    body = {"error": str(e)} | ({"no_store": True} if isinstance(e, NoStoreError) else {})
    return JSONResponse(body, status_code=getattr(e, "http_status", 422 if isinstance(e, BadInputError) else 500))


async def _file_snapshot(path: Path, chunk_bytes: int = 1 << 20) -> Response:
    """Stream the file as it is when opened: a save renames a new file over ``path`` meanwhile, but the
    open descriptor keeps reading the old one, so the reader gets one whole version (Starlette's
    ``FileResponse`` takes the length from one file and may send the bytes of another)."""
    handle = await run_in_threadpool(open, path, "rb")
    size = os.fstat(handle.fileno()).st_size

    async def chunks():
        try:
            while chunk := await run_in_threadpool(handle.read, chunk_bytes):
                yield chunk
        finally:
            handle.close()

    return StreamingResponse(chunks(), media_type="application/json",
                             headers={"content-length": str(size), "cache-control": "no-store"})


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON (browsers cannot read it back)")


def create_app(config: ServeConfig) -> Starlette:
    """The explorer application for ``config`` (see the module docstring for its routes).

    Raises:
        BadInputError: ``config.directory`` does not exist.
    """
    graphs = GraphDirectory(config.directory)
    cards = FeatureCards(config.store)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"cache-control": "no-cache"})

    async def list_graphs(request: Request) -> Response:
        entries = await run_in_threadpool(graphs.entries)
        return JSONResponse({"graphs": [dataclasses.asdict(e) for e in entries], "directory": graphs.root.name})

    async def read_graph(request: Request) -> Response:
        try:
            path = graphs.resolve(request.path_params["name"])
        except BadInputError as e:
            return _error(e)
        return await _file_snapshot(path)

    async def save_graph(request: Request) -> Response:
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host')}":
            return JSONResponse({"error": f"cross-origin save from {origin!r} refused"}, status_code=403)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return JSONResponse({"error": "save a graph with Content-Type: application/json"}, status_code=415)
        body = await request.body()
        try:
            data = json.loads(body, parse_constant=_no_constants)
        except (ValueError, RecursionError) as e:
            return JSONResponse({"error": f"request body is not JSON: {e or 'nested too deeply'}"}, status_code=400)
        try:
            path = await run_in_threadpool(graphs.save, request.path_params["name"], data)
        except BadInputError as e:
            return _error(e)
        return JSONResponse({"saved": request.path_params["name"], "bytes": os.path.getsize(path)})

    async def feature_card(request: Request) -> Response:
        scan = request.query_params.get("scan", "")
        layer, feature = request.path_params["layer"], request.path_params["feature"]
        try:
            card = await run_in_threadpool(cards.card, scan, layer, feature)
        except MechscopeError as e:
            return _error(e)
        return JSONResponse(card)

    routes = [
        Route("/", index),
        Route("/api/graphs", list_graphs),
        Route("/api/graphs/{name:path}", read_graph, methods=["GET"]),
        Route("/api/graphs/{name:path}", save_graph, methods=["PUT"]),
        Route("/api/features/{layer:int}/{feature:int}", feature_card),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    hosts = [*LOOPBACK_NAMES, config.host] if config.loopback else ["*"]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=hosts),  # outermost: before any body is read
                  Middleware(_BodyLimitAndHeaders, limit=config.max_body_bytes)]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.graphs, app.state.cards = graphs, cards
    return app


def run_server(app: Starlette, config: ServeConfig) -> None:
    """Serve ``app`` with uvicorn on ``config.host``:``config.port`` until interrupted."""
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
