"""The Debian desktop iMI (bench/images/debian_desktop.py): builds that give
the same bytes, releases that differ little, and a boot through a site cache
to the desktop's session and a screenshot of it.

mmdebstrap runs as root. The first build fetches about 200 packages from the
Debian mirror into the package pool (/var/cache/icbd/debs/debian); without
the mirror and with an empty pool the tests are skipped, saying so. A build
takes about 40 s on a quiet 2-core machine, a cached one a few seconds; the
boot about 30 s to the session under TCG.
"""

import subprocess
from pathlib import Path

import pytest

from bench.images.debian_desktop import SCREEN_SIZE, Recipe, build_debian_desktop
from bench.images.desktop import ImageBuildError
from bench.images.ext4 import iter_changed_blocks
from bench.images.packages import PackagePool
from harness.cluster import wait_for
from icbd.boot import Screen, boot

pytestmark = [pytest.mark.slow, pytest.mark.root]

FILES = ("boot/vmlinuz", "boot/initrd.img", "rootfs.img", "icbd-boot.toml")


def build_or_skip(out: Path, recipe: Recipe | None = None, **kwargs):
    try:
        return build_debian_desktop(out, recipe or Recipe(), **kwargs)
    except ImageBuildError as error:
        if "apt-get update" in str(error) or "not installed" in str(error):
            pytest.skip(f"cannot build the Debian desktop here: {error}")
        raise


def same_file(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 22), fb.read(1 << 22)
            if x != y:
                return False
            if not x:
                return True


def test_two_builds_of_the_same_recipe_are_identical(tmp_path):
    first = build_or_skip(tmp_path / "a", use_cache=False)
    # The second from a copy of the package pool elsewhere: where the cache
    # lies must not show in the image.
    pool = tmp_path / "pool"
    if subprocess.run(["cp", "-al", str(PackagePool().root), str(pool)]).returncode != 0:
        subprocess.run(["cp", "-a", str(PackagePool().root), str(pool)], check=True)
    second = build_or_skip(tmp_path / "b", use_cache=False, pool=PackagePool(pool))
    assert not first.cached and not second.cached and first.key == second.key
    for name in FILES:
        assert same_file(tmp_path / "a" / name, tmp_path / "b" / name), name
    # The same recipe again comes from the cache.
    again = build_or_skip(tmp_path / "c")
    assert again.cached and again.key == first.key
    assert same_file(tmp_path / "a" / "rootfs.img", tmp_path / "c" / "rootfs.img")


def test_a_release_with_one_more_package_changes_little(tmp_path):
    build_or_skip(tmp_path / "one")
    two = build_or_skip(tmp_path / "two", Recipe(label="2", extra_packages=("hello",),
                                                 base=tmp_path / "one" / "rootfs.img"))
    assert two.kept_from_base >= two.files - 10
    changed = sum(1 for _ in iter_changed_blocks(tmp_path / "one" / "rootfs.img",
                                                 tmp_path / "two" / "rootfs.img"))
    # hello's files and dpkg's records of it, the label, directories, inodes,
    # bitmaps and superblock copies: about 80 blocks; at most 1 MiB.
    assert 0 < changed * 4096 <= 1 << 20, changed
    for name in ("boot/vmlinuz", "boot/initrd.img"):
        assert same_file(tmp_path / "one" / name, tmp_path / "two" / name), name


@pytest.mark.qemu
@pytest.mark.fuse
def test_the_desktop_boots_through_a_site_cache_to_its_session(cluster, tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    tree = tmp_path / "tree"
    build_or_skip(tree)
    cluster.master(image_size="4G")
    replica = cluster.replica("r1", image_size="4G")
    cluster.icbd("imi", "create", "desk", "--from", str(tree))
    cluster.icbd("imi", "publish", "desk")
    cluster.icbd("subscribe", "desk", "--node", "r1")
    cluster.wait_held(replica, "desk", [1], timeout=600)
    cache = cluster.cache("cache", size="2G")
    mount = cluster.mount("mnt", cache=cache, timeout=120)
    wait_for(lambda: (mount.mountpoint / "desk" / "latest").exists(), timeout=30,
             what="the mount to list the desktop")

    shot = tmp_path / "desktop.png"
    result = boot(mount.mountpoint, "desk", timeout=900, screen=Screen(screenshot=shot))
    assert result.outcome == "ready", (result.message, result.console_text[-3000:])
    assert "icbd-desktop: session up, release 1" in result.console_text
    assert result.screenshot == shot and 0 < result.ready_seconds <= result.seconds
    assert result.disk_read_bytes > 10 << 20  # systemd, Xorg and their libraries

    with PIL.open(shot) as image:
        assert image.format == "PNG" and image.size == SCREEN_SIZE
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 1, "the screen is one flat colour"
    assert cache.status()["fetcher"]["demand_fetches"] > 0  # it really read through the cache
