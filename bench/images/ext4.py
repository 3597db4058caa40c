"""A reproducible ext4 image writer whose files stay where they were.

`mke2fs -d` packs a tree in the order it walks it, so one file added early in
the walk moves every later inode and data block: a 30 KB file added to
/usr/bin of the Debian desktop changed 800 MiB of its 1.2 GiB image, and a
btrfs delta between the two releases would carry all of it. This writer lays
the tree out itself:

- without a base image, in one deterministic order, packed from the front:
  first the paths `first` names, in its order (the files and folders a boot
  reads, in the order it first reads them), then the rest in a depth-first
  walk by name, each directory's blocks just before its children's;
- with `base` (an image this writer made for an earlier release), every path
  that exists in both keeps its inode number and its blocks, as far as its new
  size fits in them; only new or grown files take new inodes and blocks, first
  fit in the space the base leaves free. Two releases then differ in the
  blocks of the files that differ, their inodes, the directories that list
  them, and a handful of bitmap, group descriptor and superblock blocks.

The same tree, timestamp and base give the same bytes: every time is the
file's mtime clamped to `epoch` (SOURCE_DATE_EPOCH), UUID and hash seed are
given, nothing depends on the host's readdir order or clock.

What it writes is a plain subset of ext4 that the kernel and e2fsck accept
without options: 4 KiB blocks, 128 MiB groups each with its own bitmaps and
inode table, sparse superblock backups, extents (at most 4 per file, in the
inode), linear directories, 256-byte inodes, no journal (the root is shared
read-only; each desktop's writes go to its qcow2 overlay), no checksums, no
extended attributes (a tree that has any is refused).
"""

from __future__ import annotations

import logging
import math
import os
import stat
import struct
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

BLOCK = 4096
BLOCKS_PER_GROUP = 8 * BLOCK  # one bitmap block's worth: 128 MiB per group
INODE_SIZE = 256
EXTRA_ISIZE = 32
INODES_PER_BLOCK = BLOCK // INODE_SIZE
ROOT_INO = 2
LOST_FOUND_INO = 11
FIRST_INO = 11  # 1-10 are reserved
MAX_EXTENTS = 4  # what fits in the inode: no extent tree blocks
MAX_EXTENT_LEN = 32768
DESC_SIZE = 32

# Feature flags (fs/ext4/ext4.h).
INCOMPAT_FILETYPE = 0x2
INCOMPAT_EXTENTS = 0x40
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_LARGE_FILE = 0x2
RO_COMPAT_DIR_NLINK = 0x20
RO_COMPAT_EXTRA_ISIZE = 0x40
EXTENTS_FL = 0x80000
EXT_MAGIC = 0xF30A
SUPER_MAGIC = 0xEF53
FLAGS_SIGNED_HASH = 0x1

# Directory entry file types.
FT = {"file": 1, "dir": 2, "chr": 3, "blk": 4, "fifo": 5, "sock": 6, "symlink": 7}
FT_KIND = {v: k for k, v in FT.items()}
S_TYPE = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "chr": stat.S_IFCHR, "blk": stat.S_IFBLK,
          "fifo": stat.S_IFIFO, "sock": stat.S_IFSOCK, "symlink": stat.S_IFLNK}


class Ext4Error(RuntimeError):
    """The tree cannot be written as asked (too large, unsupported content, a bad base)."""


# ---- geometry -----------------------------------------------------------------

def _is_power_of(n: int, base: int) -> bool:
    while n > 1 and n % base == 0:
        n //= base
    return n == 1


