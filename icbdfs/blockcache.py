"""Recent whole blocks in memory, each fetched once however many readers ask.

The kernel sends buffered reads in 128 KiB requests, so a reader of one 1 MiB
block asks for it eight times in a row, and its readahead requests may arrive
while the first one is still being fetched. Keeping recent blocks whole costs
one source call per block and no re-hash: the source verified it on arrival.

Protocol (the invariants the code keeps):

- A digest is absent, in flight (`Flights`, icbdcore/flights.py), stored
  (`_blocks`), or briefly both in flight and stored while a flight finishes:
  a fetch stores the block, then answers its readers, then leaves the table.
- A flight runs in a task of the owner's nursery, not in the task of the
  reader that started it: a reader that gives up (its own timeout) cancels
  neither the fetch nor the other readers waiting on it, nor readahead.
- A flight is bounded by `fetch_timeout`. When it ends, with data or an error,
  it leaves the table, so the next request after a failure tries again.
- Stored bytes never exceed `capacity`. Blocks whose every byte the kernel
  has taken go first (the kernel keeps those pages, `keep_cache`, and will not
  ask again), then the least recently used. Without that order a boot whose
  working set is larger than the cache (150 MiB against 64 MiB) fetched 1.75
  times its blocks: partly read blocks and blocks warmed ahead were evicted
  before the reads that needed them; with it, the fetches match the reads.
  The store only grows from a finished fetch, so a block is never half there.
- `follow` pulls a list of blocks (a boot profile) into memory in order,
  keeping at most `window` blocks fetched ahead and not yet read. It waits
  for readers to take blocks before it fetches more, so it never evicts what
  it fetched itself, and it stops when readers stop taking blocks.
- A block a reader gave up on (`give_up`) is refused at once for
  `GAVE_UP_MEMO` seconds unless it arrives meanwhile: the kernel answers an
  EIO on a readahead page by asking for that page again, and without the memo
  the reader would wait twice the timeout.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable

import trio

from icbdcore.flights import Flight, Flights
from icbdcore.logs import new_request_id, request_id
from icbdcore.source import ImageSource, Unavailable

log = logging.getLogger(__name__)

GAVE_UP_MEMO = 2.0
FOLLOW_BATCH = 8  # profile blocks `follow` asks the source for in one batch


class BlockCache:
    """A bounded LRU of whole verified blocks in front of an ImageSource."""

    def __init__(
        self,
        source: ImageSource,
        nursery: trio.Nursery,
        *,
        capacity: int,
        fetch_timeout: float,
        stats: Counter[str],
    ):
        self._source = source
        self._capacity = capacity
        self._blocks: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._flights: Flights[str, bytes] = Flights(nursery, fetch_timeout)
        self._stats = stats
        self._gave_up: dict[str, float] = {}  # digest -> until when it is refused
        # For the counters: blocks warmed ahead and not read yet, and recently
        # evicted ones (a fetch of one of those is a refetch).
        self._unread: set[str] = set()
        self._taken = trio.Event()  # set (and replaced) when a warmed block is read or evicted
        self._evicted: OrderedDict[str, None] = OrderedDict()
        self._served: dict[str, int] = {}  # bytes of a stored block handed to the kernel so far

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, digest: str) -> bool:
        return digest in self._blocks

    def peek(self, digest: str) -> bytes | None:
        """The block if it is in memory (a hit makes it most recent), else None."""
        data = self._blocks.get(digest)
        if data is None:
            self._stats["lru_misses"] += 1
            return None
        self._blocks.move_to_end(digest)
        self._stats["lru_hits"] += 1
        self._read(digest)
        return data

    async def get(self, digests: Iterable[str], imi: str, version: int) -> list[bytes]:
        """The blocks, from memory or from the source (all fetched in parallel);
        raises Unavailable.

        Unbounded in time by itself (each flight is bounded): callers wrap it
        in their own timeout.
        """
        digests = list(digests)
        flights: list[bytes | Flight[bytes] | str] = []
        missing = []
        for digest in digests:
            data = self._blocks.get(digest)
            if data is not None:
                self._blocks.move_to_end(digest)
                self._read(digest)
                flights.append(data)
                continue
            if self._gave_up and self._gave_up.get(digest, 0.0) > trio.current_time():
                raise Unavailable("a reader gave up on this block moments ago")
            if digest in self._flights:
                self._stats["coalesced"] += 1
            else:
                missing.append(digest)
            flights.append(digest)
        started = self._start(missing, imi, version)
        flights = [started.get(item) or self._flights.get(item) if isinstance(item, str) else item
                   for item in flights]
        out = []
        for item in flights:
            if item is None:  # a flight that ended between two steps above: it failed
                raise Unavailable("the fetch of a block ended without it")
            if isinstance(item, Flight):
                await item.answered.wait()
                item = item.result()
            out.append(item)
        return out

    def served(self, digest: str, count: int) -> None:
        """`count` bytes of a stored block went to the kernel; once all of
        them have, it is the first to go when room is needed."""
        data = self._blocks.get(digest)
        if data is None:
            return
        total = self._served.get(digest, 0) + count
        if total >= len(data):
            self._served.pop(digest, None)
            self._blocks.move_to_end(digest, last=False)
        else:
            self._served[digest] = total

    def give_up(self, digests: Iterable[str]) -> None:
        """Readers timed out waiting for these blocks: refuse them for a moment."""
        now = trio.current_time()
        if len(self._gave_up) > 4096:
            self._gave_up = {d: t for d, t in self._gave_up.items() if t > now}
        for digest in digests:
            if digest not in self._blocks:
                self._gave_up[digest] = now + GAVE_UP_MEMO

    def warm(self, digests: Iterable[str], imi: str, version: int) -> int:
        """Start fetching the blocks not in memory yet; returns how many were started."""
        wanted = [d for d in dict.fromkeys(digests) if d not in self._blocks and d not in self._flights]
        self._start(wanted, imi, version)
        self._unread.update(wanted)
        return len(wanted)

    async def follow(self, digests: Iterable[str], imi: str, version: int, *,
                     window: int, concurrency: int, idle: float) -> int:
        """Fetch these blocks into memory in order, at most `concurrency` at a
        time and at most `window` blocks ahead of the readers; returns how many
        it fetched. Gives up once readers have taken none of its blocks for
        `idle` seconds (the boot it was for has moved on)."""
        window = max(1, window)
        queue = deque(digests)
        groups: deque[Flight[bytes]] = deque()  # a flight of each group in flight (they finish together)
        started = 0
        while queue:
            while len(groups) >= concurrency:
                await groups.popleft().finished.wait()
            with trio.move_on_after(idle) as waited:
                while len(self._unread) >= window:
                    await self._taken.wait()
            if waited.cancelled_caught:
                self._stats["follow_idle_stops"] += 1
                break
            take: list[str] = []
            # Small batches first (1, 1, 2, 4, 8...), so the first blocks a boot needs come at once.
            batch = min(FOLLOW_BATCH, max(1, started))
            while queue and len(take) < min(window - len(self._unread), batch):
                digest = queue.popleft()
                if digest not in self._blocks and digest not in self._flights and digest not in take:
                    take.append(digest)
            if not take:
                continue
            flights = self._start(take, imi, version)
            self._unread.update(take)
            groups.append(flights[take[-1]])
            started += len(take)
        self._stats["follow_blocks"] += started
        return started

    def _start(self, digests: list[str], imi: str, version: int) -> dict[str, Flight[bytes]]:
        """Flights for blocks none is fetching yet: one request for one block,
        a batch (source.blocks) for several."""
        if len(digests) == 1:
            digest = digests[0]
            flight, _ = self._flights.fetch(digest, lambda: self._fetch(digest, imi, version))
            return {digest: flight}
        if not digests:
            return {}
        return self._flights.start_group(digests, lambda flights: self._fetch_group(flights, imi, version))

    def _read(self, digest: str) -> None:
        if digest in self._unread:
            self._unread.discard(digest)
            self._wake_followers()

    def _wake_followers(self) -> None:
        self._taken.set()
        self._taken = trio.Event()

    async def _fetch(self, digest: str, imi: str, version: int) -> bytes:
        self._stats["source_blocks"] += 1
        if self._evicted.pop(digest, False) is None:
            self._stats["refetched_blocks"] += 1
        # The first hop of a block fetch: its request id starts here and goes
        # with it to the cache server and on to the replica.
        with request_id(new_request_id()):
            try:
                data = await self._source.block(digest, imi, version)
                self._stats["source_bytes"] += len(data)
                self._store(digest, data)
                return data
            except Unavailable as error:
                self._stats["source_errors"] += 1
                log.warning("block %s of %s@%d: %s", digest, imi, version, error)
                raise
            finally:
                if digest not in self._blocks:  # failed, cancelled or too large: nobody will read it here
                    self._read(digest)

    async def _fetch_group(self, flights: dict[str, Flight[bytes]], imi: str, version: int) -> None:
        digests = list(flights)
        self._stats["source_blocks"] += len(digests)
        self._stats["source_batches"] += 1
        for digest in digests:
            if self._evicted.pop(digest, False) is None:
                self._stats["refetched_blocks"] += 1
        try:
            with request_id(new_request_id()):  # one id for the batch, on every hop it takes
                blocks = await self._source.blocks(digests, imi, version)
            for digest, data in zip(digests, blocks, strict=True):
                if data is None:
                    self._stats["source_errors"] += 1
                    flights[digest].fail(Unavailable(f"block {digest} unavailable"))
                    continue
                self._stats["source_bytes"] += len(data)
                self._store(digest, data)
                flights[digest].answer(data)
        except Unavailable:
            self._stats["source_errors"] += 1
            raise
        finally:
            for digest in digests:
                if digest not in self._blocks:  # failed, cancelled or too large: nobody will read it here
                    self._read(digest)

    def _store(self, digest: str, data: bytes) -> None:
        if len(data) > self._capacity or digest in self._blocks:
            return
        self._blocks[digest] = data
        self._bytes += len(data)
        while self._bytes > self._capacity:
            evicted, old = self._blocks.popitem(last=False)
            self._bytes -= len(old)
            self._served.pop(evicted, None)
            if evicted in self._unread:
                self._unread.discard(evicted)
                self._stats["readahead_unread"] += 1
                self._wake_followers()
            self._evicted[evicted] = None
            if len(self._evicted) > 8192:
                self._evicted.popitem(last=False)
