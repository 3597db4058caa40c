"""The master's key and what the other tiers believe (icbdcore/signing.py,
icbdcore/trust.py), without nodes: documents signed here by a key made on
the fly, checked the way replicas, caches and mounts check them. As any user."""

from __future__ import annotations

import json
import logging
import os
import stat
from datetime import UTC, datetime, timedelta

import pytest

from icbdcore.catalog import Catalog, ImiInfo
from icbdcore.layout import Layout
from icbdcore.manifest import VersionRecord
from icbdcore.signing import PublicKey, SigningKey, Untrusted, canonical
from icbdcore.trust import STALE_AFTER, Rollback, Trust
from icbdcore.wire import STREAM_PIECE, InvalidInput, StreamHasher, content_digest, stream_digest


@pytest.fixture
def key(tmp_path) -> SigningKey:
    return SigningKey.load_or_create(tmp_path / "master" / "keys")


@pytest.fixture
def other(tmp_path) -> SigningKey:
    return SigningKey.load_or_create(tmp_path / "other" / "keys")


def record(key: SigningKey, imi: str, version: int, **changes) -> dict:
    doc = VersionRecord(version, content_digest(f"{imi}{version}".encode()), 1000 * version,
                        "2024-05-01T10:00:00+00:00", f"v{version}", imi=imi).to_json()
    doc.update(changes)
    return key.sign(doc)


def catalogue(key: SigningKey, serial: int, versions: int = 2, *, issued: datetime | None = None,
              records: list[dict] | None = None) -> dict:
    records = records if records is not None else [record(key, "demo", v) for v in range(1, versions + 1)]
    imi = {"name": "demo", "uuid": "u" * 32, "created": "2024-05-01T10:00:00+00:00",
           "latest": records[-1]["version"] if records else None, "versions": records}
    when = (issued or datetime.now(UTC)).isoformat(timespec="seconds")
    return key.sign({"imis": [imi], "serial": serial, "issued": when})


def trust_in(tmp_path, name: str = "node", given: PublicKey | None = None) -> Trust:
    return Trust(Layout(tmp_path / name), given)


# --- signing ----------------------------------------------------------------------


