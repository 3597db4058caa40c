"""Deltas of images that were rewritten rather than edited in place: copied
over, renamed over, or written fresh by a tool. Each costs, on the wire and
at publish, against what an in-place edit of the same change costs."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from harness.cluster import Cluster, wait_for
from harness.data import MIB, drop_caches, write_image
from icbdcore.wire import SUBSCRIPTIONS_ROUTE

from .context import BenchContext
from .images.ext4 import iter_changed_blocks
from .results import Result
from .transfer import _rsync, _transfer

PAGE = 4096
WAYS = ("cp over it", "new file renamed over it", "fresh file from a tool")


def _new_build(old: Path, new: Path, pages: int) -> int:
    """A rebuild of the image: `pages` 4 KiB blocks changed, spread over it."""
    shutil.copyfile(old, new)
    size = new.stat().st_size
    with open(new, "r+b") as f:
        for i in range(pages):
            f.seek((size // pages) * i + 3 * PAGE)
            f.write(os.urandom(PAGE))
    return pages * PAGE


def write_build(way: str, build: Path, target: Path) -> None:
    """Put `build` at `target` the way an admin would (one of WAYS)."""
    if way == "cp over it":
        subprocess.run(["cp", str(build), str(target)], check=True)
    elif way == "new file renamed over it":
        tmp = target.with_name(f".{target.name}.new")
        shutil.copyfile(build, tmp)
        os.rename(tmp, target)
    else:  # the tool writes a new file where the old one was
        target.unlink()
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", str(build), str(target)], check=True)


def _publish(cluster: Cluster, name: str, replica, version: int) -> dict:
    drop_caches()
    start = time.perf_counter()
    record = cluster.icbd_json("imi", "publish", name)
    published = time.perf_counter() - start
    wait_for(lambda: version in replica.status()["versions"].get(name, []), timeout=900, interval=0.02,
             what=f"{replica.id} to hold {name} v{version}")
    transfer = _transfer(replica, name, version)
    return {"publish_seconds": round(published, 3), "phases": record.get("publish") or {},
            "network_bytes": transfer["network_bytes"], "parent": transfer["parent"]}


def delta_rewritten(ctx: BenchContext) -> list[Result]:
    size = ctx.pick(quick=512 * MIB, full=4 << 30, tiny=24 * MIB)
    pages = 4
    room = f"{6 * size // (1 << 30) + 4}G"  # sparse: what is written counts, not this
    cluster = ctx.cluster("rewritten")
    master = cluster.master(image_size=room)
    replica = cluster.replica("r1", image_size=room)
    source = ctx.scratch / "rewritten-src"
    source.mkdir()
    write_image(source / "disk.img", size)
    build = ctx.scratch / "build.img"
    by_way: dict[str, dict] = {}
    changed = 0
    for way in ("in place", *WAYS):
        name = "inplace" if way == "in place" else f"w{WAYS.index(way)}"
        cluster.icbd("imi", "create", name, "--from", str(source))
        cluster.api("POST", SUBSCRIPTIONS_ROUTE, json={"imi": name, "node": replica.id}).raise_for_status()
        ctx.step(f"rewritten images: first version for '{way}'")
        _publish(cluster, name, replica, 1)
        target = master.data / "work" / name / "disk.img"
        changed = _new_build(source / "disk.img", build, pages)
        if way == "in place":
            _in_place_edit(source / "disk.img", target, build)
        else:
            write_build(way, build, target)
        ctx.step(f"rewritten images: the change, {way}")
        by_way[way] = _publish(cluster, name, replica, 2)
        rsync_dir = ctx.scratch / "rsync"
        (rsync_dir / "old").mkdir(parents=True, exist_ok=True)
        (rsync_dir / "new").mkdir(exist_ok=True)
        shutil.copyfile(source / "disk.img", rsync_dir / "old" / "disk.img")
        shutil.copyfile(build, rsync_dir / "new" / "disk.img")
        by_way[way]["rsync"] = _rsync(rsync_dir / "new", rsync_dir / "old")
        shutil.rmtree(rsync_dir)
        # Each way holds about three images on the master (the parent, the
        # rewritten working copy, a spooled full stream): drop it before the next.
        cluster.icbd("imi", "delete", name)
        wait_for(lambda name=name: name not in replica.status()["versions"], timeout=300, what=f"{replica.id} to drop {name}")
    baseline = changed + MIB
    worst = max(by_way[w]["network_bytes"] for w in WAYS)
    in_place = by_way["in place"]
    rewritten = by_way["cp over it"]
    return [
        Result("delta_rewritten", worst, baseline, "bytes", detail={
            "what": f"bytes on the wire for a {changed // 1024} KiB change ({pages} 4 KiB blocks) to a "
                    f"{size // MIB} MiB image written into the working copy three ways (the worst is the "
                    "value): cp over it, a new file renamed over it, a fresh file written by a tool "
                    "(qemu-img convert); baseline: the changed bytes plus 1 MiB. rsync --inplace "
                    "--no-whole-file's bytes for the same change are under each way.",
            "changed_bytes": changed, "image_bytes": size,
            "by_way": by_way,
            "budget": "bytes on the wire <= 1.05 x changed + 1 MiB, however the image was written",
        }, target=(1.05 * changed + MIB) / baseline),
        Result("delta_rewritten_publish", rewritten["publish_seconds"], in_place["publish_seconds"], "s", detail={
            "what": f"`icbd imi publish` of the {size // MIB} MiB image after the change was copied over it "
                    "(cp), against a publish of the same change edited in place; caches dropped before "
                    "each. Where the time goes is under phases (seconds): snapshot, manifest (reading and "
                    "hashing what does not share the parent's extents), dedupe (the kernel comparing and "
                    "sharing the parent's extents), commit.",
            "rewritten": rewritten, "in_place": in_place,
        }),
    ]


def _in_place_edit(old: Path, target: Path, build: Path) -> None:
    """Write into `target` (which holds `old`) only the blocks where `build`
    differs, as an admin editing the image in place would."""
    with open(old, "rb") as a, open(build, "rb") as b, open(target, "r+b") as out:
        offset = 0
        while y := b.read(MIB):
            x = a.read(MIB)
            if x != y:
                for start in range(0, len(y), PAGE):
                    if x[start:start + PAGE] != y[start:start + PAGE]:
                        out.seek(offset + start)
                        out.write(y[start:start + PAGE])
            offset += len(y)


def delta_desktop_rebuild(ctx: BenchContext) -> list[Result]:
    """The desktop image rebuilt with one more package and written as a fresh
    file, as a build tool writes it: icbd's delta against rsync's."""
    tiny = ctx.pick(quick=False, full=False, tiny=True)
    releases = _small_releases(ctx) if tiny else _desktop_releases(ctx)
    room = f"{4 * releases['image_bytes'] // (1 << 30) + 4}G"
    cluster = ctx.cluster("desktop-rebuild")
    cluster.master(image_size=room)
    replica = cluster.replica("r1", image_size=room)
    by_layout: dict[str, dict] = {}
    for layout in ("kept", "fresh"):
        name = f"desk-{layout}"
        source = ctx.scratch / f"{name}-src"
        source.mkdir()
        shutil.copyfile(releases["old"], source / "rootfs.img")
        cluster.icbd("imi", "create", name, "--from", str(source))
        cluster.api("POST", SUBSCRIPTIONS_ROUTE, json={"imi": name, "node": replica.id}).raise_for_status()
        ctx.step(f"desktop rebuild ({layout} layout): first version")
        _publish(cluster, name, replica, 1)
        build = releases[layout]
        ctx.step(f"desktop rebuild ({layout} layout): the rebuild, written fresh")
        write_build("fresh file from a tool", build, cluster.master_node.data / "work" / name / "rootfs.img")
        result = _publish(cluster, name, replica, 2)
        result["changed_4k_blocks"] = sum(1 for _ in iter_changed_blocks(releases["old"], build))
        rsync_dir = ctx.scratch / "rsync"
        (rsync_dir / "old").mkdir(parents=True)
        (rsync_dir / "new").mkdir()
        shutil.copyfile(releases["old"], rsync_dir / "old" / "rootfs.img")
        shutil.copyfile(build, rsync_dir / "new" / "rootfs.img")
        result["rsync"] = _rsync(rsync_dir / "new", rsync_dir / "old")
        shutil.rmtree(rsync_dir)
        shutil.rmtree(source)
        by_layout[layout] = result
    kept = by_layout["kept"]
    return [Result("delta_desktop_rebuild", kept["network_bytes"], kept["rsync"]["bytes"], "bytes", detail={
        "what": f"bytes on the wire for {releases['what']} rebuilt with one more package "
                f"({releases['package']}) and written over the old image as a fresh file (qemu-img "
                "convert), against rsync --inplace --no-whole-file's bytes for the same two images. "
                "The value is the image built on the previous release's layout (bench/images/ext4.py "
                "with a base: files keep their blocks); under fresh_layout, the same release laid out "
                "from scratch, so that every file after the new one moves.",
        "image_bytes": releases["image_bytes"],
        "kept_layout": kept, "fresh_layout": by_layout["fresh"],
    })]


def _desktop_releases(ctx: BenchContext) -> dict:
    """The Debian desktop (bench/images/debian_desktop.py): release 1, and
    release 2 with `hello` built on release 1's layout and from scratch."""
    from .images.debian_desktop import Recipe, build_debian_desktop
    from .suite import NotAvailable

    folders = {key: ctx.scratch / f"desktop-{key}" for key in ("old", "kept", "fresh")}
    try:
        ctx.step("desktop rebuild: building release 1 (cached by recipe)")
        info = build_debian_desktop(folders["old"], Recipe(label="1"))
        old = folders["old"] / "rootfs.img"
        ctx.step("desktop rebuild: building release 2 on release 1's layout")
        build_debian_desktop(folders["kept"], Recipe(label="2", extra_packages=("hello",), base=old))
        ctx.step("desktop rebuild: building release 2 from scratch")
        build_debian_desktop(folders["fresh"], Recipe(label="2", extra_packages=("hello",)))
    except Exception as error:  # no archive, no mmdebstrap: this host cannot build it
        raise NotAvailable(f"the Debian desktop image cannot be built here: {error}") from error
    return {"old": old, "kept": folders["kept"] / "rootfs.img", "fresh": folders["fresh"] / "rootfs.img",
            "image_bytes": info.image_bytes, "package": "hello",
            "what": f"the Debian desktop image ({info.image_bytes // MIB} MiB, "
                    f"{info.used_bytes // MIB} MiB used)"}


