"""Stock HTTP caches between icbd's tiers: Debian's nginx, started here with
the configs shipped in contrib/nginx/ (harness/nginx.py rewrites only their
marked lines: addresses, ports, paths).

- nginx in front of the master (a replica's --master): a second replica
  behind it gets each new version with no extra byte from the master,
  counted on the master's own network link (sites in network namespaces);
- nginx in front of a replica (its --advertise, and a cache server's
  --upstream): a second cache server behind it fills with no extra byte
  from the replica;
- a stream cut off between a replica and nginx resumes with a plain Range,
  from what nginx holds;
- an nginx that serves a damaged object is caught (a stream's piece, a
  block) and failed over, never trusted;
- reader credentials through nginx (auth_request to GET /v1/auth): a cached
  object is never served to a request without a token the node admits, or
  without the role the route needs;
- several cache servers behind one nginx name (hash $uri consistent): a
  mount given that one URL works as over one cache server.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import requests
from cluster_teardown import stop_and_remove
from faultproxy import FaultProxy
from trees import describe, make_tree

from harness.cluster import TOKEN, Cluster, Node, free_port, wait_for
from harness.data import write_image
from harness.netns import sites
from harness.nginx import Nginx, available
from icbdcore.manifest import Manifest
from icbdcore.wire import block_path, manifest_object_path

MIB = 1 << 20

pytestmark = [
    pytest.mark.btrfs,
    pytest.mark.skipif(not available(), reason="needs nginx (scripts/install-packages, make setup)"),
]


def _through(node: Node, url: str) -> Node:
    """Point a not yet started replica's --master at `url`."""
    node.argv[node.argv.index("--master") + 1] = url
    return node


def _stream_bytes(master: Node) -> int:
    return master.status()["served"]["stream_bytes"]


def _published_stream(master: Node, name: str, version: int) -> dict:
    """The master's spool of `version` (made at publish), once complete."""
    def done():
        found = [t for t in master.status()["transfers"]
                 if t["imi"] == name and t["version"] == version and t["state"] == "done"]
        return found[-1] if found else None

    return wait_for(done, timeout=60, what=f"the master to make the stream of {name} v{version}")


def _headers(token: str = TOKEN, **more) -> dict:
    return {"Authorization": f"Bearer {token}", **more}


# --- in front of the master -----------------------------------------------------------------------


@pytest.mark.netns
def test_replicas_behind_one_nginx_cost_the_master_one_stream_per_version(tmp_path):
    """The master in site "central"; an nginx and two replicas in site "a",
    the replicas' --master being the nginx. Every version reaches both,
    and the master's link carries each stream once (plus control calls)."""
    cluster = Cluster(tmp_path)
    proxy = None
    try:
        with sites("central", "a") as net:
            central, site = net["central"], net["a"]
            master = central.adopt(cluster.master(host=central.ip, start=False)).start()
            cluster.learn_master_key()
            proxy = Nginx(tmp_path / "nginx", "icbd-master-cache.conf", upstreams=[master.url], port=free_port(),
                          host=site.ip, wrap=site.command).start()
            replicas = [site.adopt(_through(cluster.replica(name, site="a", host=site.ip, start=False), proxy.url))
                        .start() for name in ("r1", "r2")]
            tree = make_tree(tmp_path / "tree", big=24 * MIB + 5)
            cluster.icbd("imi", "create", "demo", "--from", str(tree))
            cluster.icbd("imi", "publish", "demo")
            streams = [_published_stream(master, "demo", 1)]
            before, served = net.counters("central"), _stream_bytes(master)
            for replica in replicas:  # one after the other: the second finds it all cached
                cluster.icbd("subscribe", "demo", "--node", replica.id)
                cluster.wait_held(replica, "demo", [1], timeout=60)
            (master.data / "work" / "demo" / "big.bin").write_bytes(b"changed" * MIB)
            cluster.icbd("imi", "publish", "demo")
            streams.append(_published_stream(master, "demo", 2))
            for replica in replicas:  # both at once, as after a publish
                cluster.wait_held(replica, "demo", [1, 2], timeout=60)
            link = net.counters("central") - before
            sent = _stream_bytes(master) - served
            total = sum(s["bytes"] for s in streams)
            print(f"\nstreams {[s['bytes'] for s in streams]}: the master sent {sent} stream bytes, "
                  f"its link {link.sent} bytes, to {len(replicas)} replicas")
            assert sent == total  # each stream once, every 4 MiB slice once
            assert link.sent < 1.05 * total + MIB  # the rest is control calls: heartbeats, records
            for replica in replicas:
                done = [t for t in replica.status()["transfers"] if t["state"] == "done"]
                assert [(t["version"], t["parent"]) for t in done] == [(1, None), (2, 1)]
                assert describe(replica.data / "imis" / "demo" / "2") == \
                    describe(master.data / "imis" / "demo" / "2")
            hits = [line for line in proxy.log_lines() if "/v1/streams/" in line and "cache=HIT" in line]
            assert hits, "the second replica's stream came from nginx's cache"
            proxy.stop()
            cluster.stop_all()  # before the namespaces go
    finally:
        if proxy:
            proxy.stop()
        stop_and_remove(cluster, tmp_path)


