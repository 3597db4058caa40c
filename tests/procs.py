"""What /proc says about a node's processes (for tests that freeze or kill
a node's `btrfs receive`, or read a daemon's command line)."""

from __future__ import annotations

import contextlib
import os


def children(pid: int) -> list[int]:
    """The pids of `pid`'s children (every thread's), [] once it is gone."""
    kids = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
    return kids


def cmdline(pid: int) -> bytes:
    """The process's command line, NUL-separated; b"" once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""
