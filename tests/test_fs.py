"""The FUSE operations called directly under pytest-trio: no kernel, a real
TreeSource over local folders."""

from __future__ import annotations

import errno
import json
import os
import stat
from contextlib import asynccontextmanager
from pathlib import Path

import pyfuse3
import pytest
import trio
from tree_source import ODD_NAME, SAMPLE_CHUNK, TreeSource, build_sample_tree

from icbdcore.mounts import SESSION_UP_XATTR
from icbdfs.blockcache import BlockCache
from icbdfs.filesystem import open_filesystem
from icbdfs.fs import MountOptions, Operations
from icbdfs.namespace import ROOT
from icbdfs.readahead import Readahead


@pytest.fixture
def source(tmp_path) -> TreeSource:
    root = tmp_path / "imis"
    build_sample_tree(root / "demo" / "1", variant=1)
    build_sample_tree(root / "demo" / "2", variant=2)
    return TreeSource(root, SAMPLE_CHUNK)


@asynccontextmanager
async def running(source: TreeSource, **options):
    options.setdefault("refresh", 0)
    options.setdefault("timeout", 5.0)
    async with open_filesystem(source, MountOptions(**options)) as ops:
        await ops.refresh()
        yield ops


@pytest.fixture
def listdir(monkeypatch):
    """Run the readdir handler with a stand-in for pyfuse3.readdir_reply
    that takes `room` entries per call, as the kernel's buffer does."""
    room = {"n": 3}

    def reply(token, name, attr, next_id):
        if len(token) >= room["n"]:
            return False
        token.append((name, attr, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)

    async def listdir(ops: Operations, inode: int) -> dict[bytes, pyfuse3.EntryAttributes]:
        fh = await ops.opendir(inode, None)
        out, start = {}, 0
        while True:
            token: list = []
            await ops.readdir(fh, start, token)
            if not token:
                return out
            for name, attr, next_id in token:
                assert name not in out, "an entry listed twice"
                out[name] = attr
                start = next_id

    return listdir


async def resolve(ops: Operations, *parts: str) -> pyfuse3.EntryAttributes:
    attr = await ops.getattr(ROOT, None)
    for part in parts:
        attr = await ops.lookup(attr.st_ino, os.fsencode(part), None)
        if attr.st_ino == 0:
            raise FileNotFoundError(part)
    return attr


async def read_all(ops: Operations, inode: int, size: int, step: int) -> bytes:
    info = await ops.open(inode, os.O_RDONLY, None)
    try:
        pieces = []
        for off in range(0, size + step, step):
            pieces.append(bytes(await ops.read(info.fh, off, step)))
        return b"".join(pieces)
    finally:
        await ops.release(info.fh)


# --- names and metadata ----------------------------------------------------------

async def test_metadata_equals_the_tree(source, listdir):
    tree = source.root / "demo" / "1"
    async with running(source) as ops:
        seen = {}

        async def walk(inode: int, rel: str) -> None:
            for name, attr in (await listdir(ops, inode)).items():
                path = f"{rel}/{os.fsdecode(name)}" if rel else os.fsdecode(name)
                looked_up = await ops.lookup(inode, name, None)
                assert looked_up.st_ino == attr.st_ino
                seen[path] = await ops.getattr(attr.st_ino, None)
                if stat.S_ISDIR(attr.st_mode):
                    await walk(attr.st_ino, path)

        version = await resolve(ops, "demo", "1")
        await walk(version.st_ino, "")
        expected = {os.fsdecode(p.relative_to(tree)) for p in tree.rglob("*")}
        assert set(seen) == expected
        assert ODD_NAME in seen and "with space" in seen and "sparse.img" in seen
        for rel, attr in seen.items():
            st = os.lstat(tree / rel)
            assert attr.st_mode == st.st_mode, rel
            assert (attr.st_uid, attr.st_gid) == (st.st_uid, st.st_gid), rel
            assert attr.st_mtime_ns == st.st_mtime_ns, rel
            if not stat.S_ISDIR(st.st_mode):
                assert attr.st_size == st.st_size, rel
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                assert attr.st_rdev == st.st_rdev, rel
            if stat.S_ISLNK(st.st_mode):
                assert await ops.readlink(attr.st_ino, None) == os.readlink(os.fsencode(tree / rel))
        assert version.st_mtime_ns == os.lstat(tree).st_mtime_ns
        assert version.st_mode == os.lstat(tree).st_mode


async def test_catalogue_level_names(source, listdir):
    async with running(source) as ops:
        assert set(await listdir(ops, ROOT)) == {b"demo"}, "the control folder stays hidden"
        demo = await resolve(ops, "demo")
        assert set(await listdir(ops, demo.st_ino)) == {b"1", b"2", b"latest"}
        latest = await resolve(ops, "demo", "latest")
        assert stat.S_ISLNK(latest.st_mode)
        assert await ops.readlink(latest.st_ino, None) == b"2"
        assert latest.entry_timeout <= 1 and demo.entry_timeout <= 1
        motd = await resolve(ops, "demo", "2", "etc", "motd")
        assert motd.entry_timeout >= 3600 and motd.attr_timeout >= 3600
        for bad in ("nope", "0", "02", "02x", "3", "latest2"):
            with pytest.raises(pyfuse3.FUSEError) as raised:
                await resolve(ops, "demo", bad)
            assert raised.value.errno == errno.ENOENT
        etc = await resolve(ops, "demo", "1", "etc")
        assert (await ops.lookup(etc.st_ino, b"..", None)).st_ino == (await resolve(ops, "demo", "1")).st_ino
        missing = await ops.lookup(etc.st_ino, b"no-such-file", None)
        assert missing.st_ino == 0 and missing.entry_timeout >= 3600, "immutable: misses are cached"


async def test_versions_have_their_own_inodes(source):
    async with running(source) as ops:
        one = await resolve(ops, "demo", "1", "etc", "motd")
        two = await resolve(ops, "demo", "2", "etc", "motd")
        via_latest_dir = await resolve(ops, "demo", "2")
        assert one.st_ino != two.st_ino
        assert one.st_ino >> 32 != two.st_ino >> 32
        assert via_latest_dir.st_ino == (two.st_ino >> 32) << 32


# --- reads -------------------------------------------------------------------------

@pytest.mark.parametrize("step", [4096, 100_000, 128 << 10, 3 * SAMPLE_CHUNK + 7])
async def test_reads_equal_the_files(source, step):
    tree = source.root / "demo" / "1"
    async with running(source) as ops:
        for rel in ("bin/tool", "big.bin", "empty", "sparse.img", "with space/na\u00efve \u0444\u0430\u0439\u043b.txt", ODD_NAME):
            attr = await resolve(ops, "demo", "1", *rel.split("/"))
            data = await read_all(ops, attr.st_ino, attr.st_size, step)
            assert data == (tree / rel).read_bytes(), rel


async def test_reads_across_chunk_boundaries(source):
    expected = (source.root / "demo" / "1" / "bin/tool").read_bytes()
    async with running(source) as ops:
        attr = await resolve(ops, "demo", "1", "bin", "tool")
        info = await ops.open(attr.st_ino, os.O_RDONLY, None)
        for off, size in [(SAMPLE_CHUNK - 1, 2), (SAMPLE_CHUNK - 100, 2 * SAMPLE_CHUNK + 200),
                          (0, len(expected) + 10), (len(expected) - 5, 100), (len(expected), 10)]:
            assert bytes(await ops.read(info.fh, off, size)) == expected[off:off + size]


async def test_sparse_file_reads_zeros_and_its_island(source):
    async with running(source) as ops:
        attr = await resolve(ops, "demo", "1", "sparse.img")
        info = await ops.open(attr.st_ino, os.O_RDONLY, None)
        assert bytes(await ops.read(info.fh, 0, 4096)) == bytes(4096)
        assert bytes(await ops.read(info.fh, 5 * SAMPLE_CHUNK + 10, 9)) == b"an island"
        assert attr.st_size == 10 * SAMPLE_CHUNK


async def test_one_source_call_per_block_for_eight_128k_reads(tmp_path):
    root = tmp_path / "imis"
    (root / "img" / "1").mkdir(parents=True)
    data = os.urandom(4 << 20)
    (root / "img" / "1" / "disk").write_bytes(data)
    source = TreeSource(root, 1 << 20)
    async with running(source, readahead=False) as ops:
        attr = await resolve(ops, "img", "1", "disk")
        info = await ops.open(attr.st_ino, os.O_RDONLY, None)
        for off in range(0, 1 << 20, 128 << 10):
            assert bytes(await ops.read(info.fh, off, 128 << 10)) == data[off:off + (128 << 10)]
        assert source.calls["block"] == 1
        assert ops.stats["lru_hits"] == 7

        # Concurrent readers of one cold block share one fetch.
        source.delay = 0.2
        async with trio.open_nursery() as nursery:
            for off in range(1 << 20, 2 << 20, 128 << 10):
                nursery.start_soon(ops.read, info.fh, off, 128 << 10)
        assert source.calls["block"] == 2
        assert ops.stats["coalesced"] == 7


async def test_lru_is_bounded(tmp_path):
    root = tmp_path / "imis"
    (root / "img" / "1").mkdir(parents=True)
    (root / "img" / "1" / "disk").write_bytes(os.urandom(1 << 20))
    source = TreeSource(root, 64 << 10)
    async with running(source, lru_bytes=256 << 10, readahead=False) as ops:
        attr = await resolve(ops, "img", "1", "disk")
        await read_all(ops, attr.st_ino, attr.st_size, 64 << 10)
        status = ops.status()
        assert status["lru_bytes"] <= 256 << 10 and status["lru_blocks"] == 4


async def test_fully_read_blocks_are_evicted_before_partly_read_ones(tmp_path):
    root = tmp_path / "imis"
    (root / "img" / "1").mkdir(parents=True)
    data = os.urandom(1 << 20)
    (root / "img" / "1" / "disk").write_bytes(data)
    block = 64 << 10
    source = TreeSource(root, block)
    async with running(source, lru_bytes=3 * block, readahead=False) as ops:
        attr = await resolve(ops, "img", "1", "disk")
        info = await ops.open(attr.st_ino, os.O_RDONLY, None)
        await ops.read(info.fh, 0, block // 2)  # block 0: half read, the kernel will be back
        await ops.read(info.fh, block, block)  # block 1: all of it went to the kernel
        await ops.read(info.fh, 2 * block, block)  # block 2, likewise
        await ops.read(info.fh, 3 * block, block)  # block 3: room is needed now
        calls = source.calls["block"]
        assert bytes(await ops.read(info.fh, block // 2, block // 2)) == data[block // 2:block]
        assert source.calls["block"] == calls, "the partly read block was evicted"


# --- failures ----------------------------------------------------------------------

async def test_hung_source_gives_eio_within_the_timeout(source):
    async with running(source, timeout=0.5) as ops:
        attr = await resolve(ops, "demo", "1", "bin", "tool")
        info = await ops.open(attr.st_ino, os.O_RDONLY, None)
        source.hang = True
        started = trio.current_time()
        with pytest.raises(pyfuse3.FUSEError) as raised:
            await ops.read(info.fh, 0, 4096)
        assert raised.value.errno == errno.EIO
        assert 0.5 <= trio.current_time() - started < 1.5
        # The kernel asks again for the page it got EIO for: answered at once.
        started = trio.current_time()
        with pytest.raises(pyfuse3.FUSEError):
            await ops.read(info.fh, 0, 4096)
        assert trio.current_time() - started < 0.2
        assert ops.stats["eio"] == 2
        # A manifest that never comes: EIO for the lookup, within the bound too.
        started = trio.current_time()
        with pytest.raises(pyfuse3.FUSEError) as raised:
            await resolve(ops, "demo", "2")
        assert raised.value.errno == errno.EIO
        assert trio.current_time() - started < 1.5


async def test_cached_data_reads_when_the_source_fails(source):
    expected = (source.root / "demo" / "1" / "bin/tool").read_bytes()
    async with running(source, readahead=False) as ops:
        attr = await resolve(ops, "demo", "1", "bin", "tool")
        assert await read_all(ops, attr.st_ino, attr.st_size, 128 << 10) == expected
        source.fail = True
        await ops.refresh()  # the catalogue stays the last one known
        calls = source.calls["block"]
        again = await resolve(ops, "demo", "1", "bin", "tool")
        assert await read_all(ops, again.st_ino, again.st_size, 128 << 10) == expected
        assert source.calls["block"] == calls
        big = await resolve(ops, "demo", "1", "big.bin")
        info = await ops.open(big.st_ino, os.O_RDONLY, None)
        with pytest.raises(pyfuse3.FUSEError) as raised:
            await ops.read(info.fh, 0, 4096)
        assert raised.value.errno == errno.EIO


async def test_writes_are_refused(source):
    async with running(source) as ops:
        etc = await resolve(ops, "demo", "1", "etc")
        motd = await resolve(ops, "demo", "1", "etc", "motd")
        refusals = [
            ops.open(motd.st_ino, os.O_WRONLY, None),
            ops.open(motd.st_ino, os.O_RDWR, None),
            ops.open(motd.st_ino, os.O_RDONLY | os.O_TRUNC, None),
            ops.setattr(motd.st_ino, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), None, None),
            ops.create(etc.st_ino, b"new", 0o644, os.O_WRONLY, None),
            ops.mkdir(etc.st_ino, b"new", 0o755, None),
            ops.mknod(etc.st_ino, b"new", 0o644 | stat.S_IFIFO, 0, None),
            ops.unlink(etc.st_ino, b"motd", None),
            ops.rmdir(ROOT, b"demo", None),
            ops.symlink(etc.st_ino, b"new", b"motd", None),
            ops.rename(etc.st_ino, b"motd", etc.st_ino, b"new", 0, None),
            ops.link(motd.st_ino, etc.st_ino, b"new", None),
            ops.write(1, 0, b"x"),
            ops.setxattr(motd.st_ino, b"user.x", b"1", None),
            ops.removexattr(motd.st_ino, b"user.x", None),
        ]
        for call in refusals:
            with pytest.raises(pyfuse3.FUSEError) as raised:
                await call
            assert raised.value.errno == errno.EROFS


# --- keeping current ---------------------------------------------------------------

async def test_new_version_and_rollback_appear(source, listdir):
    async with running(source) as ops:
        demo = await resolve(ops, "demo")
        latest = await resolve(ops, "demo", "latest")
        assert await ops.readlink(latest.st_ino, None) == b"2"

        build_sample_tree(source.root / "demo" / "3", variant=3)
        await ops.refresh()
        assert await ops.readlink(latest.st_ino, None) == b"3"
        assert b"3" in await listdir(ops, demo.st_ino)
        three = await resolve(ops, "demo", "3", "etc", "motd")
        assert await read_all(ops, three.st_ino, three.st_size, 4096) == b"welcome to version 3\n"

        source.rollback("demo", 1)
        await ops.refresh()
        assert await ops.readlink(latest.st_ino, None) == b"1"
        assert (await ops.getattr(latest.st_ino, None)).st_size == 1
        await trio.sleep(0.1)  # invalidations go out from their own task
        assert ("entry", demo.st_ino, "latest") in ops.invalidations
        assert ("inode", latest.st_ino, "") in ops.invalidations


async def test_refresh_task_polls_the_catalogue(source):
    async with running(source, refresh=0.05) as ops:
        latest = await resolve(ops, "demo", "latest")
        source.rollback("demo", 1)
        with trio.fail_after(2):
            while await ops.readlink(latest.st_ino, None) != b"1":
                await trio.sleep(0.02)


async def test_deleted_imi_disappears(source):
    async with running(source) as ops:
        await resolve(ops, "demo")
        source.root.joinpath("demo").rename(source.root.parent / "gone")
        await ops.refresh()
        with pytest.raises(pyfuse3.FUSEError):
            await resolve(ops, "demo")
        await trio.sleep(0.1)
        assert ("entry", ROOT, "demo") in ops.invalidations


# --- readahead ---------------------------------------------------------------------

C = 1 << 20  # the chunk size of the detector tests


def test_readahead_starts_after_a_block_read_in_sequence_and_grows():
    ra = Readahead(chunks=100, chunk_size=C, max_near=8, max_far=32)
    for off in range(0, C - 4096, 4096):
        assert ra.advise(off, off + 4096) == (range(0), range(0)), "less than a block in sequence"
    near, far = ra.advise(C - 4096, C)
    assert list(near) == [1] and not far, "a block in sequence: one block ahead"
    warmed, ahead, top_ups = [1], [], 0
    for block in range(1, 8):
        near, far = ra.advise(block * C, (block + 1) * C)
        assert not near or min(near) == warmed[-1] + 1, "contiguous, never twice"
        warmed += list(near)
        top_ups += bool(near)
        window = block + 1  # blocks read in sequence
        ahead.append(warmed[-1] - block)
        assert window // 2 <= ahead[-1] <= window, (block, ahead)
        assert not far or block == 7, "no far window before the near one is full"
    assert ahead[-1] == 8 and top_ups < 7, "the window grows with the run, topped up in batches"
    assert list(far) == list(range(16, 40)), "a full near window opens the far one"
    assert ra.advise(8 * C, 9 * C)[1] == range(0), "topped up only once half of it is used"
    assert ra.advise(50 * C, 50 * C + 4096) == (range(0), range(0)), "a jump starts a new stream"
    # The end of the file bounds everything.
    ra = Readahead(chunks=3, chunk_size=C, max_near=8, max_far=32)
    for block in range(3):
        near, far = ra.advise(block * C, (block + 1) * C)
        assert max(near, default=0) <= 2 and max(far, default=0) <= 2


def test_readahead_follows_interleaved_streams_of_one_file():
    """A disk image is read by many guest processes through one open file."""
    ra = Readahead(chunks=100, chunk_size=C, max_near=4, max_far=8)
    a, b = 0, 40 * C
    for _ in range(3):
        near_a, _ = ra.advise(a, a + C)
        near_b, _ = ra.advise(b, b + C)
        a, b = a + C, b + C
    assert near_a and min(near_a) > a // C - 1 and near_b and min(near_b) > b // C - 1
    assert len(ra.streams) == 2


def test_scattered_small_reads_in_neighbouring_blocks_read_nothing_ahead():
    """What a boot does: 4-64 KiB here and there, often in the same or the next block."""
    ra = Readahead(chunks=100, chunk_size=C, max_near=8, max_far=32)
    for off, size in [(3 * C + 100 << 10, 16 << 10), (4 * C + (500 << 10), 4096), (3 * C + (900 << 10), 64 << 10),
                      (4 * C + (20 << 10), 4096), (5 * C, 8192), (4 * C + (700 << 10), 16 << 10)] * 3:
        assert ra.advise(off, off + size) == (range(0), range(0))


async def test_sequential_reads_fetch_ahead(source):
    async with running(source, max_near=1, max_far=3) as ops:
        attr = await resolve(ops, "demo", "1", "bin", "tool")  # 4 chunks
        info = await ops.open(attr.st_ino, os.O_RDONLY, None)
        for off in range(0, SAMPLE_CHUNK, 16 << 10):
            await ops.read(info.fh, off, 16 << 10)
        await trio.sleep(0.1)
        chunks = source._manifests["demo", 1].find("bin/tool").chunks
        assert source.block_calls[chunks[1]] == 1, "the next block was fetched before it was read"
        assert ops.stats["readahead_blocks"] >= 1
        assert ops.stats["prefetch_calls"] == 1
        assert source.prefetched[-1] == ("demo", 1, list(chunks[2:4]))
        # It is a hit now.
        hits = ops.stats["lru_hits"]
        await ops.read(info.fh, SAMPLE_CHUNK, 4096)
        assert ops.stats["lru_hits"] == hits + 1


async def test_random_reads_fetch_nothing_ahead(source):
    async with running(source) as ops:
        attr = await resolve(ops, "demo", "1", "sparse.img")  # 10 chunks
        info = await ops.open(attr.st_ino, os.O_RDONLY, None)
        for block in (7, 2, 9, 4):
            await ops.read(info.fh, block * SAMPLE_CHUNK, 4096)
        assert ops.stats["readahead_blocks"] == 0 and ops.stats["prefetch_calls"] == 0


# --- boot profiles -----------------------------------------------------------------

async def test_profile_recorded_in_first_touch_order_and_saved(source):
    async with running(source, profile_quiet=0.3, readahead=False) as ops:
        manifest = await source.manifest("demo", 1)
        order = ["big.bin", "etc/motd", "bin/tool"]
        for rel in order:
            attr = await resolve(ops, "demo", "1", *rel.split("/"))
            await read_all(ops, attr.st_ino, attr.st_size, 128 << 10)
        big = await resolve(ops, "demo", "1", "big.bin")
        await read_all(ops, big.st_ino, big.st_size, 4096)  # touched again: not recorded twice
        expected = list(dict.fromkeys(d for rel in order for d in manifest.blocks_of(manifest.find(rel))))
        assert source.calls["save_profile"] == 0, "still recording"
        assert ops.profiles.recorded("demo", 1) == expected
        with trio.fail_after(3):
            while ("demo", 1) not in source.profiles:
                await trio.sleep(0.05)
        assert source.profiles["demo", 1] == expected
        assert ops.stats["profiles_saved"] == 1


async def test_profile_recording_stops_at_its_cap(source):
    async with running(source, profile_quiet=0.2, profile_max_blocks=2, readahead=False) as ops:
        attr = await resolve(ops, "demo", "1", "big.bin")  # 4 distinct blocks
        await read_all(ops, attr.st_ino, attr.st_size, 4096)
        with trio.fail_after(3):
            while ("demo", 1) not in source.profiles:
                await trio.sleep(0.05)
        manifest = await source.manifest("demo", 1)
        assert source.profiles["demo", 1] == list(manifest.find("big.bin").chunks[:2])


async def test_profile_not_saved_when_the_version_has_one(source):
    manifest = await source.manifest("demo", 1)
    source.profiles["demo", 1] = list(manifest.find("etc/motd").chunks)
    async with running(source, profile_quiet=0.2, readahead=False) as ops:
        attr = await resolve(ops, "demo", "1", "bin", "tool")
        await read_all(ops, attr.st_ino, attr.st_size, 4096)
        await trio.sleep(0.6)
        assert ops.stats["profiles_recorded"] == 1
        assert source.calls["save_profile"] == 0
        assert source.profiles["demo", 1] == list(manifest.find("etc/motd").chunks)


async def test_older_profile_replayed_filtered_then_replaced(source):
    one = await source.manifest("demo", 1)
    two = await source.manifest("demo", 2)
    old_profile = [*one.find("bin/tool").chunks, *one.find("empty").chunks, *one.find("sparse.img").chunks]
    source.profiles["demo", 1] = old_profile
    async with running(source, profile_quiet=0.2, readahead=False) as ops:
        await resolve(ops, "demo", "2")  # first access to version 2
        with trio.fail_after(2):
            while not source.prefetched:
                await trio.sleep(0.01)
        imi, version, digests = source.prefetched[0]
        assert (imi, version) == ("demo", 2)
        assert digests == [d for d in dict.fromkeys(old_profile) if d in two.digests()]
        assert digests, "the sparse file's zero blocks are shared by both versions"
        assert not set(one.find("bin/tool").chunks) & set(digests), "variant 2 changed bin/tool"
        attr = await resolve(ops, "demo", "2", "bin", "tool")
        await read_all(ops, attr.st_ino, attr.st_size, 4096)
        with trio.fail_after(3):
            while ("demo", 2) not in source.profiles:
                await trio.sleep(0.05)
        assert source.profiles["demo", 2] == list(dict.fromkeys(two.find("bin/tool").chunks))


async def test_profile_recording_follows_a_boot_that_keeps_its_disk_open(source):
    """qemu holds the disk image open from start to end; between two reads the
    guest may spend longer on the CPU than the quiet time: the recording waits."""
    async with running(source, profile_quiet=0.2, readahead=False) as ops:
        manifest = await source.manifest("demo", 1)
        disk = await resolve(ops, "demo", "1", "big.bin")
        info = await ops.open(disk.st_ino, os.O_RDONLY, None)
        await ops.read(info.fh, 0, 4096)
        await trio.sleep(0.8)  # four quiet times without a new block, the disk still open
        assert ops.profiles.recording_state("demo", 1) == {"state": "recording", "blocks": 1}
        await ops.read(info.fh, 3 * SAMPLE_CHUNK, 4096)
        tool = await resolve(ops, "demo", "1", "bin", "tool")
        await read_all(ops, tool.st_ino, tool.st_size, 64 << 10)  # opened and closed meanwhile
        await trio.sleep(0.5)
        assert source.calls["save_profile"] == 0, "still recording while the disk is open"
        await ops.release(info.fh)  # qemu exits
        with trio.fail_after(3):
            while ("demo", 1) not in source.profiles:
                await trio.sleep(0.05)
        big = manifest.find("big.bin").chunks
        assert source.profiles["demo", 1] == list(dict.fromkeys([big[0], big[3], *manifest.find("bin/tool").chunks]))
        assert ops.profiles.recording_state("demo", 1)["ended_by"] == "closed"
        assert ops.status()["profile_recordings"]["demo@1"]["state"] == "ended"


async def test_the_session_line_ends_the_recording_while_the_disk_is_open(source):
    async with running(source, profile_quiet=60, readahead=False) as ops:
        manifest = await source.manifest("demo", 1)
        folder = await resolve(ops, "demo", "1")
        disk = await resolve(ops, "demo", "1", "big.bin")
        info = await ops.open(disk.st_ino, os.O_RDONLY, None)
        await ops.read(info.fh, SAMPLE_CHUNK, 4096)
        with pytest.raises(pyfuse3.FUSEError) as refused:  # a name the mount does not know
            await ops.getxattr(folder.st_ino, b"user.other", None)
        assert refused.value.errno == pyfuse3.ENOATTR
        with pytest.raises(pyfuse3.FUSEError):  # asked of a file, not of the version folder
            await ops.getxattr(disk.st_ino, SESSION_UP_XATTR.encode(), None)
        assert ops.profiles.recording_state("demo", 1)["state"] == "recording"
        state = json.loads(await ops.getxattr(folder.st_ino, SESSION_UP_XATTR.encode(), None))
        assert state == {"state": "ended", "blocks": 1, "ended_by": "session"}
        with trio.fail_after(3):
            while ("demo", 1) not in source.profiles:
                await trio.sleep(0.05)
        assert source.profiles["demo", 1] == [manifest.find("big.bin").chunks[1]]
        await ops.read(info.fh, 2 * SAMPLE_CHUNK, 4096)  # after the session: not in the profile
        assert ops.profiles.recorded("demo", 1) == [manifest.find("big.bin").chunks[1]]
        await ops.release(info.fh)


async def test_replay_pulls_the_profile_into_memory_a_window_ahead_of_readers(source):
    manifest = await source.manifest("demo", 1)
    chunks = list(manifest.find("big.bin").chunks)  # 4 distinct blocks
    assert len(set(chunks)) == 4
    source.profiles["demo", 1] = chunks

    async def settled(fetched: int) -> None:
        with trio.fail_after(3):
            while sum(source.block_calls[d] for d in chunks) < fetched:
                await trio.sleep(0.01)
        await trio.sleep(0.2)  # time enough to fetch further if the window allowed it

    # Memory for 4 blocks: the profile may run 2 ahead of the readers.
    async with running(source, lru_bytes=4 * SAMPLE_CHUNK, readahead=False) as ops:
        attr = await resolve(ops, "demo", "1", "big.bin")  # first access: the replay starts
        await settled(2)
        assert [source.block_calls[d] for d in chunks] == [1, 1, 0, 0]
        info = await ops.open(attr.st_ino, os.O_RDONLY, None)
        expected = (source.root / "demo" / "1" / "big.bin").read_bytes()
        got = []
        for index in range(4):
            hits = ops.stats["lru_hits"]
            got.append(bytes(await ops.read(info.fh, index * SAMPLE_CHUNK, SAMPLE_CHUNK)))
            assert ops.stats["lru_hits"] == hits + 1, f"block {index} was not in memory when read"
            await settled(min(4, index + 3))
            assert sum(source.block_calls[d] for d in chunks) == min(4, index + 3)
        assert b"".join(got) == expected
        assert [source.block_calls[d] for d in chunks] == [1, 1, 1, 1]
        assert ops.stats["follow_blocks"] == 4
        assert (ops.stats["profile_blocks_ready"], ops.stats["profile_blocks_late"]) == (4, 0)


async def test_profile_blocks_a_reader_asks_for_first_count_as_late(source):
    manifest = await source.manifest("demo", 1)
    chunks = list(manifest.find("big.bin").chunks)
    source.profiles["demo", 1] = chunks
    source.stall_block(chunks[0])  # the replay's batch cannot come in yet
    async with running(source, readahead=False) as ops:
        attr = await resolve(ops, "demo", "1", "big.bin")
        with trio.fail_after(3):
            while not ops.stats["follow_blocks"]:
                await trio.sleep(0.01)
        info = await ops.open(attr.st_ino, os.O_RDONLY, None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.read, info.fh, 0, 4096)  # waits with the replay for block 0: late
            await trio.sleep(0.2)
            source.release_block(chunks[0])
        await ops.read(info.fh, 0, 4096)  # read again: counted once
        await ops.read(info.fh, 2 * SAMPLE_CHUNK, 4096)
        await ops.read(info.fh, 3 * SAMPLE_CHUNK, 4096)
        assert (ops.stats["profile_blocks_ready"], ops.stats["profile_blocks_late"]) == (2, 1)
        assert source.block_calls[chunks[0]] == 1, "the reader waited for the replay's fetch"


async def test_replay_into_memory_stops_when_readers_take_nothing(source):
    manifest = await source.manifest("demo", 1)
    chunks = list(manifest.find("big.bin").chunks)
    source.profiles["demo", 1] = chunks
    async with running(source, lru_bytes=2 * SAMPLE_CHUNK, readahead=False, profile_follow_idle=0.3) as ops:
        await resolve(ops, "demo", "1")
        with trio.fail_after(3):
            while not ops.stats["follow_idle_stops"]:
                await trio.sleep(0.02)
        assert [source.block_calls[d] for d in chunks] == [1, 0, 0, 0]


# --- status ------------------------------------------------------------------------

async def test_status_file(source):
    async with running(source, readahead=False) as ops:
        motd = await resolve(ops, "demo", "1", "etc", "motd")
        await read_all(ops, motd.st_ino, motd.st_size, 4096)
        status = await resolve(ops, ".icbd", "status")
        assert stat.S_IMODE(status.st_mode) == 0o444
        info = await ops.open(status.st_ino, os.O_RDONLY, None)
        assert info.direct_io
        doc = json.loads(bytes(await ops.read(info.fh, 0, 1 << 20)))
        assert doc["reads"] == 1 and doc["source_blocks"] == 1 and doc["read_bytes"] == motd.st_size
        assert doc["catalog"] == {"demo": {"latest": 2, "versions": [1, 2]}}
        with pytest.raises(pyfuse3.FUSEError) as raised:
            await ops.open(status.st_ino, os.O_WRONLY, None)
        assert raised.value.errno == errno.EROFS


async def test_invalid_imi_names_from_the_catalogue_are_not_shown(source, listdir, monkeypatch):
    from icbdcore.catalog import Catalog, ImiInfo

    async def catalog():
        return Catalog({".icbd": ImiInfo(".icbd", None), "Bad Name": ImiInfo("Bad Name", None),
                        "ok": ImiInfo("ok", None)})

    monkeypatch.setattr(source, "catalog", catalog)
    async with running(source) as ops:
        assert set(await listdir(ops, ROOT)) == {b"ok"}
        assert stat.S_ISDIR((await resolve(ops, ".icbd")).st_mode), "the control folder wins"


def test_sample_tree_has_every_kind(tmp_path):
    tree = build_sample_tree(tmp_path / "t")
    kinds = {stat.S_IFMT(os.lstat(p).st_mode) for p in Path(tree).rglob("*")}
    assert {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO} <= kinds


async def test_readers_proceed_in_parallel(tmp_path):
    root = tmp_path / "imis"
    (root / "img" / "1").mkdir(parents=True)
    (root / "img" / "1" / "disk").write_bytes(os.urandom(16 * SAMPLE_CHUNK))
    source = TreeSource(root, SAMPLE_CHUNK)
    async with running(source, readahead=False) as ops:
        attr = await resolve(ops, "img", "1", "disk")
        info = await ops.open(attr.st_ino, os.O_RDONLY, None)
        source.delay = 0.3
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for block in range(16):
                nursery.start_soon(ops.read, info.fh, block * SAMPLE_CHUNK, 4096)
        assert trio.current_time() - started < 1.0, "16 slow blocks were fetched one after another"
        assert source.calls["block"] == 16


async def test_a_bug_answers_eio_instead_of_ending_the_request_loop(source, monkeypatch):
    async with running(source, readahead=False) as ops:
        attr = await resolve(ops, "demo", "1", "bin", "tool")
        info = await ops.open(attr.st_ino, os.O_RDONLY, None)

        async def broken_block(digest, imi, version):
            raise RuntimeError("a bug in a source")

        monkeypatch.setattr(source, "block", broken_block)
        with pytest.raises(pyfuse3.FUSEError) as raised:
            await ops.read(info.fh, 0, 4096)
        assert raised.value.errno == errno.EIO

        async def broken_get(*args):
            raise KeyError("a bug in the filesystem")

        monkeypatch.setattr(BlockCache, "get", broken_get)
        with pytest.raises(pyfuse3.FUSEError) as raised:
            await ops.read(info.fh, SAMPLE_CHUNK, 4096)
        assert raised.value.errno == errno.EIO