def _small_releases(ctx: BenchContext) -> dict:
    """A small stand-in at the tiny size: this host's Python library as an
    ext4 image, and again with rsync's binary added as the "package"."""
    from .images import ext4

    tree = ctx.scratch / "small-tree"
    shutil.copytree("/usr/lib/python3.11", tree / "usr" / "lib" / "python3.11", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "site-packages", "dist-packages"))
    options = {"epoch": 1_700_000_000, "uuid": bytes(16), "hash_seed": bytes(16), "free_bytes": 16 * MIB}
    old = ctx.scratch / "small-old.img"
    stats = ext4.make_image(tree, old, **options)
    (tree / "usr" / "bin").mkdir(parents=True)
    shutil.copy2("/usr/bin/rsync", tree / "usr" / "bin" / "rsync")
    kept, fresh = ctx.scratch / "small-kept.img", ctx.scratch / "small-fresh.img"
    ext4.make_image(tree, kept, base=old, **options)
    ext4.make_image(tree, fresh, **options)
    image_bytes = stats.geometry.blocks_count * ext4.BLOCK
    return {"old": old, "kept": kept, "fresh": fresh, "image_bytes": image_bytes, "package": "/usr/bin/rsync",
            "what": f"a small ext4 image of this host's /usr/lib/python3.11 ({image_bytes // MIB} MiB)"}
