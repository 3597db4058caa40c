"""The FUSE operations of an icbd mount: kernel requests in, FUSE replies out.

What the kernel sees:

    /                        every iMI of the catalogue
    /<imi>/                  its published versions, and `latest`
    /<imi>/latest -> 3       the version an admin made current
    /<imi>/<version>/...     the version's tree, as its manifest says
    /.icbd/status            counters as JSON; hidden (not listed), and no iMI
                             name can collide with it: names cannot start with a dot

The handlers stay thin: names and inodes come from the Namespace
(namespace.py), each version's tree from Manifests (manifests.py), bytes from
the Reader (reader.py, over the memory cache of blockcache.py, readahead.py
and the boot profiles of profiles.py). Operations is handed them, and the
nursery their background tasks run in, by filesystem.open_filesystem().
Whatever waits on the source is bounded by `timeout` and ends in EIO, never
in a reader stuck in the kernel: the layers below raise Unavailable, which
the handlers answer with EIO, and NotFound, answered with ENOENT.

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
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from icbdcore.manifest import DIR, FILE
from icbdcore.mounts import SESSION_UP_XATTR
from icbdcore.source import ImageSource, Unavailable

from .manifests import Manifests
from .namespace import (
    CONTROL_DIR,
    ROOT,
    STATUS_FILE,
    Change,
    Namespace,
    NotFound,
    Version,
    inode_of,
    is_content,
)
from .profiles import BootProfiles
from .reader import OpenFile, Reader
from .tracing import ReadTracer

log = logging.getLogger(__name__)

assert ROOT == pyfuse3.ROOT_INODE

CATALOG_TTL = 1.0
CONTENT_TTL = 24 * 3600.0
SESSION_UP = os.fsencode(SESSION_UP_XATTR)  # icbdcore/mounts.py: ends a version's profile recording


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
    trace: Path | None = None  # write every read served to this read trace (icbdcore/trace.py)
    min_tasks: int = 8  # pyfuse3 request tasks kept waiting
    max_tasks: int = 256  # requests served concurrently (each may wait up to `timeout`)


@dataclass(eq=False)
class _OpenSnapshot:
    data: bytes


def _erofs() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.EROFS)


def _guarded(handler):
    """The errors of the layers below become errnos here: NotFound ENOENT,
    NotADirectoryError ENOTDIR, Unavailable (the source did not deliver in
    time) EIO, counted as `eio`. A bug in a handler answers EIO and is
    logged. Unguarded, it would end pyfuse3's request loop (it stops on
    anything but FUSEError) and leave every reader of the mount hanging."""

    @functools.wraps(handler)
    async def guarded(self: Operations, *args, **kwargs):
        try:
            return await handler(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except NotFound:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except NotADirectoryError:
            raise pyfuse3.FUSEError(errno.ENOTDIR) from None
        except Unavailable:
            self.stats["eio"] += 1
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s%r failed", handler.__name__, args)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return guarded


class Operations(pyfuse3.Operations):
    """pyfuse3 handlers over a Namespace, its Manifests and a Reader.

    `nursery` runs the invalidations sent to the kernel and, if started,
    `keep_current`; `stats` is the counter every layer adds to (/.icbd/status).
    Build one with filesystem.open_filesystem().
    """

    supports_dot_lookup = True

    def __init__(
        self,
        namespace: Namespace,
        manifests: Manifests,
        reader: Reader,
        profiles: BootProfiles,
        *,
        source: ImageSource,
        nursery: trio.Nursery,
        stats: Counter[str],
        tracer: ReadTracer | None = None,
    ):
        super().__init__()
        self.namespace = namespace
        self.profiles = profiles
        self.stats = stats
        self.invalidations: deque[Change] = deque(maxlen=1024)
        self._manifests = manifests
        self._reader = reader
        self._source = source
        self._nursery = nursery
        self._tracer = tracer
        self._kernel = False  # True while mounted: send invalidations to the kernel
        self._files: dict[int, OpenFile | _OpenSnapshot] = {}
        self._next_fh = 1
        self._mounted_ns = time.time_ns()

    def attach_kernel(self, attached: bool = True) -> None:
        """Send cache invalidations to the kernel (only while mounted)."""
        self._kernel = attached

    def status(self) -> dict:
        blocks = self._reader.blocks
        out: dict = dict(self.stats)
        out.update(
            lru_bytes=blocks.nbytes,
            lru_blocks=len(blocks),
            open_files=len(self._files),
            versions_loaded=sum(1 for _ in self.namespace.loaded()),
            profile_recordings=self.profiles.recordings(),
            catalog={
                name: {"latest": imi.info.latest, "versions": sorted(imi.info.versions)}
                for name, imi in sorted(self.namespace.imis.items())
            },
            source=self._source.status(),
        )
        freshness = getattr(self._source, "freshness", None)  # the serial and age of a signed catalogue
        if freshness is not None:
            out.update(freshness())
        return out

    # --- catalogue -----------------------------------------------------------

    async def refresh(self) -> None:
        """Fetch the catalogue, take it, and invalidate what the kernel may hold of the old one."""
        catalog = await self._source.catalog()
        self.stats["catalog_refreshes"] += 1
        changes = self.namespace.apply(catalog)
        if changes:
            # Never from a request handler: an invalidation waits for related
            # requests to finish, so it runs in its own task (and thread).
            self._nursery.start_soon(self._invalidate, changes)

    async def keep_current(self, every: float, timeout: float) -> None:
        """Refresh the catalogue every `every` seconds, each try bounded by
        `timeout` (or `every`, if longer)."""
        while True:
            await trio.sleep(every)
            with trio.move_on_after(max(timeout, every)):
                try:
                    await self.refresh()
                except Exception as error:
                    self.stats["catalog_errors"] += 1
                    log.warning("catalogue refresh failed: %s", error)

    async def _invalidate(self, changes: list[Change]) -> None:
        for change in changes:
            kind, inode, name = change
            self.invalidations.append(change)
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

    # --- attributes ----------------------------------------------------------

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
        attr.st_ino = inode_of(version, index)
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
        return self._attr(inode_of(version, 0), stat.S_IFDIR | 0o755, 0, nlink=2)

    def _catalog_attr(self, inode: int) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            return self._attr(ROOT, stat.S_IFDIR | 0o755, CATALOG_TTL,
                              nlink=2 + len(self.namespace.imis), mtime_ns=self._mounted_ns)
        if inode == CONTROL_DIR:
            return self._attr(CONTROL_DIR, stat.S_IFDIR | 0o555, CATALOG_TTL, nlink=2,
                              mtime_ns=self._mounted_ns)
        if inode == STATUS_FILE:
            return self._attr(STATUS_FILE, stat.S_IFREG | 0o444, 0, size=len(self._status_bytes()),
                              mtime_ns=time.time_ns())
        imi = self.namespace.imi_of(inode)
        if inode == imi.dir_inode:
            return self._attr(inode, stat.S_IFDIR | 0o755, CATALOG_TTL,
                              nlink=2 + len(imi.info.versions), mtime_ns=imi.mtime_ns)
        if imi.info.latest is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode, stat.S_IFLNK | 0o777, CATALOG_TTL,
                          size=len(str(imi.info.latest)), mtime_ns=imi.mtime_ns)

    def _listed_attr(self, inode: int) -> pyfuse3.EntryAttributes:
        """Attributes of an entry of a catalogue-level folder."""
        if is_content(inode):
            return self._version_attr(self.namespace.resolve(inode)[0])
        return self._catalog_attr(inode)

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
        if is_content(parent_inode):
            version, index = self.namespace.resolve(parent_inode)
            tree = await self._manifests.tree(version)
            child = tree.children.get(index, {}).get(text)
            if child is None:
                # Version content never changes: the kernel may remember the miss.
                missing = pyfuse3.EntryAttributes()
                missing.st_ino = 0
                missing.entry_timeout = CONTENT_TTL
                return missing
            return self._entry_attr(version, child)
        inode = self.namespace.lookup(parent_inode, text)
        if is_content(inode):  # a version folder: its attributes are its manifest's root
            version, _ = self.namespace.resolve(inode)
            await self._manifests.tree(version)
            return self._version_attr(version)
        return self._catalog_attr(inode)

    async def _parent(self, inode: int) -> int:
        if is_content(inode):
            version, index = self.namespace.resolve(inode)
            if index:
                await self._manifests.tree(version)
        return self.namespace.parent(inode)

    @_guarded
    async def getattr(self, inode: int, ctx=None) -> pyfuse3.EntryAttributes:
        if is_content(inode):
            version, index = self.namespace.resolve(inode)
            tree = await self._manifests.tree(version)
            if index == 0:
                return self._version_attr(version)
            if index >= len(tree.entries):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._entry_attr(version, index)
        return self._catalog_attr(inode)

    @_guarded
    async def readlink(self, inode: int, ctx=None) -> bytes:
        if is_content(inode):
            version, index = self.namespace.resolve(inode)
            entry = (await self._manifests.tree(version)).entries[index]
            if entry.target is None:
                raise pyfuse3.FUSEError(errno.EINVAL)
            return os.fsencode(entry.target)
        imi = self.namespace.imi_of(inode)
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
        if is_content(inode):
            version, index = self.namespace.resolve(inode)
            listing = (await self._manifests.tree(version)).listing(index)
            window = listing[start:start + 1024]
            return [(start + i + 1, name, self._entry_attr(version, child))
                    for i, (name, child) in enumerate(window)]
        items = [(os.fsencode(name), self._listed_attr(child))
                 for name, child in self.namespace.listing(inode)]
        return [(i + 1, name, attr) for i, (name, attr) in enumerate(items) if i >= start]

    async def releasedir(self, fh: int) -> None:
        pass

    # --- files ---------------------------------------------------------------

    @_guarded
    async def open(self, inode: int, flags: int, ctx=None) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise _erofs()
        # One handle per open(), unlike S3QL's inode-as-handle: each open file
        # keeps its own readahead state.
        if inode == STATUS_FILE:
            fh = self._new_fh()
            self._files[fh] = _OpenSnapshot(self._status_bytes())
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        if not is_content(inode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        version, index = self.namespace.resolve(inode)
        entry = (await self._manifests.tree(version)).entries[index]
        if entry.type != FILE:
            raise pyfuse3.FUSEError(errno.EISDIR if entry.type == DIR else errno.EINVAL)
        fh = self._new_fh()
        self._files[fh] = self._reader.open(version, entry)
        self.profiles.opened(version.imi, version.number)
        # Content is immutable: keep the kernel's page cache across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    @_guarded
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        handle = self._files.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if isinstance(handle, _OpenSnapshot):
            return handle.data[off:off + size]
        if self._tracer is None:
            return await self._reader.read(handle, off, size)
        began, ok = self._tracer.now(), False
        try:
            data = await self._reader.read(handle, off, size)
            ok = True
            return data
        finally:
            version = handle.version
            self._tracer.read(began, f"{version.imi}/{version.number}/{handle.entry.path}", off, size, ok)

    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if isinstance(handle, OpenFile):
            self.profiles.released(handle.version.imi, handle.version.number)

    async def flush(self, fh: int) -> None:
        # Nothing is ever written, so nothing to flush: ENOSYS tells the
        # kernel so once, and it stops sending a FLUSH (a synchronous round
        # trip through this loop) on every close().
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_guarded
    async def statfs(self, ctx=None) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        total = sum(v.bytes for imi in self.namespace.imis.values() for v in imi.info.versions.values())
        data.f_blocks = -(-total // 4096)
        data.f_bfree = data.f_bavail = 0
        data.f_files = sum(len(v.tree.entries) for v in self.namespace.loaded())
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    @_guarded
    async def getxattr(self, inode: int, name: bytes, ctx=None) -> bytes:
        if name == SESSION_UP and is_content(inode):
            version, index = self.namespace.resolve(inode)
            if index == 0:  # the version folder
                state = self.profiles.session_up(version.imi, version.number)
                return json.dumps(state, sort_keys=True).encode()
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
