"""Booting desktops through icbd, against booting the same files from local disk.

The desktop is bench/images/desktop.py's sample iMI with incompressible
filler that its init reads in full, so the boot's working set is the kernel,
the initrd and about the filler; beside them the iMI carries apps.img, as
large again as the filler or more, that the boot never reads (the rest of
a real image). The tree is built in SCRATCH/local/desk/1:
that folder, with `latest` beside it, is also the "local disk" baseline that
`icbd boot --mount SCRATCH/local` boots, and the source of the iMI.

`boot_times` (rows boot_cold, boot_cold_profile, boot_warm):

1. no profile: local boots and cold boots alternate. A cold boot has a fresh
   site cache server (empty store) and a fresh mount, caches dropped. Its
   mount runs with --no-profiles, except the last cold boot's, which records
   the profile and is left running until the master holds it;
2. with that profile: local boots and cold boots that replay it alternate
   (again a fresh cache server and mount each);
3. warm: local boots and boots through fresh mounts over the last cache
   server, which holds every block, alternate.

Each row's baseline is the median of the local boots that alternate with it,
so a host that grows busier over the run weighs on both sides of a ratio.

`boot_storm` (rows boot_storm, boot_storm_readers): a first desktop records
the profile, then N desktops, each with its own mount (as N machines would
have), boot at once under qemu through one fresh cache server; replica
egress against the working set (the profile's bytes). Then N readers, HTTP
clients that fetch the profile's blocks from another fresh cache server as
a mount does on a miss, do the same at a larger N without qemu.

Every boot is timed from the call to its power-off (the spec and the overlay
are read through the mount too), caches dropped before.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from harness.cluster import Cluster, MountProcess, Node, wait_for
from harness.data import MIB, drop_caches, write_image
from icbd.boot import BootResult, boot, boot_async, choose_accel
from icbdcore.clients import Credentials, session
from icbdcore.manifest import Manifest
from icbdcore.wire import block_path, manifest_path, profile_path

from .context import BenchContext
from .images.desktop import ImageBuildError, build_desktop_tree
from .results import Result, Stopwatch, median

log = logging.getLogger(__name__)

IMI = "desk"
UNUSED = "apps.img"  # in the iMI, never read by the boot
BOOT_TIMEOUT = 300.0
MOUNT_TIMEOUT = 60.0  # a read waits this long for a block: 2 cores shared by up to 16 qemus
PROFILE_WAIT = 90.0  # the mount saves its profile after 10 s of quiet; allow for a slow host


@dataclass
class DesktopSite:
    """A master and a replica holding the desktop iMI, and its local copy."""

    ctx: BenchContext
    cluster: Cluster
    replica: Node
    local: Path  # a folder laid out like a mount: local/desk/1, local/desk/latest
    accel: str
    filler: int

    # --- booting ---------------------------------------------------------------------

    def boot(self, root: Path) -> float:
        """Boot the desktop from `root` (a mount or the local copy), caches
        dropped first; seconds until it powered off."""
        drop_caches()
        overlay = Path(tempfile.mkdtemp(dir=self.ctx.scratch, prefix="overlay-"))
        try:
            with Stopwatch() as watch:
                result = boot(root, IMI, 1, overlay_dir=overlay, timeout=BOOT_TIMEOUT, accel=self.accel)
        finally:
            shutil.rmtree(overlay, ignore_errors=True)
        _check(result, root)
        return watch.seconds

    def cold_mount(self, name: str, profiles: bool = True) -> tuple[Node, MountProcess]:
        """A fresh cache server with an empty store, and a fresh mount over it."""
        cache = self.cluster.cache(f"cache-{name}", site="a", size="4G")
        return cache, self.mount(name, cache, profiles)

    def mount(self, name: str, cache: Node, profiles: bool = True) -> MountProcess:
        extra = [] if profiles else ["--no-profiles"]
        return self.cluster.mount(f"mnt-{name}", cache=cache, timeout=MOUNT_TIMEOUT, extra=extra)

    # --- what the nodes say ---------------------------------------------------------

    def served(self) -> dict:
        return self.replica.status()["served"]

    def profile(self) -> dict | None:
        return master_profile(self.cluster)

    def wait_profile(self) -> dict:
        return wait_for(self.profile, timeout=PROFILE_WAIT, interval=0.5,
                        what="the boot profile to reach the master")

    def block_sizes(self) -> dict[str, int]:
        """Every block of the version and its size, from the manifest."""
        return chunk_sizes(master_manifest(self.cluster))

    def working_set(self, profile: dict) -> dict:
        sizes = self.block_sizes()
        blocks = list(dict.fromkeys(d for d in profile["digests"] if d in sizes))
        return {"blocks": len(blocks), "bytes": sum(sizes[d] for d in blocks), "digests": blocks,
                "image_blocks": len(sizes), "image_distinct_bytes": sum(sizes.values())}


def master_profile(cluster: Cluster) -> dict | None:
    """The boot profile of the desktop's version 1 at the master, or None before one is saved."""
    response = cluster.api("GET", profile_path(IMI, 1))
    if response.status_code == 404:
        return None
    response.raise_for_status()
    return response.json()


