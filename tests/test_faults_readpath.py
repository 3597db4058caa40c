"""Faults on purpose on the read path: bytes damaged in the cache's store,
and the cache server and the mount restarted under load.

What must hold, whatever breaks: no wrong byte reaches a reader, and reads
go on once the fault is gone. (Extends tests/test_readpath.py; it does not
repeat it. Faults during a transfer are in tests/test_faults_transfer.py.)
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from cluster_teardown import stop_and_remove

from harness.cluster import TOKEN, Cluster, Node, fuse_unmount, wait_for
from harness.data import write_image
from icbdcore.manifest import Manifest
from icbdcore.mounts import is_mountpoint
from icbdcore.wire import content_digest

MIB = 1 << 20
HEADERS = {"Authorization": f"Bearer {TOKEN}"}

# One master, replica and cache server (on btrfs) for the module; the tests
# with a mount are marked fuse.
pytestmark = pytest.mark.btrfs


# --- a site: master, one replica, a cache server, a mount --------------------------------------------


@dataclass
class Site:
    cluster: Cluster
    r1: Node
    cache: Node
    source: Path
    manifest: Manifest
    content: dict[str, bytes] = field(default_factory=dict)  # path -> bytes, for checking reads


FILES = 24
FILE_SIZE = 4 * MIB


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """96 MiB in 24 files (more than the mount's 64 MiB of memory, so reads
    keep reaching the cache server), held by r1, read through a cache server."""
    root = tmp_path_factory.mktemp("faults-site")
    cluster = Cluster(root)
    try:
        cluster.master()
        r1 = cluster.replica("r1")
        source = root / "tree"
        (source / "files").mkdir(parents=True)
        for i in range(FILES):
            write_image(source / "files" / f"f{i:02d}", FILE_SIZE)
        cluster.icbd("imi", "create", "demo", "--from", str(source))
        cluster.icbd("imi", "publish", "demo")
        cluster.icbd("subscribe", "demo", "--node", "r1")
        cluster.wait_held(r1, "demo", [1])
        cache = cluster.cache("cache")
        wait_for(lambda: "r1" in {u["id"] for u in cache.status()["fetcher"]["upstreams"]},
                 what="the cache to know r1")
        manifest = Manifest.from_bytes(cluster.api("GET", "/v1/imis/demo/versions/1/manifest").content)
        content = {f"files/f{i:02d}": (source / "files" / f"f{i:02d}").read_bytes() for i in range(FILES)}
        yield Site(cluster, r1, cache, source, manifest, content)
    finally:
        stop_and_remove(cluster, root)


def _block(site: Site, digest: str) -> requests.Response:
    return requests.get(f"{site.cache.url}/v1/blocks/{digest}?imi=demo&version=1", headers=HEADERS, timeout=30)


def _served(node: Node) -> int:
    return node.status()["served"]["blocks"]


def test_damaged_blocks_in_the_cache_store_are_never_served(site, tmp_path):
    """Block files in the cache server's store (DATA/blocks/ab/<digest>)
    damaged seven ways: each read still returns the right bytes (refetched
    from the replica), never the damaged ones nor a file outside the store,
    and the store is repaired (the next read is a hit)."""
    digests = sorted(site.manifest.digests())
    for digest in digests[:8]:
        assert _block(site, digest).status_code == 200
    blocks = site.cache.data / "blocks"
    secret = tmp_path / "secret"
    marker = os.urandom(16).hex().encode()
    secret.write_bytes(marker * (MIB // len(marker)))

    def path(d: str) -> Path:
        return blocks / d[:2] / d

    def flip(p: Path) -> None:
        with open(p, "r+b") as f:
            f.seek(MIB // 2)
            byte = f.read(1)
            f.seek(MIB // 2)
            f.write(bytes([byte[0] ^ 0xFF]))

    def replace(p: Path, how) -> None:
        p.unlink()
        how(p)

    damages = {
        "one byte flipped": flip,
        "truncated to half": lambda p: os.truncate(p, MIB // 2),
        "emptied": lambda p: os.truncate(p, 0),
        "another block's bytes": lambda p: replace(p, lambda q: q.write_bytes(path(digests[0]).read_bytes())),
        "deleted": lambda p: p.unlink(),
        "a symlink to a file outside": lambda p: replace(p, lambda q: q.symlink_to(secret)),
        "a directory": lambda p: replace(p, lambda q: q.mkdir()),
    }
    victims = dict(zip(damages, digests[1:8], strict=True))
    for what, digest in victims.items():
        damages[what](path(digest))
    try:
        _check_damaged_blocks(site, victims, path, marker)
    finally:
        # Leave no damage behind for the tests that share this cache server.
        for digest in victims.values():
            if path(digest).is_symlink():
                path(digest).unlink()
            elif path(digest).is_dir():
                path(digest).rmdir()


def _check_damaged_blocks(site: Site, victims: dict[str, str], path, marker: bytes) -> None:
    before, served = site.cache.status()["store"], _served(site.r1)
    results = {}
    for what, digest in victims.items():
        answer = _block(site, digest)
        assert answer.status_code == 200, (what, answer.status_code, answer.text[:200])
        assert content_digest(answer.content) == digest, f"{what}: wrong bytes served"
        assert marker not in answer.content
        results[what] = "refetched"
    refetched = _served(site.r1) - served
    assert refetched == len(victims), f"{refetched} of {len(victims)} damaged blocks refetched from the replica"
    store = site.cache.status()["store"]
    print(f"\ncache store damage: {results}; dropped corrupt {store['corrupt_dropped'] - before['corrupt_dropped']},"
          f" missing {store['missing_dropped'] - before['missing_dropped']}")
    # Repaired: the next read of each comes from the store, not the replica.
    served = _served(site.r1)
    for digest in victims.values():
        answer = _block(site, digest)
        assert answer.status_code == 200 and content_digest(answer.content) == digest
    unrepaired = [what for what, digest in victims.items() if not path(digest).is_file() or path(digest).is_symlink()]
    assert _served(site.r1) == served and not unrepaired, \
        f"the store was not repaired for: {unrepaired} ({_served(site.r1) - served} fetched again)"


class Readers:
    """Threads reading random ranges of the site's files, through a mount or
    straight from the cache server, checking every byte. Errors and short
    reads of good bytes are counted (allowed while something restarts);
    wrong data is the failure."""

    def __init__(self, site: Site, mountpoint: Path | None, threads: int):
        self.site = site
        self.mountpoint = mountpoint
        self.counts = {"ok": 0, "short": 0, "errors": 0, "wrong": 0}
        self.wrong: list[str] = []
        self.errnos: dict[str, int] = {}
        self.last_ok = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _note(self, key: str, detail: str = "") -> None:
        with self._lock:
            self.counts[key] += 1
            if key == "ok":
                self.last_ok = time.monotonic()
            elif key == "wrong":
                self.wrong.append(detail)
            elif key == "errors":
                self.errnos[detail] = self.errnos.get(detail, 0) + 1

    def _run(self, index: int) -> None:
        rng = random.Random(index)
        digests = {d: (rel, i) for rel in self.site.content for i, d in enumerate(self.site.manifest.find(rel).chunks)}
        order = list(digests)
        while not self._stop.is_set():
            if self.mountpoint is not None:
                rel = rng.choice(list(self.site.content))
                offset = rng.randrange(0, FILE_SIZE - 1)
                length = rng.choice([4096, 128 << 10, MIB, 3 * MIB])
                try:
                    fd = os.open(self.mountpoint / "demo" / "1" / rel, os.O_RDONLY)
                    try:
                        data = os.pread(fd, length, offset)
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)
                except OSError as error:
                    self._note("errors", errno.errorcode.get(error.errno, str(error.errno)))
                    time.sleep(0.02)
                    continue
                expected = self.site.content[rel][offset:offset + length]
                if data == expected:
                    self._note("ok")
                elif 0 < len(data) < len(expected) and data == expected[:len(data)]:
                    # The kernel cut the read into FUSE requests and one failed:
                    # read(2) returns the good bytes before it (POSIX), the next call the error.
                    self._note("short")
                else:
                    self._note("wrong", f"{rel}@{offset}+{length}: {len(data)} bytes")
            else:
                digest = rng.choice(order)
                try:
                    answer = _block(self.site, digest)
                except requests.RequestException as error:
                    self._note("errors", type(error).__name__)
                    time.sleep(0.02)
                    continue
                if answer.status_code != 200:
                    self._note("errors", str(answer.status_code))
                    continue
                rel, i = digests[digest]
                if answer.content != self.site.content[rel][i * MIB:(i + 1) * MIB]:
                    self._note("wrong", f"block {digest}")
                else:
                    self._note("ok")

    def __enter__(self) -> Readers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def wait_ok(self, what: str, timeout: float = 30) -> None:
        mark = time.monotonic()
        wait_for(lambda: self.last_ok > mark, timeout=timeout, what=f"reads to succeed again after {what}")


@pytest.mark.fuse
def test_cache_server_restarts_under_load(site):
    """Readers through a mount and straight over HTTP while the cache server
    is stopped and started twice and killed with -9 once: never wrong data,
    errors at worst for the readers straight at it and none through the
    mount (it reads from the replica meanwhile); afterwards its store is
    whole (audit) and still serves what it held without asking the replica."""
    cluster, cache = site.cluster, site.cache
    # A small memory cache in the mount, so its reads keep reaching the cache server.
    mount = cluster.mount("mnt-cache-restarts", cache=cache, timeout=5, extra=["--memory-cache", "16M"])
    try:
        with Readers(site, mount.mountpoint, 6) as via_mount, Readers(site, None, 4) as via_http:
            time.sleep(3)
            for how in ("stop", "stop", "kill9"):
                if how == "stop":
                    cache.stop()
                else:
                    cache.kill9()
                time.sleep(0.5)  # readers meet a dead server
                cache.start()
                via_mount.wait_ok(f"a cache {how}")
                via_http.wait_ok(f"a cache {how}")
                time.sleep(1.5)
        counts = {"mount": via_mount.counts, "http": via_http.counts}
        print(f"\ncache restarts under load: {counts}; errors {via_mount.errnos} {via_http.errnos}")
        assert not via_mount.wrong and not via_http.wrong, via_mount.wrong + via_http.wrong
        assert via_mount.counts["ok"] > 50 and via_http.counts["ok"] > 50
        # Readers straight at the cache server feel its restarts; the mount
        # reads from the replica meanwhile (cache/group.py), so its readers do not.
        assert via_http.counts["errors"] > 0, "the restarts were not felt"
        assert via_mount.counts["errors"] == 0, via_mount.errnos
    finally:
        mount.stop()
    wait_for(lambda: not cache.status()["store"]["recovering"], what="the store's recovery after kill -9")
    held = cache.status()["store"]["blocks"]
    assert held > 0
    served = _served(site.r1)
    for digest in sorted(site.manifest.digests()):
        assert content_digest(_block(site, digest).content) == digest
    refetched = _served(site.r1) - served
    assert refetched <= len(site.manifest.digests()) - held, \
        f"{refetched} blocks fetched again though the store held {held} of {len(site.manifest.digests())}"
    cache.stop()
    from cache.blockstore import BlockStore

    with BlockStore(cache.data / "blocks", 1 << 30) as store:
        store.wait_recovered(30)
        audit = store.audit()
    cache.start()
    assert audit["missing"] == [] and audit["damaged"] == [] and audit["orphans"] == [], audit
    assert audit["totals_ok"] and audit["order_mismatch"] == 0, audit


@pytest.mark.fuse
def test_mount_restarts_under_load(site):
    """Readers on a mount whose daemon is stopped (SIGTERM) and killed (-9),
    then mounted again: errors while it is gone, never wrong data, and reads
    go on after each restart."""
    cluster = site.cluster
    mount = cluster.mount("mnt-restarts", cache=site.cache, timeout=5)
    root = mount.mountpoint
    try:
        with Readers(site, root, 8) as readers:
            time.sleep(2)
            for how in ("kill9", "stop", "kill9"):
                if how == "kill9":
                    mount.process.kill()
                    mount.process.wait(10)
                    time.sleep(0.3)  # readers meet a dead mount (ENOTCONN)
                    fuse_unmount(root)
                else:
                    mount.stop()
                assert not is_mountpoint(root)
                mount = cluster.mount("mnt-restarts", cache=site.cache, timeout=5)
                readers.wait_ok(f"a mount {how}")
                time.sleep(1.5)
        print(f"\nmount restarts under load: {readers.counts}; errors {readers.errnos}")
        assert not readers.wrong, readers.wrong
        assert readers.counts["ok"] > 100
        assert readers.counts["errors"] > 0  # the faults were felt
    finally:
        mount.stop()
