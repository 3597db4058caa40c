"""What a caller can make a node hold is bounded.

- `btrfs send` spools: a cap on those running at once, and on those one
  node started; beyond it the master answers 503 with Retry-After
  (replicator/streams.py, master.py).
- Manifests are refused past MAX_MANIFEST before they are read whole: a
  replica's download from the master, a mount's from its cache server, a
  cache's and a replica's files on disk.
- A cache's manifests and boot profiles count against its --size: the
  block store gets the bound less a share, the documents the share, oldest
  evicted first (cache/metastore.py).
- A replica's resume spools for (version, parent) pairs it no longer wants
  are deleted after each sync, once the master has said what it is
  subscribed to (before that, a spool is what a restart resumes from).

As any user; peers are stand-ins on loopback, signing what the master signs
with a key made here (tests/signed.py).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import httpx
import pytest
import signed
import trio
from fakepeer import FakePeer
from rawhttp import read_head

from cache.remote import RemoteCache
from cache.site import SiteCache
from icbdcore import http
from icbdcore.auth import READER, TokenTable, token_hash
from icbdcore.catalog import Catalog
from icbdcore.clients import Credentials
from icbdcore.layout import Layout
from icbdcore.manifest import MAX_MANIFEST, Manifest, VersionRecord
from icbdcore.source import Unavailable
from icbdcore.trust import Trust
from icbdcore.wire import Refused, content_digest
from replicator import streams
from replicator.receiver import ReceiveFailed, Receiver
from replicator.replica import Replica
from replicator.streams import SendSpools

TOKEN = "test-token-0123456789"
MIB = 1 << 20


# --- stream spools ------------------------------------------------------------------------------


async def test_send_spools_are_capped_in_all_and_per_node(tmp_path, monkeypatch):
    from replicator.streams import SendsBusy

    release = trio.Event()

    async def send_into(spool, snapshot, parent_snapshot) -> str:
        await release.wait()  # a send that takes its time
        return content_digest(b"")

    monkeypatch.setattr(streams, "_send_into", send_into)
    layout = Layout(tmp_path)
    layout.make_dirs()
    spools = SendSpools(layout, max_sends=3, max_sends_per_node=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(spools.run)
        spools.make("demo", 1, None, Path("/s/1"), None, node="r1")
        spools.make("demo", 2, None, Path("/s/2"), None, node="r1")
        with pytest.raises(SendsBusy, match="started by r1"):
            spools.make("demo", 3, None, Path("/s/3"), None, node="r1")
        assert spools.make("demo", 1, None, Path("/s/1"), None, node="r1")  # joining a running one is free
        spools.make("demo", 3, None, Path("/s/3"), None, node="r2")
        with pytest.raises(SendsBusy, match="most at once") as busy:
            spools.make("demo", 4, None, Path("/s/4"), None, node="r3")
        assert busy.value.retry_after > 0
        release.set()
        with trio.fail_after(5):
            while any(not s.complete for s in spools.all()):
                await trio.sleep(0.01)
        assert spools.make("demo", 1, None, Path("/s/1"), None, node="r1") is None  # made: its record is there
        assert spools.make("demo", 4, None, Path("/s/4"), None, node="r3")  # room again once they finish
        nursery.cancel_scope.cancel()


async def test_a_refusal_with_a_retry_hint_carries_retry_after():
    async def busy(request):
        raise Refused(503, "3 streams are being made, the most at once; retry later", retry_after=5)

    tokens = TokenTable()
    tokens.install({"id": "test", "serial": 1, "tokens": [{"name": "t", "role": READER, "hash": token_hash(TOKEN)}]})
    app = http.build_app([http.Endpoint("GET", "/v1/busy", busy, READER)], tokens)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node") as client:
        response = await client.get("/v1/busy", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert "retry later" in response.json()["error"]


# --- manifests, capped before they are read ---------------------------------------------------------


class Gusher:
    """Answers every GET with `total` bytes: announced (Content-Length) or
    not (the end of the body is the end of the connection); counts the bytes
    it got to send before the client hung up. /v1/imis gets `catalog`."""

    def __init__(self, total: int, announced: bool, catalog: dict | None = None):
        self.total = total
        self.announced = announced
        self.catalog = catalog or {"imis": []}
        self.sent = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        chunk = os.urandom(MIB)
        try:
            with conn:
                while True:
                    request = read_head(conn)
                    if request is None:
                        return
                    if b" /v1/imis " in request:
                        body = json.dumps(self.catalog).encode()
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                        continue
                    length = b"Content-Length: %d\r\n" % self.total if self.announced else b"Connection: close\r\n"
                    conn.sendall(b"HTTP/1.1 200 OK\r\n" + length + b"\r\n")
                    for _ in range(self.total // MIB):
                        conn.sendall(chunk)
                        self.sent += len(chunk)
                    return
        except OSError:
            return

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def gusher():
    made: list[Gusher] = []

    def make(*args, **kwargs) -> Gusher:
        made.append(Gusher(*args, **kwargs))
        return made[-1]

    yield make
    for g in made:
        g.close()


TOO_BIG = MAX_MANIFEST + 96 * MIB
RECORD = VersionRecord(version=1, digest=content_digest(b"the real manifest"))


@pytest.mark.parametrize("announced", [True, False], ids=["announced", "unannounced"])
async def test_a_replica_refuses_an_oversized_manifest_before_reading_it(gusher, tmp_path, announced):
    peer = gusher(TOO_BIG, announced)
    key = signed.master_key(tmp_path)
    receiver = Receiver(Layout(tmp_path), peer.url, Credentials(TOKEN, "r1"), trust=Trust(Layout(tmp_path), key.public))
    with pytest.raises(ReceiveFailed, match=str(MAX_MANIFEST)):
        await receiver.fetch_manifest("demo", 1, RECORD)
    await trio.sleep(0.2)
    print(f"\nmanifest of {TOO_BIG >> 20} MiB ({'announced' if announced else 'unannounced'}): "
          f"{peer.sent >> 20} MiB sent before the replica hung up")
    assert peer.sent <= MAX_MANIFEST + 16 * MIB  # what was read, plus what the socket buffers held


@pytest.mark.parametrize("announced", [True, False], ids=["announced", "unannounced"])
async def test_a_mount_refuses_an_oversized_manifest_before_reading_it(gusher, tmp_path, announced):
    key = signed.master_key(tmp_path)
    catalog = signed.catalogue(key, [signed.imi("demo", [signed.record(key, "demo", 1, RECORD.digest)])])
    peer = gusher(TOO_BIG, announced, catalog)
    async with RemoteCache.open(peer.url, Credentials(TOKEN), state_dir=tmp_path / "mount",
                                master_key=key.public) as remote:
        await remote.catalog()
        with pytest.raises(Unavailable, match=str(MAX_MANIFEST)):
            await remote.manifest("demo", 1)
    await trio.sleep(0.2)
    print(f"\nmanifest of {TOO_BIG >> 20} MiB ({'announced' if announced else 'unannounced'}): "
          f"{peer.sent >> 20} MiB sent before the mount hung up")
    assert peer.sent <= MAX_MANIFEST + 16 * MIB


def test_manifests_on_disk_are_refused_unread_past_the_cap(tmp_path):
    """A sparse file larger than MAX_MANIFEST (what a damaged disk or a hand
    could leave): refused by its size, not read into memory."""
    from icbdcore.records import read_capped

    big = tmp_path / "1.manifest.json"
    with open(big, "wb") as f:
        f.truncate(MAX_MANIFEST + 1)
    with pytest.raises(ValueError, match="larger than"):
        read_capped(big, MAX_MANIFEST)
    with pytest.raises(ValueError, match="larger than"):
        Manifest.from_bytes(b" " * (MAX_MANIFEST + 1))


# --- a cache's documents count against its bound ---------------------------------------------------


async def test_a_cache_s_manifests_and_profiles_stay_within_its_bound(tmp_path):
    """A cache of 8 MiB reads 24 manifests of 256 KiB (6 MiB) and their
    profiles: blocks and documents together stay within the 8 MiB, the
    documents within their 1 MiB share, the oldest evicted first; an evicted
    manifest is fetched again when asked for."""
    key = signed.master_key(tmp_path)
    manifests = {v: os.urandom(256 << 10) for v in range(1, 25)}
    records = [signed.record(key, "demo", v, content_digest(m)) for v, m in manifests.items()]
    catalog = signed.catalogue(key, [signed.imi("demo", records)])
    profile = signed.profile(key, "demo", 1, [content_digest(b"%d" % i) for i in range(2000)])

    def master(method: str, path: str) -> tuple[int, bytes]:
        if path == "/v1/imis":
            return 200, json.dumps(catalog).encode()
        if path == "/v1/nodes":
            return 200, b'{"nodes": []}'
        parts = path.split("/")
        if path.endswith("/manifest"):
            return 200, manifests[int(parts[-2])]
        if path.startswith("/v1/manifests/"):  # a manifest by its digest, as caches ask for it
            return next(((200, m) for m in manifests.values() if content_digest(m) == parts[-1]), (404, b"{}"))
        if path.endswith("/profile"):
            return 200, json.dumps(profile).encode()
        return 404, b'{"error": "no"}'

    peer = FakePeer(master)
    bound = 8 * MIB
    try:
        async with SiteCache.open(tmp_path / "cache", peer.url, Credentials(TOKEN, "c1"), "a", bound, refresh=60,
                                  master_key=key.public) as cache:
            for version in manifests:
                raw, _ = await cache.manifest_bytes("demo", version)
                assert raw == manifests[version]
                await cache.profile("demo", version)
            documents = _disk(tmp_path / "cache" / "manifests") + _disk(tmp_path / "cache" / "profiles")
            stats = cache.stats()
            first_again = await cache.manifest_bytes("demo", 1)  # in memory's flight table, or fetched again
        print(f"\n{len(manifests)} manifests of 256 KiB in a cache of 8 MiB: documents on disk {documents >> 10} KiB "
              f"({stats.get('documents')}); block store bound {stats['store']['bound'] >> 10} KiB")
        assert stats["store"]["bound"] + documents <= bound, "blocks and documents may pass --size together"
        assert documents <= stats["documents"]["bound"] <= bound // 8
        assert stats["documents"]["evicted"] > 0
        assert first_again[0] == manifests[1]
    finally:
        peer.close()


def _disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --- a replica's stale resume spools ---------------------------------------------------------


class FailingReceiver:
    def __init__(self):
        self.calls = []

    async def receive(self, name, version, parent, record, transfer):
        self.calls.append((name, version, parent))
        raise ReceiveFailed("cut off", resumable=True)


async def test_resume_spools_no_longer_wanted_are_deleted(tmp_path):
    """Held: demo 1. The master has demo 1 and 3. The one wanted stream is
    demo 3 from 1; the spools of 3 from 2 (2 is gone from the master), of 2
    (not wanted), and of an iMI no longer subscribed go at the next sync."""
    replica = Replica(tmp_path / "r1", "127.0.0.1:1", "http://127.0.0.1:9", Credentials(TOKEN), "a", name="r1")
    replica.layout.make_dirs()
    replica.receiver = FailingReceiver()
    replica.membership = None
    manifest_digest = content_digest(b"m")
    records = [VersionRecord(version=v, digest=manifest_digest).to_json() for v in (1, 3)]
    replica.catalog = Catalog.from_json({"imis": [{"name": "demo", "uuid": "u", "latest": 3, "versions": records}]})
    replica.held = {"demo": {1: VersionRecord(version=1, digest=manifest_digest)}}
    spools = {
        "wanted": replica.layout.resume_spool("demo", 3, 1),
        "old parent": replica.layout.resume_spool("demo", 3, 2),
        "not wanted": replica.layout.resume_spool("demo", 2, None),
        "unsubscribed": replica.layout.resume_spool("gone", 1, None),
    }
    for spool in spools.values():
        spool.parent.mkdir(parents=True, exist_ok=True)
        spool.write_bytes(b"stream so far")
        spool.with_suffix(".json").write_text("{}")
    # At start the replica knows what it holds, not yet what it is subscribed
    # to: no spool is stale yet (each may be what this start resumes from).
    replica._drop_stale_spools()
    assert all(path.exists() for path in spools.values())
    replica.subscriptions_known = True  # a heartbeat reply said so
    async with trio.open_nursery() as nursery:
        replica._wake.set()
        nursery.start_soon(replica._sync_loop)
        with trio.fail_after(5):
            while not replica.receiver.calls:
                await trio.sleep(0.02)
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    left = sorted(name for name, path in spools.items() if path.exists())
    print(f"\nresume spools left after a sync: {left}; transfers tried {replica.receiver.calls}")
    assert replica.receiver.calls[0] == ("demo", 3, 1)
    assert left == ["wanted"]
    assert not spools["old parent"].with_suffix(".json").exists()
