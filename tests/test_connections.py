"""Connections to a node are bounded (icbdcore/http.py): a cap on how many
are served at once, a bound on how long a request head or body may take.
Without them a flood of idle or slow connections takes every descriptor
of the node, and a node out of descriptors cannot open its own files.

The server is a real `icbdcore.http.serve` in a process of its own (so its
descriptors can be counted apart from the test's), with a block route and
a JSON route and a cap of 8 connections. As any user.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import urllib3

from harness.cluster import free_port, wait_for

CAP = 8
TOKEN = "test-token-0123456789"
REPO = Path(__file__).resolve().parent.parent

_SERVER = textwrap.dedent("""
    import inspect, sys
    from functools import partial
    import trio
    from icbdcore import http
    from icbdcore.auth import READER, TokenTable, token_hash

    http.KEEP_ALIVE, http.READ_TIMEOUT, http.BODY_TIMEOUT = (float(t) for t in sys.argv[4:7])
    BLOCK = bytes(range(256)) * 4096

    async def block(request):
        return http.immutable_response(BLOCK, "0" * 32, "application/octet-stream")

    async def echo(request):
        return http.json_response(await http.json_body(request))

    async def main():
        tokens = TokenTable()  # the one token the test holds, a reader's
        tokens.install({"id": "test", "serial": 1,
                        "tokens": [{"name": "test", "role": READER, "hash": token_hash(sys.argv[2])}]})
        app = http.build_app([http.Endpoint("GET", "/v1/block", block, READER),
                              http.Endpoint("POST", "/v1/echo", echo, READER)], tokens)
        # (Code from before the cap has no max_connections: it serves without one.)
        cap = {"max_connections": int(sys.argv[3])} if "max_connections" in inspect.signature(http.serve).parameters else {}
        await http.serve(app, sys.argv[1], trio.Event(), **cap)

    trio.run(main)
""")


@pytest.fixture
def server(request):
    """(process, port) of a server with the keep-alive, read and body times
    the test asks for (default: the nodes' own, 30 s each)."""
    times = getattr(request, "param", (30, 30, 30))
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", _SERVER, f"127.0.0.1:{port}", TOKEN, str(CAP),
                                *map(str, times)],
                               env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE)

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(process.stderr.read().decode())
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    try:
        wait_for(up, timeout=20, what="the server")
        yield process, port
    finally:
        process.kill()
        process.wait(10)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _answer(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends on `sock` until it closes it or `timeout` passes."""
    sock.settimeout(timeout)
    got = b""
    try:
        while data := sock.recv(65536):
            got += data
    except (TimeoutError, ConnectionResetError):
        pass
    return got


def test_connections_beyond_the_cap_are_refused_while_block_reads_go_on(server):
    process, port = server
    http = urllib3.HTTPConnectionPool("127.0.0.1", port, maxsize=1, retries=False,
                                      headers={"Authorization": f"Bearer {TOKEN}"})
    assert http.request("GET", "/v1/block").status == 200  # a client's pooled connection, open before the flood
    before = _fds(process.pid)
    flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(5 * CAP)]  # idle: they send nothing
    try:
        time.sleep(0.5)
        during = _fds(process.pid)
        answers = [_answer(s, 0.2) for s in flood]
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        # The pooled connection still reads blocks, while the cap holds.
        reads = [http.request("GET", "/v1/block", timeout=5).status for _ in range(10)]
        fresh = socket.create_connection(("127.0.0.1", port))
        fresh.sendall(b"GET /v1/block HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
        at_cap = _answer(fresh, 2)
        fresh.close()
    finally:
        for s in flood:
            s.close()
    print(f"\n{len(flood)} idle connections against a cap of {CAP}: server descriptors {before} -> {during}, "
          f"{len(refused)} refused with 503; pooled reads {set(reads)}")
    assert during <= before + CAP, f"{during - before} more descriptors for {len(flood)} idle connections"
    assert len(refused) >= len(flood) - CAP
    assert reads == [200] * 10
    assert at_cap.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in at_cap.lower()
    # Once the flood is gone, new connections are served again.
    wait_for(lambda: urllib3.request("GET", f"http://127.0.0.1:{port}/v1/block", retries=False, timeout=2,
                                     headers={"Authorization": f"Bearer {TOKEN}"}).status == 200,
             timeout=10, what="a new connection to be served")


@pytest.mark.parametrize("server", [(2, 1, 2)], indirect=True)
def test_slow_request_heads_and_bodies_are_cut_off(server):
    """A head that never ends is closed at the keep-alive time (2 s here); a
    body trickled a byte every 0.5 s (under the 1 s read timeout) gets a 408
    at the body time (2 s here). Before, both held their connection as long
    as the client liked."""
    process, port = server
    head = socket.create_connection(("127.0.0.1", port))
    body = socket.create_connection(("127.0.0.1", port))
    head.sendall(b"GET /v1/block HTTP/1.1\r\nhost: x\r\n")
    body.sendall(b"POST /v1/echo HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + TOKEN.encode()
                 + b"\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n")
    started = time.monotonic()
    ended: dict[str, float] = {}
    answers: dict[str, bytes] = {}
    try:
        while len(ended) < 2 and time.monotonic() - started < 8:
            for name, sock in (("head", head), ("body", body)):
                if name in ended:
                    continue
                try:
                    sock.sendall(b"a" if name == "head" else b" ")
                    sock.settimeout(0.25)
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    data = b""
                if not data or data.startswith(b"HTTP/"):
                    ended[name] = time.monotonic() - started
                    answers[name] = data
    finally:
        head.close()
        body.close()
    print(f"\nslow head ended after {ended.get('head', float('nan')):.1f} s, slow body after "
          f"{ended.get('body', float('nan')):.1f} s ({answers.get('body', b'')[:12]!r})")
    assert ended.get("head", 99) < 4.0
    assert ended.get("body", 99) < 4.0 and answers["body"].startswith(b"HTTP/1.1 408")
