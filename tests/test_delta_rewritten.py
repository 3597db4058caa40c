"""An update costs what changed however the image was written: a publish
shares the parent's extents wherever the bytes match (replicator/dedupe.py),
and `icbd imi update` writes only what differs."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from trees import describe

from bench.rewritten import WAYS, write_build
from icbdcore.manifest import Manifest
from replicator import btrfs
from replicator.dedupe import share_range, share_with_parent, shares_extents
from replicator.manifest_builder import Parent, build_manifest

MIB = 1 << 20
PAGE = 4096
CHUNK = MIB


def _pages(data: bytearray, offsets: list[int]) -> int:
    """Change one 4 KiB page at each offset; return the bytes changed."""
    for offset in offsets:
        data[offset:offset + PAGE] = os.urandom(PAGE)
    return PAGE * len(offsets)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _send_size(parent: Path, child: Path) -> int:
    send = subprocess.run(["btrfs", "send", "-q", "-p", str(parent), str(child)], capture_output=True, check=True)
    return len(send.stdout)


def _versions(btrfs_dir: Path, image: bytes) -> tuple[Path, Path, Path]:
    """A parent version (read-only) with image.bin, and a writable child
    made the way a publish makes it (a snapshot of the working copy)."""
    work = btrfs_dir / "work"
    subprocess.run(["btrfs", "subvolume", "create", str(work)], check=True, capture_output=True)
    (work / "image.bin").write_bytes(image)
    (work / "notes.txt").write_text("unchanged\n")
    parent = btrfs_dir / "v1"
    subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(work), str(parent)], check=True, capture_output=True)
    return work, parent, btrfs_dir / "v2"


def _publish_like(work: Path, parent: Path, child: Path) -> tuple[Manifest, Manifest, object]:
    subprocess.run(["btrfs", "subvolume", "snapshot", str(work), str(child)], check=True, capture_output=True)
    parent_manifest, _ = build_manifest(parent, CHUNK)
    manifest, stats = build_manifest(child, CHUNK, Parent(parent, parent_manifest))
    shared = share_with_parent(child, manifest, parent, parent_manifest, stats.fresh)
    btrfs.set_readonly(child, True)
    return parent_manifest, manifest, shared


@pytest.mark.btrfs
@pytest.mark.parametrize("how", ["cp over it", "new file renamed over it", "fresh file from a tool"])
def test_a_rewritten_image_shares_the_parent_extents_and_sends_what_changed(btrfs_dir, tmp_path, how):
    original = bytearray(os.urandom(24 * MIB))
    work, parent, child = _versions(btrfs_dir, bytes(original))
    new = bytearray(original)
    changed = _pages(new, [3 * MIB + 8 * PAGE, 11 * MIB, 20 * MIB + 5 * PAGE])
    build = tmp_path / "build.bin"
    build.write_bytes(new)
    target = work / "image.bin"
    if how == "cp over it":
        subprocess.run(["cp", str(build), str(target)], check=True)
    elif how == "new file renamed over it":
        shutil.copyfile(build, work / ".image.bin.tmp")
        os.rename(work / ".image.bin.tmp", target)
    else:  # a tool writes the image from scratch: truncate, then write it block by block
        with open(target, "wb") as f:
            for offset in range(0, len(new), 64 << 10):
                f.write(new[offset:offset + (64 << 10)])
    assert not shares_extents(parent / "image.bin", target, 0, MIB)  # nothing shared before

    parent_manifest, manifest, shared = _publish_like(work, parent, child)

    # Content is untouched: the manifest equals one built from scratch, and the bytes are the new build's.
    assert manifest.digest == build_manifest(child, CHUNK)[0].digest
    assert _sha(child / "image.bin") == _sha(build)
    assert shared.chunks_shared == 24 - 3 and shared.pages_shared == 3 * (256 - 1)
    # The unchanged chunks now share the parent's extents, and a delta carries what changed.
    assert shares_extents(parent / "image.bin", child / "image.bin", 0, MIB)
    size = _send_size(parent, child)
    print(f"\n{how}: {changed} bytes changed, delta {size} bytes")
    assert size <= 1.05 * changed + MIB


@pytest.mark.btrfs
def test_chunks_move_between_paths(btrfs_dir):
    """A chunk is shared with the parent's copy whatever its path: a file
    renamed and rewritten, or the same data in a new file."""
    original = os.urandom(4 * MIB)
    work, parent, child = _versions(btrfs_dir, original)
    (work / "image.bin").unlink()
    (work / "moved").mkdir()
    (work / "moved" / "renamed.bin").write_bytes(original)  # a fresh copy under another name
    _, manifest, shared = _publish_like(work, parent, child)
    assert shared.chunks_shared == 4
    assert shares_extents(parent / "image.bin", child / "moved" / "renamed.bin", 0, 4 * MIB)
    assert _send_size(parent, child) < 64 << 10


@pytest.mark.btrfs
def test_a_forged_digest_is_never_shared(btrfs_dir):
    """A parent manifest that claims a chunk's digest for different bytes
    makes no difference: the kernel compares the bytes and refuses."""
    original = os.urandom(2 * MIB)
    work, parent, child = _versions(btrfs_dir, original)
    (work / "image.bin").write_bytes(os.urandom(2 * MIB))  # every byte different
    subprocess.run(["btrfs", "subvolume", "snapshot", str(work), str(child)], check=True, capture_output=True)
    before = _sha(child / "image.bin")
    manifest, stats = build_manifest(child, CHUNK)
    parent_manifest, _ = build_manifest(parent, CHUNK)
    # The forgery: the parent's image claims the new image's digests.
    forged = Manifest.from_bytes(parent_manifest.canonical().replace(
        ",".join(f'"{d}"' for d in parent_manifest.find("image.bin").chunks).encode(),
        ",".join(f'"{d}"' for d in manifest.find("image.bin").chunks).encode()))
    assert forged.find("image.bin").chunks == manifest.find("image.bin").chunks
    image_chunks = [(path, index) for path, index in stats.fresh if path == "image.bin"]
    shared = share_with_parent(child, manifest, parent, forged, image_chunks)
    assert shared.chunks_shared == 0 and shared.bytes_shared == 0 and shared.refused >= 2
    assert _sha(child / "image.bin") == before
    assert not shares_extents(parent / "image.bin", child / "image.bin", 0, MIB)
    # And the kernel call itself, asked directly, says no.
    with open(parent / "image.bin", "rb") as src, open(child / "image.bin", "r+b") as dst:
        assert share_range(src.fileno(), 0, MIB, dst.fileno(), 0) == 0


@pytest.mark.btrfs
@pytest.mark.parametrize("way", WAYS)
def test_each_write_pattern_replicates_within_budget_with_identical_trees(cluster, tmp_path, way):
    """Published through a real master: the record's digest is the digest of
    a manifest built from scratch, the delta is within budget, and the
    replica's tree is the new build's."""
    cluster.master()
    r1 = cluster.replica("r1")
    tree = tmp_path / "tree"
    tree.mkdir()
    image = bytearray(os.urandom(16 * MIB))
    (tree / "disk.img").write_bytes(image)
    cluster.icbd("imi", "create", "img", "--from", str(tree))
    cluster.icbd_json("imi", "publish", "img")
    cluster.icbd("subscribe", "img", "--node", "r1")
    cluster.wait_held(r1, "img", [1])
    work = Path(cluster.icbd("imi", "path", "img").stdout.strip())
    changed = _pages(image, [5 * MIB, 12 * MIB + PAGE])
    (tmp_path / "new.img").write_bytes(image)
    write_build(way, tmp_path / "new.img", work / "disk.img")
    record = cluster.icbd_json("imi", "publish", "img")
    assert record["publish"]["dedupe"]["chunks_shared"] == 14
    status = cluster.wait_held(r1, "img", [1, 2])
    published = cluster.master_node.data / "imis" / "img" / "2"
    assert build_manifest(published, CHUNK)[0].digest == record["digest"]
    assert describe(r1.data / "imis" / "img" / "2") == describe(work)
    assert _sha(r1.data / "imis" / "img" / "2" / "disk.img") == _sha(tmp_path / "new.img")
    second = [t for t in status["transfers"] if t["version"] == 2 and t["state"] == "done"][-1]
    assert second["parent"] == 1
    assert second["network_bytes"] <= 1.05 * changed + MIB, second


@pytest.mark.btrfs
def test_imi_update_from_a_tree_and_from_an_image_file(cluster, tmp_path):
    cluster.master()
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("one\n")
    (tree / "gone.txt").write_text("removed by the update\n")
    image = bytearray(os.urandom(8 * MIB))
    (tree / "disk.img").write_bytes(image)
    cluster.icbd("imi", "create", "demo", "--from", str(tree))
    work = Path(cluster.icbd("imi", "path", "demo").stdout.strip())
    ino = os.stat(work / "etc" / "hostname").st_ino

    # A new build of the tree: one file changed, one gone, one new, the image changed in place.
    build = tmp_path / "build"
    shutil.copytree(tree, build, symlinks=True)
    (build / "gone.txt").unlink()
    (build / "new.txt").write_text("new\n")
    _pages(image, [2 * MIB])
    (build / "disk.img").write_bytes(image)
    os.utime(build / "etc" / "hostname", ns=(os.stat(tree / "etc" / "hostname").st_mtime_ns,) * 2)
    result = cluster.icbd("imi", "update", "demo", "--from", str(build))
    assert "updated the working copy of demo" in result.stdout
    assert describe(work) == describe(build)
    assert os.stat(work / "etc" / "hostname").st_ino == ino  # an unchanged file is not touched

    # An image file: it replaces the file of the same name and leaves the rest.
    _pages(image, [6 * MIB])
    (tmp_path / "disk.img").write_bytes(image)
    cluster.icbd("imi", "update", "demo", "--from", str(tmp_path / "disk.img"))
    assert _sha(work / "disk.img") == _sha(tmp_path / "disk.img")
    assert (work / "new.txt").read_text() == "new\n"

    bad = cluster.icbd("imi", "update", "demo", "--from", str(tmp_path / "missing"), check=False)
    assert bad.returncode == 1 and "no such file or directory" in bad.stderr
    assert cluster.icbd("imi", "update", "nosuch", "--from", str(build), check=False).returncode == 1


@pytest.mark.btrfs
def test_pages_that_moved_by_whole_blocks_are_found(btrfs_dir):
    """A rebuilt filesystem image moves what follows a grown file by whole
    blocks: the parent's file is scanned for those pages at every aligned
    offset, so the delta stays the size of what is new."""
    original = os.urandom(8 * MIB)
    work, parent, child = _versions(btrfs_dir, original)
    inserted = os.urandom(PAGE)
    moved = original[:3 * MIB] + inserted + original[3 * MIB:-PAGE]  # same size, a page inserted
    (work / "image.bin").write_bytes(moved)
    _, manifest, shared = _publish_like(work, parent, child)
    assert (child / "image.bin").read_bytes() == moved
    assert shared.bytes_shared >= len(moved) - 2 * MIB  # all but the chunk that holds the new page
    size = _send_size(parent, child)
    print(f"\none page inserted at 3 MiB of 8 MiB: delta {size} bytes")
    assert size < 64 << 10


def _scans(monkeypatch) -> list[tuple[int, int]]:
    """The ranges of the parent's file that dedupe reads to look for moved pages."""
    from replicator import dedupe

    ranges: list[tuple[int, int]] = []
    scan = dedupe._scan

    def recorded(fd, start, end, *args, **kwargs):
        ranges.append((start, end))
        return scan(fd, start, end, *args, **kwargs)

    monkeypatch.setattr(dedupe, "_scan", recorded)
    return ranges


