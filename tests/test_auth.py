"""Credentials and roles without running nodes (any user): the guard and the
role of each route, the route tables against the contract, the master's
token store and a node's copy of its table, node URL checks, source roots,
and tokens kept out of a daemon's command line."""

from __future__ import annotations

import json
import os

import pytest
import trio
from routetables import CONTRACT, route_tables

from icbd.cli import _token_out_of_argv
from icbdcore import http
from icbdcore.auth import ADMIN, NODE, READER, BadTable, NodeTokens, TokenTable, token_hash
from icbdcore.wire import InvalidInput, Refused, check_node_url
from replicator.sources import SourceRoots
from replicator.tokens import TokenStore

# --- the route tables ----------------------------------------------------------------


def test_every_route_of_every_node_declares_the_role_of_the_contract(tmp_path):
    """Derived from the nodes' own tables: a route added without its role, or
    with another than the contract's, fails here (and build_app refuses a
    route under /v1/ without one)."""
    tables = route_tables(tmp_path)
    for kind, expected in CONTRACT.items():
        assert tables[kind] == expected, (kind, set(tables[kind].items()) ^ set(expected.items()))
    assert not any(tmp_path.iterdir()), "building the route tables wrote something"


def test_a_route_without_a_role_is_refused():
    async def handler(request):
        return http.json_response({})

    with pytest.raises(ValueError, match="needs a role"):
        http.Endpoint("GET", "/v1/things", handler, http.OPEN)
    with pytest.raises(ValueError, match="declare it OPEN"):
        http.Endpoint("GET", "/metrics", handler, READER)
    from starlette.routing import Route

    with pytest.raises(TypeError, match="role"):
        http.build_app([Route("/v1/things", handler)], TokenTable())


# --- the guard --------------------------------------------------------------------------


def _table(**roles: str) -> TokenTable:
    table = TokenTable()
    table.install({"id": "store", "serial": 1,
                   "tokens": [{"name": f"{role}-1", "role": role, "hash": token_hash(token)}
                              for token, role in roles.items()]})
    return table


def _app(tokens: TokenTable):
    async def ok(request):
        return http.json_response({"ok": True})

    return http.build_app([
        http.Endpoint("GET", "/", ok, http.OPEN),
        http.Endpoint("GET", "/v1/read", ok, READER),
        http.Endpoint("POST", "/v1/node", ok, NODE),
        http.Endpoint("DELETE", "/v1/admin", ok, ADMIN),
    ], tokens)


def _call(app, method: str, path: str, token: bytes | None = None) -> tuple[int, dict]:
    async def run():
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        headers = [(b"authorization", b"Bearer " + token)] if token is not None else []
        scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "root_path": "",
                 "query_string": b"", "headers": headers, "http_version": "1.1", "scheme": "http",
                 "server": ("127.0.0.1", 1), "client": ("127.0.0.1", 2)}
        await app(scope, receive, send)
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return sent[0]["status"], json.loads(body) if body else {}

    return trio.run(run)


def test_guard_answers_401_403_and_lets_the_role_through():
    app = _app(_table(**{"r" * 20: READER, "n" * 20: NODE, "a" * 20: ADMIN}))
    reader, node, admin = b"r" * 20, b"n" * 20, b"a" * 20
    expected = {
        # (method, path): {token: status}
        ("GET", "/v1/read"): {None: 401, b"wrong-token": 401, reader: 200, node: 200, admin: 200},
        ("POST", "/v1/node"): {None: 401, b"wrong-token": 401, reader: 403, node: 200, admin: 200},
        ("DELETE", "/v1/admin"): {None: 401, b"wrong-token": 401, reader: 403, node: 403, admin: 200},
        ("GET", "/v1/nowhere"): {None: 401, b"wrong-token": 401, reader: 404},
        ("GET", "/v1"): {None: 401, reader: 404},
        ("GET", "/"): {None: 200},
        ("GET", "/v1x/read"): {None: 404},  # /v1/ exactly: another prefix is no route of ours
    }
    for (method, path), cases in expected.items():
        for token, status in cases.items():
            got, body = _call(app, method, path, token)
            assert got == status, (method, path, token, got, body)
            if status in (401, 403):
                assert body["error"]
    status, body = _call(app, "DELETE", "/v1/admin", node)
    assert "needs the admin role" in body["error"] and "node-1" in body["error"]
    assert _call(app, "GET", "/v1/auth", node) == (200, {"role": "node", "name": "node-1"})
    assert _call(app, "GET", "/v1/auth", b"\xff" * 1000)[0] == 401


