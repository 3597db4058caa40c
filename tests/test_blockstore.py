"""BlockStore on a real LMDB and real files: verification, the bound, SLRU
protection, concurrent use, and recovery after a real kill -9."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from cache.blockstore import BadBlock, BlockStore, StoreBusy, local_check
from cache.eviction import parse_entry
from icbdcore.wire import content_digest

MiB = 1 << 20


def make_blocks(count: int, size: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """`count` distinct blocks of `size` bytes (one random buffer, numbered)."""
    base = bytearray(random.Random(seed).randbytes(size))
    out = []
    for i in range(count):
        base[:8] = (seed << 40 | i).to_bytes(8, "little")
        data = bytes(base)
        out.append((content_digest(data), data))
    return out


def assert_consistent(store: BlockStore) -> dict:
    found = store.audit(verify=True)
    assert found["missing"] == [] and found["damaged"] == [] and found["orphans"] == []
    assert found["order_mismatch"] == 0 and found["totals_ok"]
    return found


@pytest.fixture
def store(tmp_path):
    s = BlockStore(tmp_path / "blocks", 64 * MiB)
    yield s
    s.close()


def test_put_get_round_trip_and_reopen(tmp_path):
    blocks = make_blocks(5, 100_000) + [(content_digest(b"tiny"), b"tiny")]
    with BlockStore(tmp_path / "blocks", 64 * MiB) as store:
        for digest, data in blocks:
            assert store.put(digest, data) is True
        assert store.put(*blocks[0]) is False  # already there
        for digest, data in blocks:
            assert digest in store
            assert store.get(digest) == data
        unknown = content_digest(b"never stored")
        assert store.get(unknown) is None and unknown not in store
        assert store.missing([d for d, _ in blocks] + [unknown]) == [unknown]
        stats = store.stats()
        assert stats["blocks"] == 6 and stats["bytes"] == 5 * 100_000 + 4
        assert stats["footprint"] == 5 * 102_400 + 4096  # charged in 4 KiB units
        assert stats["hits"] == 6 and stats["misses"] == 1
        assert (tmp_path / "blocks" / blocks[0][0][:2] / blocks[0][0]).is_file()
    with BlockStore(tmp_path / "blocks", 64 * MiB) as store:
        assert not store.stats()["recovering"]  # closed cleanly: no recovery pass
        assert [store.get(d) for d, _ in blocks] == [b for _, b in blocks]
        assert_consistent(store)


def test_put_refuses_bytes_that_do_not_match(store):
    digest = content_digest(b"right")
    with pytest.raises(BadBlock):
        store.put(digest, b"wrong")
    with pytest.raises(ValueError):
        store.put("../../etc/passwd", b"x")
    assert digest not in store and store.stats()["blocks"] == 0
    assert list((store.path / "tmp").iterdir()) == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_or_lost_file_is_a_miss_and_dropped(store, damage, caplog):
    (digest, data), (other, other_data) = make_blocks(2, 200_000)
    store.put(digest, data)
    store.put(other, other_data)
    path = store.path / digest[:2] / digest
    if damage == "flip":
        raw = bytearray(path.read_bytes())
        raw[12345] ^= 0x40
        path.write_bytes(raw)
    elif damage == "truncate":
        os.truncate(path, 1000)
    else:
        path.unlink()
    with caplog.at_level(logging.WARNING, logger="cache.blockstore"):
        assert store.get(digest) is None
    assert digest not in store and not path.exists()
    assert "dropped it from the store" in caplog.text
    stats = store.stats()
    assert stats["blocks"] == 1 and stats["bytes"] == 200_000
    assert stats["corrupt_dropped" if damage != "delete" else "missing_dropped"] == 1
    assert store.get(other) == other_data
    # Stored again, it is served again.
    assert store.put(digest, data) is True and store.get(digest) == data
    assert_consistent(store)


@pytest.mark.parametrize("kind", ["symlink", "directory", "fifo"])
def test_something_else_in_a_block_s_place_is_damage(store, kind):
    """Not a regular file where the block was: a miss, dropped. A fifo is
    opened without blocking (a plain open would wait for a writer forever)."""
    (digest, data), = make_blocks(1, 5000)
    store.put(digest, data)
    path = store.path / digest[:2] / digest
    path.unlink()
    if kind == "symlink":
        (store.path / "elsewhere").write_bytes(data)
        path.symlink_to(store.path / "elsewhere")
    elif kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    result: list = []
    reader = threading.Thread(target=lambda: result.append(store.get(digest)), daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # let the old code's blocking open go before failing
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
        raise AssertionError(f"reading a block with a {kind} in its place blocked")
    assert result == [None]
    assert digest not in store and store.stats()["corrupt_dropped"] == 1
    assert not os.path.lexists(path)


@pytest.mark.parametrize("code", ["EMFILE", "ENFILE", "ENOMEM", "EIO", "EACCES"])
def test_errors_that_are_not_the_block_s_fault_leave_it(store, monkeypatch, code):
    """Out of descriptors (the process's or the host's), memory, a failing
    disk, a permission changed by hand: the read fails as a store error, and
    the block stays, readable once the trouble is gone."""
    import errno

    (digest, data), = make_blocks(1, 5000)
    store.put(digest, data)
    real_open = os.open

    def failing_open(path, flags, *args, **kwargs):
        if str(path).endswith(digest):
            number = getattr(errno, code)
            raise OSError(number, os.strerror(number), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    with pytest.raises(OSError) as caught:
        store.get(digest)
    monkeypatch.setattr(os, "open", real_open)
    assert caught.value.errno == getattr(__import__("errno"), code)
    assert digest in store and (store.path / digest[:2] / digest).exists()
    assert store.get(digest) == data
    stats = store.stats()
    assert stats["corrupt_dropped"] == 0 and stats["missing_dropped"] == 0


_EXHAUST = textwrap.dedent("""
    import errno, json, os, resource, sys
    from pathlib import Path
    from cache.blockstore import BlockStore
    from icbdcore.wire import content_digest

    store = BlockStore(Path(sys.argv[1]), 64 << 20)
    blocks = []
    for i in range(20):
        data = os.urandom(8192)
        blocks.append((content_digest(data), data))
        store.put(*blocks[-1])
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 8, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    held = []
    while True:  # every descriptor taken, as a flood of connections would
        try:
            held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as error:
            assert error.errno == errno.EMFILE, error
            break
    outcomes = []
    for digest, _ in blocks:
        try:
            outcomes.append("hit" if store.get(digest) else "miss")
        except OSError as error:
            outcomes.append(errno.errorcode[error.errno])
    for fd in held:
        os.close(fd)
    kept = sum(store.get(digest) == data for digest, data in blocks)
    stats = store.stats()
    store.close()
    print(json.dumps({"outcomes": outcomes, "kept": kept, "dropped": stats["corrupt_dropped"]
                      + stats["missing_dropped"], "blocks": stats["blocks"]}))