def test_a_stream_cut_off_between_replica_and_nginx_resumes_from_nginx(tmp_path):
    """replica -> (a link that fails) -> nginx -> master. The link is cut in
    the middle of a stream; the replica asks again with `Range: bytes=N-`
    from its last checked piece, nginx answers 206 from the slices it
    holds, and the master sends no byte twice."""
    cluster = Cluster(tmp_path)
    proxy = link = None
    try:
        master = cluster.master()
        proxy = Nginx(tmp_path / "nginx", "icbd-master-cache.conf", upstreams=[master.url], port=free_port()).start()
        link = FaultProxy(proxy.port)
        r1 = _through(cluster.replica("r1", start=False), link.url).start()
        source = tmp_path / "tree"
        source.mkdir()
        write_image(source / "disk.img", 40 * MIB)
        cluster.icbd("imi", "create", "demo", "--from", str(source))
        cluster.icbd("imi", "publish", "demo")
        stream = _published_stream(master, "demo", 1)
        link.arm(hold_stream_at=18 * MIB)
        cluster.icbd("subscribe", "demo", "--node", "r1")
        assert link.stream_held.wait(60), "the stream never reached 18 MiB"
        link.hold_stream_at = None
        link.cut()  # the link fails: the connection to nginx breaks mid-stream
        status = cluster.wait_held(r1, "demo", [1], timeout=60)
        done = [t for t in status["transfers"] if t["state"] == "done"]
        assert len(done) == 1 and [t["state"] for t in status["transfers"]] == ["done"], status["transfers"]
        assert describe(r1.data / "imis" / "demo" / "1") == describe(source)
        ranges = [line for line in proxy.log_lines() if "/v1/streams/" in line and 'range="bytes=' in line]
        assert ranges and " 206 " in ranges[-1], proxy.log_lines()[-5:]
        resumed_at = int(re.search(r'range="bytes=(\d+)-"', ranges[-1]).group(1))
        assert 8 * MIB <= resumed_at <= 18 * MIB and resumed_at % (4 * MIB) == 0  # from its last good piece
        assert "asking again from byte" in r1.log.read_text()
        assert _stream_bytes(master) == stream["bytes"]  # nothing sent twice by the master
    finally:
        if link:
            link.close()
        if proxy:
            proxy.stop()
        stop_and_remove(cluster, tmp_path)


