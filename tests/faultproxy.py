"""A TCP proxy that breaks things on request, for the fault tests.

`FaultProxy` sits between a replica and the master (the replica's --master
points at it). It forwards bytes as they come and, on request, holds a
connection at a chosen point of a stream answer, holds manifest requests,
patches bytes of the next stream answer, or answers a stream request itself
with a stream of its own making.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time

from icbdcore.wire import DIGEST_HEADER, content_digest

_REQUEST_LINE = re.compile(rb"(GET|POST|PUT|DELETE|HEAD) (\S+) HTTP/1\.1\r\n")


class _Conn:
    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()
        self.kind = "other"  # of the request in progress: stream | manifest | other
        self.sent = 0  # bytes of the current answer forwarded
        self.hold_at: int | None = None
        self.patches: dict[int, int] = {}  # body offset -> byte
        self.head = b""  # the current answer's head, until its end is seen
        self.body_start: int | None = None

    def close(self) -> None:
        self.closed.set()
        for s in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


class FaultProxy:
    """127.0.0.1:port -> upstream. Knobs (set between phases):

    - `hold_stream_at`: forward that many bytes of the next stream answer,
      then nothing more until `release` is set (or the connection dies);
    - `hold_manifests`: manifest requests wait for `release`;
    - `patch_sets`: a list of {body offset: byte}; each stream answer takes
      the next one (answers must have a Content-Length: complete spools);
    - `forged_streams`: a list of stream bodies; each request for a stream
      object is answered with the next one instead of the master's, as a man
      in the middle would: a 200 with the forged body's digest, the master
      never asked.
    """

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.hold_stream_at: int | None = None
        self.hold_manifests = False
        self.split_pause = 0.0  # > 0: a 416 answer's body follows its head after this pause
        self.patch_sets: list[dict[int, int]] = []
        self.forged_streams: list[bytes] = []
        self.forged_answers = 0
        self.release = threading.Event()
        self.stream_held = threading.Event()
        self.manifest_held = threading.Event()
        self.stream_requests = 0
        self.patched_answers = 0
        self._conns: list[_Conn] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arm(self, *, hold_stream_at: int | None = None, hold_manifests: bool = False) -> None:
        self.release.clear()
        self.stream_held.clear()
        self.manifest_held.clear()
        self.hold_stream_at = hold_stream_at
        self.hold_manifests = hold_manifests

    def disarm(self) -> None:
        self.hold_stream_at = None
        self.hold_manifests = False
        self.release.set()

    def cut(self) -> None:
        """Close every connection open now, as a failing link would (new ones still pass)."""
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.release.set()
        self.listener.close()
        with self._lock:
            for conn in self._conns:
                conn.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            conn = _Conn(client, upstream)
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._requests, args=(conn,), daemon=True).start()
            threading.Thread(target=self._answers, args=(conn,), daemon=True).start()

    def _wait_release(self, conn: _Conn) -> bool:
        while not self.release.wait(0.05):
            if conn.closed.is_set() or self._stop.is_set():
                return False
        return True

    def _requests(self, conn: _Conn) -> None:
        try:
            while data := conn.client.recv(1 << 16):
                match = _REQUEST_LINE.search(data)
                if match:
                    path = match.group(2).split(b"?")[0]
                    conn.kind = ("stream" if path.startswith(b"/v1/streams/") else
                                 "manifest" if path.startswith(b"/v1/manifests/") or path.endswith(b"/manifest")
                                 else "other")
                    conn.sent, conn.head, conn.body_start = 0, b"", None
                    conn.hold_at, conn.patches = None, {}
                    if conn.kind == "stream" and self.forged_streams:
                        self.stream_requests += 1
                        self._answer_forged(conn, self.forged_streams.pop(0))
                        return
                    if conn.kind == "stream":
                        self.stream_requests += 1
                        conn.hold_at = self.hold_stream_at
                        if self.patch_sets:
                            conn.patches = self.patch_sets.pop(0)
                    if conn.kind == "manifest" and self.hold_manifests:
                        self.manifest_held.set()
                        if not self._wait_release(conn):
                            return
                conn.upstream.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def _answer_forged(self, conn: _Conn, body: bytes) -> None:
        head = (
            "HTTP/1.1 200 OK\r\n"
            "content-type: application/octet-stream\r\n"
            f"content-length: {len(body)}\r\n"
            f"{DIGEST_HEADER}: {content_digest(body)}\r\n"
            "connection: close\r\n\r\n"
        )
        conn.client.sendall(head.encode() + body)
        self.forged_answers += 1

    def _answers(self, conn: _Conn) -> None:
        try:
            while data := conn.upstream.recv(1 << 16):
                if conn.kind == "stream" and conn.sent == 0 and self.split_pause and data.startswith(b"HTTP/1.1 416"):
                    # The network hands the head and the body over in two pieces.
                    end = data.find(b"\r\n\r\n") + 4
                    conn.client.sendall(data[:end])
                    time.sleep(self.split_pause)
                    conn.sent, data = end, data[end:]
                if conn.kind == "stream":
                    data = self._patch(conn, data)
                    if conn.hold_at is not None and conn.sent + len(data) >= conn.hold_at:
                        cut = max(0, conn.hold_at - conn.sent)
                        conn.client.sendall(data[:cut])
                        conn.sent += cut
                        data = data[cut:]
                        self.stream_held.set()
                        conn.hold_at = None
                        if not self._wait_release(conn):
                            return
                conn.client.sendall(data)
                conn.sent += len(data)
        except OSError:
            pass
        finally:
            conn.close()

    def _patch(self, conn: _Conn, data: bytes) -> bytes:
        if conn.body_start is None:
            conn.head += data
            end = conn.head.find(b"\r\n\r\n")
            if end >= 0:
                conn.body_start = end + 4
                if conn.patches and b"content-length" not in conn.head[:end].lower():
                    raise AssertionError("patches need an answer with a Content-Length (a complete spool)")
        if not conn.patches or conn.body_start is None:
            return data
        out = bytearray(data)
        for offset, byte in list(conn.patches.items()):
            i = conn.body_start + offset - conn.sent
            if 0 <= i < len(out):
                out[i] = byte
                del conn.patches[offset]
                if not conn.patches:
                    self.patched_answers += 1
        return bytes(out)
