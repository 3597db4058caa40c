"""A real root tree through the mount: walked and read, cold and warm, against
the same operations on the replica's own copy with caches dropped.

The tree is the Debian desktop image's root (bench/images/debian_desktop.py,
built from Debian packages and cached), copied out of its ext4 image: a few
hundred MiB in thousands of files, most of them small. The tiny size (the
tests') uses Python's standard library from this host instead.

Rows (value: seconds through the mount; baseline: the same on the replica's
local copy, page cache dropped):

- tree_walk_cold, tree_walk_warm: `find -printf '%s %m'` (walk and stat
  everything) through a new mount, then again;
- tree_read_cold: `tar cf - . | cat` through a new mount over a cache server
  that holds nothing (every block from the replica);
- tree_read_site_cache: the same through a new mount over the now filled
  cache server, page cache dropped;
- tree_read_warm: again through that mount.

The detail gives fetches per file and bytes fetched against bytes read.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from harness.cluster import Cluster, wait_for
from harness.data import drop_caches
from icbdcore.manifest import Manifest

from .context import BenchContext
from .results import Result, median

WALK = "find . -printf '%s %m\\n' > /dev/null"
READ = "tar cf - . | cat > /dev/null"
SMALL_TREE = Path("/usr/lib/python3.11")


def _timed(command: str, folder: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, shell=True, cwd=folder, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    return time.perf_counter() - started


def _debian_root(ctx: BenchContext, dest: Path) -> str:
    """Copy the Debian desktop's root tree to `dest`; what it is, for the report."""
    from .images.debian_desktop import build_debian_desktop
    from .suite import NotAvailable

    image_dir = ctx.scratch / "desktop-image"
    try:
        build_debian_desktop(image_dir)
    except Exception as error:  # no archive, no mmdebstrap: this host cannot build it
        raise NotAvailable(f"the Debian desktop image cannot be built here: {error}") from error
    mountpoint = Path(tempfile.mkdtemp(dir=ctx.scratch, prefix="rootfs-"))
    subprocess.run(["mount", "-o", "loop,ro,nosuid,nodev", str(image_dir / "rootfs.img"), str(mountpoint)],
                   check=True, capture_output=True)
    try:
        subprocess.run(["cp", "-a", f"{mountpoint}/.", str(dest)], check=True, capture_output=True)
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True, capture_output=True)
        mountpoint.rmdir()
    shutil.rmtree(image_dir, ignore_errors=True)
    if (dest / "lost+found").exists():
        shutil.rmtree(dest / "lost+found")
    return "the root tree of the Debian bookworm desktop image (bench/images/debian_desktop.py)"


def trees(ctx: BenchContext) -> list[Result]:
    runs = ctx.pick(quick=3, full=5, tiny=1)
    source = ctx.scratch / "tree-source"
    source.mkdir()
    if ctx.pick(quick=False, full=False, tiny=True):
        shutil.copytree(SMALL_TREE, source / "py", symlinks=True)
        what = f"{SMALL_TREE} of this host"
    else:
        ctx.step("trees: the Debian root tree")
        what = _debian_root(ctx, source)
    cluster: Cluster = ctx.cluster("trees")
    cluster.master(image_size="8G")
    r1 = cluster.replica("r1", image_size="8G")
    cluster.icbd("imi", "create", "root", "--from", str(source))
    shutil.rmtree(source)
    cluster.icbd("imi", "publish", "root")
    cluster.icbd("subscribe", "root", "--node", "r1")
    cluster.wait_held(r1, "root", [1], timeout=900)
    local = r1.data / "imis" / "root" / "1"
    manifest = Manifest.from_bytes((r1.data / "meta" / "root" / "1.manifest.json").read_bytes())
    files = sum(1 for e in manifest.files())
    tree_bytes = manifest.bytes

    times: dict[str, list[float]] = {k: [] for k in (
        "local_walk", "local_read", "walk_cold", "walk_warm", "read_cold", "read_site_cache", "read_warm")}
    fetches: dict[str, list[int]] = {"read_cold": [], "read_site_cache": []}
    fetched_bytes: list[int] = []
    for run in range(runs):
        ctx.step(f"trees: run {run + 1}/{runs}, the replica's local copy")
        drop_caches()
        times["local_walk"].append(_timed(WALK, local))
        drop_caches()
        times["local_read"].append(_timed(READ, local))
        cache = cluster.cache(f"c{run}", size="4G")
        wait_for(lambda c=cache: c.status()["fetcher"]["upstreams"], what="the cache to know the replica")
        ctx.step(f"trees: run {run + 1}/{runs}, walks and a cold read through a mount")
        mount = cluster.mount(f"walk{run}", cache=cache, timeout=60)
        version = mount.mountpoint / "root" / "1"
        drop_caches()
        times["walk_cold"].append(_timed(WALK, version))
        times["walk_warm"].append(_timed(WALK, version))
        mount.stop()
        mount = cluster.mount(f"cold{run}", cache=cache, timeout=60)
        drop_caches()
        times["read_cold"].append(_timed(READ, mount.mountpoint / "root" / "1"))
        status = mount.status()
        fetches["read_cold"].append(status["source_blocks"])
        fetched_bytes.append(status["source_bytes"])
        mount.stop()
        ctx.step(f"trees: run {run + 1}/{runs}, reads over a filled site cache")
        mount = cluster.mount(f"site{run}", cache=cache, timeout=60)
        drop_caches()
        times["read_site_cache"].append(_timed(READ, mount.mountpoint / "root" / "1"))
        fetches["read_site_cache"].append(mount.status()["source_blocks"])
        times["read_warm"].append(_timed(READ, mount.mountpoint / "root" / "1"))
        mount.stop()
        cache.stop()

    common = {
        "tree": what, "files": files, "tree_bytes": tree_bytes, "entries": len(manifest.entries),
        "packs": len(manifest.packs), "blocks_in_read_set": len(manifest.read_set()),
        "runs": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }
    read_detail = {
        **common,
        "fetches_per_file_cold": round(median(fetches["read_cold"]) / files, 4),
        "fetches_cold": fetches["read_cold"], "fetches_site_cache": fetches["read_site_cache"],
        "bytes_fetched_over_read": round(median(fetched_bytes) / tree_bytes, 3) if tree_bytes else None,
    }

    def row(name: str, key: str, base: str, target: float, about: str, detail: dict) -> Result:
        return Result(name, median(times[key]), median(times[base]), "s",
                      detail={**detail, "what": about}, target=target)

    return [
        row("tree_walk_cold", "walk_cold", "local_walk", 2.0,
            "find -printf '%s %m' over the whole tree through a new mount (caches dropped), against the "
            "replica's local copy (caches dropped)", common),
        row("tree_walk_warm", "walk_warm", "local_walk", 1.2,
            "the same walk again through the same mount, against the local copy's cold walk", common),
        row("tree_read_cold", "read_cold", "local_read", 3.0,
            "tar cf - . | cat through a new mount over a cache server that holds nothing (every block from "
            "the replica), against the same on the local copy (caches dropped)", read_detail),
        row("tree_read_site_cache", "read_site_cache", "local_read", 2.0,
            "the same through a new mount over the filled cache server (caches dropped)", read_detail),
        row("tree_read_warm", "read_warm", "local_read", 1.2,
            "the same again through that mount (its memory and the page cache warm)", read_detail),
    ]