def test_an_nginx_serving_a_damaged_stream_slice_is_caught_and_bypassed(tmp_path):
    """nginx's cached copy of a stream slice is damaged on its disk. The
    next replica behind it finds the piece does not match the signed
    record before `btrfs receive` sees it, and takes the rest of the stream
    from the master's own URL (from the master's node list)."""
    cluster = Cluster(tmp_path)
    proxy = None
    try:
        master = cluster.master()
        proxy = Nginx(tmp_path / "nginx", "icbd-master-cache.conf", upstreams=[master.url], port=free_port()).start()
        r1 = _through(cluster.replica("r1", start=False), proxy.url).start()
        r2 = _through(cluster.replica("r2", start=False), proxy.url).start()
        tree = make_tree(tmp_path / "tree", big=20 * MIB + 3)
        cluster.icbd("imi", "create", "demo", "--from", str(tree))
        cluster.icbd("imi", "publish", "demo")
        stream = _published_stream(master, "demo", 1)
        cluster.icbd("subscribe", "demo", "--node", "r1")
        cluster.wait_held(r1, "demo", [1], timeout=60)
        slice_file = proxy.cache_file(f"/v1/streams/{stream['digest']}bytes=8388608-12582911")
        data = bytearray(slice_file.read_bytes())
        data[-1000] ^= 0x40  # a byte of the body (the file ends with it)
        slice_file.write_bytes(bytes(data))
        served = _stream_bytes(master)
        cluster.icbd("subscribe", "demo", "--node", "r2")
        status = cluster.wait_held(r2, "demo", [1], timeout=60)
        transfer = [t for t in status["transfers"] if t["state"] == "done"][-1]
        assert transfer["sources"] == [proxy.url, master.url], transfer
        assert "sent piece 2 of stream" in r2.log.read_text()
        assert describe(r2.data / "imis" / "demo" / "1") == describe(tree)
        # The master sent only what follows the last good piece.
        assert _stream_bytes(master) - served == stream["bytes"] - 8 * MIB
    finally:
        if proxy:
            proxy.stop()
        stop_and_remove(cluster, tmp_path)


# --- in front of a replica -------------------------------------------------------------------------


def _version_blocks(cluster: Cluster, name: str, version: int) -> tuple[list[str], int]:
    manifest = Manifest.from_bytes(cluster.api("GET", f"/v1/imis/{name}/versions/{version}/manifest").content)
    sizes = manifest.block_sizes()
    return sorted(sizes), sum(sizes.values())


def _prefetch(cluster: Cluster, cache: Node, name: str, version: int) -> dict:
    job = cluster.api("POST", "/v1/prefetch", node=cache, json={"imi": name, "version": version}).json()
    return wait_for(lambda: (lambda j: j if j["state"] != "running" else None)(
        cluster.api("GET", f"/v1/prefetch/{job['id']}", node=cache).json()), timeout=120,
        what=f"{cache.id} to prefetch {name} v{version}")


def test_cache_servers_behind_one_nginx_cost_the_replica_one_copy(tmp_path):
    """nginx in front of the replica, which advertises the nginx's URL: the
    master lists the replica there, so cache servers reach it through nginx
    (and the master's notify reaches the replica through it too). A second
    cache server, given the nginx as --upstream as well, fills with no byte
    from the replica."""
    cluster = Cluster(tmp_path)
    proxy = None
    try:
        master = cluster.master()
        r1 = cluster.replica("r1", start=False)
        proxy = Nginx(tmp_path / "nginx", "icbd-replica-cache.conf", upstreams=[r1.url], port=free_port())
        r1.argv += ["--advertise", proxy.url]
        r1.start()
        proxy.start()
        tree = make_tree(tmp_path / "tree", big=12 * MIB + 9)
        cluster.icbd("imi", "create", "demo", "--from", str(tree))
        cluster.icbd("imi", "publish", "demo")
        cluster.icbd("subscribe", "demo", "--node", "r1")
        cluster.wait_held(r1, "demo", [1], timeout=60)
        assert cluster.nodes_status()["r1"]["url"] == proxy.url
        digests, working_set = _version_blocks(cluster, "demo", 1)
        c1 = cluster.cache("c1")
        c2 = cluster.cache("c2", extra=["--upstream", proxy.url])
        before = r1.status()["served"]["bytes"]
        for cache in (c1, c2):
            job = _prefetch(cluster, cache, "demo", 1)
            assert job["state"] == "done" and job["fetched"] == len(digests), job
        egress = r1.status()["served"]["bytes"] - before
        print(f"\nworking set {working_set} bytes; the replica served {egress} to two cache servers")
        assert egress == working_set
        ups = {u["id"]: u for u in c2.status()["fetcher"]["upstreams"]}
        assert ups[proxy.url]["role"] == "static" and ups[proxy.url]["bytes"] >= working_set  # and the manifest
        # nginx refused the batches (not objects it could keep): each block came alone, and was kept.
        assert ups[proxy.url]["batches"] is False
        # The version reaches every mount's eyes: a block read through c2 is the replica's.
        block = requests.get(c2.url + block_path(digests[0]), headers=_headers(cluster.token("reader")), timeout=10)
        assert block.status_code == 200 and block.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        # A new version: the master's notify goes through nginx (a POST, passed on).
        (master.data / "work" / "demo" / "etc" / "hostname").write_text("two\n")
        cluster.icbd("imi", "publish", "demo")
        cluster.wait_held(r1, "demo", [1, 2], timeout=60)
        assert any('"POST /v1/notify' in line for line in proxy.log_lines())
        assert "could not notify" not in (cluster.root / "master.log").read_text()
    finally:
        if proxy:
            proxy.stop()
        stop_and_remove(cluster, tmp_path)


