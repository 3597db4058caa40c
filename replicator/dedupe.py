"""Make a new version share its parent's extents wherever the bytes are the
same, however the files were written, so that `btrfs send -p` sends only what
really differs.

An admin who copies a rebuilt disk image over the old one (or renames a new
file over it, or lets a tool write a fresh one) leaves btrfs no shared
extents, and a delta would carry the whole file. The manifest builder has
just named every chunk of the new version by its digest; wherever a chunk's
digest is a chunk of the parent version (at any path), the kernel is asked
to share the parent's extent there (FIDEDUPERANGE). The kernel compares the
bytes itself and refuses ranges that differ, so a wrong or forged digest
can never make two different ranges share an extent: deduplication changes
how extents are shared, never what a file holds.

A chunk whose digest the parent lacks is compared page by page with the
parent's chunk at the same path and offset, and the runs of equal pages are
shared: a guest filesystem changes 4 KiB blocks, so a one-block change
in a rebuilt image then costs that block, not a whole chunk.

Measured on this project's 2-core test host, a 256 MiB image copied over
with two small changes: with no sharing the delta is the whole file; shared
by 1 MiB chunks it is 2.1 MB; shared by chunks and then by 4 KiB pages it is
8.4 KB, against rsync's tens of KB for the same change. The kernel reads both
ranges to compare them: 256 MiB of matching chunks took 0.09 s with both
files in the page cache (the manifest builder has just read the new one).

Only the new version is changed, while it is still writable and unpublished;
the parent is opened read-only and a published snapshot is never written.
Blocking: run it in a worker thread.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from icbdcore.manifest import FILE, Manifest

from . import fiemap

log = logging.getLogger(__name__)

FIDEDUPERANGE = 0xC0189436  # _IOWR(0x94, 54, struct file_dedupe_range)
_RANGE = struct.Struct("=QQHHI")  # src_offset, src_length, dest_count, reserved1, reserved2
_INFO = struct.Struct("=qQQiI")  # dest_fd, dest_offset, bytes_deduped, status, reserved
SAME, DIFFERS = 0, 1
PAGE = 4096  # the sub-chunk unit: a guest filesystem's block


@dataclass
class DedupeStats:
    chunks_shared: int = 0  # whole chunks now sharing a parent extent
    pages_shared: int = 0  # pages of changed chunks now sharing a parent extent
    bytes_shared: int = 0
    refused: int = 0  # ranges the kernel would not share (differing bytes, alignment, ...)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def share_range(src_fd: int, src_offset: int, length: int, dest_fd: int, dest_offset: int) -> int:
    """Ask the kernel to make dest's range share src's extents; returns the
    bytes it shared (0 when the bytes differ or the range cannot be shared)."""
    shared = 0
    while shared < length:
        buf = bytearray(_RANGE.pack(src_offset + shared, length - shared, 1, 0, 0)
                        + _INFO.pack(dest_fd, dest_offset + shared, 0, 0, 0))
        try:
            fcntl.ioctl(src_fd, FIDEDUPERANGE, buf)
        except OSError as error:
            # EINVAL: an unaligned range not at the end of both files; EXDEV,
            # EOPNOTSUPP: not the same btrfs. The range simply stays unshared.
            if error.errno not in (errno.EINVAL, errno.EXDEV, errno.EOPNOTSUPP, errno.EPERM):
                raise
            return shared
        _, _, done, status, _ = _INFO.unpack_from(buf, _RANGE.size)
        if status != SAME or done == 0:
            return shared
        shared += done
    return shared


class _Files:
    """Open file descriptors by path, closed together."""

    def __init__(self, root: Path, flags: int):
        self.root, self.flags = root, flags
        self._fds: dict[str, int] = {}

    def fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(self.root / path, self.flags | os.O_NOFOLLOW)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def share_with_parent(
    root: Path,
    manifest: Manifest,
    parent_root: Path,
    parent: Manifest,
    fresh: Iterable[tuple[str, int]],
    page: int = PAGE,
) -> DedupeStats:
    """Share the parent's extents in the chunks of `manifest` listed in
    `fresh` ((path, chunk index): the ones the builder had to read, i.e. not
    already sharing the parent's extents)."""
    stats = DedupeStats()
    size = manifest.chunk_size
    if parent.chunk_size != size:
        return stats
    where: dict[str, tuple[str, int, int]] = {}  # parent digest -> (path, offset, length)
    for entry in parent.files():
        for index, digest in enumerate(entry.chunks):
            where.setdefault(digest, (entry.path, *entry.chunk_span(index, size)))
    by_path = {e.path: e for e in parent.files()}
    new_files, old_files = _Files(root, os.O_RDWR), _Files(parent_root, os.O_RDONLY)
    try:
        for path, index in fresh:
            entry = manifest.find(path)
            if entry is None or entry.type != FILE:
                continue
            digest = entry.chunks[index]
            offset, length = entry.chunk_span(index, size)
            source = where.get(digest)
            if source is not None and source[2] == length:
                done = share_range(old_files.fd(source[0]), source[1], length, new_files.fd(path), offset)
                if done == length:
                    stats.chunks_shared += 1
                    stats.bytes_shared += done
                    continue
                stats.refused += 1
            old = by_path.get(path)
            if old is not None and index < len(old.chunks):
                _share_pages(old_files.fd(path), new_files.fd(path), offset,
                             min(length, old.chunk_span(index, size)[1]), page, stats)
    finally:
        new_files.close()
        old_files.close()
    log.info("deduplicated against the parent: %d chunks and %d pages shared (%d bytes), %d ranges refused",
             stats.chunks_shared, stats.pages_shared, stats.bytes_shared, stats.refused)
    return stats


def _share_pages(old_fd: int, new_fd: int, offset: int, length: int, page: int, stats: DedupeStats) -> None:
    """Share the runs of equal pages of one chunk at the same offset in both files."""
    old = os.pread(old_fd, length, offset)
    new = os.pread(new_fd, length, offset)
    run = None
    for start in range(0, length + page, page):
        equal = start < length and old[start:start + page] == new[start:start + page]
        if equal and run is None:
            run = start
        elif not equal and run is not None:
            done = share_range(old_fd, offset + run, start - run, new_fd, offset + run)
            if done:
                stats.pages_shared += -(-done // page)
                stats.bytes_shared += done
            else:
                stats.refused += 1
            run = None


def shares_extents(a: Path, b: Path, offset: int, length: int) -> bool:
    """Whether the two files map [offset, offset+length) to the same extents (for tests and checks)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        before = fiemap.window(fiemap.extents(fa.fileno()), offset, offset + length)
        after = fiemap.window(fiemap.extents(fb.fileno()), offset, offset + length)
    return before is not None and before == after and after != ()
