"""BlockClient and Fetcher against real HTTP block servers on loopback
(hypercorn + starlette standing in for replicas): single-flight, failover
when an upstream is down, corrupt or hanging, prefetch, and the bounds."""

from __future__ import annotations

import logging
import socket
from collections import Counter
from pathlib import Path

import hypercorn.config
import hypercorn.trio
import pytest
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cache.blockclient import BlockClient, CorruptBlock, HostFailure, NotHeld, UpstreamTimeout
from cache.blockstore import BlockStore
from cache.fetcher import Fetcher
from cache.upstreams import Upstreams
from icbdcore.clients import Credentials
from icbdcore.http import batch_response
from icbdcore.source import Unavailable
from icbdcore.wire import content_digest, parse_batch

TOKEN = "test-token-123"


class BlockServer:
    """A replica stand-in: serves the blocks in `folder` (file name = digest),
    counts requests, and misbehaves on demand: mode "corrupt" flips a byte,
    "hang" never answers; `delay` slows every answer; stop() closes the port."""

    def __init__(self, folder: Path, site: str, node_id: str):
        self.folder = folder
        self.site = site
        self.id = node_id
        self.mode = "ok"
        self.delay = 0.0
        self.requests: Counter[str] = Counter()
        self.queries: list[dict] = []
        self.batches: list[list[str]] = []  # each batch request's digests
        self.withheld: set[str] = set()  # held, but left out of batch answers
        self.url = ""
        self._shutdown = trio.Event()
        self._stopped = trio.Event()

    def add(self, data: bytes) -> str:
        digest = content_digest(data)
        (self.folder / digest).write_bytes(data)
        return digest

    def node(self, **extra) -> dict:
        return {"id": self.id, "role": "replica", "site": self.site, "url": self.url, "state": "alive",
                "versions": {"demo": [1, 2]}, **extra}

    def app(self) -> Starlette:
        async def status(request: Request) -> Response:
            return JSONResponse({"id": self.id, "role": "replica"})

        async def block(request: Request) -> Response:
            if request.headers.get("authorization") != f"Bearer {TOKEN}":
                return JSONResponse({"error": "token"}, status_code=401)
            digest = request.path_params["digest"]
            self.requests[digest] += 1
            self.queries.append(dict(request.query_params))
            if self.delay:
                await trio.sleep(self.delay)
            if self.mode == "hang":
                await trio.sleep_forever()
            path = self.folder / digest
            if len(digest) != 64 or not path.is_file():
                return JSONResponse({"error": "not here"}, status_code=404)
            data = path.read_bytes()
            if self.mode == "corrupt":
                data = bytes([data[0] ^ 1]) + data[1:]
            return Response(data, media_type="application/octet-stream")

        async def batch(request: Request) -> Response:
            if request.headers.get("authorization") != f"Bearer {TOKEN}":
                return JSONResponse({"error": "token"}, status_code=401)
            digests = parse_batch(request.query_params.get("d"))
            self.batches.append(digests)
            self.queries.append({k: v for k, v in request.query_params.items() if k != "d"})
            if self.delay:
                await trio.sleep(self.delay)
            if self.mode == "hang":
                await trio.sleep_forever()
            out = []
            for digest in digests:
                self.requests[digest] += 1
                path = self.folder / digest
                data = path.read_bytes() if path.is_file() and digest not in self.withheld else None
                if data is not None and self.mode == "corrupt":
                    data = bytes([data[0] ^ 1]) + data[1:]
                out.append(data)
            return batch_response(out)

        return Starlette(routes=[Route("/", status), Route("/v1/blocks", batch),
                                 Route("/v1/blocks/{digest}", block)])

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        config = hypercorn.config.Config()
        config.bind = ["127.0.0.1:0"]
        config.graceful_timeout = 0.2
        config.accesslog = None
        try:
            await hypercorn.trio.serve(self.app(), config, shutdown_trigger=self._shutdown.wait,
                                       task_status=task_status)
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        self._shutdown.set()
        await self._stopped.wait()


