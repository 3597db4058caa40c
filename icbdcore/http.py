"""The HTTP side every node shares: a Starlette app served by hypercorn on
trio (over TLS when the node has a certificate), JSON errors for every
failure, credentials and roles, and the answers for immutable objects.

Every route under /v1/ needs a credential (`Authorization: Bearer T`) and
declares the role it needs where it is declared (`Endpoint`); `GET /`, the
node's status, and `GET /metrics` are open (and the master's `/ui`).

Every request is handled under a request id (X-Request-Id): the caller's
if it sent a well-formed one, else a new one; the answer carries it, every
line logged while handling it ends with rid=ID, and the calls the node makes
for it to other nodes pass it on. A bad request gets a 4xx with `{"error": ...}`,
never a 5xx; a 5xx means a bug or a failing disk, and is logged.

Connections are bounded: at most `max_connections` at once (beyond it a new
one gets a 503 and is closed), a request head must arrive within the
keep-alive time, no wait for a byte of a head or body lasts longer than
READ_TIMEOUT, and a JSON body must arrive whole within BODY_TIMEOUT. So a
flood of idle or slow connections costs a bounded number of descriptors,
and the node keeps the rest for its own files and requests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import resource
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import hypercorn.config
import trio
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .auth import READER, ROLES, Identity, allows
from .errors import CliError
from .logs import new_request_id, request_id, valid_request_id
from .wire import (
    API,
    AUTH_ROUTE,
    BLOCK_SIZES_HEADER,
    DIGEST_HEADER,
    IMMUTABLE,
    NO_STORE,
    REQUEST_ID_HEADER,
    InvalidInput,
    Refused,
    error_body,
)

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]

MAX_JSON_BODY = 1 << 20
# A JSON body (a profile may be 16 MiB) arrives whole within this, or 408.
BODY_TIMEOUT = 30.0
# An idle connection is closed after this; a new connection's request head
# must arrive whole within it too (hypercorn counts a connection idle until
# a whole head has arrived).
KEEP_ALIVE = 30.0
# No wait for a byte of a request head or body lasts longer (hypercorn's
# read_timeout; it is not applied while the answer is being sent).
READ_TIMEOUT = 30.0
# Connections served at once, at most; never more than half the descriptors
# the process may open (see connection_cap).
MAX_CONNECTIONS = 4096
# The descriptor limit a node asks for at start (its soft limit is raised
# towards the hard one): systemd's default soft limit, 1024, would cap a
# cache server at 512 connections, eight mounts' worth.
WANTED_DESCRIPTORS = 65536
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
        with trio.fail_after(BODY_TIMEOUT):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise Refused(413, f"request body over {limit} bytes")
                chunks.append(chunk)
    except ClientDisconnect:
        # Nobody is left to answer; not an internal error worth a traceback.
        raise Refused(400, "the client went away before the end of its request body") from None
    except trio.TooSlowError:
        raise Refused(408, f"the request body did not arrive within {BODY_TIMEOUT:g} s") from None
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


_RANGE = re.compile(r"bytes=([0-9]{0,18})-([0-9]{0,18})\Z")
UNSATISFIABLE = "unsatisfiable"


def byte_range(request: Request, size: int, etag: str) -> tuple[int, int] | str | None:
    """The part of an object of `size` bytes a request asks for, as
    (start, end) with `end` exclusive; None for the whole object (no Range,
    a form not understood, several ranges, or an If-Range naming another
    version), or UNSATISFIABLE. One range of RFC 9110: `bytes=A-B`,
    `bytes=A-`, `bytes=-N`."""
    header = request.headers.get("range")
    if not header:
        return None
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range.strip() != etag:
        return None
    match = _RANGE.match(header.strip().replace(" ", ""))
    if not match or not (match.group(1) or match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if not first:  # the last N bytes
        count = int(last)
        if count == 0:
            return UNSATISFIABLE
        return max(0, size - count), size
    start = int(first)
    end = size if not last else min(size, int(last) + 1)
    if last and int(last) < start:
        return None  # malformed: RFC 9110 says ignore it
    if start >= size:
        return UNSATISFIABLE
    return start, end


def not_modified(request: Request, etag: str) -> bool:
    """Whether an If-None-Match of the request names `etag` (or is `*`)."""
    header = request.headers.get("if-none-match")
    if not header:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in tags or etag in tags


def object_headers(digest: str, cache_control: str = IMMUTABLE) -> dict[str, str]:
    """The headers of an object named by `digest`: a strong ETag, ranges, and
    (by default) leave for any cache to keep it forever."""
    return {"Cache-Control": cache_control, "ETag": f'"{digest}"', DIGEST_HEADER: digest,
            "Accept-Ranges": "bytes"}


def immutable_response(data: bytes, digest: str, media_type: str, request: Request | None = None, *,
                       cache_control: str = IMMUTABLE, headers: dict | None = None) -> Response:
    """An object that never changes (a block, a manifest, a profile), named
    by its digest: any tier and any stock HTTP cache between tiers may keep
    it forever. The bytes never depend on who asks. With the request: 304
    for an If-None-Match naming it, 206 for a Range, 416 for one beyond it.
    `cache_control` is REVALIDATE for what a name maps to now (a version's
    manifest by number), which keeps the same ETag but must be asked again."""
    head = {**object_headers(digest, cache_control), **(headers or {})}
    if request is None:
        return Response(data, media_type=media_type, headers=head)
    etag = head["ETag"]
    if not_modified(request, etag):
        return Response(status_code=304, headers=head)
    part = byte_range(request, len(data), etag)
    if part == UNSATISFIABLE:
        return Response(status_code=416, media_type=media_type,
                        headers={**head, "Content-Range": f"bytes */{len(data)}"})
    if part is None:
        return Response(data, media_type=media_type, headers=head)
    start, end = part
    return Response(data[start:end], status_code=206, media_type=media_type,
                    headers={**head, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"})


def batch_response(blocks: list[bytes | None]) -> Response:
    """A batch of blocks (BLOCKS_ROUTE): each asked block's size in the order
    asked ("-" for one not delivered), the delivered ones one after the other.
    Streamed block by block: no copy of the whole batch."""
    sizes = ",".join("-" if b is None else str(len(b)) for b in blocks)
    delivered = [b for b in blocks if b is not None]

    async def body():
        for data in delivered:
            yield data

    return StreamingResponse(body(), media_type="application/octet-stream",
                             headers={BLOCK_SIZES_HEADER: sizes, "Content-Length": str(sum(map(len, delivered))),
                                      "Cache-Control": NO_STORE})


def _error(status: int, message: str) -> JSONResponse:
    return AsciiJSONResponse(error_body(message), status_code=status)


async def _on_http_exception(request: Request, exc: HTTPException) -> Response:
    messages = {404: "no such route", 405: "method not allowed on this route"}
    return _error(exc.status_code, messages.get(exc.status_code, str(exc.detail)))


async def _on_refused(request: Request, exc: Refused) -> Response:
    response = _error(exc.status, exc.message)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


async def _on_invalid_input(request: Request, exc: InvalidInput) -> Response:
    return _error(400, str(exc))


async def _on_crash(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return _error(500, f"internal error: {type(exc).__name__}")


OPEN = None  # the role of a route anyone may call: only outside /v1/
IDENTITY = "icbd.identity"  # the scope key under which the guard leaves the caller's Identity


class Guard:
    """ASGI middleware: who is calling, for every route under /v1/.

    No credential, or one the node's token table does not hold (unknown or
    revoked): 401, before any route is looked up. A node that has never had
    a table from its master (or refused the one sent: not signed by the key
    it trusts) cannot tell: 503, saying which. What the caller may do is the
    route's business (`Endpoint`): 403 there.
    """

    def __init__(self, app, tokens: TokenLookup):
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _guarded(scope["path"]):
            # The last Authorization header counts, as in every client library.
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            identity = None
            if scheme.lower() == b"bearer" and token:
                identity = self.tokens.identify(token.strip().decode("latin-1"))
            if identity is None:
                if not given:
                    status, message = 401, "no credential: give a token (--token-file, --token or ICBD_TOKEN)"
                elif not self.tokens.ready:
                    refused = getattr(self.tokens, "refused", None)
                    status, message = 503, (
                        f"this node holds no token table from its master: it refused the one sent ({refused})"
                        if refused else "this node has no token table from its master yet; retry shortly")
                else:
                    status, message = 401, "unknown or revoked token"
                response = _error(status, message)
                if status == 401:
                    response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
            scope[IDENTITY] = identity
        await self.app(scope, receive, send)


def _guarded(path: str) -> bool:
    return path == API or path.startswith(API + "/")


class TokenLookup(Protocol):
    ready: bool  # False: no table from the master yet (503 to any credential)
    refused: str | None  # why the last table offered was refused, if it was

    def identify(self, token: str) -> Identity | None: ...


class Endpoint(Route):
    """A route and the role it needs, declared together in each node's route
    table: `Endpoint("GET", IMIS_ROUTE, self.list_imis, READER)`. Every route
    under /v1/ needs one (build_app refuses a table that lacks one); only
    routes outside it (`GET /`) may be OPEN."""

    def __init__(self, methods: str | tuple[str, ...], path: str, handler: Handler, role: str | None):
        if _guarded(path) and role not in ROLES:
            raise ValueError(f"{path} is under {API}/ and needs a role, one of {', '.join(ROLES)}")
        if not _guarded(path) and role is not OPEN:
            raise ValueError(f"{path} is outside {API}/, where no credential is checked: declare it OPEN")
        methods = (methods,) if isinstance(methods, str) else methods
        super().__init__(path, _needs(role, handler) if role else handler, methods=list(methods))
        self.role = role


def _needs(role: str, handler: Handler) -> Handler:
    async def authorized(request: Request) -> Response:
        identity = request.scope.get(IDENTITY)
        if identity is None:  # no Guard in front: never serve a guarded route unguarded
            raise Refused(401, "no credential")
        if not identity.may(role):
            raise Refused(403, f"{request.method} {request.url.path} needs the {role} role; "
                          f"token {identity.name!r} has the {identity.role} role")
        return await handler(request)

    return authorized


async def whoami(request: Request) -> Response:
    """`GET /v1/auth[?role=ROLE]`: the role and name of the presented token,
    for a proxy's auth_request; 403 if it lacks `role`."""
    identity = request.scope[IDENTITY]
    wanted = request.query_params.get("role")
    if wanted is not None:
        if wanted not in ROLES:
            raise Refused(400, f"unknown role {wanted[:20]!r}: one of {', '.join(ROLES)}")
        if not allows(identity.role, wanted):
            raise Refused(403, f"token {identity.name!r} has the {identity.role} role, not {wanted}")
    return json_response({"role": identity.role, "name": identity.name})


