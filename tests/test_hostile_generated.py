"""Hostile input on every node's HTTP surface, generated: Hypothesis makes
requests (methods, paths with traversal and encodings, query strings,
headers, bodies) for the master, a replica and a cache server, and every
answer must pass the checks of tests/hostile_nodes.py (which says what they
are). The fixed cases are in tests/test_hostile_fixed.py.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import time
from collections import Counter
from urllib.parse import quote

import pytest
from hostile_nodes import (
    HOSTILE_NODE,
    MIB,
    PROTECTED,
    REAL_NAMES,
    WRONG_TOKENS,
    auth,
    check_nodes_clean,
    check_reply,
    running_nodes,
    still_answers,
    summary,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawhttp import build_request, decoded_path, send_raw

from harness.cluster import TOKEN

EXAMPLES = int(os.environ.get("ICBD_HOSTILE_EXAMPLES", "600"))  # per node
# The suite replays the same generated requests on every run so that a CI result can be reproduced;
# ICBD_HOSTILE_RANDOM=1 explores new ones (run it by hand when changing a route).
DERANDOMIZE = os.environ.get("ICBD_HOSTILE_RANDOM") != "1"

# What ran, for the closing summary (test_zz_summary).
RAN: dict[str, object] = {}

# One master, replica and cache server (on btrfs) for the module.
pytestmark = pytest.mark.btrfs


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with running_nodes(tmp_path_factory.mktemp("hostile")) as nodes:
        yield nodes


# --- strategies ------------------------------------------------------------------------------

TEMPLATES = [
    "/", "/v1", "/v1/", "/v1/imis", "/v1/imis/{name}", "/v1/imis/{name}/versions",
    "/v1/imis/{name}/rollback", "/v1/imis/{name}/versions/{version}",
    "/v1/imis/{name}/versions/{version}/manifest", "/v1/imis/{name}/versions/{version}/stream",
    "/v1/imis/{name}/versions/{version}/stream/digest", "/v1/imis/{name}/versions/{version}/profile",
    "/v1/blocks/{digest}", "/v1/nodes", "/v1/nodes/{node}", "/v1/nodes/{node}/heartbeat",
    "/v1/subscriptions", "/v1/notify", "/v1/prefetch", "/v1/prefetch/{job}",
    "/v1/{junk}", "/{junk}", "/v1/imis/{junk}/{junk}", "/v1/blocks/{junk}",
]

# Traversal and encoding tricks, as they go on the wire (already percent-encoded).
HOSTILE_SEGMENTS = [
    "..", ".", "%2e%2e", "%2E%2E", ".%2e", "..%2f..%2f..%2fsecret", "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2fsecret", "..%5c..%5csecret", "%252e%252e%252fsecret", "..%c0%afsecret",
    "%c0%ae%c0%ae", "%00", "demo%00", "demo%00.json", "%ff%fe", "%80", "%e2%80%ae", "a" * 65,
    "a" * 4000, "%2F", "%2fetc%2fpasswd", "~root", "$(id)", "%3bls", "%0d%0aX-Injected:%201",
    "%20demo", "demo%20", "DEMO", "d%65mo", "%ef%bd%84emo", "-", "_", ".hidden", "a..b", "*",
    "%25", "%", "%zz", "?", "#frag", "%23", "%3f", "secret", "..%2fsecret",
]
VERSIONS = [
    "0", "-1", "-0", "+1", "01", "1.5", "1e3", "0x10", "%201", "1%20", "%d9%a1", "%ef%bc%91",
    "2147483647", "2147483648", "4294967296", str(2**63 - 1), str(2**63), str(2**64),
    str(2**1000), "9" * 5000, "latest", "NaN", "inf", "1", "2",
]
ABSENT_DIGESTS = ["0" * 64, "f" * 64, "0123456789abcdef" * 4]
BAD_DIGESTS = ["0" * 63, "0" * 65, "F" * 64, "g" * 64, "0" * 63 + "%00", "%20" + "0" * 63, "0" * 32, "0" * 128]


def _encoded(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def _decodes_to_protected(segment: str) -> bool:
    from urllib.parse import unquote

    return unquote(segment) in PROTECTED


def _segment(real: tuple[str, ...], ghosts: tuple[str, ...], mutating: bool) -> st.SearchStrategy[str]:
    """A path segment as sent: a real name (reads only), a valid name that
    does not exist, a hostile one, or random text percent-encoded."""
    plain = st.text(max_size=80).map(_encoded)
    raw_bytes = st.binary(max_size=40).map(lambda b: quote(b, safe=""))
    hostile = st.sampled_from(HOSTILE_SEGMENTS)
    choices = [st.sampled_from(ghosts), *(s.filter(lambda v: not _decodes_to_protected(v))
                                          for s in (hostile, plain, raw_bytes))]
    if real and not mutating:
        choices.append(st.sampled_from(real))
    return st.one_of(*choices)


def _version(mutating: bool) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(VERSIONS),
                     st.integers(min_value=-(2**70), max_value=2**70).map(str),
                     _segment((), ("1",), mutating))


@st.composite
def _path(draw, env_digests: list[str], mutating: bool) -> str:
    template = draw(st.sampled_from(TEMPLATES))
    values = {
        "name": draw(_segment(REAL_NAMES, ("ghost", "no-such-imi", "a" * 64), mutating)),
        "version": draw(_version(mutating)),
        "digest": draw(st.one_of(st.sampled_from(env_digests), st.sampled_from(ABSENT_DIGESTS),
                                 st.sampled_from(BAD_DIGESTS), _segment((), ("0" * 64,), mutating))),
        "node": draw(_segment(("r1", "cache", "master"), ("ghost-node", "Z" * 64, HOSTILE_NODE), mutating)),
        "job": draw(st.one_of(st.integers(-5, 2**70).map(str), _segment((), ("1",), mutating))),
    }
    path = template
    for key, value in values.items():
        path = path.replace("{" + key + "}", value)
    while "{junk}" in path:
        path = path.replace("{junk}", draw(_segment((), ("x",), mutating)), 1)
    return path


QUERY_KEYS = ["parent", "imi", "version", "replace", "node", "name", "from", "digest"]


@st.composite
def _query(draw, mutating: bool) -> str:
    pairs = draw(st.lists(st.tuples(
        st.one_of(st.sampled_from(QUERY_KEYS), _segment((), ("k",), mutating)),
        st.one_of(_version(mutating), _segment(("demo", "r1"), ("ghost",), mutating)),
    ), max_size=4))
    if not pairs:
        return ""
    return "?" + "&".join(f"{k}={v}" for k, v in pairs)


def _body_value(mutating: bool) -> st.SearchStrategy:
    """Values for JSON bodies. Never an existing absolute path for "from"
    (creating an iMI from a host path is the admin's right, not hostile
    input), never a real iMI or node id when the request mutates, never a
    role that would make a registered node an upstream of the cache."""
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=100),
        st.sampled_from(["ghost", HOSTILE_NODE, "../secret", "../../etc/passwd", "/no/such/dir",
                         "relative/dir", "a" * 65, "x\u0000y", "cache", "admin", "Replica", "\udcff",
                         "http://127.0.0.1:9/", "file:///etc/passwd", "0" * 64, "demo", "r1", "1", "a"]),
    )
    if mutating:
        scalars = scalars.filter(lambda v: not (isinstance(v, str) and v in PROTECTED))
    return st.recursive(scalars, lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(["name", "from", "imi", "node", "version", "message",
                                                   "digests", "blocks", "profile", "id", "role", "site",
                                                   "url", "versions", "transfers"]),
                                  st.text(max_size=10)),
                        children, max_size=5)), max_leaves=12)


@st.composite
def _body(draw, mutating: bool) -> tuple[bytes, bytes | None]:
    """(body, content type)."""
    kind = draw(st.sampled_from(["none", "json", "json", "json", "bytes", "invalid-utf8", "nested", "big"]))
    if kind == "none":
        return b"", None
    if kind == "json":
        doc = draw(st.dictionaries(
            st.sampled_from(["name", "from", "imi", "node", "version", "message", "digests", "blocks",
                             "profile", "id", "role", "site", "url"]),
            _body_value(mutating), max_size=5))
        if draw(st.booleans()):
            doc = draw(_body_value(mutating))
        text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
        with contextlib.suppress(UnicodeEncodeError):
            return text.encode("utf-8"), b"application/json"
        return text.encode("utf-8", "surrogatepass"), b"application/json"
    if kind == "bytes":
        return draw(st.binary(max_size=300)), draw(st.sampled_from([None, b"application/json"]))
    if kind == "invalid-utf8":
        return b'{"name": "\xff\xfe", "imi": "\xc0\xae"}', b"application/json"
    if kind == "nested":
        depth = draw(st.sampled_from([100, 5000, 100_000]))
        return b"[" * depth + b"]" * depth, b"application/json"
    return draw(st.sampled_from([b"x" * (MIB + 1), b"[" + b"1," * (MIB // 2) + b"1]"])), b"application/json"


HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                      max_size=200).map(lambda s: s.strip().encode("latin-1"))


@st.composite
def requests_(draw, env_digests: list[str]):
    method = draw(st.sampled_from([b"GET"] * 6 + [b"HEAD"] + [b"POST"] * 3 + [
        b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"TRACE", b"BREW", b"get"]))
    mutating = method.upper() not in (b"GET", b"HEAD")
    path = draw(_path(env_digests, mutating)) + draw(_query(mutating))
    token = draw(st.sampled_from([TOKEN] * 6 + [None, *WRONG_TOKENS]))
    headers = []
    if token is not None:
        headers.append(auth(token))
    if draw(st.booleans()):
        headers.append((b"X-Icbd-Node", draw(st.one_of(
            st.sampled_from([b"r1", b"cache", b"master", b"ghost", b"", b"r1\xff"]), HEADER_TEXT))))
    if draw(st.integers(0, 3)) == 0:
        headers.append((b"Range", draw(st.one_of(
            st.sampled_from([b"bytes=0-", b"bytes=1-", b"bytes=999999999999999999-", b"bytes=-5",
                             b"bytes=abc", b"bytes=1-2,3-4", b"bytes=" + b"9" * 40 + b"-"]), HEADER_TEXT))))
        if draw(st.booleans()):
            headers.append((b"If-Range", draw(HEADER_TEXT)))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from([b"X-Junk", b"Accept", b"Cookie", b"X-Forwarded-For", b"Origin",
                                     b"Accept-Encoding", b"Authorization", b"Expect"]))
        if name == b"Expect":
            continue  # 100-continue makes the server wait for a body the test may not send
        headers.append((name, draw(HEADER_TEXT)))
    body, content_type = draw(_body(mutating))
    if content_type:
        headers.append((b"Content-Type", content_type))
    # A repeated Authorization header: the last one counts (both sides agree).
    auths = [v for n, v in headers if n == b"Authorization"]
    token_ok = bool(auths) and hmac.compare_digest(auths[-1], b"Bearer " + TOKEN.encode())
    return method, path, headers, body, token_ok


# --- the properties --------------------------------------------------------------------------


@pytest.mark.parametrize("node", ["master", "replica", "cache"])
def test_generated_requests_get_4xx_json_and_leak_nothing(env, node):
    count = 0
    statuses: Counter[int] = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much])
    @given(requests_(env.digests))
    def one(request):
        nonlocal count
        method, path, headers, body, token_ok = request
        target = path.encode("ascii")
        reply = send_raw(env.urls[node], build_request(method, target, headers, body),
                         head_request=method.upper() == b"HEAD")
        decoded = decoded_path(path)
        may_504 = node == "cache" and decoded.startswith("/v1/blocks/") and len(decoded) == 43
        check_reply(env, node, reply, method=method, path_text=decoded, token_ok=token_ok, may_504=may_504)
        still_answers(env, node)
        count += 1
        statuses[reply.status] += 1

    started = time.monotonic()
    one()
    RAN[f"hypothesis {node}"] = count
    RAN[f"hypothesis {node} seconds"] = round(time.monotonic() - started)
    RAN[f"hypothesis {node} statuses"] = dict(sorted(statuses.items()))
    assert count >= EXAMPLES // 2



def test_zz_nodes_alive_nothing_logged_and_summary(env):
    """After everything above: every node process alive, no internal error
    logged, no token (right or wrong) in any log."""
    check_nodes_clean(env)
    print("\n" + summary(RAN))
