"""The cache's own documents on disk (manifests and boot profiles), kept
within their share of the cache's size bound.

A cache's `--size` bounds everything it keeps: the block store gets the
bound less META_SHARE of it, and the documents here the rest. A manifest
may be tens of MiB and one is kept per version the site reads, so without
a bound of their own they would grow past `--size` with every version.

The least recently used document goes first: a read touches its file's
mtime, so the order outlives a restart. A document larger than the whole
share is not kept (it is served from memory and fetched again next time).
Synchronous: callers run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

from icbdcore.records import read_capped, write_bytes

log = logging.getLogger(__name__)

META_SHARE = 8  # documents get 1/8 of the cache's bound, blocks the rest


class MetaStore:
    def __init__(self, folders: list[Path], bound: int):
        self.folders = folders
        self.bound = bound
        self._lock = threading.Lock()
        self._files: dict[Path, tuple[int, float]] = {}  # path -> (bytes on disk, last use)
        for folder in folders:
            for path in folder.rglob("*"):
                if path.is_file() and not path.name.startswith("."):
                    st = path.stat()
                    self._files[path] = (st.st_size, st.st_mtime)
                elif path.is_file():
                    path.unlink(missing_ok=True)  # a write cut off by a crash
        self.evicted = 0
        with self._lock:
            self._trim()

    @property
    def bytes(self) -> int:
        return sum(size for size, _ in self._files.values())

    def read(self, path: Path, limit: int) -> bytes | None:
        """The document at `path` (at most `limit` bytes), or None; a read
        makes it the most recently used."""
        try:
            data = read_capped(path, limit)
        except FileNotFoundError:
            with self._lock:
                self._files.pop(path, None)
            return None
        except ValueError:
            log.warning("%s is larger than %d bytes; dropping it", path, limit)
            self.drop(path)
            return None
        now = time.time()
        with contextlib.suppress(OSError):  # the order is advisory
            os.utime(path, (now, now))
        with self._lock:
            self._files[path] = (len(data), now)
        return data

    def write(self, path: Path, data: bytes) -> bool:
        """Keep `data` at `path` (replaced whole), evicting the least recently
        used documents to stay within the bound; False if it is not kept."""
        if len(data) > self.bound:
            self.drop(path)
            return False
        write_bytes(path, data)
        with self._lock:
            self._files[path] = (len(data), time.time())
            self._trim(keep=path)
        return True

    def drop(self, path: Path) -> None:
        with self._lock:
            self._files.pop(path, None)
        path.unlink(missing_ok=True)

    def _trim(self, keep: Path | None = None) -> None:
        total = sum(size for size, _ in self._files.values())
        for path, (size, _) in sorted(self._files.items(), key=lambda item: item[1][1]):
            if total <= self.bound:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            del self._files[path]
            total -= size
            self.evicted += 1
            log.debug("evicted %s (%d bytes) to keep the cache's documents within %d bytes", path, size, self.bound)

    def stats(self) -> dict:
        with self._lock:
            return {"bytes": self.bytes, "files": len(self._files), "bound": self.bound, "evicted": self.evicted}
