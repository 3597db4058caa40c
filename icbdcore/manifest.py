"""The manifest of a version: every path with its metadata and, for files, the
digests of its chunks; its canonical bytes and their digest; and the record
the master keeps of each published version.
"""

from __future__ import annotations

import bisect
import json
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from .wire import (
    DEFAULT_CHUNK_SIZE,
    InvalidInput,
    check_digest,
    content_digest,
    parse_version,
)

# 2: chunks and the manifest itself named by BLAKE3-256. Format 1 (xxh3-128)
# is never read as a manifest: a master converts it (replicator/conversion.py).
MANIFEST_FORMAT = 2
# The largest manifest any tier takes. A tree of 100k files or a 1 TiB image in
# 1 MiB chunks needs a few tens of MB; anything larger is refused before it is parsed.
MAX_MANIFEST = 64 << 20
FILE, DIR, SYMLINK = "file", "dir", "symlink"
_SPECIAL = {"chardev": stat.S_IFCHR, "blockdev": stat.S_IFBLK, "fifo": stat.S_IFIFO, "socket": stat.S_IFSOCK}
TYPES = (FILE, DIR, SYMLINK, *_SPECIAL)
_IFMT = {FILE: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK, **_SPECIAL}


def type_of_mode(mode: int) -> str:
    for name, ifmt in _IFMT.items():
        if stat.S_IFMT(mode) == ifmt:
            return name
    raise InvalidInput(f"unknown file type in mode {mode:o}")


def check_relpath(path: object) -> str:
    """A path inside an iMI: relative, '/'-separated, no empty, '.' or '..' part.

    The root itself is the empty string. File names are bytes on Linux; they
    travel as str decoded with surrogateescape (os.fsdecode), which JSON keeps.
    """
    if not isinstance(path, str) or "\0" in path:
        raise InvalidInput(f"invalid path {path!r}")
    if path == "":
        return path
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise InvalidInput(f"invalid path {path!r}")
    return path


@dataclass(frozen=True, slots=True)
class Entry:
    """One path of a version, with its metadata and, for files, its chunks."""

    path: str
    type: str
    mode: int  # permission bits only (stat.S_IMODE)
    uid: int
    gid: int
    size: int
    mtime_ns: int
    target: str | None = None  # symlink target
    rdev: int = 0  # device number of character and block devices
    chunks: tuple[str, ...] = field(default=())
    # A small file whose bytes also sit in a pack (Manifest.packs): (pack index,
    # offset in the pack). Its own chunk stays named in `chunks`.
    pack: tuple[int, int] | None = None

    @property
    def st_mode(self) -> int:
        return _IFMT[self.type] | self.mode

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> str:
        return self.path.rsplit("/", 1)[0] if "/" in self.path else ""

    def chunk_span(self, index: int, chunk_size: int) -> tuple[int, int]:
        """Byte offset and length of chunk `index` of this file."""
        start = index * chunk_size
        return start, min(chunk_size, self.size - start)

    def to_json(self) -> dict:
        doc: dict = {
            "path": self.path,
            "type": self.type,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
        }
        if self.type == SYMLINK:
            doc["target"] = self.target
        if self.type in ("chardev", "blockdev"):
            doc["rdev"] = self.rdev
        if self.type == FILE:
            doc["chunks"] = list(self.chunks)
        if self.pack is not None:
            doc["pack"] = list(self.pack)
        return doc

    @classmethod
    def from_json(cls, doc: object, chunk_size: int) -> Entry:
        if not isinstance(doc, dict):
            raise InvalidInput("manifest entry is not an object")
        try:
            kind = doc["type"]
            if kind not in TYPES:
                raise InvalidInput(f"unknown entry type {kind!r}")
            ints = {k: doc[k] for k in ("mode", "uid", "gid", "size", "mtime_ns")}
            for key, value in ints.items():
                if not isinstance(value, int) or isinstance(value, bool):
                    raise InvalidInput(f"manifest entry field {key!r} is not an integer")
            if not 0 <= ints["mode"] <= 0o7777 or ints["size"] < 0:
                raise InvalidInput("manifest entry has a bad mode or size")
            chunks = tuple(check_digest(d) for d in doc.get("chunks", ()))
            if kind == FILE and len(chunks) != -(-ints["size"] // chunk_size):
                raise InvalidInput(f"manifest entry {doc['path']!r}: chunk count does not match size")
            target = doc.get("target")
            if kind == SYMLINK and not isinstance(target, str):
                raise InvalidInput(f"manifest entry {doc['path']!r}: symlink without target")
            rdev = doc.get("rdev", 0)
            if not isinstance(rdev, int):
                raise InvalidInput("manifest entry rdev is not an integer")
            pack = doc.get("pack")
            if pack is not None:
                if (kind != FILE or not isinstance(pack, list) or len(pack) != 2
                        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in pack)):
                    raise InvalidInput(f"manifest entry {doc['path']!r}: a bad pack reference")
                pack = (pack[0], pack[1])
            return cls(
                pack=pack,
                path=check_relpath(doc["path"]),
                type=kind,
                target=target if kind == SYMLINK else None,
                rdev=rdev,
                chunks=chunks,
                **ints,
            )
        except KeyError as missing:
            raise InvalidInput(f"manifest entry lacks {missing}") from None


