"""Hostile input on every node's HTTP surface (master, replica and cache
server): the nodes under attack and the checks every answer must pass.

One master, one replica and one cache server (`running_nodes`) run for each
test module: tests/test_hostile_generated.py, where Hypothesis generates
requests (methods, paths with traversal and encodings, query strings,
headers, bodies), and tests/test_hostile_fixed.py, with fixed cases. Requests
go byte for byte over a raw socket (tests/rawhttp.py), so nothing is
normalised or refused by a client library first. Every answer must be

- below 500, with one exception decided here: the cache server answers 504
  for a block with a well-formed digest that no upstream holds (a gateway
  that cannot fetch, not a bad request; see docs/SECURITY.md);
- for a 4xx, a JSON object with an "error" string (HEAD answers carry no body);
- 401 for any route under /v1/ without a valid token (the requests carry the
  admin token, or none, or a wrong one; roles are tests/test_roles.py's);
- free of the marker planted in files outside the nodes' data folders;

and the node must answer `GET /` afterwards. At the end: every node process
is alive, no node logged an internal error, and no token was logged.

State protection: mutating requests (anything but GET/HEAD) never name the
real iMI or node ids, so the module's fixture stays as it was; and no
generated registration can make a node an upstream (the cache would wait for
it), see `_body_value` in tests/test_hostile_generated.py.

Requests that are not HTTP/1.1 at all (bytes outside VCHAR in the target,
malformed Content-Length or chunking, header sections over 64 KiB) are refused
by hypercorn's h11 parser before the app sees them: a bare 400/431 with an
empty body. Those are the fixed cases checked with `protocol=True`
(tests/test_hostile_fixed.py).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rawhttp import Reply, build_request, send_raw
from trees import make_tree

from harness.cluster import TOKEN, Cluster, wait_for
from icbdcore.manifest import Manifest
from icbdcore.mounts import is_mountpoint

MIB = 1 << 20
WRONG_TOKENS = ("not-the-token-at-all", TOKEN + "x", TOKEN[:-1])
REAL_NAMES = ("demo",)
REAL_NODES = ("r1", "cache", "master")
PROTECTED = set(REAL_NAMES) | set(REAL_NODES)
# A registered node of role cache (never an upstream) that generated heartbeats may address.
HOSTILE_NODE = "hostile-cache"


def auth(token: str = TOKEN) -> tuple[bytes, bytes]:
    return b"Authorization", b"Bearer " + token.encode()


@dataclass
class Env:
    cluster: Cluster
    urls: dict[str, str]
    markers: list[bytes]
    secret_paths: list[Path]
    digests: list[str]


@contextlib.contextmanager
def running_nodes(root: Path) -> Iterator[Env]:
    """The module's nodes, in `root`: a master, replica r1 holding demo v1, a
    cache server that knows r1, and a registered node of role cache (HOSTILE_NODE)."""
    outside = Path(tempfile.mkdtemp(prefix="icbd-secret-"))
    cluster = Cluster(root)
    try:
        marker = secrets.token_hex(16).encode()
        # A file beside the data folders (one ".." away) and one elsewhere in /tmp.
        secret_paths = [root / "secret", outside / "secret"]
        for path in secret_paths:
            path.write_bytes(b"SECRET " + marker + b"\n")
        verbose = ["-v"]  # debug logging: the token must not show up even there
        cluster.master(extra=verbose)
        r1 = cluster.replica("r1", extra=verbose)
        cluster.icbd("imi", "create", "demo", "--from", str(make_tree(root / "tree", big=2 * MIB + 5)))
        cluster.icbd("imi", "publish", "demo")
        cluster.icbd("subscribe", "demo", "--node", "r1")
        cluster.wait_held(r1, "demo", [1])
        cache = cluster.cache("cache", extra=verbose)
        wait_for(lambda: "r1" in {u["id"] for u in cache.status()["fetcher"]["upstreams"]},
                 what="the cache to know r1")
        registration = {"id": HOSTILE_NODE, "role": "cache", "site": "a", "url": "http://127.0.0.1:9"}
        assert cluster.api("POST", "/v1/nodes", json=registration).status_code == 201
        manifest = Manifest.from_bytes(cluster.api("GET", "/v1/imis/demo/versions/1/manifest").content)
        digests = sorted(manifest.digests())
        # One block in the cache's store, so its read path has something to find.
        assert cluster.api("GET", f"/v1/blocks/{digests[0]}?imi=demo&version=1", node=cache).status_code == 200
        urls = {"master": cluster.master_node.url, "replica": r1.url, "cache": cache.url}
        yield Env(cluster, urls, [marker], secret_paths, digests)
    finally:
        cluster.stop_all()
        shutil.rmtree(outside, ignore_errors=True)
        if not any(is_mountpoint(n.data) for n in cluster.nodes):
            shutil.rmtree(root, ignore_errors=True)


def check_reply(env: Env, node: str, reply: Reply, *, method: bytes, path_text: str, token_ok: bool,
                may_504: bool = False, protocol: bool = False) -> None:
    what = f"{node} {method.decode(errors='replace')} {path_text[:200]!r}"
    assert reply.status is not None, f"{what}: no HTTP answer: {reply.raw[:300]!r}"
    for marker in env.markers:
        assert marker not in reply.raw, f"{what}: the answer holds a file from outside the data folders"
    if reply.status >= 500:
        # A HEAD answer has no body, so only its declared type can say it is a JSON error.
        described = (reply.headers.get("content-type", "").startswith("application/json") if method == b"HEAD"
                     else reply.json_error())
        assert may_504 and reply.status == 504 and described, f"{what}: {reply.status} {reply.body[:300]!r}"
    if 400 <= reply.status < 500 and method != b"HEAD" and not protocol:
        assert reply.json_error(), f"{what}: {reply.status} without a JSON error: {reply.raw[:300]!r}"
    if protocol:
        assert 400 <= reply.status < 500, f"{what}: {reply.status}"
    if not token_ok and not protocol:
        if path_text == "/v1" or path_text.startswith("/v1/"):
            assert reply.status == 401, f"{what}: {reply.status} without the token"
        elif reply.status < 400:
            assert path_text == "/", f"{what}: {reply.status} without the token"


def still_answers(env: Env, node: str) -> None:
    reply = send_raw(env.urls[node], build_request(b"GET", b"/", [], b""), timeout=10)
    assert reply.status == 200, f"{node} no longer answers GET /: {reply.raw[:300]!r}"


def check_nodes_clean(env: Env) -> None:
    """Every node process alive, no internal error logged, no token (right
    or wrong) nor planted marker in any log."""
    for node in env.cluster.nodes:
        assert node.alive(), f"{node.id} died"
    for node in env.cluster.nodes:
        text = (env.cluster.root / f"{node.id}.log").read_text(errors="replace")
        assert "internal error" not in text, f"{node.id} logged an internal error:\n" + _around(text, "internal error")
        assert TOKEN not in text, f"{node.id} logged the token"
        for wrong in WRONG_TOKENS:
            assert wrong not in text, f"{node.id} logged a presented token"
        for marker in env.markers:
            assert marker.decode() not in text


def summary(ran: dict[str, object]) -> str:
    """What a module checked, from its record of what ran."""
    total = sum(v for k, v in ran.items() if isinstance(v, int) and not k.endswith("seconds"))
    return f"hostile input: {total} requests checked: {json.dumps(ran, indent=1)}"


def _around(text: str, needle: str, width: int = 3000) -> str:
    i = text.find(needle)
    return text[max(0, i - 200):i + width]
