"""Fetching a block, or a batch of blocks, from one upstream over HTTP, with
the failure classified.

A batch (`fetch_many`, BLOCKS_ROUTE) brings up to MAX_BATCH blocks in one
request: on every hop most of a request's cost is per request, not per byte
(measured here with hypercorn on trio: about 0.6 ms of server CPU per request
whatever its size, against 0.2 s per GB for the bytes), so a run of blocks in
one answer costs a fraction of as many single requests.

Bulk bytes go through a shared urllib3 pool in worker threads: measured on
loopback, httpx on trio moves ~450-650 MB/s, urllib3 in a thread ~2.5 GB/s.
Every call has explicit connect and read timeouts in the thread and an overall
deadline on the trio side. At the deadline the request is cut off
(icbdcore.cutoff: its socket is shut down), so the thread ends then and frees
its slot of the limiter: a read timeout bounds each wait for bytes only, and
an upstream trickling a byte every few seconds would otherwise hold the slot
for as long as it likes, and enough of them would hold every slot.

Failures are sorted the way CernVM-FS sorts them, so the caller can fail over
sensibly: the upstream does not hold the block (NotHeld: ask another, no
penalty), the host failed (HostFailure: refused, reset, timed out, 5xx, or it
refused the token), or the bytes are corrupt (CorruptBlock: verified here,
once, in the worker thread). The token never appears in a message or a log.
"""

from __future__ import annotations

import logging
import time

import trio
import urllib3

from icbdcore.clients import Credentials, pool, tls_failure
from icbdcore.cutoff import Cutoff
from icbdcore.wire import (
    BLOCK_SIZES_HEADER,
    DEFAULT_CHUNK_SIZE,
    REQUEST_ID_HEADER,
    block_path,
    blocks_path,
    content_digest,
)

log = logging.getLogger(__name__)

MAX_BLOCK = 64 << 20  # the largest chunk size a manifest may declare


class FetchFailure(Exception):
    """A block could not be fetched from one upstream; `kind` says why."""

    kind = "failure"

    def __init__(self, url: str, why: str):
        super().__init__(f"{url}: {why}")
        self.url = url
        self.why = why


class NotHeld(FetchFailure):
    kind = "not_held"


class HostFailure(FetchFailure):
    kind = "host"


class GatewayFailure(HostFailure):
    """An HTTP cache (a cache server, a proxy) answered but could not get the
    block from its own upstreams: it is up, so there is no point in backing
    off from it, but another source may still have the block."""

    kind = "gateway"


class UpstreamTimeout(HostFailure):
    kind = "timeout"


class CorruptBlock(FetchFailure):
    kind = "corrupt"


