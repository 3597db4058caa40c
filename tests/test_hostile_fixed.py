"""Hostile input on every node's HTTP surface, fixed cases: traversal and
out-of-range numbers, bad and oversized bodies, requests that are not HTTP,
unknown routes and methods, clients that vanish, stored input that would
poison later answers; and how tokens are looked up. Every answer must pass the
checks of tests/hostile_nodes.py (which says what they are); generated
requests are in tests/test_hostile_generated.py.

The tests with the `env` fixture run against one master, replica and cache
server (on btrfs) for the module, and are marked btrfs; the token lookup
runs as any user.
"""

from __future__ import annotations

import socket
import time

import pytest
from hostile_nodes import (
    HOSTILE_NODE,
    MIB,
    auth,
    check_nodes_clean,
    check_reply,
    running_nodes,
    still_answers,
    summary,
)
from rawhttp import Reply, build_request, decoded_path, send_raw

from harness.cluster import TOKEN

# What ran, for the closing summary (test_zz_summary).
RAN: dict[str, object] = {}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with running_nodes(tmp_path_factory.mktemp("hostile")) as nodes:
        yield nodes


# --- fixed cases --------------------------------------------------------------------------------

SECRET_TARGETS = [
    b"/v1/imis/..%2f..%2fsecret", b"/v1/imis/..%2f..%2f..%2fsecret/versions/1/manifest",
    b"/v1/imis/%2e%2e/versions/1/manifest", b"/v1/imis/demo/versions/1/manifest/..%2f..%2f..%2fsecret",
    b"/v1/blocks/..%2f..%2fsecret", b"/v1/blocks/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    b"/v1/imis/demo%00/versions/1/manifest", b"/v1/imis/demo/versions/1%00/manifest",
    b"/v1/imis/demo/versions/1/stream?parent=..%2f..%2fsecret", b"/v1/prefetch/..%2fsecret",
    b"/v1/blocks/" + b"0" * 64 + b"?imi=..%2f..%2fsecret&version=1",
    b"/v1/blocks/" + b"0" * 64 + b"?imi=demo&version=..%2f1",
    b"/v1/imis/" + b"a" * 65 + b"/versions/1/manifest", b"/v1/imis/" + b"a" * 60000,
    b"/v1/imis/demo/versions/" + str(2**63).encode() + b"/manifest",
    b"/v1/imis/demo/versions/" + str(2**64 + 1).encode() + b"/stream",
    b"/v1/imis/demo/versions/-1/manifest", b"/v1/imis/demo/versions/0/manifest",
    b"/v1/imis/demo/versions/" + b"9" * 5000 + b"/profile",
    b"/v1/imis/demo/versions/1/stream?parent=" + str(2**63).encode(),
    b"/v1/imis/demo/versions/1/stream?parent=-1", b"/v1/imis/%ff%fe/versions/1/manifest",
    b"/v1/imis/%c0%ae%c0%ae/versions/1/manifest", b"/v1/prefetch/" + str(2**64).encode(),
    b"/v1/nodes/..%2f..%2fsecret/heartbeat",
]


@pytest.mark.btrfs
@pytest.mark.parametrize("node", ["master", "replica", "cache"])
def test_fixed_traversal_and_number_cases(env, node):
    url = env.urls[node]
    n = 0
    for target in SECRET_TARGETS:
        for method in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE"):
            if method in (b"POST", b"PUT", b"DELETE") and b"/demo/" in target:
                continue
            headers = [auth(), (b"X-Icbd-Node", b"r1")]
            reply = send_raw(url, build_request(method, target, headers, b""), head_request=method == b"HEAD")
            path = decoded_path(target.decode())
            check_reply(env, node, reply, method=method, path_text=path, token_ok=True,
                         may_504=node == "cache" and path.startswith("/v1/blocks/0"))
            n += 1
    still_answers(env, node)
    RAN[f"fixed traversal/number {node}"] = n


def _post_path(node: str) -> bytes:
    return {"master": b"/v1/nodes", "replica": b"/v1/notify", "cache": b"/v1/prefetch"}[node]


BAD_BODIES = [
    b"{not json", b"\xff\xfe\xfd", b'{"imi": "\xff"}', b'{"imi": "demo\\u0000"}', b"[1, 2]", b"null", b"42",
    b'"a string"', b"NaN", b'{"imi": NaN, "version": Infinity}', b'{"version": 1e400}',
    b'{"version": ' + b"9" * 5000 + b"}", b'{"version": -9223372036854775809}',
    b'{"imi": "' + b"a" * 100_000 + b'"}', b'{"id": "..", "role": "replica", "site": "a", "url": "http://x"}',
    b'{"blocks": ["' + b"0" * 64 + b'", "../secret"]}', b'{"digests": ["..%2fsecret"]}',
    b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b"\xef\xbb\xbf{}", b"{}" + b"\x00" * 10,
]