@dataclass(frozen=True, slots=True)
class Pack:
    """Small files' bytes side by side, in path order (see manifest_builder's
    packing): one block a reader fetches for many small files."""

    digest: str
    size: int

    def to_json(self) -> dict:
        return {"digest": self.digest, "size": self.size}


@dataclass(slots=True)
class Manifest:
    """Every path of one version, sorted by path; the root directory is path ''."""

    chunk_size: int
    entries: list[Entry]
    packs: list[Pack] = field(default_factory=list)

    def canonical(self) -> bytes:
        """The bytes the digest is taken over (and that travel on the wire)."""
        doc = {
            "format": MANIFEST_FORMAT,
            "chunk_size": self.chunk_size,
            "entries": [e.to_json() for e in self.entries],
        }
        if self.packs:
            doc["packs"] = [p.to_json() for p in self.packs]
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        return content_digest(self.canonical())

    @classmethod
    def from_bytes(cls, raw: bytes, expect_digest: str | None = None) -> Manifest:
        """Parse and validate a manifest; check it against `expect_digest` if given."""
        if len(raw) > MAX_MANIFEST:
            raise InvalidInput(f"manifest larger than {MAX_MANIFEST} bytes")
        if expect_digest is not None and content_digest(raw) != expect_digest:
            raise InvalidInput("manifest does not match its digest")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise InvalidInput(f"manifest is not valid JSON: {error}") from None
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise InvalidInput("not an icbd manifest of a known format")
        chunk_size = doc.get("chunk_size")
        if not isinstance(chunk_size, int) or not 4096 <= chunk_size <= 64 << 20:
            raise InvalidInput("manifest chunk_size out of range")
        entries = doc.get("entries")
        if not isinstance(entries, list):
            raise InvalidInput("manifest entries missing")
        manifest = cls(chunk_size, [Entry.from_json(e, chunk_size) for e in entries], _packs(doc.get("packs", [])))
        paths = [e.path for e in manifest.entries]
        if paths != sorted(set(paths)) or not paths or paths[0] != "":
            raise InvalidInput("manifest paths are not unique, sorted and rooted")
        for entry in manifest.files():
            if entry.pack is not None:
                index, offset = entry.pack
                if index >= len(manifest.packs) or offset + entry.size > manifest.packs[index].size:
                    raise InvalidInput(f"manifest entry {entry.path!r}: its pack reference is out of range")
        return manifest

    def files(self) -> Iterator[Entry]:
        return (e for e in self.entries if e.type == FILE)

    def digests(self) -> set[str]:
        """Every block this version is made of: file chunks and packs."""
        return {d for e in self.files() for d in e.chunks} | {p.digest for p in self.packs}

    def blocks_of(self, entry: Entry) -> tuple[str, ...]:
        """The blocks a reader of this file fetches: its pack, or its chunks."""
        if entry.pack is not None:
            return (self.packs[entry.pack[0]].digest,)
        return entry.chunks

    def read_set(self) -> list[str]:
        """The blocks a reader of the whole version fetches, in path order:
        each pack once (for its small files), the chunks of the other files."""
        out: dict[str, None] = {}
        for entry in self.files():
            out.update(dict.fromkeys(self.blocks_of(entry)))
        return list(out)

    def block_sizes(self) -> dict[str, int]:
        """The size of each block of the read set, in its order."""
        sizes: dict[str, int] = {}
        for entry in self.files():
            if entry.pack is not None:
                pack = self.packs[entry.pack[0]]
                sizes[pack.digest] = pack.size
                continue
            for index, digest in enumerate(entry.chunks):
                sizes[digest] = entry.chunk_span(index, self.chunk_size)[1]
        return sizes

    def pack_of(self, entry: Entry) -> tuple[Pack, int] | None:
        """The pack holding a packed file's bytes, and where in it they start."""
        if entry.pack is None:
            return None
        return self.packs[entry.pack[0]], entry.pack[1]

    @property
    def bytes(self) -> int:
        return sum(e.size for e in self.files())

    def find(self, path: str) -> Entry | None:
        """The entry at `path` (binary search: entries are sorted)."""
        i = bisect.bisect_left(self.entries, path, key=lambda e: e.path)
        if i < len(self.entries) and self.entries[i].path == path:
            return self.entries[i]
        return None


