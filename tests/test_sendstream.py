"""The fault tests' btrfs send stream forger (tests/sendstream.py), on a
stream made here: its CRC32C is btrfs's, and a forged WRITE keeps a valid
CRC while one byte of its file data changes. As any user."""

from __future__ import annotations

import struct

import pytest
from sendstream import (
    SEND_A_DATA,
    SEND_A_FILE_OFFSET,
    SEND_A_PATH,
    SEND_C_MKFILE,
    SEND_C_WRITE,
    command,
    crc32c_raw,
    forge_write,
    stream,
)


def crc_ok(data: bytes, pos: int) -> bool:
    length, cmd, crc = struct.unpack_from("<IHI", data, pos)
    head = bytearray(data[pos:pos + 10])
    head[6:10] = b"\0\0\0\0"
    return crc32c_raw(bytes(head) + data[pos + 10:pos + 10 + length]) == crc


def test_crc32c_is_the_castagnoli_crc():
    # With the usual seed and final inversion, CRC-32C's check value.
    assert crc32c_raw(b"123456789", 0xFFFFFFFF) ^ 0xFFFFFFFF == 0xE3069283
    assert crc32c_raw(b"") == 0


def test_a_forged_write_keeps_its_crc_and_changes_one_data_byte():
    data = bytes(range(200))
    first = command(SEND_C_MKFILE, (SEND_A_PATH, b"a"))
    write = command(SEND_C_WRITE, (SEND_A_PATH, b"a"), (SEND_A_FILE_OFFSET, struct.pack("<Q", 0)),
                    (SEND_A_DATA, data))
    original = stream(first, write)
    write_at = len(original) - len(write)
    assert crc_ok(original, write_at)

    at, patches = forge_write(original, after=0)
    forged = bytearray(original)
    for offset, byte in patches.items():
        forged[offset] = byte
    changed = [i for i in range(len(original)) if forged[i] != original[i]]
    assert at in changed
    assert at - (len(original) - len(data)) == len(data) // 2  # the middle of the file data
    assert set(changed) - {at} <= set(range(write_at + 6, write_at + 10))  # and the command's CRC only
    assert crc_ok(bytes(forged), write_at)
    plain = bytearray(original)
    plain[at] ^= 0x5A
    assert not crc_ok(bytes(plain), write_at)  # without the CRC fixed, btrfs receive would refuse it


def test_no_write_to_forge_is_an_error():
    only = stream(command(SEND_C_MKFILE, (SEND_A_PATH, b"a")))
    with pytest.raises(AssertionError, match="no WRITE command"):
        forge_write(only, after=0)
    write = command(SEND_C_WRITE, (SEND_A_DATA, bytes(100)))
    with pytest.raises(AssertionError, match="no WRITE command"):
        forge_write(stream(write), after=10_000)  # none after that byte
