"""How a process that moves blocks keeps its heap: freed memory is reused,
not handed back to the kernel at once.

A block is 1 MiB; every block that arrives, is hashed, stored and sent on is
a fresh 1 MiB `bytes`. With glibc's defaults such an allocation is an mmap of
its own (or the top of a heap that is trimmed again when freed), so each one
costs 256 page faults to fault in and a munmap or madvise to give back:
measured in a cold sequential read through a cache server, page faults and
madvise were a quarter of the cache server's kernel time and a third of the
mount's. Raising the mmap and trim thresholds keeps freed blocks in the heap
for the next ones: CPU per GB moved fell from 1.5 to 1.3 s (replica), 3.1
to 2.4 s (cache server) and 1.7 to 1.4 s (mount). The heap then holds on to
about what the process had in flight at its busiest, a few tens of MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20  # allocations above this still get their own mmap
TRIM_THRESHOLD = 256 << 20  # free memory at the top of a heap kept up to this


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as the module says; False where it is not glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        log.debug("mallopt refused the thresholds; the heap keeps glibc's defaults")
    return done
