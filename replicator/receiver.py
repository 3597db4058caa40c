"""A replica's receive of one version, verified and atomic.

1. The replica asks the master for the stream record of (version, parent)
   (`GET .../stream/digest`, a control call that always reaches the master;
   202 while the master is still making the stream) and checks it against
   the master's key (icbdcore.trust): it names the stream's digest, its
   length and the digest of each 4 MiB piece.
2. It fetches the stream as the object `GET /v1/streams/DIGEST` from its
   --master URL, which may be a stock HTTP cache in front of the master:
   every piece is checked against the record before `btrfs receive` sees
   it, so a cache that serves a damaged object is caught at the first bad
   piece, never trusted. The transfer then fails over to the master's own
   URL (from its node list) and goes on from the last good piece. A
   connection cut off midway is resumed with a plain `Range: bytes=N-`
   (the URL names the content, so any copy of it continues any other).
   Checked pieces are spooled beside the receive
   (DATA/incoming/NAME/V-from-P.stream), so a transfer cut off by a crash or
   a stop resumes after a restart: the local receive starts over from the
   spool, the network does not.
3. It is accepted only if receive exited 0, every byte matched the record,
   the subvolume is read-only with a received UUID, and the manifest
   (`GET /v1/manifests/DIGEST`, cacheable too) matches the digest of the
   version record the master signed.
4. Records are written, then the subvolume moves to DATA/imis/NAME/V (one
   rename), so nothing partial is ever visible there. On failure the
   partial subvolume is deleted; the spool is kept only when what it holds
   was fine but cut short, or the replica is stopping.

The stream is copied in a worker thread, which trio cannot interrupt. When
the receive is cancelled (the replica stops), the thread is stopped at once
instead of running to the end of the stream: its requests are cut off
(icbdcore.cutoff), `btrfs receive` is killed, and the receive waits the
moment it takes the thread to end, then keeps the spool for the next start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trio
import urllib3

from icbdcore.clients import Credentials, pool
from icbdcore.cutoff import Cutoff
from icbdcore.layout import Layout
from icbdcore.logs import current_request_id, new_request_id
from icbdcore.manifest import MAX_MANIFEST, Manifest, VersionRecord
from icbdcore.records import now_iso, read_json, write_bytes, write_json
from icbdcore.signing import Untrusted
from icbdcore.trust import StreamRecord, Trust
from icbdcore.wire import (
    NODES_ROUTE,
    REQUEST_ID_HEADER,
    InvalidInput,
    content_digest,
    manifest_object_path,
    stream_digest_path,
    stream_object_path,
)

from . import btrfs

log = logging.getLogger(__name__)

CHUNK = 4 << 20  # see streams.READ_SIZE
# Requests in a row that bring no new checked piece before a transfer gives
# up (and is retried later, from what it holds).
MAX_STALLS = 3
STOP_WAIT = 10.0  # the longest a stopping receive waits for its thread (it takes milliseconds)
# A stream's signed record lists a digest per 4 MiB piece: 67 bytes each, so
# 16 MiB holds the record of a stream of about 1 TB.
MAX_STREAM_RECORD = 16 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)\Z")
_UNSATISFIED = re.compile(r"bytes \*/(\d+)\Z")


@dataclass(frozen=True)
class Step:
    """What one answer to a request for a stream object means for the transfer.

    kind: "whole" (the whole stream follows: skip the bytes held), "part"
    (the rest from the byte asked for follows), "done" (nothing is left: the
    bytes held are the whole stream), "gone" (the master no longer makes this
    stream: ask for its record again), "wrong" (the source answers with an
    object of another length: not to be trusted) or "failed".
    """

    kind: str
    why: str | None = None  # for "failed" and "gone"; None: take the server's own error text
    resumable: bool = False  # for "failed": the bytes held may still be continued


def next_step(status: int, headers: Mapping[str, str], have: int, total: int) -> Step:
    """The Range exchange of a resumable transfer, as a pure function.

    The replica asks `GET /v1/streams/DIGEST` with `Range: bytes=HAVE-` once
    it holds HAVE bytes of the `total` its record gives. The object never
    changes, so any answer that continues it will do: 206 from HAVE, or 200
    with the whole stream (a cache that ignores ranges), whose first HAVE
    bytes are skipped; 416 when HAVE is already the whole stream.
    """
    if status == 200:
        length = headers.get("Content-Length")
        if length is not None and length != str(total):
            return Step("wrong", why=f"the stream object has {length} bytes, its record {total}")
        return Step("whole")
    if status == 416:
        if have == total:
            return Step("done")
        return Step("failed", why="the source refused the resume range")
    if status == 206:
        match = _CONTENT_RANGE.match(headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != have:
            return Step("failed", why="the source answered a range that does not continue the stream")
        if match.group(3) != "*" and int(match.group(3)) != total:
            return Step("wrong", why=f"the stream object has {match.group(3)} bytes, its record {total}")
        return Step("part")
    if status in (404, 410):
        return Step("gone")
    return Step("failed", resumable=status >= 500 or status == 429)


class Stop:
    """Stops a transfer's worker thread from the trio thread: its requests are
    cut off, its `btrfs receive` killed, and it checks `is_set()` between chunks."""

    def __init__(self) -> None:
        self.cutoff = Cutoff()
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        with self._lock:
            self._event.set()
            process = self._process
        self.cutoff.cut()
        if process is not None and process.poll() is None:
            process.kill()

    def watch(self, process: subprocess.Popen) -> None:
        """The worker's `btrfs receive`: killed at once if the stop came first."""
        with self._lock:
            self._process = process
            stopped = self._event.is_set()
        if stopped:
            process.kill()


