"""A node's background tasks survive whatever a peer answers and whatever
the disk does: each fault is logged and retried, and never ends the node.

- a cache server polls the master: a malformed node list (`GET /v1/nodes`)
  ended it (cache/site.py);
- a replica takes the master's heartbeat replies: a malformed one ended it,
  and a subvolume delete that failed (a full disk) ended its sync loop, so
  it crash-looped (replicator/replica.py, icbdcore/node.py);
- a master writes the record of a finished stream spool: ENOSPC there ended
  it (replicator/streams.py);
- and a node given a wrong --master URL (something that takes the
  registration but knows no heartbeat) re-registered in a tight loop.

The peers are stand-ins answering raw bytes (tests/fakepeer.py), signing
what the master signs with a key made here (tests/signed.py); the nodes'
parts run in this process, without btrfs. As any user.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest
import signed
import trio
from fakepeer import FakePeer

from cache.site import SiteCache
from icbdcore import trust
from icbdcore.clients import Credentials, async_client
from icbdcore.layout import Layout
from icbdcore.manifest import Entry, Manifest, VersionRecord
from icbdcore.node import Membership
from icbdcore.signing import SigningKey
from icbdcore.trust import Trust
from icbdcore.wire import content_digest
from replicator import btrfs, streams
from replicator.receiver import ReceiveFailed
from replicator.replica import Replica
from replicator.streams import SendSpools

TOKEN = "test-token-0123456789"


@pytest.fixture
def fake():
    made: list[FakePeer] = []

    def make(answer) -> FakePeer:
        made.append(FakePeer(answer))
        return made[-1]

    yield make
    for peer in made:
        peer.close()


@pytest.fixture
def key(tmp_path) -> SigningKey:
    return signed.master_key(tmp_path)


def _record(version: int) -> VersionRecord:
    return VersionRecord(version=version, digest=content_digest(f"manifest {version}".encode()))


def _catalog(key: SigningKey, *versions: int, latest: object = None, serial: int = 1, **changes) -> dict:
    """The signed catalogue of iMI demo; `changes` replace members of its
    entry, signed with it (what a master with a bug could send)."""
    records = [signed.record(key, "demo", v, _record(v).digest) for v in versions]
    return signed.catalogue(key, [{**signed.imi("demo", records, latest=latest), **changes}], serial)


async def _until(condition, timeout: float, what: str) -> None:
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting for {what}")


# --- a cache server and the master's node list ----------------------------------------------


async def test_malformed_node_lists_do_not_end_a_cache_server(fake, tmp_path, key, caplog):
    """The master's node list comes as a number, as a list instead of an
    object, as broken JSON, as nodes that are not objects: the cache server
    logs it, keeps serving its catalogue, and takes the next good list."""
    bad = [b'{"nodes": 5}', b"[]", b'{"nodes": [1, "x", null]', b'{"nodes": {"a": 1}}', b"{}"]
    good_node = {"id": "r1", "role": "replica", "site": "a", "url": "http://127.0.0.1:9", "state": "alive"}
    nodes_asked = []
    catalogue = json.dumps(_catalog(key, 1)).encode()

    def master(method: str, path: str) -> tuple[int, bytes]:
        if path == "/v1/imis":
            return 200, catalogue
        if path == "/v1/nodes":
            nodes_asked.append(path)
            answer = bad[len(nodes_asked) - 1] if len(nodes_asked) <= len(bad) else None
            return 200, answer or json.dumps({"nodes": [good_node]}).encode()
        return 404, b'{"error": "no"}'

    peer = fake(master)
    with caplog.at_level(logging.WARNING):
        async with SiteCache.open(tmp_path / "cache", peer.url, Credentials(TOKEN, "c1"), "a", 64 << 20,
                                  refresh=0.05, master_key=key.public) as cache:
            await _until(lambda: [u.id for u in cache.upstreams.all()] == ["r1"], 10, "the good node list")
            assert "demo" in (await cache.catalog()).imis
    print(f"\n{len(nodes_asked)} node lists asked, {len(bad)} malformed; warnings: "
          f"{[r.getMessage()[:70] for r in caplog.records if r.levelno >= logging.WARNING][:2]}")
    assert len(nodes_asked) > len(bad)
    assert "master unreachable" in caplog.text


async def test_a_full_disk_for_the_catalogue_does_not_end_a_cache_server(fake, tmp_path, key, monkeypatch, caplog):
    """The catalogue (and the high-water mark of its serial) cannot be
    written: the cache server serves the catalogues it takes, newer ones
    too, and holds the mark in memory."""
    serials = iter(range(1, 1_000_000))

    def full(path, doc):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    peer = fake(lambda method, path: (200, json.dumps(
        _catalog(key, 1, serial=next(serials)) if path == "/v1/imis" else {"nodes": []}).encode()))
    Trust(Layout(tmp_path / "cache"), key.public)  # the key kept already: the disk filled up later
    monkeypatch.setattr(trust, "write_json", full)
    async with SiteCache.open(tmp_path / "cache", peer.url, Credentials(TOKEN, "c1"), "a", 64 << 20,
                              refresh=0.05, master_key=key.public) as cache:
        assert "demo" in (await cache.catalog()).imis
        first = cache.trust.serial
        await trio.sleep(0.3)
        assert "demo" in (await cache.catalog()).imis
        assert cache.trust.serial > first >= 1
    assert not Layout(tmp_path / "cache").catalog_file.exists()
    assert "cannot keep the catalogue" in caplog.text


# --- a replica and the master's heartbeat replies -----------------------------------------------


class FakeReceiver:
    """Counts the transfers the replica starts; each fails as a cut-off would."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    async def receive(self, name, version, parent, record, transfer):
        self.calls.append((name, version))
        raise ReceiveFailed("no stream from a stand-in master", resumable=True)


