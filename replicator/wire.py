"""The wire and manifest formats that every icbd node and client speaks.

This is the one module that defines what crosses a process boundary: iMI names,
version numbers, block digests, the manifest of a version and its digest, the
headers of the HTTP API. Every other module imports it; none re-implements it.
"""

from __future__ import annotations

import bisect
import json
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import xxhash

API = "/v1"
DEFAULT_CHUNK_SIZE = 1 << 20
MANIFEST_FORMAT = 1

# Blocks and manifests never change once published, so every tier (and any
# stock HTTP cache between tiers) may keep them forever.
IMMUTABLE = "public, max-age=31536000, immutable"

NODE_HEADER = "X-Icbd-Node"
STREAM_ID_HEADER = "X-Icbd-Stream-Id"
ROLES = ("master", "replica", "cache")

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}\Z")
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_SITE = _NODE_ID
_DIGEST = re.compile(r"[0-9a-f]{32}\Z")
# Version numbers are positive and fit the 32-bit range every tool handles.
MAX_VERSION = 2**31 - 1


class InvalidInput(ValueError):
    """A name, number or document from outside failed validation."""


class Refused(Exception):
    """A request refused with an HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def check_name(name: object) -> str:
    """Return `name` if it is a valid iMI name, else raise InvalidInput."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidInput(
            f"invalid iMI name {name!r}: use 1-64 of a-z 0-9 . _ -, starting with a letter or digit"
        )
    return name


def check_node_id(node_id: object) -> str:
    if not isinstance(node_id, str) or not _NODE_ID.match(node_id):
        raise InvalidInput(f"invalid node id {node_id!r}: use 1-64 of A-Z a-z 0-9 . _ -")
    return node_id


def check_site(site: object) -> str:
    if not isinstance(site, str) or not _SITE.match(site):
        raise InvalidInput(f"invalid site {site!r}: use 1-64 of A-Z a-z 0-9 . _ -")
    return site


def check_role(role: object) -> str:
    if role not in ROLES:
        raise InvalidInput(f"invalid role {role!r}: one of {', '.join(ROLES)}")
    return role  # type: ignore[return-value]


def parse_version(value: object) -> int:
    """A version number from a path, a query or a JSON body."""
    if isinstance(value, bool):
        raise InvalidInput(f"invalid version {value!r}")
    if isinstance(value, str):
        if not value.isascii() or not value.isdigit() or len(value) > 10:
            raise InvalidInput(f"invalid version {value!r}: a number from 1 to {MAX_VERSION}")
        value = int(value)
    if not isinstance(value, int) or not 1 <= value <= MAX_VERSION:
        raise InvalidInput(f"invalid version {value!r}: a number from 1 to {MAX_VERSION}")
    return value


def check_digest(digest: object) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise InvalidInput(f"invalid digest {digest!r}: 32 lowercase hex digits")
    return digest


def block_digest(data: bytes | memoryview) -> str:
    """The name of a block: the xxh3-128 digest of its bytes, as hex."""
    return xxhash.xxh3_128_hexdigest(data)


def stream_hasher() -> xxhash.xxh3_128:
    """The running digest of a version stream (same function as blocks)."""
    return xxhash.xxh3_128()


# --- manifests -----------------------------------------------------------

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
            return cls(
                path=check_relpath(doc["path"]),
                type=kind,
                target=target if kind == SYMLINK else None,
                rdev=rdev,
                chunks=chunks,
                **ints,
            )
        except KeyError as missing:
            raise InvalidInput(f"manifest entry lacks {missing}") from None


@dataclass(slots=True)
class Manifest:
    """Every path of one version, sorted by path; the root directory is path ''."""

    chunk_size: int
    entries: list[Entry]

    def canonical(self) -> bytes:
        """The bytes the digest is taken over (and that travel on the wire)."""
        doc = {
            "format": MANIFEST_FORMAT,
            "chunk_size": self.chunk_size,
            "entries": [e.to_json() for e in self.entries],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        return xxhash.xxh3_128_hexdigest(self.canonical())

    @classmethod
    def from_bytes(cls, raw: bytes, expect_digest: str | None = None) -> Manifest:
        """Parse and validate a manifest; check it against `expect_digest` if given."""
        if expect_digest is not None and xxhash.xxh3_128_hexdigest(raw) != expect_digest:
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
        manifest = cls(chunk_size, [Entry.from_json(e, chunk_size) for e in entries])
        paths = [e.path for e in manifest.entries]
        if paths != sorted(set(paths)) or not paths or paths[0] != "":
            raise InvalidInput("manifest paths are not unique, sorted and rooted")
        return manifest

    def files(self) -> Iterator[Entry]:
        return (e for e in self.entries if e.type == FILE)

    def digests(self) -> set[str]:
        return {d for e in self.files() for d in e.chunks}

    @property
    def bytes(self) -> int:
        return sum(e.size for e in self.files())

    def find(self, path: str) -> Entry | None:
        """The entry at `path` (binary search: entries are sorted)."""
        i = bisect.bisect_left(self.entries, path, key=lambda e: e.path)
        if i < len(self.entries) and self.entries[i].path == path:
            return self.entries[i]
        return None


def sort_entries(entries: Iterable[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: e.path)


@dataclass(frozen=True)
class VersionRecord:
    """What the master records of a published version (DESIGN's JSON shape)."""

    version: int
    digest: str  # the manifest's digest: it names the version's content
    bytes: int = 0
    created: str = ""  # ISO 8601
    message: str = ""
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "digest": self.digest,
            "bytes": self.bytes,
            "created": self.created,
            "message": self.message,
            "chunk_size": self.chunk_size,
        }

    @classmethod
    def from_json(cls, doc: dict) -> VersionRecord:
        return cls(
            version=parse_version(doc["version"]),
            digest=check_digest(doc["digest"]),
            bytes=int(doc.get("bytes", 0)),
            created=str(doc.get("created", "")),
            message=str(doc.get("message", "")),
            chunk_size=int(doc.get("chunk_size", DEFAULT_CHUNK_SIZE)),
        )


def error_body(message: str) -> dict:
    """The JSON body of every error response."""
    return {"error": message}