class ReceiveFailed(Exception):
    """The transfer failed; `resumable` if the spool may be continued."""

    def __init__(self, message: str, resumable: bool = False):
        super().__init__(message)
        self.resumable = resumable


class CorruptPiece(ReceiveFailed):
    """A source sent a piece that does not match the signed stream record."""

    def __init__(self, message: str):
        super().__init__(message, resumable=True)


@dataclass
class Transfer:
    """One version moving from the master to this replica (shown in status)."""

    imi: str
    version: int
    parent: int | None
    state: str = "running"  # running | done | failed
    bytes: int = 0  # stream bytes through receive so far (spooled ones included)
    network_bytes: int = 0  # of which came over the network in this attempt
    resumed_from: int = 0
    sources: list[str] = field(default_factory=list)  # where the bytes came from, failovers in order
    started: str = field(default_factory=now_iso)
    error: str | None = None
    _t0: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    rid: str = field(default_factory=new_request_id)  # the transfer's request id, on every call it makes

    def finish(self, error: str | None = None) -> None:
        self.seconds = round(time.monotonic() - self._t0, 3)
        self.state = "failed" if error else "done"
        self.error = error

    def to_json(self) -> dict:
        seconds = self.seconds if self.state != "running" else round(time.monotonic() - self._t0, 3)
        doc = {
            "imi": self.imi, "version": self.version, "parent": self.parent, "bytes": self.bytes,
            "network_bytes": self.network_bytes, "seconds": seconds, "state": self.state,
            "started": self.started, "resumed_from": self.resumed_from, "rid": self.rid,
        }
        if self.sources:
            doc["sources"] = list(self.sources)
        if self.error:
            doc["error"] = self.error
        return doc


SPOOL_POLICIES = ("auto", "always", "never")
# With --resume-spool auto, the spool is judged once this much has arrived,
# timed from the first byte (the master's `btrfs send` start-up is not the
# link): kept if the stream arrives slower than FAST_LINK, a WAN; dropped
# otherwise, since on a LAN starting over costs less than writing every byte
# twice. A 1 Gbit/s link (125 MB/s) with the replica's own costs counts as fast.
JUDGE_AFTER = 64 << 20
FAST_LINK = 100e6  # bytes per second


