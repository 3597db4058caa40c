"""What a replica, a cache server or a mount believes of the master: its
public key, and the newest catalogue seen. This is the one place where signed
JSON (from the network, or from the node's own disk) becomes a Catalog, a
VersionRecord, a StreamRecord or a Profile; nothing else parses them.

The key is given (`--master-key KEY|FILE`, env ICBD_MASTER_KEY) or, without
one, taken from the master at first contact (`GET /v1/key`) and pinned in the
trust file, with a warning, as SSH's known_hosts does: any other key later is
refused. A key given on the command line replaces a pinned one (the admin
said so) and starts a new history of serials.

What each document must be to be believed:

- a catalogue: signed; a serial at or above the highest seen (the high-water
  mark, kept in the trust file so that it survives restarts; an equal serial
  must be the very same document); every version record in it signed too and
  naming the iMI it is listed under;
- a version record: signed, naming the iMI asked for;
- a stream record: signed, naming the iMI, version and parent asked for, and
  its digest the digest of its pieces;
- a boot profile: signed, naming the iMI asked for, recorded on that version
  or an older one.

Rollback and freeze: the master raises the serial on every change, and every
RESIGN_SECONDS re-signs the catalogue with a fresh `issued`. So a node that
sees no newer catalogue than one issued long ago knows its view is stale: it
keeps serving what it holds (site autonomy), says so in its logs and shows
the age (now - issued) and the serial in its status.

Thread-safe: callers may run the checks in worker threads (a large catalogue
is some milliseconds of JSON and signatures).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

from .catalog import Catalog, Profile
from .errors import CliError
from .layout import Layout
from .manifest import VersionRecord
from .records import read_json, write_json
from .signing import SIGNATURE, PublicKey, Untrusted, canonical
from .wire import (
    KEY_ROUTE,
    STREAM_PIECE,
    InvalidInput,
    check_digest,
    check_name,
    content_digest,
    stream_digest,
)

log = logging.getLogger(__name__)

RESIGN_SECONDS = 60.0  # the master re-signs its catalogue this often (a fresh `issued`)
STALE_AFTER = 3 * RESIGN_SECONDS  # a catalogue issued longer ago than this is stale
_VERIFIED_KEPT = 100_000  # record signatures remembered as good (a catalogue repeats them)


class Rollback(Untrusted):
    """A catalogue older than one already seen (a replay, or a frozen view)."""


@dataclass(frozen=True)
class SignedCatalog:
    catalog: Catalog
    serial: int
    issued: str  # ISO 8601, when the master signed it
    doc: dict = field(compare=False, repr=False)  # exactly as signed, to pass on

    def age(self, now: datetime | None = None) -> float:
        """Seconds since the master signed it (by this host's clock)."""
        now = now or datetime.now().astimezone()
        return (now - _parse_time(self.issued)).total_seconds()


@dataclass(frozen=True)
class StreamRecord:
    """What the master signed of one version stream (a spool)."""

    imi: str
    version: int
    parent: int | None
    stream_id: str
    bytes: int
    digest: str
    piece_size: int
    pieces: tuple[str, ...]


def master_key_argument(args) -> PublicKey | None:
    """`--master-key KEY|FILE` (or ICBD_MASTER_KEY) of a replica, a cache or a mount, if given."""
    value = getattr(args, "master_key", None)
    if not value:
        return None
    try:
        return PublicKey.from_argument(value)
    except Untrusted as error:
        raise CliError(str(error)) from None


def _parse_time(text: object) -> datetime:
    if not isinstance(text, str):
        raise InvalidInput(f"not a time: {text!r}")
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"not an ISO 8601 time: {text[:40]!r}") from None
    if when.tzinfo is None:
        raise InvalidInput(f"a time without its time zone: {text[:40]!r}")
    return when


def _count(doc: dict, key: str, minimum: int = 0) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidInput(f"{key!r} is not a number from {minimum}")
    return value


