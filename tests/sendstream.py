"""The btrfs send stream: enough of its format to forge a command, or a
whole stream, as a man in the middle who knows the format would (for the
fault tests)."""

from __future__ import annotations

import os
import struct

_CRC32C_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC32C_TABLE.append(_c)


def crc32c_raw(data: bytes, crc: int = 0) -> int:
    """CRC32C as btrfs send computes it: seed 0, no final inversion."""
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


# Commands and attributes of stream format 1 (btrfs-progs send.h).
SEND_C_SUBVOL = 1
SEND_C_MKFILE = 3
SEND_C_SYMLINK = 8
SEND_C_RENAME = 9
SEND_C_WRITE = 15
SEND_C_END = 21
SEND_A_UUID = 1
SEND_A_CTRANSID = 2
SEND_A_INO = 3
SEND_A_PATH = 15
SEND_A_PATH_TO = 16
SEND_A_PATH_LINK = 17
SEND_A_FILE_OFFSET = 18
SEND_A_DATA = 19


def command(cmd: int, *tlvs: tuple[int, bytes]) -> bytes:
    """One command with its CRC32C (computed with the CRC field zeroed)."""
    payload = b"".join(struct.pack("<HH", kind, len(value)) + value for kind, value in tlvs)
    head = struct.pack("<IHI", len(payload), cmd, 0)
    return struct.pack("<IHI", len(payload), cmd, crc32c_raw(head + payload)) + payload


def stream(*commands: bytes) -> bytes:
    """A format-1 stream of these commands."""
    return b"btrfs-stream\0" + struct.pack("<I", 1) + b"".join(commands)


def _ino(number: int) -> tuple[int, bytes]:
    return SEND_A_INO, struct.pack("<Q", number)


def subvol(name: str) -> bytes:
    return command(SEND_C_SUBVOL, (SEND_A_PATH, name.encode()), (SEND_A_UUID, os.urandom(16)),
                   (SEND_A_CTRANSID, struct.pack("<Q", 7)))


def mkfile(path: str, ino: int = 300) -> bytes:
    return command(SEND_C_MKFILE, (SEND_A_PATH, path.encode()), _ino(ino))


def symlink(path: str, target: str, ino: int = 301) -> bytes:
    return command(SEND_C_SYMLINK, (SEND_A_PATH, path.encode()), _ino(ino), (SEND_A_PATH_LINK, target.encode()))


def rename(source: str, dest: str) -> bytes:
    return command(SEND_C_RENAME, (SEND_A_PATH, source.encode()), (SEND_A_PATH_TO, dest.encode()))


def write(path: str, data: bytes, offset: int = 0) -> bytes:
    return command(SEND_C_WRITE, (SEND_A_PATH, path.encode()), (SEND_A_FILE_OFFSET, struct.pack("<Q", offset)),
                   (SEND_A_DATA, data))


def end() -> bytes:
    return command(SEND_C_END)


PAYLOAD = b"* * * * * root touch /tmp/owned\n"  # what a hostile stream would drop into /etc/cron.d


def escape_streams(subvolume: str, outside: str, outside_from_subvolume: str) -> dict[str, bytes]:
    """Hostile streams that each create subvolume `subvolume` and then try to
    write a file into the folder `outside` (absolute), which lies outside the
    receive's target; `outside_from_subvolume` is the same folder relative to
    the new subvolume (../../..-style). By name:

    - absolute-symlink: a symlink to `outside` (as one to /etc/cron.d), a file
      made and written through it;
    - relative-symlink: the same through a symlink to ../../..;
    - dotdot-mkfile: a file made and written at a path with `..` parts;
    - dotdot-rename: a file made inside, then renamed out with `..` parts.

    Unconfined, each of the first three leaves a file in `outside`; the file
    names say which. A rename out of the new subvolume fails with EXDEV even
    unconfined (a subvolume is a boundary for rename(2)).
    """
    up = outside_from_subvolume.rstrip("/")
    return {
        "absolute-symlink": stream(subvol(subvolume), symlink("evil", outside), mkfile("evil/by-absolute-symlink"),
                                   write("evil/by-absolute-symlink", PAYLOAD), end()),
        "relative-symlink": stream(subvol(subvolume), symlink("up", up), mkfile("up/by-relative-symlink"),
                                   write("up/by-relative-symlink", PAYLOAD), end()),
        "dotdot-mkfile": stream(subvol(subvolume), mkfile(f"{up}/by-dotdot-mkfile"),
                                write(f"{up}/by-dotdot-mkfile", PAYLOAD), end()),
        "dotdot-rename": stream(subvol(subvolume), mkfile("inside"), write("inside", PAYLOAD),
                                rename("inside", f"{up}/by-dotdot-rename"), end()),
    }


def forge_write(stream: bytes, after: int) -> tuple[int, dict[int, int]]:
    """Find the first WRITE command starting after byte `after`, flip one byte
    of its file data and fix the command's CRC32C, as a man in the middle
    who knows the format would. Returns (the data byte's offset, patches)."""
    assert stream[:13] == b"btrfs-stream\0"
    pos = 17
    while pos < len(stream):
        length, cmd, crc = struct.unpack_from("<IHI", stream, pos)
        payload = stream[pos + 10:pos + 10 + length]
        if cmd == SEND_C_WRITE and pos > after:
            header = bytearray(stream[pos:pos + 10])
            header[6:10] = b"\0\0\0\0"
            assert crc32c_raw(bytes(header) + payload) == crc, "CRC32C check of an untouched command failed"
            tlv = 0
            while tlv < len(payload):
                kind, size = struct.unpack_from("<HH", payload, tlv)
                if kind == SEND_A_DATA and size > 64:
                    at = pos + 10 + tlv + 4 + size // 2
                    forged = bytearray(payload)
                    forged[at - pos - 10] ^= 0x5A
                    new_crc = crc32c_raw(bytes(header) + bytes(forged))
                    patches = {at: stream[at] ^ 0x5A}
                    for i, byte in enumerate(struct.pack("<I", new_crc)):
                        patches[pos + 6 + i] = byte
                    return at, patches
                tlv += 4 + size
        pos += 10 + length
    raise AssertionError("no WRITE command with data in the stream")