def _replica(tmp_path: Path, master_url: str, key: SigningKey | None = None) -> Replica:
    key = key or signed.master_key(tmp_path)
    replica = Replica(tmp_path / "r1", "127.0.0.1:1", master_url, Credentials(TOKEN), "a", name="r1",
                      heartbeat=0.1, master_key=key.public)
    replica.layout.make_dirs()
    replica.id = "r1"
    replica.trust = Trust(replica.layout, key.public)
    replica.receiver = FakeReceiver()
    return replica


async def test_malformed_heartbeat_replies_do_not_end_a_replica(fake, tmp_path, key, caplog):
    """Replies whose catalogue has a number too large for any integer (1e400
    parses as infinity; no signature covers it), an invalid iMI name, a
    version that is not a number (both signed: a master with a bug), replies
    without a list of subscriptions or with a catalogue that is no object,
    a reply that is not an object: each is logged, the last good catalogue
    is kept, and a good reply is acted on (a transfer starts)."""
    record = signed.record(key, "demo", 1, _record(1).digest)
    huge = json.dumps({"subscriptions": ["demo"], "catalog": signed.catalogue(
        key, [signed.imi("demo", [{**record, "bytes": "INF"}])], 1)}).replace('"INF"', "1e400")
    bad = [
        huge,
        {"subscriptions": ["demo"], "catalog": _catalog(key, 1, serial=2, name="../etc")},
        {"subscriptions": ["demo"], "catalog": signed.catalogue(
            key, [signed.imi("demo", [key.sign({**record, "version": "one"})], latest=1)], 3)},
        {"subscriptions": {"demo": _catalog(key, 1, serial=4)}},
        {"subscriptions": ["demo", 7], "catalog": _catalog(key, 1, serial=5)},
        {"subscriptions": ["demo"], "catalog": [1, 2]},
        [],
    ]
    replies = [r.encode() if isinstance(r, str) else json.dumps(r).encode() for r in bad]
    good = json.dumps({"state": "alive", "subscriptions": ["demo"], "catalog": _catalog(key, 1, serial=10)}).encode()
    beats = []

    def master(method: str, path: str) -> tuple[int, bytes]:
        if path == "/v1/nodes":
            return 201, b"{}"
        if path == "/v1/key":  # asked once per refusal: does the master now present another key?
            return 200, json.dumps({"key": key.public.text}).encode()
        beats.append(path)
        if len(beats) <= len(replies):
            return 200, replies[len(beats) - 1]
        return 200, good

    peer = fake(master)
    replica = _replica(tmp_path, peer.url, key)
    client = replica.master = async_client(Credentials(TOKEN, "r1"), peer.url)
    replica.membership = Membership(client, "r1", "replica", "a", replica.url, replica.status_doc,
                                    on_reply=replica._on_heartbeat_reply, interval=0.05)
    with caplog.at_level(logging.WARNING):
        async with client, trio.open_nursery() as nursery:
            nursery.start_soon(replica.membership.run)
            nursery.start_soon(replica._sync_loop)
            await _until(lambda: len(beats) > len(replies) and replica.receiver.calls, 10,
                         "a transfer after the good reply")
            nursery.cancel_scope.cancel()
    print(f"\n{len(beats)} heartbeats, {len(replies)} malformed replies; then transfers {replica.receiver.calls}")
    assert len(beats) > len(replies)
    assert replica.receiver.calls[0] == ("demo", 1)
    assert replica.signed is not None and replica.signed.serial == 10
    assert "not signed by the master's key" in caplog.text and "malformed" in caplog.text
    assert "could not be taken" not in caplog.text, "a reply was not refused for what it is, but failed"


