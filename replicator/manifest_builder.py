"""Build the manifest of a version from its read-only snapshot.

The cost is proportional to what changed since the parent version: a file
whose inode, size, mtime and ctime match the parent's keeps the parent's chunk
list outright, and in a changed file a chunk whose extents are the parent's
(same physical bytes, see fiemap.py) keeps the parent's digest. Only the rest
is read and hashed. Blocking: run it in a worker thread.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import xxhash

from icbdcore.manifest import DIR, FILE, SYMLINK, Entry, Manifest, Pack, type_of_mode
from icbdcore.wire import content_digest

from . import fiemap

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass
class BuildStats:
    files: int = 0
    bytes_total: int = 0
    bytes_hashed: int = 0  # read and hashed; the rest was taken from the parent
    bytes_packed: int = 0  # small files read again to name packs that are not the parent's
    # (path, chunk index) of every chunk read and hashed: the ones that do not
    # share the parent's extents, which deduplication (dedupe.py) looks at.
    fresh: list[tuple[str, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Parent:
    """The previous version: its snapshot root and its manifest."""

    root: Path
    manifest: Manifest


def _walk(root: Path) -> list[tuple[str, os.stat_result]]:
    """Every path under root (relative, '' for root) with its lstat, unsorted."""
    out = [("", os.lstat(root))]
    stack = [("", root)]
    while stack:
        rel, path = stack.pop()
        with os.scandir(path) as it:
            for dirent in it:
                child = f"{rel}/{dirent.name}" if rel else dirent.name
                st = dirent.stat(follow_symlinks=False)
                out.append((child, st))
                if stat.S_ISDIR(st.st_mode):
                    stack.append((child, Path(dirent.path)))
    return out


class _ZeroDigests(dict):
    """Digests of all-zero chunks by length (holes of sparse images)."""

    def __missing__(self, length: int) -> str:
        self[length] = digest = content_digest(bytes(length))
        return digest


def build_manifest(
    root: Path,
    chunk_size: int,
    parent: Parent | None = None,
    progress: Progress | None = None,
) -> tuple[Manifest, BuildStats]:
    stats = BuildStats()
    listing = _walk(root)
    stats.bytes_total = sum(st.st_size for _, st in listing if stat.S_ISREG(st.st_mode))
    done = 0
    zeros = _ZeroDigests()
    parent_entries = {e.path: e for e in parent.manifest.entries} if parent else {}
    reusable = parent is not None and parent.manifest.chunk_size == chunk_size
    entries = []
    for rel, st in listing:
        kind = type_of_mode(st.st_mode)
        common = dict(
            path=rel,
            type=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            mtime_ns=st.st_mtime_ns,
        )
        path = root / rel if rel else root
        if kind == FILE:
            stats.files += 1
            old = parent_entries.get(rel) if reusable else None
            chunks, hashed = _file_chunks(path, st, chunk_size, old, parent, zeros)
            stats.bytes_hashed += sum(length for _, length in hashed)
            stats.fresh.extend((rel, index) for index, _ in hashed)
            done += st.st_size
            if progress:
                progress(done, stats.bytes_total)
            entries.append(Entry(size=st.st_size, chunks=chunks, **common))
        elif kind == SYMLINK:
            target = os.fsdecode(os.readlink(path))
            entries.append(Entry(size=len(os.fsencode(target)), target=target, **common))
        elif kind == DIR:
            entries.append(Entry(size=0, **common))
        else:
            entries.append(Entry(size=0, rdev=st.st_rdev, **common))
    entries.sort(key=lambda e: e.path)
    entries, packs, packed_bytes = pack_small_files(root, entries, chunk_size,
                                                    parent.manifest if parent is not None else None)
    stats.bytes_packed = packed_bytes
    log.info(
        "manifest of %s: %d entries, %d bytes, %d hashed",
        root, len(entries), stats.bytes_total, stats.bytes_hashed,
    )
    return Manifest(chunk_size, entries, packs), stats


def _file_chunks(
    path: Path,
    st: os.stat_result,
    chunk_size: int,
    old: Entry | None,
    parent: Parent | None,
    zeros: _ZeroDigests,
) -> tuple[tuple[str, ...], list[tuple[int, int]]]:
    """The chunk digests of one file, and (index, length) of the chunks that had to be read and hashed."""
    count = -(-st.st_size // chunk_size)
    if count == 0:
        return (), []
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        old_extents = new_extents = None
        if old is not None and old.type == FILE and parent is not None:
            old_path = parent.root / old.path
            try:
                old_st = os.lstat(old_path)
            except FileNotFoundError:
                old_st = None
            if (
                old_st is not None
                and (old_st.st_ino, old_st.st_size, old_st.st_mtime_ns, old_st.st_ctime_ns)
                == (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            ):
                return old.chunks, []
            if old_st is not None and stat.S_ISREG(old_st.st_mode):
                old_extents, new_extents = _extent_maps(old_path, fd)
        digests = []
        hashed = []
        for index in range(count):
            start = index * chunk_size
            length = min(chunk_size, st.st_size - start)
            digest = _reused_digest(index, start, length, old, old_extents, new_extents, chunk_size)
            if digest is None and new_extents is not None and fiemap.window(new_extents, start, start + length) == ():
                digest = zeros[length]  # a hole: no need to read it
            if digest is None:
                data = os.pread(fd, length, start)
                if len(data) != length:
                    raise OSError(f"{path} changed size while it was read")
                digest = content_digest(data)
                hashed.append((index, length))
            digests.append(digest)
        return tuple(digests), hashed
    finally:
        os.close(fd)


def _extent_maps(old_path: Path, new_fd: int):
    try:
        old_fd = os.open(old_path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            return fiemap.extents(old_fd), fiemap.extents(new_fd)
        finally:
            os.close(old_fd)
    except OSError as error:  # a filesystem without FIEMAP: hash everything
        log.debug("no extent map for %s: %s", old_path, error)
        return None, None


def _reused_digest(index, start, length, old, old_extents, new_extents, chunk_size) -> str | None:
    if old_extents is None or new_extents is None or index >= len(old.chunks):
        return None
    if old.chunk_span(index, chunk_size)[1] != length:
        return None
    before = fiemap.window(old_extents, start, start + length)
    after = fiemap.window(new_extents, start, start + length)
    if before is None or after is None or before != after or after == ():
        # An all-hole chunk is cheap to name without reading (see zeros).
        return None
    return old.chunks[index]


# --- packing small files ---------------------------------------------------------
# A tree of small files read through a mount costs one block fetch per file:
# tar over a Debian root of 11.7k files made 11.7k round trips, one after
# another. Small files are therefore also packed, their bytes side by side in
# path order (the order a walk reads them), into blocks of up to one chunk,
# the way SquashFS packs fragments: a reader fetches a pack once and finds
# the next files of the walk in it. Each file keeps its own chunk too.
#
# Where a pack ends must not move when one file changes, or every later pack
# would change digest and every site would fetch them all again. So a pack is
# cut only once it holds a quarter chunk, and then before a file whose path
# hashes to 0 modulo PACK_CUT_ONE_IN (or when the next file would not fit):
# an inserted, removed or grown file changes its own pack, and the packs
# after it start where they did at the first such path.

PACK_CUT_ONE_IN = 8


def pack_small_files(root: Path, entries: list[Entry], chunk_size: int,
                     parent: Manifest | None) -> tuple[list[Entry], list[Pack], int]:
    """`entries` with small files assigned to packs; the packs; the bytes read
    to name new packs (a pack whose files are the parent's, unchanged, keeps
    the parent's digest unread)."""
    largest, least = chunk_size // 8, chunk_size // 4
    groups: list[list[int]] = []
    current: list[int] = []
    size = 0
    for index, entry in enumerate(entries):
        if entry.type != FILE or not 0 < entry.size <= largest:
            continue
        cut = size >= least and xxhash.xxh3_64_intdigest(os.fsencode(entry.path)) % PACK_CUT_ONE_IN == 0
        if current and (cut or size + entry.size > chunk_size):
            groups.append(current)
            current, size = [], 0
        current.append(index)
        size += entry.size
    if current:
        groups.append(current)
    known = _parent_packs(parent) if parent is not None and parent.chunk_size == chunk_size else {}
    out = list(entries)
    packs: list[Pack] = []
    read = 0
    for group in groups:
        members = tuple((entries[i].path, entries[i].chunks) for i in group)
        pack = known.get(members)
        if pack is None:
            data = b"".join(_read_whole(root / entries[i].path, entries[i].size) for i in group)
            pack = Pack(content_digest(data), len(data))
            read += len(data)
        offset = 0
        for i in group:
            out[i] = replace(entries[i], pack=(len(packs), offset))
            offset += entries[i].size
        packs.append(pack)
    return out, packs, read


def _parent_packs(parent: Manifest) -> dict[tuple, Pack]:
    """The parent's packs by their members: (path, chunks) of each file, in order."""
    members: dict[int, list[tuple[int, str, tuple[str, ...]]]] = {}
    for entry in parent.files():
        if entry.pack is not None:
            members.setdefault(entry.pack[0], []).append((entry.pack[1], entry.path, entry.chunks))
    return {tuple((path, chunks) for _, path, chunks in sorted(files)): parent.packs[index]
            for index, files in members.items()}


def _read_whole(path: Path, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    if len(data) != size:
        raise OSError(f"{path} changed size while it was read")
    return data
