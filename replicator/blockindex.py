"""Serving blocks from the versions a node holds: an index from block digest
to the file and offset where its bytes are, built from the manifests. A pack
(small files side by side, see manifest_builder.py) is read from its files,
one after another.

A block is verified before it is served; a node that finds its own copy
damaged says it does not have it (and logs why), so the reader moves on to
another source instead of receiving bad bytes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import trio

from icbdcore.layout import Layout
from icbdcore.manifest import FILE, Manifest
from icbdcore.wire import content_digest

log = logging.getLogger(__name__)

# Where a block's bytes are: one piece of one file, or for a pack a piece of
# each of its files, in order; each piece (path, offset, length).
Piece = tuple[str, int, int]
Location = tuple[str, int, tuple[Piece, ...]]  # iMI, version, pieces


class BlockIndex:
    def __init__(self, layout: Layout):
        self.layout = layout
        self._where: dict[str, Location] = {}
        self._manifests: dict[tuple[str, int], Manifest] = {}
        self._limiter = trio.CapacityLimiter(8)
        self.served_blocks = 0  # egress, for status and the boot-storm benchmark
        self.served_bytes = 0

    def add(self, name: str, version: int, manifest: Manifest) -> None:
        self._manifests[(name, version)] = manifest
        self._index(name, version, manifest)

    def _index(self, name: str, version: int, manifest: Manifest) -> None:
        size = manifest.chunk_size
        for entry in manifest.entries:
            if entry.type != FILE:
                continue
            for i, digest in enumerate(entry.chunks):
                offset, length = entry.chunk_span(i, size)
                self._where[digest] = (name, version, ((entry.path, offset, length),))
        members: dict[int, list[tuple[int, Piece]]] = {}
        for entry in manifest.files():
            if entry.pack is not None:
                members.setdefault(entry.pack[0], []).append((entry.pack[1], (entry.path, 0, entry.size)))
        for index, pieces in members.items():
            self._where[manifest.packs[index].digest] = (name, version, tuple(p for _, p in sorted(pieces)))

    def remove(self, name: str, version: int) -> None:
        if self._manifests.pop((name, version), None) is None:
            return
        self._where.clear()
        for (n, v), manifest in sorted(self._manifests.items()):
            self._index(n, v, manifest)

    def remove_imi(self, name: str) -> None:
        for key in [k for k in self._manifests if k[0] == name]:
            self.remove(*key)

    def __contains__(self, digest: str) -> bool:
        return digest in self._where

    def __len__(self) -> int:
        return len(self._where)

    async def read(self, digest: str) -> bytes | None:
        """The verified bytes of a block, or None if not held (or damaged here)."""
        where = self._where.get(digest)
        if where is None:
            return None
        return await trio.to_thread.run_sync(self._read, digest, where, limiter=self._limiter)

    async def read_many(self, digests: list[str]) -> list[bytes | None]:
        """read() of each, in one worker thread call."""
        wheres = [self._where.get(d) for d in digests]
        if not any(wheres):
            return [None] * len(digests)

        def read_all() -> list[bytes | None]:
            return [None if where is None else self._read(d, where) for d, where in zip(digests, wheres, strict=True)]

        return await trio.to_thread.run_sync(read_all, limiter=self._limiter)

    def _read(self, digest: str, where: Location) -> bytes | None:
        name, version, pieces = where
        root: Path = self.layout.version_dir(name, version)
        parts = []
        for path, offset, length in pieces:
            full = root / path
            try:
                fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    parts.append(os.pread(fd, length, offset))
                finally:
                    os.close(fd)
            except OSError as error:
                log.error("block %s: cannot read %s: %s", digest, full, error)
                return None
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if content_digest(data) != digest:
            first = pieces[0]
            log.error("block %s (%s offset %d%s) is damaged on this node; not serving it", digest,
                      root / first[0], first[1], f" and {len(pieces) - 1} more files" if len(pieces) > 1 else "")
            return None
        self.served_blocks += 1
        self.served_bytes += len(data)
        return data
