"""A network partition between sites, end to end.

Three sites are network namespaces joined through the root namespace
(harness/netns.py): "central" holds the master and a replica `rc`, site "a" a
replica `ra`, the site cache server `ca` and a desktop's FUSE mount, site "b"
a replica `rb`. The link between a and central is cut by dropping packets in
the middle, so connections hang as over a failed WAN link. The test process
stays in the root namespace and sees every site throughout.

Two iMIs: `demo`, held by ra and rb (so site a has it locally), and `far`,
held only by rc in central: its blocks reach site a only through the cut link.

Nodes and the mount enter their site's network namespace only (`nsenter
--net`, harness/netns.py), not `ip netns exec`, whose private mount namespace
would hide the nodes' loop-mounted btrfs and the FUSE mount from the test.

Two tests guard against starvation: many concurrent uncached readers must
each fail within the bound, and cached blocks must read while uncached reads
hang.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import xxhash
from trees import describe, make_tree

from harness.cluster import ICBD, Cluster, MountProcess, Node, wait_for
from harness.data import drop_caches
from harness.netns import Site, SiteNetwork, sites
from icbdcore.manifest import Manifest

MIB = 1 << 20
MOUNT_TIMEOUT = 2.0  # the mount's --timeout
SLACK = 2.0  # what an EIO may take beyond it
STORM = 36  # concurrent readers of distinct uncached blocks

# Sites in network namespaces (ip, tc, nsenter: checked by tests/conftest.py),
# nodes on btrfs, a FUSE mount.
pytestmark = [pytest.mark.netns, pytest.mark.btrfs, pytest.mark.fuse]


@dataclass
class World:
    cluster: Cluster
    net: SiteNetwork
    master: Node
    rc: Node
    ra: Node
    rb: Node
    ca: Node
    mount: MountProcess
    demo: Path  # the tree of demo v1
    far: Path  # the tree of far v1

    def state(self, node: Node) -> str:
        return self.cluster.nodes_status()[node.id]["state"]


def _in_site(site: Site, node: Node) -> Node:
    return site.adopt(node).start()


def _mount_in(site: Site, cluster: Cluster, name: str, cache: Node, timeout: float) -> MountProcess:
    """Cluster.mount, but the mount process runs in `site`'s network namespace
    (and in the root's mount namespace, so the test sees the mount)."""
    argv = [*ICBD, "mount", str(cluster.root / name), "--foreground", "--timeout", str(timeout),
            "--refresh", "0.5", "--cache", cache.url, "--cache-dir", str(cluster.root / f"{name}-cache")]
    mount = MountProcess(cluster.root / name, site.command(argv), cluster.root / f"{name}.log", cluster.env)
    cluster.mounts.append(mount)
    return mount.start()


def _random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def _hash(path: Path) -> str:
    with open(path, "rb") as f:
        return xxhash.xxh3_128_hexdigest(f.read())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("partition")
    with sites("central", "a", "b") as net:
        cluster = Cluster(root)
        try:
            central, a, b = net["central"], net["a"], net["b"]
            master = _in_site(central, cluster.master(host=central.ip, start=False))
            rc = _in_site(central, cluster.replica("rc", site="central", host=central.ip, start=False))
            ra = _in_site(a, cluster.replica("ra", site="a", host=a.ip, start=False))
            rb = _in_site(b, cluster.replica("rb", site="b", host=b.ip, start=False))

            demo = make_tree(root / "demo-tree", big=3 * MIB + 123)
            cluster.icbd("imi", "create", "demo", "--from", str(demo))
            cluster.icbd("imi", "publish", "demo")
            far = root / "far-tree"
            far.mkdir()
            _random_file(far / "warm.bin", 2 * MIB + 5)
            _random_file(far / "cold.bin", 3 * MIB + 7)
            _random_file(far / "staged.bin", 2 * MIB)  # put in the site cache directly, not read by the mount
            for name in ("storm1.bin", "storm2.bin"):  # one block per concurrent reader, never read before
                _random_file(far / name, STORM * MIB)
            cluster.icbd("imi", "create", "far", "--from", str(far))
            cluster.icbd("imi", "publish", "far")
            work = Path(cluster.icbd("imi", "path", "far").stdout.strip())
            (work / "only-in-2").write_text("far v2\n")
            cluster.icbd("imi", "publish", "far")
            for imi, replica in (("demo", ra), ("demo", rb), ("far", rc)):
                cluster.icbd("subscribe", imi, "--node", replica.id)
            cluster.wait_held(ra, "demo", [1])
            cluster.wait_held(rb, "demo", [1])
            cluster.wait_held(rc, "far", [1, 2])

            ca = _in_site(a, cluster.cache("ca", site="a", host=a.ip, start=False))
            wait_for(lambda: {u["id"] for u in ca.status()["fetcher"]["upstreams"]} >= {"ra", "rb", "rc"},
                     what="the site cache knows every replica")
            mount = _mount_in(a, cluster, "desktop", ca, MOUNT_TIMEOUT)
            yield World(cluster, net, master, rc, ra, rb, ca, mount, demo, far)
        finally:
            cluster.stop_all()


# --- cached reads ----------------------------------------------------------------


def test_cached_reads_go_on_through_the_cut(world):
    root = world.mount.mountpoint
    expected_demo = describe(world.demo)
    warm = _hash(world.far / "warm.bin")
    # A desktop at site a reads these before the cut: they pass through the site cache.
    assert describe(root / "demo" / "1") == expected_demo
    assert _hash(root / "far" / "1" / "warm.bin") == warm
    with world.net.partition("a", "central"):
        wait_for(lambda: world.ca.status()["master_reachable"] is False, timeout=20,
                 what="the site cache to notice the master is gone")
        fetched = world.ca.status()["fetcher"]["demand_fetches"]
        drop_caches()  # the kernel's pages go: every read below goes to the mount and the site cache
        assert describe(root / "demo" / "1") == expected_demo
        # far is held only across the cut: this can come from nowhere but the site cache.
        assert _hash(root / "far" / "1" / "warm.bin") == warm
        assert world.ca.status()["fetcher"]["demand_fetches"] == fetched
        assert os.readlink(root / "demo" / "latest") == "1"  # the catalogue outlives the cut


# --- uncached reads ----------------------------------------------------------------

READER = """
import errno, json, os, sys, time
kind, path = sys.argv[1:]
started = time.monotonic()
try:
    if kind == "dir":
        os.listdir(path)
    else:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    error = 0
except OSError as e:
    error = e.errno
print(json.dumps({"errno": error, "seconds": time.monotonic() - started}))
"""


def _proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _stuck_on(mountpoint: Path) -> list[str]:
    """Processes in uninterruptible sleep (D) with a file or folder of this mount open."""
    stuck = []
    for proc in Path("/proc").glob("[0-9]*"):
        if _proc_state(int(proc.name)) != "D":
            continue
        try:
            paths = [os.readlink(p) for p in (proc / "fd").iterdir()] + [os.readlink(proc / "cwd")]
        except OSError:
            continue
        if any(p.startswith(str(mountpoint)) for p in paths):
            stuck.append(f"{proc.name} {(proc / 'comm').read_text().strip()}")
    return stuck


def test_uncached_reads_fail_fast_with_eio(world):
    root = world.mount.mountpoint
    assert "cold.bin" in os.listdir(root / "far" / "1")  # the manifest of v1 is at the site
    with world.net.partition("a", "central"):
        # The holders of far's blocks (rc, the master) are across the cut, and
        # the site's replica does not hold far: nothing at site a can serve these.
        targets = [("file", root / "far" / "1" / "cold.bin"), ("dir", root / "far" / "2")]  # blocks, a manifest
        started = time.monotonic()
        readers = [subprocess.Popen([sys.executable, "-c", READER, kind, str(path)], stdout=subprocess.PIPE,
                                    text=True) for kind, path in targets]
        states: dict[int, set[str]] = {r.pid: set() for r in readers}
        while any(r.poll() is None for r in readers) and time.monotonic() - started < MOUNT_TIMEOUT + 20:
            for r in readers:
                states[r.pid].add(_proc_state(r.pid) or "gone")
            time.sleep(0.05)
        hung = [r.pid for r in readers if r.poll() is None]
        stuck = _stuck_on(root)
        outcomes = []
        for r in readers:
            if r.poll() is None:
                r.kill()
            outcomes.append(json.loads(r.communicate(timeout=10)[0] or "{}"))
        # Each reader may sleep in D while FUSE answers (a killable wait); none may stay there.
        assert hung == [] and stuck == [], (hung, stuck, states)
        assert all(o.get("errno") == errno.EIO for o in outcomes), (outcomes, states)
        slowest = max(o["seconds"] for o in outcomes)
        assert slowest < MOUNT_TIMEOUT + SLACK, (outcomes, states)
        assert _proc_state(world.mount.pid) not in (None, "D", "Z")
        # The mount's request loop still answers at once (its status file is served live).
        t0 = time.monotonic()
        assert "demo" in world.mount.status()["catalog"]
        assert time.monotonic() - t0 < 1.0
    # Healed: the same read now succeeds (the failed upstreams are retried).
    cold = _hash(world.far / "cold.bin")
    wait_for(lambda: _hash(root / "far" / "1" / "cold.bin") == cold, timeout=30, interval=0.5,
             what="the cold file to read once the link is back")


BLOCK_READERS = """
import errno, json, os, sys, threading, time
path, offsets = sys.argv[1], [int(o) for o in sys.argv[2:]]
out = [None] * len(offsets)

def read(i):
    fd = os.open(path, os.O_RDONLY)  # each its own open file, as separate programs would
    started = time.monotonic()
    try:
        os.pread(fd, 4096, offsets[i])
        error = 0
    except OSError as e:
        error = e.errno
    os.close(fd)
    out[i] = {"offset": offsets[i], "errno": error, "seconds": round(time.monotonic() - started, 3)}

threads = [threading.Thread(target=read, args=(i,)) for i in range(len(offsets))]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(out))
"""


def _start_block_readers(path: Path, count: int) -> subprocess.Popen:
    """One process, `count` threads, each reading 4 KiB of its own block of `path`."""
    offsets = [str(i * MIB) for i in range(count)]
    return subprocess.Popen([sys.executable, "-c", BLOCK_READERS, str(path), *offsets],
                            stdout=subprocess.PIPE, text=True)


def _outcomes(readers: subprocess.Popen, timeout: float) -> list[dict]:
    try:
        return json.loads(readers.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        readers.kill()
        readers.communicate()
        raise AssertionError(f"readers still blocked after {timeout} s") from None


def test_many_concurrent_uncached_readers_each_fail_fast(world):
    root = world.mount.mountpoint
    os.listdir(root / "far" / "1")
    with world.net.partition("a", "central"):
        outcomes = _outcomes(_start_block_readers(root / "far" / "1" / "storm2.bin", STORM), timeout=60)
    assert all(o["errno"] == errno.EIO for o in outcomes), outcomes
    times = sorted(o["seconds"] for o in outcomes)
    assert times[-1] < MOUNT_TIMEOUT + SLACK, times


def test_cached_blocks_read_while_uncached_reads_hang(world):
    root = world.mount.mountpoint
    os.listdir(root / "far" / "1")
    manifest = Manifest.from_bytes(world.cluster.api("GET", "/v1/imis/far/versions/1/manifest").content)
    staged = list(manifest.find("staged.bin").chunks)
    world.cluster.api("POST", "/v1/prefetch", node=world.ca,
                      json={"blocks": staged, "imi": "far", "version": 1}).raise_for_status()
    wait_for(lambda: world.ca.status()["prefetch_jobs"][-1]["state"] == "done", what="staged.bin at the site")
    expected = _hash(world.far / "staged.bin")
    with world.net.partition("a", "central"):
        readers = _start_block_readers(root / "far" / "1" / "storm1.bin", STORM // 2)
        time.sleep(0.5)  # their requests are now waiting on the cut
        t0 = time.monotonic()
        try:
            got = _hash(root / "far" / "1" / "staged.bin")
        finally:
            seconds = time.monotonic() - t0
            _outcomes(readers, timeout=60)
    assert got == expected
    assert seconds < 1.0, seconds


# --- keep-alive ----------------------------------------------------------------


def _sequence(samples: list[str]) -> list[str]:
    """Consecutive duplicates removed: ["alive", "suspect", "down"]."""
    return [s for i, s in enumerate(samples) if i == 0 or samples[i - 1] != s]


def test_keepalive_marks_the_partitioned_nodes(world):
    site_a, others = (world.ra, world.ca), (world.rc, world.rb)
    wait_for(lambda: all(world.state(n) == "alive" for n in (*site_a, *others)), timeout=30,
             what="every node alive")
    seen: dict[str, list[str]] = {n.id: [] for n in (*site_a, *others)}
    went_down = None
    with world.net.partition("a", "central"):
        cut = time.monotonic()
        while time.monotonic() - cut < 20:
            nodes = world.cluster.nodes_status()
            for node_id, samples in seen.items():
                samples.append(nodes[node_id]["state"])
            if all(seen[n.id][-1] == "down" for n in site_a) and went_down is None:
                went_down = time.monotonic() - cut
            if went_down is not None and time.monotonic() - cut > went_down + 1.0:
                break  # a second more, to see that the other sites stay up
            time.sleep(0.05)
        assert went_down is not None, {k: _sequence(v) for k, v in seen.items()}
        for node in site_a:
            assert _sequence(seen[node.id]) == ["alive", "suspect", "down"], (node.id, _sequence(seen[node.id]))
        for node in others:  # the cut is between a and central only
            assert "down" not in seen[node.id], (node.id, _sequence(seen[node.id]))
        assert went_down < world.cluster.down_after + 3, went_down
    wait_for(lambda: all(world.state(n) == "alive" for n in site_a), timeout=30,
             what="site a's nodes alive again after the link heals")
    log = (world.cluster.root / "master.log").read_text()
    for node in site_a:
        assert f"{node.id} ({node.role}, site a): alive -> suspect" in log
        assert f"{node.id} ({node.role}, site a): down -> alive" in log


# --- catching up ----------------------------------------------------------------


def _done(replica: Node, imi: str) -> list[tuple[int, int | None]]:
    return [(t["version"], t["parent"]) for t in replica.status()["transfers"]
            if t["imi"] == imi and t["state"] == "done"]


def test_replicas_catch_up_in_order_after_the_link_heals(world):
    cluster, ra, rb = world.cluster, world.ra, world.rb
    assert ra.status()["versions"]["demo"] == [1]
    work = Path(cluster.icbd("imi", "path", "demo").stdout.strip())
    with world.net.partition("a", "central"):
        for version in (2, 3, 4):
            (work / "etc" / "hostname").write_text(f"v{version}\n")
            with open(work / "big.bin", "r+b") as f:
                f.seek(version * 512 * 1024)
                f.write(os.urandom(64 * 1024))
            cluster.icbd("imi", "publish", "demo", "--message", f"during the cut {version}")
        cluster.wait_held(rb, "demo", [1, 2, 3, 4])  # site b is not cut off: it gets them now
        # Long enough for both sides to give up on each other.
        wait_for(lambda: ra.status()["master_reachable"] is False, timeout=20,
                 what="ra to find the master unreachable")
        wait_for(lambda: world.state(ra) == "down", timeout=20, what="the master to mark ra down")
        assert ra.status()["versions"]["demo"] == [1]  # site a cannot
        assert [v for v, _ in _done(ra, "demo")] == [1]
    status = cluster.wait_held(ra, "demo", [1, 2, 3, 4], timeout=60)
    done = [(t["version"], t["parent"]) for t in status["transfers"] if t["imi"] == "demo" and t["state"] == "done"]
    assert done == [(1, None), (2, 1), (3, 2), (4, 3)], status["transfers"]
    for version in (2, 3, 4):
        held = describe(ra.data / "imis" / "demo" / str(version))
        assert held == describe(world.master.data / "imis" / "demo" / str(version)), version
        assert held["etc/hostname"] == describe(rb.data / "imis" / "demo" / str(version))["etc/hostname"]
    # The desktop at site a sees the new version, through its site cache.
    root = world.mount.mountpoint
    wait_for(lambda: os.readlink(root / "demo" / "latest") == "4", timeout=30, what="latest -> 4 at site a")
    assert (root / "demo" / "latest" / "etc" / "hostname").read_text() == "v4\n"
    assert _hash(root / "demo" / "4" / "big.bin") == _hash(world.master.data / "imis" / "demo" / "4" / "big.bin")
