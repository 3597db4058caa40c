"""What a FUSE mount reads iMIs from: the catalogue of versions, manifests and
blocks. Two implementations: the site cache server over HTTP
(cache/remote.py) and the same cache embedded in the mount process
(cache/site.py).
"""

from __future__ import annotations

from typing import Protocol

from .catalog import Catalog, Profile
from .manifest import Manifest


class Unavailable(Exception):
    """No source could deliver the data (all down, timed out or corrupt)."""


class ImageSource(Protocol):
    async def catalog(self) -> Catalog:
        """The current catalogue; the last one known when upstream is unreachable."""

    async def manifest(self, imi: str, version: int) -> Manifest:
        """The manifest of a version, verified against the catalogue's digest."""

    async def block(self, digest: str, imi: str, version: int) -> bytes:
        """The verified bytes of a block; raises Unavailable. `imi` and
        `version` are hints for choosing an upstream that holds it."""

    async def blocks(self, digests: list[str], imi: str, version: int) -> list[bytes | None]:
        """The verified bytes of several blocks, in order, None for one the
        source could not deliver (a run of blocks in few requests)."""

    async def prefetch(self, digests: list[str], imi: str, version: int) -> None:
        """Start warming these blocks; returns without waiting for them."""

    async def profile(self, imi: str, version: int) -> Profile | None:
        """The recorded boot profile for this version or the nearest older
        one, or None if there is none."""

    def status(self) -> dict:
        """What the source says of itself for the mount's status (which
        server it reads through, failovers, ...)."""

    async def save_profile(self, imi: str, version: int, digests: list[str]) -> bool:
        """Store a recorded boot profile where every site can find it; False
        if one was recorded on this version already (the first one stays)."""
