"""The path of a read, from an open file's byte range to the bytes.

A read names blocks of its file (usually one: the kernel asks 128 KiB to
1 MiB at a time). Blocks already in memory are served at once (`peek`);
otherwise the read waits on the memory cache's fetches, which run in the
mount's nursery, for at most `timeout`, and then raises Unavailable, which
the kernel sees as EIO: never a reader stuck in the kernel. The blocks it gave
up on are refused for a moment (BlockCache.give_up), since the kernel asks
again at once for a readahead page it got EIO for.

Around that, each read records the blocks it touched for the boot profile
(profiles.py), asks the file's readahead detector (readahead.py) what to
fetch ahead and starts those fetches, and tells the memory cache how many
bytes of each block went to the kernel, which orders its evictions.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import trio

from icbdcore.manifest import Entry
from icbdcore.source import ImageSource, Unavailable

from .blockcache import BlockCache
from .namespace import Version
from .profiles import BootProfiles
from .readahead import Readahead

log = logging.getLogger(__name__)

# A walk (tar, find -exec, a boot) reads packed small files in path order,
# pack after pack: these many packs are fetched into memory ahead of it, and
# these many after them are handed to the source to prefetch.
PACKS_NEAR = 4
PACKS_FAR = 32


@dataclass(eq=False)
class OpenFile:
    version: Version
    entry: Entry
    readahead: Readahead | None


class Reader:
    def __init__(
        self,
        source: ImageSource,
        blocks: BlockCache,
        profiles: BootProfiles,
        nursery: trio.Nursery,
        stats: Counter[str],
        *,
        timeout: float,
        readahead: bool = True,
        max_near: int = 8,
        max_far: int = 32,
    ):
        """`timeout`: a read not served within this raises Unavailable;
        `readahead`, `max_near`, `max_far`: see readahead.py."""
        self._source = source
        self._blocks = blocks
        self._profiles = profiles
        self._nursery = nursery
        self._stats = stats
        self._timeout = timeout
        self._readahead = readahead
        self._max_near = max_near
        self._max_far = max_far

    @property
    def blocks(self) -> BlockCache:
        return self._blocks

    def open(self, version: Version, entry: Entry) -> OpenFile:
        """A file of a loaded version, opened for reading."""
        readahead = None
        if self._readahead and len(entry.chunks) > 1:
            readahead = Readahead(len(entry.chunks), version.tree.chunk_size, self._max_near, self._max_far)
        return OpenFile(version, entry, readahead)

    async def read(self, file: OpenFile, off: int, size: int) -> bytes | memoryview:
        """Up to `size` bytes of the file from `off`; raises Unavailable
        after `timeout`."""
        entry = file.entry
        end = min(off + size, entry.size)
        if off >= end:
            return b""
        version = file.version
        if entry.pack is not None:
            return await self._read_packed(file, off, end)
        chunk_size = version.tree.chunk_size
        first, last = off // chunk_size, (end - 1) // chunk_size
        digests = entry.chunks[first:last + 1]
        self._stats["reads"] += 1
        self._profiles.touched(version.imi, version.number, digests)
        if file.readahead is not None:
            self._read_ahead(file, off, end)
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
            raise Unavailable(f"{entry.path}: short block")
        self._stats["read_bytes"] += len(data)
        return data

    async def _read_packed(self, file: OpenFile, off: int, end: int) -> memoryview:
        """A small file's bytes, from the pack that holds them (see
        replicator/manifest_builder.py). A walk reads the files of a pack one
        after another, so the next packs are fetched ahead of it."""
        version, entry = file.version, file.entry
        manifest = version.tree.manifest
        index, base = entry.pack
        digest = manifest.packs[index].digest
        self._stats["reads"] += 1
        self._stats["packed_reads"] += 1
        self._profiles.touched(version.imi, version.number, (digest,))
        if index != version.pack_seen:
            version.pack_seen = index
            self._packs_ahead(version, index)
        block = self._blocks.peek(digest)
        if block is None:
            block = (await self._fetch(version, (digest,)))[0]
        data = memoryview(block)[base + off:base + end]
        if len(data) != end - off:
            log.error("%s@%d:%s: short pack", version.imi, version.number, entry.path)
            raise Unavailable(f"{entry.path}: short pack")
        self._blocks.served(digest, len(data))
        self._stats["read_bytes"] += len(data)
        return data

    def _packs_ahead(self, version: Version, index: int) -> None:
        """A reader entered pack `index`: warm the next PACKS_NEAR packs into
        memory, and hand the source the PACKS_FAR after those (in batches, as
        sequential readahead does within a file)."""
        packs = version.tree.manifest.packs
        near = [p.digest for p in packs[index + 1:index + 1 + PACKS_NEAR]]
        if near:
            self._stats["readahead_blocks"] += self._blocks.warm(near, version.imi, version.number)
        horizon = index + PACKS_NEAR + PACKS_FAR
        if version.packs_far - index < PACKS_FAR // 2 and version.packs_far < len(packs) - 1:
            start = max(index + PACKS_NEAR, version.packs_far) + 1
            far = [p.digest for p in packs[start:horizon + 1]]
            version.packs_far = min(horizon, len(packs) - 1)
            if far:
                self._nursery.start_soon(self._prefetch, far, version.imi, version.number)

    async def _fetch(self, version: Version, digests: tuple[str, ...]) -> list[bytes]:
        """The blocks of a read that missed memory; Unavailable after `timeout`."""
        imi, number = version.imi, version.number
        with trio.move_on_after(self._timeout):
            try:
                return await self._blocks.get(digests, imi, number)
            except Unavailable as error:
                log.warning("read of %s@%d: %s", imi, number, error)
                raise
        log.warning("read of %s@%d: no block within %g s", imi, number, self._timeout)
        self._blocks.give_up(digests)
        raise Unavailable(f"no block within {self._timeout:g} s")

    def _read_ahead(self, file: OpenFile, off: int, end: int) -> None:
        near, far = file.readahead.advise(off, end)
        chunks, version = file.entry.chunks, file.version
        if near:
            started = self._blocks.warm((chunks[i] for i in near), version.imi, version.number)
            self._stats["readahead_blocks"] += started
        if far:
            digests = list(dict.fromkeys(chunks[i] for i in far))
            self._nursery.start_soon(self._prefetch, digests, version.imi, version.number)

    async def _prefetch(self, digests: list[str], imi: str, version: int) -> None:
        self._stats["prefetch_calls"] += 1
        self._stats["prefetch_blocks"] += len(digests)
        with trio.move_on_after(self._timeout):
            try:
                await self._source.prefetch(digests, imi, version)
            except Exception as error:
                log.debug("prefetch for %s@%d failed: %s", imi, version, error)
