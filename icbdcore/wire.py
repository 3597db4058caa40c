"""The contract of what crosses a process boundary: iMI names, node ids,
sites, version numbers and digests, how each is checked, and the HTTP API's
paths and headers. Every other module imports these; none spells a route, a
header or a name rule of its own. Manifests are in manifest.py.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import quote, urlsplit

import blake3

API = "/v1"
DEFAULT_CHUNK_SIZE = 1 << 20

# Objects named by their digest (blocks, manifests, boot profiles, version
# streams) never change, so every tier (and any stock HTTP cache between
# tiers: nginx, Squid, Varnish, a CDN) may keep them forever.
IMMUTABLE = "public, max-age=31536000, immutable"
# Every other answer (control calls: heartbeats, the catalogue, registration,
# status, errors) must never be kept by a shared cache.
NO_STORE = "no-store"
# What a name maps to now (a version's manifest or boot profile by version
# number): a cache may keep it, but asks again (If-None-Match) before each use.
REVALIDATE = "no-cache"

ROLES = ("master", "replica", "cache")

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}\Z")
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_SITE = _NODE_ID
# BLAKE3-256, as 64 lowercase hex digits: every object that crosses a trust
# boundary (a block, a manifest, a stream and its pieces) is named this way.
# Measured here: BLAKE3 8 GB/s on 1 MiB (one thread, AVX2), SHA-256 1.9 GB/s
# (SHA-NI), xxh3 66 GB/s; xxh3 is kept only where nothing crosses a boundary
# (the cache's local re-check of stored blocks, cache/blockstore.py).
DIGEST_HEX = 64
_DIGEST = re.compile(r"[0-9a-f]{64}\Z")
# Version numbers are positive and fit the 32-bit range every tool handles.
MAX_VERSION = 2**31 - 1


class InvalidInput(ValueError):
    """A name, number or document from outside failed validation."""


class Refused(Exception):
    """A request refused with an HTTP status and a one-line reason; a 503
    may say when to ask again (Retry-After, in seconds)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


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


_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z")
MAX_URL = 512


def check_node_url(url: object) -> str:
    """A node's URL as others will call it: http or https, a host name or an IP
    address, an optional port from 1 to 65535, and nothing else (no user, no
    path but an empty one, no query, no fragment). A URL that points a node's
    callers anywhere but at a node's root is refused."""
    if not isinstance(url, str) or not url.isascii() or not url.isprintable() or len(url) > MAX_URL:
        raise InvalidInput(f"invalid node URL {str(url)[:100]!r}: an http:// or https:// URL of printable ASCII")
    problem = _url_problem(url)
    if problem:
        raise InvalidInput(f"invalid node URL {url!r}: {problem}")
    return url


def _url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "its host or port is malformed (the port must be a number from 1 to 65535)"
    if parts.scheme not in ("http", "https"):
        return "the scheme must be http or https"
    if "@" in parts.netloc:
        return "it must not hold a user name or password"
    if parts.path:
        return "it must not have a path (give the node's root: SCHEME://HOST[:PORT])"
    if "?" in url or "#" in url:
        return "it must not have a query or a fragment"
    if port == 0 or parts.netloc.endswith(":"):
        return "its port is not a number from 1 to 65535"
    host = parts.hostname
    if not host:
        return "it has no host"
    if not _is_host(host, bracketed=parts.netloc.startswith("[")):
        return f"{host!r} is neither a host name nor an IP address"
    return None


def _is_host(host: str, bracketed: bool) -> bool:
    if bracketed:
        try:
            return ipaddress.ip_address(host).version == 6
        except ValueError:
            return False
    return bool(_HOSTNAME.match(host))


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
        raise InvalidInput(f"invalid digest {str(digest)[:80]!r}: {DIGEST_HEX} lowercase hex digits (BLAKE3-256)")
    return digest


def content_digest(data: bytes | memoryview) -> str:
    """The name of an immutable object (a block, a manifest, a piece of a
    stream): the BLAKE3-256 of its bytes, as hex."""
    return blake3.blake3(data).hexdigest()


