"""A site with two cache servers: how long a reader pauses when one dies
under it, and what a second cache server adds to throughput.

- failover_read_gap_ms: a sequential reader (1 MiB reads) through a mount
  over two cache servers, each trial on a file no cache holds yet; a third
  of the way in, one cache server is killed with -9. The value is the
  longest pause between two reads, the median over trials (p50 and max in
  the detail); the baseline is the same measure in trials where nothing is
  killed. The killed server is started again between trials and the mount
  takes it back by itself.
- failover_two_caches_mb_s: reading a file whose blocks both cache servers
  hold (a fresh mount, caches dropped) through two cache servers against
  through one.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from harness.cluster import Cluster, wait_for
from harness.data import MIB, drop_caches, write_image

from .context import BenchContext
from .readpath import read_sequentially
from .results import Result, median


def _gaps(path: Path, kill_at: int | None, kill) -> list[float]:
    """Seconds between consecutive 1 MiB reads of `path`; `kill()` after `kill_at` MiB."""
    buffer = bytearray(MIB)
    gaps, done = [], 0
    with open(path, "rb", buffering=0) as f:
        last = time.perf_counter()
        while f.readinto(buffer):
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            done += 1
            if kill_at is not None and done == kill_at:
                kill()
                last = time.perf_counter()  # the kill itself is not the reader's pause
    return gaps


def failover(ctx: BenchContext) -> list[Result]:
    size = ctx.pick(quick=128 * MIB, full=512 * MIB, tiny=16 * MIB)
    trials = ctx.pick(quick=5, full=7, tiny=2)
    cluster: Cluster = ctx.cluster("failover")
    cluster.master(image_size=f"{2 * trials * size // (1 << 30) + 4}G")
    r1 = cluster.replica("r1", image_size=f"{2 * trials * size // (1 << 30) + 4}G")
    source = ctx.scratch / "failover-src"
    source.mkdir()
    for i in range(2 * trials + 1):
        write_image(source / f"f{i}.img", size)
    cluster.icbd("imi", "create", "fo", "--from", str(source))
    cluster.icbd("imi", "publish", "fo")
    cluster.icbd("subscribe", "fo", "--node", "r1")
    cluster.wait_held(r1, "fo", [1], timeout=900)
    caches = [cluster.cache("c1", size="8G"), cluster.cache("c2", size="8G")]
    for cache in caches:
        wait_for(lambda c=cache: c.status()["fetcher"]["upstreams"], what=f"{cache.id} to know its upstreams")
    mount = cluster.mount("fo-mnt", cache=caches, timeout=30, extra=["--memory-cache", "16M"])
    version = mount.mountpoint / "fo" / "1"
    killed, calm = [], []
    for trial in range(2 * trials):
        kill = trial % 2 == 0
        ctx.step(f"failover: trial {trial + 1}/{2 * trials}" + (", a cache killed" if kill else ""))
        victim = caches[trial // 2 % 2]
        gaps = _gaps(version / f"f{trial}.img", size // MIB // 3 if kill else None, victim.kill9)
        (killed if kill else calm).append(max(gaps))
        if not victim.alive():
            victim.start()
            wait_for(lambda: all(c["state"] == "up" for c in mount.status()["source"]["caches"]),
                     timeout=60, what="the mount to take the restarted cache back")
    status = mount.status()["source"]
    mount.stop()

    ctx.step("failover: two caches against one, blocks held by both")
    last = version / f"f{2 * trials}.img"
    throughput = {}
    for count in (1, 2):
        mnt = cluster.mount(f"fo-tp{count}", cache=caches[:count], timeout=30, extra=["--memory-cache", "16M"])
        read_sequentially(mnt.mountpoint / "fo" / "1" / last.name)  # fill the cache servers
        mnt.stop()
        runs = []
        for _ in range(ctx.pick(quick=3, full=3, tiny=1)):
            mnt = cluster.mount(f"fo-tp{count}", cache=caches[:count], timeout=30, extra=["--memory-cache", "16M"])
            drop_caches()
            got, seconds = read_sequentially(mnt.mountpoint / "fo" / "1" / last.name)
            mnt.stop()
            runs.append(got / seconds / 1e6)
        throughput[count] = runs
    ms = [round(g * 1000, 1) for g in killed]
    calm_ms = [round(g * 1000, 1) for g in calm]
    return [
        Result("failover_read_gap_ms", median(ms), median(calm_ms), "ms", detail={
            "what": f"the longest pause between two 1 MiB reads of a {size // MIB} MiB file through a mount "
                    "over two cache servers when one is killed with -9 a third of the way in (median over "
                    "trials); baseline: the longest pause in trials where nothing is killed",
            "trials_killed_ms": ms, "trials_calm_ms": calm_ms,
            "p50_ms": median(ms), "max_ms": max(ms),
            "calm_p50_ms": median(calm_ms), "calm_max_ms": max(calm_ms),
            "mount_source_after": status,
        }),
        Result("failover_two_caches_mb_s", median(throughput[2]), median(throughput[1]), "MB/s", detail={
            "what": f"a {size // MIB} MiB file whose blocks the cache servers hold, read through a fresh mount "
                    "(caches dropped) over two cache servers, against over one",
            "two_caches_mb_s": [round(x, 1) for x in throughput[2]],
            "one_cache_mb_s": [round(x, 1) for x in throughput[1]],
            "note": "both cache servers and the mount share this machine's 2 cores",
            "stdev_two": round(statistics.pstdev(throughput[2]), 1) if len(throughput[2]) > 1 else 0.0,
        }, higher_is_better=True),
    ]
