"""The local block store: verified blocks in files, indexed in LMDB, kept under
a size bound by the segmented LRU of eviction.py.

    PATH/ab/<digest>   one file per block (ab = the digest's first two hex digits)
    PATH/index/        LMDB: digest -> (size, tick, segment, check), the eviction order, totals
    PATH/tmp/          blocks being written; emptied on open
    PATH/lock          flock: one process per store

The index is the truth: a block is in the store when its entry is, and every
read checks the bytes against the entry, so a damaged or missing file is a
miss, never bad data. The concurrency and crash protocol is in docs/CACHE.md.

Who verifies what: a block's name is its BLAKE3-256 digest, and a block is
checked against it once, as it enters: by whoever fetched it (the Fetcher's
BlockClient, which then puts it with `verified=True`), by put() itself
otherwise, and by recovery for every file it adopts. On every read, the
store checks only the xxh3-64 kept in the entry: 1 MiB costs ~17 us of
xxh3 against ~130 us of BLAKE3 (measured here), and what it guards against
is this disk's damage, not an adversary (who could also rewrite the index).

Errors are sorted before anything is deleted: a file that is gone (ENOENT) is
missing; one that is not a regular file, a symlink (ELOOP), or has the wrong
bytes is damaged; both drop the block. Anything else (EMFILE and ENFILE when
the process or host is out of descriptors, ENOMEM, EIO, EACCES...) says
nothing about the block: it is raised as a store error and the block stays.

Synchronous and thread-safe: callers run it in worker threads behind a
CapacityLimiter, never on the trio thread.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterable
from itertools import count
from pathlib import Path

import lmdb
import xxhash

from icbdcore.wire import check_digest, content_digest

from .eviction import ALLOCATION, PROTECTED, SegmentedLRU, footprint, order_key, parse_entry

log = logging.getLogger(__name__)

# 2: 32-byte keys (BLAKE3-256 names) and an xxh3-64 check in every entry.
# A store of format 1 (xxh3-128 names) is emptied at open: it is a cache.
FORMAT = b"2"
# Recency is advisory: hits are collected in memory and written in one
# transaction every FLUSH_EVERY hits or FLUSH_SECONDS, or with the next put.
FLUSH_EVERY = 256
FLUSH_SECONDS = 1.0
# Commits do not fsync (one fsync per 1 MiB put would cost more than the put);
# the index is forced to disk this often, and after a power loss whatever is
# missing or broken is rebuilt from the verified files (see recover()).
SYNC_SECONDS = 10.0

# What a store operation may raise besides ValueError for a bad digest or bad bytes.
STORE_ERRORS = (OSError, lmdb.Error)
# Errors opening a block file that say the file itself is wrong: a symlink
# (O_NOFOLLOW), a directory, a device or socket, a folder replaced by a file.
DAMAGE_ERRNOS = frozenset({errno.ELOOP, errno.EISDIR, errno.ENOTDIR, errno.ENXIO, errno.ENODEV})


class StoreBusy(RuntimeError):
    """Another process has the store open."""


class BadBlock(ValueError):
    """put() was given bytes that do not match the digest."""


def local_check(data: bytes | memoryview) -> int:
    """The cheap re-check kept in a block's entry (xxh3-64): never a name,
    never sent anywhere, only compared with the same bytes read back."""
    return xxhash.xxh3_64_intdigest(data)


class BlockStore:
    def __init__(self, path: Path, size_bound: int):
        if size_bound <= 0:
            raise ValueError("the block store needs a positive size bound")
        self.path = Path(path)
        self.bound = size_bound
        self._tmp = self.path / "tmp"
        self._lock = threading.Lock()  # guards the in-memory state below
        self._touched: dict[bytes, int] = {}  # key -> tick of its latest hit, not yet written
        self._hits_unwritten = 0
        self._flushing = False
        self._flushed_at = self._synced_at = time.monotonic()
        self._names = count()
        self._counters = dict.fromkeys(
            ("hits", "misses", "puts", "put_bytes", "evictions", "evicted_bytes",
             "corrupt_dropped", "missing_dropped", "adopted", "recovered_entries"), 0)
        self._stop = threading.Event()
        self._recovery: threading.Thread | None = None
        self._recovered = False

        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._take_lock()
        try:
            for i in range(256):
                (self.path / f"{i:02x}").mkdir(exist_ok=True)
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp.mkdir()
            dirty = self._open_index()
        except BaseException:
            os.close(self._lock_fd)
            raise
        try:
            self._trim()  # the bound may have shrunk since the last run
        except BaseException:
            self._env.close()
            os.close(self._lock_fd)
            raise
        if dirty:
            self._recovery = threading.Thread(target=self.recover, name="blockstore-recovery", daemon=True)
            self._recovery.start()

    # --- opening and closing -------------------------------------------------

    def _take_lock(self) -> int:
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreBusy(
                f"the block store {self.path} is in use by another process; stop it or use another folder"
            ) from None
        return fd

    def _open_index(self) -> bool:
        """Open the LMDB index; return True if it needs recovery: not closed
        cleanly, or new (block files may be there without an index)."""
        index = self.path / "index"
        try:
            return self._open_env(index)
        except lmdb.Error as error:
            # It is a cache: losing the index costs a rebuild, not data. Say so loudly.
            broken = self.path / "index.broken"
            log.error(
                "block index %s cannot be opened (%s); moved to %s, rebuilding from the block files",
                index, error, broken,
            )
            shutil.rmtree(broken, ignore_errors=True)
            os.rename(index, broken)
            return self._open_env(index)

    def _open_env(self, index: Path) -> bool:
        # Address space, not disk: room for a few hundred bytes of index per 4 KiB of bound.
        map_size = min(1 << 40, max(256 << 20, self.bound // ALLOCATION * 512))
        self._env = lmdb.open(
            str(index), map_size=map_size, max_dbs=3, sync=False, metasync=False, max_spare_txns=4
        )
        try:
            self._policy = SegmentedLRU(self._env, self.bound, self._next_tick)
            self._entries, self._meta = self._policy.entries, self._policy.meta
            with self._env.begin(db=self._meta) as txn:
                fmt = txn.get(b"format")
            if fmt == b"1":
                self._env.close()
                self._empty_format1(index)
                return self._open_env(index)
            with self._env.begin(write=True, db=self._meta) as txn:
                fmt = txn.get(b"format")
                if fmt not in (None, FORMAT):
                    raise lmdb.InvalidError(f"unknown index format {fmt!r}")
                dirty = txn.get(b"clean") != b"1" if fmt is not None else self._has_block_files()
                raw = txn.get(b"tick")
                self._tick = int.from_bytes(raw, "little") if raw and len(raw) == 8 else 0
                txn.put(b"format", FORMAT)
                txn.put(b"clean", b"0")
            self._env.sync(True)  # "not clean" must be on disk before anything changes
        except BaseException:
            self._env.close()
            raise
        return dirty

    def _empty_format1(self, index: Path) -> None:
        log.warning("block store %s is of format 1 (blocks named by xxh3, which this icbd no longer "
                    "trusts): emptying it; blocks are fetched again as they are read", self.path)
        shutil.rmtree(index)
        for i in range(256):
            folder = self.path / f"{i:02x}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()

    def _has_block_files(self) -> bool:
        for i in range(256):
            with os.scandir(self.path / f"{i:02x}") as it:
                if next(it, None) is not None:
                    return True
        return False

    def close(self) -> None:
        """Write pending recency, mark the index clean and release the store."""
        if self._lock_fd < 0:
            return
        self._stop.set()
        if self._recovery is not None:
            self._recovery.join()
        recovered = (self._recovery is None or self._recovered) and not self._policy.malformed_seen
        try:
            self._flush()
            with self._env.begin(write=True, db=self._meta) as txn:
                txn.put(b"clean", b"1" if recovered else b"0")
            self._env.sync(True)
        finally:
            self._env.close()
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- reading -------------------------------------------------------------

    def _file(self, digest: str) -> Path:
        return self.path / digest[:2] / digest

    def __contains__(self, digest: str) -> bool:
        key = bytes.fromhex(check_digest(digest))
        with self._env.begin(db=self._entries) as txn:
            return txn.get(key) is not None

    def missing(self, digests: Iterable[str]) -> list[str]:
        """The digests of `digests` not in the store (one read transaction)."""
        with self._env.begin(db=self._entries) as txn:
            return [d for d in digests if txn.get(bytes.fromhex(check_digest(d))) is None]

    def get(self, digest: str) -> bytes | None:
        """The verified bytes of a block, or None (a damaged or lost file counts as absent)."""
        key = bytes.fromhex(check_digest(digest))
        with self._env.begin(db=self._entries) as txn:
            raw = txn.get(key)
        entry = None if raw is None else parse_entry(raw)
        if entry is None:
            if raw is not None:
                self._drop(key, digest, None, "malformed")
            self._count("misses")
            return None
        size = entry.size
        path = self._file(digest)
        try:
            # O_NONBLOCK: a fifo in the block's place opens at once (and is damage), not never.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            self._drop(key, digest, None, "missing")
            self._count("misses")
            return None
        except OSError as error:
            if error.errno not in DAMAGE_ERRNOS:
                raise  # out of descriptors, memory, a failing disk: the block is not to blame
            self._drop(key, digest, _inode(path), "damaged")
            self._count("misses")
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                self._drop(key, digest, os.fstat(fd).st_ino, "damaged")
                self._count("misses")
                return None
            data = os.read(fd, size)
            while 0 < len(data) < size:  # a short read from a regular file is rare, not an error
                more = os.read(fd, size - len(data))
                if not more:
                    break
                data += more
            # 1 MiB: read from the page cache ~100 us, xxh3-64 ~17 us (measured);
            # the BLAKE3 name was checked when the block came in (see the module doc).
            if len(data) != size or local_check(data) != entry.check:
                self._drop(key, digest, os.fstat(fd).st_ino, "damaged")
                self._count("misses")
                return None
        finally:
            os.close(fd)
        self._touch(key)
        return data

    def _drop(self, key: bytes, digest: str, inode: int | None, why: str) -> None:
        """Remove a block whose file was missing or damaged (the file `inode`
        we read), or whose index value is malformed."""
        path = self._file(digest)
        with self._env.begin(write=True) as txn:
            try:
                now = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                now = None
            if why != "malformed" and now is not None and now.st_ino != inode:
                return  # evicted and stored again since we looked: the new file is not ours to judge
            totals = self._policy.totals(txn)
            dropped = self._policy.delete(txn, totals, key)
            if now is not None and stat.S_ISDIR(now.st_mode):
                shutil.rmtree(path, ignore_errors=True)
            elif now is not None:
                path.unlink(missing_ok=True)
            totals.save(self._tick)
        if not dropped:
            return  # a file missing because it was just evicted: an ordinary miss
        log.warning("block %s: %s; dropped it from the store", digest,
                    {"missing": "file missing", "damaged": "file damaged"}.get(why, "index entry malformed"))
        with self._lock:
            self._counters["missing_dropped" if why == "missing" else "corrupt_dropped"] += 1

    # --- writing -------------------------------------------------------------

    def put(self, digest: str, data: bytes, *, verified: bool = False) -> bool:
        """Store a block; return False if it was already there. Raises BadBlock
        if `data` does not match `digest`. `verified`: the caller checked
        `data` against `digest` already (the Fetcher's client, on arrival), so
        it is not hashed with BLAKE3 a second time."""
        key = bytes.fromhex(check_digest(digest))
        if not verified and content_digest(data) != digest:
            raise BadBlock(f"block {digest}: the bytes do not match the digest; not stored")
        check = local_check(data)
        with self._env.begin(db=self._entries) as txn:
            if txn.get(key) is not None:
                return False
        tmp = self._tmp / f"{digest}.{next(self._names)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        final = self._file(digest)
        renamed = False
        txn = self._env.begin(write=True)
        try:
            totals = self._policy.totals(txn)
            self._write_hits(txn, totals)
            added = txn.get(key, db=self._entries) is None
            if added:
                # Renamed while holding the write lock: no evict or drop of this
                # digest can unlink between the rename and the commit.
                os.rename(tmp, final)
                renamed = True
                self._policy.insert(txn, totals, key, len(data), check, self._next_tick())
                self._evict(txn, totals)
            totals.save(self._tick)
            txn.commit()
        except BaseException:
            if renamed:
                final.unlink(missing_ok=True)
            txn.abort()
            raise
        finally:
            if not renamed:
                tmp.unlink(missing_ok=True)
        if added:
            with self._lock:
                self._counters["puts"] += 1
                self._counters["put_bytes"] += len(data)
        self._maybe_sync()
        return added

    def _evict(self, txn: lmdb.Transaction, totals) -> None:
        """Evict until under the bound; each file is unlinked inside the
        transaction that deletes its entry (see docs/CACHE.md)."""
        for key, size in self._policy.evict(txn, totals):
            self._file(key.hex()).unlink(missing_ok=True)
            with self._lock:
                self._counters["evictions"] += 1
                self._counters["evicted_bytes"] += size

    def _trim(self) -> None:
        with self._env.begin(write=True) as txn:
            totals = self._policy.totals(txn)
            self._evict(txn, totals)
            totals.save(self._tick)

    # --- recency -------------------------------------------------------------

    def _next_tick(self) -> int:
        with self._lock:
            self._tick += 1
            return self._tick

    def _touch(self, key: bytes) -> None:
        with self._lock:
            self._counters["hits"] += 1
            self._tick += 1
            self._touched[key] = self._tick
            self._hits_unwritten += 1
            due = not self._flushing and (
                self._hits_unwritten >= FLUSH_EVERY or time.monotonic() - self._flushed_at >= FLUSH_SECONDS
            )
            if due:
                self._flushing = True
        if due:
            try:
                self._flush()
            finally:
                with self._lock:
                    self._flushing = False

    def _flush(self) -> None:
        with self._env.begin(write=True) as txn:
            totals = self._policy.totals(txn)
            self._write_hits(txn, totals)
            totals.save(self._tick)
        self._maybe_sync()

    def _write_hits(self, txn: lmdb.Transaction, totals) -> None:
        with self._lock:
            touched, self._touched = self._touched, {}
            self._hits_unwritten = 0
            self._flushed_at = time.monotonic()
        if touched:
            self._policy.hits(txn, totals, touched)

    def _maybe_sync(self) -> None:
        now = time.monotonic()
        if now - self._synced_at >= SYNC_SECONDS:
            self._synced_at = now
            self._env.sync(True)

    def _count(self, name: str) -> None:
        with self._lock:
            self._counters[name] += 1

    # --- recovery ------------------------------------------------------------

    def recover(self) -> None:
        """Make index and files agree after a crash; runs in a thread at open.

        Per block folder, under the write lock: entries without a file or with
        a malformed value are dropped; files without an entry are verified and
        adopted into probation (oldest) or deleted. Then stray order keys go and
        the totals are recounted from the entries.
        """
        started = time.monotonic()
        try:
            for prefix in range(256):
                if self._stop.is_set():
                    return
                self._recover_folder(prefix)
            self._recount()
            self._trim()
            self._recovered = True
            log.info("block store %s recovered in %.1f s: %d entries dropped, %d files adopted",
                     self.path, time.monotonic() - started,
                     self._counters["recovered_entries"], self._counters["adopted"])
        except Exception:
            log.exception("block store %s: recovery failed; it runs again at the next open", self.path)

    def _recover_folder(self, prefix: int) -> None:
        folder = self.path / f"{prefix:02x}"
        start = bytes((prefix,))
        dropped = 0
        with self._env.begin(write=True) as txn:
            files = {}
            with os.scandir(folder) as it:
                for item in it:
                    files[item.name] = item.inode()
            totals = self._policy.totals(txn)
            cursor = txn.cursor(db=self._entries)
            keys = []
            if cursor.set_range(start):
                for key, raw in cursor:
                    if key[:1] != start:
                        break
                    keys.append((key, raw))
            for key, raw in keys:
                name = key.hex()
                if len(key) == 32 and parse_entry(raw) and files.pop(name, None) is not None:
                    continue
                self._policy.delete(txn, totals, key)
                dropped += 1
            totals.save(self._tick)
        with self._lock:
            self._counters["recovered_entries"] += dropped
        for name, inode in files.items():
            self._adopt(folder / name, name, inode)

    def _adopt(self, path: Path, name: str, inode: int) -> None:
        """A file without an entry: index it if its bytes match its name
        (BLAKE3: nothing vouches for them), else delete it."""
        try:
            check_digest(name)
            with open(path, "rb", opener=_open_nofollow) as f:
                data = f.read() if stat.S_ISREG(os.fstat(f.fileno()).st_mode) else b""
            good = content_digest(data) == name
        except ValueError:
            good, data = False, b""
        except FileNotFoundError:
            return
        except OSError as error:
            if error.errno not in DAMAGE_ERRNOS:
                raise  # out of descriptors...: leave the file; recovery fails and runs again
            good, data = False, b""
        with self._env.begin(write=True) as txn:
            try:
                if os.stat(path).st_ino != inode:
                    return  # replaced by a put since we listed it
            except FileNotFoundError:
                return
            if not good:
                path.unlink(missing_ok=True)
                return
            key = bytes.fromhex(name)
            if txn.get(key, db=self._entries) is not None:
                return
            totals = self._policy.totals(txn)
            self._policy.insert(txn, totals, key, len(data), local_check(data), tick=0)  # oldest of probation
            totals.save(self._tick)
        with self._lock:
            self._counters["adopted"] += 1

    def _recount(self) -> None:
        with self._env.begin(write=True) as txn:
            self._policy.recount(txn).save(self._tick)

    def wait_recovered(self, timeout: float | None = None) -> bool:
        """Wait for the recovery started at open, if any; True when done."""
        if self._recovery is not None:
            self._recovery.join(timeout)
            return not self._recovery.is_alive()
        return True

    # --- reporting -----------------------------------------------------------

    def stats(self) -> dict:
        with self._env.begin() as txn:
            totals = self._policy.totals(txn)
        with self._lock:
            counters = dict(self._counters)
        return {
            "bytes": totals.bytes,
            "footprint": totals.footprint,
            "blocks": totals.blocks,
            "bound": self.bound,
            "protected": totals.protected,
            "protected_cap": self._policy.protected_cap,
            "recovering": self._recovery is not None and self._recovery.is_alive(),
            **counters,
        }

    def audit(self, verify: bool = True) -> dict:
        """Check index against files (for tests and fsck-like tools; slow,
        meant for a quiet store): entries without a file, damaged files, files
        without an entry, and whether the totals match the entries."""
        found = {"entries": 0, "missing": [], "damaged": [], "orphans": [], "bytes": 0,
                 "footprint": 0, "protected": 0, "order_mismatch": 0}
        indexed = set()
        with self._env.begin() as txn:
            totals = self._policy.totals(txn)
            orders = set(txn.cursor(db=self._policy.order).iternext(values=False))
            for key, raw in txn.cursor(db=self._entries):
                digest = key.hex()
                indexed.add(digest)
                entry = parse_entry(raw)
                if entry is None:
                    found["damaged"].append(digest)
                    continue
                size, tick, segment, check = entry
                found["entries"] += 1
                found["bytes"] += size
                found["footprint"] += footprint(size)
                found["protected"] += footprint(size) if segment == PROTECTED else 0
                if order_key(segment, tick, key) not in orders:
                    found["order_mismatch"] += 1
                try:
                    with open(self._file(digest), "rb") as f:
                        data = f.read() if verify else None
                except FileNotFoundError:
                    found["missing"].append(digest)
                    continue
                if data is not None and (len(data) != size or local_check(data) != check
                                         or content_digest(data) != digest):
                    found["damaged"].append(digest)
            found["order_mismatch"] += len(orders) - found["entries"]
        for prefix in range(256):
            with os.scandir(self.path / f"{prefix:02x}") as it:
                found["orphans"] += [e.name for e in it if e.name not in indexed]
        found["totals_ok"] = (totals.bytes, totals.footprint, totals.blocks, totals.protected) == (
            found["bytes"], found["footprint"], found["entries"], found["protected"])
        return found


def _inode(path: Path) -> int | None:
    """The inode at `path` (not followed), or None if nothing is there."""
    try:
        return os.lstat(path).st_ino
    except (FileNotFoundError, NotADirectoryError):
        return None


def _open_nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)