def master_manifest(cluster: Cluster) -> Manifest:
    response = cluster.api("GET", manifest_path(IMI, 1))
    response.raise_for_status()
    return Manifest.from_bytes(response.content)


def chunk_sizes(manifest: Manifest) -> dict[str, int]:
    """Every chunk of the manifest's files and its size."""
    sizes: dict[str, int] = {}
    for entry in manifest.files():
        for index, digest in enumerate(entry.chunks):
            sizes[digest] = entry.chunk_span(index, manifest.chunk_size)[1]
    return sizes


def desktop_site(ctx: BenchContext, name: str) -> DesktopSite:
    from .suite import NotAvailable

    filler = ctx.pick(quick=128 * MIB, full=512 * MIB, tiny=8 * MIB)
    unused = ctx.pick(quick=256 * MIB, full=1 << 30, tiny=16 * MIB)
    local = ctx.scratch / "local"
    tree = local / IMI / "1"
    ctx.step("building the desktop image")
    try:
        build_desktop_tree(tree, label="1", filler_bytes=filler)
    except ImageBuildError as error:
        raise NotAvailable(f"cannot build the sample desktop: {error}") from None
    # The rest of a real image (applications, data) that a boot does not read.
    write_image(tree / UNUSED, unused)
    if not shutil.which("qemu-system-x86_64"):
        raise NotAvailable("qemu-system-x86_64 is not installed")
    (local / IMI / "latest").symlink_to("1")
    accel = trio.run(choose_accel, "auto", tree / "boot" / "vmlinuz")
    cluster = ctx.cluster(name)
    room = f"{3 * (filler + unused) // (1 << 30) + 2}G"
    cluster.master(image_size=room)
    replica = cluster.replica("r1", site="a", image_size=room)
    ctx.step("publishing the desktop image")
    cluster.icbd("imi", "create", IMI, "--from", str(tree))
    cluster.icbd("imi", "publish", IMI)
    cluster.icbd("subscribe", IMI, "--node", replica.id)
    cluster.wait_held(replica, IMI, [1], timeout=600)
    return DesktopSite(ctx, cluster, replica, local, accel, filler)


def _check(result: BootResult, root: Path) -> None:
    if not result.ok:
        tail = result.console_text.strip().splitlines()[-5:]
        raise RuntimeError(f"the desktop did not boot from {root}: {result.outcome}: {result.message}; "
                           f"console ends: {' / '.join(tail)}")


def _fetcher(cache: Node) -> dict:
    stats = cache.status()["fetcher"]
    keep = ("gets", "hits", "coalesced", "demand_fetches", "prefetched", "upstream_bytes",
            "get_ms_p50", "get_ms_p99", "latency_samples", "timeouts", "unavailable")
    return {k: stats.get(k) for k in keep}


def _mount_stats(mount: MountProcess) -> dict:
    try:
        status = mount.status()
    except (OSError, ValueError):
        return {}
    keep = ("reads", "read_bytes", "eio", "source_blocks", "source_bytes", "readahead_blocks",
            "prefetch_calls", "prefetch_blocks", "profile_replays", "profile_blocks", "follow_blocks",
            "profiles_recorded", "profiles_saved")
    return {k: status[k] for k in keep if k in status}