class Trust:
    """The trust of one node or mount, kept in its data folder (Layout.trust_file);
    `catalog_file`, if given, keeps the newest signed catalogue beside it."""

    def __init__(self, layout: Layout, given: PublicKey | None = None, *, keep_catalog: bool = True):
        self.path = layout.trust_file
        self.catalog_file: Path | None = layout.catalog_file if keep_catalog else None
        self._lock = threading.Lock()
        self._verified: set[str] = set()
        self.current: SignedCatalog | None = None
        self.refused = 0  # documents refused, for status
        self._stale_logged = False
        doc = read_json(self.path, {})
        doc = doc if isinstance(doc, dict) else {}
        pinned = None
        if doc.get("key"):
            try:
                pinned = PublicKey.parse(doc["key"])
            except Untrusted as error:
                log.error("ignoring the key in %s: %s", self.path, error)
        serial = doc.get("serial")
        self.serial = serial if pinned and isinstance(serial, int) and not isinstance(serial, bool) else 0
        self._digest = doc.get("catalog_digest") if pinned else None
        self.how = doc.get("how", "first contact")
        self.key = pinned
        if given is not None and given != pinned:
            if pinned is not None:
                log.warning("--master-key %s replaces the key kept in %s (%s); starting a new history of "
                            "catalogue serials", given.text, self.path, pinned.text)
            self.key, self.how, self.serial, self._digest = given, "given", 0, None
            self._save()
        elif given is not None:
            self.how = "given"

    # --- the key -------------------------------------------------------------------

    def pin(self, text: str, where: str) -> PublicKey:
        """Trust on first use: take the key `where` presented, if none is known yet."""
        presented = PublicKey.parse(text)
        with self._lock:
            if self.key is None:
                self.key, self.how, self.serial, self._digest = presented, "first contact", 0, None
                self._save()
                log.warning("trusting the master key %s presented by %s at first contact and keeping it in %s; "
                            "give --master-key (see `icbd key show`) to check it instead", presented.text,
                            where, self.path)
            elif presented != self.key:
                raise Untrusted(f"{where} presents the master key {presented.text}, not the one this node "
                                f"trusts ({self.key.text}, {self.how}); if the master's key was replaced on "
                                f"purpose, give the new one with --master-key")
        return presented

    async def fetch_key(self, client: httpx.AsyncClient, where: str) -> PublicKey:
        """The trusted key; at first contact, asks `client` (GET /v1/key) and pins the answer."""
        if self.key is not None:
            return self.key
        response = await client.get(KEY_ROUTE)
        response.raise_for_status()
        doc = response.json()
        if not isinstance(doc, dict) or not isinstance(doc.get("key"), str):
            raise Untrusted(f"{where} answered {KEY_ROUTE} without a key")
        return self.pin(doc["key"], where)

    async def explain(self, client: httpx.AsyncClient, where: str) -> str | None:
        """Why signatures fail, if the reason is that `where` now presents
        another key (None if it cannot be asked, or presents ours)."""
        try:
            response = await client.get(KEY_ROUTE)
            response.raise_for_status()
            presented = PublicKey.parse(response.json()["key"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None
        if self.key is not None and presented != self.key:
            return (f"{where} presents the master key {presented.text}, but this node trusts {self.key.text} "
                    f"({self.how}); give the new key with --master-key if the change is wanted")
        return None

    def _require_key(self) -> PublicKey:
        if self.key is None:
            raise Untrusted("no master key yet: give --master-key, or let this node reach the master once")
        return self.key

    # --- documents -----------------------------------------------------------------

    def catalog(self, doc: object) -> SignedCatalog:
        """The catalogue in `doc`, if the master signed it and it is not older
        than the newest seen; raises Untrusted (Rollback) or InvalidInput."""
        current = self.current
        if current is not None and doc == current.doc:
            return current  # the same document again (a poll between two signatures)
        try:
            signed = self._check_catalog(doc)
        except (Untrusted, InvalidInput):
            self.refused += 1
            raise
        with self._lock:
            if signed.serial < self.serial:
                self.refused += 1
                raise Rollback(f"a catalogue with serial {signed.serial}, older than serial {self.serial} "
                               f"seen already: refused (a replay, or a copy frozen in time)")
            digest = content_digest(canonical(signed.doc))
            if signed.serial == self.serial and self._digest not in (None, digest):
                self.refused += 1
                raise Rollback(f"a catalogue with serial {signed.serial} that differs from the one seen "
                               f"with that serial: refused")
            if signed.serial > self.serial or self._digest is None:
                self.serial, self._digest = signed.serial, digest
                self._keep(signed.doc)
            self.current = signed
        return signed

    def _check_catalog(self, doc: object) -> SignedCatalog:
        key = self._require_key()
        key.verify(doc, "catalogue")
        assert isinstance(doc, dict)
        serial = _count(doc, "serial", 1)
        issued = doc.get("issued")
        _parse_time(issued)
        catalog = Catalog.from_json(doc)  # checks the shape: a list of iMIs, each with a list of records
        if len(catalog.imis) != len(doc.get("imis", [])):
            raise InvalidInput("the catalogue lists an iMI twice")
        for raw in doc.get("imis", []):
            name = raw["name"]
            for record in raw.get("versions", []):
                self._check_record(key, record, name)
            if len(catalog.imis[name].versions) != len(raw.get("versions", [])):
                raise InvalidInput(f"the catalogue lists a version of {name} twice")
        return SignedCatalog(catalog, serial, issued, doc)

    def _check_record(self, key: PublicKey, doc: object, imi: str) -> None:
        if not isinstance(doc, dict):
            raise InvalidInput("a version record is not an object")
        # A catalogue repeats records verified before: remember the good ones
        # by what was signed and the signature together (measured: 7 us for
        # the canonical JSON and its hash, 130 us to verify).
        signature = doc.get(SIGNATURE)
        seen = content_digest(canonical(doc) + str(signature).encode())
        if seen not in self._verified:
            key.verify(doc, f"record of {imi} version {doc.get('version')!r}")
            if len(self._verified) >= _VERIFIED_KEPT:
                self._verified.clear()
            self._verified.add(seen)
        if doc.get("imi") != imi:
            raise Untrusted(f"a version record of {doc.get('imi')!r} is listed under {imi!r}")

    def saved_catalog(self) -> SignedCatalog | None:
        """The catalogue kept on disk by an earlier run, checked like any
        other; None if there is none or it does not pass."""
        if self.catalog_file is None or self.key is None:
            return None
        doc = read_json(self.catalog_file)
        if doc is None:
            return None
        try:
            return self.catalog(doc)
        except (Untrusted, InvalidInput) as error:
            log.warning("not using the catalogue kept in %s: %s", self.catalog_file, error)
            return None

    def version_record(self, doc: object, imi: str) -> VersionRecord:
        key = self._require_key()
        self._check_record(key, doc, check_name(imi))
        assert isinstance(doc, dict)
        try:
            return VersionRecord.from_json(doc)
        except (KeyError, TypeError) as error:
            raise InvalidInput(f"a version record is malformed: {error}") from None

    def stream_record(self, doc: object, imi: str, version: int, parent: int | None) -> StreamRecord:
        key = self._require_key()
        what = f"stream record of {imi} version {version}" + (f" from {parent}" if parent else "")
        key.verify(doc, what)
        assert isinstance(doc, dict)
        if (doc.get("imi"), doc.get("version"), doc.get("parent")) != (imi, version, parent):
            raise Untrusted(f"the {what} names {doc.get('imi')!r} version {doc.get('version')!r} "
                            f"from {doc.get('parent')!r}")
        pieces = doc.get("pieces")
        if not isinstance(pieces, list):
            raise InvalidInput(f"the {what} lists no pieces")
        record = StreamRecord(
            imi=imi, version=version, parent=parent, stream_id=str(doc.get("stream_id", "")),
            bytes=_count(doc, "bytes"), digest=check_digest(doc.get("digest")),
            piece_size=_count(doc, "piece_size", 1), pieces=tuple(check_digest(p) for p in pieces),
        )
        if record.digest != stream_digest(record.pieces):
            raise Untrusted(f"the {what}: its digest is not the digest of its pieces")
        if len(record.pieces) != -(-record.bytes // record.piece_size) or record.piece_size != STREAM_PIECE:
            raise InvalidInput(f"the {what}: {len(record.pieces)} pieces of {record.piece_size} bytes "
                               f"for {record.bytes} bytes")
        return record

    def profile(self, doc: object, imi: str, version: int) -> Profile:
        key = self._require_key()
        key.verify(doc, f"boot profile for {imi} version {version}")
        profile = Profile.from_json(doc)
        if profile.imi != imi or profile.recorded_on > version:
            raise Untrusted(f"a boot profile of {profile.imi!r} version {profile.recorded_on} "
                            f"offered for {imi} version {version}")
        assert isinstance(doc, dict)
        return Profile(profile.recorded_on, profile.digests, imi, signed=doc)

    # --- freshness -----------------------------------------------------------------

    def freshness(self) -> dict:
        """The serial and age of the newest catalogue, for status; logs when
        it becomes stale (the master has not been heard for a while) and
        when it is fresh again."""
        current = self.current
        age = round(current.age(), 1) if current else None
        stale = age is not None and age > STALE_AFTER
        if stale and not self._stale_logged:
            log.warning("the newest catalogue (serial %d) was issued %.0f s ago: the master has not been heard "
                        "since; serving what this node holds", current.serial, age)
        elif not stale and self._stale_logged and current is not None:
            log.info("catalogue fresh again (serial %d)", current.serial)
        self._stale_logged = stale
        return {
            "catalog_serial": current.serial if current else None,
            "catalog_issued": current.issued if current else None,
            "catalog_age_s": age,
            "catalog_stale": stale,
            "catalogs_refused": self.refused,
            "master_key": self.key.text if self.key else None,
        }

    # --- the trust file --------------------------------------------------------------

    def _keep(self, doc: dict) -> None:
        """The newest catalogue, then the high-water mark that would refuse an
        older one (so a crash between the two never leaves a mark above the
        catalogue kept). On a full disk the mark holds in memory only."""
        try:
            if self.catalog_file is not None:
                write_json(self.catalog_file, doc)
            self._save()
        except OSError as error:
            log.warning("cannot keep the catalogue of serial %d on disk (%s); its serial is the high-water "
                        "mark in memory only until it can", self.serial, error.strerror or error)

    def _save(self) -> None:
        assert self.key is not None
        write_json(self.path, {"key": self.key.text, "how": self.how, "serial": self.serial,
                               "catalog_digest": self._digest})
