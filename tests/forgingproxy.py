"""An HTTP proxy that forges answers, for the trust tests: a node's upstream
(`--master`, or a mount's `--cache`) points at it, it passes every request on
to the real node, and hands back what a test chose instead for the routes it
names: a replayed older catalogue, a manifest, record or profile signed by
nobody or by another key, a block with other bytes.

    proxy = ForgingProxy(master.url)
    proxy.forge("GET", "/v1/imis", lambda answer: (200, old_catalogue_bytes))
    ...
    proxy.clear()

A forger gets the real answer (status, body) and returns (status, body), or
None to pass the real one. Paths match without their query. Bodies are read
whole: fine for test images.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

Forger = Callable[[tuple[int, bytes]], tuple[int, bytes] | None]
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}


class ForgingProxy:
    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self._forgers: list[tuple[str, re.Pattern, Forger]] = []
        self.forged = 0  # answers replaced so far
        self._lock = threading.Lock()
        self._session = requests.Session()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP | {"host"}}
                try:
                    answer = proxy._session.request(self.command, proxy.upstream + self.path, headers=headers,
                                                    data=body, timeout=60)
                    status, data, out = answer.status_code, answer.content, answer.headers
                except requests.RequestException:
                    status, data, out = 502, b'{"error": "upstream unreachable"}', {}
                forged = proxy._forge(self.command, self.path.split("?")[0], status, data)
                if forged is not None:
                    status, data = forged
                self.send_response(status)
                for name, value in out.items():
                    if name.lower() not in _HOP and not (forged and name.lower() in ("etag", "x-icbd-digest")):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def forge(self, method: str, path_pattern: str, forger: Forger) -> None:
        """Answers to `method` on paths matching `path_pattern` (a regular
        expression, anchored) go through `forger`."""
        with self._lock:
            self._forgers.append((method, re.compile(path_pattern + r"\Z"), forger))

    def clear(self) -> None:
        with self._lock:
            self._forgers.clear()

    def _forge(self, method: str, path: str, status: int, data: bytes) -> tuple[int, bytes] | None:
        with self._lock:
            forgers = [f for m, p, f in self._forgers if m == method and p.match(path)]
        for forger in forgers:
            out = forger((status, data))
            if out is not None:
                with self._lock:
                    self.forged += 1
                return out
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._session.close()