def _fetched_by_mounts(runs: list[dict], working_bytes: int) -> list[float | None]:
    """Per run, the bytes a mount fetched from its cache over the working set
    (1.0: each block once; more: blocks fetched again after leaving its memory)."""
    return [round(r["mount"]["source_bytes"] / working_bytes, 3) if r["mount"].get("source_bytes") else None
            for r in runs]


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 3) for v in values]


# --- boot times -------------------------------------------------------------------------

def _alternating(ctx: BenchContext, site: DesktopSite, reps: int, what: str,
                 icbd_boot: Callable[[int], tuple[float, dict]]) -> tuple[list[float], list[float], list[dict]]:
    """`reps` pairs of a local boot then an icbd boot (`icbd_boot(rep)`: seconds
    and what the nodes said); (local seconds, icbd seconds, runs)."""
    local: list[float] = []
    icbd: list[float] = []
    runs: list[dict] = []
    for rep in range(reps):
        ctx.step(f"boot {rep + 1}/{reps}: local disk")
        local.append(site.boot(site.local))
        ctx.step(f"boot {rep + 1}/{reps}: {what}")
        seconds, run = icbd_boot(rep)
        icbd.append(seconds)
        runs.append(run)
    return local, icbd, runs


def boot_times(ctx: BenchContext) -> list[Result]:
    site = desktop_site(ctx, "boot")
    reps = ctx.pick(quick=5, full=7, tiny=1)
    if site.profile() is not None:
        raise RuntimeError("the master holds a boot profile before any boot")

    def cold_boot(rep: int) -> tuple[float, dict]:
        # Only the last cold boot records the profile the next rows replay.
        cache, mount = site.cold_mount(f"cold{rep}", profiles=rep == reps - 1)
        before = site.served()["bytes"]
        seconds = site.boot(mount.mountpoint)
        run = {"replica_egress_bytes": site.served()["bytes"] - before, "mount": _mount_stats(mount)}
        if rep == reps - 1:
            ctx.step("waiting for the boot profile (10 s of quiet)")
            site.wait_profile()
        mount.stop()
        run["cache_fetcher"] = _fetcher(cache)
        cache.stop()
        return seconds, run

    local_cold, cold, cold_runs = _alternating(ctx, site, reps, "cold site cache, no profile", cold_boot)
    profile = site.wait_profile()
    working = site.working_set(profile)
    replayed_in_cold = [r["mount"].get("profile_replays", 0) for r in cold_runs]

    caches: list[Node] = []

    def profiled_boot(rep: int) -> tuple[float, dict]:
        if caches:
            caches.pop().stop()
        cache, mount = site.cold_mount(f"profile{rep}")
        caches.append(cache)
        before = site.served()["bytes"]
        seconds = site.boot(mount.mountpoint)
        run = {"replica_egress_bytes": site.served()["bytes"] - before,
               "mount": _mount_stats(mount), "cache_fetcher": _fetcher(cache)}
        mount.stop()
        return seconds, run

    local_profiled, profiled, profiled_runs = _alternating(
        ctx, site, reps, "cold site cache with the boot profile", profiled_boot)
    cache = caches[0]  # the last one, which now holds every block of the boot

    def warm_boot(rep: int) -> tuple[float, dict]:
        mount = site.mount(f"warm{rep}", cache)
        before = site.served()["bytes"]
        seconds = site.boot(mount.mountpoint)
        run = {"replica_egress_bytes": site.served()["bytes"] - before, "mount": _mount_stats(mount)}
        mount.stop()
        return seconds, run

    local_warm, warm, warm_runs = _alternating(ctx, site, reps, "warm site cache", warm_boot)
    warm_fetcher = _fetcher(cache)
    cache.stop()

    common = {
        "runs": reps, "accel": site.accel, "filler_bytes": site.filler,
        "working_set_bytes": working["bytes"], "working_set_blocks": working["blocks"],
        "image_distinct_bytes": working["image_distinct_bytes"],
        "baseline": "the same files booted from local disk (icbd boot --mount on a plain folder), caches "
                    "dropped; each row's icbd boots alternate with its own local boots, so that load "
                    "on the host hits both",
    }
    return [
        Result("boot_cold", median(cold), median(local_cold), "s", detail={
            "what": "boot through a fresh mount over a fresh, empty site cache server, every block "
                    "fetched from the replica on demand, no boot profile, caches dropped.",
            **common, "seconds": _rounded(cold), "local_seconds": _rounded(local_cold), "per_run": cold_runs,
            "mount_fetched_over_working_set": _fetched_by_mounts(cold_runs, working["bytes"]),
            "profile_replays_seen": replayed_in_cold,
        }, target=1.3),
        Result("boot_cold_profile", median(profiled), median(local_profiled), "s", detail={
            "what": "the same, but the mount replays the boot profile recorded by an earlier boot: "
                    "the cache server prefetches it from the replica and the mount pulls it into "
                    "memory ahead of the reads, as soon as the version is opened.",
            **common, "seconds": _rounded(profiled), "local_seconds": _rounded(local_profiled),
            "per_run": profiled_runs,
            "mount_fetched_over_working_set": _fetched_by_mounts(profiled_runs, working["bytes"]),
            "profile_blocks": len(profile["digests"]),
        }, target=1.1),
        Result("boot_warm", median(warm), median(local_warm), "s", detail={
            "what": "boot through a fresh mount over a site cache server that holds every block, "
                    "caches dropped.",
            **common, "seconds": _rounded(warm), "local_seconds": _rounded(local_warm), "per_run": warm_runs,
            "cache_fetcher": warm_fetcher,
            "mount_fetched_over_working_set": _fetched_by_mounts(warm_runs, working["bytes"]),
        }, target=1.05),
    ]


