"""A raw HTTP/1.1 client for hostile-input tests: requests go out byte for
byte over a socket, so nothing is normalised or refused by a client library
first, and answers are parsed just enough to check them."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import unquote


@dataclass
class Reply:
    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    raw: bytes = b""

    def json_error(self) -> str | None:
        try:
            doc = json.loads(self.body)
        except ValueError:
            return None
        error = doc.get("error") if isinstance(doc, dict) else None
        return error if isinstance(error, str) and error else None


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        line, _, body = body.partition(b"\r\n")
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            break
        out += body[:size]
        body = body[size + 2:]
    return bytes(out)


def parse_reply(raw: bytes, head_request: bool = False) -> Reply:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return Reply(None, raw=raw)
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    if head_request:
        body = b""
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return Reply(status, headers, body, raw)


def send_raw(url: str, request: bytes, *, timeout: float = 30.0, head_request: bool = False,
             chunks: list[bytes] = ()) -> Reply:
    """Send `request` (then `chunks`) as is; read the answer until the server closes."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        out = bytearray()
        pieces = [request[i:i + (1 << 16)] for i in range(0, len(request), 1 << 16)] + list(chunks)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for piece in pieces:
                if select.select([s], [], [], 0)[0]:
                    break  # it answered already (e.g. 413): stop sending
                s.sendall(piece)
        with contextlib.suppress(ConnectionResetError):
            while time.monotonic() < deadline:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    data = s.recv(1 << 16)
                except TimeoutError:
                    break
                if not data:
                    break
                out += data
    return parse_reply(bytes(out), head_request)


def build_request(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: icbd-test", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    if body or method in (b"POST", b"PUT", b"PATCH", b"DELETE"):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def decoded_path(path: str) -> str:
    """The path as the server routes it (percent-decoded, query cut off)."""
    return unquote(path.split("?", 1)[0])


def read_head(conn: socket.socket) -> bytes | None:
    """For test servers that misbehave on purpose: the next request's head
    off `conn` (up to its blank line, and whatever else came in the same
    reads); None once the client closed."""
    request = b""
    while b"\r\n\r\n" not in request:
        data = conn.recv(65536)
        if not data:
            return None
        request += data
    return request