def _changed_chunks(old: bytes, new: bytes) -> list[tuple[int, int]]:
    return [(at, CHUNK) for at in range(0, len(new), CHUNK) if old[at:at + CHUNK] != new[at:at + CHUNK]]


def test_new_bytes_written_in_place_are_not_looked_for_in_the_whole_parent(tmp_path, monkeypatch):
    """A guest's writes are new bytes, found nowhere: only the parent around a
    few changed chunks is read, not the whole file."""
    from replicator.dedupe import PROBE_AROUND, DedupeStats, _share_pages

    old = os.urandom(160 * MIB)
    new = bytearray(old)
    for at in range(0, 160 * MIB, 16 * MIB):  # 10 places, 512 KiB of new bytes each
        new[at + 4096:at + 4096 + 512 * 1024] = os.urandom(512 * 1024)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    ranges = _scans(monkeypatch)
    with open(tmp_path / "old", "rb") as o, open(tmp_path / "new", "rb") as n:
        _share_pages(o.fileno(), n.fileno(), _changed_chunks(old, bytes(new)), PAGE, DedupeStats())
    read = sum(end - start for start, end in ranges)
    assert ranges and read <= 4 * 2 * PROBE_AROUND + 4 * MIB, ranges
    assert read < len(old) / 2


def test_pages_a_rebuild_moved_are_looked_for_in_the_whole_parent(tmp_path, monkeypatch):
    from replicator.dedupe import DedupeStats, _share_pages

    old = os.urandom(48 * MIB)
    new = bytearray(old[:MIB]) + os.urandom(3 * PAGE) + bytearray(old[MIB:-3 * PAGE])  # shifted by 3 pages
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    ranges = _scans(monkeypatch)
    stats = DedupeStats()
    with open(tmp_path / "old", "rb") as o, open(tmp_path / "new", "rb") as n:
        _share_pages(o.fileno(), n.fileno(), _changed_chunks(old, bytes(new)), PAGE, stats)
    assert ranges[-1] == (0, len(old)), "found near the changed chunks: then the whole file"
