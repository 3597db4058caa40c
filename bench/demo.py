"""`make demo`: the whole job on one machine, end to end.

A master, two replicas (sites a and b) and a site cache server on loopback;
a bootable desktop iMI built from Debian packages, published and replicated,
then changed and replicated again as a delta; the iMI mounted through the
site cache; a desktop booted from the mount under qemu. Everything runs in a
scratch folder that is removed afterwards (unless --keep).

The desktop is the real one (bench/images/debian_desktop.py: systemd, Xorg,
a window manager and a terminal) where it can be built here (root, mmdebstrap,
the Debian mirror or its packages cached), booted to its session and saved as
a screenshot in demo-out/; release 2 adds one package. Elsewhere it is the
small busybox desktop (bench/images/desktop.py), which powers off once booted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.images.debian_desktop import Recipe, build_debian_desktop
from bench.images.desktop import ImageBuildError, build_desktop_tree
from harness.cluster import Cluster, wait_for
from icbd.boot import Screen, boot

OUT = Path("demo-out")


def say(text: str = "") -> None:
    print(text, flush=True)


def step(title: str) -> None:
    say()
    say(f"== {title}")


def run_icbd(cluster: Cluster, *args: str) -> str:
    say(f"$ icbd {' '.join(shlex.quote(a) for a in args)}")
    out = cluster.icbd(*args).stdout
    for line in out.rstrip().splitlines():
        say(f"  {line}")
    return out


def transfer_of(node, name: str, version: int) -> dict:
    return [t for t in node.status()["transfers"] if t["imi"] == name and t["version"] == version
            and t["state"] == "done"][-1]


class Desktop:
    """The desktop the demo shows: the Debian one if it builds here, else the small one."""

    def __init__(self, scratch: Path, small: bool) -> None:
        self.scratch = scratch
        self.real = not small
        self.why_small = "asked for (--small)" if small else ""

    def build(self, release: int) -> Path:
        tree = self.scratch / f"desktop-tree-{release}"
        if self.real:
            recipe = Recipe(label=str(release)) if release == 1 else Recipe(
                label=str(release), extra_packages=("hello",),
                base=self.scratch / "desktop-tree-1" / "rootfs.img")
            try:
                info = build_debian_desktop(tree, recipe)
                say(f"  {'from the build cache' if info.cached else 'built'} in {info.seconds:.1f} s: "
                    f"{info.packages} packages, {info.files:,} files, "
                    f"{info.used_bytes / 1e6:.0f} MB used in a {info.image_bytes / 1e6:.0f} MB image")
                return tree
            except ImageBuildError as error:
                if release != 1:
                    raise
                self.real = False
                self.why_small = str(error)
                say(f"  cannot build the Debian desktop here ({error}): the small busybox desktop instead")
        return build_desktop_tree(tree, label=str(release))

    @property
    def what(self) -> str:
        return ("the Debian desktop (systemd, Xorg, twm, xterm)" if self.real
                else "the small busybox desktop")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="leave the nodes running and the folder in place")
    parser.add_argument("--small", action="store_true", help="the small busybox desktop even if the Debian one builds")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        say("the demo mounts btrfs images and a FUSE filesystem: run it as root")
        return 1
    scratch = Path(tempfile.mkdtemp(prefix="icbd-demo-", dir="/var/tmp"))
    cluster = Cluster(scratch, suspect_after=3, down_after=6, heartbeat=1)
    started = time.monotonic()
    try:
        desktop = Desktop(scratch, args.small)
        step("building a desktop iMI from Debian packages")
        tree = desktop.build(1)
        say(f"  {desktop.what}:")
        for path in sorted(tree.rglob("*")):
            if path.is_file():
                say(f"  {path.relative_to(tree)}  ({path.stat().st_size:,} bytes)")

        step("starting a master, two replicas (sites a and b) and a site cache (site a) on loopback")
        master = cluster.master(image_size="8G")
        near = cluster.replica("replica-a", site="a", image_size="8G")
        far = cluster.replica("replica-b", site="b", image_size="8G")
        cache = cluster.cache("cache-a", site="a", size="2G")
        for node in (master, near, far, cache):
            say(f"  {node.role:<8} {node.id:<10} {node.url}   (log: {cluster.root / (node.id + '.log')})")
        say(f"  environment for your own icbd commands: ICBD_MASTER={master.url} ICBD_TOKEN={cluster.env['ICBD_TOKEN']}")

        step("creating and publishing the iMI; both replicas subscribe and receive it in full")
        run_icbd(cluster, "imi", "create", "desktop", "--from", str(tree))
        run_icbd(cluster, "imi", "publish", "desktop", "--message", "first release")
        for replica in (near, far):
            run_icbd(cluster, "subscribe", "desktop", "--node", replica.id)
        for replica in (near, far):
            cluster.wait_held(replica, "desktop", [1], timeout=600)
        full = transfer_of(near, "desktop", 1)

        step("release 2: a small change (" + ("one more package, hello" if desktop.real else "its label")
             + "), published and replicated as a btrfs delta")
        second = desktop.build(2)
        work = Path(cluster.icbd("imi", "path", "desktop").stdout.strip())
        subprocess.run(["rsync", "-a", "--checksum", "--inplace", "--no-whole-file", "--delete",
                        f"{second}/", f"{work}/"], check=True)
        run_icbd(cluster, "imi", "publish", "desktop", "--message", "second release")
        for replica in (near, far):
            cluster.wait_held(replica, "desktop", [1, 2], timeout=600)
        delta = transfer_of(near, "desktop", 2)
        run_icbd(cluster, "imi", "versions", "desktop")
        run_icbd(cluster, "status")

        step("mounting every iMI through the site cache (FUSE, read-only, lazy)")
        mount = cluster.mount("imis", cache=cache)
        latest = mount.mountpoint / "desktop" / "latest"
        # The mount learns the catalogue from the cache server: wait until it shows release 2.
        wait_for(lambda: latest.is_symlink() and os.readlink(latest) == "2", timeout=30,
                 what="the mount to show release 2 as latest")
        say(f"$ ls {mount.mountpoint}/desktop  ->  {' '.join(sorted(os.listdir(mount.mountpoint / 'desktop')))}")
        say(f"$ readlink {mount.mountpoint}/desktop/latest  ->  {os.readlink(mount.mountpoint / 'desktop' / 'latest')}")

        step("booting a desktop from the mount (qemu, per-desktop overlay); its console:")
        shot = (OUT / "desktop.png").absolute() if desktop.real else None
        if shot is not None:
            OUT.mkdir(exist_ok=True)
            shot.unlink(missing_ok=True)
            say(f"$ icbd boot desktop --mount {mount.mountpoint} --screenshot {shot}")
        else:
            say(f"$ icbd boot desktop --mount {mount.mountpoint}")
        result = boot(mount.mountpoint, "desktop", None, timeout=900 if desktop.real else 300,
                      console=sys.stdout, screen=Screen(screenshot=shot))
        cache_stats = cache.status()

        step("summary")
        summary = {
            "versions": [1, 2],
            "full_transfer_bytes": full["network_bytes"],
            "delta_transfer_bytes": delta["network_bytes"],
            "image_bytes": sum(p.stat().st_size for p in tree.rglob("*") if p.is_file()),
            "desktop": "debian" if desktop.real else "small",
            "boot": {"version": result.version, "outcome": result.outcome, "seconds": round(result.seconds, 2),
                     "session_seconds": None if result.ready_seconds is None else round(result.ready_seconds, 2),
                     "disk_read_bytes": result.disk_read_bytes,
                     "screenshot": str(result.screenshot) if result.screenshot else None},
            "cache": {"blocks_fetched": cache_stats["fetcher"]["demand_fetches"],
                      "prefetched": cache_stats["fetcher"]["prefetched"],
                      "bytes_stored": cache_stats["store"]["bytes"]},
            "replica_a_egress_bytes": near.status()["served"]["bytes"],
            "seconds": round(time.monotonic() - started, 1),
        }
        say(f"  release 1 reached both replicas in full: {full['network_bytes']:,} stream bytes")
        say(f"  release 2 reached them as a delta: {delta['network_bytes']:,} stream bytes "
            f"(parent {delta['parent']})")
        if result.outcome == "ready":
            say(f"  {desktop.what} booted release {result.version} to its session in "
                f"{result.ready_seconds:.1f} s, reading {result.disk_read_bytes / 1e6:.0f} MB of its disk")
        else:
            say(f"  {desktop.what} booted release {result.version}: {result.outcome} after "
                f"{result.seconds:.1f} s")
        say(f"  the site cache fetched {summary['cache']['blocks_fetched']} blocks on demand and "
            f"{summary['cache']['prefetched']} ahead")
        if not desktop.real and desktop.why_small:
            say(f"  (the small desktop: {desktop.why_small})")
        say(json.dumps(summary, indent=2))
        if result.returncode != 0:
            say(f"the desktop did not boot cleanly: {result.message}")
            return 1
        if result.screenshot is not None:
            say(f"\nthe screenshot of the desktop: {result.screenshot}")
        if args.keep:
            say(f"\nleft running (--keep): {scratch}; stop with: kill {' '.join(str(n.pid) for n in cluster.nodes)}")
        return 0
    finally:
        if not args.keep:
            cluster.stop_all()
            subprocess.run(["rm", "-rf", str(scratch)], check=False)



if __name__ == "__main__":
    sys.exit(main())
