"""The names an icbd mount shows: the catalogue's iMIs and versions, and each
version's manifest indexed for the kernel.

Inodes are `slot << 32 | index`. Slot 0 is the catalogue level: the root,
/.icbd, and for the k-th iMI seen its folder (16 + 2k) and `latest` (17 + 2k).
Every (iMI, version, manifest digest) seen gets a slot of its own, and entry
i of its manifest is `slot << 32 | i`; entry 0, the manifest's root, is the
version folder. So the version folder has its inode before the manifest is
fetched, an inode needs no table to be resolved, and a version whose content
changed under the same number (an iMI deleted and created again) gets fresh
inodes rather than the kernel's stale caches.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from cache.source import ImiInfo
from replicator.wire import DIR, Manifest

log = logging.getLogger(__name__)


class VersionTree:
    """A version's manifest indexed for the kernel: parents, children, link counts.

    Building it is O(entries) of Python: run it in a worker thread.
    """

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.chunk_size = manifest.chunk_size
        self.entries = manifest.entries
        self.parents = [0] * len(self.entries)
        self.children: dict[int, dict[str, int]] = {}
        index = {}
        for i, entry in enumerate(self.entries):
            index[entry.path] = i
            if entry.type == DIR:
                self.children[i] = {}
            if i == 0:
                continue
            parent = index.get(entry.parent)
            if parent is None or parent not in self.children:
                log.warning("manifest entry %r has no parent folder; hidden", entry.path)
                continue
            self.parents[i] = parent
            self.children[parent][entry.name] = i
        self.subdirs = {
            i: sum(1 for c in kids.values() if self.entries[c].type == DIR)
            for i, kids in self.children.items()
        }
        self.digests = frozenset(manifest.digests())
        self._listings: dict[int, list[tuple[bytes, int]]] = {}

    def listing(self, index: int) -> list[tuple[bytes, int]]:
        """The (name, entry index) pairs of a folder, in a stable order."""
        listing = self._listings.get(index)
        if listing is None:
            kids = self.children.get(index, {})
            listing = self._listings[index] = [(os.fsencode(n), i) for n, i in kids.items()]
        return listing


@dataclass(eq=False)
class Version:
    imi: str
    number: int
    digest: str
    slot: int
    tree: VersionTree | None = None


@dataclass
class Imi:
    name: str
    slot: int
    info: ImiInfo
    mtime_ns: int = field(default_factory=time.time_ns)

    @property
    def dir_inode(self) -> int:
        return 16 + 2 * self.slot

    @property
    def latest_inode(self) -> int:
        return 17 + 2 * self.slot
