"""A mount's sources at its site: several cache servers, each holding a
distinct share of the blocks, failing over to one another, and the replicas
as the last resort (icbdcore.source.ImageSource).

The way CVMFS clients treat a proxy list, for the same reason: at 8:00 a
cache server that dies during a boot storm must not fail every desktop at
the site while the replicas hold every block.

- **Spread by digest.** Each block has an order of caches, by rendezvous
  hashing of (cache URL, digest): every mount asks the same cache for the
  same block, so each cache fills with a distinct share, and a cache that
  leaves moves only its own share to the others.
- **Failover within the read deadline.** Each try is bounded by
  `attempt_timeout`, a fraction of the mount's read deadline, so a reader
  whose cache stops answering reads through the next one before its own
  deadline. A cache that refuses, resets or times out is marked down and
  left alone (backing off 1 s, 2 s, ... 30 s) while a probe (`GET /`) checks
  it in the background; it is taken back at its first answer, with no admin
  action. A cache that answers but cannot get a block itself (502/503/504)
  is up: the next cache is asked, and no one backs off.
- **The replicas, last.** When no cache delivers, the block is fetched from
  the replicas the caches named (their upstream list, polled from a live
  cache's status and kept in the mount's cache folder, so it survives a
  restart while every cache is down): the site's first, then other sites',
  the master last, as the embedded cache does (cache.fetcher, with no
  store). At most `FALLBACK_CONCURRENCY` such fetches run at once per mount,
  so a storm of mounts whose caches are gone cannot flatten the replicas.
  `--no-replica-fallback` turns it off.

Every block is verified against its digest on arrival, whichever source
sent it. Status (`/.icbd/status` "sources") shows each cache's state, which
one the mount uses most, failovers, and the seconds spent degraded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio
import xxhash

from icbdcore.catalog import Catalog, Profile
from icbdcore.clients import Credentials
from icbdcore.layout import Layout
from icbdcore.logs import current_request_id, new_request_id
from icbdcore.manifest import MAX_MANIFEST, Manifest
from icbdcore.metrics import observe_fetch
from icbdcore.signing import PublicKey
from icbdcore.source import Unavailable
from icbdcore.wire import MAX_BATCH, check_name, manifest_object_path, parse_version

from .blockclient import BlockClient, FetchFailure, NotHeld
from .fetcher import Fetcher
from .remote import CatalogRefused, RemoteCache, open_trust
from .upstreams import Upstreams

log = logging.getLogger(__name__)

BACKOFF_FIRST, BACKOFF_CAP = 1.0, 30.0
PROBE_EVERY = 1.0  # seconds between probes of a cache that is down
UPSTREAMS_EVERY = 30.0  # seconds between polls of a live cache's upstream list
FALLBACK_CONCURRENCY = 4


@dataclass(eq=False)
class Member:
    """One cache server of the group, and what the mount knows of it."""

    remote: RemoteCache
    up: bool = True
    failures: int = 0
    retry_at: float = 0.0
    down_since: float | None = None
    blocks: int = 0
    bytes: int = 0
    errors: int = 0
    down_seconds: float = 0.0  # closed periods; the open one is added in describe()
    batches: bool = True  # False once it answered a batch 404 (an HTTP proxy in front of cache servers)

    @property
    def url(self) -> str:
        return self.remote.url

    def describe(self, now: float) -> dict:
        down = self.down_seconds + (now - self.down_since if self.down_since is not None else 0.0)
        return {"url": self.url, "state": "up" if self.up else "down", "blocks": self.blocks,
                "bytes": self.bytes, "errors": self.errors, "down_seconds": round(down, 1),
                "retry_in_s": round(max(0.0, self.retry_at - now), 1) if not self.up else 0.0,
                "batches": self.batches}


@dataclass
class Counters:
    failovers: int = 0  # a block asked of a second source after the first failed
    fallback_blocks: int = 0  # blocks read from the replicas
    fallback_errors: int = 0
    degraded_since: float | None = None  # some cache is down
    degraded_seconds: float = 0.0


class CacheGroup:
    def __init__(self, members: list[RemoteCache], fallback: Fetcher | None, upstreams: Upstreams | None,
                 *, attempt_timeout: float, clock: Callable[[], float] = time.monotonic):
        if not members:
            raise ValueError("a cache group needs at least one cache server")
        self.members = [Member(m) for m in members]
        self.fallback = fallback
        self.upstreams = upstreams
        self.attempt_timeout = attempt_timeout
        self.clock = clock
        self.counters = Counters()
        self._fallback_slots = trio.CapacityLimiter(FALLBACK_CONCURRENCY)
        self._catalog: Catalog | None = None

    @classmethod
    @asynccontextmanager
    async def open(cls, urls: list[str], credentials: Credentials, timeout: float, *, state_dir: Path,
                   site: str | None = None, replica_fallback: bool = True,
                   master_key: PublicKey | None = None) -> AsyncIterator[CacheGroup]:
        """A group over the caches at `urls`; `timeout` is the mount's read
        deadline, of which each try may take a third. One trust for them all
        (kept in `state_dir`): the newest catalogue serial seen through any
        cache is the floor for every other."""
        attempt = max(0.5, timeout / 3)
        trust = await open_trust(state_dir, master_key)
        async with AsyncExitStack() as stack:
            remotes = [await stack.enter_async_context(RemoteCache.open(url, credentials, attempt, trust=trust))
                       for url in urls]
            fallback = upstreams = None
            if replica_fallback:
                state_dir.mkdir(parents=True, exist_ok=True)
                upstreams = Upstreams(site, Layout(state_dir).upstreams_file)
                client = BlockClient(credentials, connections=FALLBACK_CONCURRENCY * 2, read_timeout=attempt)
                stack.callback(client.close)
                fallback = await stack.enter_async_context(
                    Fetcher(None, upstreams, client, attempt_timeout=attempt, deadline=timeout))
            group = cls(remotes, fallback, upstreams, attempt_timeout=attempt)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(group._probe_loop)
                if upstreams is not None:
                    nursery.start_soon(group._upstreams_loop)
                yield group
                nursery.cancel_scope.cancel()

    # --- choosing --------------------------------------------------------------------

    def order(self, key: str) -> list[Member]:
        """Where to ask for `key` (a digest), best first: the caches that are
        up, by rendezvous hash, then those down whose backoff has passed."""
        now = self.clock()

        def score(member: Member) -> int:
            return xxhash.xxh3_64_intdigest(f"{member.url}\0{key}".encode())

        up = sorted((m for m in self.members if m.up), key=score, reverse=True)
        due = sorted((m for m in self.members if not m.up and m.retry_at <= now), key=lambda m: m.retry_at)
        return up + due

    def _failed(self, member: Member, why: object) -> None:
        member.errors += 1
        member.failures += 1
        member.retry_at = self.clock() + min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (member.failures - 1))
        if member.up:
            member.up = False
            member.down_since = self.clock()
            log.warning("cache server %s is down (%s); reading through the others", member.url, why)
            self._note_degraded()

    def _answered(self, member: Member) -> None:
        member.failures = 0
        if not member.up:
            member.up = True
            if member.down_since is not None:
                member.down_seconds += self.clock() - member.down_since
            member.down_since = None
            log.info("cache server %s answers again; using it", member.url)
            self._note_degraded()

    def _note_degraded(self) -> None:
        now = self.clock()
        degraded = any(not m.up for m in self.members)
        if degraded and self.counters.degraded_since is None:
            self.counters.degraded_since = now
        elif not degraded and self.counters.degraded_since is not None:
            self.counters.degraded_seconds += now - self.counters.degraded_since
            self.counters.degraded_since = None

    # --- ImageSource ----------------------------------------------------------------------

    async def block(self, digest: str, imi: str, version: int) -> bytes:
        # One request id for this block, whichever cache or replica serves it.
        rid = current_request_id() or new_request_id()
        tried = []
        for member in self.order(digest):
            if tried:
                self.counters.failovers += 1
            started = time.perf_counter()
            try:
                data = await member.remote.client.fetch(member.url, digest, imi=imi, version=version,
                                                        timeout=self.attempt_timeout, rid=rid)
            except FetchFailure as error:
                tried.append(f"{member.url}: {error.why}")
                if error.kind in ("host", "timeout"):
                    self._failed(member, error.why)
                elif error.kind == "corrupt":  # never served; a cache that sends such bytes is worth a line
                    log.warning("cache server %s: block %s %s; refused", member.url, digest, error.why)
                continue
            seconds = time.perf_counter() - started
            observe_fetch(member.url, seconds)
            log.debug("block %s: from %s in %.1f ms", digest, member.url, seconds * 1000)
            self._answered(member)
            member.blocks += 1
            member.bytes += len(data)
            return data
        if self.fallback is not None:
            if tried:
                self.counters.failovers += 1
            async with self._fallback_slots:
                try:
                    data = await self.fallback.get(digest, imi=imi, version=version, rid=rid)
                except Unavailable as error:
                    self.counters.fallback_errors += 1
                    tried.append(f"replicas: {error}")
                else:
                    self.counters.fallback_blocks += 1
                    return data
        raise Unavailable(f"block {digest}: " + "; ".join(tried or ["no source known"]))

    async def blocks(self, digests: list[str], imi: str, version: int) -> list[bytes | None]:
        """The blocks in order (None: unavailable). Each cache is asked for its
        own share in batches; what a batch does not bring is fetched as
        block() would, with failover and the replicas last."""
        shares: dict[Member, list[str]] = {}
        for digest in dict.fromkeys(digests):
            order = self.order(digest)
            if order and order[0].batches:
                shares.setdefault(order[0], []).append(digest)
        found: dict[str, bytes] = {}
        async with trio.open_nursery() as nursery:
            for member, share in shares.items():
                for start in range(0, len(share), MAX_BATCH):
                    nursery.start_soon(self._batch, member, share[start:start + MAX_BATCH], imi, version, found)
        rest = [d for d in dict.fromkeys(digests) if d not in found]

        async def one(digest: str) -> None:
            try:
                found[digest] = await self.block(digest, imi, version)
            except Unavailable as error:
                log.debug("%s", error)

        async with trio.open_nursery() as nursery:
            for digest in rest:
                nursery.start_soon(one, digest)
        return [found.get(d) for d in digests]

    async def _batch(self, member: Member, share: list[str], imi: str, version: int,
                     found: dict[str, bytes]) -> None:
        started = time.perf_counter()
        try:
            got = await member.remote.client.fetch_many(member.url, share, imi=imi, version=version,
                                                        timeout=self.attempt_timeout, rid=current_request_id())
        except NotHeld:
            log.info("%s takes no batches of blocks: asking it for one block at a time", member.url)
            member.batches = False
            return
        except FetchFailure as error:
            if error.kind in ("host", "timeout"):
                self._failed(member, error.why)
                self.counters.failovers += len(share)  # each is asked of another source next
            return  # else block() asks this cache again for each, and counts its own failovers
        self._answered(member)
        seconds = time.perf_counter() - started
        for _ in got:  # each block of the batch took the batch's time to come
            observe_fetch(member.url, seconds)
        member.blocks += len(got)
        member.bytes += sum(map(len, got.values()))
        found.update(got)

    async def catalog(self) -> Catalog:
        why = []  # each cache's reason, for the one error line when none gives one
        for member in self.order("catalog"):
            try:
                self._catalog = await member.remote.fresh_catalog()
            except CatalogRefused as error:
                why.append(str(error))
                continue  # up, but behind (or not the master's): another may have the current one
            except Unavailable as error:
                why.append(str(error))
                self._failed(member, error)
                continue
            self._answered(member)
            return self._catalog
        if self._catalog is None:
            raise Unavailable("no cache server gives a catalogue: "
                              + "; ".join(why or [f"the cache server at {m.url} did not answer" for m in self.members]))
        return self._catalog  # every cache is down: the mount keeps what it showed

    async def manifest(self, imi: str, version: int) -> Manifest:
        catalog = self._catalog or await self.catalog()
        record = catalog.record(check_name(imi), parse_version(version))
        if record is None:
            raise Unavailable(f"{imi} has no version {version}")
        errors = []
        for member in self.order(f"{imi}@{version}"):
            try:
                manifest = await member.remote.manifest(imi, version, record)
            except Unavailable as error:
                errors.append(f"{member.url}: {error}")
                continue
            self._answered(member)
            return manifest
        if self.fallback is not None:
            raw = await self.fallback.fetch_object(manifest_object_path(record.digest), record.digest, imi=imi,
                                                   version=version, limit=MAX_MANIFEST,
                                                   attempt_timeout=60.0, deadline=120.0)
            return await trio.to_thread.run_sync(Manifest.from_bytes, raw, record.digest)
        raise Unavailable(f"manifest of {imi} v{version}: " + "; ".join(errors))

    async def prefetch(self, digests: list[str], imi: str, version: int) -> None:
        """Each cache is asked to prefetch its own share."""
        shares: dict[Member, list[str]] = {}
        for digest in digests:
            order = self.order(digest)
            if order:
                shares.setdefault(order[0], []).append(digest)
        for member, share in shares.items():
            await member.remote.prefetch(share, imi, version)

    async def profile(self, imi: str, version: int) -> Profile | None:
        for member in self.order(f"profile {imi}@{version}"):
            try:
                return await member.remote.profile(imi, version)
            except httpx.HTTPError as error:
                log.debug("profile from %s: %s", member.url, error)
        return None

    async def save_profile(self, imi: str, version: int, digests: list[str]) -> bool:
        for member in self.order(f"profile {imi}@{version}"):
            try:
                return await member.remote.save_profile(imi, version, digests)
            except httpx.HTTPError as error:
                log.debug("saving the profile through %s: %s", member.url, error)
        return False

    # --- background ----------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        """Ask every cache that is down whether it answers again."""
        while True:
            await trio.sleep(PROBE_EVERY)
            for member in [m for m in self.members if not m.up]:
                try:
                    await member.remote.client.ping(member.url, timeout=self.attempt_timeout)
                except FetchFailure:
                    continue
                self._answered(member)

    async def _upstreams_loop(self) -> None:
        """Keep the replicas the caches fill from, for when none of them answers."""
        assert self.upstreams is not None
        while True:
            for member in self.order("upstreams"):
                if not member.up:
                    continue
                try:
                    nodes = await member.remote.upstream_list()
                except (httpx.HTTPError, ValueError) as error:
                    log.debug("upstream list from %s: %s", member.url, error)
                    continue
                self.upstreams.update(nodes)
                break
            await trio.sleep(UPSTREAMS_EVERY)

    def freshness(self) -> dict:
        """How old the catalogue is (now - when the master signed it) and its serial."""
        return self.members[0].remote.trust.freshness()

    def status(self) -> dict:
        now = self.clock()
        degraded = self.counters.degraded_seconds
        if self.counters.degraded_since is not None:
            degraded += now - self.counters.degraded_since
        return {
            "caches": [m.describe(now) for m in self.members],
            "failovers": self.counters.failovers,
            "fallback": "on" if self.fallback is not None else "off",
            "fallback_blocks": self.counters.fallback_blocks,
            "fallback_errors": self.counters.fallback_errors,
            "degraded_seconds": round(degraded, 1),
            "replicas_known": len(self.upstreams) if self.upstreams is not None else 0,
        }