def test_the_master_key_is_made_once_private_and_kept(tmp_path):
    folder = tmp_path / "keys"
    first = SigningKey.load_or_create(folder)
    assert stat.S_IMODE(os.stat(folder / "master.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert (folder / "master.pub").read_text().strip() == first.public.text
    again = SigningKey.load_or_create(folder)
    assert again.public == first.public
    assert Layout(tmp_path).master_public_key.name == "master.pub"


def test_a_signature_covers_every_member(key, other):
    doc = key.sign({"b": 2, "a": [1, "x"], "text": "ünï"})
    assert key.public.verify(doc) == doc
    assert canonical(doc) == b'{"a":[1,"x"],"b":2,"text":"\\u00fcn\\u00ef"}'
    for forged in ({**doc, "b": 3}, {**doc, "extra": True}, {k: v for k, v in doc.items() if k != "b"},
                   {k: v for k, v in doc.items() if k != "signature"}, {**doc, "signature": "not base64!"},
                   other.sign({k: v for k, v in doc.items() if k != "signature"}), ["a list"], None):
        with pytest.raises(Untrusted):
            key.public.verify(forged)
    assert key.sign(doc) == doc  # signing again replaces the signature with the same one


def test_public_keys_from_the_command_line(key, tmp_path):
    assert PublicKey.from_argument(key.public.text) == key.public
    assert PublicKey.from_argument(f"  {key.public.text}\n") == key.public
    path = tmp_path / "master.pub"
    path.write_text(key.public.text + "\n")
    assert PublicKey.from_argument(str(path)) == key.public
    for bad in ("ed25519:bm90IGEga2V5", "rsa:AAAA", str(tmp_path / "missing.pub"), ""):
        with pytest.raises(Untrusted):
            PublicKey.from_argument(bad)


# --- the key a node trusts --------------------------------------------------------


def test_trust_on_first_use_pins_the_key_and_refuses_another(tmp_path, key, other, caplog):
    trust = trust_in(tmp_path)
    assert trust.key is None
    with pytest.raises(Untrusted, match="no master key"):
        trust.catalog(catalogue(key, 1))
    with caplog.at_level(logging.WARNING):
        trust.pin(key.public.text, "the master")
    assert "first contact" in caplog.text
    assert trust.pin(key.public.text, "the master") == key.public  # the same key again: fine
    with pytest.raises(Untrusted, match="not the one this node trusts"):
        trust.pin(other.public.text, "the master")
    later = trust_in(tmp_path)  # after a restart
    assert later.key == key.public and later.how == "first contact"
    with pytest.raises(Untrusted):
        later.pin(other.public.text, "the master")
    with pytest.raises(Untrusted, match="not signed by the master's key"):
        later.catalog(catalogue(other, 5))


def test_a_given_key_replaces_a_pinned_one_and_its_history(tmp_path, key, other, caplog):
    trust = trust_in(tmp_path)
    trust.pin(key.public.text, "the master")
    trust.catalog(catalogue(key, 40))
    with caplog.at_level(logging.WARNING):
        given = trust_in(tmp_path, given=other.public)
    assert "replaces" in caplog.text
    assert given.key == other.public and given.serial == 0
    assert given.catalog(catalogue(other, 1)).serial == 1
    with pytest.raises(Untrusted):
        given.catalog(catalogue(key, 41))
    assert trust_in(tmp_path).key == other.public  # kept for the next start without the flag


# --- catalogues: signed, and never older than one seen ----------------------------


def test_an_older_catalogue_is_refused_also_after_a_restart(tmp_path, key):
    trust = trust_in(tmp_path, given=key.public)
    old, new = catalogue(key, 3, versions=1), catalogue(key, 4, versions=2)
    assert trust.catalog(old).serial == 3
    signed = trust.catalog(new)
    assert signed.serial == 4 and sorted(signed.catalog.imis["demo"].versions) == [1, 2]
    assert signed.doc == new
    with pytest.raises(Rollback, match="older than serial 4"):
        trust.catalog(old)
    assert trust.catalog(new) is signed  # the same document again
    same_serial = catalogue(key, 4, versions=1)
    with pytest.raises(Rollback, match="differs"):
        trust.catalog(same_serial)
    assert trust.refused == 2

    restarted = trust_in(tmp_path, given=key.public)
    assert restarted.serial == 4
    with pytest.raises(Rollback):
        restarted.catalog(old)
    with pytest.raises(Rollback):
        restarted.catalog(same_serial)
    kept = restarted.saved_catalog()
    assert kept is not None and kept.serial == 4 and kept.doc == new
    assert restarted.catalog(catalogue(key, 9)).serial == 9


def test_a_catalogue_must_be_signed_whole_and_in_every_record(tmp_path, key, other):
    trust = trust_in(tmp_path, given=key.public)
    good = catalogue(key, 2)
    tampered = json.loads(json.dumps(good))
    tampered["imis"][0]["latest"] = 1
    unsigned = {k: v for k, v in good.items() if k != "signature"}
    foreign_record = catalogue(key, 3, records=[record(key, "demo", 1), record(other, "demo", 2)])
    unsigned_record = catalogue(key, 3, records=[record(key, "demo", 1),
                                                 {k: v for k, v in record(key, "demo", 2).items() if k != "signature"}])
    moved = catalogue(key, 3, records=[record(key, "demo", 1), record(key, "other", 2)])
    no_serial = key.sign({k: v for k, v in good.items() if k not in ("signature", "serial")})
    bad_time = key.sign({**{k: v for k, v in good.items() if k != "signature"}, "issued": "yesterday"})
    for doc in (tampered, unsigned, other.sign(unsigned), foreign_record, unsigned_record, moved,
                no_serial, bad_time, "not a catalogue", None):
        with pytest.raises((Untrusted, InvalidInput)):
            trust.catalog(doc)
    assert trust.current is None and trust.serial == 0
    assert trust.catalog(good).serial == 2


def test_freshness_says_how_old_the_catalogue_is(tmp_path, key, caplog):
    trust = trust_in(tmp_path, given=key.public)
    assert trust.freshness()["catalog_serial"] is None
    trust.catalog(catalogue(key, 1, issued=datetime.now(UTC) - timedelta(seconds=30)))
    fresh = trust.freshness()
    assert fresh["catalog_serial"] == 1 and 29 <= fresh["catalog_age_s"] < 60 and not fresh["catalog_stale"]
    with caplog.at_level(logging.WARNING):
        trust.catalog(catalogue(key, 2, issued=datetime.now(UTC) - timedelta(seconds=STALE_AFTER + 5)))
        assert trust.freshness()["catalog_stale"]
        trust.freshness()
    assert caplog.text.count("was issued") == 1  # said once, not at every status


# --- records, streams, profiles ---------------------------------------------------


def test_version_records(tmp_path, key, other):
    trust = trust_in(tmp_path, given=key.public)
    doc = record(key, "demo", 3)
    parsed = trust.version_record(doc, "demo")
    assert parsed.version == 3 and parsed.imi == "demo" and parsed.to_json() == doc
    for bad, imi in ((doc, "other"), (record(other, "demo", 3), "demo"), ({**doc, "bytes": 1}, "demo"),
                     ({k: v for k, v in doc.items() if k != "signature"}, "demo")):
        with pytest.raises(Untrusted):
            trust.version_record(bad, imi)


def test_stream_records(tmp_path, key, other):
    trust = trust_in(tmp_path, given=key.public)
    data = os.urandom(STREAM_PIECE + 1000)
    pieces = [content_digest(data[:STREAM_PIECE]), content_digest(data[STREAM_PIECE:])]
    body = {"imi": "demo", "version": 2, "parent": 1, "stream_id": "s", "bytes": len(data), "complete": True,
            "digest": stream_digest(pieces), "piece_size": STREAM_PIECE, "pieces": pieces}
    hasher = StreamHasher()
    for i in range(0, len(data), 77_777):
        hasher.update(data[i:i + 77_777])
    got = trust.stream_record(key.sign(body), "demo", 2, 1)
    assert got.digest == hasher.hexdigest() and got.bytes == len(data)
    forged = [
        (key.sign({**body, "digest": content_digest(data)}), "demo", 2, 1),  # not the digest of its pieces
        (key.sign({**body, "pieces": pieces[:1]}), "demo", 2, 1),
        (key.sign(body), "demo", 2, None),  # another stream's record
        (key.sign(body), "demo", 3, 1),
        (other.sign(body), "demo", 2, 1),
        (body, "demo", 2, 1),
    ]
    for doc, imi, version, parent in forged:
        with pytest.raises((Untrusted, InvalidInput)):
            trust.stream_record(doc, imi, version, parent)


def test_boot_profiles(tmp_path, key, other):
    trust = trust_in(tmp_path, given=key.public)
    body = {"imi": "demo", "recorded_on": 2, "digests": [content_digest(b"a"), content_digest(b"b")]}
    profile = trust.profile(key.sign(body), "demo", 3)
    assert profile.recorded_on == 2 and profile.digests == body["digests"] and profile.to_json() == key.sign(body)
    for doc, imi, version in ((key.sign(body), "other", 3), (key.sign(body), "demo", 1), (other.sign(body), "demo", 3),
                              (body, "demo", 3), ({**key.sign(body), "recorded_on": 1}, "demo", 3)):
        with pytest.raises(Untrusted):
            trust.profile(doc, imi, version)


def test_the_catalogue_shape_is_kept(key):
    """Signed documents are the old shapes plus members: what scripts read stays."""
    doc = catalogue(key, 7)
    catalog = Catalog.from_json(doc)
    assert isinstance(catalog.imis["demo"], ImiInfo)
    assert set(doc) == {"imis", "serial", "issued", "signature"}
    assert set(doc["imis"][0]["versions"][0]) == {"version", "digest", "bytes", "created", "message", "chunk_size",
                                                   "imi", "signature"}
