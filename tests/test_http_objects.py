"""What any HTTP cache between icbd's tiers relies on (docs/API.md,
"Caching"): objects named by their digest (blocks, manifests, boot
profiles, version streams) are immutable resources with a strong ETag,
`Cache-Control: public, max-age=31536000, immutable`, `Accept-Ranges`, 206
for a range, 304 for a matching If-None-Match; their bytes never depend on
who asks; every other answer says `Cache-Control: no-store`. And a stream
whose spool expired is made again by `btrfs send`, byte for byte the same
(DESIGN's fact, checked here against the recorded digest).

The range and response helpers run as any user; the nodes need btrfs.
"""

from __future__ import annotations

import time

import pytest
import requests
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from starlette.testclient import TestClient
from trees import describe, make_tree

from harness.cluster import TOKEN, wait_for
from icbdcore import http
from icbdcore.wire import IMMUTABLE, content_digest

MIB = 1 << 20
DATA = bytes(range(256)) * 4  # 1024 bytes
DIGEST = content_digest(DATA)
ETAG = f'"{DIGEST}"'


def _request(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": raw, "query_string": b""})


@pytest.mark.parametrize("header, part", [
    ("bytes=0-", (0, 1024)),
    ("bytes=100-", (100, 1024)),
    ("bytes=100-199", (100, 200)),
    ("bytes=1000-5000", (1000, 1024)),  # past the end: up to it
    ("bytes=-24", (1000, 1024)),  # the last 24
    ("bytes=-5000", (0, 1024)),
    ("bytes=1023-1023", (1023, 1024)),
    (" bytes = 5 - 9 ", (5, 10)),
])
def test_one_range_of_any_form(header, part):
    assert http.byte_range(_request({"Range": header}), 1024, ETAG) == part


@pytest.mark.parametrize("header", ["bytes=1024-", "bytes=5000-6000", "bytes=-0"])
def test_a_range_beyond_the_object_is_unsatisfiable(header):
    assert http.byte_range(_request({"Range": header}), 1024, ETAG) == http.UNSATISFIABLE


@pytest.mark.parametrize("header", [
    "", "bytes=", "bytes=-", "bytes=9-5", "bytes=0-1,5-6", "items=0-1", "bytes=abc-", "bytes=1.5-",
    "bytes=" + "9" * 19 + "-",
])
def test_other_ranges_get_the_whole_object(header):
    """RFC 9110 lets a server ignore a Range it does not take: 200, whole."""
    assert http.byte_range(_request({"Range": header}), 1024, ETAG) is None


def test_if_range_naming_another_version_gets_the_whole_object():
    assert http.byte_range(_request({"Range": "bytes=5-", "If-Range": ETAG}), 1024, ETAG) == (5, 1024)
    assert http.byte_range(_request({"Range": "bytes=5-", "If-Range": '"other"'}), 1024, ETAG) is None


def _client() -> TestClient:
    async def thing(request: Request):
        return http.immutable_response(DATA, DIGEST, "application/octet-stream", request)

    async def control(request: Request):
        return http.json_response({"ok": True})

    app = Starlette(routes=[Route("/thing", thing), Route("/control", control)])
    return TestClient(http.NoStoreByDefault(app))


def test_an_immutable_object_answers_as_a_cache_expects():
    client = _client()
    whole = client.get("/thing")
    assert whole.status_code == 200 and whole.content == DATA
    assert whole.headers["Cache-Control"] == IMMUTABLE == "public, max-age=31536000, immutable"
    assert whole.headers["ETag"] == ETAG and whole.headers["Accept-Ranges"] == "bytes"
    assert whole.headers["X-Icbd-Digest"] == DIGEST
    part = client.get("/thing", headers={"Range": "bytes=1000-"})
    assert part.status_code == 206 and part.content == DATA[1000:]
    assert part.headers["Content-Range"] == "bytes 1000-1023/1024" and part.headers["ETag"] == ETAG
    assert part.headers["Cache-Control"] == IMMUTABLE
    beyond = client.get("/thing", headers={"Range": "bytes=2000-"})
    assert beyond.status_code == 416 and beyond.headers["Content-Range"] == "bytes */1024"
    same = client.get("/thing", headers={"If-None-Match": f'"x", {ETAG}'})
    assert same.status_code == 304 and same.content == b"" and same.headers["ETag"] == ETAG
    assert client.get("/thing", headers={"If-None-Match": '"other"'}).status_code == 200


def test_everything_else_says_no_store():
    client = _client()
    assert client.get("/control").headers["Cache-Control"] == "no-store"
    assert client.get("/missing").headers["Cache-Control"] == "no-store"  # errors too


# --- the nodes ------------------------------------------------------------------------------------


def _get(url: str, token: str = TOKEN, **headers) -> requests.Response:
    return requests.get(url, headers={"Authorization": f"Bearer {token}", **headers}, timeout=30)


def _object_checks(url: str, token: str, size: int | None = None) -> bytes:
    """The object at `url`: immutable, ranged, conditional; its bytes."""
    whole = _get(url, token)
    assert whole.status_code == 200, (url, whole.status_code, whole.text[:200])
    etag = whole.headers["ETag"]
    assert whole.headers["Cache-Control"] == IMMUTABLE and whole.headers["Accept-Ranges"] == "bytes", url
    assert etag == f'"{url.rsplit("/", 1)[1].split("?")[0]}"', (url, etag)  # strong, and the object's name
    if size is not None:
        assert len(whole.content) == size
    part = _get(url, token, Range="bytes=3-")
    assert part.status_code == 206 and part.content == whole.content[3:], url
    assert part.headers["Content-Range"] == f"bytes 3-{len(whole.content) - 1}/{len(whole.content)}"
    assert _get(url, token, **{"If-None-Match": etag}).status_code == 304
    assert _get(url, token, Range=f"bytes={len(whole.content)}-").status_code == 416
    return whole.content


@pytest.mark.btrfs
def test_every_object_of_every_node_is_immutable_and_every_control_call_says_no_store(cluster, tmp_path):
    master = cluster.master()
    r1 = cluster.replica("r1")
    cache = cluster.cache("c1")
    tree = make_tree(tmp_path / "tree", big=5 * MIB + 3)
    cluster.icbd("imi", "create", "demo", "--from", str(tree))
    record = cluster.api("POST", "/v1/imis/demo/versions", json={}).json()
    cluster.icbd("subscribe", "demo", "--node", "r1")
    cluster.wait_held(r1, "demo", [1], timeout=60)
    manifest = cluster.api("GET", "/v1/imis/demo/versions/1/manifest").json()
    block = next(e["chunks"][0] for e in manifest["entries"] if e.get("chunks"))
    reader, node = cluster.token("reader"), cluster.token("node")
    assert cluster.api("PUT", "/v1/imis/demo/versions/1/profile", json={"digests": [block]}).status_code == 201
    wait_for(lambda: _get(cache.url + "/v1/imis", reader).json()["imis"], what="the cache's catalogue")

    # Objects, from every node that serves them, the same bytes whoever asks.
    for where in (master, r1, cache):
        got = _object_checks(f"{where.url}/v1/blocks/{block}", reader)
        assert content_digest(got) == block and got == _get(f"{where.url}/v1/blocks/{block}", node).content
        assert content_digest(_object_checks(f"{where.url}/v1/manifests/{record['digest']}", reader)) == \
            record["digest"]
        assert _get(f"{where.url}/v1/blocks/{block}?imi=demo&version=1", reader).headers["ETag"] == f'"{block}"'
    by_version = _get(f"{cache.url}/v1/imis/demo/versions/1/profile", reader)
    assert by_version.headers["Cache-Control"] == "no-cache"  # what the name maps to now: ask again
    profile_url = by_version.headers["Content-Location"]
    assert profile_url == "/v1/profiles/" + content_digest(by_version.content)
    for where in (master, cache):
        assert _object_checks(where.url + profile_url, reader) == by_version.content
    stream = _get(f"{master.url}/v1/imis/demo/versions/1/stream/digest", node, **{"X-Icbd-Node": "r1"}).json()
    data = _object_checks(f"{master.url}/v1/streams/{stream['digest']}", node, stream["bytes"])
    assert _get(f"{master.url}/v1/streams/{stream['digest']}", node, Range="bytes=4194000-4194999").content == \
        data[4194000:4195000]  # across two pieces
    assert _get(f"{master.url}/v1/streams/{stream['digest']}", reader).status_code == 403  # streams: nodes
    assert _get(f"{master.url}/v1/streams/{'0' * 64}", node).status_code == 404

    # Control calls and errors: never kept by a shared cache.
    heartbeat = requests.post(f"{master.url}/v1/nodes/r1/heartbeat", json={},
                              headers={"Authorization": f"Bearer {node}"}, timeout=10)
    answers = [
        requests.get(master.url + "/", timeout=10), _get(master.url + "/v1/imis", reader),
        _get(master.url + "/v1/nodes", reader), heartbeat,
        _get(f"{master.url}/v1/imis/demo/versions/1/stream/digest", node, **{"X-Icbd-Node": "r1"}),
        _get(master.url + "/v1/imis/demo/versions/1/stream", node, **{"X-Icbd-Node": "r1"}),  # after its redirect
        _get(r1.url + "/v1/imis", reader), requests.get(r1.url + "/", timeout=10),
        _get(cache.url + "/v1/imis", reader), _get(cache.url + "/v1/key", reader),
        _get(master.url + "/v1/auth", reader), requests.get(master.url + "/v1/imis", timeout=10),
        _get(f"{r1.url}/v1/blocks/{'0' * 64}", reader),
    ]
    for answer in answers:
        if answer.history:  # a redirect: the redirect itself must not be cached either
            assert all(r.headers["Cache-Control"] == "no-store" for r in answer.history)
            continue
        assert answer.headers.get("Cache-Control") == "no-store", (answer.url, answer.status_code, answer.headers)


@pytest.mark.btrfs
def test_an_expired_spool_is_made_again_byte_for_byte(cluster, tmp_path):
    """The master keeps a stream's spool one second here (--spool-ttl 1):
    a replica that asks later gets the stream made again by `btrfs send`,
    checked piece by piece against the record the master signed the first
    time, under the same name, and the same bytes."""
    master = cluster.master(extra=["--spool-ttl", "1"])
    r1 = cluster.replica("r1")
    tree = make_tree(tmp_path / "tree", big=9 * MIB + 1)
    cluster.icbd("imi", "create", "demo", "--from", str(tree))
    cluster.icbd("imi", "publish", "demo")
    (master.data / "work" / "demo" / "big.bin").write_bytes(b"two" * MIB)
    cluster.icbd("imi", "publish", "demo")
    cluster.icbd("subscribe", "demo", "--node", "r1")
    cluster.wait_held(r1, "demo", [1, 2], timeout=60)
    spools = master.data / "streams" / "demo"
    wait_for(lambda: not list(spools.glob("*.stream")), timeout=30, what="the spools to expire")
    records = {p.name: p.read_bytes() for p in spools.glob("*.json")}
    assert sorted(records) == ["1-full.json", "2-from-1.json"]
    node = cluster.token("node")
    for version, parent in ((1, None), (2, 1)):
        query = f"?parent={parent}" if parent else ""
        record = _get(f"{master.url}/v1/imis/demo/versions/{version}/stream/digest{query}", node,
                      **{"X-Icbd-Node": "r1"}).json()
        again = _get(f"{master.url}/v1/streams/{record['digest']}", node)
        assert again.status_code == 200 and len(again.content) == record["bytes"]
        pieces = [content_digest(again.content[i:i + (4 << 20)]) for i in range(0, record["bytes"], 4 << 20)]
        assert pieces == record["pieces"]
    status = master.status()
    assert status["streams"] == {"records": 2, "made_again": 2, "withdrawn": 0}
    assert {p.name: p.read_bytes() for p in spools.glob("*.json")} == records  # no record was made anew
    # A new replica gets both versions from the streams made again.
    time.sleep(1.5)
    r2 = cluster.replica("r2")
    cluster.icbd("subscribe", "demo", "--node", "r2")
    cluster.wait_held(r2, "demo", [1, 2], timeout=60)
    assert describe(r2.data / "imis" / "demo" / "2") == describe(master.data / "imis" / "demo" / "2")