# --- boot storm -------------------------------------------------------------------------

def boot_storm(ctx: BenchContext) -> list[Result]:
    site = desktop_site(ctx, "storm")
    desktops = ctx.pick(quick=8, full=16, tiny=8)
    readers = ctx.pick(quick=32, full=64, tiny=8)

    ctx.step("a first desktop boots and records the boot profile")
    cache, mount = site.cold_mount("first")
    first = site.boot(mount.mountpoint)
    profile = site.wait_profile()
    mount.stop()
    cache.stop()
    working = site.working_set(profile)

    ctx.step(f"{desktops} desktops boot at once from local disk")
    drop_caches()
    overlays = Path(tempfile.mkdtemp(dir=ctx.scratch, prefix="overlays-"))
    local_boots = trio.run(_boot_all, [site.local] * desktops, overlays, site.accel)
    shutil.rmtree(overlays, ignore_errors=True)
    for result, _ in local_boots:
        _check(result, site.local)
    local_seconds = [s for _, s in local_boots]

    ctx.step(f"starting {desktops} mounts over one fresh cache server")
    cache = site.cluster.cache("cache-storm", site="a", size="4G")
    mounts = [site.mount(f"storm{i}", cache) for i in range(desktops)]
    drop_caches()
    ctx.step(f"{desktops} desktops boot at once")
    before = site.served()
    overlays = Path(tempfile.mkdtemp(dir=ctx.scratch, prefix="overlays-"))
    with Stopwatch() as storm_watch:
        boots = trio.run(_boot_all, [m.mountpoint for m in mounts], overlays, site.accel)
    after = site.served()
    shutil.rmtree(overlays, ignore_errors=True)
    for (result, _), m in zip(boots, mounts, strict=True):
        _check(result, m.mountpoint)
    fetcher = _fetcher(cache)
    mounts_stats = [_mount_stats(m) for m in mounts]
    for m in mounts:
        m.stop()
    cache.stop()
    egress = after["bytes"] - before["bytes"]

    ctx.step(f"{readers} readers replay the boot profile through one fresh cache server")
    cache = site.cluster.cache("cache-readers", site="a", size="4G")
    before_readers = site.served()
    replay = _replay(cache, working["digests"], readers,
                     Credentials(site.cluster.token("reader"), ca=site.cluster.tls.ca if site.cluster.tls else None))
    after_readers = site.served()
    reader_fetcher = _fetcher(cache)
    cache.stop()
    readers_egress = after_readers["bytes"] - before_readers["bytes"]

    common = {"working_set_bytes": working["bytes"], "working_set_blocks": working["blocks"],
              "image_distinct_bytes": working["image_distinct_bytes"], "filler_bytes": site.filler,
              "baseline": "the boot working set: the bytes of the distinct blocks in the boot profile "
                          "that a first desktop recorded",
              "budget": "replica egress <= 1.05 x the boot working set, whatever N"}
    storm_seconds = [s for _, s in boots]
    return [
        Result("boot_storm", egress, working["bytes"], "bytes", detail={
            "what": f"{desktops} qemu desktops (TCG), each with its own FUSE mount, boot the same version "
                    "at once through one fresh site cache server, with the recorded boot profile; "
                    "value: bytes the replica served meanwhile.",
            "method": "qemu boots", "desktops": desktops, **common,
            "replica_egress_blocks": after["blocks"] - before["blocks"],
            "boot_seconds": _rounded(storm_seconds), "storm_seconds": round(storm_watch.seconds, 3),
            "local_storm_boot_seconds": _rounded(local_seconds),
            "first_boot_seconds": round(first, 3),
            "cache_get_ms_p50": fetcher["get_ms_p50"], "cache_get_ms_p99": fetcher["get_ms_p99"],
            "cache_fetcher": fetcher, "mounts": mounts_stats,
        }, target=1.05),
        Result("boot_storm_readers", readers_egress, working["bytes"], "bytes", detail={
            "what": f"{readers} readers (threads, no qemu) each fetch every block of the boot profile, in "
                    "its order, from one fresh site cache server over HTTP, as a mount does on a miss; "
                    "value: bytes the replica served meanwhile.",
            "method": "readers replaying the recorded boot profile", "readers": readers, **common,
            "replica_egress_blocks": after_readers["blocks"] - before_readers["blocks"],
            "cache_get_ms_p50": reader_fetcher["get_ms_p50"], "cache_get_ms_p99": reader_fetcher["get_ms_p99"],
            "cache_fetcher": reader_fetcher, **replay,
        }, target=1.05),
        Result("boot_storm_seconds", median(storm_seconds), median(local_seconds), "s", detail={
            "what": f"the median boot time of the {desktops} desktops of boot_storm, against {desktops} "
                    "desktops booting at once from local disk (caches dropped). They share the host's "
                    "cores, so both are far slower than one boot; the ratio is what icbd adds. "
                    "No budget is set for it.",
            "desktops": desktops, "seconds": _rounded(storm_seconds), "local_seconds": _rounded(local_seconds),
        }),
    ]


