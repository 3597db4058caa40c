"""The master's version streams: one `btrfs send` per (version, parent),
named by its digest once made, and served as an immutable object that any
HTTP cache between the master and its replicas may keep forever.

The first time a stream is asked for (or when a publish makes the delta
from the previous version at once), `btrfs send` runs into a spool file.
Every 4 MiB piece of it gets its BLAKE3 digest as it is produced, in a
worker thread; the stream's digest is the digest of its pieces' digests
(icbdcore.wire.stream_digest), so no byte is hashed twice. When the send
ends, the master signs the stream record (iMI, version, parent, bytes,
digest, pieces) and keeps it: from then on the stream is the object
`GET /v1/streams/DIGEST`, whose URL and bytes never change, and a replica
checks every piece against the record before `btrfs receive` sees it,
whoever (the master, nginx, Squid, a CDN) delivered it.

`btrfs send` of the same (version, parent) gives the same bytes on every
run, so the spool is only a cache: it is deleted after `ttl` seconds
without a reader (the record stays, across restarts too), and the next
request for the object runs the send again, checking each new piece
against the record before any reader gets it. If the bytes ever differ
(a balance or a defragmentation moved the snapshot's extents, a new
btrfs-progs), the record is withdrawn (the object answers 410) and the
next request for that (version, parent) makes a new stream with a new
digest and record. A piece read back from a spool on disk is checked too:
a spool damaged on the master's disk is dropped and made again, never served.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import time
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
# A chunk is also a piece of the stream's digest (the contract's STREAM_PIECE),
# and a slice of an HTTP cache in front of the master (contrib/nginx) fits it.
READ_SIZE = STREAM_PIECE
PIPE_READ = 1 << 20
RECENT_CHUNKS = 16
WRITE_BEHIND = 8  # chunks between the sender and the file, at most


class StreamFailed(Exception):
    pass


class StreamChanged(StreamFailed):
    """A regenerated stream differs from its signed record."""


class Withdrawn(Exception):
    """A stream object whose record was withdrawn: its bytes can no longer be made."""


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


@dataclass
class Spool:
    name: str
    version: int
    parent: int | None
    path: Path
    # A regeneration: the pieces its record lists, each checked before readers get it.
    expect: list[str] | None = None
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
            "bytes": self.size,
            "complete": complete,
            "digest": digest,
            "piece_size": READ_SIZE,
            "pieces": list(self.pieces),
        }

    def _advance(self, data: bytes, digest: str | None = None) -> None:
        """`data`, the next piece (whose digest the caller may have taken
        already). A regeneration refuses a piece its record does not list
        (StreamChanged), before any reader can have it."""
        assert self.size % READ_SIZE == 0, "only the last piece may be short"
        digest = digest or content_digest(data)
        if self.expect is not None:
            index = len(self.pieces)
            if index >= len(self.expect) or self.expect[index] != digest:
                raise StreamChanged(f"btrfs send gave other bytes than its signed record at piece {index} "
                                    f"(byte {self.size}): the snapshot's extents changed, or btrfs-progs did")
        self._recent[self.size] = data
        self.pieces.append(digest)
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

    async def wait_done(self) -> None:
        """Until the spool is complete or failed."""
        while not self.complete and self.error is None:
            await self._grown.wait()

    async def wait_beyond(self, offset: int) -> None:
        """Until the spool holds more than `offset` bytes, or is finished."""
        while not self.complete and self.error is None and self.size <= offset:
            await self._grown.wait()


Key = tuple[str, int, "int | None"]  # (iMI, version, parent)


class SendSpools:
    """The master's streams, keyed by (iMI, version, parent): their signed
    records (kept for good), and the spools that hold their bytes (kept
    `ttl` seconds after their last reader). Records are signed with `key`."""

    def __init__(self, layout: Layout, ttl: float = 600.0, key: SigningKey | None = None,
                 max_sends: int = MAX_SENDS, max_sends_per_node: int = MAX_SENDS_PER_NODE):
        self.layout = layout
        self.ttl = ttl
        self.key = key
        self.max_sends = max_sends
        self.max_sends_per_node = max_sends_per_node
        self._spools: dict[Key, Spool] = {}
        self._records: dict[Key, dict] = {}  # signed, by (iMI, version, parent)
        self._by_digest: dict[str, Key] = {}
        self._withdrawn: set[str] = set()
        self.regenerated = 0  # spools made again from a record, for status
        self.withdrawn = 0  # records withdrawn because the bytes changed
        self._nursery: trio.Nursery | None = None

    def load(self) -> None:
        """Take the records of an earlier run, and the complete spools beside
        them; drop incomplete spools and records this key did not sign."""
        for imi_dir in self.layout.streams.glob("*"):
            for meta in imi_dir.glob("*.json"):
                path = meta.with_suffix(".stream")
                doc = read_json(meta)
                try:
                    if not isinstance(doc, dict) or not doc.get("complete") or "pieces" not in doc:
                        raise Untrusted("incomplete")
                    if self.key is not None:
                        self.key.public.verify(doc, "stream record")
                    if doc.get("piece_size") != READ_SIZE:
                        raise Untrusted(f"pieces of {doc.get('piece_size')} bytes")
                    if stream_digest(doc["pieces"]) != doc.get("digest"):
                        raise Untrusted("its digest is not the digest of its pieces")
                except Untrusted as error:
                    log.info("dropping stream record %s: %s", meta, error)
                    path.unlink(missing_ok=True)
                    meta.unlink(missing_ok=True)
                    continue
                key = (doc["imi"], doc["version"], doc["parent"])
                self._keep_record(key, doc)
                try:
                    whole = path.stat().st_size == doc["bytes"]
                except OSError:
                    whole = False
                if whole:
                    self._spools[key] = Spool(
                        name=key[0], version=key[1], parent=key[2], path=path, size=doc["bytes"],
                        written=doc["bytes"], complete=True, digest=doc["digest"], pieces=list(doc["pieces"]),
                        record=doc)
                else:
                    path.unlink(missing_ok=True)  # made again when asked for
            for path in imi_dir.glob("*.stream"):
                if not path.with_suffix(".json").exists():
                    log.info("dropping incomplete stream spool %s", path)
                    path.unlink(missing_ok=True)

    def _keep_record(self, key: Key, record: dict) -> None:
        self._records[key] = record
        self._by_digest[record["digest"]] = key
        self._withdrawn.discard(record["digest"])

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the generator tasks and expire idle spools."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(max(0.2, min(self.ttl / 2, 30)))
                try:
                    self._expire()
                except OSError as error:
                    log.error("cannot remove an expired stream spool: %s", error)

    def _expire(self) -> None:
        now = time.monotonic()
        for key, spool in list(self._spools.items()):
            if (spool.complete or spool.error) and spool.readers == 0 and now - spool.last_used > self.ttl:
                self._drop_spool(key)

    def _drop_spool(self, key: Key) -> None:
        """The spool's bytes go; its record (if any) stays, and with it the object."""
        spool = self._spools.pop(key)
        spool.path.unlink(missing_ok=True)
        if key not in self._records:
            spool.meta_path.unlink(missing_ok=True)

    def _withdraw(self, key: Key, why: str) -> None:
        record = self._records.pop(key, None)
        if record is None:
            return
        self._by_digest.pop(record["digest"], None)
        self._withdrawn.add(record["digest"])
        self.withdrawn += 1
        self.layout.stream_spool(*key).with_suffix(".json").unlink(missing_ok=True)
        log.error("stream %s v%s from %s (digest %s) withdrawn: %s; the next request makes it anew",
                  key[0], key[1], key[2], record["digest"], why)

    # --- what there is ------------------------------------------------------------------

    def all(self) -> list[Spool]:
        return list(self._spools.values())

    def find(self, name: str, version: int, parent: int | None) -> Spool | None:
        return self._spools.get((name, version, parent))

    def record(self, name: str, version: int, parent: int | None) -> dict | None:
        """The signed record of this stream, if it was made."""
        return self._records.get((name, version, parent))

    def records(self) -> int:
        return len(self._records)

    def key_of(self, digest: str) -> Key:
        """The (iMI, version, parent) of a stream object; KeyError if unknown,
        Withdrawn if its record was withdrawn."""
        if digest in self._withdrawn:
            raise Withdrawn(digest)
        return self._by_digest[digest]

    def drop_imi(self, name: str) -> None:
        for key in [k for k in self._spools if k[0] == name]:
            spool = self._spools[key]
            if not spool.complete:
                spool._finish(error="iMI deleted")
            self._drop_spool(key)
        for key in [k for k in self._records if k[0] == name]:
            record = self._records.pop(key)
            self._by_digest.pop(record["digest"], None)
            self.layout.stream_spool(*key).with_suffix(".json").unlink(missing_ok=True)

    # --- making and serving -------------------------------------------------------------

    def make(self, name: str, version: int, parent: int | None, snapshot: Path, parent_snapshot: Path | None,
             node: str = "") -> Spool | None:
        """Make this stream unless it was made: None if its record exists,
        else the spool being made (started now if there is none, or it
        failed). Raises SendsBusy if starting one would pass a cap:
        MAX_SENDS running, or MAX_SENDS_PER_NODE started by `node`."""
        key = (name, version, parent)
        if key in self._records:
            return None
        spool = self._spools.get(key)
        if spool is not None and spool.error is None:
            spool.last_used = time.monotonic()
            return spool
        return self._start(key, snapshot, parent_snapshot, node, expect=None)

    def spool_of(self, key: Key, snapshot: Path, parent_snapshot: Path | None, node: str = "") -> Spool:
        """The spool holding the bytes of a stream that has a record: the one
        there is, or one made again now (checked against the record). Raises
        SendsBusy as make() does."""
        record = self._records[key]
        spool = self._spools.get(key)
        if spool is not None and spool.error is None:
            spool.last_used = time.monotonic()
            return spool
        self.regenerated += 1
        log.info("making stream %s v%s from %s again (digest %s)", key[0], key[1], key[2], record["digest"])
        return self._start(key, snapshot, parent_snapshot, node, expect=list(record["pieces"]))

    def _start(self, key: Key, snapshot: Path, parent_snapshot: Path | None, node: str,
               expect: list[str] | None) -> Spool:
        self._check_caps(node)
        if key in self._spools:
            self._drop_spool(key)
        assert self._nursery is not None, "SendSpools.run() is not running"
        spool = Spool(key[0], key[1], key[2], self.layout.stream_spool(*key), expect=expect, started_by=node)
        if expect is not None:
            spool.record = self._records[key]
        spool.path.parent.mkdir(parents=True, exist_ok=True)
        if expect is None:
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
        key = (spool.name, spool.version, spool.parent)
        again = spool.expect is not None
        log.info("sending %s version %s (parent %s) to spool%s", spool.name, spool.version, spool.parent,
                 " (again, checked against its record)" if again else "")
        started = time.monotonic()
        try:
            digest = await _send_into(spool, snapshot, parent_snapshot)
            if again and (spool.size != spool.record["bytes"] or digest != spool.record["digest"]):
                raise StreamChanged(f"btrfs send gave {spool.size} bytes, digest {digest}; the record signed "
                                    f"{spool.record['bytes']} bytes, digest {spool.record['digest']}")
        except Exception as error:  # a failed send must reach readers, not crash the master
            if not isinstance(error, OSError | StreamFailed):
                log.exception("stream %s v%s from %s", spool.name, spool.version, spool.parent)
            spool._finish(error=f"btrfs send failed: {error}")
            log.error("stream %s v%s from %s: %s", spool.name, spool.version, spool.parent, spool.error)
            if isinstance(error, StreamChanged):
                self._withdraw(key, str(error))
            return
        if not again:
            record = spool._record(True, digest)
            if self.key is not None:
                record = self.key.sign(record)
            spool.record = record
            try:
                write_json(spool.meta_path, record)
            except OSError as error:
                # A full disk: the stream is whole and its record served, but
                # it does not outlive a restart of the master.
                log.error("stream %s v%s from %s: cannot write its record (%s); it will not be kept across "
                          "a restart", spool.name, spool.version, spool.parent, error.strerror or error)
            if self._spools.get(key) is spool:
                self._keep_record(key, record)
        spool._finish(digest)
        log.info("spooled %s v%s from %s: %d bytes in %.2fs (digest %s)", spool.name, spool.version,
                 spool.parent, spool.size, time.monotonic() - started, digest)


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
        async with _one_error(), trio.open_nursery() as nursery:

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


@contextlib.asynccontextmanager
async def _one_error():
    """A nursery's lone failure as itself, not in an exception group, so
    callers can tell a changed stream from a failed send."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    found: list[BaseException] = []
    for error in group.exceptions:
        found += _leaves(error) if isinstance(error, BaseExceptionGroup) else [error]
    return found


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
