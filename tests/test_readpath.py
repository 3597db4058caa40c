"""The read path end to end: replicas, a site cache server, FUSE mounts."""

import concurrent.futures
import errno
import os
import time
from pathlib import Path

import pytest
import requests
import xxhash
from trees import describe, make_tree

from harness.cluster import TOKEN, wait_for
from harness.data import drop_caches
from icbdcore.manifest import Manifest
from icbdcore.wire import content_digest
from replicator import btrfs

MIB = 1 << 20
# Every test here runs nodes (btrfs, through the cluster fixture); those that
# read through a FUSE mount are marked fuse.


def _hash(path: Path) -> str:
    with open(path, "rb") as f:
        return xxhash.xxh3_128_hexdigest(f.read())


@pytest.fixture
def site(cluster, tmp_path):
    """A master, a replica at site a and one at site b, both holding demo v1,
    and a cache server at site a."""
    cluster.master()
    near = cluster.replica("near", site="a")
    far = cluster.replica("far", site="b")
    tree = make_tree(tmp_path / "tree", big=6 * MIB + 123)
    cluster.icbd("imi", "create", "demo", "--from", str(tree))
    cluster.icbd("imi", "publish", "demo")
    for replica in (near, far):
        cluster.icbd("subscribe", "demo", "--node", replica.id)
        cluster.wait_held(replica, "demo", [1])
    cache = cluster.cache("cache", site="a")
    wait_for(lambda: {u["id"] for u in cache.status()["fetcher"]["upstreams"]} >= {"near", "far"},
             what="the cache knows both replicas")
    return cluster, near, far, cache, tree


def _served(replica) -> int:
    return replica.status()["served"]["blocks"]


@pytest.mark.fuse
def test_mount_shows_the_published_tree(site):
    cluster, near, far, cache, tree = site
    mount = cluster.mount("mnt", cache=cache)
    root = mount.mountpoint
    assert sorted(os.listdir(root)) == ["demo"]
    assert os.readlink(root / "demo" / "latest") == "1"
    assert describe(root / "demo" / "1") == describe(tree)
    assert (root / "demo" / "latest" / "etc" / "hostname").read_text() == "desktop-1\n"
    # Same site first: the near replica served, the far one did not.
    assert _served(near) > 0 and _served(far) == 0


@pytest.mark.fuse
def test_embedded_cache_mount_matches_too(site):
    cluster, near, far, cache, tree = site
    mount = cluster.mount("emb", cache_dir=cluster.root / "emb-cache", site="b")
    assert describe(mount.mountpoint / "demo" / "1") == describe(tree)
    assert _served(far) > 0  # this host is at site b


@pytest.mark.fuse
def test_new_versions_and_rollback_show_up(site):
    cluster, near, far, cache, tree = site
    mount = cluster.mount("mnt", cache=cache)
    work = Path(cluster.icbd("imi", "path", "demo").stdout.strip())
    (work / "etc" / "hostname").write_text("second\n")
    cluster.icbd("imi", "publish", "demo")
    cluster.wait_held(near, "demo", [1, 2])
    wait_for(lambda: os.readlink(mount.mountpoint / "demo" / "latest") == "2", timeout=15, what="latest -> 2")
    assert (mount.mountpoint / "demo" / "latest" / "etc" / "hostname").read_text() == "second\n"
    assert (mount.mountpoint / "demo" / "1" / "etc" / "hostname").read_text() == "desktop-1\n"
    cluster.icbd("imi", "rollback", "demo", "1")
    wait_for(lambda: os.readlink(mount.mountpoint / "demo" / "latest") == "1", timeout=15, what="latest -> 1")
    assert (mount.mountpoint / "demo" / "latest" / "etc" / "hostname").read_text() == "desktop-1\n"


@pytest.mark.fuse
def test_mount_is_read_only(site):
    cluster, near, far, cache, tree = site
    root = cluster.mount("mnt", cache=cache).mountpoint
    attempts = [
        lambda: (root / "demo" / "1" / "etc" / "hostname").open("w"),
        lambda: (root / "demo" / "1" / "newfile").write_text("x"),
        lambda: os.mkdir(root / "demo" / "1" / "newdir"),
        lambda: os.unlink(root / "demo" / "1" / "etc" / "hostname"),
        lambda: os.chmod(root / "demo" / "1" / "etc" / "hostname", 0o777),
        lambda: os.rename(root / "demo" / "1" / "big.bin", root / "demo" / "1" / "moved"),
        lambda: os.symlink("x", root / "demo" / "y"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as failure:
            attempt()
        assert failure.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM), failure.value
    assert describe(root / "demo" / "1") == describe(tree)


@pytest.mark.fuse
def test_eviction_under_a_small_bound_keeps_data_right(cluster, tmp_path):
    cluster.master()
    replica = cluster.replica("r1")
    source = tmp_path / "img"
    source.mkdir()
    (source / "disk.img").write_bytes(os.urandom(40 * MIB))
    cluster.icbd("imi", "create", "img", "--from", str(source))
    cluster.icbd("imi", "publish", "img")
    cluster.icbd("subscribe", "img", "--node", "r1")
    cluster.wait_held(replica, "img", [1])
    cache = cluster.cache("cache", size="8M")
    mount = cluster.mount("mnt", cache=cache)
    expected = _hash(source / "disk.img")
    for _ in range(2):
        assert _hash(mount.mountpoint / "img" / "1" / "disk.img") == expected
        drop_caches()
    store = cache.status()["store"]
    assert store["bytes"] <= 8 * MIB and store["evictions"] > 0, store


def test_single_flight_one_upstream_fetch_for_many_readers(site):
    cluster, near, far, cache, tree = site
    manifest = Manifest.from_bytes(cluster.api("GET", "/v1/imis/demo/versions/1/manifest").content)
    digest = manifest.find("big.bin").chunks[2]
    before = _served(near) + _served(far)
    url = f"{cache.url}/v1/blocks/{digest}?imi=demo&version=1"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda _: requests.get(url, headers=headers, timeout=30), range(24)))
    assert all(a.status_code == 200 and content_digest(a.content) == digest for a in answers)
    assert _served(near) + _served(far) - before == 1


