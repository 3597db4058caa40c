"""A stand-in for a master or a peer that answers whatever a test says, as
raw bytes: malformed JSON, wrong shapes, wrong statuses. A thread of its own
per connection (http.server), so it serves trio tests and blocking ones alike."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# (method, path) -> (status, body); the body is sent as application/json, as is.
Answer = Callable[[str, str], tuple[int, bytes]]


class FakePeer:
    def __init__(self, answer: Answer):
        self.answer = answer
        self.requests: list[tuple[str, str]] = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                peer.requests.append((self.command, self.path))
                status, body = peer.answer(self.command, self.path)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _any

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self, method: str, path: str) -> int:
        return sum(1 for r in self.requests if r == (method, path))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