async def start_server(nursery: trio.Nursery, tmp_path: Path, node_id: str, site: str = "a") -> BlockServer:
    folder = tmp_path / node_id
    folder.mkdir()
    server = BlockServer(folder, site, node_id)
    binds = await nursery.start(server.serve)
    server.url = binds[0]
    return server


def refused_url() -> str:
    """A loopback URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def client():
    c = BlockClient(Credentials(TOKEN), connections=16, connect_timeout=1.0, read_timeout=5.0)
    yield c
    c.close()


@pytest.fixture
def store(tmp_path):
    s = BlockStore(tmp_path / "store", 64 << 20)
    yield s
    s.close()


def fetcher_for(store, client, nodes: list[dict], **kwargs) -> Fetcher:
    upstreams = Upstreams("a")
    upstreams.update(nodes)
    kwargs.setdefault("attempt_timeout", 2.0)
    kwargs.setdefault("deadline", 5.0)
    # Long pauses between rounds: failover must happen within a round, at once.
    kwargs.setdefault("retry_pause", 10.0)
    return Fetcher(store, upstreams, client, **kwargs)


# --- BlockClient ------------------------------------------------------------


async def test_client_classifies_failures(nursery, tmp_path, client):
    server = await start_server(nursery, tmp_path, "r1")
    digest = server.add(b"x" * 5000)
    assert await client.fetch(server.url, digest, imi="demo", version=2) == b"x" * 5000
    assert server.queries[-1] == {"imi": "demo", "version": "2"}
    with pytest.raises(NotHeld):
        await client.fetch(server.url, content_digest(b"absent"))
    server.mode = "corrupt"
    with pytest.raises(CorruptBlock):
        await client.fetch(server.url, digest)
    server.mode = "hang"
    with trio.fail_after(3):
        with pytest.raises(UpstreamTimeout):
            await client.fetch(server.url, digest, timeout=0.3)
    with pytest.raises(HostFailure):
        await client.fetch(refused_url(), digest)
    wrong = BlockClient(Credentials("another-token"))
    try:
        server.mode = "ok"
        with pytest.raises(HostFailure, match="refused our token"):
            await wrong.fetch(server.url, digest)
    finally:
        wrong.close()
    assert await client.ping(server.url) > 0


async def test_token_never_logged(nursery, tmp_path, client, store, caplog):
    server = await start_server(nursery, tmp_path, "r1")
    server.mode = "corrupt"
    digest = server.add(b"y" * 3000)
    with caplog.at_level(logging.DEBUG):
        async with fetcher_for(store, client, [server.node()], deadline=0.5) as fetcher:
            with pytest.raises(Unavailable) as failure:
                await fetcher.get(digest)
    assert "do not match the digest" in str(failure.value)
    assert caplog.text and TOKEN not in caplog.text and TOKEN not in str(failure.value)


# --- single flight ------------------------------------------------------------


async def test_concurrent_misses_cost_one_request(nursery, tmp_path, client, store):
    server = await start_server(nursery, tmp_path, "r1")
    server.delay = 0.2  # every reader arrives while the fetch is on the wire
    data = bytes(range(256)) * 4096  # 1 MiB
    digest = server.add(data)
    results = []
    async with fetcher_for(store, client, [server.node()]) as fetcher:

        async def read() -> None:
            results.append(await fetcher.get(digest, imi="demo", version=1))

        async with trio.open_nursery() as readers:
            for _ in range(20):
                readers.start_soon(read)
        assert results == [data] * 20
        assert server.requests[digest] == 1
        assert fetcher.counts["demand_fetches"] == 1 and fetcher.counts["coalesced"] == 19
        with trio.fail_after(2):
            while fetcher.stats()["in_flight"]:  # readers were answered before the store put
                await trio.sleep(0.01)
        assert await fetcher.get(digest) == data  # now a store hit
        assert server.requests[digest] == 1 and fetcher.counts["hits"] == 1
        assert fetcher.stats()["get_ms_p99"] >= fetcher.stats()["get_ms_p50"] > 0
    assert store.get(digest) == data


async def test_cancelled_reader_does_not_break_the_others(nursery, tmp_path, client, store):
    server = await start_server(nursery, tmp_path, "r1")
    server.delay = 0.3
    digest = server.add(b"z" * 70000)
    other = server.add(b"w" * 70000)
    async with fetcher_for(store, client, [server.node()]) as fetcher:
        got = []

        async def read(d: str) -> None:
            got.append(await fetcher.get(d))

        impatient = trio.CancelScope()

        async def impatient_reader() -> None:
            with impatient:
                await fetcher.get(digest)
                pytest.fail("the cancelled reader got an answer")

        async with trio.open_nursery() as readers:
            readers.start_soon(impatient_reader)  # starts the flight
            await trio.sleep(0.05)
            readers.start_soon(read, digest)
            readers.start_soon(read, digest)
            await trio.sleep(0.05)
            impatient.cancel()
        assert impatient.cancelled_caught
        assert got == [b"z" * 70000] * 2
        assert server.requests[digest] == 1

        # Every reader gone: the flight still finishes and keeps the block.
        with trio.move_on_after(0.05):
            await fetcher.get(other)
        with trio.fail_after(3):
            while other not in store:
                await trio.sleep(0.05)
        assert server.requests[other] == 1


# --- failover -----------------------------------------------------------------


async def test_failover_when_nearest_is_down(nursery, tmp_path, client, store):
    near = await start_server(nursery, tmp_path, "near", site="a")
    far = await start_server(nursery, tmp_path, "far", site="b")
    blocks = [bytes([i]) * 40000 for i in range(3)]
    digests = [s.add(b) for b in blocks for s in (near, far)][::2]
    async with fetcher_for(store, client, [far.node(), near.node()]) as fetcher:
        assert await fetcher.get(digests[0]) == blocks[0]
        assert near.requests[digests[0]] == 1 and far.requests[digests[0]] == 0  # same site first
        await near.stop()
        with trio.fail_after(2):
            assert await fetcher.get(digests[1]) == blocks[1]
        assert far.requests[digests[1]] == 1
        assert fetcher.counts["failovers"] == 1 and fetcher.counts["host_failures"] == 1
        # The failed host is backing off: the next miss goes straight to the far one.
        assert await fetcher.get(digests[2]) == blocks[2]
        assert fetcher.counts["failovers"] == 1
        assert [u.id for u in fetcher.upstreams.candidates()] == ["far", "near"]


async def test_failover_on_corrupt_data(nursery, tmp_path, client, store):
    bad = await start_server(nursery, tmp_path, "bad", site="a")
    good = await start_server(nursery, tmp_path, "good", site="b")
    bad.mode = "corrupt"
    data = b"q" * 300000
    digest = bad.add(data)
    good.add(data)
    async with fetcher_for(store, client, [bad.node(), good.node()]) as fetcher:
        with trio.fail_after(2):
            assert await fetcher.get(digest) == data
        assert bad.requests[digest] == 1 and good.requests[digest] == 1
        assert fetcher.counts["corrupt"] == 1
        bad_up = next(u for u in fetcher.upstreams.all() if u.id == "bad")
        assert bad_up.corrupt == 1 and bad_up.failures == 3  # weighs as three failures
    assert store.get(digest) == data
    assert store.audit()["damaged"] == []


async def test_failover_when_nearest_hangs(nursery, tmp_path, client, store):
    stuck = await start_server(nursery, tmp_path, "stuck", site="a")
    good = await start_server(nursery, tmp_path, "good", site="b")
    stuck.mode = "hang"
    data = b"h" * 9000
    digest = stuck.add(data)
    good.add(data)
    async with fetcher_for(store, client, [stuck.node(), good.node()], attempt_timeout=0.5) as fetcher:
        with trio.fail_after(3):  # one attempt timeout, then the next upstream
            assert await fetcher.get(digest) == data
        assert stuck.requests[digest] == 1 and fetcher.counts["timeouts"] == 1
        await stuck.stop()


async def test_unavailable_within_the_deadline(nursery, tmp_path, client, store):
    stuck = await start_server(nursery, tmp_path, "stuck")
    stuck.mode = "hang"
    digest = stuck.add(b"never" * 1000)
    nodes = [stuck.node(), {"id": "gone", "role": "replica", "site": "a", "url": refused_url(), "state": "alive"}]
    async with fetcher_for(store, client, nodes, attempt_timeout=0.3, deadline=1.5, retry_pause=0.1) as fetcher:
        started = trio.current_time()
        with trio.fail_after(4), pytest.raises(Unavailable, match="unavailable after"):
            await fetcher.get(digest)
        assert trio.current_time() - started >= 1.0  # it kept trying until the deadline
        assert fetcher.counts["unavailable"] == 1
        await stuck.stop()


async def test_block_nobody_holds_fails_at_once(nursery, tmp_path, client, store):
    one = await start_server(nursery, tmp_path, "one")
    two = await start_server(nursery, tmp_path, "two")
    absent = content_digest(b"published nowhere")
    async with fetcher_for(store, client, [one.node(), two.node()], deadline=10) as fetcher:
        with trio.fail_after(2), pytest.raises(Unavailable, match="does not hold"):
            await fetcher.get(absent)
        assert one.requests[absent] == 1 and two.requests[absent] == 1  # no retry rounds
        assert all(u.failures == 0 for u in fetcher.upstreams.all())  # 404 costs no backoff


# --- prefetch -------------------------------------------------------------


async def test_prefetch_warms_once_and_does_not_promote(nursery, tmp_path, client, store):
    server = await start_server(nursery, tmp_path, "r1")
    blocks = {server.add(bytes([i]) * 20000): bytes([i]) * 20000 for i in range(40)}
    async with fetcher_for(store, client, [server.node()]) as fetcher:
        progress = await fetcher.prefetch(list(blocks) * 2, imi="demo", version=2, concurrency=8)
        assert (progress.total, progress.fetched, progress.already, progress.failed) == (40, 40, 0, 0)
        assert progress.bytes == 40 * 20000 and progress.finished is not None
        assert set(server.requests) == set(blocks) and set(server.requests.values()) == {1}
        assert server.queries[0] == {"imi": "demo", "version": "2"}
        assert store.missing(blocks) == [] and store.stats()["hits"] == 0  # no promotion

        again = await fetcher.prefetch(blocks)
        assert again.already == 40 and again.fetched == 0
        assert sum(server.requests.values()) == 40
        for digest, data in blocks.items():
            assert await fetcher.get(digest) == data
        assert sum(server.requests.values()) == 40
        counts = fetcher.stats()
        assert counts["prefetched"] == 40 and counts["demand_fetches"] == 0 and counts["hits"] == 40


async def test_background_prefetch_reports_progress(nursery, tmp_path, client, store):
    server = await start_server(nursery, tmp_path, "r1")
    server.delay = 0.05
    digests = [server.add(bytes([i]) * 1000) for i in range(12)] + [content_digest(b"lost")]
    async with fetcher_for(store, client, [server.node()]) as fetcher:
        progress = fetcher.start_prefetch(digests, concurrency=4)
        assert progress.done == 0
        with trio.fail_after(5):
            while progress.finished is None:
                await trio.sleep(0.02)
        assert (progress.fetched, progress.failed, progress.done) == (12, 1, 13)
        assert fetcher.stats()["prefetches"][-1]["fetched"] == 12


# --- batches ------------------------------------------------------------------


async def test_client_fetches_a_batch_and_verifies_each_block(nursery, tmp_path, client):
    server = await start_server(nursery, tmp_path, "r1")
    blocks = [bytes([i]) * (30000 + i) for i in range(5)]
    digests = [server.add(b) for b in blocks]
    absent = content_digest(b"not here")
    got = await client.fetch_many(server.url, [*digests[:3], absent, *digests[3:]], imi="demo", version=2)
    assert got == dict(zip(digests, blocks, strict=True)), "what it holds, in one answer; the rest left out"
    assert server.batches == [[*digests[:3], absent, *digests[3:]]] and server.queries[-1] == {"imi": "demo",
                                                                                               "version": "2"}
    server.mode = "corrupt"
    with pytest.raises(CorruptBlock):
        await client.fetch_many(server.url, digests)
    server.mode = "hang"
    with trio.fail_after(3), pytest.raises(UpstreamTimeout):
        await client.fetch_many(server.url, digests, timeout=0.3)


async def test_get_many_reads_the_store_then_fetches_the_rest_in_one_batch(nursery, tmp_path, client, store):
    server = await start_server(nursery, tmp_path, "r1")
    blocks = [bytes([i]) * 50000 for i in range(6)]
    digests = [server.add(b) for b in blocks]
    for digest, data in list(zip(digests, blocks, strict=True))[:2]:
        store.put(digest, data)
    async with fetcher_for(store, client, [server.node()]) as fetcher:
        assert await fetcher.get_many(digests, imi="demo", version=1) == blocks
        assert server.batches == [digests[2:]], "one request for the four the store lacks"
        assert fetcher.counts["hits"] == 2 and fetcher.counts["demand_fetches"] == 4
        with trio.fail_after(2):
            while fetcher.stats()["in_flight"]:
                await trio.sleep(0.01)
    assert store.missing(digests) == []


async def test_blocks_a_batch_leaves_out_come_one_by_one_from_another_upstream(nursery, tmp_path, client, store):
    near = await start_server(nursery, tmp_path, "near", site="a")
    far = await start_server(nursery, tmp_path, "far", site="b")
    blocks = [bytes([i]) * 20000 for i in range(4)]
    digests = [near.add(b) for b in blocks]
    for b in blocks:
        far.add(b)
    near.withheld.add(digests[1])
    absent = content_digest(b"nowhere")
    async with fetcher_for(store, client, [near.node(), far.node()]) as fetcher:
        got = await fetcher.get_many([*digests, absent], imi="demo", version=1)
        assert got == [*blocks, None], "the unavailable one is None, the others are there"
        assert near.batches == [[*digests, absent]]
        assert far.batches == [[digests[1], absent]], "the next upstream is asked for what is missing"
        assert fetcher.counts["unavailable"] == 1


async def test_prefetch_asks_in_batches(nursery, tmp_path, client, store):
    server = await start_server(nursery, tmp_path, "r1")
    digests = [server.add(bytes([i]) * 10000) for i in range(20)]
    async with fetcher_for(store, client, [server.node()]) as fetcher:
        progress = await fetcher.prefetch(digests, imi="demo", version=1, concurrency=16)
        assert progress.fetched == 20
        assert sorted(len(b) for b in server.batches) == [4, 8, 8]
        assert sum(server.requests.values()) == 20


async def test_prefetch_skips_what_a_reader_stored_meanwhile(nursery, tmp_path, client, store):
    """A reader fetches a block while a prefetch is on its earlier batches:
    the prefetch finds it stored when it gets there, and does not fetch it
    from the upstream a second time (a boot profile replayed by the cache
    while the mount reads the same blocks)."""
    server = await start_server(nursery, tmp_path, "r1")
    server.delay = 0.2
    digests = [server.add(bytes([i]) * 10000) for i in range(24)]
    async with fetcher_for(store, client, [server.node()]) as fetcher:
        progress = fetcher.start_prefetch(digests, imi="demo", version=1, concurrency=8)  # one batch at a time
        await trio.sleep(0.05)  # the first batch is on its way
        assert await fetcher.get(digests[-1], imi="demo", version=1) == bytes([23]) * 10000
        with trio.fail_after(10):
            while progress.finished is None:
                await trio.sleep(0.02)
        assert server.requests[digests[-1]] == 1, "fetched once, by the reader"
        assert (progress.fetched, progress.already, progress.failed) == (23, 1, 0)