# A version stream is named by the digest of its pieces' digests: the master
# hashes each 4 MiB piece once as `btrfs send` produces it (a piece read back
# from its spool is checked against that digest before it is sent again), and
# the whole stream's digest costs one more hash of 32 bytes per piece instead
# of a second pass over every byte.
STREAM_PIECE = 4 << 20


def stream_digest(pieces: Iterable[str]) -> str:
    """A stream's digest from the digests of its STREAM_PIECE pieces, in order."""
    hasher = blake3.blake3()
    for piece in pieces:
        hasher.update(bytes.fromhex(piece))
    return hasher.hexdigest()


class StreamHasher:
    """The digest of a stream that arrives in parts of any size (as the
    master computes it: stream_digest over STREAM_PIECE pieces)."""

    def __init__(self, piece_size: int = STREAM_PIECE):
        self.piece_size = piece_size
        self.pieces: list[str] = []
        self._piece = blake3.blake3()
        self._filled = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), self.piece_size - self._filled)
            self._piece.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.piece_size:
                self.pieces.append(self._piece.hexdigest())
                self._piece = blake3.blake3()
                self._filled = 0

    def hexdigest(self) -> str:
        last = [self._piece.hexdigest()] if self._filled else []
        return stream_digest([*self.pieces, *last])


def error_body(message: str) -> dict:
    """The JSON body of every error response."""
    return {"error": message}


# --- the HTTP API --------------------------------------------------------------
# Route templates (for the servers) and path builders (for the clients) side by
# side, so that a route and the URLs that reach it cannot drift apart.

NODE_HEADER = "X-Icbd-Node"  # the calling node's id, on node-to-node calls
DIGEST_HEADER = "X-Icbd-Digest"  # the digest of an immutable object in the body
# One id per transfer or block fetch, made at its first hop and passed on to
# every node it involves, which log it as rid=... (icbdcore/logs.py).
REQUEST_ID_HEADER = "X-Request-Id"
# A batch of blocks (BLOCKS_ROUTE): the size of each block asked for, in the
# order asked, "-" for one the node does not deliver; the body is the
# delivered blocks one after the other.
BLOCK_SIZES_HEADER = "X-Icbd-Block-Sizes"
# The most blocks one batch may ask for: 16 blocks of 1 MiB, a third of a ms
# of per-request work on each hop, spread over 16 MiB.
MAX_BATCH = 16

IMIS_ROUTE = API + "/imis"
IMI_ROUTE = IMIS_ROUTE + "/{name}"
PUBLISH_ROUTE = IMI_ROUTE + "/versions"
ROLLBACK_ROUTE = IMI_ROUTE + "/rollback"
UPDATE_ROUTE = IMI_ROUTE + "/update"
VERSION_ROUTE = IMI_ROUTE + "/versions/{version}"
MANIFEST_ROUTE = VERSION_ROUTE + "/manifest"
STREAM_ROUTE = VERSION_ROUTE + "/stream"
STREAM_DIGEST_ROUTE = STREAM_ROUTE + "/digest"
PROFILE_ROUTE = VERSION_ROUTE + "/profile"
BLOCKS_ROUTE = API + "/blocks"  # ?d=DIGEST,DIGEST,...: a batch of blocks
BLOCK_ROUTE = BLOCKS_ROUTE + "/{digest}"
# Immutable objects by their digest (blocks above): one URL, one content, forever.
MANIFEST_OBJECT_ROUTE = API + "/manifests/{digest}"
PROFILE_OBJECT_ROUTE = API + "/profiles/{digest}"
STREAM_OBJECT_ROUTE = API + "/streams/{digest}"
NODES_ROUTE = API + "/nodes"
NODE_ROUTE = NODES_ROUTE + "/{node_id}"
HEARTBEAT_ROUTE = NODE_ROUTE + "/heartbeat"
SUBSCRIPTIONS_ROUTE = API + "/subscriptions"
NOTIFY_ROUTE = API + "/notify"
KEY_ROUTE = API + "/key"  # the master's public key (a cache server answers with the key it trusts)
PREFETCH_ROUTE = API + "/prefetch"
PREFETCH_JOB_ROUTE = PREFETCH_ROUTE + "/{job_id}"
AUTH_ROUTE = API + "/auth"
TOKENS_ROUTE = API + "/tokens"
TOKEN_ROUTE = TOKENS_ROUTE + "/{token_name}"
# Open routes (outside /v1/, no credential): Prometheus metrics on every node,
# the status page on the master and the facts it shows.
METRICS_ROUTE = "/metrics"
UI_ROUTE = "/ui"
UI_STATUS_ROUTE = "/ui/status"


