"""Get-or-fetch: serve a block from the local store, or fetch it once from the
best upstream, fail over on errors, store it, and hand it to every reader
that asked for it meanwhile (single-flight).

Every lookup, hit or miss, runs as a *flight* task in the Fetcher's own
nursery, registered under its digest until it has finished (including the
store put). A reader that finds a flight for its digest waits for it instead of
starting another, so N concurrent reads of a cold block cost one upstream
request, and a reader that is cancelled only stops waiting: the flight, owned
by the Fetcher, carries on for the others. The protocol is in docs/CACHE.md.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field

import trio

from icbdcore.flights import Flight, Flights
from icbdcore.logs import current_request_id, request_id
from icbdcore.metrics import observe_fetch
from icbdcore.source import Unavailable
from icbdcore.wire import MAX_BATCH, block_path, check_digest, check_name, parse_version

from .blockclient import MAX_BLOCK, BlockClient, FetchFailure, NotHeld
from .blockstore import STORE_ERRORS, BlockStore
from .upstreams import Upstreams

log = logging.getLogger(__name__)

LATENCY_SAMPLES = 4096  # the most recent get() latencies kept for p50/p99
# A prefetch asks its upstreams for this many blocks per request (a batch),
# `concurrency` blocks in flight in all.
PREFETCH_BATCH = 8
# FetchFailure.kind -> the counter it bumps
_COUNTER = {"not_held": "not_held", "host": "host_failures", "gateway": "host_failures", "timeout": "timeouts",
            "corrupt": "corrupt"}


@dataclass
class PrefetchProgress:
    """Counts of one prefetch, updated as it goes (read it from anywhere)."""

    total: int
    imi: str | None = None
    version: int | None = None
    already: int = 0  # in the store before we started
    in_flight: int = 0  # being fetched by someone else: not waited for
    fetched: int = 0
    failed: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.time)
    finished: float | None = None

    @property
    def done(self) -> int:
        return self.already + self.in_flight + self.fetched + self.failed

    def to_json(self) -> dict:
        return {**asdict(self), "done": self.done}


class Fetcher:
    """Use as `async with Fetcher(store, upstreams, client) as fetcher:`.

    With no store (None), blocks are fetched and handed over but not kept: a
    mount that reads straight from the replicas when no cache server answers.
    """

    def __init__(
        self,
        store: BlockStore | None,
        upstreams: Upstreams,
        client: BlockClient,
        *,
        store_threads: int = 8,
        attempt_timeout: float = 5.0,
        deadline: float = 20.0,
        retry_pause: float = 0.25,
    ):
        self.store = store
        self.upstreams = upstreams
        self.client = client
        self.attempt_timeout = attempt_timeout  # one request to one upstream
        self.deadline = deadline  # everything one flight may try before Unavailable
        self.retry_pause = retry_pause
        self._store_limiter = trio.CapacityLimiter(store_threads)
        # One flight per digest. A flight is answered once the block is known
        # (readers go on) and finished once it is stored: until then the
        # digest stays taken, so no second fetch starts. A prefetch's flight
        # that finds the block stored answers None (no data, no error).
        self._inflight: Flights[str, bytes] = Flights()
        self._nursery: trio.Nursery | None = None
        self._stack = AsyncExitStack()
        self._latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.prefetches: deque[PrefetchProgress] = deque(maxlen=8)
        self.counts = dict.fromkeys(
            ("gets", "hits", "hit_bytes", "coalesced", "demand_fetches", "demand_bytes", "prefetched",
             "upstream_bytes",
             "failovers", "not_held", "host_failures", "timeouts", "corrupt", "unavailable",
             "store_errors"), 0)

    async def __aenter__(self) -> Fetcher:
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._inflight.attach(self._nursery)
        return self

    async def __aexit__(self, *exc) -> bool | None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        self._nursery = None
        return await self._stack.__aexit__(*exc)

    # --- reading -------------------------------------------------------------

    async def get(self, digest: str, *, imi: str | None = None, version: int | None = None,
                  rid: str | None = None) -> bytes:
        """The verified bytes of a block; raises Unavailable within `deadline`.
        `rid`: the block fetch's request id (default: the current one), passed
        on to the upstream if the block has to be fetched."""
        check_digest(digest)
        _check_hints(imi, version)
        started = time.perf_counter()
        self.counts["gets"] += 1
        rid = rid or current_request_id()
        while True:
            flight = self._inflight.get(digest)
            if flight is None:
                flight = self._launch(digest, imi, version, rid)
            else:
                self.counts["coalesced"] += 1
            await flight.answered.wait()
            if flight.error is not None:
                self.counts["unavailable"] += 1
                raise Unavailable(str(flight.error))
            if flight.value is not None:
                self._latencies.append(time.perf_counter() - started)
                return flight.value
            # We joined a prefetch that found the block stored: read it ourselves.

    async def get_many(self, digests: list[str], *, imi: str | None = None,
                       version: int | None = None, rid: str | None = None) -> list[bytes | None]:
        """get() of several blocks at once, in order, None for a block that
        is unavailable: one store lookup for them all, and the missing ones
        from the upstreams in one batch request (blocks the batch does not
        bring are fetched one by one, with the usual failover)."""
        for digest in digests:
            check_digest(digest)
        _check_hints(imi, version)
        rid = rid or current_request_id()
        started = time.perf_counter()
        self.counts["gets"] += len(digests)
        flights: dict[str, Flight[bytes]] = {}
        new = []
        for digest in dict.fromkeys(digests):
            flight = self._inflight.get(digest)
            if flight is None:
                new.append(digest)
            else:
                self.counts["coalesced"] += 1
                flights[digest] = flight
        if new:
            flights.update(self._launch_group(new, imi, version, prefetch=False, rid=rid))
        out: list[bytes | None] = []
        for digest in digests:
            flight = flights[digest]
            await flight.answered.wait()
            if flight.error is not None:
                self.counts["unavailable"] += 1
                out.append(None)
            elif flight.value is None:  # joined a prefetch that found it stored
                try:
                    out.append(await self.get(digest, imi=imi, version=version, rid=rid))
                except Unavailable:
                    out.append(None)
            else:
                out.append(flight.value)
        self._latencies.append(time.perf_counter() - started)
        return out

    def _launch_group(self, digests: list[str], imi: str | None, version: int | None, *,
                      prefetch: bool, rid: str | None = None) -> dict[str, Flight[bytes]]:
        """One flight per digest, one task for them all: the store, then one
        batch from the upstreams, then the rest one by one."""
        if self._nursery is None:
            raise RuntimeError("Fetcher used outside `async with`")

        async def fly(flights: dict[str, Flight[bytes]]) -> None:
            with request_id(rid):
                await fetch(flights)

        async def fetch(flights: dict[str, Flight[bytes]]) -> None:
            missing = list(flights)
            if not prefetch:  # a prefetch knows what is stored already (and must not promote it)
                stored = await self._store_get_many(missing)
                for digest, data in stored.items():
                    self._hit(digest, data)
                    flights[digest].answer(data)
                missing = [d for d in missing if d not in stored]
            if not missing:
                return
            got = await self._from_upstreams_many(missing, imi, version, rid)
            for digest, data in got.items():
                self._fetched(data, prefetch)
                flights[digest].answer(data)  # readers go on; the flights stay registered until stored
            rest = [d for d in missing if d not in got]
            async with trio.open_nursery() as nursery:
                if got:
                    nursery.start_soon(self._store_put_many, got)
                for digest in rest:
                    nursery.start_soon(self._fly_rest, flights[digest], digest, imi, version, prefetch, rid)

        return self._inflight.start_group(digests, fly)

    async def _fly_rest(self, flight: Flight[bytes], digest: str, imi: str | None, version: int | None,
                        prefetch: bool, rid: str | None) -> None:
        """A block of a group the batch did not bring: alone, failing only its own flight."""
        try:
            await self._fly_one(flight, digest, imi, version, prefetch, rid)
        except Unavailable as error:
            flight.fail(error)

    async def _fly_one(self, flight: Flight[bytes], digest: str, imi: str | None, version: int | None,
                       prefetch: bool, rid: str | None) -> None:
        """Fetch one block from the upstreams (failover, backoff), answer it, store it."""
        data = await self._from_upstreams(block_path(digest, imi, version), digest, imi, version, MAX_BLOCK,
                                          rid=rid)
        self._fetched(data, prefetch)
        flight.answer(data)
        await self._store_put(digest, data)

    def _hit(self, digest: str, data: bytes) -> None:
        self.counts["hits"] += 1
        self.counts["hit_bytes"] += len(data)
        log.debug("block %s: in the store", digest)

    def _fetched(self, data: bytes, prefetch: bool) -> None:
        if prefetch:
            self.counts["prefetched"] += 1
        else:
            self.counts["demand_fetches"] += 1
            self.counts["demand_bytes"] += len(data)
        self.counts["upstream_bytes"] += len(data)

    def _launch(self, digest: str, imi: str | None, version: int | None, rid: str | None = None) -> Flight[bytes]:
        if self._nursery is None:
            raise RuntimeError("Fetcher used outside `async with`")

        async def fly(flight: Flight[bytes]) -> None:
            with request_id(rid):
                data = await self._store_get(digest)
                if data is not None:
                    self._hit(digest, data)
                    flight.answer(data)
                    return
                await self._fly_one(flight, digest, imi, version, False, rid)

        flight, _ = self._inflight.start(digest, fly)
        return flight

    async def fetch_object(self, path: str, digest: str, *, imi: str | None, version: int | None,
                           limit: int, attempt_timeout: float, deadline: float) -> bytes:
        """An immutable object other than a block (a manifest) at `path` on the
        upstreams, verified against `digest`, with the same backoff and
        failover as blocks but bounds of its own (a manifest may be tens of
        MiB); not kept in the block store. Raises Unavailable."""
        return await self._from_upstreams(path, digest, imi, version, limit, attempt_timeout, deadline,
                                          rid=current_request_id(), block=False)

    async def _from_upstreams_many(self, digests: list[str], imi: str | None,
                                   version: int | None, rid: str | None = None) -> dict[str, bytes]:
        """What the upstreams deliver of `digests` in batches, asking each
        candidate in order for what is still missing; one try each, no
        waiting: the caller fetches the rest one by one, with backoff. Stops
        at the first candidate that takes no batches (an HTTP cache in front
        of a node answers them 404: a batch is not an object it could keep),
        so that the rest go to it one by one, in the order of preference."""
        got: dict[str, bytes] = {}
        missing = list(digests)
        with trio.move_on_after(self.deadline):
            for tried, up in enumerate(self.upstreams.candidates(imi, version)):
                if not up.batches:
                    break
                if tried:
                    self.counts["failovers"] += 1  # what is missing is asked of the next candidate
                for start in range(0, len(missing), MAX_BATCH):
                    batch = missing[start:start + MAX_BATCH]
                    began = time.perf_counter()
                    try:
                        found = await self.client.fetch_many(up.url, batch, imi=imi, version=version,
                                                             timeout=self.attempt_timeout, rid=rid)
                    except NotHeld:
                        log.info("%s takes no batches of blocks: asking it for one block at a time", up.id)
                        up.batches = False
                        return got
                    except FetchFailure as error:
                        self.upstreams.failed(up, error)
                        self.counts[_COUNTER[error.kind]] += 1
                        break  # the next upstream, for all that is missing
                    if found:
                        seconds = time.perf_counter() - began
                        self.upstreams.succeeded(up, seconds, sum(map(len, found.values())))
                        for _ in found:  # each block of the batch took the batch's time to come
                            observe_fetch(up.id, seconds)
                    got.update(found)
                missing = [d for d in missing if d not in got]
                if not missing:
                    break
        return got

    async def _from_upstreams(self, path: str, digest: str, imi: str | None, version: int | None,
                              limit: int, attempt_timeout: float | None = None,
                              deadline: float | None = None, *, rid: str | None = None,
                              block: bool = True) -> bytes:
        """GET `path` from the candidates in order, round after round, until
        one delivers bytes that match `digest`, none holds them, or the
        deadline passes."""
        attempt_timeout = attempt_timeout or self.attempt_timeout
        tried: list[str] = []
        pause = self.retry_pause
        attempts = 0
        with trio.move_on_after(deadline or self.deadline):
            while True:
                candidates = self.upstreams.candidates(imi, version)
                if not candidates:
                    tried.append("no upstream is known (is the master reachable?)")
                    break
                anyone_failed = False
                for up in candidates:
                    attempts += 1
                    if attempts > 1:
                        self.counts["failovers"] += 1
                    started = time.perf_counter()
                    try:
                        data = await self.client.get(up.url + path, digest, limit=limit,
                                                    timeout=attempt_timeout, rid=rid)
                    except FetchFailure as error:
                        self.upstreams.failed(up, error)
                        self.counts[_COUNTER[error.kind]] += 1
                        anyone_failed |= error.kind != "not_held"
                        tried.append(f"{up.id}: {error.why}")
                        log.debug("%s from %s failed: %s", path, up.id, error.why)
                        continue
                    seconds = time.perf_counter() - started
                    self.upstreams.succeeded(up, seconds, len(data))
                    if block:  # the latency histogram is of blocks (a manifest may be MiBs)
                        observe_fetch(up.id, seconds)
                    log.debug("%s: %d bytes from %s in %.1f ms", path, len(data), up.id, seconds * 1000)
                    return data
                if not anyone_failed:
                    break  # every upstream answered that it lacks the block: waiting will not help
                await trio.sleep(pause)
                pause = min(2 * pause, 2.0)
        if len(tried) > 6:
            tried = [*tried[:3], f"... {len(tried) - 6} more ...", *tried[-3:]]
        raise Unavailable(f"{path} unavailable after {attempts} requests: " + "; ".join(tried))

    # --- the store, in worker threads ---------------------------------------------

    async def _store_get(self, digest: str) -> bytes | None:
        return (await self._store_get_many([digest])).get(digest)

    async def _store_get_many(self, digests: list[str]) -> dict[str, bytes]:
        """The stored blocks among `digests`, in one worker thread call."""
        if self.store is None:
            return {}
        store = self.store

        def get_all() -> dict[str, bytes]:
            found = {}
            for digest in digests:
                try:
                    data = store.get(digest)
                except STORE_ERRORS as error:
                    self.counts["store_errors"] += 1
                    log.error("block store read of %s failed (%s); fetching it instead", digest, error)
                    continue
                if data is not None:
                    found[digest] = data
            return found

        return await trio.to_thread.run_sync(get_all, limiter=self._store_limiter)

    async def _store_put(self, digest: str, data: bytes) -> None:
        await self._store_put_many({digest: data})

    async def _store_put_many(self, blocks: dict[str, bytes]) -> None:
        """Store blocks checked on arrival, in one worker thread call."""
        if self.store is None:
            return
        store = self.store

        def put_all() -> None:
            for digest, data in blocks.items():
                try:
                    # The client checked `data` against `digest` (BLAKE3) as it arrived: once is enough.
                    store.put(digest, data, verified=True)
                except STORE_ERRORS as error:
                    self.counts["store_errors"] += 1
                    log.error("block store write of %s failed (%s); served it without keeping it", digest, error)

        await trio.to_thread.run_sync(put_all, limiter=self._store_limiter)

    # --- prefetching ---------------------------------------------------------

    async def prefetch(
        self,
        digests: Iterable[str],
        *,
        imi: str | None = None,
        version: int | None = None,
        concurrency: int = 16,
        progress: PrefetchProgress | None = None,
    ) -> PrefetchProgress:
        """Warm the store with these blocks, `concurrency` at a time, skipping
        those already stored or in flight; failures are counted, not raised."""
        wanted = [check_digest(d) for d in dict.fromkeys(digests)]
        _check_hints(imi, version)
        if progress is None:
            progress = PrefetchProgress(len(wanted), imi, version)
            self.prefetches.append(progress)
        todo = [d for d in wanted if d not in self._inflight]
        progress.in_flight += len(wanted) - len(todo)
        try:
            missing = todo if self.store is None else await trio.to_thread.run_sync(
                self.store.missing, todo, limiter=self._store_limiter)
        except STORE_ERRORS:
            self.counts["store_errors"] += 1
            missing = todo
        progress.already += len(todo) - len(missing)
        batches = iter([missing[i:i + PREFETCH_BATCH] for i in range(0, len(missing), PREFETCH_BATCH)])

        async def worker() -> None:
            for batch in batches:
                free = [d for d in batch if d not in self._inflight]
                progress.in_flight += len(batch) - len(free)
                if free and self.store is not None:
                    # A reader may have fetched and stored some since the prefetch began.
                    try:
                        stored_now = set(free) - set(await trio.to_thread.run_sync(
                            self.store.missing, free, limiter=self._store_limiter))
                    except STORE_ERRORS:
                        self.counts["store_errors"] += 1
                        stored_now = set()
                    progress.already += len(stored_now)
                    free = [d for d in free if d not in stored_now]
                if not free:
                    continue
                flights = self._launch_group(free, imi, version, prefetch=True)
                for flight in flights.values():
                    await flight.finished.wait()
                    if flight.error is not None:
                        progress.failed += 1
                    elif flight.value is None:
                        progress.already += 1
                    else:
                        progress.fetched += 1
                        progress.bytes += len(flight.value)

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(max(1, -(-concurrency // PREFETCH_BATCH))):
                    nursery.start_soon(worker)
        finally:
            progress.finished = time.time()
        if progress.failed:
            log.warning("prefetch of %s v%s: %d of %d blocks failed", imi, version, progress.failed, progress.total)
        return progress

    def start_prefetch(
        self,
        digests: Iterable[str],
        *,
        imi: str | None = None,
        version: int | None = None,
        concurrency: int = 16,
    ) -> PrefetchProgress:
        """Start a prefetch in the Fetcher's nursery; returns its progress at once."""
        if self._nursery is None:
            raise RuntimeError("Fetcher used outside `async with`")
        digests = list(digests)
        progress = PrefetchProgress(len(set(digests)), imi, version)
        self.prefetches.append(progress)

        async def run() -> None:
            try:
                await self.prefetch(digests, imi=imi, version=version, concurrency=concurrency,
                                    progress=progress)
            except Exception:
                log.exception("prefetch of %s v%s failed", imi, version)

        self._nursery.start_soon(run)
        return progress

    # --- reporting -----------------------------------------------------------

    def stats(self) -> dict:
        latencies = sorted(self._latencies)

        def quantile(q: float) -> float | None:
            if not latencies:
                return None
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 3)

        return {
            **self.counts,
            "in_flight": len(self._inflight),
            "get_ms_p50": quantile(0.50),
            "get_ms_p99": quantile(0.99),
            "latency_samples": len(latencies),
            "prefetches": [p.to_json() for p in self.prefetches],
            **self.upstreams.stats(),
        }


def _check_hints(imi: str | None, version: int | None) -> None:
    """Refuse bad hints here, with InvalidInput, rather than deep in a flight."""
    if imi is not None:
        check_name(imi)
    if version is not None:
        parse_version(version)
