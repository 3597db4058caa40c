"""No single point of failure at a site: a mount reads through several cache
servers, fails over between them, and reads from the replicas when none
answers (cache/group.py)."""

from __future__ import annotations

import errno
import hashlib
import threading
import time
from pathlib import Path

import pytest
from cluster_teardown import stop_and_remove

from cache.group import CacheGroup
from harness.cluster import Cluster, wait_for
from harness.data import write_image

MIB = 1 << 20


# --- choosing, without nodes -------------------------------------------------------------------


class _Remote:
    def __init__(self, url: str):
        self.url = url


def test_blocks_are_spread_over_the_caches_by_digest_and_move_only_with_their_cache():
    urls = [f"http://cache{i}:7402" for i in range(3)]
    group = CacheGroup([_Remote(u) for u in urls], None, None, attempt_timeout=1.0)
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(3000)]
    owner = {d: group.order(d)[0].url for d in digests}
    shares = {u: sum(1 for o in owner.values() if o == u) for u in urls}
    assert all(800 < n < 1200 for n in shares.values()), shares  # a distinct share each
    assert owner == {d: group.order(d)[0].url for d in digests}  # the same order every time
    # A cache that goes down hands only its own share to the others.
    group._failed(group.members[0], "test")
    moved = {d: group.order(d)[0].url for d in digests}
    assert all(moved[d] == owner[d] for d in digests if owner[d] != urls[0])
    assert all(moved[d] != urls[0] for d in digests)
    assert group.status()["caches"][0]["state"] == "down"


# --- real nodes --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A master, a replica holding 48 MiB in 6 files, and two cache servers."""
    root = tmp_path_factory.mktemp("failover")
    cluster = Cluster(root)
    try:
        cluster.master()
        r1 = cluster.replica("r1")
        source = root / "source"
        source.mkdir()
        for i in range(6):
            write_image(source / f"f{i}.img", 8 * MIB)
        cluster.icbd("imi", "create", "img", "--from", str(source))
        cluster.icbd("imi", "publish", "img")
        cluster.icbd("subscribe", "img", "--node", "r1")
        cluster.wait_held(r1, "img", [1])
        caches = [cluster.cache("c1"), cluster.cache("c2")]
        for cache in caches:  # each knows the replica before the tests start
            wait_for(lambda c=cache: c.status()["fetcher"]["upstreams"], what=f"{cache.id} to know its upstreams")
        yield cluster, r1, caches, source
    finally:
        stop_and_remove(cluster, root)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read(path: Path, after_mib: int | None = None, then=None) -> bytes:
    """Read a file in 1 MiB pieces; call `then()` once `after_mib` are in."""
    out = bytearray()
    with open(path, "rb", buffering=0) as f:
        while piece := f.read(MIB):
            out += piece
            if after_mib is not None and len(out) == after_mib * MIB:
                then()
    return bytes(out)


def _restart_all(caches) -> None:
    for cache in caches:
        if not cache.alive():
            cache.start()


def _wait_known(mount, count: int) -> None:
    wait_for(lambda: mount.status()["source"]["replicas_known"] >= count,
             what="the mount to learn the replicas from its caches")


@pytest.mark.fuse
def test_a_cache_killed_mid_read_costs_no_reader_an_error(site):
    cluster, _, caches, source = site
    mount = cluster.mount("mnt-kill-one", cache=caches, timeout=5)
    try:
        data = _read(mount.mountpoint / "img" / "1" / "f0.img", after_mib=2, then=caches[0].kill9)
        assert hashlib.sha256(data).hexdigest() == _sha(source / "f0.img")
        for name in ("f1.img", "f2.img"):
            assert _sha(mount.mountpoint / "img" / "1" / name) == _sha(source / name)
        status = mount.status()["source"]
        print(f"\none cache killed mid-read: {status}")
        by_url = {c["url"]: c for c in status["caches"]}
        assert by_url[caches[0].url]["state"] == "down"
        assert by_url[caches[1].url]["blocks"] > 0
        assert status["failovers"] > 0 and mount.status().get("eio", 0) == 0
    finally:
        mount.stop()
        _restart_all(caches)