def endpoints(routes: list[Endpoint]) -> list[Endpoint]:
    """A node's route table as served: its own routes and `GET /v1/auth`."""
    table = [*routes, Endpoint("GET", AUTH_ROUTE, whoami, READER)]
    for route in table:
        if not isinstance(route, Endpoint):
            raise TypeError(f"{route.path} is not declared with its role (use Endpoint)")
    return table


_RID_HEADER = REQUEST_ID_HEADER.lower().encode("latin-1")


class RequestIds:
    """ASGI middleware: the request id of each request (see the module's
    docstring), in icbdcore.logs's context while it is handled."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for name, value in scope["headers"]:
            if name == _RID_HEADER:
                given = valid_request_id(value.decode("latin-1"))
        rid = given or new_request_id()
        header = (_RID_HEADER, rid.encode("latin-1"))

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        with request_id(rid):
            await self.app(scope, receive, send_with_id)


class NoStoreByDefault:
    """ASGI middleware: an answer that does not say how it may be cached (a
    control call, an error, a status page) says `Cache-Control: no-store`,
    so no shared cache between tiers ever keeps it. Objects named by their
    digest say otherwise themselves (immutable_response)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_marked(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"cache-control" for name, _ in headers):
                    headers.append((b"cache-control", NO_STORE.encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_marked)


def build_app(routes: list[Endpoint], tokens: TokenLookup) -> RequestIds:
    app = Starlette(
        routes=endpoints(routes),
        exception_handlers={
            HTTPException: _on_http_exception,
            Refused: _on_refused,
            InvalidInput: _on_invalid_input,
            Exception: _on_crash,
        },
    )
    return RequestIds(NoStoreByDefault(Guard(app, tokens)))


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate chain and private key (PEM files): with them it
    serves https only."""

    cert: str
    key: str

    @classmethod
    def from_options(cls, cert: str | None, key: str | None) -> ServerTls | None:
        """From --tls-cert and --tls-key: both or neither; checked now, so a
        wrong file is a one-line error at start, not a failure per connection."""
        if not cert and not key:
            return None
        if not cert or not key:
            raise CliError("give both --tls-cert FILE and --tls-key FILE (or neither, for plain http)")
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except ssl.SSLError as error:  # an OSError too: first
            raise CliError(f"--tls-cert {cert} / --tls-key {key} are not a PEM certificate chain and "
                           f"its private key ({error.reason or error})") from None
        except OSError as error:
            raise CliError(f"cannot read the TLS certificate or key: {error.strerror or error}: "
                           f"{getattr(error, 'filename', None) or cert}") from None
        return cls(str(Path(cert).absolute()), str(Path(key).absolute()))


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen wants HOST:PORT, got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def url_for_listen(listen: str, tls: ServerTls | None = None) -> str:
    """The URL others reach a node at, when it is not given (--advertise)."""
    host, port = parse_listen(listen)
    if host in ("0.0.0.0", "::"):
        import socket

        host = socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"


async def serve(
    app,
    listen: str,
    shutdown: trio.Event,
    *,
    tls: ServerTls | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
    max_connections: int | None = None,
) -> None:
    """Serve `app` on `listen` until `shutdown` is set, with at most
    `max_connections` connections at once (default: connection_cap()):
    https only if `tls` is given (every connection is wrapped; a plain-http
    client fails the handshake)."""
    host, port = parse_listen(listen)
    config = hypercorn.config.Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = KEEP_ALIVE
    config.read_timeout = READ_TIMEOUT
    # h11 refuses an incomplete request head over this size with a bare 431
    # before the app sees it. It checks between reads of up to 64 KiB, so the
    # largest head taken is about twice this (measured: 130 KB in, 140 KB out).
    config.h11_max_incomplete_size = 64 * 1024
    if tls is not None:
        config.certfile, config.keyfile = tls.cert, tls.key
        # HTTP/1.1 only, as over plain http: the same parser, with the same bounds.
        config.alpn_protocols = ["http/1.1"]
    await _serve_bounded(app, config, shutdown, max_connections or connection_cap(), task_status)


def connection_cap() -> int:
    """How many connections a node serves at once: MAX_CONNECTIONS, or half
    its descriptor limit if that is lower. The soft limit is raised first
    (up to WANTED_DESCRIPTORS, within the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = WANTED_DESCRIPTORS if hard == resource.RLIM_INFINITY else min(WANTED_DESCRIPTORS, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as error:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, wanted, error)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft // 2))


class _Connection(TCPServer):
    """hypercorn's TCPServer, except that a connection whose client has gone
    (end of stream, or the read timeout) ends at once. hypercorn keeps it, and
    its descriptor, until its idle timer runs out (KEEP_ALIVE): a client that
    connects and closes at once would hold a place under the cap for free."""

    async def _read_data(self) -> None:
        await super()._read_data()
        await self.idle_task.stop()


class _Gate:
    """Counts the connections being served; admits one more only below the cap."""

    def __init__(self, cap: int):
        self.cap = cap
        self.open = 0
        self.refused = 0

    def enter(self) -> bool:
        if self.open >= self.cap:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("%d connections open, the most this node serves: refusing new ones "
                            "(%d refused so far)", self.open, self.refused)
            return False
        self.open += 1
        return True

    def leave(self) -> None:
        self.open -= 1


_REFUSAL_BODY = json.dumps(error_body("too many connections; retry in 1 s")).encode()
_REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            b"cache-control: no-store\r\nconnection: close\r\ncontent-length: %d\r\n\r\n" % len(_REFUSAL_BODY) + _REFUSAL_BODY)


async def _refuse(stream: trio.abc.Stream) -> None:
    """A 503 if it can go at once (plain http), then close."""
    if isinstance(stream, trio.SocketStream):
        with trio.move_on_after(1.0), contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(_REFUSAL)
    await trio.aclose_forcefully(stream)


async def _serve_bounded(app, config: hypercorn.config.Config, shutdown: trio.Event, cap: int,
                         task_status) -> None:
    """What hypercorn.trio.serve does for one process (hypercorn.trio.run.
    worker_serve, without lifespan events, which our apps do not use, and
    without QUIC), with every connection passing a _Gate first: hypercorn
    itself has no connection cap."""
    asgi = wrap_app(app, config.wsgi_max_body_size, "asgi")
    context = WorkerContext(None)
    gate = _Gate(cap)
    sockets = config.create_sockets()
    listeners: list[trio.abc.Listener] = []
    binds = []
    ssl_context = config.create_ssl_context()
    for sock in sockets.secure_sockets:
        sock.listen(config.backlog)
        listeners.append(trio.SSLListener(trio.SocketListener(trio.socket.from_stdlib_socket(sock)),
                                          ssl_context, https_compatible=True))
        binds.append(f"https://{repr_socket_addr(sock.family, sock.getsockname())}")
    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")

    async def handle(stream: trio.abc.Stream) -> None:
        if not gate.enter():
            await _refuse(stream)
            return
        try:
            await _Connection(asgi, config, context, ConnectionState({}), stream)
        finally:
            gate.leave()

    async with trio.open_nursery() as connections:
        log.debug("serving on %s, at most %d connections", ", ".join(binds), cap)
        task_status.started(binds)
        try:
            async with trio.open_nursery() as accepting:
                accepting.start_soon(partial(trio.serve_listeners, handle, listeners,
                                             handler_nursery=connections))
                await shutdown.wait()
                accepting.cancel_scope.cancel()
        finally:
            # As hypercorn: open connections finish their answers within the grace time.
            await context.terminated.set()
            connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout

