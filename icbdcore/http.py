"""The HTTP side every node shares: a Starlette app served by hypercorn on
trio, JSON errors for every failure, the token check, and the answers for
immutable objects.

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
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .wire import API, DIGEST_HEADER, IMMUTABLE, InvalidInput, Refused, error_body

log = logging.getLogger(__name__)

MAX_JSON_BODY = 1 << 20
# Our own documents are a few levels deep; a deeper body is an attack on the
# parser or on whoever stores it and renders it later.
MAX_JSON_DEPTH = 64


class AsciiJSONResponse(JSONResponse):
    """JSON rendered as ASCII: any str, even one holding a lone surrogate (a
    file name decoded with surrogateescape), renders as a \\uXXXX escape
    instead of failing to encode and turning the answer into a 500."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def json_response(doc: object, status: int = 200, headers: dict | None = None) -> JSONResponse:
    return AsciiJSONResponse(doc, status_code=status, headers=headers)


async def json_body(request: Request, limit: int = MAX_JSON_BODY) -> dict:
    """The request's JSON object body, read with a size limit.

    Refused with 400: bytes that are not UTF-8 JSON, NaN and Infinity (not
    JSON, and a stored one would make every later answer that renders it
    fail), strings that are not Unicode (lone surrogates, same reason), and
    nesting beyond MAX_JSON_DEPTH.
    """
    chunks = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refused(413, f"request body over {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        # Nobody is left to answer; not an internal error worth a traceback.
        raise Refused(400, "the client went away before the end of its request body") from None
    raw = b"".join(chunks)
    if not raw:
        return {}
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except RecursionError:
        raise Refused(400, f"request body nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise Refused(400, "request body must be a JSON object")
    problem = _unfit(doc)
    if problem:
        raise Refused(400, f"request body {problem}")
    return doc


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _unfit(doc: object) -> str | None:
    """Why a parsed body cannot be taken (too deep, text that is not
    Unicode), or None. Iterative: the depth is what it checks."""
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"nested deeper than {MAX_JSON_DEPTH} levels"
        if isinstance(value, str):
            if not _is_unicode(value):
                return "holds a string that is not valid Unicode"
        elif isinstance(value, dict):
            for key, item in value.items():
                if not _is_unicode(key):
                    return "holds a key that is not valid Unicode"
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
    return None


def _is_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def immutable_response(data: bytes, digest: str, media_type: str) -> Response:
    """An object that never changes (a block, a manifest), named by its digest:
    any tier and any stock HTTP cache between tiers may keep it forever."""
    return Response(data, media_type=media_type,
                    headers={"Cache-Control": IMMUTABLE, "ETag": f'"{digest}"', DIGEST_HEADER: digest})


def _error(status: int, message: str) -> JSONResponse:
    return AsciiJSONResponse(error_body(message), status_code=status)


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
    # h11 refuses an incomplete request head over this size with a bare 431
    # before the app sees it. It checks between reads of up to 64 KiB, so the
    # largest head taken is about twice this (measured: 130 KB in, 140 KB out).
    config.h11_max_incomplete_size = 64 * 1024
    await hypercorn.trio.serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)


Handler = Callable[[Request], Awaitable[Response]]
