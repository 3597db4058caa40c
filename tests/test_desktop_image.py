"""The sample desktop iMI: its layout, its initrd, its root image, reproducibility.

Builds are real (Debian packages, cpio, mke2fs) and take well under a second
once the .deb files are in the package cache; booting is tested in test_boot.py.
"""

import gzip
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
from sample_desktop import build_or_skip

from bench.images import desktop
from bench.images.desktop import ImageBuildError, build_desktop_tree

REPO = Path(__file__).resolve().parents[1]


def debugfs(image: Path, command: str) -> str:
    return subprocess.run(["debugfs", "-R", command, str(image)], capture_output=True,
                          text=True, check=True).stdout


def initrd_files(initrd: Path) -> dict[str, bytes]:
    """name -> content of every regular file and symlink target in a newc cpio.gz."""
    data = gzip.decompress(initrd.read_bytes())
    files, offset = {}, 0
    while True:
        header = data[offset:offset + 110]
        assert header[:6] == b"070701"
        mode = int(header[14:22], 16)
        size = int(header[54:62], 16)
        name_size = int(header[94:102], 16)
        name = data[offset + 110:offset + 110 + name_size - 1].decode()
        offset = (offset + 110 + name_size + 3) & ~3
        if name == "TRAILER!!!":
            return files
        if mode & 0o170000 in (0o100000, 0o120000):
            files[name] = data[offset:offset + size]
        offset = (offset + size + 3) & ~3


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    folder = tmp_path_factory.mktemp("desktop")
    yield build_or_skip(folder / "imi", label="release one")
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def _remove_tmp_path(tmp_path):
    """Images are 64 MiB (sparse) each: gone with the test, not with pytest's old runs."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_tree_has_what_icbd_boot_needs(tree):
    config = tomllib.loads((tree / "icbd-boot.toml").read_text())
    assert config["kernel"] == "boot/vmlinuz"
    assert config["initrd"] == "boot/initrd.img"
    assert config["disk"] == "rootfs.img"
    assert "root=/dev/vda" in config["append"] and "panic=-1" in config["append"]
    for key in ("kernel", "initrd", "disk"):
        assert (tree / config[key]).is_file()
    # A bzImage carries "HdrS" at 0x202.
    assert (tree / "boot" / "vmlinuz").read_bytes()[0x202:0x206] == b"HdrS"
    # ext4 superblock magic 0xEF53 at 1024 + 56.
    assert (tree / "rootfs.img").read_bytes()[1080:1082] == b"\x53\xef"


def test_initrd_loads_root_disk_modules_dependencies_first(tree):
    files = initrd_files(tree / "boot" / "initrd.img")
    assert files["bin/sh"] == b"busybox"
    assert len(files["bin/busybox"]) > 1 << 20
    init = files["init"].decode()
    modules = [f for f in files if f.endswith(".ko")]
    names = {Path(m).name for m in modules}
    assert {"virtio.ko", "virtio_ring.ko", "virtio_pci.ko", "virtio_blk.ko", "pvpanic-pci.ko"} <= names
    assert "ext4.ko" not in names  # built into this kernel
    order = [init.index(Path(m).name) for m in ("virtio.ko", "virtio_pci.ko", "virtio_blk.ko")]
    assert order == sorted(order)
    # pvpanic first, so that a panic anywhere after it reaches qemu.
    assert init.index("pvpanic-pci.ko") < init.index("virtio_pci.ko")
    assert "switch_root /newroot /sbin/init" in init


def test_module_order_comes_from_modules_dep(tree):
    kernel = desktop.unpacked_kernel(desktop.default_cache_dir())
    deps = {}
    for line in (kernel.modules_dir / "modules.dep").read_text().splitlines():
        module, _, requires = line.partition(":")
        deps[module] = requires.split()
    order = desktop.module_load_order(kernel, ("virtio_blk", "ext4"))
    assert order[-1].endswith("/virtio_blk.ko")
    assert {Path(m).name for m in order} == {"virtio.ko", "virtio_ring.ko", "virtio_blk.ko"}
    for i, module in enumerate(order):
        assert set(deps[module]) <= set(order[:i])
    with pytest.raises(ImageBuildError, match="no module"):
        desktop.module_load_order(kernel, ("no_such_driver",))


def test_root_image_holds_label_init_and_busybox(tree):
    image = tree / "rootfs.img"
    assert debugfs(image, "cat /etc/icbd-release") == "release one\n"
    init = debugfs(image, "cat /sbin/init")
    assert "icbd-desktop: up, release" in init and "poweroff -f" in init
    assert "busybox" in debugfs(image, "ls -l /bin")


def test_builds_are_reproducible_and_releases_differ_little(tree, tmp_path):
    again = build_or_skip(tmp_path / "again", label="release one")
    for name in ("boot/vmlinuz", "boot/initrd.img", "rootfs.img", "icbd-boot.toml"):
        assert (again / name).read_bytes() == (tree / name).read_bytes(), name
    other = build_or_skip(tmp_path / "other", label="release two")
    a, b = (tree / "rootfs.img").read_bytes(), (other / "rootfs.img").read_bytes()
    changed = sum(a[i:i + 4096] != b[i:i + 4096] for i in range(0, len(a), 4096))
    # The label file's data block, its inode's table block (checksums), the superblock copy...
    assert 0 < changed <= 8


def test_filler_scales_the_image(tmp_path):
    tree = build_or_skip(tmp_path / "big", filler_bytes=9 << 20)
    listing = debugfs(tree / "rootfs.img", "ls -l /usr/share/filler")
    sizes = [int(line.split()[5]) for line in listing.splitlines() if "part-" in line]
    assert sum(sizes) == 9 << 20 and len(sizes) == 3
    assert (tree / "rootfs.img").stat().st_size >= 64 << 20


def test_bad_label_is_refused(tmp_path):
    with pytest.raises(ValueError, match="label"):
        build_desktop_tree(tmp_path, label="two\nlines")


def test_concurrent_downloads_share_one_cache(tmp_path):
    """Two callers fetching into an empty cache both get the same whole file."""
    results, errors = [], []

    def fetch():
        try:
            results.append(desktop.fetch_deb(desktop.BUSYBOX_PACKAGE, tmp_path))
        except ImageBuildError as error:
            errors.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        pytest.skip(f"cannot download the Debian packages: {errors[0]}")
    assert results[0] == results[1]
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]  # no temporary leftovers
    subprocess.run(["dpkg-deb", "--info", str(results[0])], check=True, capture_output=True)


def test_command_line_builds_a_tree(tmp_path, tree):
    result = subprocess.run(
        [sys.executable, "-m", "bench.images.desktop", str(tmp_path / "cli"), "--label", "7"],
        cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert debugfs(tmp_path / "cli" / "rootfs.img", "cat /etc/icbd-release") == "7\n"