def test_an_nginx_serving_a_damaged_block_is_caught_and_failed_over(tmp_path):
    cluster = Cluster(tmp_path)
    proxy = None
    try:
        cluster.master()
        r1 = cluster.replica("r1")
        proxy = Nginx(tmp_path / "nginx", "icbd-replica-cache.conf", upstreams=[r1.url], port=free_port()).start()
        tree = make_tree(tmp_path / "tree", big=3 * MIB)
        cluster.icbd("imi", "create", "demo", "--from", str(tree))
        cluster.icbd("imi", "publish", "demo")
        cluster.icbd("subscribe", "demo", "--node", "r1")
        cluster.wait_held(r1, "demo", [1], timeout=60)
        digests, _ = _version_blocks(cluster, "demo", 1)
        reader = _headers(cluster.token("reader"))
        for digest in digests:  # nginx fills its cache from the replica
            assert requests.get(proxy.url + block_path(digest), headers=reader, timeout=10).status_code == 200
        victim = max(digests, key=lambda d: proxy.cache_file(f"/v1/blocks/{d}").stat().st_size)
        path = proxy.cache_file(f"/v1/blocks/{victim}")
        data = bytearray(path.read_bytes())
        data[-7] ^= 0x01
        path.write_bytes(bytes(data))
        damaged = requests.get(proxy.url + block_path(victim), headers=reader, timeout=10)
        assert damaged.status_code == 200 and "HIT" in str(proxy.log_lines()[-1])  # nginx serves it as is
        cache = cluster.cache("c1", extra=["--upstream", proxy.url])
        got = requests.get(cache.url + block_path(victim, "demo", 1), headers=reader, timeout=30)
        assert got.status_code == 200 and got.content != damaged.content
        ups = {u["id"]: u for u in cache.status()["fetcher"]["upstreams"]}
        assert ups[proxy.url]["corrupt"] == 1 and ups[proxy.url]["backoff_s"] > 0
        assert ups["r1"]["requests"] >= 1  # the block came from the replica itself
    finally:
        if proxy:
            proxy.stop()
        stop_and_remove(cluster, tmp_path)


# --- credentials ------------------------------------------------------------------------------------