def test_a_node_without_a_table_answers_503_to_credentials():
    app = _app(TokenTable())
    assert _call(app, "GET", "/v1/read", b"some-token")[0] == 503
    assert _call(app, "GET", "/v1/read")[0] == 401
    assert _call(app, "GET", "/")[0] == 200


# --- the master's token store ---------------------------------------------------------------


def test_token_store_keeps_hashes_only_and_revokes(tmp_path):
    path = tmp_path / "tokens.json"
    store = TokenStore(path, "the-admin-token-123")
    store.load()
    name, token = store.create(READER, "desk-1")
    assert name == "desk-1" and len(token) >= 43
    assert store.identify(token).role == READER
    assert store.identify("the-admin-token-123").role == ADMIN
    assert store.identify(store.notify_token).role == NODE
    text = path.read_text()
    assert token not in text and "the-admin-token-123" not in text and store.notify_token not in text
    assert token_hash(token) in text
    assert json.dumps(store.table_doc()).count(token) == 0
    with pytest.raises(Refused) as exists:
        store.create(NODE, "desk-1")
    assert exists.value.status == 409
    for reserved in ("master", "master-notify"):
        with pytest.raises(Refused):
            store.create(ADMIN, reserved)
        with pytest.raises(Refused):
            store.revoke(reserved)
    with pytest.raises(Refused) as bad:
        store.create("root")
    assert bad.value.status == 400
    serial = store.serial
    store.revoke("desk-1")
    assert store.identify(token) is None and store.serial == serial + 1
    with pytest.raises(Refused) as gone:
        store.revoke("desk-1")
    assert gone.value.status == 404
    # A restart keeps the store, and makes a new node credential (so a new serial).
    again = TokenStore(path, "the-admin-token-123")
    again.load()
    assert again.serial > store.serial and again.table_doc()["id"] == store.table_doc()["id"]
    assert again.identify(store.notify_token) is None


def test_node_tokens_never_go_back_to_an_older_table(tmp_path):
    store = TokenStore(tmp_path / "tokens.json", "the-admin-token-123")
    store.load()
    _, token = store.create(READER, "desk")
    old = store.table_doc()
    store.revoke("desk")
    new = store.table_doc()
    node = NodeTokens(tmp_path / "token-table.json")
    assert node.offer(new) and node.table.identify(token) is None
    assert not node.offer(new)
    with pytest.raises(BadTable, match="older"):
        node.offer(old)  # a replayed table must not bring the revoked token back
    forged = {**new, "tokens": [*new["tokens"], {"name": "x", "role": ADMIN, "hash": token_hash("mine")}]}
    with pytest.raises(BadTable, match="same serial"):
        node.offer(forged)
    assert node.table.identify(token) is None and node.table.identify("mine") is None
    for bad in (None, [], {"id": "s", "serial": -1, "tokens": []}, {**new, "tokens": [{"name": "x"}]}):
        with pytest.raises(BadTable):
            node.offer(bad)
    # Across a restart, from DATA.
    restarted = NodeTokens(tmp_path / "token-table.json")
    restarted.load()
    assert restarted.table.ready and restarted.table.identify("the-admin-token-123").role == ADMIN


def test_node_tokens_check_the_signature_when_they_can(tmp_path):
    from icbdcore.signing import SigningKey, Untrusted

    key = SigningKey.load_or_create(tmp_path / "keys")
    store = TokenStore(tmp_path / "tokens.json", "the-admin-token-123", sign=key.sign)
    store.load()
    node = NodeTokens(tmp_path / "table.json", verify=lambda doc: key.public.verify(doc, "token table"))
    assert node.offer(store.table_doc())
    unsigned = {k: v for k, v in store.table_doc().items() if k != "signature"}
    with pytest.raises(Untrusted):
        node.offer({**unsigned, "serial": unsigned["serial"] + 1})


# --- node URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://127.0.0.1:7401", "https://cache.paris.example", "http://[::1]:80",
                                 "https://r1.example:65535"])
def test_node_urls_taken(url):
    assert check_node_url(url) == url


