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

Slot 0 in full: 1 is the root (the kernel's FUSE_ROOT_ID), 2 the hidden
control folder /.icbd, 3 its `status` file; 4-15 are spare. No iMI name can
collide with `.icbd`: names cannot start with a dot.

`Namespace` holds all of it and nothing else: no FUSE, no network, no clock
but the folders' mtimes. It takes catalogues (`apply`) and answers which
names the kernel must forget; fs.py turns its answers into FUSE replies and
its NotFound into ENOENT. Manifests are loaded by manifests.py.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from icbdcore.catalog import Catalog, ImiInfo
from icbdcore.manifest import DIR, Manifest, VersionRecord
from icbdcore.wire import InvalidInput, check_name, parse_version

log = logging.getLogger(__name__)

ROOT = 1  # pyfuse3.ROOT_INODE
CONTROL_DIR = 2
STATUS_FILE = 3
CONTROL_NAME = ".icbd"
STATUS_NAME = "status"
LATEST = "latest"
SLOT_SHIFT = 32
INDEX_MASK = (1 << SLOT_SHIFT) - 1


class NotFound(LookupError):
    """No such name or inode: ENOENT for the kernel."""


class Change(NamedTuple):
    """What the kernel may hold of an old catalogue and must forget: the name
    `name` in folder `inode` ("entry"), or the attributes of `inode` ("inode",
    `name` empty)."""

    kind: str
    inode: int
    name: str


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
    pack_seen: int = -1  # the last pack a reader entered (reader.py, pack readahead)
    packs_far: int = -1  # the last pack handed to the source's prefetch


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


def inode_of(version: Version, index: int) -> int:
    """The inode of entry `index` of the version's manifest (0: the version folder)."""
    return version.slot << SLOT_SHIFT | index


def is_content(inode: int) -> bool:
    """Whether the inode is inside a version (not at the catalogue level)."""
    return inode >> SLOT_SHIFT != 0


class Namespace:
    """The catalogue as folders, and the inode of every name a mount shows.

    Slots are handed out once and never reused: an iMI deleted and created
    again gets its old folder inodes back, a version its old slot as long as
    its manifest digest is the same.
    """

    def __init__(self) -> None:
        self._imis: dict[str, Imi] = {}  # current catalogue
        self._imi_slots: dict[str, int] = {}  # every iMI ever seen, for stable inodes
        self._imi_by_inode: dict[int, Imi] = {}
        self._versions: dict[tuple[str, int, str], Version] = {}
        self._by_slot: dict[int, Version] = {}

    @property
    def imis(self) -> Mapping[str, Imi]:
        """The iMIs of the current catalogue, by name."""
        return self._imis

    # --- taking a catalogue --------------------------------------------------

    def apply(self, catalog: Catalog) -> list[Change]:
        """Take `catalog`; returns what the kernel may hold of the old one."""
        changes: list[Change] = []
        fresh: dict[str, ImiInfo] = {}
        for name, info in catalog.imis.items():
            try:
                fresh[check_name(name)] = info
            except InvalidInput:
                log.warning("catalogue names an invalid iMI %r; not shown", name)
        for name in sorted(set(self._imis) | set(fresh)):
            old, new = self._imis.get(name), fresh.get(name)
            if new is None:
                del self._imi_by_inode[old.dir_inode], self._imi_by_inode[old.latest_inode]
                del self._imis[name]
                changes.append(Change("entry", ROOT, name))
                continue
            if old is None:
                slot = self._imi_slots.setdefault(name, len(self._imi_slots))
                imi = self._imis[name] = Imi(name, slot, new)
                self._imi_by_inode[imi.dir_inode] = self._imi_by_inode[imi.latest_inode] = imi
                continue  # nothing to invalidate: a failed lookup is not cached (ENOENT)
            if old.info == new:
                continue
            if old.info.latest != new.latest:
                changes.append(Change("entry", old.dir_inode, LATEST))
                changes.append(Change("inode", old.latest_inode, ""))
            for number, vinfo in old.info.versions.items():
                now = new.versions.get(number)
                if now is None or now.digest != vinfo.digest:
                    changes.append(Change("entry", old.dir_inode, str(number)))
            changes.append(Change("inode", old.dir_inode, ""))
            old.info = new
            old.mtime_ns = time.time_ns()
        return changes

    # --- inodes --------------------------------------------------------------

    def version(self, imi: str, record: VersionRecord) -> Version:
        """The version with this record, given a slot the first time it is seen."""
        key = (imi, record.version, record.digest)
        version = self._versions.get(key)
        if version is None:
            slot = len(self._versions) + 1
            version = self._versions[key] = Version(imi, record.version, record.digest, slot)
            self._by_slot[slot] = version
        return version

    def resolve(self, inode: int) -> tuple[Version, int]:
        """The version an inode inside a version belongs to, and its manifest index."""
        version = self._by_slot.get(inode >> SLOT_SHIFT)
        if version is None:
            raise NotFound(inode)
        return version, inode & INDEX_MASK

    def imi_of(self, inode: int) -> Imi:
        """The iMI of a catalogue-level inode (its folder or its `latest`)."""
        imi = self._imi_by_inode.get(inode)
        if imi is None:
            raise NotFound(inode)
        return imi

    def loaded(self) -> Iterator[Version]:
        """Every version seen whose manifest is loaded."""
        return (v for v in self._by_slot.values() if v.tree is not None)

    # --- names at the catalogue level ----------------------------------------

    def lookup(self, parent: int, name: str) -> int:
        """The inode of `name` in a catalogue-level folder (the root, /.icbd,
        an iMI's folder); for a version, its folder's inode.

        Raises NotFound, or NotADirectoryError when `parent` is a `latest`.
        """
        if parent == ROOT:
            if name == CONTROL_NAME:
                return CONTROL_DIR
            imi = self._imis.get(name)
            if imi is None:
                raise NotFound(name)
            return imi.dir_inode
        if parent == CONTROL_DIR:
            if name != STATUS_NAME:
                raise NotFound(name)
            return STATUS_FILE
        imi = self.imi_of(parent)
        if parent != imi.dir_inode:
            raise NotADirectoryError(parent)
        if name == LATEST:
            return imi.latest_inode
        return inode_of(self.version_named(imi, name), 0)

    def version_named(self, imi: Imi, name: str) -> Version:
        """The version of `imi` called `name`; only the canonical spelling: "02"
        naming version 2 would alias a folder."""
        try:
            number = parse_version(name)
        except InvalidInput:
            raise NotFound(name) from None
        record = imi.info.versions.get(number) if str(number) == name else None
        if record is None:
            raise NotFound(name)
        return self.version(imi.name, record)

    def listing(self, folder: int) -> list[tuple[str, int]]:
        """The (name, inode) pairs of a catalogue-level folder, in a stable
        order. The root does not list /.icbd."""
        if folder == ROOT:
            return [(name, imi.dir_inode) for name, imi in sorted(self._imis.items())]
        if folder == CONTROL_DIR:
            return [(STATUS_NAME, STATUS_FILE)]
        imi = self.imi_of(folder)
        if folder != imi.dir_inode:
            raise NotADirectoryError(folder)
        items = [(str(n), inode_of(self.version(imi.name, imi.info.versions[n]), 0))
                 for n in sorted(imi.info.versions)]
        if imi.info.latest is not None:
            items.append((LATEST, imi.latest_inode))
        return items

    def parent(self, inode: int) -> int:
        """The folder holding `inode`. Inside a version, below its folder, the
        version's manifest must be loaded."""
        if not is_content(inode):
            return ROOT
        version, index = self.resolve(inode)
        if index:
            assert version.tree is not None, "load the manifest first"
            return inode_of(version, version.tree.parents[index])
        imi = self._imis.get(version.imi)
        if imi is None:
            raise NotFound(inode)
        return imi.dir_inode