@pytest.mark.btrfs
@pytest.mark.parametrize("node", ["master", "replica", "cache"])
def test_fixed_bodies(env, node):
    url = env.urls[node]
    path = _post_path(node)
    for body in BAD_BODIES:
        for content_type in (b"application/json", b"text/plain"):
            headers = [auth(), (b"Content-Type", content_type)]
            reply = send_raw(url, build_request(b"POST", path, headers, body))
            check_reply(env, node, reply, method=b"POST", path_text=path.decode(), token_ok=True)
            assert 400 <= reply.status < 500, (node, body[:60], reply.status, reply.body[:200])
    still_answers(env, node)
    RAN[f"fixed bodies {node}"] = 2 * len(BAD_BODIES)


@pytest.mark.btrfs
@pytest.mark.parametrize("node", ["master", "replica", "cache"])
def test_oversized_body_is_refused_before_it_is_read(env, node):
    """A Content-Length of 1 TiB with the body actually flowing: refused with
    413 once the route's limit (1 MiB, 16 MiB for prefetch) is passed."""
    headers = [auth(), (b"Content-Type", b"application/json"), (b"Content-Length", b"1099511627776")]
    head = b"POST " + _post_path(node) + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    head += b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n"
    reply = send_raw(env.urls[node], head, chunks=[b"x" * MIB] * 20, timeout=60)
    check_reply(env, node, reply, method=b"POST", path_text=_post_path(node).decode(), token_ok=True)
    assert reply.status == 413, (reply.status, reply.raw[:300])
    still_answers(env, node)
    RAN[f"oversized body {node}"] = 1