@pytest.mark.fuse
def test_failover_when_the_near_replica_dies(site):
    cluster, near, far, cache, tree = site
    near.kill9()
    mount = cluster.mount("mnt", cache=cache, timeout=20)
    assert _hash(mount.mountpoint / "demo" / "1" / "big.bin") == _hash(tree / "big.bin")
    assert _served(far) > 0


@pytest.mark.fuse
def test_corrupt_block_at_a_replica_is_never_returned(site):
    cluster, near, far, cache, tree = site
    victim = near.data / "imis" / "demo" / "1" / "big.bin"
    btrfs.set_readonly(victim.parent, False)
    with open(victim, "r+b") as f:
        f.seek(3 * MIB + 17)
        f.write(b"\xde\xad\xbe\xef")
    btrfs.set_readonly(victim.parent, True)
    drop_caches()
    mount = cluster.mount("mnt", cache=cache)
    assert _hash(mount.mountpoint / "demo" / "1" / "big.bin") == _hash(tree / "big.bin")
    assert "damaged on this node" in (cluster.root / "near.log").read_text()
    assert _served(far) >= 1  # the damaged block came from the other replica


@pytest.mark.fuse
def test_cached_reads_go_on_with_master_and_replicas_down(site):
    cluster, near, far, cache, tree = site
    mount = cluster.mount("mnt", cache=cache)
    expected = describe(tree)
    assert describe(mount.mountpoint / "demo" / "1") == expected
    for node in (near, far, cluster.master_node):
        node.stop()
    drop_caches()
    assert describe(mount.mountpoint / "demo" / "1") == expected
    # The cache server restarts while the site is cut off and still serves.
    cache.stop()
    cache.start()
    drop_caches()
    assert describe(mount.mountpoint / "demo" / "1") == expected


@pytest.mark.fuse
def test_uncached_read_fails_fast_with_eio(site):
    cluster, near, far, cache, tree = site
    mount = cluster.mount("mnt", cache=cache, timeout=2)
    assert (mount.mountpoint / "demo" / "1" / "etc" / "hostname").read_text() == "desktop-1\n"
    for node in (near, far, cluster.master_node):
        node.stop()
    started = time.monotonic()
    with pytest.raises(OSError) as failure:
        _hash(mount.mountpoint / "demo" / "1" / "big.bin")
    elapsed = time.monotonic() - started
    assert failure.value.errno == errno.EIO
    assert elapsed < 2 + 3, elapsed
    # A hung cache server: the same bound, and the mount recovers when it returns.
    cache.pause()
    started = time.monotonic()
    with pytest.raises(OSError):
        _hash(mount.mountpoint / "demo" / "1" / "sparse.img")
    assert time.monotonic() - started < 2 + 3
    cache.resume()
    assert (mount.mountpoint / "demo" / "1" / "etc" / "hostname").read_text() == "desktop-1\n"


def test_a_batch_of_blocks_from_a_replica_and_from_the_cache_server(site):
    """GET /v1/blocks?d=...: the blocks a node can deliver, one after the other,
    their sizes in X-Icbd-Block-Sizes ("-" for one it does not deliver), in one
    answer; the cache server fills what it lacks from the replicas, in a batch."""
    cluster, near, far, cache, tree = site
    manifest = Manifest.from_bytes(cluster.api("GET", "/v1/imis/demo/versions/1/manifest").content)
    chunks = list(dict.fromkeys(manifest.find("big.bin").chunks))
    absent = content_digest(b"published nowhere")
    asked = [chunks[0], absent, *chunks[1:4]]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    data = (tree / "big.bin").read_bytes()
    expected = {d: data[i * MIB:(i + 1) * MIB] for i, d in enumerate(manifest.find("big.bin").chunks)}
    for node in (near, cache):
        before = _served(near) + _served(far)
        answer = requests.get(f"{node.url}/v1/blocks", params={"d": ",".join(asked), "imi": "demo", "version": 1},
                              headers=headers, timeout=60)
        assert answer.status_code == 200, answer.text
        sizes = answer.headers["X-Icbd-Block-Sizes"].split(",")
        assert sizes[1] == "-" and all(s.isdigit() for s in sizes[:1] + sizes[2:])
        body, at = answer.content, 0
        for digest, size in zip(asked, sizes, strict=True):
            if size == "-":
                continue
            assert body[at:at + int(size)] == expected[digest]
            at += int(size)
        assert at == len(body)
        if node is cache:
            assert _served(near) + _served(far) - before == 4, "the cache filled its four blocks once"
    too_many = requests.get(f"{cache.url}/v1/blocks", params={"d": ",".join([chunks[0]] * 17)}, headers=headers,
                            timeout=10)
    assert too_many.status_code == 400 and "1 to 16" in too_many.json()["error"]
    assert requests.get(f"{near.url}/v1/blocks", params={"d": chunks[0]}, timeout=10).status_code == 401