""")


def test_running_out_of_descriptors_never_deletes_a_block(tmp_path):
    """A real process at its RLIMIT_NOFILE: every read fails with EMFILE, a
    store error, and once descriptors are free again all 20 blocks are there."""
    import json

    result = subprocess.run([sys.executable, "-c", _EXHAUST, str(tmp_path / "blocks")],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    print(f"\nat the descriptor limit: reads {sorted(set(found['outcomes']))}; after: {found['kept']} of 20 "
          f"blocks kept, {found['dropped']} dropped")
    assert set(found["outcomes"]) == {"EMFILE"}
    assert found["kept"] == 20 and found["dropped"] == 0 and found["blocks"] == 20


def test_the_store_checks_its_local_xxh3_and_arrivals_check_blake3(store):
    """Two checks, two jobs. A block enters by its BLAKE3 name (checked by
    put(), or by the fetcher's client before put(verified=True)); reads check
    the xxh3-64 kept in its index entry, so a file whose bytes changed on
    this disk is caught without a BLAKE3 pass per read."""
    (digest, data), (other, other_data) = make_blocks(2, 300_000)
    assert store.put(digest, data, verified=True) is True
    with lmdb_entries(store) as (txn, entries):
        entry = parse_entry(txn.get(bytes.fromhex(digest), db=entries))
    assert entry.size == len(data) and entry.check == local_check(data)
    # The index holds the right xxh3 of the block; the file now holds other bytes of the same length.
    path = store.path / digest[:2] / digest
    path.write_bytes(other_data)
    assert store.get(digest) is None and digest not in store
    assert store.stats()["corrupt_dropped"] == 1
    # Bytes that do not match their BLAKE3 name never enter, whatever their xxh3.
    with pytest.raises(BadBlock):
        store.put(digest, other_data)
    assert store.put(other, other_data) is True and store.get(other) == other_data
    assert_consistent(store)


def test_recovery_adopts_a_file_only_by_its_blake3_name(tmp_path):
    path = tmp_path / "blocks"
    (good, good_data), (bad, _), (_, other_data) = make_blocks(3, 50_000)
    with BlockStore(path, 64 * MiB):
        pass
    for name, data in ((good, good_data), (bad, other_data), ("0" * 32, good_data)):
        (path / name[:2]).mkdir(exist_ok=True)
        (path / name[:2] / name).write_bytes(data)
    (path / "index" / "data.mdb").unlink()  # lost: rebuilt from the files
    with BlockStore(path, 64 * MiB) as store:
        assert store.wait_recovered(30)
        assert store.get(good) == good_data
        assert bad not in store and not (path / bad[:2] / bad).exists()
        assert not (path / "00" / ("0" * 32)).exists()
        assert_consistent(store)


def test_a_store_of_format_1_is_emptied_with_a_log_line(tmp_path, caplog):
    """Format 1 named blocks by xxh3-128 (16-byte keys): a cache, so emptied, not converted."""
    import lmdb

    path = tmp_path / "blocks"
    old_name = "ab" * 16
    (path / "ab").mkdir(parents=True)
    (path / "ab" / old_name).write_bytes(b"an old block")
    env = lmdb.open(str(path / "index"), max_dbs=3)
    meta, entries = env.open_db(b"meta"), env.open_db(b"entries")
    with env.begin(write=True) as txn:
        txn.put(b"format", b"1", db=meta)
        txn.put(b"clean", b"1", db=meta)
        txn.put(bytes.fromhex(old_name), b"\0" * 17, db=entries)
    env.close()
    with caplog.at_level(logging.WARNING, logger="cache.blockstore"), BlockStore(path, 64 * MiB) as store:
        assert "format 1" in caplog.text
        assert store.stats()["blocks"] == 0 and not store.stats()["recovering"]
        assert not (path / "ab" / old_name).exists()
        (digest, data), = make_blocks(1, 1000)
        assert store.put(digest, data) and store.get(digest) == data
    with BlockStore(path, 64 * MiB) as store:
        assert store.get(digest) == data  # format 2 from now on: kept


@contextlib.contextmanager
def lmdb_entries(store: BlockStore):
    with store._env.begin(db=store._entries) as txn:
        yield txn, store._entries


def test_malformed_index_value_is_a_miss_and_dropped(store):
    (digest, data), = make_blocks(1, 5000)
    store.put(digest, data)
    with store._env.begin(write=True) as txn:  # what a torn index page could leave
        txn.put(bytes.fromhex(digest), b"junk", db=store._entries)
    assert store.get(digest) is None
    assert digest not in store and store.stats()["corrupt_dropped"] == 1
    assert store.put(digest, data) is True and store.get(digest) == data
    store.close()  # the totals counted the lost entry: the next open recounts
    with BlockStore(store.path, store.bound) as again:
        assert again.wait_recovered(30)
        assert_consistent(again)
        assert again.get(digest) == data and again.stats()["blocks"] == 1


def test_bound_holds_while_500_mib_pass_through(store):
    bound = store.bound
    for digest, data in make_blocks(500, MiB):
        store.put(digest, data)
        assert store.stats()["footprint"] <= bound
    stats = store.stats()
    assert bound - MiB < stats["footprint"] <= bound
    assert stats["evictions"] == 500 - 64 and stats["blocks"] == 64
    on_disk = sum(f.stat().st_size for f in store.path.glob("??/*"))
    assert on_disk == stats["bytes"] <= bound
    assert_consistent(store)


def test_hot_blocks_survive_a_scan(tmp_path):
    """SLRU: blocks read after they arrived are protected; a one-off scan of
    four times the bound evicts only probation. The cold control set, stored at
    the same time but never read, is flushed by the same scan."""
    size = 64 << 10
    with BlockStore(tmp_path / "blocks", 8 * MiB) as store:  # 128 blocks
        hot = make_blocks(24, size, seed=1)
        cold = make_blocks(24, size, seed=2)
        for digest, data in hot + cold:
            store.put(digest, data)
        for digest, data in hot:
            assert store.get(digest) == data
        for digest, data in make_blocks(4 * 128, size, seed=3):
            store.put(digest, data)
        assert store.missing([d for d, _ in hot]) == []
        assert store.missing([d for d, _ in cold]) == [d for d, _ in cold]
        stats = store.stats()
        assert stats["protected"] == 24 * size and stats["footprint"] <= store.bound
        assert_consistent(store)


def test_protected_segment_stays_under_its_cap(tmp_path):
    size = 64 << 10
    with BlockStore(tmp_path / "blocks", 4 * MiB) as store:  # 64 blocks, protected cap 51
        blocks = make_blocks(64, size)
        for digest, data in blocks:
            store.put(digest, data)
        for digest, _ in blocks:
            store.get(digest)
        store.put(*make_blocks(1, size, seed=9)[0])  # a put writes the pending hits
        stats = store.stats()
        assert 0 < stats["protected"] <= stats["protected_cap"]
        assert stats["footprint"] <= store.bound
        assert_consistent(store)


def test_threads_sharing_a_store(store):
    """Four threads put overlapping blocks and read them back: every block is
    counted once and index and files agree afterwards."""
    blocks = make_blocks(64, 50_000)
    errors = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(300):
                digest, data = rng.choice(blocks)
                store.put(digest, data)
                got = store.get(digest)
                assert got is None or got == data
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    found = assert_consistent(store)
    assert found["entries"] == store.stats()["blocks"] == len({d for d, _ in blocks} - set(store.missing(d for d, _ in blocks)))


def test_second_process_is_refused(store):
    with pytest.raises(StoreBusy, match="in use by another process"):
        BlockStore(store.path, MiB)


def test_unreadable_index_is_moved_aside_and_rebuilt_from_files(tmp_path, caplog):
    blocks = make_blocks(10, 30_000)
    with BlockStore(tmp_path / "blocks", 64 * MiB) as store:
        for digest, data in blocks:
            store.put(digest, data)
    bad = make_blocks(1, 30_000, seed=5)[0][0]
    (tmp_path / "blocks" / bad[:2] / bad).write_bytes(b"not the block it claims to be")
    (tmp_path / "blocks" / "index" / "data.mdb").write_bytes(os.urandom(64 << 10))
    with caplog.at_level(logging.ERROR, logger="cache.blockstore"):
        store = BlockStore(tmp_path / "blocks", 64 * MiB)
    try:
        assert "cannot be opened" in caplog.text
        assert (tmp_path / "blocks" / "index.broken").is_dir()
        assert store.wait_recovered(30)
        assert store.stats()["adopted"] == 10
        assert [store.get(d) for d, _ in blocks] == [b for _, b in blocks]
        assert bad not in store and not (tmp_path / "blocks" / bad[:2] / bad).exists()
        assert_consistent(store)
    finally:
        store.close()


# --- kill -9 -------------------------------------------------------------

CHILD = textwrap.dedent("""
    import os, random, signal, sys, threading
    from pathlib import Path
    from cache.blockstore import BlockStore
    from icbdcore.wire import content_digest

    path, seed, crash = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if crash == "after-rename":       # the block file is in place, its entry not committed
        real = os.rename
        def rename(src, dst):
            real(src, dst)
            if "/tmp/" in str(src) and random.random() < 0.2:
                os.kill(os.getpid(), signal.SIGKILL)
        os.rename = rename
    elif crash == "after-unlink":     # an evicted file is gone, its entry not yet deleted
        real_unlink = Path.unlink
        def unlink(self, missing_ok=False):
            real_unlink(self, missing_ok=missing_ok)
            if len(self.name) == 64 and random.random() < 0.2:
                os.kill(os.getpid(), signal.SIGKILL)
        Path.unlink = unlink
    store = BlockStore(Path(path), 2 << 20)
    done = []

    def work(n):
        rng = random.Random(seed * 10 + n)
        mine = []
        while True:
            data = rng.randbytes(rng.choice([100, 5000, 70000, 200000]))
            digest = content_digest(data)
            store.put(digest, data)
            mine.append(digest)
            for d in rng.sample(mine, min(3, len(mine))):
                got = store.get(d)
                assert got is None or content_digest(got) == d
            done.append(1)
            if len(done) % 25 == 0:
                print(len(done), flush=True)

    for n in range(2):
        threading.Thread(target=work, args=(n,), daemon=True).start()
    threading.Event().wait()
""")


def run_and_kill(path: Path, seed: int, crash: str) -> int:
    """Run a writer on the store; kill -9 it after a random amount of work
    (or let it kill itself at a crash point); return the puts it reported."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(seed), crash],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    target = random.Random(seed).randrange(50, 300)
    reported = 0
    try:
        for line in child.stdout:
            reported = int(line)
            if reported >= target:
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    return reported


@pytest.mark.parametrize("crash", ["anywhere", "after-rename", "after-unlink"])
def test_kill_9_leaves_a_store_that_reopens_consistent(tmp_path, crash):
    path = tmp_path / "blocks"
    recovered = adopted = 0
    for round_ in range(3):
        reported = run_and_kill(path, seed=round_ + 7, crash=crash)
        if crash == "anywhere":
            assert reported >= 50
        with BlockStore(path, 2 << 20) as store:
            assert store.wait_recovered(60)
            found = assert_consistent(store)
            assert found["entries"] > 0 and store.stats()["footprint"] <= 2 << 20
            for key in sorted(store.path.glob("??/*"))[:50]:
                assert content_digest(store.get(key.name)) == key.name
            recovered += store.stats()["recovered_entries"]
            adopted += store.stats()["adopted"]
    # The targeted crash points leave exactly the debris recovery exists for.
    if crash == "after-rename":
        assert adopted >= 1
    if crash == "after-unlink":
        assert recovered >= 1