def test_reader_credentials_through_nginx_auth_request(tmp_path):
    """nginx asks the node behind it (GET /v1/auth?role=...) before it serves
    anything, cached or not: no token or an unknown one is 401, a reader
    token reads blocks and manifests but not streams (403), a node token
    reads streams."""
    cluster = Cluster(tmp_path)
    proxies: list[Nginx] = []
    try:
        master = cluster.master()
        r1 = cluster.replica("r1")
        at_master = Nginx(tmp_path / "nginx-m", "icbd-master-cache.conf", upstreams=[master.url], port=free_port())
        at_replica = Nginx(tmp_path / "nginx-r", "icbd-replica-cache.conf", upstreams=[r1.url], port=free_port())
        proxies += [at_master.start(), at_replica.start()]
        tree = make_tree(tmp_path / "tree", big=2 * MIB)
        cluster.icbd("imi", "create", "demo", "--from", str(tree))
        record = cluster.api("POST", "/v1/imis/demo/versions", json={}).json()
        cluster.icbd("subscribe", "demo", "--node", "r1")
        cluster.wait_held(r1, "demo", [1], timeout=60)
        stream = _published_stream(master, "demo", 1)
        reader, node = _headers(cluster.token("reader")), _headers(cluster.token("node"), **{"X-Icbd-Node": "r1"})
        block = block_path(_version_blocks(cluster, "demo", 1)[0][0])
        manifest = manifest_object_path(record["digest"])
        stream_url = at_master.url + f"/v1/streams/{stream['digest']}"
        for proxy in proxies:
            for path in (block, manifest):
                assert requests.get(proxy.url + path, headers=reader, timeout=10).status_code == 200  # now cached
                assert requests.get(proxy.url + path, timeout=10).status_code == 401
                assert requests.get(proxy.url + path, headers=_headers("x" * 43), timeout=10).status_code == 401
                again = requests.get(proxy.url + path, headers=reader, timeout=10)
                assert again.status_code == 200 and "cache=HIT" in proxy.log_lines()[-1]
        assert requests.get(stream_url, headers=reader, timeout=10).status_code == 403
        whole = requests.get(stream_url, headers=node, timeout=30)
        assert whole.status_code == 200 and len(whole.content) == stream["bytes"]
        assert requests.get(stream_url, timeout=10).status_code == 401
        # The check itself, as nginx makes it:
        auth = master.url + "/v1/auth"
        assert requests.get(auth, params={"role": "node"}, headers=reader, timeout=5).status_code == 403
        assert requests.get(auth, params={"role": "reader"}, headers=reader, timeout=5).json()["role"] == "reader"
        assert requests.get(auth, params={"role": "boss"}, headers=reader, timeout=5).status_code == 400
    finally:
        for proxy in proxies:
            proxy.stop()
        stop_and_remove(cluster, tmp_path)


# --- several cache servers behind one name --------------------------------------------------------------


@pytest.mark.fuse
def test_a_mount_over_several_cache_servers_behind_one_nginx_name(tmp_path):
    cluster = Cluster(tmp_path)
    proxy = None
    try:
        cluster.master()
        r1 = cluster.replica("r1")
        caches = [cluster.cache(f"c{i}") for i in (1, 2)]
        proxy = Nginx(tmp_path / "nginx", "icbd-cache-servers.conf", upstreams=[c.url for c in caches],
                      port=free_port()).start()
        tree = make_tree(tmp_path / "tree", big=16 * MIB + 1)
        cluster.icbd("imi", "create", "demo", "--from", str(tree))
        cluster.icbd("imi", "publish", "demo")
        cluster.icbd("subscribe", "demo", "--node", "r1")
        cluster.wait_held(r1, "demo", [1], timeout=60)
        balanced = Node("cache", [], tmp_path, proxy.port, tmp_path / "none.log", {}, id="nginx")
        mount = cluster.mount("mnt", cache=balanced, extra=["--no-profiles"])
        wait_for(lambda: (mount.mountpoint / "demo" / "1" / "big.bin").exists(), timeout=30,
                 what="the mount to show demo v1 (the cache servers poll the catalogue every 2 s)")
        assert describe(mount.mountpoint / "demo" / "1") == describe(tree)
        assert (mount.mountpoint / "demo" / "1" / "big.bin").read_bytes() == (tree / "big.bin").read_bytes()
        served = [c.status()["fetcher"]["gets"] for c in caches]
        assert all(n > 0 for n in served), served  # each cache server had its share
        digests, working_set = _version_blocks(cluster, "demo", 1)
        assert r1.status()["served"]["bytes"] <= working_set  # no block filled twice
    finally:
        if proxy:
            proxy.stop()
        with contextlib.suppress(Exception):
            cluster.stop_all()
        stop_and_remove(cluster, tmp_path)


def test_contrib_configs_parse(tmp_path):
    """Every shipped nginx config passes `nginx -t` as rendered for a site."""
    for config in sorted(p.name for p in (Path(__file__).parent.parent / "contrib" / "nginx").glob("icbd-*.conf")):
        if config == "icbd-common.conf":
            continue
        Nginx(tmp_path / config, config, upstreams=["http://127.0.0.1:1", "http://127.0.0.1:2"],
              port=free_port()).check()