class ResumeSpool:
    """The replica's copy of a stream so far (checked pieces only), from which
    a cut-off transfer resumes; named by the stream's digest."""

    def __init__(self, path: Path, meta_path: Path, policy: str):
        self.path = path
        self.meta_path = meta_path
        self.policy = policy
        self.digest: str | None = None
        self.fd: int | None = None
        self._judged = policy != "auto"
        self._first_byte: float | None = None  # when the first chunk arrived
        self._first_received = 0

    def open(self, digest: str | None = None) -> None:
        """Keep an earlier attempt's spool if it is of this stream, else start empty."""
        meta = read_json(self.meta_path, {}) if self.path.exists() else {}
        self.digest = meta.get("digest") if isinstance(meta, dict) else None
        if not self.digest or self.policy == "never" or (digest is not None and self.digest != digest):
            self.digest = None
            self.discard()
        if self.policy != "never":
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if self.digest:
            self._judged = True  # a resumed transfer keeps spooling

    def replay(self, record: StreamRecord, feed) -> int:
        """Hand the spooled pieces that match `record` to `feed`, in order;
        cut the spool after the last of them; return how many bytes there were."""
        offset = 0
        if self.fd is None or not self.digest:
            return 0
        while offset < record.bytes:
            length = min(record.piece_size, record.bytes - offset)
            data = os.pread(self.fd, length, offset)
            if len(data) != length or content_digest(data) != record.pieces[offset // record.piece_size]:
                break
            feed(data)
            offset += length
        os.ftruncate(self.fd, offset)
        return offset

    def begin(self, digest: str, about: dict) -> None:
        self.digest = digest
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            write_json(self.meta_path, {"digest": digest, **about})

    def append(self, data: bytes, offset: int, received: int) -> None:
        if self.fd is None:
            return
        view = memoryview(data)
        while view:
            view = view[os.pwrite(self.fd, view, offset + len(data) - len(view)):]
        if self._judged:
            return
        if self._first_byte is None:
            self._first_byte = time.monotonic()
            self._first_received = received
        elif received - self._first_received >= JUDGE_AFTER:
            self._judged = True
            rate = (received - self._first_received) / max(time.monotonic() - self._first_byte, 1e-6)
            if rate > FAST_LINK:
                log.info("stream arrives at %.0f MB/s: not spooling it for resume", rate / 1e6)
                self.discard()
            else:
                log.info("stream arrives at %.0f MB/s: spooling it so a cut-off transfer can resume", rate / 1e6)

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class _Progress:
    """How far a transfer got: checked bytes fed to `btrfs receive`."""

    have: int
    received: int = 0  # bytes that came over the network, in all attempts


class Receiver:
    def __init__(self, layout: Layout, master_url: str, credentials: Credentials, spool_policy: str = "auto",
                 trust: Trust | None = None):
        """`credentials` are the replica's, with its node id (streams are for registered nodes)."""
        if spool_policy not in SPOOL_POLICIES:
            raise ValueError(f"resume spool policy must be one of {SPOOL_POLICIES}")
        self.spool_policy = spool_policy
        self.layout = layout
        self.master_url = master_url.rstrip("/")
        self.pool = pool(credentials, maxsize=4, num_pools=4)
        self._limiter = trio.CapacityLimiter(2)
        assert trust is not None, "a receiver believes only what the master signed"
        self.trust = trust

    # --- start-up ---------------------------------------------------------------

    async def clean_incoming(self) -> None:
        """Remove partial receives of an earlier run; keep spools that can resume."""
        self.layout.incoming.mkdir(parents=True, exist_ok=True)
        for imi_dir in self.layout.incoming.iterdir():
            for path in imi_dir.iterdir() if imi_dir.is_dir() else [imi_dir]:
                if path.suffix == ".stream" and isinstance(read_json(path.with_suffix(".json")), dict):
                    continue
                if path.suffix == ".json" and path.with_suffix(".stream").exists():
                    continue
                log.info("removing partial receive %s", path)
                await btrfs.remove_tree(path)

    # --- one version ---------------------------------------------------------------

    def _paths(self, name: str, version: int, parent: int | None) -> tuple[Path, Path, Path]:
        spool = self.layout.resume_spool(name, version, parent)
        return spool, spool.with_suffix(".json"), self.layout.receive_dir(name, version)

    async def receive(self, name: str, version: int, parent: int | None, record: VersionRecord,
                      transfer: Transfer) -> Manifest:
        """Receive one version; return its verified manifest."""
        spool, spool_meta, target = self._paths(name, version, parent)
        spool.parent.mkdir(parents=True, exist_ok=True)
        await btrfs.remove_tree(target)
        target.mkdir()
        try:
            digest = await self._in_thread(
                self._stream_blocking, name, version, parent, spool, spool_meta, target, transfer)
            manifest = await self._accept(name, version, record, target, digest)
        except BaseException as error:
            # Cancelled: the replica is stopping; what arrived stays for the next start.
            keep = isinstance(error, trio.Cancelled) or (isinstance(error, ReceiveFailed) and error.resumable)
            with trio.CancelScope(shield=True):
                await btrfs.remove_tree(target)
                if not keep:
                    spool.unlink(missing_ok=True)
                    spool_meta.unlink(missing_ok=True)
            raise
        spool.unlink(missing_ok=True)
        spool_meta.unlink(missing_ok=True)
        return manifest

    async def _in_thread(self, work, *args):
        """`work(*args, stop)` in a worker thread. If the caller is cancelled,
        the thread is stopped (see Stop) and waited for, so nothing it does
        outlives the call, and the call does not outlive it by more than a
        moment (at most STOP_WAIT)."""
        stop = Stop()
        started, finished = threading.Event(), threading.Event()

        def run():
            started.set()
            try:
                if stop.is_set():  # cancelled before the thread began
                    raise ReceiveFailed("stopped", resumable=True)
                return work(*args, stop)
            finally:
                finished.set()

        try:
            return await trio.to_thread.run_sync(run, limiter=self._limiter, abandon_on_cancel=True)
        except trio.Cancelled:
            stop.set()
            if started.is_set():
                with trio.CancelScope(shield=True), trio.move_on_after(STOP_WAIT):
                    while not finished.is_set():
                        await trio.sleep(0.01)
            raise

    async def _accept(self, name: str, version: int, record: VersionRecord, target: Path, digest: str) -> Manifest:
        received = target / str(version)
        if not btrfs.is_subvolume(received):
            raise ReceiveFailed(f"the stream did not create subvolume {version}")
        info = await btrfs.subvolume_info(received)
        if not info.readonly or not info.received_uuid:
            raise ReceiveFailed("received subvolume is not read-only with a received UUID (incomplete stream)")
        raw, manifest = await self.fetch_manifest(name, version, record)
        write_bytes(self.layout.manifest_file(name, version), raw)
        write_json(self.layout.version_record(name, version), record.to_json())
        final = self.layout.version_dir(name, version)
        final.parent.mkdir(parents=True, exist_ok=True)
        btrfs.move_readonly_subvolume(received, final)
        target.rmdir()
        log.info("received %s version %d (stream digest %s)", name, version, digest)
        return manifest

    async def fetch_manifest(self, name: str, version: int, record: VersionRecord) -> tuple[bytes, Manifest]:
        """A version's manifest (the object named by the record's digest)
        from the master, refused unread past MAX_MANIFEST bytes, checked
        against the record; its bytes and itself."""
        raw = await self._in_thread(self._get_blocking, manifest_object_path(record.digest), MAX_MANIFEST)
        # Raises if it does not match the record; parsing a large manifest is CPU work.
        manifest = await trio.to_thread.run_sync(Manifest.from_bytes, raw, record.digest)
        return raw, manifest

    def _get_blocking(self, path: str, limit: int, stop: Stop) -> bytes:
        """The body of a GET to the master, at most `limit` bytes of it: a
        longer one is refused as soon as it says so or passes the limit."""
        with stop.cutoff:
            return self._get_capped(path, limit, stop)

    def _headers(self) -> dict:
        """The pool's headers (a request's own replace them) and the
        transfer's request id (this thread runs in its context)."""
        headers = dict(self.pool.headers)
        rid = current_request_id()
        if rid:
            headers[REQUEST_ID_HEADER] = rid
        return headers

    def _get_capped(self, path: str, limit: int, stop: Stop) -> bytes:
        try:
            response = self.pool.request(
                "GET", self.master_url + path, preload_content=False, headers=self._headers(),
                timeout=urllib3.Timeout(connect=5, read=60),
            )
        except urllib3.exceptions.HTTPError as error:
            raise ReceiveFailed(f"cannot reach the master: {error}", resumable=True) from None
        complete = False
        try:
            if response.status != 200:
                raise ReceiveFailed(f"master answered {response.status} for {path}", resumable=True)
            data = self._read_capped(response, path, limit)
            complete = response.read(1) == b""
            return data
        finally:
            if not complete:
                response.close()  # unread bytes on it: never reuse the connection
            stop.cutoff.release()
            response.release_conn()

    # --- the stream (blocking; runs in a worker thread) -------------------------------

    def _stream_blocking(
        self, name: str, version: int, parent: int | None, spool_path: Path, spool_meta: Path,
        target: Path, transfer: Transfer, stop: Stop,
    ) -> str:
        with stop.cutoff:
            return self._stream(name, version, parent, spool_path, spool_meta, target, transfer, stop)

    def _stream(
        self, name: str, version: int, parent: int | None, spool_path: Path, spool_meta: Path,
        target: Path, transfer: Transfer, stop: Stop,
    ) -> str:
        record = self._stream_record(name, version, parent, stop)
        spool = ResumeSpool(spool_path, spool_meta, self.spool_policy)
        process = btrfs.start_receive(target)
        stop.watch(process)

        def feed(data: bytes) -> None:
            _feed(process, data)

        try:
            spool.open(record.digest)
            have = spool.replay(record, feed)
            transfer.bytes = transfer.resumed_from = have
            if have:
                log.info("resuming %s v%d from byte %d of the spooled stream", name, version, have)
            else:
                spool.begin(record.digest, {"imi": name, "version": version, "parent": parent})
            progress = _Progress(have)
            self._download(record, progress, spool, feed, transfer, stop)
            process.stdin.close()
            code = process.wait()
            stderr = process.stderr.read().decode(errors="replace").strip()
            if code != 0:
                raise ReceiveFailed(f"btrfs receive failed: {_last_line(stderr, code)}")
            return record.digest
        except OSError as error:
            # ENOSPC and friends: fail this transfer, keep the node.
            raise ReceiveFailed(f"{error.strerror or error}", resumable=False) from None
        finally:
            spool.close()
            if process.poll() is None:
                process.kill()
                process.wait()

    def _download(self, record: StreamRecord, progress: _Progress, spool: ResumeSpool, feed,
                  transfer: Transfer, stop: Stop) -> None:
        """Every byte of the stream object from `progress.have` on, each piece
        checked against `record` before it is fed: from --master first; after
        a damaged piece, from the master's own URL. A cut connection is asked
        again from the last good piece (a few times in a row without progress
        at most, then the transfer fails and is retried later)."""
        sources = [self.master_url]
        origin_asked = False
        stalls = 0
        while progress.have < record.bytes:
            source = sources[-1]
            if not transfer.sources or transfer.sources[-1] != source:
                transfer.sources.append(source)
            before = progress.have
            try:
                self._fetch_part(source, record, progress, spool, feed, transfer, stop)
            except CorruptPiece as error:
                log.error("%s", error)
                if not origin_asked:
                    origin_asked = True
                    origin = self._origin_url(stop)
                    if origin is not None and origin not in sources:
                        log.warning("taking the stream from the master's own URL %s instead", origin)
                        sources.append(origin)
                        continue
                raise
            except ReceiveFailed as error:
                if not error.resumable or stop.is_set():
                    raise
                stalls = 0 if progress.have > before else stalls + 1
                if stalls >= MAX_STALLS:
                    raise
                log.info("%s; asking again from byte %d", error, progress.have)
                if stop.cutoff.is_cut:
                    raise
                time.sleep(min(0.5 * stalls, 2.0))

    def _fetch_part(self, source: str, record: StreamRecord, progress: _Progress, spool: ResumeSpool, feed,
                    transfer: Transfer, stop: Stop) -> None:
        """One request for the rest of the stream object at `source`."""
        url = source + stream_object_path(record.digest)
        headers = self._headers()
        if progress.have:
            headers["Range"] = f"bytes={progress.have}-"
        response = self._open(url, headers)
        try:
            step = next_step(response.status, response.headers, progress.have, record.bytes)
            if step.kind == "done":
                return
            if step.kind == "gone":
                raise ReceiveFailed(f"{source} no longer has stream {record.digest} ({response.status}); "
                                    "asking for its record again")
            if step.kind == "wrong":
                raise CorruptPiece(f"{source}: {step.why}")
            if step.kind == "failed":
                why = _error_text(response, source) if step.why is None else f"{source}: {step.why}"
                raise ReceiveFailed(why, resumable=step.resumable)
            skip = progress.have if step.kind == "whole" else 0
            self._take_body(response, source, record, progress, skip, spool, feed, transfer, stop)
        except BaseException:
            response.close()  # its body may be half read: never reuse the connection
            raise
        finally:
            with contextlib.suppress(urllib3.exceptions.HTTPError, OSError):
                response.drain_conn()  # e.g. a 416's body, before the next request on it
            stop.cutoff.release()
            response.release_conn()

    def _take_body(self, response, source: str, record: StreamRecord, progress: _Progress, skip: int,
                   spool: ResumeSpool, feed, transfer: Transfer, stop: Stop) -> None:
        size = record.piece_size
        buffer = bytearray()
        try:
            for data in response.stream(CHUNK, decode_content=False):
                if stop.is_set():
                    raise ReceiveFailed("stopped", resumable=True)
                progress.received += len(data)
                transfer.network_bytes += len(data)
                if skip:
                    cut = min(skip, len(data))
                    data, skip = data[cut:], skip - cut
                buffer += data
                while progress.have < record.bytes:
                    length = min(size, record.bytes - progress.have)
                    if len(buffer) < length:
                        break
                    piece = bytes(buffer[:length])
                    del buffer[:length]
                    index = progress.have // size
                    if content_digest(piece) != record.pieces[index]:
                        raise CorruptPiece(f"{source} sent piece {index} of stream {record.digest} (bytes "
                                           f"{progress.have}-{progress.have + length - 1}) that does not match "
                                           "the stream record the master signed")
                    spool.append(piece, progress.have, progress.received)
                    feed(piece)
                    progress.have += length
                    transfer.bytes = progress.have
                if progress.have >= record.bytes and buffer:
                    raise CorruptPiece(f"{source} sent more bytes than the {record.bytes} of stream "
                                       f"{record.digest}")
        except (urllib3.exceptions.HTTPError, ConnectionError) as error:
            raise ReceiveFailed(f"stream cut off at byte {progress.have}: {error}", resumable=True) from None
        if progress.have < record.bytes:
            raise ReceiveFailed(f"stream cut off at byte {progress.have} of {record.bytes}", resumable=True)

    def _open(self, url: str, headers: dict) -> urllib3.BaseHTTPResponse:
        try:
            return self.pool.request(
                "GET", url, headers=headers, preload_content=False, redirect=False,
                timeout=urllib3.Timeout(connect=5, read=120),
            )
        except urllib3.exceptions.HTTPError as error:
            raise ReceiveFailed(f"cannot reach {url.split('/v1/')[0]}: {error}", resumable=True) from None

    def _stream_record(self, name: str, version: int, parent: int | None, stop: Stop) -> StreamRecord:
        """The stream record the master signed: the only source of the digests
        a stream must have. While the master is still making the stream (202),
        ask again."""
        path = stream_digest_path(name, version, parent)
        waited = False
        while True:
            if stop.is_set():
                raise ReceiveFailed("stopped", resumable=True)
            response = self._open(self.master_url + path, self._headers())
            try:
                if response.status == 202:
                    retry = response.headers.get("Retry-After", "1")
                    pause = min(float(retry), 2.0) if retry.isdigit() else 1.0
                    if not waited:
                        log.info("the master is making the stream of %s v%d from %s; waiting", name,
                                 version, parent)
                        waited = True
                    raw = None
                elif response.status != 200:
                    raise ReceiveFailed(_error_text(response, "the master"), resumable=True)
                else:
                    raw = self._read_capped(response, path, MAX_STREAM_RECORD)
            finally:
                with contextlib.suppress(urllib3.exceptions.HTTPError, OSError):
                    response.drain_conn()
                stop.cutoff.release()
                response.release_conn()
            if raw is not None:
                break
            time.sleep(pause)
        try:
            return self.trust.stream_record(json.loads(raw), name, version, parent)
        except (Untrusted, InvalidInput, ValueError) as error:
            raise ReceiveFailed(f"refusing the stream record: {error}") from None

    def _read_capped(self, response, path: str, limit: int) -> bytes:
        length = response.headers.get("Content-Length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise ReceiveFailed(f"master announced {length} bytes for {path}, over {limit}")
        try:
            data = response.read(limit + 1)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise ReceiveFailed(f"cannot read {path} from the master: {error}", resumable=True) from None
        if len(data) > limit:
            raise ReceiveFailed(f"master sent more than {limit} bytes for {path}")
        return data

    def _origin_url(self, stop: Stop) -> str | None:
        """The master's own URL from its node list, if --master is another
        (an HTTP cache in front of it); None if it cannot be learnt."""
        try:
            raw = self._get_capped(NODES_ROUTE, 16 << 20, stop)
            nodes = json.loads(raw).get("nodes", [])
            urls = [n.get("url") for n in nodes if isinstance(n, dict) and n.get("role") == "master"]
        except (ReceiveFailed, ValueError, AttributeError) as error:
            log.warning("cannot learn the master's own URL: %s", error)
            return None
        url = urls[0].rstrip("/") if urls and isinstance(urls[0], str) else None
        return url if url and url != self.master_url else None


def _feed(process, data: bytes) -> None:
    try:
        process.stdin.write(data)
    except BrokenPipeError:
        stderr = process.stderr.read().decode(errors="replace").strip()
        raise ReceiveFailed(f"btrfs receive stopped: {_last_line(stderr, process.wait())}") from None


def _last_line(text: str, code) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {code}"


def _error_text(response, who: str = "the master") -> str:
    try:
        return f"{who} answered {response.status}: {json.loads(response.data)['error']}"
    except Exception:
        return f"{who} answered {response.status}"
