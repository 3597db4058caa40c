"""The btrfs send stream: enough of its format to forge a command, as a man
in the middle who knows the format would (for the fault tests)."""

from __future__ import annotations

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


SEND_C_WRITE = 15
SEND_A_DATA = 19


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
