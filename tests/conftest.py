import os
import shutil

import pytest

from bench.cluster import Cluster, unmount


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="icbd tests mount btrfs and FUSE: run them as root")
        for item in items:
            item.add_marker(skip)


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