@pytest.mark.fuse
def test_with_every_cache_gone_reads_go_on_from_the_replica(site):
    cluster, r1, caches, source = site
    mount = cluster.mount("mnt-all-gone", cache=caches, timeout=5)
    try:
        _wait_known(mount, 1)
        served = r1.status()["served"]["blocks"]
        for cache in caches:
            cache.kill9()
        assert _sha(mount.mountpoint / "img" / "1" / "f3.img") == _sha(source / "f3.img")
        status = mount.status()["source"]
        assert status["fallback_blocks"] >= 8 and mount.status().get("eio", 0) == 0, status
        assert r1.status()["served"]["blocks"] - served >= 8
        # A restarted cache is used again, with no admin action.
        caches[0].start()
        wait_for(lambda: {c["url"]: c["state"] for c in mount.status()["source"]["caches"]}[caches[0].url] == "up",
                 what="the mount to take the restarted cache back")
        before = {c["url"]: c["blocks"] for c in mount.status()["source"]["caches"]}[caches[0].url]
        assert _sha(mount.mountpoint / "img" / "1" / "f4.img") == _sha(source / "f4.img")
        after = {c["url"]: c["blocks"] for c in mount.status()["source"]["caches"]}[caches[0].url]
        assert after > before
    finally:
        mount.stop()
        _restart_all(caches)


@pytest.mark.fuse
def test_with_everything_gone_a_read_fails_within_its_deadline(site):
    cluster, r1, caches, _ = site
    timeout = 3.0
    mount = cluster.mount("mnt-nothing", cache=caches, timeout=timeout)
    try:
        _wait_known(mount, 1)
        list((mount.mountpoint / "img" / "1").iterdir())  # the manifest, while there is a source
        for node in (*caches, r1, cluster.master_node):
            node.kill9()
        started = time.monotonic()
        with pytest.raises(OSError) as caught:
            (mount.mountpoint / "img" / "1" / "f5.img").read_bytes()
        took = time.monotonic() - started
        print(f"\neverything gone: {caught.value.errno} after {took:.2f} s")
        assert caught.value.errno == errno.EIO
        assert took < 2 * timeout + 2, f"the read hung for {took:.1f} s (deadline {timeout} s)"
    finally:
        mount.stop()
        for node in (cluster.master_node, r1, *caches):
            if not node.alive():
                node.start()


@pytest.mark.fuse
@pytest.mark.slow
def test_a_storm_of_readers_survives_a_cache_killed_under_it(site):
    """Twelve readers over two caches, one killed under them: every reader
    gets every byte right; the replica's egress is stated."""
    cluster, r1, caches, source = site
    mount = cluster.mount("mnt-storm", cache=caches, timeout=5, extra=["--memory-cache", "16M"])
    errors: list[str] = []
    try:
        _wait_known(mount, 1)
        served = r1.status()["served"]["bytes"]
        expected = {f"f{i}.img": _sha(source / f"f{i}.img") for i in range(6)}

        def reader(index: int) -> None:
            name = f"f{index % 6}.img"
            try:
                if _sha(mount.mountpoint / "img" / "1" / name) != expected[name]:
                    errors.append(f"reader {index}: wrong bytes in {name}")
            except OSError as error:
                errors.append(f"reader {index}: {error}")

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        caches[1].kill9()
        for thread in threads:
            thread.join(120)
        egress = r1.status()["served"]["bytes"] - served
        print(f"\nstorm of 12 readers over 48 MiB, one cache killed: replica egress {egress / MIB:.1f} MiB, "
              f"source {mount.status()['source']}")
        assert not errors, errors
    finally:
        mount.stop()
        _restart_all(caches)