async def _boot_all(roots: list[Path], overlays: Path, accel: str) -> list[tuple[BootResult, float]]:
    results: list[tuple[BootResult, float] | None] = [None] * len(roots)

    async def one(index: int, root: Path) -> None:
        overlay = overlays / str(index)
        overlay.mkdir()
        start = time.perf_counter()
        result = await boot_async(root, IMI, 1, overlay_dir=overlay, timeout=BOOT_TIMEOUT, accel=accel)
        results[index] = (result, time.perf_counter() - start)

    async with trio.open_nursery() as nursery:
        for index, root in enumerate(roots):
            nursery.start_soon(one, index, root)
    return [r for r in results if r is not None]


def _replay(cache: Node, digests: list[str], readers: int, credentials: Credentials) -> dict:
    """`readers` threads, each GETting every block in order; their latencies."""
    latencies: list[list[float]] = [[] for _ in range(readers)]
    errors: list[str] = []
    start = threading.Barrier(readers)

    def read(index: int) -> None:
        with session(credentials) as http:
            start.wait()
            for digest in digests:
                began = time.perf_counter()
                response = http.get(cache.url + block_path(digest, IMI, 1), timeout=120)
                if response.status_code != 200:
                    errors.append(f"{digest}: HTTP {response.status_code}")
                    return
                latencies[index].append(time.perf_counter() - began)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(readers)]
    with Stopwatch() as watch:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} readers failed, e.g. {errors[0]}")
    flat = sorted(x for xs in latencies for x in xs)
    return {
        "replay_seconds": round(watch.seconds, 3),
        "client_ms_p50": round(flat[len(flat) // 2] * 1000, 3),
        "client_ms_p99": round(flat[min(len(flat) - 1, int(0.99 * len(flat)))] * 1000, 3),
        "client_ms_mean": round(statistics.fmean(flat) * 1000, 3),
    }
