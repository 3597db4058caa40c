"""The mount's memory cache of whole blocks (icbdfs/blockcache.py) over an
in-memory source, under trio's virtual clock: no FUSE, no kernel, no root."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from icbdcore.source import Unavailable
from icbdcore.wire import content_digest
from icbdfs.blockcache import GAVE_UP_MEMO, BlockCache

BLOCK = 1000


class MemorySource:
    """The block part of an ImageSource, over a dict; `delay` per call,
    `failing` digests raise Unavailable, `calls` counts by digest."""

    def __init__(self, count: int = 8):
        self.data = [bytes([i]) * BLOCK for i in range(count)]
        self.digests = [content_digest(d) for d in self.data]
        self.by_digest = dict(zip(self.digests, self.data, strict=True))
        self.calls: Counter[str] = Counter()
        self.batches: list[list[str]] = []
        self.delay = 0.0
        self.failing: set[str] = set()

    async def block(self, digest: str, imi: str, version: int) -> bytes:
        self.calls[digest] += 1
        if self.delay:
            await trio.sleep(self.delay)
        if digest in self.failing:
            raise Unavailable(f"no block {digest}")
        return self.by_digest[digest]

    async def blocks(self, digests: list[str], imi: str, version: int) -> list[bytes | None]:
        """A batch: one call, one delay."""
        self.batches.append(list(digests))
        for digest in digests:
            self.calls[digest] += 1
        if self.delay:
            await trio.sleep(self.delay)
        return [None if d in self.failing else self.by_digest[d] for d in digests]

    async def prefetch(self, digests: list[str], imi: str, version: int) -> None:
        pass


@asynccontextmanager
async def memory(source: MemorySource, blocks: int = 4, *, fetch_timeout: float = 20.0
                 ) -> AsyncIterator[tuple[BlockCache, Counter[str]]]:
    """A cache with room for `blocks` blocks, its flights in a nursery of its own."""
    stats: Counter[str] = Counter()
    async with trio.open_nursery() as nursery:
        yield BlockCache(source, nursery, capacity=blocks * BLOCK, fetch_timeout=fetch_timeout, stats=stats), stats
        nursery.cancel_scope.cancel()


async def get(cache: BlockCache, *digests: str) -> list[bytes]:
    return await cache.get(digests, "img", 1)


# --- single flight -----------------------------------------------------------------

async def test_readers_of_a_cold_block_share_one_fetch(autojump_clock):
    source = MemorySource()
    source.delay = 1.0
    d = source.digests[0]
    async with memory(source) as (cache, stats):
        got = []

        async def reader() -> None:
            got.extend(await get(cache, d))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(reader)
        assert got == [source.data[0]] * 10
        assert source.calls[d] == 1
        assert stats["coalesced"] == 9 and stats["source_blocks"] == 1
        assert await get(cache, d) == [source.data[0]] and source.calls[d] == 1, "now in memory"


async def test_blocks_of_one_read_are_fetched_in_one_batch(autojump_clock):
    source = MemorySource()
    source.delay = 1.0
    async with memory(source, 8) as (cache, stats):
        await get(cache, source.digests[1])
        started = trio.current_time()
        assert await get(cache, *source.digests[:4]) == source.data[:4]
        assert trio.current_time() - started == pytest.approx(1.0)
        assert source.batches == [[source.digests[0], *source.digests[2:4]]], "one request for the missing ones"
        assert stats["source_batches"] == 1


async def test_a_block_a_batch_does_not_bring_fails_alone(autojump_clock):
    source = MemorySource()
    source.failing.add(source.digests[2])
    async with memory(source, 8) as (cache, _):
        cache.warm(source.digests[:4], "img", 1)
        await trio.sleep(0.1)
        assert await get(cache, source.digests[0], source.digests[3]) == [source.data[0], source.data[3]]
        with pytest.raises(Unavailable):
            await get(cache, source.digests[2])


async def test_a_reader_that_leaves_cancels_nothing(autojump_clock):
    source = MemorySource()
    source.delay = 2.0
    d = source.digests[0]
    async with memory(source) as (cache, _):
        with trio.move_on_after(1.0):
            await get(cache, d)
        await trio.sleep(1.5)
        assert d in cache, "the fetch went on without its reader"
        assert source.calls[d] == 1


# --- bounded memory and eviction order --------------------------------------------------

async def test_memory_is_bounded_and_least_recent_goes_first():
    source = MemorySource()
    a, b, c, d, e = source.digests[:5]
    async with memory(source, 3) as (cache, stats):
        await get(cache, a)
        await get(cache, b)
        await get(cache, c)
        assert cache.peek(a) == source.data[0], "a hit makes `a` the most recent"
        await get(cache, d)
        assert b not in cache and all(x in cache for x in (a, c, d))
        await get(cache, e)
        assert c not in cache
        assert len(cache) == 3 and cache.nbytes == 3 * BLOCK
        assert cache.peek(b) is None
        assert (stats["lru_hits"], stats["lru_misses"]) == (1, 1)
        await get(cache, b)
        assert stats["refetched_blocks"] == 1 and source.calls[b] == 2


async def test_fully_served_blocks_go_before_least_recent_ones():
    source = MemorySource()
    a, b, c, d, e = source.digests[:5]
    async with memory(source, 3) as (cache, _):
        for digest in (a, b, c):  # one at a time: parallel fetches store in any order
            await get(cache, digest)
        cache.served(a, BLOCK // 2)  # the kernel will be back for the rest of `a`
        cache.served(c, BLOCK // 2)
        cache.served(c, BLOCK // 2)  # all of `c` went to the kernel: it keeps those pages
        await get(cache, d)
        assert c not in cache and a in cache and b in cache, "the newest, but fully served"
        await get(cache, e)
        assert a not in cache and b in cache, "then the least recently used"


async def test_a_block_larger_than_memory_is_returned_not_kept():
    source = MemorySource()
    d = source.digests[0]
    async with memory(source, 0) as (cache, stats):
        assert await get(cache, d) == [source.data[0]]
        assert d not in cache and cache.nbytes == 0
        assert stats["source_blocks"] == 1


async def test_blocks_warmed_ahead_and_evicted_unread_are_counted():
    source = MemorySource()
    digests = source.digests
    async with memory(source, 2) as (cache, stats):
        assert cache.warm(digests[:2], "img", 1) == 2
        assert cache.warm(digests[:2], "img", 1) == 0, "already in flight"
        await trio.testing.wait_all_tasks_blocked()
        assert cache.warm(digests[:2], "img", 1) == 0, "already in memory"
        assert cache.peek(digests[0]) is not None  # read
        await get(cache, digests[2], digests[3])  # evicts both warmed blocks
        assert stats["readahead_unread"] == 1


# --- failures ---------------------------------------------------------------------------

async def test_a_failure_is_not_cached():
    source = MemorySource()
    d = source.digests[0]
    source.failing.add(d)
    async with memory(source) as (cache, stats):
        with pytest.raises(Unavailable):
            await get(cache, d)
        assert d not in cache and stats["source_errors"] == 1
        source.failing.clear()
        assert await get(cache, d) == [source.data[0]]
        assert source.calls[d] == 2, "the next request tried again"


async def test_a_flight_is_bounded_by_the_fetch_timeout(autojump_clock):
    source = MemorySource()
    source.delay = 100.0
    d = source.digests[0]
    async with memory(source, fetch_timeout=5.0) as (cache, _):
        started = trio.current_time()
        with pytest.raises(Unavailable):
            await get(cache, d)
        assert trio.current_time() - started == pytest.approx(5.0)
        source.delay = 0.0
        assert await get(cache, d) == [source.data[0]] and source.calls[d] == 2


async def test_a_block_given_up_on_is_refused_for_a_moment(autojump_clock):
    source = MemorySource()
    source.delay = 100.0  # longer than any reader waits; the flight ends at fetch_timeout
    d = source.digests[0]
    async with memory(source, fetch_timeout=5.0) as (cache, _):
        with trio.move_on_after(1.0):
            await get(cache, d)
        cache.give_up([d])
        started = trio.current_time()
        with pytest.raises(Unavailable, match="gave up"):
            await get(cache, d)
        assert trio.current_time() == started, "refused at once, not after another wait"
        await trio.sleep(GAVE_UP_MEMO)
        with trio.move_on_after(0.5) as waited:
            await get(cache, d)
        assert waited.cancelled_caught, "after the memo, the reader waits on the fetch again"
        assert source.calls[d] == 1, "and joins the fetch still running"


async def test_a_block_given_up_on_is_served_if_it_arrives_meanwhile(autojump_clock):
    source = MemorySource()
    source.delay = 1.5
    d = source.digests[0]
    async with memory(source) as (cache, _):
        with trio.move_on_after(1.0):
            await get(cache, d)
        cache.give_up([d])
        await trio.sleep(1.0)  # the block arrives, within the memo
        assert await get(cache, d) == [source.data[0]]
        cache.give_up([d])
        assert await get(cache, d) == [source.data[0]], "a block in memory is never refused"


# --- following a boot profile ----------------------------------------------------------

async def test_follow_stays_a_window_ahead_of_the_readers(autojump_clock):
    source = MemorySource()
    digests = source.digests[:6]
    async with memory(source, 8) as (cache, stats), trio.open_nursery() as nursery:
        done: list[int] = []

        async def follow() -> None:
            done.append(await cache.follow(digests, "img", 1, window=2, concurrency=4, idle=30.0))

        nursery.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        assert [source.calls[d] for d in digests] == [1, 1, 0, 0, 0, 0]
        for index in range(6):
            assert cache.peek(digests[index]) is not None, f"block {index} was not in memory"
            await trio.testing.wait_all_tasks_blocked()
            assert sum(source.calls[d] for d in digests) == min(6, index + 3)
        assert done == [6] and stats["follow_blocks"] == 6
        assert stats["follow_idle_stops"] == 0


async def test_follow_skips_blocks_in_memory_and_stops_when_nobody_reads(autojump_clock):
    source = MemorySource()
    digests = source.digests[:6]
    async with memory(source, 8) as (cache, stats):
        await get(cache, digests[0])
        started = trio.current_time()
        fetched = await cache.follow(digests, "img", 1, window=2, concurrency=4, idle=3.0)
        assert fetched == 2 and [source.calls[d] for d in digests] == [1, 1, 1, 0, 0, 0]
        assert trio.current_time() - started == pytest.approx(3.0)
        assert stats["follow_idle_stops"] == 1 and stats["follow_blocks"] == 2
