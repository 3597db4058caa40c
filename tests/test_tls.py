"""TLS on every hop: nodes serve https only when given a certificate, every
client verifies against --ca (or the system's trust store), and a man in the
middle with another CA's certificate gets nothing, from the command line, a
cache server, a replica or a mount.

The first tests run as any user (an in-process server, the command line and
a cache server need no root); the cluster tests are marked btrfs (and fuse).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import requests
import trio
import trustme
import urllib3
from mitm import Mitm
from trees import describe, make_tree

from harness.cluster import ICBD, REPO, TOKEN, Cluster, free_port, wait_for
from icbdcore import http
from icbdcore.clients import Credentials, async_client, pool, session, tls_failure
from icbdcore.errors import CliError

# --- clients against one https server (any user) -------------------------------------------------


@pytest.fixture
def authority(tmp_path):
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "node.pem", tmp_path / "node.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    return {"ca": str(tmp_path / "ca.pem"), "other": str(tmp_path / "other-ca.pem"), "cert": str(cert),
            "key": str(key)}


async def _serve_https(nursery, authority) -> str:
    async def status(request):
        return http.json_response({"ok": True})

    app = http.build_app([http.Endpoint("GET", "/", status, http.OPEN)], _no_tokens())
    tls = http.ServerTls.from_options(authority["cert"], authority["key"])
    port = free_port()
    shutdown = trio.Event()
    await nursery.start(lambda task_status: http.serve(app, f"127.0.0.1:{port}", shutdown, tls=tls,
                                                       task_status=task_status))
    assert http.url_for_listen(f"127.0.0.1:{port}", tls) == f"https://127.0.0.1:{port}"
    return f"https://127.0.0.1:{port}"


def _no_tokens():
    from icbdcore.auth import TokenTable

    return TokenTable()


async def test_every_client_verifies_against_the_ca_it_is_given(nursery, authority):
    url = await _serve_https(nursery, authority)

    def blocking(ca: str | None) -> tuple[int, int]:
        credentials = Credentials("t" * 20, ca=ca)
        with session(credentials) as s:
            first = s.get(url + "/", timeout=5).status_code
        manager = pool(credentials, maxsize=1)
        second = manager.request("GET", url + "/", timeout=5).status
        manager.clear()
        return first, second

    async with async_client(Credentials("t" * 20, ca=authority["ca"]), url) as client:
        assert (await client.get("/")).status_code == 200
    assert await trio.to_thread.run_sync(blocking, authority["ca"]) == (200, 200)

    for ca in (authority["other"], None):  # another CA, and the system's trust store
        async with async_client(Credentials("t" * 20, ca=ca), url) as client:
            with pytest.raises(httpx.ConnectError) as refused:
                await client.get("/")
        assert "not trusted" in tls_failure(refused.value)
        with pytest.raises(requests.exceptions.SSLError):
            await trio.to_thread.run_sync(blocking, ca)
        with pytest.raises(urllib3.exceptions.SSLError) as refused_bulk:
            manager = pool(Credentials("t" * 20, ca=ca), maxsize=1)
            await trio.to_thread.run_sync(lambda manager=manager: manager.request("GET", url + "/", timeout=5))
        assert "not trusted" in tls_failure(refused_bulk.value)

    # https only: a plain-http client gets no answer from the node.
    plain = url.replace("https://", "http://")
    with pytest.raises(requests.exceptions.ConnectionError):
        await trio.to_thread.run_sync(lambda: requests.get(plain + "/", timeout=5))


def test_bad_tls_files_are_one_line_errors(tmp_path, authority):
    for cert, key, words in [(authority["cert"], None, "both"), (None, authority["key"], "both"),
                             (str(tmp_path / "missing.pem"), authority["key"], "cannot read"),
                             (authority["key"], authority["key"], "not a PEM")]:
        with pytest.raises(CliError, match=words):
            http.ServerTls.from_options(cert, key)
    with pytest.raises(CliError, match="CA file"):
        Credentials("t", ca=str(tmp_path / "missing.pem")).ssl_context()
    with pytest.raises(CliError, match="no PEM CA"):
        Credentials("t", ca=authority["key"]).ssl_context()


# --- a man in the middle (any user: the command line and a cache server) ----------------------------


def _env(ca: str) -> dict:
    env = {**os.environ, "ICBD_CA": ca, "ICBD_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("ICBD_MASTER", None)
    return env


def test_a_man_in_the_middle_gets_nothing_from_the_cli_or_a_cache_server(tmp_path, authority):
    with Mitm(tmp_path / "mitm") as mitm:
        result = subprocess.run([*ICBD, "--master", mitm.url, "imi", "list"], capture_output=True, text=True,
                                env=_env(authority["ca"]), cwd=REPO, timeout=60)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert "TLS" in result.stderr and "not trusted" in result.stderr and "--ca" in result.stderr
        # Without --ca, the system's trust store does not know the man in the middle either.
        env = _env(authority["ca"])
        env.pop("ICBD_CA")
        result = subprocess.run([*ICBD, "--master", mitm.url, "status"], capture_output=True, text=True,
                                env=env, cwd=REPO, timeout=60)
        assert result.returncode == 1 and "not trusted" in result.stderr

        log = tmp_path / "cache.log"
        with open(log, "wb") as out:
            cache = subprocess.Popen([*ICBD, "cache", "--data", str(tmp_path / "cache"),
                                      "--listen", f"127.0.0.1:{free_port()}", "--master", mitm.url, "--site", "a",
                                      "--heartbeat", "0.5"], env=_env(authority["ca"]), cwd=REPO,
                                     stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "not trusted" in log.read_text(), timeout=30, what="the cache to refuse the master")
        finally:
            cache.terminate()
            cache.wait(15)
        assert mitm.connections >= 3
        assert mitm.handshakes == 0 and mitm.received == b""
        assert TOKEN not in log.read_text()


# --- a cluster over TLS (root: btrfs, fuse) ------------------------------------------------------------


@pytest.fixture
def tls_cluster(tmp_path):
    cluster = Cluster(tmp_path, tls=True)
    try:
        yield cluster
    finally:
        cluster.stop_all()


@pytest.mark.btrfs
@pytest.mark.fuse
def test_publish_replicate_cache_and_read_over_tls(tls_cluster, tmp_path):
    cluster = tls_cluster
    master = cluster.master()
    r1 = cluster.replica("r1")
    tree = make_tree(tmp_path / "tree", big=5 << 20)
    cluster.icbd("imi", "create", "demo", "--from", str(tree))
    cluster.icbd("imi", "publish", "demo")
    cluster.icbd("subscribe", "demo", "--node", "r1")
    cluster.wait_held(r1, "demo", [1])
    (Path(cluster.icbd("imi", "path", "demo").stdout.strip()) / "etc" / "hostname").write_text("desktop-2\n")
    cluster.icbd("imi", "publish", "demo")
    cluster.wait_held(r1, "demo", [1, 2])
    assert r1.status()["transfers"][-1]["parent"] == 1  # a delta, over https
    nodes = cluster.icbd_json("status")["nodes"]
    assert {n["id"]: n["url"].split(":")[0] for n in nodes} == {"master": "https", "r1": "https"}

    cache = cluster.cache("cache")
    mount = cluster.mount("mnt", cache=cache)
    assert describe(mount.mountpoint / "demo" / "1") == describe(tree)
    assert (mount.mountpoint / "demo" / "latest" / "etc" / "hostname").read_text() == "desktop-2\n"
    embedded = cluster.mount("embedded", cache_dir=tmp_path / "embedded-cache", site="a")
    assert describe(embedded.mountpoint / "demo" / "1") == describe(tree)
    staged = cluster.icbd_json("prefetch", "demo@1", "--cache", cache.url)
    assert staged["state"] == "done"

    # https only: plain http to any node gets no answer.
    for node in (master, r1, cache):
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(node.url.replace("https://", "http://") + "/", timeout=5)


@pytest.mark.btrfs
@pytest.mark.fuse
def test_a_man_in_the_middle_gets_nothing_from_a_replica_or_a_mount(tls_cluster, tmp_path):
    cluster = tls_cluster
    cluster.master()
    cluster.icbd("imi", "create", "demo", "--from", str(make_tree(tmp_path / "tree", big=4096)))
    cluster.icbd("imi", "publish", "demo")
    with Mitm(tmp_path / "mitm") as mitm:
        # A replica told the man in the middle is its master.
        r1 = cluster.replica("r1", start=False)
        r1.argv[r1.argv.index("--master") + 1] = mitm.url
        r1.start()
        log = cluster.root / "r1.log"
        wait_for(lambda: "not trusted" in log.read_text(), timeout=30, what="the replica to refuse the master")
        assert "r1" not in cluster.nodes_status()

        # A mount told the man in the middle is its cache server: one line, exit 1
        # (its log, which in the foreground would go to stderr too, in --log).
        mountpoint = tmp_path / "mnt"
        mountpoint.mkdir()
        env = {**cluster.env, "ICBD_TOKEN": cluster.token("reader")}
        result = subprocess.run([*ICBD, "mount", str(mountpoint), "--foreground", "--cache", mitm.url,
                                 "--cache-dir", str(tmp_path / "mnt-state"), "--log", str(tmp_path / "mnt.log"),
                                 "--timeout", "3"], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("icbd: ") and "not trusted" in result.stderr

        # A cache server whose upstream replica is the man in the middle (kept
        # alive at the master by heartbeats from here).
        spy = {"id": "evil", "role": "replica", "site": "a", "url": mitm.url}
        as_node = {"Authorization": f"Bearer {cluster.token('node')}"}
        assert cluster.api("POST", "/v1/nodes", json=spy, headers=as_node).status_code == 201
        beating = threading.Event()

        def heartbeats():
            while not beating.wait(0.3):
                cluster.api("POST", "/v1/nodes/evil/heartbeat", json={}, headers=as_node)

        thread = threading.Thread(target=heartbeats, daemon=True)
        thread.start()
        try:
            cache = cluster.cache("cache")

            def tried() -> bool:
                upstreams = {u["id"]: u for u in cache.status()["fetcher"]["upstreams"]}
                return "evil" in upstreams and upstreams["evil"]["errors"] > 0

            wait_for(tried, timeout=30, what="the cache to try the evil upstream and fail")
        finally:
            beating.set()
            thread.join(5)
        assert mitm.connections >= 3
        assert mitm.handshakes == 0 and mitm.received == b""
    for name in ("r1", "cache"):
        assert TOKEN not in (cluster.root / f"{name}.log").read_text()
    json.dumps(cluster.nodes_status())  # the master is unharmed
