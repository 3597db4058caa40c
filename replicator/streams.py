"""The master's version streams: one `btrfs send` per (version, parent),
spooled to a file that any number of replicas read at once.

Publishing to N replicas runs `btrfs send` once, not N times: the first
request starts a spool, later ones read the same file, following it while it
grows. A complete spool is kept (and named by a stream id) so a replica that
was cut off can resume with an HTTP Range request instead of starting from
zero; an incomplete one is deleted when the master starts, since `btrfs send`
cannot resume.

Every 4 MiB piece of a spool has its BLAKE3 digest, taken in a worker thread
as `btrfs send` produces it, and a piece read back from disk is checked
before it is sent: a spool damaged on the master's disk is cut off and sent
afresh, never served. The stream's digest is the digest of its pieces'
digests (icbdcore.wire.stream_digest), so no byte is hashed twice. When the
send ends, the master signs the stream record (iMI, version, parent, stream
id, bytes, digest, pieces) and keeps it beside the spool: it is the end-to-end
check a replica makes before it accepts what `btrfs receive` built
(`GET .../stream/digest`), whatever the stream's response headers said.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import trio

from icbdcore.layout import Layout
from icbdcore.records import read_json, write_json
from icbdcore.signing import SigningKey, Untrusted
from icbdcore.wire import STREAM_PIECE, content_digest, stream_digest

from . import btrfs

log = logging.getLogger(__name__)

# Chunks of 4 MiB: per-chunk costs (a thread hop, an HTTP chunk, a wake-up of
# readers) dominate at 1 MiB; a pipe read gives at most 1 MiB, so reads are joined.
# A chunk is also a piece of the stream's digest (the contract's STREAM_PIECE).
READ_SIZE = STREAM_PIECE
PIPE_READ = 1 << 20
RECENT_CHUNKS = 16
WRITE_BEHIND = 8  # chunks between the sender and the file, at most


class StreamFailed(Exception):
    pass


# `btrfs send` runs a minute for a large full stream and spools it to disk;
# a node could otherwise start one for every (version, parent) pair at once.
MAX_SENDS = 8  # running at once on the master
MAX_SENDS_PER_NODE = 2  # of those, started by one node (a replica needs one at a time)
SENDS_RETRY_AFTER = 5  # seconds: what a refused node is told


class SendsBusy(Exception):
    """No new send may start now; ask again in `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = SENDS_RETRY_AFTER):
        super().__init__(message)
        self.retry_after = retry_after


_RANGE = re.compile(r"bytes=([0-9]{1,18})-\Z")


def range_start(header: str | None) -> int | None:
    """The start of an open-ended `Range: bytes=N-` (how a replica resumes a
    stream); other forms are ignored (the whole stream is sent), as RFC 9110
    allows."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    return int(match.group(1)) if match else None


@dataclass
class Spool:
    name: str
    version: int
    parent: int | None
    path: Path
    stream_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    size: int = 0  # bytes readers may have: on disk, or still in memory
    written: int = 0  # bytes on disk
    pieces: list[str] = field(default_factory=list)  # digest of each READ_SIZE piece
    complete: bool = False
    digest: str | None = None
    error: str | None = None
    record: dict | None = None  # the signed stream record, once complete
    last_used: float = field(default_factory=time.monotonic)
    readers: int = 0
    started_by: str = ""  # the node whose request started the send
    # The newest chunks, by offset: every chunk not yet on disk, and a few
    # more, so readers right behind the sender (the usual case in a fan-out)
    # need not read the file back.
    _recent: dict[int, bytes] = field(default_factory=dict, repr=False)
    _grown: trio.Event = field(default_factory=trio.Event, repr=False)

    @property
    def meta_path(self) -> Path:
        return self.path.with_suffix(".json")

    def describe(self) -> dict:
        """The stream record: signed once the spool is complete."""
        if self.record is not None:
            return self.record
        return self._record(self.complete, self.digest)

    def _record(self, complete: bool, digest: str | None) -> dict:
        return {
            "imi": self.name,
            "version": self.version,
            "parent": self.parent,
            "stream_id": self.stream_id,
            "bytes": self.size,
            "complete": complete,
            "digest": digest,
            "piece_size": READ_SIZE,
            "pieces": list(self.pieces),
        }

    def _advance(self, data: bytes, digest: str | None = None) -> None:
        """`data`, the next piece (whose digest the caller may have taken already)."""
        assert self.size % READ_SIZE == 0, "only the last piece may be short"
        self._recent[self.size] = data
        self.pieces.append(digest or content_digest(data))
        self.size += len(data)
        self._wake()

    def _on_disk(self, count: int) -> None:
        self.written += count
        while len(self._recent) > RECENT_CHUNKS and min(self._recent) < self.written:
            del self._recent[min(self._recent)]
        self._wake()

    def _finish(self, digest: str | None = None, error: str | None = None) -> None:
        self.digest, self.error = digest, error
        self.complete = error is None
        self._recent.clear()
        self._wake()

    def _wake(self) -> None:
        self._grown.set()
        self._grown = trio.Event()

    async def chunks(self, offset: int, end: int | None = None) -> AsyncIterator[bytes]:
        """The spool's bytes from `offset` (to `end`, exclusive), following it as it grows."""
        self.readers += 1
        fd = await trio.to_thread.run_sync(os.open, self.path, os.O_RDONLY)
        try:
            while True:
                self.last_used = time.monotonic()
                limit = self.size if end is None else min(self.size, end)
                if offset < limit:
                    piece = await self._piece(fd, offset - offset % READ_SIZE)
                    if piece is not None:
                        start = offset % READ_SIZE
                        data = piece[start:start + limit - offset]
                        offset += len(data)
                        yield data
                        continue
                if self.error is not None:
                    raise StreamFailed(self.error)
                if offset >= limit and (self.complete or (end is not None and offset >= end)):
                    return
                await self._grown.wait()
        finally:
            self.readers -= 1
            os.close(fd)

    async def _piece(self, fd: int, start: int) -> bytes | None:
        """The piece at `start`: from memory, else from disk, checked against
        its digest; None if it is neither in memory nor wholly on disk yet."""
        data = self._recent.get(start)
        if data is not None:
            return data
        length = min(READ_SIZE, self.size - start)
        if start + length > self.written:
            return None
        expected = self.pieces[start // READ_SIZE]
        data = await trio.to_thread.run_sync(_read_piece, fd, length, start, expected)
        if data is None:
            self.error = "spool damaged on the master's disk"
            log.error("%s at byte %d: %s; it will be sent afresh", self.path, start, self.error)
            raise StreamFailed(self.error)
        return data

    async def wait_beyond(self, offset: int) -> None:
        """Until the spool holds more than `offset` bytes, or is finished."""
        while not self.complete and self.error is None and self.size <= offset:
            await self._grown.wait()


class SendSpools:
    """Spools keyed by (iMI, version, parent); their records signed with `key`."""

    def __init__(self, layout: Layout, ttl: float = 600.0, key: SigningKey | None = None,
                 max_sends: int = MAX_SENDS, max_sends_per_node: int = MAX_SENDS_PER_NODE):
        self.layout = layout
        self.ttl = ttl
        self.key = key
        self.max_sends = max_sends
        self.max_sends_per_node = max_sends_per_node
        self._spools: dict[tuple[str, int, int | None], Spool] = {}
        self._nursery: trio.Nursery | None = None


    def load(self) -> None:
        """Keep complete spools from an earlier run; drop incomplete ones."""
        for imi_dir in self.layout.streams.glob("*"):
            for path in imi_dir.glob("*.stream"):
                doc = read_json(path.with_suffix(".json"))
                if not isinstance(doc, dict) or not doc.get("complete") or "pieces" not in doc:
                    log.info("dropping incomplete stream spool %s", path)
                    path.unlink(missing_ok=True)
                    path.with_suffix(".json").unlink(missing_ok=True)
                    continue
                try:
                    if self.key is not None:
                        self.key.public.verify(doc, "stream record")
                    if doc.get("piece_size") != READ_SIZE:
                        raise Untrusted(f"pieces of {doc.get('piece_size')} bytes")
                except Untrusted as error:
                    log.info("dropping stream spool %s: %s", path, error)
                    path.unlink(missing_ok=True)
                    path.with_suffix(".json").unlink(missing_ok=True)
                    continue
                spool = Spool(
                    name=doc["imi"], version=doc["version"], parent=doc["parent"], path=path,
                    stream_id=doc["stream_id"], size=doc["bytes"], written=doc["bytes"], complete=True,
                    digest=doc["digest"], pieces=doc["pieces"], record=doc,
                )
                self._spools[(spool.name, spool.version, spool.parent)] = spool

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the generator tasks and expire idle spools."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(min(self.ttl, 30))
                try:
                    self._expire()
                except OSError as error:
                    log.error("cannot remove an expired stream spool: %s", error)

    def _expire(self) -> None:
        now = time.monotonic()
        for key, spool in list(self._spools.items()):
            if (spool.complete or spool.error) and spool.readers == 0 and now - spool.last_used > self.ttl:
                self._drop(key)

    def _drop(self, key) -> None:
        spool = self._spools.pop(key)
        spool.path.unlink(missing_ok=True)
        spool.meta_path.unlink(missing_ok=True)

    def all(self) -> list[Spool]:
        return list(self._spools.values())

    def find(self, name: str, version: int, parent: int | None) -> Spool | None:
        return self._spools.get((name, version, parent))

    def drop_imi(self, name: str) -> None:
        for key in [k for k in self._spools if k[0] == name]:
            spool = self._spools[key]
            if not spool.complete:
                spool._finish(error="iMI deleted")
            self._drop(key)

    def get(self, name: str, version: int, parent: int | None, snapshot: Path, parent_snapshot: Path | None,
            node: str = "") -> Spool:
        """The spool of this stream, started now if there is none (or it
        failed). Raises SendsBusy if starting one would pass a cap: MAX_SENDS
        running, or MAX_SENDS_PER_NODE started by `node`."""
        key = (name, version, parent)
        spool = self._spools.get(key)
        if spool is not None and spool.error is None:
            spool.last_used = time.monotonic()
            return spool
        self._check_caps(node)
        if spool is not None:
            self._drop(key)
        assert self._nursery is not None, "SendSpools.run() is not running"
        spool = Spool(name, version, parent, self.layout.stream_spool(name, version, parent), started_by=node)
        spool.path.parent.mkdir(parents=True, exist_ok=True)
        spool.meta_path.unlink(missing_ok=True)
        spool.path.write_bytes(b"")  # readers may open it before the first byte arrives
        self._spools[key] = spool
        self._nursery.start_soon(self._generate, spool, snapshot, parent_snapshot)
        return spool

    def _check_caps(self, node: str) -> None:
        running = [s for s in self._spools.values() if not s.complete and s.error is None]
        if len(running) >= self.max_sends:
            raise SendsBusy(f"{len(running)} streams are being made, the most at once; retry later")
        mine = sum(1 for s in running if s.started_by == node)
        if mine >= self.max_sends_per_node:
            raise SendsBusy(f"{mine} streams started by {node or 'this caller'} are being made, "
                            "the most for one node; retry later")

    async def _generate(self, spool: Spool, snapshot: Path, parent_snapshot: Path | None) -> None:
        """Run one send into its spool. Whatever fails here fails this spool's
        readers (who ask again), never the master."""
        log.info("sending %s version %s (parent %s) to spool", spool.name, spool.version, spool.parent)
        started = time.monotonic()
        try:
            digest = await _send_into(spool, snapshot, parent_snapshot)
        except Exception as error:  # a failed send must reach readers, not crash the master
            if not isinstance(error, OSError | StreamFailed):
                log.exception("stream %s v%s from %s", spool.name, spool.version, spool.parent)
            spool._finish(error=f"btrfs send failed: {error}")
            log.error("stream %s v%s from %s: %s", spool.name, spool.version, spool.parent, spool.error)
            return
        record = spool._record(True, digest)
        if self.key is not None:
            record = self.key.sign(record)
        spool.record = record
        try:
            write_json(spool.meta_path, record)
        except OSError as error:
            # A full disk: the spool is whole and its readers get it, but
            # without its record it does not outlive a restart of the master.
            log.error("stream %s v%s from %s: cannot write its record (%s); it will not be kept across "
                      "a restart", spool.name, spool.version, spool.parent, error.strerror or error)
        spool._finish(digest)
        log.info("spooled %s v%s from %s: %d bytes in %.2fs", spool.name, spool.version, spool.parent,
                 spool.size, time.monotonic() - started)


async def _send_into(spool: Spool, snapshot: Path, parent_snapshot: Path | None) -> str:
    """Run btrfs send into the spool file, hashing each piece as it comes; return the stream's digest."""
    process = await trio.lowlevel.open_process(
        btrfs.send_argv(snapshot, parent_snapshot),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=btrfs.die_with_parent,
    )
    with contextlib.suppress(OSError):
        # A 1 MiB pipe lets one read take 1 MiB instead of 64 KiB.
        fcntl.fcntl(process.stdout.fileno(), btrfs.F_SETPIPE_SZ, 1 << 20)
    out = await trio.to_thread.run_sync(os.open, spool.path, os.O_WRONLY)
    stderr = bytearray()
    # The file is written by its own task, a few chunks behind, so btrfs send
    # and the readers never wait for the disk (they read those chunks from memory).
    to_disk, from_sender = trio.open_memory_channel(WRITE_BEHIND)

    async def write_behind() -> None:
        async with from_sender:
            async for data in from_sender:
                await trio.to_thread.run_sync(_write_all, out, data)
                spool._on_disk(len(data))

    try:
        async with trio.open_nursery() as nursery:

            async def drain_stderr() -> None:
                async for data in process.stderr:
                    stderr.extend(data[:4096])

            nursery.start_soon(drain_stderr)
            nursery.start_soon(write_behind)
            async with to_disk:
                while data := await _read_up_to(process.stdout, READ_SIZE):
                    # 4 MiB: ~0.5 ms of BLAKE3, in a thread (it lets go of the GIL),
                    # so the trio thread keeps serving readers meanwhile.
                    digest = await trio.to_thread.run_sync(content_digest, data)
                    spool._advance(data, digest)
                    await to_disk.send(data)
                    if spool.error is not None:  # dropped while sending
                        raise StreamFailed(spool.error)
        code = await process.wait()
    finally:
        os.close(out)
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
    if code != 0:
        text = stderr.decode(errors="replace").strip()
        raise StreamFailed(text.splitlines()[-1] if text else f"exit status {code}")
    return stream_digest(spool.pieces)


async def _read_up_to(stream, size: int) -> bytes:
    """Up to `size` bytes from a pipe: as many reads as fit, stopping at EOF."""
    parts = []
    have = 0
    while have < size:
        data = await stream.receive_some(min(PIPE_READ, size - have))
        if not data:
            break
        parts.append(data)
        have += len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _read_piece(fd: int, length: int, start: int, digest: str) -> bytes | None:
    """A piece of the spool file if it matches its digest, else None (in a worker thread)."""
    data = os.pread(fd, length, start)
    return data if len(data) == length and content_digest(data) == digest else None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
