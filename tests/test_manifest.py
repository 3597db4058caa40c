"""Manifests: faithful, validated, and cheap to rebuild after a small change."""

import json
import os
import subprocess

import pytest
from trees import make_tree

from icbdcore.manifest import Manifest
from icbdcore.wire import InvalidInput, check_name, content_digest, parse_version
from replicator.manifest_builder import Parent, build_manifest

CHUNK = 1 << 20


def _snapshot(src, dst):
    subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(src), str(dst)], check=True, capture_output=True)


@pytest.mark.root  # make_tree chowns a file and makes a device node
def test_manifest_describes_the_tree(tmp_path):
    tree = make_tree(tmp_path / "t")
    manifest, stats = build_manifest(tree, CHUNK)
    by_path = {e.path: e for e in manifest.entries}
    assert by_path[""].type == "dir"
    assert by_path["bin/link-to-tool"].type == "symlink" and by_path["bin/link-to-tool"].target == "tool"
    assert by_path["bin/tool"].mode == 0o4755
    assert by_path["etc/secret"].uid == 1000 and by_path["etc/secret"].gid == 1001
    assert by_path["etc/empty"].chunks == () and by_path["etc/empty"].size == 0
    assert by_path["null"].type == "chardev" and by_path["null"].rdev == os.makedev(1, 3)
    assert by_path["fifo"].type == "fifo"
    assert "dir with spaces/ünïcödé ✓/file name.txt" in by_path
    big = by_path["big.bin"]
    assert len(big.chunks) == 3
    data = (tree / "big.bin").read_bytes()
    assert big.chunks[1] == content_digest(data[CHUNK:2 * CHUNK])
    assert by_path["etc/hostname"].mtime_ns == 1_600_000_000_123_456_789
    again = Manifest.from_bytes(manifest.canonical(), manifest.digest)
    assert again.entries == manifest.entries and again.digest == manifest.digest
    assert stats.bytes_hashed == stats.bytes_total


def test_small_change_rehashes_only_changed_chunks(btrfs_dir):
    work = btrfs_dir / "work"
    subprocess.run(["btrfs", "subvolume", "create", str(work)], check=True, capture_output=True)
    with open(work / "disk.img", "wb") as f:
        for _ in range(64):
            f.write(os.urandom(CHUNK))
    (work / "small").write_text("a")
    _snapshot(work, btrfs_dir / "v1")
    first, _ = build_manifest(btrfs_dir / "v1", CHUNK)
    with open(work / "disk.img", "r+b") as f:
        f.seek(10 * CHUNK + 100)
        f.write(b"changed")
        f.seek(70 * CHUNK)  # grows the file by a sparse tail
        f.write(b"end")
    (work / "small").write_text("b")
    _snapshot(work, btrfs_dir / "v2")
    reused, stats = build_manifest(btrfs_dir / "v2", CHUNK, Parent(btrfs_dir / "v1", first))
    full, _ = build_manifest(btrfs_dir / "v2", CHUNK)
    assert reused.digest == full.digest  # reuse never changes the answer
    assert stats.bytes_hashed <= 2 * CHUNK + 10  # chunk 10, the new tail chunk, "small"
    old = {e.path: e for e in first.entries}["disk.img"].chunks
    new = {e.path: e for e in reused.entries}["disk.img"].chunks
    assert [i for i, (a, b) in enumerate(zip(old, new[: len(old)], strict=True)) if a != b] == [10]


def _doc(format=2, **changes):
    doc = {"format": format, "chunk_size": CHUNK, "entries": [
        {"path": "", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "size": 0, "mtime_ns": 0},
        {"path": "f", "type": "file", "mode": 0o644, "uid": 0, "gid": 0, "size": 3, "mtime_ns": 0,
         "chunks": ["0" * 64]},
    ]}
    doc["entries"][1].update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("changes", [
    {"path": "../escape"}, {"path": "a//b"}, {"path": "/abs"}, {"path": "a/./b"},
    {"chunks": []}, {"chunks": ["zz"]}, {"size": -1}, {"mode": 0o170000}, {"type": "weird"},
    {"uid": "0"}, {"mtime_ns": True}, {"chunks": ["0" * 32]}, {"chunks": ["F" * 64]},
])
def test_bad_manifests_are_refused(changes):
    with pytest.raises(InvalidInput):
        Manifest.from_bytes(_doc(**changes))


def test_manifest_digest_is_checked():
    raw = _doc()
    Manifest.from_bytes(raw, expect_digest=content_digest(raw))
    with pytest.raises(InvalidInput):
        Manifest.from_bytes(raw, expect_digest="f" * 64)


def test_a_manifest_of_format_1_is_never_read():
    """Format 1 named chunks by xxh3-128 (32 hex digits): refused as such,
    and refused even with digests of the new length."""
    with pytest.raises(InvalidInput, match="format"):
        Manifest.from_bytes(_doc(format=1, chunks=["0" * 32]))
    with pytest.raises(InvalidInput, match="format"):
        Manifest.from_bytes(_doc(format=1))


def test_names_and_versions():
    for good in ("a", "demo", "win-11.2_x", "0" * 64):
        assert check_name(good) == good
    for bad in ("", "A", ".x", "-x", "a/b", "..", "a" * 65, "é", "a b", None, 3):
        with pytest.raises(InvalidInput):
            check_name(bad)
    assert parse_version("12") == 12 and parse_version(3) == 3
    for bad in ("0", "-1", "1e3", "٣", "2147483648", True, 0, 1.0, None):
        with pytest.raises(InvalidInput):
            parse_version(bad)
