"""The catalogue: every iMI and its published versions, as the master says.

One type for every holder: the master builds it from its repository and
serves it (`GET /v1/imis`, and per subscription in heartbeat replies), a
replica keeps the part it subscribes to, a cache keeps it for its site, and
a mount shows it as folders. Everything parsed from the network is checked
here, so a malformed answer is one InvalidInput, never a crash further on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .manifest import VersionRecord
from .wire import InvalidInput, check_digest, check_name, parse_version


@dataclass(frozen=True)
class ImiInfo:
    name: str
    latest: int | None
    versions: dict[int, VersionRecord] = field(default_factory=dict)
    uuid: str = ""
    created: str = ""

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "uuid": self.uuid,
            "created": self.created,
            "latest": self.latest,
            "versions": [self.versions[v].to_json() for v in sorted(self.versions)],
        }

    @classmethod
    def from_json(cls, doc: object) -> ImiInfo:
        if not isinstance(doc, dict):
            raise InvalidInput("an iMI in the catalogue is not an object")
        versions_doc = doc.get("versions", [])
        if not isinstance(versions_doc, list):
            raise InvalidInput("an iMI's versions are not a list")
        try:
            records = [VersionRecord.from_json(v) for v in versions_doc]
        except (KeyError, TypeError, ValueError, OverflowError) as error:  # "bytes": 1e400 is inf
            raise InvalidInput(f"a version record in the catalogue is malformed: {error}") from None
        latest = doc.get("latest")
        latest = parse_version(latest) if latest is not None else None  # "3" is 3, not a string
        versions = {r.version: r for r in records}
        if latest is not None and latest not in versions:
            raise InvalidInput(f"the catalogue's latest {latest!r} is not one of its versions")
        return cls(
            name=check_name(doc.get("name")),
            latest=latest,
            versions=versions,
            uuid=str(doc.get("uuid", "")),
            created=str(doc.get("created", "")),
        )

    def newest(self, count: int) -> list[int]:
        """The `count` highest version numbers, ascending."""
        return sorted(self.versions)[-count:] if count > 0 else []


@dataclass(frozen=True)
class Catalog:
    """Every iMI (or, at a replica, every subscribed iMI) by name."""

    imis: dict[str, ImiInfo] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"imis": [self.imis[n].to_json() for n in sorted(self.imis)]}

    @classmethod
    def from_json(cls, doc: object) -> Catalog:
        if not isinstance(doc, dict) or not isinstance(doc.get("imis", []), list):
            raise InvalidInput("a catalogue is an object with a list of 'imis'")
        infos = [ImiInfo.from_json(i) for i in doc.get("imis", [])]
        return cls({i.name: i for i in infos})

    def record(self, imi: str, version: int) -> VersionRecord | None:
        info = self.imis.get(imi)
        return info.versions.get(version) if info else None


@dataclass(frozen=True)
class Profile:
    """A boot profile: the blocks a version's first boot read, in order.
    `recorded_on` is the version it was recorded on; it may be older than
    the version asked for, whose unchanged blocks share its digests. The
    master signs it when it stores it; `signed` is that document, passed on
    as it is by caches (see icbdcore.trust)."""

    recorded_on: int
    digests: list[str]
    imi: str = ""
    signed: dict | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict:
        if self.signed is not None:
            return self.signed
        return {"imi": self.imi, "recorded_on": self.recorded_on, "digests": self.digests}

    @classmethod
    def from_json(cls, doc: object) -> Profile:
        if not isinstance(doc, dict) or not isinstance(doc.get("digests"), list):
            raise InvalidInput("a boot profile is an object with a list of 'digests'")
        imi = doc.get("imi", "")
        return cls(recorded_on=parse_version(doc.get("recorded_on")),
                   digests=[check_digest(d) for d in doc["digests"]],
                   imi=check_name(imi) if imi else "")
