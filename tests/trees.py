"""Sample iMI trees with the awkward cases, and a faithful comparison of two trees."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import xxhash


def make_tree(root: Path, seed: int = 1, big: int = 3 << 20) -> Path:
    """A tree with symlinks, odd modes, empty files, spaces, non-ASCII names,
    a multi-chunk file, a sparse file, a fifo and a device node."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text(f"desktop-{seed}\n")
    (root / "etc" / "empty").write_bytes(b"")
    (root / "dir with spaces" / "ünïcödé ✓").mkdir(parents=True)
    (root / "dir with spaces" / "ünïcödé ✓" / "file name.txt").write_text("spaces and unicode\n")
    (root / "bin").mkdir()
    tool = root / "bin" / "tool"
    tool.write_bytes(b"#!/bin/sh\necho tool\n")
    tool.chmod(0o4755)
    secret = root / "etc" / "secret"
    secret.write_text("only root\n")
    secret.chmod(0o600)
    os.chown(secret, 1000, 1001)
    (root / "bin" / "link-to-tool").symlink_to("tool")
    (root / "dangling").symlink_to("/nowhere/at/all")
    (root / "etc" / "abs-link").symlink_to("/etc/hostname")
    data = _pseudo_random(big, seed)
    (root / "big.bin").write_bytes(data)
    with open(root / "sparse.img", "wb") as f:
        f.truncate(4 << 20)
        f.seek(2 << 20)
        f.write(b"middle of a sparse image")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "dir with spaces").chmod(0o750)
    os.utime(root / "etc" / "hostname", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    return root


def _pseudo_random(size: int, seed: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha512(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:size])


def describe(root: Path) -> dict[str, tuple]:
    """Every path under root with its type, mode, owner, size, mtime and content
    digest or link target: two trees are the same iMI iff these are equal."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, ""] if dirpath == str(root) else [*dirnames, *filenames]:
            path = Path(dirpath) / name if name else Path(dirpath)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = xxhash.xxh3_128_hexdigest(f.read())
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                content = st.st_rdev
            else:
                content = None
            mtime = st.st_mtime_ns
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        st.st_size if not stat.S_ISDIR(st.st_mode) else None, mtime, content)
    return out
