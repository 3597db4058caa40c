"""Extent maps of files (the FS_IOC_FIEMAP ioctl), to see which bytes two
btrfs snapshots share without reading them.

Two read-only snapshots that map a byte range of a file to the same physical
extent hold the same bytes there: btrfs never overwrites a shared extent in
place. That lets a publish re-hash only the chunks that changed.
"""

from __future__ import annotations

import fcntl
import struct

FS_IOC_FIEMAP = 0xC020660B
_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQ16xI12x")  # logical, physical, length, flags
_BATCH = 512
_FLAG_SYNC = 0x1

EXTENT_LAST = 0x1
# Extents whose physical address does not identify their bytes on its own:
# unknown or delayed placement, inline data, encoded (compressed) extents
# whose in-extent offset FIEMAP does not report.
_UNRELIABLE = 0x2 | 0x4 | 0x8 | 0x80 | 0x200
# Flags that say nothing about the bytes (last in the list, shared or not).
_IGNORED = EXTENT_LAST | 0x2000

Extent = tuple[int, int, int, int]  # logical, physical, length, flags


def extents(fd: int) -> list[Extent]:
    """All extents of the open file `fd`, in logical order."""
    out: list[Extent] = []
    start = 0
    while True:
        buf = bytearray(_HEADER.size + _EXTENT.size * _BATCH)
        _HEADER.pack_into(buf, 0, start, 0xFFFFFFFFFFFFFFFF, _FLAG_SYNC, 0, _BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        mapped = _HEADER.unpack_from(buf, 0)[3]
        if mapped == 0:
            return out
        for i in range(mapped):
            logical, physical, length, flags = _EXTENT.unpack_from(buf, _HEADER.size + i * _EXTENT.size)
            out.append((logical, physical, length, flags))
        last = out[-1]
        if last[3] & EXTENT_LAST:
            return out
        start = last[0] + last[2]


def window(extent_list: list[Extent], start: int, end: int) -> tuple[Extent, ...] | None:
    """The extents covering [start, end), clipped to it, or None if any of them
    cannot vouch for its bytes. Holes are simply absent, so equal windows mean
    equal bytes, holes included."""
    out = []
    for logical, physical, length, flags in extent_list:
        if logical + length <= start:
            continue
        if logical >= end:
            break
        if flags & _UNRELIABLE:
            return None
        lo, hi = max(start, logical), min(end, logical + length)
        out.append((lo, physical + (lo - logical), hi - lo, flags & ~_IGNORED))
    return tuple(out)
