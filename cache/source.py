"""What a FUSE mount reads iMIs from: the catalogue of versions, manifests and
blocks. Two implementations: the site cache server over HTTP (remote.py) and
the same cache embedded in the mount process (site.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from replicator.wire import Manifest, VersionRecord, check_digest


class Unavailable(Exception):
    """No source could deliver the data (all down, timed out or corrupt)."""


@dataclass(frozen=True)
class ImiInfo:
    name: str
    latest: int | None
    versions: dict[int, VersionRecord] = field(default_factory=dict)
    uuid: str = ""

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "uuid": self.uuid,
            "latest": self.latest,
            "versions": [self.versions[v].to_json() for v in sorted(self.versions)],
        }

    @classmethod
    def from_json(cls, doc: dict) -> ImiInfo:
        versions = {int(v["version"]): VersionRecord.from_json(v) for v in doc.get("versions", [])}
        latest = doc.get("latest")
        return cls(
            name=str(doc["name"]),
            latest=int(latest) if latest is not None else None,
            versions=versions,
            uuid=str(doc.get("uuid", "")),
        )


@dataclass(frozen=True)
class Catalog:
    """Every iMI and its published versions, as the master last said."""

    imis: dict[str, ImiInfo] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"imis": [self.imis[n].to_json() for n in sorted(self.imis)]}

    @classmethod
    def from_json(cls, doc: dict) -> Catalog:
        return cls({i["name"]: ImiInfo.from_json(i) for i in doc.get("imis", [])})


@dataclass(frozen=True)
class Profile:
    """A boot profile: the blocks a version's first boot read, in order.
    `recorded_on` is the version it was recorded on; it may be older than
    the version asked for, whose unchanged blocks share its digests."""

    recorded_on: int
    digests: list[str]

    def to_json(self) -> dict:
        return {"recorded_on": self.recorded_on, "digests": self.digests}

    @classmethod
    def from_json(cls, doc: dict) -> Profile:
        digests = doc["digests"]
        if not isinstance(digests, list):
            raise ValueError("profile digests must be a list")
        return cls(recorded_on=int(doc["recorded_on"]), digests=[check_digest(d) for d in digests])


class ImageSource(Protocol):
    async def catalog(self) -> Catalog:
        """The current catalogue; the last one known when upstream is unreachable."""

    async def manifest(self, imi: str, version: int) -> Manifest:
        """The manifest of a version, verified against the catalogue's digest."""

    async def block(self, digest: str, imi: str, version: int) -> bytes:
        """The verified bytes of a block; raises Unavailable. `imi` and
        `version` are hints for choosing an upstream that holds it."""

    async def prefetch(self, digests: list[str], imi: str, version: int) -> None:
        """Start warming these blocks; returns without waiting for them."""

    async def profile(self, imi: str, version: int) -> Profile | None:
        """The recorded boot profile for this version or the nearest older
        one, or None if there is none."""

    async def save_profile(self, imi: str, version: int, digests: list[str]) -> None:
        """Store a recorded boot profile where every site can find it."""