async def test_a_failed_subvolume_delete_is_retried_and_does_not_end_a_replica(tmp_path, monkeypatch, caplog):
    """Pruning version 1 fails the first time (`btrfs subvolume delete` on a
    full disk): logged, version 1 is held and served again, and the next
    round prunes it."""
    manifest = Manifest(1 << 20, [Entry(path="", type="dir", mode=0o755, uid=0, gid=0, size=0, mtime_ns=0)])
    replica = _replica(tmp_path, "http://127.0.0.1:9")
    replica.membership = None
    for version in (1, 2):
        record = VersionRecord(version=version, digest=manifest.digest)
        replica.layout.manifest_file("demo", version).parent.mkdir(parents=True, exist_ok=True)
        replica.layout.manifest_file("demo", version).write_bytes(manifest.canonical())
        replica.held.setdefault("demo", {})[version] = record
        replica.blocks.add("demo", version, manifest)
    from icbdcore.catalog import Catalog

    replica.catalog = Catalog.from_json({"imis": [{"name": "demo", "uuid": "u1", "latest": 2,
                                                   "versions": [replica.held["demo"][2].to_json()]}]})
    deletes = []

    async def remove_tree(path: Path) -> None:
        deletes.append(path.name)
        if len(deletes) == 1:
            raise btrfs.BtrfsError("btrfs subvolume delete failed: No space left on device")

    monkeypatch.setattr(btrfs, "remove_tree", remove_tree)
    with caplog.at_level(logging.ERROR):
        async with trio.open_nursery() as nursery:
            replica._wake.set()
            nursery.start_soon(replica._sync_loop)
            await _until(lambda: len(deletes) >= 1, 5, "the first prune")
            assert sorted(replica.held["demo"]) == [1, 2], "a version whose delete failed is held again"
            await _until(lambda: sorted(replica.held["demo"]) == [2], 10, "the prune to be retried")
            nursery.cancel_scope.cancel()
    print(f"\ndeletes tried: {deletes}; held now {sorted(replica.held['demo'])}")
    assert deletes == ["1", "1"]
    assert "No space left on device" in caplog.text


# --- a master and a spool record on a full disk ------------------------------------------------


async def test_enospc_on_a_spool_record_does_not_end_the_master(tmp_path, monkeypatch, caplog):
    """The send finished, its record cannot be written: the record is served
    from memory and the readers still get the whole stream; it is just not
    kept across a restart."""
    data = os.urandom(100_000)
    layout = Layout(tmp_path / "master")
    layout.make_dirs()

    async def send_into(spool, snapshot, parent_snapshot) -> str:
        spool._advance(data)
        spool.path.write_bytes(data)
        spool._on_disk(len(data))
        return content_digest(data)

    def full(path, doc):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(streams, "_send_into", send_into)
    monkeypatch.setattr(streams, "write_json", full)
    spools = SendSpools(layout)
    async with trio.open_nursery() as nursery:
        await nursery.start(spools.run)
        spool = spools.make("demo", 1, None, Path("/nowhere/1"), None)
        with trio.fail_after(5):
            got = b"".join([chunk async for chunk in spool.chunks(0)])
        nursery.cancel_scope.cancel()
    assert got == data and spool.complete and spool.digest == content_digest(data)
    assert spools.record("demo", 1, None)["digest"] == spool.digest
    assert not spool.meta_path.exists()
    assert "cannot write its record" in caplog.text


# --- membership -------------------------------------------------------------------------------


async def test_a_wrong_master_url_does_not_make_a_node_register_in_a_tight_loop(fake):
    """Something that takes the registration (201) but answers 404 to every
    heartbeat: the node registers again at most once a period, not at once
    and forever."""
    peer = fake(lambda method, path: (201, b"{}") if path == "/v1/nodes" else (404, b'{"error": "no"}'))
    client = async_client(Credentials(TOKEN, "r1"), peer.url)
    membership = Membership(client, "r1", "replica", "a", "http://127.0.0.1:1", dict, interval=0.25)
    async with client:
        with trio.move_on_after(1.0):
            await membership.run()
    registrations = peer.count("POST", "/v1/nodes")
    print(f"\nregistrations in 1 s with a 0.25 s period: {registrations}")
    assert registrations <= 6
    assert not membership.reachable


async def test_a_reply_the_node_cannot_take_does_not_end_membership(fake, caplog):
    peer = fake(lambda method, path: (201, b'{"state": "alive"}'))
    taken = []

    async def on_reply(reply: dict) -> None:
        taken.append(reply)
        raise RuntimeError("a bug in the node")

    client = async_client(Credentials(TOKEN, "r1"), peer.url)
    membership = Membership(client, "r1", "replica", "a", "http://127.0.0.1:1", dict, on_reply=on_reply,
                            interval=0.05)
    async with client:
        with trio.move_on_after(0.5):
            await membership.run()
    assert len(taken) >= 3 and membership.reachable
    assert "could not be taken" in caplog.text
