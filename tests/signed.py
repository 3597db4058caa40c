"""Documents signed as the master signs them, for tests whose stand-in
peers play the master in this process (tests/fakepeer.py and the like): a
replica, a cache or a mount believes only what the master's key signed
(icbdcore/trust.py), so a stand-in signs with a key made for the test and
the node under test is given its public half (`--master-key`)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from icbdcore.manifest import VersionRecord
from icbdcore.signing import SigningKey


def master_key(folder: Path) -> SigningKey:
    return SigningKey.load_or_create(folder / "master-keys")


def record(key: SigningKey, imi: str, version: int, digest: str, **fields) -> dict:
    """A version record of `imi`, signed; `fields` add to or replace its members."""
    doc = VersionRecord(version=version, digest=digest, imi=imi).to_json()
    doc.update(fields)
    return key.sign(doc)


def imi(name: str, records: list[dict], *, latest: object = None, uuid: str = "u1") -> dict:
    """An iMI's entry in the catalogue (its records signed already)."""
    if latest is None and records:
        latest = max(r["version"] for r in records)
    return {"name": name, "uuid": uuid, "latest": latest, "versions": records}


def catalogue(key: SigningKey, imis: list[dict], serial: int = 1) -> dict:
    """The catalogue as `GET /v1/imis` serves it: signed, with its serial and when it was issued."""
    return key.sign({"imis": imis, "serial": serial, "issued": datetime.now(UTC).isoformat(timespec="seconds")})


def profile(key: SigningKey, imi: str, recorded_on: int, digests: list[str]) -> dict:
    return key.sign({"imi": imi, "recorded_on": recorded_on, "digests": digests})