def _packs(doc: object) -> list[Pack]:
    if not isinstance(doc, list):
        raise InvalidInput("manifest packs are not a list")
    packs = []
    for item in doc:
        if not isinstance(item, dict) or not isinstance(item.get("size"), int) or isinstance(item.get("size"), bool):
            raise InvalidInput("a manifest pack is not an object with a digest and a size")
        if not 0 < item["size"] <= 64 << 20:
            raise InvalidInput("a manifest pack's size is out of range")
        packs.append(Pack(check_digest(item.get("digest")), item["size"]))
    return packs


@dataclass(frozen=True)
class VersionRecord:
    """What the master records of a published version (its JSON shape is in
    docs/API.md). The master signs it (`imi` and `signature`); a record from
    anywhere else is believed only through icbdcore.trust."""

    version: int
    digest: str  # the manifest's digest: it names the version's content
    bytes: int = 0
    created: str = ""  # ISO 8601
    message: str = ""
    chunk_size: int = DEFAULT_CHUNK_SIZE
    imi: str = ""  # the iMI it belongs to (signed with it: a record cannot be moved to another iMI)
    signature: str = ""

    def to_json(self) -> dict:
        """The record as signed: to_json() of a record parsed from a signed
        document is that document again, so its signature still holds."""
        doc = {
            "version": self.version,
            "digest": self.digest,
            "bytes": self.bytes,
            "created": self.created,
            "message": self.message,
            "chunk_size": self.chunk_size,
        }
        if self.imi:
            doc["imi"] = self.imi
        if self.signature:
            doc["signature"] = self.signature
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> VersionRecord:
        values = {"bytes": doc.get("bytes", 0), "chunk_size": doc.get("chunk_size", DEFAULT_CHUNK_SIZE)}
        for key, value in values.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidInput(f"a version record's {key!r} is not a number of bytes")
        texts = {k: doc.get(k, "") for k in ("created", "message", "imi", "signature")}
        for key, value in texts.items():
            if not isinstance(value, str):
                raise InvalidInput(f"a version record's {key!r} is not a string")
        return cls(
            version=parse_version(doc["version"]),
            digest=check_digest(doc["digest"]),
            **values,
            **texts,
        )
