"""bench/images/ext4.py: images e2fsck accepts, with the tree's content, the
same bytes for the same tree, and releases that differ only where their
files do. Small trees, read back with debugfs; as any user, in seconds.
"""

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from bench.images import ext4

EPOCH = 1_700_000_000
UUID = uuid.UUID("12345678-1234-5678-1234-567812345678").bytes
SEED = uuid.UUID("87654321-4321-8765-4321-876543218765").bytes

pytestmark = pytest.mark.skipif(shutil.which("debugfs") is None or shutil.which("e2fsck") is None,
                                reason="needs e2fsprogs (debugfs, e2fsck)")


def make(tree: Path, dest: Path, base: Path | None = None, free: int = 8 << 20) -> ext4.ImageStats:
    stats = ext4.make_image(tree, dest, epoch=EPOCH, uuid=UUID, hash_seed=SEED, label="test",
                            free_bytes=free, base=base)
    ext4.check_image(dest)
    return stats


def debugfs(image: Path, command: str) -> str:
    return subprocess.run(["debugfs", "-R", command, str(image)], capture_output=True,
                          check=True).stdout.decode(errors="replace")


def sample_tree(root: Path, files: int = 60) -> Path:
    """Files of many sizes in nested folders, a hard link, symlinks short and long."""
    for i in range(files):
        folder = root / f"d{i % 5}" / f"sub{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i:03d}").write_bytes(os.urandom(37 * i * i + i))
    (root / "d0" / "setuid").write_bytes(b"#!/bin/sh\n")
    (root / "d0" / "setuid").chmod(0o4755)
    os.link(root / "d0" / "setuid", root / "d1" / "hardlink")
    (root / "short").symlink_to("d0/setuid")
    (root / "long").symlink_to("/" + "x" * 100)
    (root / "empty").write_bytes(b"")
    (root / "big").write_bytes(os.urandom(3 << 20))
    return root


def test_image_holds_the_tree(tmp_path):
    tree = sample_tree(tmp_path / "tree")
    image = tmp_path / "root.img"
    stats = make(tree, image)
    assert stats.files > 60
    assert debugfs(image, "cat /d3/sub1/f043").encode(errors="replace") == \
        (tree / "d3" / "sub1" / "f043").read_bytes().decode(errors="replace").encode(errors="replace")
    # Content byte for byte, through debugfs dump.
    for name in ("big", "d4/sub0/f054", "empty"):
        out = tmp_path / "dumped"
        subprocess.run(["debugfs", "-R", f"dump /{name} {out}", str(image)], check=True, capture_output=True)
        assert out.read_bytes() == (tree / name).read_bytes(), name
    stat = debugfs(image, "stat /d0/setuid")
    assert "Mode:  04755" in stat and "Links: 2" in stat
    assert "Fast link dest: \"d0/setuid\"" in debugfs(image, "stat /short")
    assert debugfs(image, "stat /long").count("EXTENTS") == 1
    # Times are clamped to the epoch; the tree's files are newer.
    assert f"mtime: 0x{EPOCH:08x}" in debugfs(image, "stat /big")
    assert "lost+found" in debugfs(image, "ls /")


def test_same_tree_same_bytes(tmp_path):
    tree = sample_tree(tmp_path / "tree")
    make(tree, tmp_path / "a.img")
    # A copy (other inode numbers, other creation order) gives the same image.
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(tree), str(copy)], check=True)
    make(copy, tmp_path / "b.img")
    assert (tmp_path / "a.img").read_bytes() == (tmp_path / "b.img").read_bytes()


def changed_blocks(a: Path, b: Path) -> int:
    return sum(1 for _ in ext4.iter_changed_blocks(a, b))


def test_a_release_with_a_base_changes_only_what_changed(tmp_path):
    tree = sample_tree(tmp_path / "tree")
    make(tree, tmp_path / "one.img")
    # Release two: a new file early in the walk, one file changed in place, one grown.
    (tree / "a-new").write_bytes(os.urandom(30_000))
    (tree / "d2" / "sub2" / "f002").write_bytes(b"changed")
    (tree / "d1" / "sub1" / "f001").write_bytes(os.urandom(200_000))
    stats = make(tree, tmp_path / "two.img", base=tmp_path / "one.img")
    assert stats.kept == stats.files - 1  # every path but the new one kept its inode
    assert stats.moved == 1  # only the grown file took new blocks
    with_base = changed_blocks(tmp_path / "one.img", tmp_path / "two.img")
    # Without a base, the new file shifts everything after it.
    make(tree, tmp_path / "packed.img")
    packed = changed_blocks(tmp_path / "one.img", tmp_path / "packed.img")
    # New file 8 blocks, grown file 49, changed 1, their inodes, directories,
    # bitmaps, descriptors and superblock copies.
    assert with_base <= 8 + 49 + 1 + 16, with_base
    assert packed > 5 * with_base, (packed, with_base)
    # The base's layout is read back from the image itself.
    layout = ext4.read_layout(tmp_path / "two.img")
    assert b"/a-new" in layout.entries and layout.entries[b"/d0/setuid"].kind == "file"


def test_a_base_made_elsewhere_is_refused(tmp_path):
    tree = sample_tree(tmp_path / "tree", files=3)
    other = tmp_path / "mke2fs.img"
    with open(other, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", str(other)], check=True)
    with pytest.raises(ext4.Ext4Error, match="not made by this writer"):
        make(tree, tmp_path / "x.img", base=other)


def test_extended_attributes_are_refused(tmp_path):
    tree = sample_tree(tmp_path / "tree", files=3)
    try:
        os.setxattr(tree / "big", "user.icbd", b"1")
    except OSError:
        pytest.skip("this file system takes no user xattrs")
    with pytest.raises(ext4.Ext4Error, match="extended attributes"):
        make(tree, tmp_path / "x.img")


def test_a_tree_too_big_for_its_base_grows_the_image(tmp_path):
    tree = sample_tree(tmp_path / "tree", files=3)
    first = make(tree, tmp_path / "one.img", free=1 << 20)
    (tree / "huge").write_bytes(b"\1" * (first.geometry.data_blocks * ext4.BLOCK))
    second = make(tree, tmp_path / "two.img", base=tmp_path / "one.img", free=1 << 20)
    assert second.geometry.groups > first.geometry.groups
    assert second.geometry.inodes_per_group == first.geometry.inodes_per_group
