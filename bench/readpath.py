"""Sequential reads through the FUSE mount, against reading the same file
from local disk.

One image file, one replica holding it, then for each run:

- cold: a fresh site cache server (empty store) and a fresh mount over it,
  caches dropped; every block comes from the replica. Baseline: the file
  read from the replica's own disk, caches dropped.
- warm: the same mount reads the file again (the kernel should keep its
  pages), alternating with reads of the replica's file with its pages
  cached, the baseline.
- site cache: a new mount over the now filled cache server, caches dropped
  (blocks from the cache server's store over loopback HTTP).
- local cache: a mount with an embedded cache (`--cache-dir`) reads once to
  fill it, is restarted, and reads again with caches dropped: the blocks are
  on local disk, the budget is 300 MB/s.

Reads are 1 MiB `readinto` calls into one buffer, as `dd bs=1M` would do.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import blake3
import trio

from cache.blockclient import BlockClient
from harness.cluster import Cluster, MountProcess, Node
from harness.data import MIB, drop_caches, write_image
from icbdcore.clients import Credentials
from icbdcore.manifest import Manifest
from icbdcore.wire import MAX_BATCH, manifest_path

from .context import BenchContext
from .results import Result, median

log = logging.getLogger(__name__)

LOCAL_CACHE_BUDGET_MB_S = 300.0
WARM_TARGET = 0.9  # "page-cache speed", taken as 90% of a warm local read
COLD_TARGET = 0.5  # a cold read through an empty site cache at half the replica's cold disk read
WARM_PAIRS = 3  # page-cache reads are short: pair them up so a busy moment hits both sides
MOUNT_TIMEOUT = 30.0  # seconds a read may wait for a block on this busy 2-core host


def read_sequentially(path: Path, request: int = MIB) -> tuple[int, float]:
    """Read `path` start to end in `request`-byte reads; (bytes, seconds)."""
    buffer = bytearray(request)
    total = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            total += n
    return total, time.perf_counter() - start


def bare_hops(path: Path, store: Path, block: int = MIB) -> tuple[int, float]:
    """The bound this host sets on a cold read through a site cache: the
    file's bytes moved the way the tiers move them, by the kernel alone plus
    the hash each tier checks. A first hop reads each block from the disk,
    hashes it (BLAKE3) and sends it over loopback TCP; a middle hop receives
    it, hashes it, writes it to a file of its own in `store` and sends it on;
    a last hop receives it and hashes it. One thread per hop, no HTTP, no
    FUSE. (bytes, seconds)."""
    store.mkdir(parents=True, exist_ok=True)
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    errors: list[BaseException] = []

    def receive(conn: socket.socket, view: memoryview) -> int:
        got = 0
        while got < len(view):
            n = conn.recv_into(view[got:])
            if not n:
                break
            got += n
        return got

    def first() -> None:
        with socket.create_connection(listeners[0].getsockname()) as out, open(path, "rb", buffering=0) as f:
            buffer = bytearray(block)
            while n := f.readinto(buffer):
                blake3.blake3(memoryview(buffer)[:n]).digest()
                out.sendall(memoryview(buffer)[:n])

    def middle() -> None:
        conn, _ = listeners[0].accept()
        with conn, socket.create_connection(listeners[1].getsockname()) as out:
            buffer, index = bytearray(block), 0
            while n := receive(conn, memoryview(buffer)):
                data = memoryview(buffer)[:n]
                blake3.blake3(data).digest()
                fd = os.open(store / f"{index:08d}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                out.sendall(data)
                index += 1

    total = 0

    def last() -> None:
        nonlocal total
        conn, _ = listeners[1].accept()
        with conn:
            buffer = bytearray(block)
            while n := receive(conn, memoryview(buffer)):
                blake3.blake3(memoryview(buffer)[:n]).digest()
                total += n

    def guarded(work):
        def run() -> None:
            try:
                work()
            except BaseException as error:  # reported below, not lost in a thread
                errors.append(error)
        return run

    threads = [threading.Thread(target=guarded(work)) for work in (last, middle, first)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    for listener in listeners:
        listener.close()
    shutil.rmtree(store, ignore_errors=True)
    if errors:
        raise errors[0]
    return total, seconds


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user and system, every thread) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def blake3_mb_s(size: int = 64 * MIB) -> float:
    """BLAKE3 over 1 MiB blocks in memory, one thread."""
    data = os.urandom(MIB)
    start = time.perf_counter()
    for _ in range(size // MIB):
        blake3.blake3(data).digest()
    return size / (time.perf_counter() - start) / 1e6


def replica_hop_mb_s(replica: Node, digests: list[str], token: str) -> float:
    """Every block of the file from the replica over HTTP, in batches, one client, caches dropped:
    its disk, its hash and one HTTP hop."""
    client = BlockClient(Credentials(token), connections=2)
    total = 0

    async def fetch_all() -> None:
        nonlocal total
        for start in range(0, len(digests), MAX_BATCH):
            got = await client.fetch_many(replica.url, digests[start:start + MAX_BATCH], imi="img", version=1,
                                          timeout=60)
            total += sum(map(len, got.values()))

    drop_caches()
    began = time.perf_counter()
    try:
        trio.run(fetch_all)
    finally:
        client.close()
    return total / (time.perf_counter() - began) / 1e6


def _mb_s(path: Path, expect: int) -> float:
    size, seconds = read_sequentially(path)
    if size != expect:
        raise RuntimeError(f"read {size} bytes of {path}, expected {expect}")
    return size / seconds / 1e6


def _served(replica: Node) -> int:
    return replica.status()["served"]["bytes"]


def _fetcher(cache: Node) -> dict:
    stats = cache.status()["fetcher"]
    keep = ("gets", "hits", "coalesced", "demand_fetches", "prefetched", "upstream_bytes",
            "get_ms_p50", "get_ms_p99", "failovers", "timeouts")
    return {k: stats.get(k) for k in keep}


def fuse_read(ctx: BenchContext) -> list[Result]:
    size = ctx.pick(quick=512 * MIB, full=2 << 30, tiny=32 * MIB)
    reps = ctx.pick(quick=3, full=5, tiny=1)
    room = f"{2 * size // (1 << 30) + 3}G"
    cluster = ctx.cluster("read")
    cluster.master(image_size=room)
    replica = cluster.replica("r1", site="a", image_size=room)
    source = ctx.scratch / "read-src"
    source.mkdir()
    write_image(source / "disk.img", size)
    cluster.icbd("imi", "create", "img", "--from", str(source))
    cluster.icbd("imi", "publish", "img")
    cluster.icbd("subscribe", "img", "--node", replica.id)
    cluster.wait_held(replica, "img", [1], timeout=600)
    (source / "disk.img").unlink()
    on_replica = replica.data / "imis" / "img" / "1" / "disk.img"
    inside = Path("img") / "1" / "disk.img"

    runs: dict[str, list[float]] = {k: [] for k in (
        "disk_cold", "bound", "replica_hop", "disk_warm", "cold", "warm", "site_cache", "local_fill",
        "local_cache")}
    manifest = Manifest.from_bytes(cluster.api("GET", manifest_path("img", 1)).content)
    digests = list(manifest.find("disk.img").chunks)
    cpu: list[dict] = []
    egress: list[int] = []
    fetchers: list[dict] = []
    for rep in range(reps):
        step = f"read {rep + 1}/{reps}"
        ctx.step(f"{step}: the replica's file, caches dropped")
        drop_caches()
        runs["disk_cold"].append(_mb_s(on_replica, size))

        ctx.step(f"{step}: the host's bound: the same bytes through two bare loopback hops")
        drop_caches()
        moved, seconds = bare_hops(on_replica, ctx.scratch / "bare-store")
        runs["bound"].append(moved / seconds / 1e6)

        ctx.step(f"{step}: the replica's blocks over one HTTP hop")
        runs["replica_hop"].append(replica_hop_mb_s(replica, digests, cluster.token("reader")))

        ctx.step(f"{step}: cold site cache")
        cache = cluster.cache(f"cache{rep}", site="a", size=f"{2 * size // MIB + 64}M")
        mount = _mount(cluster, f"cold{rep}", cache=cache)
        drop_caches()
        before = _served(replica)
        pids = {"replica": replica.pid, "cache_server": cache.pid, "mount": mount.pid}
        cpu_before = {k: cpu_seconds(p) for k, p in pids.items()} | {"reader": own_cpu_seconds()}
        runs["cold"].append(_mb_s(mount.mountpoint / inside, size))
        cpu_after = {k: cpu_seconds(p) for k, p in pids.items()} | {"reader": own_cpu_seconds()}
        cpu.append({k: round((cpu_after[k] - cpu_before[k]) / (size / 1e9), 2) for k in cpu_after})
        egress.append(_served(replica) - before)
        fetchers.append(_fetcher(cache))
        ctx.step(f"{step}: second reads, alternating with warm reads of the replica's file")
        # The replica's file was read once (cold), as the mount's was: both
        # sides start from their second read.
        for _ in range(WARM_PAIRS):
            runs["disk_warm"].append(_mb_s(on_replica, size))
            runs["warm"].append(_mb_s(mount.mountpoint / inside, size))
        mount.stop()

        ctx.step(f"{step}: filled site cache, new mount")
        mount = _mount(cluster, f"site{rep}", cache=cache)
        drop_caches()
        runs["site_cache"].append(_mb_s(mount.mountpoint / inside, size))
        mount.stop()
        cache.stop()

        ctx.step(f"{step}: local (embedded) cache")
        cache_dir = ctx.scratch / f"embedded{rep}"
        mount = _mount(cluster, f"fill{rep}", cache_dir=cache_dir)
        drop_caches()
        runs["local_fill"].append(_mb_s(mount.mountpoint / inside, size))
        mount.stop()
        mount = _mount(cluster, f"local{rep}", cache_dir=cache_dir)
        drop_caches()
        runs["local_cache"].append(_mb_s(mount.mountpoint / inside, size))
        mount.stop()

    rounded = {k: [round(v, 1) for v in values] for k, values in runs.items()}
    common = {"image_bytes": size, "runs": reps, "request_bytes": MIB, "mb_s": rounded}
    disk_cold, disk_warm = median(runs["disk_cold"]), median(runs["disk_warm"])
    local = median(runs["local_cache"])
    return [
        Result("fuse_read_cold", median(runs["cold"]), disk_cold, "MB/s", detail={
            "what": f"a {size // MIB} MiB file read through a fresh mount over an empty site cache server, "
                    "every block fetched from the replica, caches dropped; baseline: the replica's own "
                    "copy read from its disk, caches dropped.",
            **common, "replica_egress_bytes": egress, "cache_fetcher": fetchers,
            "breakdown": {
                "disk_mb_s": round(disk_cold, 1),
                "blake3_mb_s": round(blake3_mb_s(), 1),
                "replica_hop_mb_s": round(median(runs["replica_hop"]), 1),
                "bare_two_hops_mb_s": round(median(runs["bound"]), 1),
                "cold_mount_mb_s": round(median(runs["cold"]), 1),
                "cpu_seconds_per_gb": {k: round(median([c[k] for c in cpu]), 2) for k in cpu[0]},
                "cpu_seconds_per_gb_runs": cpu,
                "how": "disk: the replica's file read cold; blake3: one hash per MiB in memory; replica hop: "
                       "every block fetched from the replica over HTTP in batches by one client (its disk, "
                       "its hash, one hop); bare two hops: the same bytes moved by bare threads through two "
                       "loopback TCP hops with a hash at each tier and the middle one writing each block to "
                       "a file (the bound this host sets without HTTP, Python frameworks and FUSE); cpu: "
                       "CPU seconds per GB each process used during the cold mount read (reader: the "
                       "reading process, in the kernel's FUSE copy).",
            },
            "bound_ratio": round(median(runs["bound"]) / disk_cold, 3),
            "budget": ">= 0.5 x the replica's cold disk read",
        }, target=COLD_TARGET, higher_is_better=True),
        Result("fuse_read_warm", median(runs["warm"]), disk_warm, "MB/s", detail={
            "what": "the second read of the same file through the same mount (the kernel's page cache); "
                    "baseline: the replica's file read a second time, its pages cached.",
            **common, "budget": "page-cache speed, taken as >= 0.9 x a warm local read",
        }, target=WARM_TARGET, higher_is_better=True),
        Result("fuse_read_local_cache", local, disk_cold, "MB/s", detail={
            "what": "a restarted mount with an embedded cache (--cache-dir) holding every block, caches "
                    "dropped; baseline: the replica's file read from disk, caches dropped. The budget "
                    f"is absolute ({LOCAL_CACHE_BUDGET_MB_S:g} MB/s), so the target is that figure over "
                    "this baseline.",
            **common, "budget_mb_s": LOCAL_CACHE_BUDGET_MB_S, "meets_300_mb_s": local >= LOCAL_CACHE_BUDGET_MB_S,
            "first_fill_mb_s": rounded["local_fill"],
        }, target=LOCAL_CACHE_BUDGET_MB_S / disk_cold, higher_is_better=True),
        Result("fuse_read_site_cache", median(runs["site_cache"]), disk_cold, "MB/s", detail={
            "what": "a new mount over a site cache server whose store holds every block, caches dropped "
                    "(blocks over loopback HTTP from the cache's store); baseline: the replica's file "
                    "read from disk, caches dropped. No budget is set for it.",
            **common,
        }),
    ]


def _mount(cluster: Cluster, name: str, *, cache: Node | None = None,
           cache_dir: Path | None = None) -> MountProcess:
    mount = cluster.mount(name, cache=cache, cache_dir=cache_dir, site=None if cache else "a",
                          timeout=MOUNT_TIMEOUT)
    os.stat(mount.mountpoint / "img")  # the catalogue is in: the timed read starts with the file
    return mount
