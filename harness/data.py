"""Test data for benchmarks: incompressible files made fast, and changes to them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

MIB = 1 << 20


def write_image(path: Path, size: int) -> Path:
    """An incompressible image file of `size` bytes; every MiB differs."""
    block = os.urandom(MIB)
    with open(path, "wb") as f:
        for i in range(size // MIB):
            f.write(i.to_bytes(8, "little") + os.urandom(8) + block[16:])
        f.write(os.urandom(size % MIB))
    return path


def change_image(path: Path, changed: int, spread: int = 16) -> int:
    """Overwrite `changed` bytes of the image in `spread` places; return the
    bytes changed."""
    size = path.stat().st_size
    piece = max(4096, changed // spread)
    done = 0
    with open(path, "r+b") as f:
        for i in range(spread):
            if done >= changed:
                break
            n = min(piece, changed - done)
            f.seek((size // spread) * i)
            f.write(os.urandom(n))
            done += n
    return done


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