PROTOCOL_CASES = [
    # (what, raw request): not HTTP/1.1, refused by h11 before the app.
    ("invalid UTF-8 in the target", b"GET /v1/imis/\xff\xfe/versions/1/manifest HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("NUL in the target", b"GET /v1/imis/demo\x00/versions HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("negative Content-Length", b"POST /v1/imis HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"),
    ("Content-Length not a number", b"POST /v1/imis HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"),
    ("Content-Length of 2**90", b"POST /v1/imis HTTP/1.1\r\nHost: x\r\nContent-Length: "
     + str(2**90).encode() + b"\r\n\r\n"),
    ("two Content-Lengths", b"POST /v1/imis HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
    ("bad chunk size", b"POST /v1/imis HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n"),
    ("header flood (10000 headers, 1 MiB)", b"GET / HTTP/1.1\r\nHost: x\r\n"
     + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 100) for i in range(10_000)) + b"\r\n"),
    ("one 1 MiB header", b"GET /v1/imis HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * MIB + b"\r\n\r\n"),
    ("a 1 MiB target", b"GET /v1/imis/" + b"a" * MIB + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("a 1 MiB Authorization", b"GET /v1/imis HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"a" * MIB
     + b"\r\n\r\n"),
    ("no Host", b"GET / HTTP/1.1\r\n\r\n"),
    ("space in the target", b"GET /v1/imis/de mo HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("bare LF garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n"),
    ("header without colon", b"GET / HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n"),
]


@pytest.mark.btrfs
@pytest.mark.parametrize("node", ["master", "replica", "cache"])
def test_requests_that_are_not_http(env, node):
    for what, raw in PROTOCOL_CASES:
        reply = send_raw(env.urls[node], raw, timeout=15)
        if reply.status is None:
            assert reply.raw == b"", f"{node} {what}: {reply.raw[:200]!r}"  # it just closed: also fine
        else:
            check_reply(env, node, reply, method=b"GET", path_text="", token_ok=True, protocol=True)
        still_answers(env, node)
    # Below the bound (about 128 KiB, see icbdcore/http.py) a big head is an ordinary request.
    flood = [(b"X-%d" % i, b"a" * 100) for i in range(900)]
    for headers, token_ok in ((flood, False), ([*flood, auth()], True)):
        reply = send_raw(env.urls[node], build_request(b"GET", b"/v1/imis", headers, b""))
        check_reply(env, node, reply, method=b"GET", path_text="/v1/imis", token_ok=token_ok)
        assert reply.status == (200 if token_ok else 401)
    RAN[f"not-HTTP cases {node}"] = len(PROTOCOL_CASES) + 2


@pytest.mark.btrfs
@pytest.mark.parametrize("node", ["master", "replica", "cache"])
def test_unknown_routes_and_methods(env, node):
    n = 0
    for method in (b"PATCH", b"OPTIONS", b"TRACE", b"CONNECT", b"BREW", b"PROPFIND", b"M" * 100):
        for target in (b"/", b"/v1/imis", b"/v1/blocks/" + b"0" * 64, b"/v1/nowhere", b"/etc/passwd"):
            reply = send_raw(env.urls[node], build_request(method, target, [auth()], b""))
            check_reply(env, node, reply, method=method, path_text=target.decode(), token_ok=True)
            assert reply.status in (404, 405), (node, method, target, reply.status)
            n += 1
    for target in (b"*", b"http://evil.example/v1/imis", b"//etc/passwd", b"/../../etc/passwd",
                   b"/v1/../../../secret", b"/v2/imis", b"/V1/imis", b"/v1x/imis"):
        reply = send_raw(env.urls[node], build_request(b"GET", target, [auth()], b""))
        check_reply(env, node, reply, method=b"GET", path_text="", token_ok=True)
        n += 1
    still_answers(env, node)
    RAN[f"unknown routes/methods {node}"] = n


@pytest.mark.btrfs
@pytest.mark.parametrize("node", ["master", "replica", "cache"])
def test_client_that_vanishes_mid_body_is_no_internal_error(env, node):
    """A client that announces a body and goes away: nothing to answer, and
    nothing to log as an internal error (a flood of such must not fill logs
    with tracebacks)."""
    log = env.cluster.root / f"{ {'master': 'master', 'replica': 'r1', 'cache': 'cache'}[node] }.log"
    before = log.read_text(errors="replace").count("internal error")
    host, port = env.urls[node].removeprefix("http://").rsplit(":", 1)
    for _ in range(5):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"POST " + _post_path(node) + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                      + TOKEN.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"imi\"")
            time.sleep(0.05)
    time.sleep(0.5)
    still_answers(env, node)
    after = log.read_text(errors="replace").count("internal error")
    assert after == before, f"{node} logged {after - before} internal errors for clients that went away"
    RAN[f"vanishing clients {node}"] = 5


@pytest.mark.btrfs
def test_stored_input_cannot_poison_later_answers(env):
    """What one request stores must not break the answers to everyone else:
    a NaN in a heartbeat, a lone surrogate in a node URL or a publish message
    would otherwise make GET /v1/nodes or GET /v1/imis fail for every node."""
    master = env.urls["master"]
    api = env.cluster.api
    json_type = (b"Content-Type", b"application/json")

    def post(path: str, body: bytes) -> Reply:
        reply = send_raw(master, build_request(b"POST", path.encode(), [auth(), json_type], body))
        check_reply(env, "master", reply, method=b"POST", path_text=path, token_ok=True)
        return reply

    def listings_answer() -> None:
        for path in ("/v1/nodes", "/v1/imis"):
            answer = api("GET", path)
            assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
            answer.json()

    tree = env.cluster.root / "poison-tree"  # below the master's source root
    tree.mkdir()
    (tree / "file").write_text("poison\n")
    try:
        for body in (b'{"load": NaN}', b'{"versions": {"x": [Infinity]}}', b'{"note": "\\udcff"}',
                     b'{"transfers": [{"imi": "\\ud800x"}]}'):
            post(f"/v1/nodes/{HOSTILE_NODE}/heartbeat", body)
            listings_answer()
        post("/v1/nodes", b'{"id": "poison-node", "role": "cache", "site": "a", "url": "http://\\udcff"}')
        listings_answer()
        assert api("POST", "/v1/imis", json={"name": "poison", "from": str(tree)}).status_code == 201
        post("/v1/imis/poison/versions", b'{"message": "\\udcff"}')
        listings_answer()
        assert api("GET", "/v1/imis/poison").status_code == 200
    finally:
        api("DELETE", "/v1/imis/poison")
        api("DELETE", "/v1/nodes/poison-node")
        api("POST", f"/v1/nodes/{HOSTILE_NODE}/heartbeat", json={})
    RAN["stored-poison cases"] = 6


def test_tokens_are_looked_up_by_their_hash(monkeypatch):
    """The guard never compares a presented token with a stored one, byte by
    byte: it looks up the token's SHA-256 (timing tells at most which hashes
    exist, and nobody chooses the hash he tries), and the table a node holds
    has no token in it."""
    import json

    import trio

    from icbdcore import auth, http

    calls = []
    real = auth.token_hash

    def spy(token):
        calls.append(token)
        return real(token)

    table = auth.TokenTable()
    table.install({"id": "store", "serial": 1,
                   "tokens": [{"name": "master", "role": "admin", "hash": real(TOKEN)}]})
    assert TOKEN not in json.dumps(table.doc)
    monkeypatch.setattr(auth, "token_hash", spy)

    async def inner(scope, receive, send):
        await http.json_response({"ok": True})(scope, receive, send)

    guard = http.Guard(inner, table)
    statuses = []

    async def run(headers):
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/v1/imis", "raw_path": b"/v1/imis",
                 "query_string": b"", "headers": headers}
        await guard(scope, receive, send)
        statuses.append(sent[0]["status"])

    for headers in ([], [(b"authorization", b"Bearer x")], [(b"authorization", b"Bearer " + TOKEN.encode())],
                    [(b"authorization", b"\xff" * 1000)]):
        trio.run(run, headers)
    assert statuses == [401, 401, 200, 401]
    assert calls == ["x", TOKEN]  # no header, or no bearer token: nothing to look up


@pytest.mark.btrfs
def test_zz_nodes_alive_nothing_logged_and_summary(env):
    """After everything above: every node process alive, no internal error
    logged, no token (right or wrong) in any log."""
    check_nodes_clean(env)
    print("\n" + summary(RAN))
