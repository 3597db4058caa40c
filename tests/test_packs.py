"""Trees of small files: packed into shared blocks (replicator/manifest_builder.py),
read through a mount over a site cache cold and warm, identical to the source."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from trees import describe

from harness.cluster import wait_for
from harness.data import drop_caches
from icbdcore.manifest import FILE, Manifest
from replicator import btrfs
from replicator.manifest_builder import PACK_CUT_ONE_IN, build_manifest, pack_small_files

CHUNK = 1 << 20


# --- packing, without nodes -------------------------------------------------------------


def _small_tree(root: Path, count: int, seed: int = 0) -> Path:
    for i in range(count):
        folder = root / f"d{i % 17:02d}" / f"s{i % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        size = (i * 7919 + seed) % 9000
        (folder / f"f{i:05d}").write_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest() * (size // 32 + 1))
    return root


def test_small_files_are_packed_in_path_order_and_each_keeps_its_chunk(tmp_path):
    root = _small_tree(tmp_path / "t", 600)
    manifest, stats = build_manifest(root, CHUNK)
    packed = [e for e in manifest.files() if e.pack is not None]
    assert len(packed) == sum(1 for e in manifest.files() if e.size > 0)  # all of them are small
    assert 2 <= len(manifest.packs) <= 30 and stats.bytes_packed == sum(p.size for p in manifest.packs)
    for entry in packed:
        pack, offset = manifest.pack_of(entry)
        assert offset + entry.size <= pack.size and len(entry.chunks) == 1
    # Path order within and across packs: a walk reads pack after pack.
    positions = [e.pack for e in packed]
    assert positions == sorted(positions)
    assert Manifest.from_bytes(manifest.canonical(), manifest.digest).packs == manifest.packs
    assert set(manifest.read_set()) == {p.digest for p in manifest.packs}


def test_a_change_moves_only_the_packs_around_it(tmp_path):
    """Pack boundaries come from the paths, so one grown, added or removed
    file changes its own pack (and at most the next), not every later one."""
    root = _small_tree(tmp_path / "t", 3000)
    before, _ = build_manifest(root, CHUNK)
    victim = sorted(root.rglob("f*"))[1500]
    victim.write_bytes(victim.read_bytes() + b"x" * 3000)
    (victim.parent / "zz-new").write_bytes(b"new" * 100)
    after, _ = build_manifest(root, CHUNK)
    old, new = {p.digest for p in before.packs}, {p.digest for p in after.packs}
    assert len(new - old) <= 3, (len(before.packs), len(new - old))


def test_packs_of_unchanged_files_keep_the_parent_s_digest_unread(tmp_path):
    root = _small_tree(tmp_path / "t", 400)
    first, _ = build_manifest(root, CHUNK)
    entries, packs, read = pack_small_files(root, first.entries, CHUNK, first)
    assert packs == first.packs and read == 0


def test_bad_pack_references_are_refused():
    from icbdcore.wire import InvalidInput, content_digest

    doc = {"format": 2, "chunk_size": CHUNK, "packs": [{"digest": content_digest(b"ab"), "size": 2}],
           "entries": [{"path": "", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "size": 0, "mtime_ns": 0},
                       {"path": "a", "type": "file", "mode": 0o644, "uid": 0, "gid": 0, "size": 2, "mtime_ns": 0,
                        "chunks": [content_digest(b"ab")], "pack": [0, 1]}]}
    import json

    with pytest.raises(InvalidInput, match="out of range"):
        Manifest.from_bytes(json.dumps(doc).encode())
    doc["entries"][1]["pack"] = [1, 0]
    with pytest.raises(InvalidInput, match="out of range"):
        Manifest.from_bytes(json.dumps(doc).encode())
    doc["entries"][1]["pack"] = [0, "0"]
    with pytest.raises(InvalidInput, match="bad pack"):
        Manifest.from_bytes(json.dumps(doc).encode())
    assert PACK_CUT_ONE_IN > 1


# --- through real nodes and a mount ----------------------------------------------------------


def _odd_tree(root: Path) -> Path:
    """Thousands of small files, and every kind of odd one: empty files,
    files of exactly one block, hard links, sparse files, names that need
    escaping."""
    _small_tree(root / "small", 2500)
    odd = root / "odd"
    odd.mkdir()
    for i in range(50):
        (odd / f"empty-{i}").write_bytes(b"")
    (odd / "one-block").write_bytes(os.urandom(CHUNK))
    (odd / "one-block-and-a-byte").write_bytes(os.urandom(CHUNK + 1))
    (odd / "linked").write_bytes(b"the same inode twice\n")
    os.link(odd / "linked", odd / "hard link")
    with open(odd / "sparse", "wb") as f:
        f.seek(3 * CHUNK + 5)
        f.write(b"end")
    for name in ("sp ace", "new\nline", "back\\slash", "tab\there", "ünï✓", "%2e%2e", "-dash", "*star?"):
        (odd / name).write_text(name)
    os.mkfifo(odd / "fifo")
    os.symlink("one-block", odd / "link to block")
    return root


def _publish_and_mount(cluster, tree: Path, *, replicas=("r1",)):
    cluster.master()
    nodes = [cluster.replica(name, site="a" if i == 0 else "b") for i, name in enumerate(replicas)]
    cluster.icbd("imi", "create", "tree", "--from", str(tree))
    cluster.icbd("imi", "publish", "tree")
    for node in nodes:
        cluster.icbd("subscribe", "tree", "--node", node.id)
        cluster.wait_held(node, "tree", [1])
    cache = cluster.cache("c1", site="a")
    wait_for(lambda: {u["id"] for u in cache.status()["fetcher"]["upstreams"]} >= set(replicas),
             what="the cache to know its replicas")
    return nodes, cache


def _tar_digest(folder: Path) -> str:
    # --hard-dereference: a mount shows each name of a hard link as a file of its own.
    tar = subprocess.run(["tar", "--sort=name", "--hard-dereference", "-cf", "-", "."], cwd=folder,
                         capture_output=True, check=True)
    return hashlib.sha256(tar.stdout).hexdigest()


@pytest.mark.fuse
def test_a_tree_of_small_and_odd_files_reads_back_identical_cold_and_warm(cluster, tmp_path):
    tree = _odd_tree(tmp_path / "tree")
    (r1,), cache = _publish_and_mount(cluster, tree)
    mount = cluster.mount("mnt", cache=cache)
    version = mount.mountpoint / "tree" / "1"
    expected = describe(tree)
    assert describe(version) == expected  # cold: every byte through the cache from the replica
    assert _tar_digest(version) == _tar_digest(tree)
    drop_caches()
    assert describe(version) == expected  # warm: the mount's memory and the site cache
    assert os.stat(version / "odd" / "linked").st_size == os.stat(version / "odd" / "hard link").st_size
    status = mount.status()
    assert status.get("packed_reads", 0) > 2000 and status.get("eio", 0) == 0


@pytest.mark.fuse
def test_a_cold_walk_costs_a_few_hundred_fetches_not_one_per_file(cluster, tmp_path):
    """The bound: at most one fetch per pack and per chunk of a large file,
    with room for the packs the walk's readahead fetches (none twice)."""
    tree = _small_tree(tmp_path / "tree", 4000)
    (r1,), cache = _publish_and_mount(cluster, tree)
    manifest = Manifest.from_bytes((cluster.master_node.data / "meta" / "tree" / "1.manifest.json").read_bytes())
    files = sum(1 for e in manifest.files() if e.size)
    blocks = len(manifest.read_set())
    mount = cluster.mount("mnt", cache=cache)
    assert _tar_digest(mount.mountpoint / "tree" / "1") == _tar_digest(tree)
    fetched = mount.status()["source_blocks"]
    print(f"\ncold tar of {files} files: {fetched} fetches from the cache server ({blocks} blocks in the version)")
    assert blocks < files / 20
    assert fetched <= blocks, f"{fetched} fetches for {blocks} blocks"


@pytest.mark.fuse
def test_a_pack_damaged_at_a_replica_is_refused_and_fetched_from_another(cluster, tmp_path):
    tree = _small_tree(tmp_path / "tree", 1500)
    (near, far), cache = _publish_and_mount(cluster, tree, replicas=("near", "far"))
    manifest = Manifest.from_bytes((near.data / "meta" / "tree" / "1.manifest.json").read_bytes())
    victim = next(e for e in manifest.files() if e.pack is not None and e.size > 100)
    snapshot = near.data / "imis" / "tree" / "1"
    btrfs.set_readonly(snapshot, False)
    with open(snapshot / victim.path, "r+b") as f:
        f.seek(victim.size // 2)
        f.write(b"\xde\xad\xbe\xef")
    btrfs.set_readonly(snapshot, True)
    drop_caches()
    mount = cluster.mount("mnt", cache=cache)
    got = (mount.mountpoint / "tree" / "1" / victim.path).read_bytes()
    assert got == (tree / victim.path).read_bytes()
    assert "damaged on this node" in (cluster.root / "near.log").read_text()
    assert far.status()["served"]["blocks"] >= 1
    assert all(e.type != FILE or e.path for e in manifest.entries)
