"""A replica's receive of one version, verified and atomic.

1. The stream from the master goes through `btrfs receive` under
   DATA/incoming/NAME/V.recv/, hashed as it goes, and is spooled beside it
   (V-from-P.stream) so that a transfer cut off by a crash or the network
   resumes with an HTTP Range request for the rest: the local receive starts
   over from the spool, the network does not.
2. It is accepted only if receive exited 0, the stream digest matches the
   one in the stream record the master signed (`GET .../stream/digest`,
   checked by icbdcore.trust; never a digest from the stream's own response
   headers), the subvolume is read-only with a received UUID, and the
   manifest matches the digest of the version record the master signed.
3. Records are written, then the subvolume moves to DATA/imis/NAME/V (one
   rename), so nothing partial is ever visible there.
4. On failure the partial subvolume is deleted; the spool is kept only when
   the stream itself was fine but cut short, or the replica is stopping.

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
from icbdcore.trust import Trust
from icbdcore.wire import (
    REQUEST_ID_HEADER,
    STREAM_ID_HEADER,
    InvalidInput,
    StreamHasher,
    manifest_path,
    stream_digest_path,
    stream_path,
)

from . import btrfs

log = logging.getLogger(__name__)

CHUNK = 4 << 20  # see streams.READ_SIZE
STOP_WAIT = 10.0  # the longest a stopping receive waits for its thread (it takes milliseconds)
# A stream's signed record lists a digest per 4 MiB piece: 67 bytes each, so
# 16 MiB holds the record of a stream of about 1 TB.
MAX_STREAM_RECORD = 16 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)\Z")
_UNSATISFIED = re.compile(r"bytes \*/(\d+)\Z")


@dataclass(frozen=True)
class Step:
    """What one answer to a stream request means for the transfer.

    kind: "begin" (a whole new stream follows: spool it from byte 0),
    "continue" (the rest from the byte asked for follows), "done" (nothing
    is left: the spool already holds the whole stream) or "failed".
    """

    kind: str
    complete: bool = False  # the body ends the stream (no further request needed)
    why: str | None = None  # for "failed"; None: take the server's own error text
    resumable: bool = False  # for "failed": the spool may still be continued


def next_step(status: int, headers: Mapping[str, str], have: int) -> Step:
    """The Range exchange of a resumable transfer, as a pure function.

    The replica asks `Range: bytes=HAVE-` with `If-Range: "<stream id>"` once
    it holds HAVE bytes. The master answers 206 with the part that exists
    (`bytes HAVE-END/TOTAL`, TOTAL `*` while its spool still grows), 200 with
    a whole new stream when the stream id changed (it restarted), or 416 when
    HAVE is already the whole stream.
    """
    if status == 200:
        if have:
            return Step("failed", why="the master's stream changed; starting over")
        return Step("begin", complete=True)
    if status == 416:
        total = _UNSATISFIED.match(headers.get("Content-Range", ""))
        if total and int(total.group(1)) == have:
            return Step("done")
        return Step("failed", why="master refused the resume range")
    if status == 206:
        match = _CONTENT_RANGE.match(headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != have:
            return Step("failed", why="master answered a range that does not continue the spool")
        complete = match.group(3) != "*" and int(match.group(2)) + 1 == int(match.group(3))
        return Step("continue", complete=complete)
    return Step("failed", resumable=status >= 500)


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
    """The replica's copy of a stream so far, from which a cut-off transfer resumes."""

    def __init__(self, path: Path, meta_path: Path, policy: str):
        self.path = path
        self.meta_path = meta_path
        self.policy = policy
        self.stream_id: str | None = None
        self.fd: int | None = None
        self._judged = policy != "auto"
        self._first_byte: float | None = None  # when the first chunk arrived
        self._first_received = 0

    def open(self) -> None:
        """Keep an earlier attempt's spool if it names its stream, else start empty."""
        meta = read_json(self.meta_path, {}) if self.path.exists() else {}
        self.stream_id = meta.get("stream_id") if isinstance(meta, dict) else None
        if not self.stream_id or self.policy == "never":
            self.stream_id = None
            self.discard()
        if self.policy != "never":
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if self.stream_id:
            self._judged = True  # a resumed transfer keeps spooling

    def replay(self, feed) -> int:
        """Hand the spooled bytes to `feed`; return how many there were."""
        offset = 0
        if self.fd is None or not self.stream_id:
            return 0
        while data := os.pread(self.fd, CHUNK, offset):
            feed(data)
            offset += len(data)
        return offset

    def begin(self, stream_id: str, about: dict) -> None:
        self.stream_id = stream_id
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            write_json(self.meta_path, {"stream_id": stream_id, **about})

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
        """A version's manifest from the master, refused unread past
        MAX_MANIFEST bytes, checked against the record; its bytes and itself."""
        raw = await self._in_thread(self._get_blocking, manifest_path(name, version), MAX_MANIFEST)
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
            length = response.headers.get("Content-Length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                raise ReceiveFailed(f"master announced {length} bytes for {path}, over {limit}")
            try:
                data = response.read(limit + 1)
            except (urllib3.exceptions.HTTPError, OSError) as error:
                raise ReceiveFailed(f"cannot read {path} from the master: {error}", resumable=True) from None
            if len(data) > limit:
                raise ReceiveFailed(f"master sent more than {limit} bytes for {path}")
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
        spool = ResumeSpool(spool_path, spool_meta, self.spool_policy)
        process = btrfs.start_receive(target)
        stop.watch(process)
        hasher = StreamHasher()

        def feed(data: bytes) -> None:
            hasher.update(data)
            _feed(process, data)

        try:
            spool.open()
            have = spool.replay(feed)
            transfer.bytes = transfer.resumed_from = have
            if have:
                log.info("resuming %s v%d from byte %d of the spooled stream", name, version, have)
            url = self.master_url + stream_path(name, version, parent)
            while True:
                headers = self._headers()
                if have:
                    headers["Range"] = f"bytes={have}-"
                    headers["If-Range"] = f'"{spool.stream_id}"'
                response = self._open(url, headers)
                try:
                    step = next_step(response.status, response.headers, have)
                    if step.kind == "done":
                        break
                    if step.kind == "failed":
                        why = _error_text(response) if step.why is None else step.why
                        raise ReceiveFailed(why, resumable=step.resumable)
                    if step.kind == "begin":
                        spool.begin(response.headers.get(STREAM_ID_HEADER, ""),
                                    {"imi": name, "version": version, "parent": parent})
                    complete = step.complete
                    have = self._copy_body(response, spool, have, feed, transfer, stop)
                except BaseException:
                    response.close()  # its body may be half read: never reuse the connection
                    raise
                finally:
                    with contextlib.suppress(urllib3.exceptions.HTTPError, OSError):
                        response.drain_conn()  # e.g. a 416's body, before the next request on it
                    stop.cutoff.release()
                    response.release_conn()
                if complete:
                    break
            process.stdin.close()
            code = process.wait()
            stderr = process.stderr.read().decode(errors="replace").strip()
            if code != 0:
                raise ReceiveFailed(f"btrfs receive failed: {_last_line(stderr, code)}")
            record = self._stream_record(name, version, parent, stop)
            if hasher.hexdigest() != record.digest or have != record.bytes:
                changed = " (the master's stream changed during the transfer)" if record.stream_id != spool.stream_id else ""
                raise ReceiveFailed(f"stream digest mismatch: got {have} bytes, digest {hasher.hexdigest()}; "
                                    f"the master signed {record.bytes} bytes, digest {record.digest}{changed}")
            return record.digest
        except OSError as error:
            # ENOSPC and friends: fail this transfer, keep the node.
            raise ReceiveFailed(f"{error.strerror or error}", resumable=False) from None
        finally:
            spool.close()
            if process.poll() is None:
                process.kill()
                process.wait()

    def _open(self, url: str, headers: dict) -> urllib3.BaseHTTPResponse:
        try:
            return self.pool.request(
                "GET", url, headers=headers, preload_content=False,
                timeout=urllib3.Timeout(connect=5, read=120),
            )
        except urllib3.exceptions.HTTPError as error:
            raise ReceiveFailed(f"cannot reach the master: {error}", resumable=True) from None

    def _copy_body(self, response, spool: ResumeSpool, have: int, feed, transfer: Transfer, stop) -> int:
        try:
            for data in response.stream(CHUNK, decode_content=False):
                if stop.is_set():
                    raise ReceiveFailed("stopped", resumable=True)
                spool.append(data, have, transfer.network_bytes + len(data))
                feed(data)
                have += len(data)
                transfer.bytes = have
                transfer.network_bytes += len(data)
        except (urllib3.exceptions.HTTPError, ConnectionError) as error:
            raise ReceiveFailed(f"stream cut off at byte {have}: {error}", resumable=True) from None
        return have

    def _stream_record(self, name: str, version: int, parent: int | None, stop: Stop):
        """The stream record the master signed: the only source of the digest a stream must have."""
        raw = self._get_capped(stream_digest_path(name, version, parent), MAX_STREAM_RECORD, stop)
        try:
            return self.trust.stream_record(json.loads(raw), name, version, parent)
        except (Untrusted, InvalidInput, ValueError) as error:
            raise ReceiveFailed(f"refusing the stream record: {error}") from None


def _feed(process, data: bytes) -> None:
    try:
        process.stdin.write(data)
    except BrokenPipeError:
        stderr = process.stderr.read().decode(errors="replace").strip()
        raise ReceiveFailed(f"btrfs receive stopped: {_last_line(stderr, process.wait())}") from None


def _last_line(text: str, code) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {code}"


def _error_text(response) -> str:
    try:
        return f"master answered {response.status}: {json.loads(response.data)['error']}"
    except Exception:
        return f"master answered {response.status}"