@pytest.mark.parametrize("url", [
    "ftp://r1.example", "file:///etc/passwd", "gopher://x:70", "http://", "http://:80", "http://r1:0",
    "http://r1:65536", "http://r1:-1", "http://r1:", "http://user:pw@r1", "http://user@r1:80",
    "http://r1/", "http://r1/v1", "http://r1:80/admin", "http://r1?x=1", "http://r1#frag",
    "http://r 1", "http://r1\n", "http://\udcff", "http://[fe80::1", "http://[not-ip]:80",
    "http://" + "a" * 600, 42, None, "r1.example:80",
])
def test_node_urls_refused(url):
    with pytest.raises(InvalidInput, match="invalid node URL"):
        check_node_url(url)


# --- source roots ----------------------------------------------------------------------------


def test_source_roots(tmp_path):
    root = tmp_path / "trees"
    (root / "desk").mkdir(parents=True)
    data = root / "data"  # a careless root that holds the master's data folder
    data.mkdir()
    (root / "to-etc").symlink_to("/etc")
    (root / "to-data").symlink_to(data)
    roots = SourceRoots.from_options([str(root)], data)
    assert roots.check(str(root / "desk")) == (root / "desk").resolve()
    for given, status, words in [
        ("/etc", 403, "not below a source root"),
        (str(root / "to-etc"), 403, "not below a source root"),
        (str(root / ".." / ".." / "etc"), 403, "not below a source root"),
        (str(root / "to-data"), 403, "data folder"),
        (str(root / "data" / "keys"), 403, "data folder"),
        ("relative/path", 400, "absolute"),
    ]:
        with pytest.raises(Refused) as refused:
            roots.check(given)
        assert refused.value.status == status and words in refused.value.message, (given, refused.value.message)
        assert str(root) in refused.value.message or status != 403 or "data" in words
    with pytest.raises(Refused) as holds_data:
        roots.check(str(root))
    assert "data folder" in holds_data.value.message
    with pytest.raises(Refused) as none:
        SourceRoots([], data).check(str(root / "desk"))
    assert none.value.status == 403 and "--source-root" in none.value.message


# --- tokens out of argv ------------------------------------------------------------------------


def test_token_taken_out_of_argv():
    assert _token_out_of_argv(["replica", "--data", "d"]) is None
    assert _token_out_of_argv(["--token", "s3cret", "replica", "--data", "d"]) == ["replica", "--data", "d"]
    assert _token_out_of_argv(["mount", "/m", "--token=s3cret", "--cache", "u"]) == ["mount", "/m", "--cache", "u"]
    assert _token_out_of_argv(["--token", "a", "cache", "--token", "b"]) == ["cache"]
    assert _token_out_of_argv(["--token-file", "f", "cache"]) is None
    assert _token_out_of_argv(["boot", "x", "--", "--token", "q"]) is None


def test_a_daemon_given_a_token_in_argv_moves_it_to_its_environment(tmp_path):
    """`icbd --token T master ...` execs itself again with T in ICBD_TOKEN,
    before anything else: /proc/PID/cmdline never shows it for long. The
    master here fails at once (its --data cannot be created), which is enough
    to see what it ran with."""
    import subprocess
    import sys

    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys\n"
        "import icbd.cli\n"
        "def show(args):\n"
        "    print(repr(open('/proc/self/cmdline', 'rb').read()), os.environ.get('ICBD_TOKEN'))\n"
        "    return 0\n"
        "import replicator.master\n"
        "replicator.master.run = show\n"
        "sys.exit(icbd.cli.main())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("ICBD_TOKEN", None)
    result = subprocess.run([sys.executable, str(probe), "--token", "s3cret-token-xyz", "master",
                             "--data", str(tmp_path / "d"), "--listen", "127.0.0.1:1"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    cmdline, token = result.stdout.rsplit(" ", 1)
    assert "s3cret-token-xyz" not in cmdline and "--token" not in cmdline
    assert token.strip() == "s3cret-token-xyz"


def test_a_damaged_token_store_is_a_one_line_error(tmp_path):
    from icbdcore.errors import CliError

    path = tmp_path / "tokens.json"
    for text in ("{not json", '{"id": "s", "serial": 1, "tokens": [{"name": "x"}]}', "[]"):
        path.write_text(text)
        with pytest.raises(CliError, match="damaged"):
            TokenStore(path, "the-admin-token-123").load()