@dataclass(frozen=True)
class Geometry:
    groups: int
    inodes_per_group: int

    def __post_init__(self) -> None:
        if self.inodes_per_group % INODES_PER_BLOCK or not 0 < self.inodes_per_group <= 8 * BLOCK:
            raise Ext4Error(f"bad inodes per group {self.inodes_per_group}")

    @property
    def blocks_count(self) -> int:
        return self.groups * BLOCKS_PER_GROUP

    @property
    def inodes_count(self) -> int:
        return self.groups * self.inodes_per_group

    @property
    def gdt_blocks(self) -> int:
        return -(-self.groups * DESC_SIZE // BLOCK)

    @property
    def itable_blocks(self) -> int:
        return self.inodes_per_group // INODES_PER_BLOCK

    def has_super(self, group: int) -> bool:
        """sparse_super: copies in groups 0, 1 and the powers of 3, 5 and 7."""
        return group in (0, 1) or any(_is_power_of(group, b) for b in (3, 5, 7))

    def layout(self, group: int) -> tuple[int, int, int, int]:
        """(block bitmap, inode bitmap, first inode table block, first data block) of a group."""
        start = group * BLOCKS_PER_GROUP
        if self.has_super(group):
            start += 1 + self.gdt_blocks
        return start, start + 1, start + 2, start + 2 + self.itable_blocks

    def data_runs(self) -> list[list[int]]:
        """The free intervals [start, end) of a fresh filesystem: every group after its metadata."""
        return [[self.layout(g)[3], (g + 1) * BLOCKS_PER_GROUP] for g in range(self.groups)]

    @property
    def data_blocks(self) -> int:
        return sum(end - start for start, end in self.data_runs())


# ---- the tree -----------------------------------------------------------------

@dataclass(eq=False)
class Node:
    path: bytes  # b"/usr/bin/x"; b"/" for the root
    kind: str
    mode: int  # permission bits, setuid and friends
    uid: int
    gid: int
    mtime: int
    size: int = 0
    source: Path | None = None  # regular files: where the content is
    target: bytes = b""  # symlinks
    rdev: int = 0
    children: list[tuple[bytes, Node]] = field(default_factory=list)
    parent: Node | None = None
    links: int = 1
    ino: int = 0
    extents: list[tuple[int, int]] = field(default_factory=list)  # (first block, count)
    dir_data: bytes = b""

    @property
    def fast_symlink(self) -> bool:
        return self.kind == "symlink" and len(self.target) < 60

    def blocks_needed(self) -> int:
        if self.kind == "file":
            return -(-self.size // BLOCK)
        if self.kind == "dir":
            return len(self.dir_data) // BLOCK
        if self.kind == "symlink" and not self.fast_symlink:
            return 1
        return 0


def read_tree(root: Path, epoch: int) -> list[Node]:
    """Every node under `root` in write order (depth first, by name), root first."""
    root = Path(root)
    by_inode: dict[tuple[int, int], Node] = {}
    order: list[Node] = []

    def make(path: Path, name: bytes, st: os.stat_result) -> Node:
        mode = st.st_mode
        kind = next((k for k, t in S_TYPE.items() if stat.S_IFMT(mode) == t), None)
        if kind is None:
            raise Ext4Error(f"{path}: unsupported file type {stat.S_IFMT(mode):o}")
        node = Node(path=name, kind=kind, mode=stat.S_IMODE(mode), uid=st.st_uid, gid=st.st_gid,
                    mtime=min(int(st.st_mtime), epoch))
        if kind == "file":
            node.size, node.source = st.st_size, path
        elif kind == "symlink":
            node.target = os.fsencode(os.readlink(path))
            node.size = len(node.target)
        elif kind in ("chr", "blk"):
            node.rdev = st.st_rdev
        return node

    def walk(directory: Path, node: Node) -> None:
        order.append(node)
        names = sorted(os.fsencode(e) for e in os.listdir(directory))
        subdirs = []
        for name in names:
            path = directory / os.fsdecode(name)
            st = os.lstat(path)
            if _has_xattrs(path):
                raise Ext4Error(f"{path} has extended attributes, which this writer does not write")
            key = (st.st_dev, st.st_ino)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and key in by_inode:
                child = by_inode[key]
                child.links += 1
            else:
                full = (node.path.rstrip(b"/") + b"/" + name)
                child = make(path, full, st)
                child.parent = node
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    by_inode[key] = child
                if child.kind == "dir":
                    subdirs.append((path, child))
                else:
                    order.append(child)
            node.children.append((name, child))
        for path, child in subdirs:
            walk(path, child)

    st = os.lstat(root)
    top = make(root, b"/", st)
    walk(root, top)
    return order


def _has_xattrs(path: Path) -> bool:
    try:
        return bool(os.listxattr(path, follow_symlinks=False))
    except OSError:
        return False


# ---- directory blocks -----------------------------------------------------------

def _dirent(ino: int, name: bytes, ftype: int, rec_len: int) -> bytes:
    return struct.pack("<IHBB", ino, rec_len, len(name), ftype) + name + b"\0" * (rec_len - 8 - len(name))


def _rec_len(name: bytes) -> int:
    return (8 + len(name) + 3) & ~3


def dir_blocks(entries: list[tuple[bytes, int, int]]) -> bytes:
    """Linear directory blocks for (name, inode, file type) entries in this order."""
    blocks: list[bytes] = []
    current: list[tuple[bytes, int, int]] = []
    used = 0

    def flush() -> None:
        parts = []
        for i, (name, ino, ftype) in enumerate(current):
            length = _rec_len(name) if i < len(current) - 1 else BLOCK - sum(
                _rec_len(n) for n, _, _ in current[:-1])
            parts.append(_dirent(ino, name, ftype, length))
        blocks.append(b"".join(parts))

    for entry in entries:
        size = _rec_len(entry[0])
        if used + size > BLOCK:
            flush()
            current, used = [], 0
        current.append(entry)
        used += size
    flush()
    return b"".join(blocks)


# ---- the base image's layout ------------------------------------------------------

@dataclass(frozen=True)
class BaseEntry:
    ino: int
    kind: str
    extents: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Layout:
    """Where an image made by this writer keeps each path."""

    geometry: Geometry
    entries: dict[bytes, BaseEntry]


def read_layout(image: Path) -> Layout:
    """The geometry and every path's inode and extents of an image this writer made."""
    with open(image, "rb") as f:
        def block(number: int, count: int = 1) -> bytes:
            f.seek(number * BLOCK)
            return f.read(count * BLOCK)

        sb = block(0)[1024:2048]
        if struct.unpack_from("<H", sb, 56)[0] != SUPER_MAGIC:
            raise Ext4Error(f"{image} is not an ext4 image")
        blocks_count, = struct.unpack_from("<I", sb, 4)
        per_group, = struct.unpack_from("<I", sb, 32)
        inodes_per_group, = struct.unpack_from("<I", sb, 40)
        inode_size, = struct.unpack_from("<H", sb, 88)
        incompat, = struct.unpack_from("<I", sb, 96)
        if (per_group != BLOCKS_PER_GROUP or inode_size != INODE_SIZE or blocks_count % per_group
                or incompat & ~(INCOMPAT_FILETYPE | INCOMPAT_EXTENTS)):
            raise Ext4Error(f"{image} was not made by this writer (its geometry or features differ)")
        geometry = Geometry(blocks_count // per_group, inodes_per_group)
        gdt = block(1, geometry.gdt_blocks)
        tables = [struct.unpack_from("<I", gdt, g * DESC_SIZE + 8)[0] for g in range(geometry.groups)]

        def inode(ino: int) -> bytes:
            group, index = divmod(ino - 1, inodes_per_group)
            offset = tables[group] * BLOCK + index * INODE_SIZE
            f.seek(offset)
            return f.read(INODE_SIZE)

        def extents_of(raw: bytes) -> list[tuple[int, int]]:
            flags, = struct.unpack_from("<I", raw, 32)
            if not flags & EXTENTS_FL:
                return []
            magic, count, _, depth = struct.unpack_from("<HHHH", raw, 40)
            if magic != EXT_MAGIC or depth != 0:
                raise Ext4Error(f"{image}: an inode with an extent tree this writer does not make")
            out = []
            for i in range(count):
                _, length, hi, lo = struct.unpack_from("<IHHI", raw, 52 + 12 * i)
                out.append(((hi << 32) | lo, length))
            return out

        entries: dict[bytes, BaseEntry] = {}

        def visit(path: bytes, ino: int, kind: str) -> None:
            raw = inode(ino)
            extents = extents_of(raw)
            entries[path] = BaseEntry(ino, kind, tuple(extents))
            if kind != "dir":
                return
            data = b"".join(block(start, count) for start, count in extents)
            offset = 0
            while offset < len(data):
                child, rec_len, name_len, ftype = struct.unpack_from("<IHBB", data, offset)
                if rec_len < 8:
                    raise Ext4Error(f"{image}: a corrupt directory at {path!r}")
                name = data[offset + 8:offset + 8 + name_len]
                offset += rec_len
                if child and name not in (b".", b".."):
                    visit(path.rstrip(b"/") + b"/" + name, child, FT_KIND.get(ftype, "file"))

        visit(b"/", ROOT_INO, "dir")
    return Layout(geometry, entries)


# ---- allocation -----------------------------------------------------------------

class FreeSpace:
    """Which blocks are free, one byte per block (0 free, 1 used), allocated first fit.

    Group metadata is marked used, so a free run never crosses it. A byte per
    block costs 256 KiB per GiB of image and lets `bytes.find` look for a run
    at C speed: 20,000 allocations in a 1.5 GiB image take 0.1 s.
    """

    def __init__(self, geometry: Geometry) -> None:
        self.used = bytearray(b"\1" * geometry.blocks_count)
        for start, end in geometry.data_runs():
            self.used[start:end] = bytes(end - start)
        self.hint = 0  # no free block below this

    def take(self, extents: list[tuple[int, int]]) -> bool:
        """Claim these extents if every block of them is free."""
        if any(self.used.find(1, s, s + c) != -1 for s, c in extents):
            return False
        for s, c in extents:
            self.used[s:s + c] = b"\1" * c
        return True

    def allocate(self, count: int) -> list[tuple[int, int]]:
        """`count` blocks: the first free run that holds them all, else the first free runs in order."""
        start = self.used.find(bytes(count), self.hint)
        if start != -1:
            self.used[start:start + count] = b"\1" * count
            self._advance()
            return [(start, count)]
        extents, left, position = [], count, self.hint
        while left:
            a = self.used.find(0, position)
            if a == -1:
                raise Ext4Error("the image is full: give it more room")
            b = self.used.find(1, a)
            b = len(self.used) if b == -1 else b
            n = min(b - a, left, MAX_EXTENT_LEN)
            self.used[a:a + n] = b"\1" * n
            extents.append((a, n))
            left -= n
            position = a + n
        self._advance()
        return extents

    def _advance(self) -> None:
        free = self.used.find(0, self.hint)
        self.hint = len(self.used) if free == -1 else free

    @property
    def free(self) -> int:
        return self.used.count(0)


def choose_geometry(nodes: list[Node], free_bytes: int, base: Layout | None) -> Geometry:
    """Room for the tree plus `free_bytes`; a base's inodes per group are kept (they number the inodes)."""
    need = sum(n.blocks_needed() for n in nodes) + -(-free_bytes // BLOCK)
    inodes = len(nodes) + FIRST_INO
    if base is not None:
        geometry = base.geometry
        while geometry.data_blocks < need or geometry.inodes_count < inodes:
            geometry = Geometry(geometry.groups + 1, geometry.inodes_per_group)
        return geometry
    groups = 1
    while True:
        # Twice the inodes the tree needs, for files the desktop creates at run time.
        per_group = max(INODES_PER_BLOCK, -(-2 * inodes // groups))
        per_group = min(-(-per_group // INODES_PER_BLOCK) * INODES_PER_BLOCK, 8 * BLOCK)
        geometry = Geometry(groups, per_group)
        if geometry.data_blocks >= need and geometry.inodes_count >= inodes:
            return geometry
        groups += 1


def place(nodes: list[Node], geometry: Geometry, base: Layout | None,
          first: Sequence[bytes] = ()) -> FreeSpace:
    """Give every node an inode number and extents, keeping the base's where
    they fit; the paths `first` names take their blocks before the others, in
    its order."""
    entries = base.entries if base is not None else {}
    taken_inodes = set(range(1, FIRST_INO + 1))
    for node in nodes:
        old = entries.get(node.path)
        if old is not None and old.kind == node.kind and old.ino not in taken_inodes \
                and old.ino <= geometry.inodes_count:
            node.ino = old.ino
            taken_inodes.add(old.ino)
    next_ino = FIRST_INO + 1
    for node in nodes:
        if node.path == b"/":
            node.ino = ROOT_INO
        elif node.path == b"/lost+found":
            node.ino = LOST_FOUND_INO
        elif not node.ino:
            while next_ino in taken_inodes:
                next_ino += 1
            if next_ino > geometry.inodes_count:
                raise Ext4Error("the image has too few inodes")
            node.ino = next_ino
            taken_inodes.add(next_ino)
    for node in nodes:  # entries need the numbers of the children, so after numbering
        if node.kind == "dir":
            entries_of = [(b".", node.ino, FT["dir"]),
                          (b"..", (node.parent or node).ino, FT["dir"])]
            entries_of += [(name, child.ino, FT[child.kind]) for name, child in node.children]
            node.dir_data = dir_blocks(entries_of)

    space = FreeSpace(geometry)
    pending = []
    for node in nodes:
        need = node.blocks_needed()
        old = entries.get(node.path)
        if need and old is not None and old.kind == node.kind:
            kept = _fit(old.extents, need)
            if kept is not None and space.take(kept):
                node.extents = kept
                continue
        if need:
            pending.append(node)
    rank = {path: i for i, path in enumerate(dict.fromkeys(first))}
    pending.sort(key=lambda node: rank.get(node.path, len(rank)))  # stable: the walk's order after
    for node in pending:
        node.extents = space.allocate(node.blocks_needed())
        if len(node.extents) > MAX_EXTENTS:
            raise Ext4Error(f"{node.path.decode(errors='replace')} would need {len(node.extents)} "
                            "extents: give the image more room")
    return space


def _fit(extents: tuple[tuple[int, int], ...], need: int) -> list[tuple[int, int]] | None:
    """The first `need` blocks of `extents`, or None if they hold fewer."""
    out, left = [], need
    for start, count in extents:
        if left == 0:
            break
        n = min(count, left)
        out.append((start, n))
        left -= n
    return None if left else out


# ---- writing --------------------------------------------------------------------

def _inode_bytes(node: Node) -> bytes:
    raw = bytearray(INODE_SIZE)
    mode = S_TYPE[node.kind] | node.mode
    blocks = sum(c for _, c in node.extents)
    size = len(node.dir_data) if node.kind == "dir" else node.size
    nlink = min(node.links, 65000)
    if node.kind == "dir":
        nlink = 2 + sum(1 for _, c in node.children if c.kind == "dir")
        nlink = nlink if nlink < 65000 else 1  # dir_nlink: 1 means "many"
    flags = 0
    iblock = bytearray(60)
    if node.kind in ("chr", "blk"):
        major, minor = os.major(node.rdev), os.minor(node.rdev)
        if major < 256 and minor < 256:
            struct.pack_into("<I", iblock, 0, (major << 8) | minor)
        else:
            struct.pack_into("<I", iblock, 4, (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12))
    elif node.fast_symlink:
        iblock[:len(node.target)] = node.target
    elif node.kind in ("file", "dir", "symlink"):
        flags = EXTENTS_FL
        struct.pack_into("<HHHHI", iblock, 0, EXT_MAGIC, len(node.extents), MAX_EXTENTS, 0, 0)
        logical = 0
        for i, (start, count) in enumerate(node.extents):
            struct.pack_into("<IHHI", iblock, 12 + 12 * i, logical, count, start >> 32, start & 0xFFFFFFFF)
            logical += count
    t = node.mtime & 0xFFFFFFFF
    struct.pack_into("<HHIIIIIHHII", raw, 0, mode, node.uid & 0xFFFF, size & 0xFFFFFFFF,
                     t, t, t, 0, node.gid & 0xFFFF, nlink,
                     blocks * (BLOCK // 512), flags)
    raw[40:100] = iblock
    struct.pack_into("<I", raw, 108, size >> 32)
    struct.pack_into("<HHHH", raw, 116, 0, 0, node.uid >> 16, node.gid >> 16)
    struct.pack_into("<HHIIII", raw, 128, EXTRA_ISIZE, 0, 0, 0, 0, t)
    return bytes(raw)


def _superblock(geometry: Geometry, free_blocks: int, free_inodes: int, group: int, *,
                uuid: bytes, hash_seed: bytes, label: bytes, epoch: int) -> bytes:
    sb = bytearray(1024)
    struct.pack_into("<IIIIIIIIIIIIIHhHHHHIIIIHHIHH", sb, 0,
                     geometry.inodes_count, geometry.blocks_count, 0, free_blocks, free_inodes,
                     0, 2, 2, BLOCKS_PER_GROUP, BLOCKS_PER_GROUP, geometry.inodes_per_group,
                     0, epoch,  # mtime, wtime
                     0, -1, SUPER_MAGIC, 1, 1, 0,  # mnt count, max mnt count, magic, clean, errors=continue
                     epoch, 0, 0, 1, 0, 0,  # lastcheck, checkinterval, creator os, rev level, resuid, resgid
                     FIRST_INO, INODE_SIZE, group)
    struct.pack_into("<III", sb, 92, 0, INCOMPAT_FILETYPE | INCOMPAT_EXTENTS,
                     RO_COMPAT_SPARSE_SUPER | RO_COMPAT_LARGE_FILE | RO_COMPAT_DIR_NLINK
                     | RO_COMPAT_EXTRA_ISIZE)
    sb[104:120] = uuid
    sb[120:136] = label[:16].ljust(16, b"\0")
    sb[236:252] = hash_seed
    sb[252] = 1  # half_md4, were directories ever indexed
    struct.pack_into("<I", sb, 264, epoch)  # mkfs time
    struct.pack_into("<HHI", sb, 348, EXTRA_ISIZE, EXTRA_ISIZE, FLAGS_SIGNED_HASH)
    return bytes(sb)


def write_image(dest: Path, nodes: list[Node], geometry: Geometry, space: FreeSpace, *,
                uuid: bytes, hash_seed: bytes, label: bytes, epoch: int) -> None:
    inodes: dict[int, Node] = {node.ino: node for node in nodes}
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        with open(tmp, "wb") as out:
            out.truncate(geometry.blocks_count * BLOCK)
            for node in nodes:
                _write_data(out, node)
            descriptors = bytearray(geometry.gdt_blocks * BLOCK)
            free_blocks = free_inodes = 0
            for g in range(geometry.groups):
                block_bitmap, inode_bitmap, itable, _ = geometry.layout(g)
                table = bytearray(geometry.itable_blocks * BLOCK)
                ibitmap = bytearray(BLOCK)
                used_inodes = dirs = 0
                for index in range(geometry.inodes_per_group):
                    ino = g * geometry.inodes_per_group + index + 1
                    node = inodes.get(ino)
                    if ino < FIRST_INO or node is not None:
                        ibitmap[index // 8] |= 1 << (index % 8)
                        used_inodes += 1
                    if node is not None:
                        table[index * INODE_SIZE:(index + 1) * INODE_SIZE] = _inode_bytes(node)
                        dirs += node.kind == "dir"
                _set_bits(ibitmap, geometry.inodes_per_group, 8 * BLOCK - geometry.inodes_per_group)
                used = space.used[g * BLOCKS_PER_GROUP:(g + 1) * BLOCKS_PER_GROUP]
                bbitmap = _pack_bits(used)
                group_free = used.count(0)
                free_blocks += group_free
                free_inodes += geometry.inodes_per_group - used_inodes
                _pwrite(out, bbitmap, block_bitmap)
                _pwrite(out, ibitmap, inode_bitmap)
                _pwrite(out, table, itable)
                struct.pack_into("<IIIHHH", descriptors, g * DESC_SIZE, block_bitmap, inode_bitmap, itable,
                                 group_free, geometry.inodes_per_group - used_inodes, dirs)
            for g in range(geometry.groups):
                if not geometry.has_super(g):
                    continue
                sb = _superblock(geometry, free_blocks, free_inodes, g, uuid=uuid, hash_seed=hash_seed,
                                 label=label, epoch=epoch)
                first = g * BLOCKS_PER_GROUP
                out.seek(first * BLOCK + (1024 if g == 0 else 0))
                out.write(sb)
                _pwrite(out, descriptors, first + 1)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _write_data(out, node: Node) -> None:
    if not node.extents:
        return
    if node.kind == "dir":
        data = node.dir_data
    elif node.kind == "symlink":
        data = node.target
    else:
        data = None
    offset = 0
    if data is not None:
        for start, count in node.extents:
            _pwrite(out, data[offset:offset + count * BLOCK], start)
            offset += count * BLOCK
        return
    with open(node.source, "rb") as src:
        for start, count in node.extents:
            length = min(count * BLOCK, node.size - offset)
            _copy(src.fileno(), out.fileno(), offset, start * BLOCK, length)
            offset += length


def _copy(src: int, dst: int, src_offset: int, dst_offset: int, length: int) -> None:
    while length > 0:
        n = os.copy_file_range(src, dst, length, src_offset, dst_offset)
        if n <= 0:
            raise Ext4Error("a file shrank while the image was written")
        src_offset += n
        dst_offset += n
        length -= n


def _pwrite(out, data: bytes | bytearray, block: int) -> None:
    os.pwrite(out.fileno(), data, block * BLOCK)


def _pack_bits(flags: bytes | bytearray) -> bytes:
    """One bit per byte of `flags` (0 or 1), least significant bit first."""
    out = bytearray(len(flags) // 8)
    for i in range(len(out)):
        chunk = flags[8 * i:8 * i + 8]
        out[i] = (chunk[0] | chunk[1] << 1 | chunk[2] << 2 | chunk[3] << 3
                  | chunk[4] << 4 | chunk[5] << 5 | chunk[6] << 6 | chunk[7] << 7)
    return bytes(out)


def _set_bits(bitmap: bytearray, first: int, count: int) -> None:
    """Set bits [first, first + count) of a little-endian bitmap."""
    end = first + count
    while first < end and first % 8:
        bitmap[first // 8] |= 1 << (first % 8)
        first += 1
    whole = (end - first) // 8
    bitmap[first // 8:first // 8 + whole] = b"\xff" * whole
    first += whole * 8
    while first < end:
        bitmap[first // 8] |= 1 << (first % 8)
        first += 1


# ---- entry point ----------------------------------------------------------------

@dataclass(frozen=True)
class ImageStats:
    geometry: Geometry
    files: int
    used_bytes: int
    kept: int  # paths that kept their base inode
    moved: int  # paths present in the base that took new blocks


def make_image(tree: Path, dest: Path, *, epoch: int, uuid: bytes, hash_seed: bytes,
               label: str = "", free_bytes: int = 256 << 20, base: Path | None = None,
               first: Sequence[bytes] = ()) -> ImageStats:
    """Write the ext4 image of `tree` to `dest` (see the module docstring).
    `first`: paths ("/usr/bin/x") to lay out first, in this order."""
    tree, dest = Path(tree), Path(dest)
    nodes = read_tree(tree, epoch)
    if not any(n.path == b"/lost+found" for n in nodes):
        root = nodes[0]
        lost = Node(path=b"/lost+found", kind="dir", mode=0o700, uid=0, gid=0, mtime=root.mtime,
                    parent=root)
        root.children.append((b"lost+found", lost))
        root.children.sort(key=lambda item: item[0])
        nodes.insert(1, lost)
    layout = read_layout(base) if base is not None else None
    geometry = choose_geometry(nodes, free_bytes, layout)
    space = place(nodes, geometry, layout, first)
    write_image(dest, nodes, geometry, space, uuid=uuid, hash_seed=hash_seed,
                label=label.encode(), epoch=epoch)
    entries = layout.entries if layout else {}
    kept = sum(1 for n in nodes if n.path in entries and entries[n.path].ino == n.ino)
    moved = sum(1 for n in nodes if n.path in entries and n.extents
                and tuple(n.extents) != entries[n.path].extents[:len(n.extents)])
    return ImageStats(geometry, len(nodes), sum(c for n in nodes for _, c in n.extents) * BLOCK,
                      kept, moved)


def paths_read(image: Path, ranges: Iterable[tuple[int, int]]) -> list[bytes]:
    """The paths of an image this writer made whose blocks the byte ranges
    (offset, length) touch, in the order the ranges first touch them. Ranges
    in group metadata (inode tables, bitmaps) touch no path."""
    layout = read_layout(image)
    owner: dict[int, bytes] = {}
    for path, entry in layout.entries.items():
        for start, count in entry.extents:
            for block in range(start, start + count):
                owner[block] = path
    found: dict[bytes, None] = {}
    for offset, length in ranges:
        for block in range(offset // BLOCK, (offset + max(1, length) - 1) // BLOCK + 1):
            path = owner.get(block)
            if path is not None:
                found.setdefault(path)
    return list(found)


def check_image(image: Path) -> None:
    """Run e2fsck read-only over `image`; raise with its report if it finds anything."""
    result = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    if result.returncode != 0:
        raise Ext4Error(f"e2fsck finds faults in {image}: {result.stdout.strip()[-2000:]}")


def iter_changed_blocks(a: Path, b: Path, size: int = BLOCK) -> Iterator[int]:
    """Indexes of the `size`-byte blocks that differ between two files (a shorter one reads as zeros)."""
    chunk = 1 << 22
    with open(a, "rb") as fa, open(b, "rb") as fb:
        index = 0
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if not x and not y:
                return
            n = max(len(x), len(y))
            x, y = x.ljust(n, b"\0"), y.ljust(n, b"\0")
            if x != y:
                for i in range(0, n, size):
                    if x[i:i + size] != y[i:i + size]:
                        yield index + i // size
            index += math.ceil(n / size)
