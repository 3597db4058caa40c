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
import time
from pathlib import Path

from harness.cluster import Cluster, MountProcess, Node
from harness.data import MIB, drop_caches, write_image

from .context import BenchContext
from .results import Result, median

log = logging.getLogger(__name__)

LOCAL_CACHE_BUDGET_MB_S = 300.0
WARM_TARGET = 0.9  # "page-cache speed", taken as 90% of a warm local read
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
        "disk_cold", "disk_warm", "cold", "warm", "site_cache", "local_fill", "local_cache")}
    egress: list[int] = []
    fetchers: list[dict] = []
    for rep in range(reps):
        step = f"read {rep + 1}/{reps}"
        ctx.step(f"{step}: the replica's file, caches dropped")
        drop_caches()
        runs["disk_cold"].append(_mb_s(on_replica, size))

        ctx.step(f"{step}: cold site cache")
        cache = cluster.cache(f"cache{rep}", site="a", size=f"{2 * size // MIB + 64}M")
        mount = _mount(cluster, f"cold{rep}", cache=cache)
        drop_caches()
        before = _served(replica)
        runs["cold"].append(_mb_s(mount.mountpoint / inside, size))
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
        }),
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