def imi_path(name: str) -> str:
    return IMI_ROUTE.format(name=check_name(name))


def publish_path(name: str) -> str:
    return PUBLISH_ROUTE.format(name=check_name(name))


def update_path(name: str) -> str:
    return UPDATE_ROUTE.format(name=check_name(name))


def rollback_path(name: str) -> str:
    return ROLLBACK_ROUTE.format(name=check_name(name))


def version_path(name: str, version: int) -> str:
    return VERSION_ROUTE.format(name=check_name(name), version=parse_version(version))


def manifest_path(name: str, version: int) -> str:
    return MANIFEST_ROUTE.format(name=check_name(name), version=parse_version(version))


def stream_path(name: str, version: int, parent: int | None = None) -> str:
    path = STREAM_ROUTE.format(name=check_name(name), version=parse_version(version))
    return f"{path}?parent={parse_version(parent)}" if parent is not None else path


def stream_digest_path(name: str, version: int, parent: int | None = None) -> str:
    path = STREAM_DIGEST_ROUTE.format(name=check_name(name), version=parse_version(version))
    return f"{path}?parent={parse_version(parent)}" if parent is not None else path


def manifest_object_path(digest: str) -> str:
    return MANIFEST_OBJECT_ROUTE.format(digest=check_digest(digest))


def profile_object_path(digest: str) -> str:
    return PROFILE_OBJECT_ROUTE.format(digest=check_digest(digest))


def stream_object_path(digest: str) -> str:
    return STREAM_OBJECT_ROUTE.format(digest=check_digest(digest))


def profile_path(name: str, version: int) -> str:
    return PROFILE_ROUTE.format(name=check_name(name), version=parse_version(version))


def block_path(digest: str, imi: str | None = None, version: int | None = None) -> str:
    """A block's path; `imi` and `version` are hints for choosing an upstream that holds it."""
    path = BLOCK_ROUTE.format(digest=check_digest(digest))
    hints = []
    if imi is not None:
        hints.append(f"imi={check_name(imi)}")
    if version is not None:
        hints.append(f"version={parse_version(version)}")
    return f"{path}?{'&'.join(hints)}" if hints else path


def blocks_path(digests: Iterable[str], imi: str | None = None, version: int | None = None) -> str:
    """The path of a batch of blocks (at most MAX_BATCH); hints as for block_path."""
    digests = [check_digest(d) for d in digests]
    if not 0 < len(digests) <= MAX_BATCH:
        raise InvalidInput(f"a batch asks for 1 to {MAX_BATCH} blocks, not {len(digests)}")
    query = [f"d={','.join(digests)}"]
    if imi is not None:
        query.append(f"imi={check_name(imi)}")
    if version is not None:
        query.append(f"version={parse_version(version)}")
    return f"{BLOCKS_ROUTE}?{'&'.join(query)}"


def parse_batch(text: str | None) -> list[str]:
    """The digests of a batch's `d` parameter; InvalidInput if it is not 1 to MAX_BATCH digests."""
    digests = (text or "").split(",")
    if not text or len(digests) > MAX_BATCH:
        raise InvalidInput(f"give 1 to {MAX_BATCH} block digests, comma-separated, as d=")
    return [check_digest(d) for d in digests]


def node_path(node_id: str) -> str:
    return NODE_ROUTE.format(node_id=check_node_id(node_id))


def heartbeat_path(node_id: str) -> str:
    return HEARTBEAT_ROUTE.format(node_id=check_node_id(node_id))


def token_path(name: str) -> str:
    return TOKEN_ROUTE.format(token_name=quote(name, safe=""))


def prefetch_job_path(job_id: int) -> str:
    return PREFETCH_JOB_ROUTE.format(job_id=int(job_id))
