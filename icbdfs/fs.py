"""The FUSE operations of an icbd mount.

What the kernel sees:

    /                        every iMI of the catalogue
    /<imi>/                  its published versions, and `latest`
    /<imi>/latest -> 3       the version an admin made current
    /<imi>/<version>/...     the version's tree, as its manifest says
    /.icbd/status            counters as JSON; hidden (not listed), and no iMI
                             name can collide with it: names cannot start with a dot

The handlers stay thin: names and attributes come from the catalogue and the
manifests (VersionTree), bytes from the block layer (blockcache.py);
readahead.py decides what to fetch ahead and profiles.py records and replays
boot profiles. Whatever waits on the source is bounded by `timeout` and ends
in EIO, never in a reader stuck in the kernel.

Inodes: see namespace.py.

Timeouts: version content never changes, so its entries and attributes are
cached by the kernel for a day (and negative lookups too: a boot probes many
names that do not exist). The catalogue level changes under rollbacks and
publishes, so it gets one second, and the refresh task invalidates what it
saw change.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pyfuse3
import trio

from cache.source import Catalog, ImageSource, ImiInfo, Unavailable
from replicator.wire import (
    DIR,
    FILE,
    Entry,
    InvalidInput,
    VersionRecord,
    check_name,
    parse_version,
)

from .blockcache import BlockCache, Flights
from .namespace import Imi, Version, VersionTree
from .profiles import BootProfiles, ProfileOptions
from .readahead import Readahead

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
CONTROL_DIR = 2
STATUS_FILE = 3
CONTROL_NAME = ".icbd"
STATUS_NAME = "status"
LATEST = "latest"
SLOT_SHIFT = 32
INDEX_MASK = (1 << SLOT_SHIFT) - 1

CATALOG_TTL = 1.0
CONTENT_TTL = 24 * 3600.0


@dataclass
class MountOptions:
    timeout: float = 10.0  # a read not served within this fails with EIO
    refresh: float = 2.0  # seconds between catalogue checks (0: never)
    lru_bytes: int = 128 << 20  # whole recent blocks kept in memory
    readahead: bool = True
    max_near: int = 8  # blocks warmed into memory ahead of a sequential reader
    max_far: int = 32  # blocks handed to source.prefetch ahead of it
    profiles: bool = True
    profile_quiet: float = 10.0
    profile_max_seconds: float = 600.0
    profile_max_blocks: int = 1 << 16
    profile_follow_idle: float = 10.0  # stop pulling profile blocks into memory when none are read
    kernel_readahead_kb: int = 1024  # the mount's read_ahead_kb (0: the kernel's 128)
    min_tasks: int = 8  # pyfuse3 request tasks kept waiting
    max_tasks: int = 256  # requests served concurrently (each may wait up to `timeout`)


@dataclass(eq=False)
class _OpenFile:
    version: Version
    entry: Entry
    readahead: Readahead | None


@dataclass(eq=False)
class _OpenSnapshot:
    data: bytes


def _erofs() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.EROFS)


def _guarded(handler):
    """A bug in a handler answers EIO and is logged. Unguarded, it would end
    pyfuse3's request loop (it stops on anything but FUSEError) and leave
    every reader of the mount hanging."""

    @functools.wraps(handler)
    async def guarded(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("%s%r failed", handler.__name__, args[1:])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return guarded


class Operations(pyfuse3.Operations):
    """pyfuse3 handlers over an ImageSource. Use inside `async with ops.running():`."""

    supports_dot_lookup = True

    def __init__(self, source: ImageSource, options: MountOptions | None = None):
        super().__init__()
        self._source = source
        self._options = options = options or MountOptions()
        self.stats: Counter[str] = Counter()
        self.invalidations: deque[tuple[str, int, str]] = deque(maxlen=1024)
        self._kernel = False  # True while mounted: send invalidations to the kernel
        self._imis: dict[str, Imi] = {}  # current catalogue
        self._imi_slots: dict[str, int] = {}  # every iMI ever seen, for stable inodes
        self._imi_by_inode: dict[int, Imi] = {}
        self._versions: dict[tuple[str, int, str], Version] = {}
        self._by_slot: dict[int, Version] = {}
        self._files: dict[int, _OpenFile | _OpenSnapshot] = {}
        self._next_fh = 1
        self._mounted_ns = time.time_ns()
        self._nursery: trio.Nursery | None = None
        self._blocks: BlockCache | None = None
        self._manifests: Flights[int, VersionTree] | None = None
        self._profiles: BootProfiles | None = None

    # --- lifecycle ---------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Operations]:
        """Own the background tasks: fetches, readahead, catalogue refresh, profiles."""
        options = self._options
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._blocks = BlockCache(
                self._source,
                nursery,
                capacity=options.lru_bytes,
                # A reader gives up after `timeout`; the fetch goes on a while
                # longer, so the reader's retry can still find it.
                fetch_timeout=2 * options.timeout,
                stats=self.stats,
            )
            # Manifests may be large and the link slow: a lookup gives up after
            # `timeout`, the fetch carries on for the next lookup.
            self._manifests = Flights(nursery, max(60.0, 6 * options.timeout))
            self._profiles = BootProfiles(
                self._source,
                nursery,
                ProfileOptions(
                    quiet=options.profile_quiet,
                    max_seconds=options.profile_max_seconds,
                    max_blocks=options.profile_max_blocks,
                    timeout=max(30.0, options.timeout),
                    follow_idle=options.profile_follow_idle,
                ),
                self.stats,
                follow=self._blocks.follow,
            )
            if options.refresh > 0:
                nursery.start_soon(self._refresh_loop)
            try:
                yield self
            finally:
                self._kernel = False
                nursery.cancel_scope.cancel()

    def attach_kernel(self, attached: bool = True) -> None:
        """Send cache invalidations to the kernel (only while mounted)."""
        self._kernel = attached

    @property
    def profiles(self) -> BootProfiles:
        assert self._profiles is not None, "use inside `async with ops.running()`"
        return self._profiles

    def status(self) -> dict:
        blocks = self._blocks
        out: dict = dict(self.stats)
        out.update(
            lru_bytes=blocks.nbytes if blocks else 0,
            lru_blocks=len(blocks) if blocks else 0,
            open_files=len(self._files),
            versions_loaded=sum(1 for v in self._by_slot.values() if v.tree is not None),
            catalog={
                name: {"latest": imi.info.latest, "versions": sorted(imi.info.versions)}
                for name, imi in sorted(self._imis.items())
            },
        )
        return out

    # --- catalogue -----------------------------------------------------------

    async def refresh(self) -> None:
        """Fetch the catalogue, take it, and invalidate what the kernel may hold of the old one."""
        catalog = await self._source.catalog()
        self.stats["catalog_refreshes"] += 1
        changes = self._apply(catalog)
        if changes and self._nursery is not None:
            # Never from a request handler: an invalidation waits for related
            # requests to finish, so it runs in its own task (and thread).
            self._nursery.start_soon(self._invalidate, changes)

    async def _refresh_loop(self) -> None:
        while True:
            await trio.sleep(self._options.refresh)
            with trio.move_on_after(max(self._options.timeout, self._options.refresh)):
                try:
                    await self.refresh()
                except Exception as error:
                    self.stats["catalog_errors"] += 1
                    log.warning("catalogue refresh failed: %s", error)

    def _apply(self, catalog: Catalog) -> list[tuple[str, int, str]]:
        changes: list[tuple[str, int, str]] = []
        fresh: dict[str, ImiInfo] = {}
        for name, info in catalog.imis.items():
            try:
                fresh[check_name(name)] = info
            except InvalidInput:
                log.warning("catalogue names an invalid iMI %r; not shown", name)
        for name in sorted(set(self._imis) | set(fresh)):
            old, new = self._imis.get(name), fresh.get(name)
            if new is None:
                del self._imi_by_inode[old.dir_inode], self._imi_by_inode[old.latest_inode]
                del self._imis[name]
                changes.append(("entry", ROOT, name))
                continue
            if old is None:
                slot = self._imi_slots.setdefault(name, len(self._imi_slots))
                imi = self._imis[name] = Imi(name, slot, new)
                self._imi_by_inode[imi.dir_inode] = self._imi_by_inode[imi.latest_inode] = imi
                continue  # nothing to invalidate: a failed lookup is not cached (ENOENT)
            if old.info == new:
                continue
            if old.info.latest != new.latest:
                changes.append(("entry", old.dir_inode, LATEST))
                changes.append(("inode", old.latest_inode, ""))
            for number, vinfo in old.info.versions.items():
                now = new.versions.get(number)
                if now is None or now.digest != vinfo.digest:
                    changes.append(("entry", old.dir_inode, str(number)))
            changes.append(("inode", old.dir_inode, ""))
            old.info = new
            old.mtime_ns = time.time_ns()
        return changes

    async def _invalidate(self, changes: list[tuple[str, int, str]]) -> None:
        for kind, inode, name in changes:
            self.invalidations.append((kind, inode, name))
            self.stats["invalidations"] += 1
            if not self._kernel:
                continue
            try:
                if kind == "entry":
                    await trio.to_thread.run_sync(
                        pyfuse3.invalidate_entry, inode, os.fsencode(name), abandon_on_cancel=True
                    )
                else:
                    await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, abandon_on_cancel=True)
            except OSError as error:  # ENOENT: the kernel did not hold it
                log.debug("invalidate %s %d %r: %s", kind, inode, name, error)

    def _version(self, imi: str, vinfo: VersionRecord) -> Version:
        key = (imi, vinfo.version, vinfo.digest)
        version = self._versions.get(key)
        if version is None:
            slot = len(self._versions) + 1
            version = self._versions[key] = Version(imi, vinfo.version, vinfo.digest, slot)
            self._by_slot[slot] = version
        return version

    async def _tree(self, version: Version) -> VersionTree:
        """The version's indexed manifest, fetched on first use; EIO after `timeout`."""
        if version.tree is not None:
            return version.tree
        assert self._manifests is not None, "use inside `async with ops.running()`"
        with trio.move_on_after(self._options.timeout):
            try:
                return await self._manifests.get(version.slot, lambda: self._load(version))
            except Unavailable as error:
                log.warning("manifest of %s@%d: %s", version.imi, version.number, error)
                self.stats["eio"] += 1
                raise pyfuse3.FUSEError(errno.EIO) from None
        log.warning("manifest of %s@%d: no answer within %g s", version.imi, version.number,
                    self._options.timeout)
        self.stats["eio"] += 1
        raise pyfuse3.FUSEError(errno.EIO)

    async def _load(self, version: Version) -> VersionTree:
        manifest = await self._source.manifest(version.imi, version.number)
        tree = await trio.to_thread.run_sync(VersionTree, manifest)
        version.tree = tree
        self.stats["manifests"] += 1
        if self._options.profiles:
            # Half the memory cache may hold profile blocks fetched ahead of the readers.
            window = max(1, self._options.lru_bytes // 2 // tree.chunk_size)
            self.profiles.first_access(version.imi, version.number, tree.digests, window)
        return tree

    # --- inodes and attributes -----------------------------------------------

    def _resolve(self, inode: int) -> tuple[Version, int]:
        version = self._by_slot.get(inode >> SLOT_SHIFT)
        if version is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return version, inode & INDEX_MASK

    def _imi_of(self, inode: int) -> Imi:
        imi = self._imi_by_inode.get(inode)
        if imi is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return imi

    @staticmethod
    def _attr(inode: int, mode: int, ttl: float, *, nlink: int = 1, size: int = 0,
              mtime_ns: int = 0) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.entry_timeout = attr.attr_timeout = ttl
        attr.st_mode = mode
        attr.st_nlink = nlink
        attr.st_uid = attr.st_gid = 0
        attr.st_size = size
        attr.st_blksize = 4096
        attr.st_blocks = -(-size // 512)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime_ns
        return attr

    def _entry_attr(self, version: Version, index: int, ttl: float = CONTENT_TTL) -> pyfuse3.EntryAttributes:
        tree = version.tree
        assert tree is not None
        entry = tree.entries[index]
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = version.slot << SLOT_SHIFT | index
        attr.entry_timeout = ttl
        attr.attr_timeout = CONTENT_TTL
        attr.st_mode = entry.st_mode
        attr.st_nlink = 2 + tree.subdirs[index] if entry.type == DIR else 1
        attr.st_uid = entry.uid
        attr.st_gid = entry.gid
        attr.st_rdev = entry.rdev
        attr.st_size = entry.size
        attr.st_blksize = tree.chunk_size
        attr.st_blocks = -(-entry.size // 512)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = entry.mtime_ns
        return attr

    def _version_attr(self, version: Version) -> pyfuse3.EntryAttributes:
        if version.tree is not None:
            return self._entry_attr(version, 0, ttl=CATALOG_TTL)
        # Listed but not fetched yet: a placeholder the kernel must not keep,
        # so that `ls /imi` does not fetch every manifest and `stat` still asks.
        return self._attr(version.slot << SLOT_SHIFT, stat.S_IFDIR | 0o755, 0, nlink=2)

    def _catalog_attr(self, inode: int) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            return self._attr(ROOT, stat.S_IFDIR | 0o755, CATALOG_TTL, nlink=2 + len(self._imis),
                              mtime_ns=self._mounted_ns)
        if inode == CONTROL_DIR:
            return self._attr(CONTROL_DIR, stat.S_IFDIR | 0o555, CATALOG_TTL, nlink=2,
                              mtime_ns=self._mounted_ns)
        if inode == STATUS_FILE:
            return self._attr(STATUS_FILE, stat.S_IFREG | 0o444, 0, size=len(self._status_bytes()),
                              mtime_ns=time.time_ns())
        imi = self._imi_of(inode)
        if inode == imi.dir_inode:
            return self._attr(inode, stat.S_IFDIR | 0o755, CATALOG_TTL,
                              nlink=2 + len(imi.info.versions), mtime_ns=imi.mtime_ns)
        if imi.info.latest is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode, stat.S_IFLNK | 0o777, CATALOG_TTL,
                          size=len(str(imi.info.latest)), mtime_ns=imi.mtime_ns)

    def _status_bytes(self) -> bytes:
        return json.dumps(self.status(), sort_keys=True, indent=1).encode() + b"\n"

    # --- lookups -------------------------------------------------------------

    @_guarded
    async def lookup(self, parent_inode: int, name: bytes, ctx=None) -> pyfuse3.EntryAttributes:
        text = os.fsdecode(name)
        if text == ".":
            return await self.getattr(parent_inode, ctx)
        if text == "..":
            return await self.getattr(await self._parent(parent_inode), ctx)
        if parent_inode >> SLOT_SHIFT:
            version, index = self._resolve(parent_inode)
            tree = await self._tree(version)
            child = tree.children.get(index, {}).get(text)
            if child is None:
                # Version content never changes: the kernel may remember the miss.
                missing = pyfuse3.EntryAttributes()
                missing.st_ino = 0
                missing.entry_timeout = CONTENT_TTL
                return missing
            return self._entry_attr(version, child)
        if parent_inode == ROOT:
            if text == CONTROL_NAME:
                return self._catalog_attr(CONTROL_DIR)
            imi = self._imis.get(text)
            if imi is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._catalog_attr(imi.dir_inode)
        if parent_inode == CONTROL_DIR:
            if text != STATUS_NAME:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._catalog_attr(STATUS_FILE)
        imi = self._imi_of(parent_inode)
        if parent_inode != imi.dir_inode:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if text == LATEST:
            return self._catalog_attr(imi.latest_inode)
        try:
            number = parse_version(text)
        except InvalidInput:
            number = None
        # Only the canonical spelling: "02" naming version 2 would alias a folder.
        vinfo = imi.info.versions.get(number) if str(number) == text else None
        if vinfo is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        version = self._version(imi.name, vinfo)
        await self._tree(version)
        return self._version_attr(version)

    async def _parent(self, inode: int) -> int:
        if inode >> SLOT_SHIFT:
            version, index = self._resolve(inode)
            if index:
                return version.slot << SLOT_SHIFT | (await self._tree(version)).parents[index]
            imi = self._imis.get(version.imi)
            if imi is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return imi.dir_inode
        return ROOT

    @_guarded
    async def getattr(self, inode: int, ctx=None) -> pyfuse3.EntryAttributes:
        if inode >> SLOT_SHIFT:
            version, index = self._resolve(inode)
            if version.tree is None:
                await self._tree(version)
            if index == 0:
                return self._version_attr(version)
            if index >= len(version.tree.entries):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._entry_attr(version, index)
        return self._catalog_attr(inode)

    @_guarded
    async def readlink(self, inode: int, ctx=None) -> bytes:
        if inode >> SLOT_SHIFT:
            version, index = self._resolve(inode)
            entry = (await self._tree(version)).entries[index]
            if entry.target is None:
                raise pyfuse3.FUSEError(errno.EINVAL)
            return os.fsencode(entry.target)
        imi = self._imi_of(inode)
        if inode != imi.latest_inode or imi.info.latest is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return str(imi.info.latest).encode()

    # --- folders -------------------------------------------------------------

    @_guarded
    async def opendir(self, inode: int, ctx=None) -> int:
        attr = await self.getattr(inode, ctx)
        if not stat.S_ISDIR(attr.st_mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        # A listing needs no state of its own: the folder's inode is its handle.
        return inode

    @_guarded
    async def readdir(self, fh: int, start_id: int, token) -> None:
        for next_id, name, attr in await self._listing(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, attr, next_id):
                return

    async def _listing(self, inode: int, start: int) -> list[tuple[int, bytes, pyfuse3.EntryAttributes]]:
        """(next id, name, attributes) of a folder's entries from position `start` on.

        Version folders can be large: attributes are built lazily, a window at a time.
        """
        if inode >> SLOT_SHIFT:
            version, index = self._resolve(inode)
            listing = (await self._tree(version)).listing(index)
            window = listing[start:start + 1024]
            return [(start + i + 1, name, self._entry_attr(version, child))
                    for i, (name, child) in enumerate(window)]
        if inode == ROOT:
            items = [(os.fsencode(n), self._catalog_attr(imi.dir_inode))
                     for n, imi in sorted(self._imis.items())]
        elif inode == CONTROL_DIR:
            items = [(STATUS_NAME.encode(), self._catalog_attr(STATUS_FILE))]
        else:
            imi = self._imi_of(inode)
            items = [(str(n).encode(), self._version_attr(self._version(imi.name, imi.info.versions[n])))
                     for n in sorted(imi.info.versions)]
            if imi.info.latest is not None:
                items.append((LATEST.encode(), self._catalog_attr(imi.latest_inode)))
        return [(i + 1, name, attr) for i, (name, attr) in enumerate(items) if i >= start]

    async def releasedir(self, fh: int) -> None:
        pass

    # --- files ---------------------------------------------------------------

    @_guarded
    async def open(self, inode: int, flags: int, ctx=None) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise _erofs()
        fh = self._next_fh
        # One handle per open(), unlike S3QL's inode-as-handle: each open file
        # keeps its own readahead state.
        if inode == STATUS_FILE:
            self._next_fh += 1
            self._files[fh] = _OpenSnapshot(self._status_bytes())
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        if not inode >> SLOT_SHIFT:
            raise pyfuse3.FUSEError(errno.EISDIR)
        version, index = self._resolve(inode)
        entry = (await self._tree(version)).entries[index]
        if entry.type != FILE:
            raise pyfuse3.FUSEError(errno.EISDIR if entry.type == DIR else errno.EINVAL)
        self._next_fh += 1
        readahead = None
        if self._options.readahead and len(entry.chunks) > 1:
            readahead = Readahead(len(entry.chunks), self._options.max_near, self._options.max_far)
        self._files[fh] = _OpenFile(version, entry, readahead)
        # Content is immutable: keep the kernel's page cache across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_guarded
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        handle = self._files.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if isinstance(handle, _OpenSnapshot):
            return handle.data[off:off + size]
        entry = handle.entry
        end = min(off + size, entry.size)
        if off >= end:
            return b""
        version = handle.version
        chunk_size = version.tree.chunk_size
        first, last = off // chunk_size, (end - 1) // chunk_size
        digests = entry.chunks[first:last + 1]
        self.stats["reads"] += 1
        self._profiles.touched(version.imi, version.number, digests)
        if handle.readahead is not None:
            self._read_ahead(handle, first, last)
        peek = self._blocks.peek
        blocks = [peek(d) for d in digests]
        if None in blocks:
            blocks = await self._fetch(version, digests)
        start = off - first * chunk_size
        if len(blocks) == 1:
            data: bytes | memoryview = memoryview(blocks[0])[start:start + end - off]
            self._blocks.served(digests[0], len(data))
        else:  # copy only the bytes asked for
            views = [memoryview(b) for b in blocks]
            views[0], views[-1] = views[0][start:], views[-1][:end - last * chunk_size]
            for digest, view in zip(digests, views, strict=True):
                self._blocks.served(digest, len(view))
            data = b"".join(views)
        if len(data) != end - off:
            log.error("%s@%d:%s: short block", version.imi, version.number, entry.path)
            self.stats["eio"] += 1
            raise pyfuse3.FUSEError(errno.EIO)
        self.stats["read_bytes"] += len(data)
        return data

    async def _fetch(self, version: Version, digests: tuple[str, ...]) -> list[bytes]:
        """The blocks of a read that missed memory; EIO after `timeout`."""
        imi, number = version.imi, version.number
        with trio.move_on_after(self._options.timeout):
            try:
                return await self._blocks.get(digests, imi, number)
            except Unavailable as error:
                log.warning("read of %s@%d: %s", imi, number, error)
                self.stats["eio"] += 1
                raise pyfuse3.FUSEError(errno.EIO) from None
        log.warning("read of %s@%d: no block within %g s", imi, number, self._options.timeout)
        self._blocks.give_up(digests)
        self.stats["eio"] += 1
        raise pyfuse3.FUSEError(errno.EIO)

    def _read_ahead(self, handle: _OpenFile, first: int, last: int) -> None:
        near, far = handle.readahead.advise(first, last)
        chunks, version = handle.entry.chunks, handle.version
        if near:
            started = self._blocks.warm((chunks[i] for i in near), version.imi, version.number)
            self.stats["readahead_blocks"] += started
        if far:
            digests = list(dict.fromkeys(chunks[i] for i in far))
            self._nursery.start_soon(self._prefetch, digests, version.imi, version.number)

    async def _prefetch(self, digests: list[str], imi: str, version: int) -> None:
        self.stats["prefetch_calls"] += 1
        self.stats["prefetch_blocks"] += len(digests)
        with trio.move_on_after(self._options.timeout):
            try:
                await self._source.prefetch(digests, imi, version)
            except Exception as error:
                log.debug("prefetch for %s@%d failed: %s", imi, version, error)

    async def release(self, fh: int) -> None:
        self._files.pop(fh, None)

    async def flush(self, fh: int) -> None:
        pass

    @_guarded
    async def statfs(self, ctx=None) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        total = sum(v.bytes for imi in self._imis.values() for v in imi.info.versions.values())
        data.f_blocks = -(-total // 4096)
        data.f_bfree = data.f_bavail = 0
        data.f_files = sum(len(v.tree.entries) for v in self._by_slot.values() if v.tree)
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    async def getxattr(self, inode: int, name: bytes, ctx=None) -> bytes:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode: int, ctx=None) -> list[bytes]:
        return []

    async def forget(self, inode_list) -> None:
        pass  # inodes are computed, not stored: nothing to free

    # --- read-only: every change is refused ----------------------------------

    async def setattr(self, inode, attr, fields, fh, ctx):
        raise _erofs()

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise _erofs()

    async def mkdir(self, parent_inode, name, mode, ctx):
        raise _erofs()

    async def unlink(self, parent_inode, name, ctx):
        raise _erofs()

    async def rmdir(self, parent_inode, name, ctx):
        raise _erofs()

    async def symlink(self, parent_inode, name, target, ctx):
        raise _erofs()

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        raise _erofs()

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise _erofs()

    async def create(self, parent_inode, name, mode, flags, ctx):
        raise _erofs()

    async def write(self, fh, off, buf):
        raise _erofs()

    async def setxattr(self, inode, name, value, ctx):
        raise _erofs()

    async def removexattr(self, inode, name, ctx):
        raise _erofs()
