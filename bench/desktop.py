"""Booting a real desktop through icbd, against booting the same files from
local disk: the rows desktop_*.

The desktop is the Debian one (bench/images/debian_desktop.py: systemd,
Xorg, a window manager and a terminal) in the quick and full sizes, and the
small busybox one in the tests' tiny size. Every boot runs until the guest
says its session is up (`icbd boot`'s readiness from its serial line) and
is timed from the call to that line; caches are dropped first. The tree is
built in SCRATCH/local/desk/1, which is also the "local disk" that `icbd
boot --mount SCRATCH/local` boots and the source of the iMI.

1. cold: local boots and boots through a fresh mount over a fresh, empty
   site cache server alternate; no boot profile (--no-profiles), but for
   the last cold boot, which records the profile (it ends when the guest's
   session comes up) and keeps a read trace of the boot;
2. profile: the same with the profile replayed (fresh cache and mount each);
3. warm: fresh mounts over the last cache server, which holds every block;
4. replay: the recording boot's read trace played back at full speed
   (icbd/replay.py) against the local files and against a mount: cold,
   with the profile, warm, alternating with local replays;
5. storm: N desktops, each with its own mount, boot at once through one
   fresh cache server; replica egress against the boot's working set.

Each time row's baseline is the median of the local boots (or replays) that
alternate with it, so a host that grows busier over the run weighs on both
sides of a ratio. Bytes the guest read are qemu's block statistics at the
session line plus the kernel and initrd (qemu reads those whole); bytes
fetched are what the mount fetched from its cache server and what the
upstream tier (the replica, and the master: a cache fills from either) sent,
whichever is more; blocks read come from the boot's read
trace and the manifest.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trio

from harness.cluster import Cluster, MountProcess, Node, wait_for
from harness.data import drop_caches
from icbd.boot import BootResult, Screen, boot, boot_async, choose_accel
from icbd.replay import replay
from icbdcore.manifest import Manifest
from icbdcore.trace import TracedRead, read_trace

from .booting import chunk_sizes, master_manifest, master_profile
from .context import BenchContext
from .results import Result, Stopwatch, median

log = logging.getLogger(__name__)

IMI = "desk"
MOUNT_TIMEOUT = 120.0  # a read may wait this long: 2 cores shared by up to 8 Debian desktops under TCG
PROFILE_WAIT = 120.0


@dataclass
class BootRun:
    """One boot and what the nodes said about it."""

    seconds: float  # from the call to the session line
    guest_bytes: int  # what the guest read: its disk (qemu's statistics) plus kernel and initrd
    fetched_bytes: int = 0  # the larger of what the mount fetched and what the upstream tier sent
    detail: dict = field(default_factory=dict)
    trace: list[TracedRead] = field(default_factory=list)


@dataclass
class DesktopSite:
    ctx: BenchContext
    cluster: Cluster
    replica: Node
    local: Path  # laid out like a mount: local/desk/1, local/desk/latest
    accel: str
    image: str  # "debian" or "small"
    boot_files_bytes: int  # kernel and initrd, which qemu reads whole
    timeout: float
    overrides: dict[str, str] | None = None  # icbd-boot.toml settings to change (the small desktop: stay up)
    _manifest: Manifest | None = None
    _counter: int = 0

    # --- booting -------------------------------------------------------------------------

    def boot(self, root: Path, screenshot: Path | None = None) -> tuple[float, BootResult]:
        """Boot from `root` (a mount or the local copy), caches dropped first, until
        the session line; (seconds to it, the result)."""
        drop_caches()
        overlay = Path(tempfile.mkdtemp(dir=self.ctx.scratch, prefix="overlay-"))
        screen = Screen(screenshot=screenshot) if screenshot else Screen(stop_when_ready=True)
        try:
            with Stopwatch() as watch:
                result = boot(root, IMI, 1, overlay_dir=overlay, timeout=self.timeout, accel=self.accel,
                              screen=screen, overrides=self.overrides)
        finally:
            shutil.rmtree(overlay, ignore_errors=True)
        check(result, root)
        return until_ready(watch.seconds, result), result

    def local_boot(self) -> float:
        return self.boot(self.local)[0]

    def icbd_boot(self, cache: Node, trace: Path, *, profiles: bool = True,
                  screenshot: Path | None = None) -> BootRun:
        """Boot through a fresh mount over `cache` (counting from before the mount
        starts: its first look at the version starts the profile's replay)."""
        before = self.served()
        fetched_before = cache.status()["fetcher"].get("upstream_bytes", 0)
        mount = self.mount(cache, profiles=profiles, trace=trace)
        seconds, result = self.boot(mount.mountpoint, screenshot)
        egress = self.served() - before
        stats = mount_stats(mount)
        fetched = max(stats.get("source_bytes", 0), egress)
        run = BootRun(seconds, self.guest_bytes(result), fetched, {
            "seconds": round(seconds, 3), "guest_disk_read_bytes": result.disk_read_bytes,
            "guest_disk_reads": result.disk_read_ops, "upstream_egress_bytes": egress,
            "cache_fetched_bytes": cache.status()["fetcher"].get("upstream_bytes", 0) - fetched_before,
            "mount": stats})
        run.trace = read_trace_when_written(trace, mount)
        return run

    def guest_bytes(self, result: BootResult) -> int:
        return (result.disk_read_bytes or 0) + self.boot_files_bytes

    # --- nodes ---------------------------------------------------------------------------

    def name(self, what: str) -> str:
        self._counter += 1
        return f"{what}{self._counter}"

    def fresh_cache(self) -> Node:
        return self.cluster.cache(self.name("cache"), site="a", size="4G")

    def mount(self, cache: Node, *, profiles: bool = True, trace: Path | None = None) -> MountProcess:
        extra = ["--profile-quiet", "2"]
        if not profiles:
            extra.append("--no-profiles")
        if trace is not None:
            extra += ["--trace", str(trace)]
        mount = self.cluster.mount(self.name("mnt"), cache=cache, timeout=MOUNT_TIMEOUT, extra=extra)
        # is_symlink, not exists: following `latest` would load the version and start its replay now.
        wait_for(lambda: (mount.mountpoint / IMI / "latest").is_symlink(), timeout=60,
                 what="the mount to list the desktop")
        return mount

    def served(self) -> int:
        """Bytes of blocks the upstream tier (the replica and the master, which serves every
        version too) has sent so far."""
        return sum(node.status()["served"]["bytes"] for node in (self.replica, self.cluster.master_node))

    def served_by(self) -> dict[str, int]:
        return {node.id: node.status()["served"]["bytes"] for node in (self.replica, self.cluster.master_node)}

    def profile(self) -> dict | None:
        return master_profile(self.cluster)

    def manifest(self) -> Manifest:
        if self._manifest is None:
            self._manifest = master_manifest(self.cluster)
        return self._manifest

    def block_sizes(self) -> dict[str, int]:
        return chunk_sizes(self.manifest())

    def blocks_read(self, reads: list[TracedRead]) -> list[str]:
        """The distinct blocks a trace's reads touched, in first-read order."""
        manifest = self.manifest()
        chunk = manifest.chunk_size
        entries = {f"{IMI}/1/{e.path}": e for e in manifest.files()}
        out: dict[str, None] = {}
        for read in reads:
            entry = entries.get(read.file)
            if entry is None or not read.len or read.off >= entry.size:
                continue
            last = (min(read.off + read.len, entry.size) - 1) // chunk
            for index in range(read.off // chunk, last + 1):
                out.setdefault(entry.chunks[index])
        return list(out)


def until_ready(seconds: float, result: BootResult) -> float:
    """Seconds from the call to the session line (the run went on a little to stop qemu)."""
    if result.ready_seconds is None:
        return seconds
    return seconds - (result.seconds - result.ready_seconds)


def check(result: BootResult, root: Path) -> None:
    if result.outcome != "ready":
        tail = result.console_text.strip().splitlines()[-5:]
        raise RuntimeError(f"the desktop did not reach its session from {root}: {result.outcome}: "
                           f"{result.message}; console ends: {' / '.join(tail)}")


def mount_stats(mount: MountProcess) -> dict:
    try:
        status = mount.status()
    except (OSError, ValueError):
        return {}
    keep = ("reads", "read_bytes", "eio", "source_blocks", "source_bytes", "readahead_blocks",
            "prefetch_calls", "prefetch_blocks", "profile_replays", "profile_blocks", "follow_blocks",
            "profile_blocks_ready", "profile_blocks_late", "profiles_recorded", "profiles_saved",
            "lru_hits", "lru_misses", "coalesced", "profile_recordings")
    return {k: status[k] for k in keep if k in status}


def read_trace_when_written(trace: Path, mount: MountProcess) -> list[TracedRead]:
    """The mount's read trace, once the mount has stopped (it writes the rest then)."""
    mount.stop()
    return read_trace(trace)


def rounded(values: list[float]) -> list[float]:
    return [round(v, 3) for v in values]


# --- the site ---------------------------------------------------------------------------

def desktop_site(ctx: BenchContext) -> DesktopSite:
    from .images.debian_desktop import build_debian_desktop
    from .images.desktop import ImageBuildError, build_desktop_tree
    from .suite import NotAvailable

    local = ctx.scratch / "local"
    tree = local / IMI / "1"
    if not shutil.which("qemu-system-x86_64"):
        raise NotAvailable("qemu-system-x86_64 is not installed")
    image = ctx.pick(quick="debian", full="debian", tiny="small")
    try:
        if image == "debian":
            ctx.step("building the Debian desktop image (cached after the first build)")
            build_debian_desktop(tree)
        else:
            ctx.step("building the small desktop image")
            build_desktop_tree(tree, label="1")
    except ImageBuildError as error:
        raise NotAvailable(f"cannot build the {image} desktop here: {error}") from None
    (local / IMI / "latest").symlink_to("1")
    accel = trio.run(choose_accel, "auto", tree / "boot" / "vmlinuz")
    cluster = ctx.cluster("desktop")
    room = "6G" if image == "debian" else "2G"
    cluster.master(image_size=room)
    replica = cluster.replica("r1", site="a", image_size=room)
    ctx.step("publishing the desktop image")
    cluster.icbd("imi", "create", IMI, "--from", str(tree))
    cluster.icbd("imi", "publish", IMI)
    cluster.icbd("subscribe", IMI, "--node", replica.id)
    cluster.wait_held(replica, IMI, [1], timeout=900)
    boot_files = sum((tree / "boot" / name).stat().st_size for name in ("vmlinuz", "initrd.img"))
    timeout = 900.0 if image == "debian" else 300.0
    overrides = None
    if image == "small":  # it powers off right after its session line: keep it up until we stop it
        with open(tree / "icbd-boot.toml", "rb") as f:
            overrides = {"append": tomllib.load(f)["append"] + " icbd.stay"}
    return DesktopSite(ctx, cluster, replica, local, accel, image, boot_files, timeout, overrides)


# --- the benchmark ----------------------------------------------------------------------

def desktop(ctx: BenchContext) -> Iterator[Result]:
    site = desktop_site(ctx)
    reps = ctx.pick(quick=3, full=5, tiny=1)
    desktops = 8
    if site.profile() is not None:
        raise RuntimeError("the master holds a boot profile before any boot")
    common = {"image": site.image, "accel": site.accel, "runs": reps,
              "baseline": "the same files booted from local disk (icbd boot --mount on a plain folder), caches "
                          "dropped, alternating with the icbd boots of the same row"}

    # 1. cold, no profile; the last cold boot records the profile and its trace.
    local_cold, cold = [], []
    recording: BootRun | None = None
    for rep in range(reps):
        ctx.step(f"cold {rep + 1}/{reps}: local disk")
        local_cold.append(site.local_boot())
        ctx.step(f"cold {rep + 1}/{reps}: fresh site cache" + (", recording the profile" if rep == reps - 1 else ""))
        cache = site.fresh_cache()
        trace = ctx.scratch / f"trace-cold{rep}.jsonl"
        run = site.icbd_boot(cache, trace, profiles=rep == reps - 1)
        cache.stop()
        cold.append(run)
        recording = run
    assert recording is not None
    ctx.step("waiting for the boot profile at the master")
    profile = wait_for(site.profile, timeout=PROFILE_WAIT, interval=0.5, what="the boot profile at the master")
    sizes = site.block_sizes()
    profile_blocks = [d for d in dict.fromkeys(profile["digests"]) if d in sizes]
    working_set = sum(sizes[d] for d in profile_blocks)
    recorded = recording.detail["mount"].get("profile_recordings", {}).get(f"{IMI}@1", {})
    yield Result("desktop_boot_cold", median([r.seconds for r in cold]), median(local_cold), "s", detail={
        "what": f"boot of the {site.image} desktop to its session through a fresh mount over a fresh, empty site "
                "cache server, every block fetched from the replica on demand, no boot profile.",
        **common, "seconds": rounded([r.seconds for r in cold]), "local_seconds": rounded(local_cold),
        "per_run": [r.detail for r in cold],
        "read_amplification": [round(r.fetched_bytes / r.guest_bytes, 3) for r in cold],
    }, target=1.3)

    # 2. with the profile.
    local_profiled, profiled = [], []
    last_cache: Node | None = None
    for rep in range(reps):
        ctx.step(f"profile {rep + 1}/{reps}: local disk")
        local_profiled.append(site.local_boot())
        ctx.step(f"profile {rep + 1}/{reps}: fresh site cache, the profile replayed")
        if last_cache is not None:
            last_cache.stop()
        cache = last_cache = site.fresh_cache()
        trace = ctx.scratch / f"trace-profile{rep}.jsonl"
        profiled.append(site.icbd_boot(cache, trace))
    yield Result("desktop_boot_profile", median([r.seconds for r in profiled]), median(local_profiled), "s",
                 detail={
                     "what": f"the same, the mount replaying the boot profile an earlier boot recorded "
                             f"({len(profile_blocks)} blocks): the cache server prefetches it from the "
                             "replica and the mount pulls it into memory ahead of the reads.",
                     **common, "seconds": rounded([r.seconds for r in profiled]),
                     "local_seconds": rounded(local_profiled), "per_run": [r.detail for r in profiled],
                 }, target=1.1)

    # 3. warm: fresh mounts over the last cache server, which holds every block; the screen at the end.
    local_warm, warm = [], []
    screenshot = ctx.scratch / "desktop.png"
    assert last_cache is not None
    for rep in range(reps):
        ctx.step(f"warm {rep + 1}/{reps}: local disk")
        local_warm.append(site.local_boot())
        ctx.step(f"warm {rep + 1}/{reps}: site cache holding every block")
        trace = ctx.scratch / f"trace-warm{rep}.jsonl"
        shot = screenshot if rep == reps - 1 else None
        warm.append(site.icbd_boot(last_cache, trace, screenshot=shot))
    attachments = {"desktop.png": screenshot.read_bytes()} if screenshot.exists() else {}
    yield Result("desktop_boot_warm", median([r.seconds for r in warm]), median(local_warm), "s", detail={
        "what": "the same through fresh mounts over a site cache server that holds every block of the boot "
                "(the mount replays the profile into its memory, as any mount does).",
        **common, "seconds": rounded([r.seconds for r in warm]), "local_seconds": rounded(local_warm),
        "per_run": [r.detail for r in warm], "screenshot": "desktop.png" if attachments else None,
    }, target=1.05, attachments=attachments)

    # Read amplification and coverage, from the profiled boots.
    fetched = sum(r.fetched_bytes for r in profiled)
    guest = sum(r.guest_bytes for r in profiled)
    yield Result("desktop_read_amplification", fetched, guest, "bytes", detail={
        "what": "bytes fetched for a boot with the profile (the more of what the mount fetched from its cache "
                "server and what the replica and master sent) against the bytes the guest read (qemu's block statistics "
                "at the session line, plus the kernel and initrd qemu reads whole): what 1 MiB blocks cost "
                "around 4-64 KiB guest reads. Sums over the profiled boots.",
        "per_run": [{"fetched_bytes": r.fetched_bytes, "guest_bytes": r.guest_bytes,
                     "ratio": round(r.fetched_bytes / r.guest_bytes, 3)} for r in profiled],
        "without_profile": [round(r.fetched_bytes / r.guest_bytes, 3) for r in cold],
        "chunk_size": site.manifest().chunk_size, "image": site.image,
    }, target=1.5)
    read_sets = [site.blocks_read(r.trace) for r in profiled]
    in_profile = set(profile_blocks)
    covered = sum(len([d for d in blocks if d in in_profile]) for blocks in read_sets)
    total = sum(len(blocks) for blocks in read_sets)
    ready = sum(r.detail["mount"].get("profile_blocks_ready", 0) for r in profiled)
    late = sum(r.detail["mount"].get("profile_blocks_late", 0) for r in profiled)
    yield Result("desktop_profile_coverage", covered, total, "blocks", detail={
        "what": "the blocks later boots read that the recorded profile holds, against the blocks they read "
                "(from their read traces and the manifest), summed over the profiled boots.",
        "profile_blocks": len(profile_blocks), "profile_bytes": working_set,
        "recording_ended_by": recorded.get("ended_by"), "recording_blocks": recorded.get("blocks"),
        "blocks_read_per_boot": [len(b) for b in read_sets],
        "profile_blocks_ready_before_read": ready, "profile_blocks_read_late": late,
        "ready_share": round(ready / (ready + late), 3) if ready + late else None,
        "blocks_read_by_the_recording_boot": len(site.blocks_read(recording.trace)),
    }, target=0.95, higher_is_better=True)

    # 4. the recording boot's trace, replayed at full speed.
    reads = recording.trace
    replays: dict[str, list[float]] = {"cold": [], "profile": [], "warm": []}
    pairs: dict[str, list[float]] = {"cold": [], "profile": [], "warm": []}
    replay_detail: dict[str, list] = {k: [] for k in replays}
    local_detail: dict[str, list] = {k: [] for k in pairs}

    def replay_local(kind: str) -> float:
        drop_caches()
        result = replay(reads, site.local)
        local_detail[kind].append(result.to_json())
        return result.seconds

    for rep in range(reps):
        for kind in ("cold", "profile", "warm"):
            ctx.step(f"replay {rep + 1}/{reps}: local disk, then {kind}")
            pairs[kind].append(replay_local(kind))
            cache = last_cache if kind == "warm" else site.fresh_cache()
            mount = site.mount(cache, profiles=kind != "cold")
            drop_caches()
            result = replay(reads, mount.mountpoint)
            replays[kind].append(result.seconds)
            replay_detail[kind].append({**result.to_json(), "mount": mount_stats(mount)})
            mount.stop()
            if cache is not last_cache:
                cache.stop()
    trace_info = {"reads": len(reads), "bytes": sum(r.len for r in reads),
                  "traced_seconds": round(max((r.end for r in reads), default=0.0), 3),
                  "at_most_in_flight": max((d["threads"] for d in replay_detail["cold"]), default=None)}
    what = {"cold": "through a fresh mount over a fresh, empty site cache server (no profile)",
            "profile": "through a fresh mount over a fresh cache server, replaying the boot profile",
            "warm": "through a fresh mount over the site cache server that holds every block"}
    targets = {"cold": 2.0, "profile": 1.2, "warm": 1.1}
    for kind in ("cold", "profile", "warm"):
        yield Result(f"desktop_replay_{kind}", median(replays[kind]), median(pairs[kind]), "s", detail={
            "what": f"the recording boot's read trace played back at full speed (icbd replay: each read as soon "
                    f"as the reads that ended before it in the trace are done, as many at once as the guest "
                    f"had), {what[kind]}, caches dropped: what a boot under a hypervisor that does not spend "
                    f"40 s on the CPU would wait for. Baseline: the same replay of the local files (O_DIRECT).",
            "trace": trace_info, "seconds": rounded(replays[kind]), "local_seconds": rounded(pairs[kind]),
            "runs": replay_detail[kind], "local_runs": local_detail[kind],
        }, target=targets[kind])
    last_cache.stop()

    # 5. the storm.
    ctx.step(f"{desktops} desktops boot at once, each with its own mount, through one fresh cache server")
    cache = site.fresh_cache()
    before, before_by = site.served(), site.served_by()
    mounts = [site.mount(cache) for _ in range(desktops)]
    drop_caches()
    overlays = Path(tempfile.mkdtemp(dir=ctx.scratch, prefix="overlays-"))
    with Stopwatch() as storm:
        boots = trio.run(boot_all, [m.mountpoint for m in mounts], overlays, site.accel, 2 * site.timeout,
                         site.overrides)
    egress = site.served() - before
    egress_by = {k: v - before_by[k] for k, v in site.served_by().items()}
    shutil.rmtree(overlays, ignore_errors=True)
    for (result, _), m in zip(boots, mounts, strict=True):
        check(result, m.mountpoint)
    fetcher = cache.status()["fetcher"]
    stats = [mount_stats(m) for m in mounts]
    for m in mounts:
        m.stop()
    cache.stop()
    seconds = [until_ready(s, r) for r, s in boots]
    yield Result("desktop_storm_egress", egress, working_set, "bytes", detail={
        "what": f"{desktops} desktops, each with its own mount (as {desktops} machines would have), boot to their "
                "session at once through one fresh site cache server, replaying the boot profile; value: bytes "
                "the upstream tier (the replica, and the master, which a cache also fills from) sent meanwhile; "
                "baseline: the boot's working set, the bytes of the profile's blocks.",
        "egress_by_node": egress_by,
        "desktops": desktops, "working_set_bytes": working_set, "working_set_blocks": len(profile_blocks),
        "seconds": rounded(seconds), "median_seconds": round(statistics.median(seconds), 3),
        "storm_seconds": round(storm.seconds, 3), "single_local_boot_seconds": round(median(local_warm), 3),
        "cache_fetcher": {k: fetcher.get(k) for k in ("gets", "hits", "coalesced", "demand_fetches",
                                                      "prefetched", "upstream_bytes", "get_ms_p50", "get_ms_p99")},
        "mounts": stats, "image": site.image, "accel": site.accel,
    }, target=1.05)


async def boot_all(roots: list[Path], overlays: Path, accel: str, timeout: float,
                   overrides: dict[str, str] | None) -> list[tuple[BootResult, float]]:
    results: list[tuple[BootResult, float] | None] = [None] * len(roots)

    async def one(index: int, root: Path) -> None:
        overlay = overlays / str(index)
        overlay.mkdir()
        start = time.perf_counter()
        result = await boot_async(root, IMI, 1, overlay_dir=overlay, timeout=timeout, accel=accel,
                                  screen=Screen(stop_when_ready=True), overrides=overrides)
        results[index] = (result, time.perf_counter() - start)

    async with trio.open_nursery() as nursery:
        for index, root in enumerate(roots):
            nursery.start_soon(one, index, root)
    return [r for r in results if r is not None]
