"""Cutting off a blocking HTTP request that runs in a worker thread.

Bulk requests run in worker threads (urllib3), and trio cannot interrupt a
thread: abandoned at a deadline, it goes on until its own timeouts end it.
urllib3's read timeout bounds each wait for bytes, not the answer, so a
peer that sends one byte every few seconds keeps the thread, its connection
and its slot of the caller's CapacityLimiter for as long as it likes.

A `Cutoff` is entered by the worker thread around its requests; every
socket those requests use (pooled or new) is noted. `cut()`, from any
thread, shuts those sockets down: a call blocked on one returns at once
with an error, and the thread ends. A request started after the cut fails
as soon as it has a socket. The caller cuts at its deadline, or when it is
cancelled, so the thread (and its limiter slot) ends with the caller's wait.

A socket is forgotten when the request is done with it (`release()`,
before the connection goes back to its pool), so a late cut never breaks a
connection another request has taken from the pool since.

Pools built by icbdcore.clients.pool() use the connection classes below.
A TLS handshake in progress is not covered (its socket is not yet the
connection's): it is bounded by the connect timeout of each read.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_current = threading.local()


class Cutoff:
    """Lets another thread end the requests a worker thread makes inside `with cutoff:`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._cut = False
        self._closed = False

    @property
    def is_cut(self) -> bool:
        return self._cut

    def __enter__(self) -> Cutoff:
        _current.cutoff = self
        return self

    def __exit__(self, *exc) -> None:
        _current.cutoff = None
        self.close()

    def cut(self) -> None:
        """Shut down every socket in use now, and any a later request takes."""
        with self._lock:
            self._cut = True
            for sock in self._sockets:
                _shut(sock)

    def release(self) -> None:
        """The requests so far are done with their sockets: forget them."""
        with self._lock:
            self._sockets.clear()

    def close(self) -> None:
        """Nothing is cut off after this (the worker is done)."""
        with self._lock:
            self._closed = True
            self._sockets.clear()

    def _watch(self, sock: socket.socket) -> None:
        with self._lock:
            if self._closed:
                return
            if self._cut:
                _shut(sock)
            elif sock not in self._sockets:
                self._sockets.append(sock)


def _shut(sock: socket.socket) -> None:
    # shutdown(), not close(): the thread that uses the socket closes it; a
    # close from here could hand its descriptor number to another file.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _watch(sock: socket.socket | None) -> None:
    cutoff = getattr(_current, "cutoff", None)
    if cutoff is not None and sock is not None:
        cutoff._watch(sock)


class _Watched:
    """Connection mixin: every socket a request uses is noted by the thread's Cutoff."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        _watch(sock)
        return sock

    def request(self, *args, **kwargs) -> None:
        _watch(self.sock)  # type: ignore[attr-defined]
        return super().request(*args, **kwargs)  # type: ignore[misc]


class WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class WatchedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = WatchedHTTPConnection


class WatchedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = WatchedHTTPSConnection


POOL_CLASSES = {"http": WatchedHTTPConnectionPool, "https": WatchedHTTPSConnectionPool}
