"""Tests in tiers. Most tests run as any user; those that need more say so
with a marker (registered in pyproject.toml) and are skipped, with the
reason, where it is missing:

    root    runs as root (chown, mknod, or another root-only call)
    btrfs   a loop-mounted btrfs: every real node (master, replica, cache)
    fuse    a real FUSE mount through the kernel
    netns   network namespaces, veth pairs, tc
    qemu    boots a guest with qemu-system-x86_64 (TCG is enough; no root)

btrfs, fuse and netns imply root. A test that uses the `cluster` or
`btrfs_dir` fixture (directly or through another fixture) is marked btrfs
here; modules mark the rest, per module (`pytestmark`) or per test.
"""

import os
import shutil

import pytest

from harness.cluster import Cluster, unmount

IMPLY_ROOT = ("root", "btrfs", "fuse", "netns")
WHY = {
    "btrfs": "mounts a loop-mounted btrfs",
    "fuse": "mounts FUSE through the kernel",
    "netns": "makes network namespaces",
}
# Fixtures that start real nodes or mount a file system, and the markers they imply.
FIXTURE_MARKS = {"cluster": ("btrfs",), "btrfs_dir": ("btrfs",)}


def _missing_tools(*names: str) -> list[str]:
    return [name for name in names if shutil.which(name) is None]


def _skip_reason(marks: set[str]) -> str | None:
    """Why a test with these markers cannot run here, or None."""
    needs_root = [m for m in IMPLY_ROOT if m in marks]
    if needs_root and os.geteuid() != 0:
        what = ", ".join(WHY[m] for m in needs_root if m in WHY)
        return f"needs root{': ' + what if what else ''} (markers: {', '.join(needs_root)}); run it as root"
    if "fuse" in marks:
        missing = _missing_tools("fusermount3")
        if not os.path.exists("/dev/fuse") or missing:
            return "needs /dev/fuse and fusermount3 (fuse marker)"
    if "netns" in marks:
        missing = _missing_tools("ip", "tc", "nsenter")
        if missing:
            return f"needs {', '.join(missing)} for network namespaces (netns marker)"
    if "btrfs" in marks:
        missing = _missing_tools("mkfs.btrfs", "btrfs")
        if missing:
            return f"needs {', '.join(missing)} (btrfs-progs; btrfs marker)"
    if "qemu" in marks and shutil.which("qemu-system-x86_64") is None:
        return "needs qemu-system-x86_64 (qemu marker)"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marks in FIXTURE_MARKS.items():
            if fixture in item.fixturenames:
                for mark in marks:
                    item.add_marker(mark)
        reason = _skip_reason({mark.name for mark in item.iter_markers()})
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()


@pytest.fixture
def btrfs_dir(tmp_path):
    """A folder on a freshly made, loop-mounted btrfs (unmounted afterwards)."""
    import subprocess

    image = tmp_path / "fs.img"
    mnt = tmp_path / "fs"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(1 << 30)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        unmount(mnt)
        shutil.rmtree(tmp_path, ignore_errors=True)
