"""The HTTP side every node shares: a Starlette app served by hypercorn on
trio, JSON errors for every failure, and the token check.

Every route under /v1 needs the token (`Authorization: Bearer T`); `GET /`,
the node's status, is open. A bad request gets a 4xx with `{"error": ...}`,
never a 5xx; a 5xx means a bug or a failing disk, and is logged.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable

import hypercorn.config
import hypercorn.trio
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .wire import API, InvalidInput, Refused, error_body

log = logging.getLogger(__name__)

MAX_JSON_BODY = 1 << 20


# Raised by a handler to answer with `status` and a JSON error.
HttpError = Refused


def json_response(doc: object, status: int = 200, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(doc, status_code=status, headers=headers)


async def json_body(request: Request, limit: int = MAX_JSON_BODY) -> dict:
    """The request's JSON object body, read with a size limit."""
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"request body over {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        return {}
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise HttpError(400, "request body must be a JSON object")
    return doc


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(message), status_code=status)


async def _on_http_exception(request: Request, exc: HTTPException) -> Response:
    messages = {404: "no such route", 405: "method not allowed on this route"}
    return _error(exc.status_code, messages.get(exc.status_code, str(exc.detail)))


async def _on_refused(request: Request, exc: Refused) -> Response:
    return _error(exc.status, exc.message)


async def _on_invalid_input(request: Request, exc: InvalidInput) -> Response:
    return _error(400, str(exc))


async def _on_crash(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return _error(500, f"internal error: {type(exc).__name__}")


class TokenGuard:
    """ASGI middleware: every /v1 route needs the shared token."""

    def __init__(self, app, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(API):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = _error(401, "missing or wrong token (--token / ICBD_TOKEN)")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(routes: list[Route], token: str) -> TokenGuard:
    app = Starlette(
        routes=routes,
        exception_handlers={
            HTTPException: _on_http_exception,
            Refused: _on_refused,
            InvalidInput: _on_invalid_input,
            Exception: _on_crash,
        },
    )
    return TokenGuard(app, token)


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen wants HOST:PORT, got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def url_for_listen(listen: str) -> str:
    host, port = parse_listen(listen)
    if host in ("0.0.0.0", "::"):
        import socket

        host = socket.getfqdn()
    return f"http://{host}:{port}"


async def serve(
    app,
    listen: str,
    shutdown: trio.Event,
    *,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on `listen` until `shutdown` is set."""
    host, port = parse_listen(listen)
    config = hypercorn.config.Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = 30.0
    # Headers beyond 64 KiB are refused by hypercorn itself with a 4xx.
    config.h11_max_incomplete_size = 64 * 1024
    await hypercorn.trio.serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)


Handler = Callable[[Request], Awaitable[Response]]