class BlockClient:
    def __init__(
        self,
        credentials: Credentials,
        *,
        connections: int = 32,
        connect_timeout: float = 3.0,
        read_timeout: float = 10.0,
    ):
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        # One pool per upstream host, `connections` kept alive to each; more may
        # open under load (block=False) but are not kept.
        self._pool = pool(credentials, maxsize=connections)
        self._limiter = trio.CapacityLimiter(connections)

    def close(self) -> None:
        self._pool.clear()

    async def fetch(
        self,
        base_url: str,
        digest: str,
        *,
        imi: str | None = None,
        version: int | None = None,
        timeout: float | None = None,
        rid: str | None = None,
    ) -> bytes:
        """The verified bytes of block `digest` from the upstream at `base_url`;
        raises NotHeld, HostFailure (UpstreamTimeout) or CorruptBlock. `rid`:
        the block fetch's request id, passed on in X-Request-Id."""
        url = base_url.rstrip("/") + block_path(digest, imi, version)
        return await self.get(url, digest, limit=MAX_BLOCK, timeout=timeout, rid=rid)

    async def fetch_many(
        self,
        base_url: str,
        digests: list[str],
        *,
        imi: str | None = None,
        version: int | None = None,
        timeout: float | None = None,
        rid: str | None = None,
    ) -> dict[str, bytes]:
        """The verified bytes of the blocks among `digests` (at most MAX_BATCH)
        the upstream delivers, in one request (BLOCKS_ROUTE); those it does not
        deliver are missing from the answer. Raises HostFailure
        (UpstreamTimeout) or CorruptBlock as fetch() does, and NotHeld if the
        upstream answers 404 (a node without batches, too)."""
        url = base_url.rstrip("/") + blocks_path(digests, imi, version)
        timeout = self.read_timeout if timeout is None else timeout
        return await self._in_thread(self._verified_many, url, timeout, url, list(digests), timeout, rid)

    async def get(self, url: str, digest: str, *, limit: int, timeout: float | None = None,
                  rid: str | None = None) -> bytes:
        """The bytes of the immutable object at `url`, verified against
        `digest`, at most `limit` of them; raises as fetch() does."""
        timeout = self.read_timeout if timeout is None else timeout
        return await self._in_thread(self._verified, url, timeout, url, digest, timeout, limit, rid)

    async def _in_thread(self, work, url: str, timeout: float, *args):
        """`work(*args, cutoff)` in a worker thread, given up at `timeout`, when
        its request is cut off so the thread ends (and frees its slot) too."""
        cutoff = Cutoff()
        try:
            with trio.move_on_after(timeout):
                return await trio.to_thread.run_sync(
                    work, *args, cutoff, limiter=self._limiter, abandon_on_cancel=True
                )
        finally:
            cutoff.cut()  # a thread still running ends now; one that returned is not touched
        raise UpstreamTimeout(url, f"no complete answer within {timeout:g} s")

    def _verified(self, url: str, digest: str, timeout: float, limit: int, rid: str | None,
                  cutoff: Cutoff) -> bytes:
        data = self._get(url, timeout, limit, cutoff, rid)
        # Verified in this thread, off the trio thread: BLAKE3, ~130 us per MiB.
        # The only check of these bytes against their name at this tier (the
        # store then keeps only a cheap local check, see blockstore.py).
        if content_digest(data) != digest:
            raise CorruptBlock(url, f"sent {len(data)} bytes that do not match the digest")
        return data

    def _verified_many(self, url: str, digests: list[str], timeout: float, rid: str | None,
                       cutoff: Cutoff) -> dict[str, bytes]:
        blocks = self._exchange(url, timeout, cutoff, rid, lambda response: self._read_batch(url, response, digests))
        for digest, data in blocks.items():  # in this thread, as for one block
            if content_digest(data) != digest:
                raise CorruptBlock(url, f"sent {len(data)} bytes for {digest} that do not match it")
        return blocks

    def _read_batch(self, url: str, response, digests: list[str]) -> dict[str, bytes]:
        """The blocks a batch answer delivers, by the sizes it announces."""
        sizes = _batch_sizes(url, response.headers.get(BLOCK_SIZES_HEADER), len(digests))
        total = sum(n for n in sizes if n is not None)
        length = response.headers.get("Content-Length")
        if length is not None and (not length.isdigit() or int(length) != total):
            raise HostFailure(url, f"announced a body of {length} bytes for blocks of {total}")
        return {digest: self._read_exactly(url, response, size)
                for digest, size in zip(digests, sizes, strict=True) if size is not None}

    def _read_exactly(self, url: str, response, size: int) -> bytes:
        try:
            data = response.read(size)
        except (urllib3.exceptions.TimeoutError, TimeoutError):
            raise UpstreamTimeout(url, "timed out while sending the blocks") from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise HostFailure(url, f"broke off the blocks: {type(error).__name__}") from None
        if len(data) != size:
            raise HostFailure(url, f"sent {len(data)} bytes of a block of {size}")
        return data

    def _get(self, url: str, timeout: float, limit: int, cutoff: Cutoff, rid: str | None = None) -> bytes:
        return self._exchange(url, timeout, cutoff, rid, lambda response: self._read_body(url, response, limit))

    def _exchange(self, url: str, timeout: float, cutoff: Cutoff, rid: str | None, read):
        """`read(response)` of the answer to GET `url`, made inside `cutoff`:
        a failure caused by the cut is reported as the timeout it stands for."""
        with cutoff:
            try:
                return self._request(url, timeout, cutoff, rid, read)
            except FetchFailure as error:
                if cutoff.is_cut:
                    raise UpstreamTimeout(url, f"cut off at the deadline ({error.why})") from None
                raise

    def _open(self, url: str, timeout: float, rid: str | None = None):
        timeouts = urllib3.Timeout(connect=min(self.connect_timeout, timeout), read=timeout)
        # Headers given to a request replace the pool's: keep the credential.
        headers = {**self._pool.headers, REQUEST_ID_HEADER: rid} if rid else None
        try:
            return self._pool.request("GET", url, timeout=timeouts, preload_content=False, redirect=False,
                                      headers=headers)
        except urllib3.exceptions.NewConnectionError as error:  # a ConnectTimeoutError subclass, but no timeout
            raise HostFailure(url, f"cannot connect: {_reason(error)}") from None
        except (urllib3.exceptions.TimeoutError, TimeoutError) as error:
            raise UpstreamTimeout(url, f"timed out ({type(error).__name__})") from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise HostFailure(url, tls_failure(error) or f"{type(error).__name__}: {_reason(error)}") from None

    @staticmethod
    def _refuse_status(url: str, response) -> None:
        """Raise the failure a status other than 200 means (the body read, so the connection can be reused)."""
        status = response.status
        if status == 200:
            return
        response.drain_conn()
        if status == 404:
            raise NotHeld(url, "does not hold the block")
        if status == 401:
            raise HostFailure(url, "refused our token (401): unknown or revoked; check --token-file")
        if status == 403:
            raise HostFailure(url, "refused our token (403): it lacks the role for this call")
        if status in (502, 503, 504):
            raise GatewayFailure(url, f"answered {status}: it could not get the block itself")
        raise HostFailure(url, f"answered {status}")

    def _request(self, url: str, timeout: float, cutoff: Cutoff, rid: str | None, read):
        """`read(response)` of a 200 answer to GET `url`; raises the failure
        any other status means. The connection goes back to the pool only
        when its whole answer was read."""
        response = self._open(url, timeout, rid)
        complete = False  # the whole answer read: the connection may be reused
        try:
            try:
                self._refuse_status(url, response)
            except FetchFailure:
                complete = True  # drained
                raise
            result = read(response)
            complete = True
            return result
        finally:
            if not complete:
                response.close()  # unread bytes on it: never hand it to the next request
            cutoff.release()  # before the connection goes back to the pool
            response.release_conn()

    @staticmethod
    def _read_body(url: str, response, limit: int) -> bytes:
        """The body of a single object's answer, at most `limit` bytes."""
        length = response.headers.get("Content-Length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise HostFailure(url, f"announced a body of {length} bytes (over {limit})")
        try:
            data = response.read() if length is not None else response.read(limit + 1)
        except (urllib3.exceptions.TimeoutError, TimeoutError):
            raise UpstreamTimeout(url, "timed out while sending the block") from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise HostFailure(url, f"broke off the block: {type(error).__name__}") from None
        if len(data) > limit or (length is not None and len(data) != int(length)):
            raise HostFailure(url, f"sent {len(data)} bytes, announced {length}")
        return data

    async def ping(self, base_url: str, *, timeout: float = 2.0) -> float:
        """Seconds for `GET {base_url}/` (the node's status) to answer; raises HostFailure."""
        url = f"{base_url.rstrip('/')}/"

        def timed(cutoff: Cutoff) -> float:
            started = time.perf_counter()
            self._get(url, timeout, DEFAULT_CHUNK_SIZE, cutoff)
            return time.perf_counter() - started

        try:
            return await self._in_thread(timed, url, timeout)
        except NotHeld as error:
            raise HostFailure(url, "has no status page") from error


def _batch_sizes(url: str, header: str | None, count: int) -> list[int | None]:
    """The sizes a batch answer announces, one per block asked (None: not delivered)."""
    parts = (header or "").split(",")
    if header is None or len(parts) != count:
        raise HostFailure(url, f"answered a batch without the sizes of its {count} blocks")
    sizes: list[int | None] = []
    for part in parts:
        if part == "-":
            sizes.append(None)
        elif part.isdigit() and int(part) <= MAX_BLOCK:
            sizes.append(int(part))
        else:
            raise HostFailure(url, f"announced a block of size {part[:20]!r}")
    return sizes


def _reason(error: BaseException) -> str:
    """The short cause of a urllib3 error, without the request it was about."""
    reason = getattr(error, "reason", None) or error.__context__ or error
    return str(reason).split(": ", 1)[-1][:200]
