"""A slow upstream does not starve a site (cache/blockclient.py).

Real peers on loopback that trickle: each answers a block request with one
byte every 0.2 s, either in the body of the answer or in its head. A read
timeout bounds each wait for bytes, so such a peer never trips it. Before
the fix the BlockClient abandoned its worker thread at the deadline but the
thread went on reading, holding its limiter slot; with as many trickling
peers as slots, every later fetch waited for a slot and failed. Now the
request is cut off at the deadline, the thread ends and its slot is free
for the next fetch. As any user.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import trio
import urllib3
from rawhttp import read_head

from cache.blockclient import BlockClient, UpstreamTimeout
from icbdcore.clients import Credentials
from icbdcore.wire import content_digest

TOKEN = "test-token-123"
CONNECTIONS = 4
DRIP = 0.2  # seconds between two bytes of a trickling peer


class Peer:
    """A loopback HTTP peer in a thread. mode: "body" (a head promising 1 MiB,
    then a byte every DRIP), "head" (the head itself a byte every DRIP) or
    "good" (the block at once). Counts the connections still open."""

    def __init__(self, mode: str, block: bytes = b""):
        self.mode = mode
        self.block = block
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.open = 0
        self.served = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
                self.open += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                request = read_head(conn)
                if request is None:
                    return
                if self.mode == "good":
                    self.served += 1
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.block) + self.block)
                    continue
                if self.mode == "body":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n")
                    drip = b"x" * (1 << 20)
                else:
                    drip = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 60000 + b"\r\n\r\n"
                for i in range(len(drip)):
                    if self._stop.wait(DRIP):
                        return
                    conn.sendall(drip[i:i + 1])
        except OSError:
            return  # the client cut us off
        finally:
            conn.close()
            with self._lock:
                self.open -= 1


@pytest.fixture
def peers():
    made: list[Peer] = []

    def make(mode: str, block: bytes = b"") -> Peer:
        made.append(Peer(mode, block))
        return made[-1]

    yield make
    for peer in made:
        peer.close()


async def test_trickling_peers_do_not_hold_the_client_s_slots(peers):
    """Twice as many trickling peers as the client has connections, half
    trickling the body and half the head: each fetch gives up at its 1 s
    deadline, the client's slots are all free right after, its connections
    to them are closed, and a block from a good peer arrives in time."""
    block = bytes(range(256)) * 4096
    digest = content_digest(block)
    slow = [peers(mode) for mode in ("body", "head") * CONNECTIONS]
    good = peers("good", block)
    client = BlockClient(Credentials(TOKEN), connections=CONNECTIONS, connect_timeout=1.0, read_timeout=5.0)
    try:
        failures: list[str] = []
        started = time.monotonic()

        async def fetch_slow(peer: Peer) -> None:
            with pytest.raises(UpstreamTimeout) as caught:
                await client.fetch(peer.url, digest, timeout=1.0)
            failures.append(caught.value.why)

        async with trio.open_nursery() as nursery:
            for peer in slow:
                nursery.start_soon(fetch_slow, peer)
        slow_seconds = time.monotonic() - started
        # Each fetch gave up at its own deadline (queued ones waited for a slot within it).
        assert len(failures) == len(slow)
        assert slow_seconds < 1.0 * len(slow) / CONNECTIONS + 1.0, slow_seconds

        # The worker threads ended with their fetches: every slot is free again.
        with trio.move_on_after(1.0):
            while client._limiter.borrowed_tokens:
                await trio.sleep(0.01)
        busy = client._limiter.borrowed_tokens
        with trio.move_on_after(2.0):  # a peer notices a closed connection at its next bytes or two
            while sum(p.open for p in slow):
                await trio.sleep(0.05)
        still_open = sum(p.open for p in slow)

        print(f"\n{len(slow)} trickling peers gave up in {slow_seconds:.2f} s ({failures[0]}); "
              f"slots busy after: {busy}; their connections still open: {still_open}")
        assert busy == 0, f"{busy} of {CONNECTIONS} slots still held by threads reading trickling peers"
        assert still_open == 0

        with trio.fail_after(2.0):
            got = await client.fetch(good.url, digest, timeout=2.0)
        assert got == block and good.served == 1
    finally:
        client.close()


@pytest.mark.parametrize("when", ["while it reads", "before it starts"])
def test_a_cutoff_ends_a_blocked_request_from_another_thread(peers, when):
    """icbdcore.cutoff on its own: a worker thread reading a trickling peer
    (read timeout 30 s) is cut off from another thread and fails at once; a
    request made after the cut fails as soon as it has a socket."""
    from icbdcore.clients import pool
    from icbdcore.cutoff import Cutoff

    peer = peers("body")
    http = pool(Credentials(TOKEN), maxsize=1)
    cutoff = Cutoff()
    outcome: list[BaseException | bytes] = []

    def worker() -> None:
        with cutoff:
            try:
                response = http.request("GET", peer.url + "/", timeout=urllib3.Timeout(connect=5, read=30))
                outcome.append(response.data)
            except BaseException as error:
                outcome.append(error)

    if when == "before it starts":
        cutoff.cut()
    thread = threading.Thread(target=worker)
    started = time.monotonic()
    thread.start()
    if when == "while it reads":
        time.sleep(0.5)
        cutoff.cut()
    thread.join(5)
    seconds = time.monotonic() - started
    http.clear()
    assert not thread.is_alive()
    assert isinstance(outcome[0], urllib3.exceptions.HTTPError), outcome
    assert seconds < 1.5, seconds
