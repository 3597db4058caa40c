"""Faults on purpose: a replica killed again and again during a transfer,
bytes damaged in transit, on the master's disk and in the cache's store, and
the cache server and the mount restarted under load.

What must hold, whatever breaks: no partial or wrong version is ever
visible under DATA/imis/, no wrong byte reaches a reader, and the work
completes once the fault is gone. (Extends tests/test_recovery.py and
tests/test_readpath.py; it does not repeat them.)

`FaultProxy` sits between a replica and the master (the replica's --master
points at it). It forwards bytes as they come and, on request, holds a
connection at a chosen point of a stream answer, holds manifest requests,
or patches bytes of the next stream answer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import xxhash
from trees import describe, make_tree

from bench.cluster import TOKEN, Cluster, Node, fuse_unmount, is_mountpoint, wait_for
from bench.data import write_image
from replicator.wire import Manifest

MIB = 1 << 20
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


# --- a TCP proxy that breaks things on request ---------------------------------------------


_REQUEST_LINE = re.compile(rb"(GET|POST|PUT|DELETE|HEAD) (\S+) HTTP/1\.1\r\n")


class _Conn:
    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()
        self.kind = "other"  # of the request in progress: stream | manifest | other
        self.sent = 0  # bytes of the current answer forwarded
        self.hold_at: int | None = None
        self.patches: dict[int, int] = {}  # body offset -> byte
        self.head = b""  # the current answer's head, until its end is seen
        self.body_start: int | None = None

    def close(self) -> None:
        self.closed.set()
        for s in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


class FaultProxy:
    """127.0.0.1:port -> upstream. Knobs (set between phases):

    - `hold_stream_at`: forward that many bytes of the next stream answer,
      then nothing more until `release` is set (or the connection dies);
    - `hold_manifests`: manifest requests wait for `release`;
    - `patch_sets`: a list of {body offset: byte}; each stream answer takes
      the next one (answers must have a Content-Length: complete spools).
    """

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.hold_stream_at: int | None = None
        self.hold_manifests = False
        self.split_pause = 0.0  # > 0: a 416 answer's body follows its head after this pause
        self.patch_sets: list[dict[int, int]] = []
        self.release = threading.Event()
        self.stream_held = threading.Event()
        self.manifest_held = threading.Event()
        self.stream_requests = 0
        self.patched_answers = 0
        self._conns: list[_Conn] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arm(self, *, hold_stream_at: int | None = None, hold_manifests: bool = False) -> None:
        self.release.clear()
        self.stream_held.clear()
        self.manifest_held.clear()
        self.hold_stream_at = hold_stream_at
        self.hold_manifests = hold_manifests

    def disarm(self) -> None:
        self.hold_stream_at = None
        self.hold_manifests = False
        self.release.set()

    def close(self) -> None:
        self._stop.set()
        self.release.set()
        self.listener.close()
        with self._lock:
            for conn in self._conns:
                conn.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            conn = _Conn(client, upstream)
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._requests, args=(conn,), daemon=True).start()
            threading.Thread(target=self._answers, args=(conn,), daemon=True).start()

    def _wait_release(self, conn: _Conn) -> bool:
        while not self.release.wait(0.05):
            if conn.closed.is_set() or self._stop.is_set():
                return False
        return True

    def _requests(self, conn: _Conn) -> None:
        try:
            while data := conn.client.recv(1 << 16):
                match = _REQUEST_LINE.search(data)
                if match:
                    path = match.group(2).split(b"?")[0]
                    conn.kind = ("stream" if path.endswith(b"/stream") else
                                 "manifest" if path.endswith(b"/manifest") else "other")
                    conn.sent, conn.head, conn.body_start = 0, b"", None
                    conn.hold_at, conn.patches = None, {}
                    if conn.kind == "stream":
                        self.stream_requests += 1
                        conn.hold_at = self.hold_stream_at
                        if self.patch_sets:
                            conn.patches = self.patch_sets.pop(0)
                    if conn.kind == "manifest" and self.hold_manifests:
                        self.manifest_held.set()
                        if not self._wait_release(conn):
                            return
                conn.upstream.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def _answers(self, conn: _Conn) -> None:
        try:
            while data := conn.upstream.recv(1 << 16):
                if conn.kind == "stream" and conn.sent == 0 and self.split_pause and data.startswith(b"HTTP/1.1 416"):
                    # The network hands the head and the body over in two pieces.
                    end = data.find(b"\r\n\r\n") + 4
                    conn.client.sendall(data[:end])
                    time.sleep(self.split_pause)
                    conn.sent, data = end, data[end:]
                if conn.kind == "stream":
                    data = self._patch(conn, data)
                    if conn.hold_at is not None and conn.sent + len(data) >= conn.hold_at:
                        cut = max(0, conn.hold_at - conn.sent)
                        conn.client.sendall(data[:cut])
                        conn.sent += cut
                        data = data[cut:]
                        self.stream_held.set()
                        conn.hold_at = None
                        if not self._wait_release(conn):
                            return
                conn.client.sendall(data)
                conn.sent += len(data)
        except OSError:
            pass
        finally:
            conn.close()

    def _patch(self, conn: _Conn, data: bytes) -> bytes:
        if conn.body_start is None:
            conn.head += data
            end = conn.head.find(b"\r\n\r\n")
            if end >= 0:
                conn.body_start = end + 4
                if conn.patches and b"content-length" not in conn.head[:end].lower():
                    raise AssertionError("patches need an answer with a Content-Length (a complete spool)")
        if not conn.patches or conn.body_start is None:
            return data
        out = bytearray(data)
        for offset, byte in list(conn.patches.items()):
            i = conn.body_start + offset - conn.sent
            if 0 <= i < len(out):
                out[i] = byte
                del conn.patches[offset]
                if not conn.patches:
                    self.patched_answers += 1
        return bytes(out)


# --- the btrfs send stream: enough of it to forge a command ------------------------------------

_CRC32C_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC32C_TABLE.append(_c)


def crc32c_raw(data: bytes, crc: int = 0) -> int:
    """CRC32C as btrfs send computes it: seed 0, no final inversion."""
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


SEND_C_WRITE = 15
SEND_A_DATA = 19


def forge_write(stream: bytes, after: int) -> tuple[int, dict[int, int]]:
    """Find the first WRITE command starting after byte `after`, flip one byte
    of its file data and fix the command's CRC32C, as a man in the middle
    who knows the format would. Returns (the data byte's offset, patches)."""
    assert stream[:13] == b"btrfs-stream\0"
    pos = 17
    while pos < len(stream):
        length, cmd, crc = struct.unpack_from("<IHI", stream, pos)
        payload = stream[pos + 10:pos + 10 + length]
        if cmd == SEND_C_WRITE and pos > after:
            header = bytearray(stream[pos:pos + 10])
            header[6:10] = b"\0\0\0\0"
            assert crc32c_raw(bytes(header) + payload) == crc, "CRC32C check of an untouched command failed"
            tlv = 0
            while tlv < len(payload):
                kind, size = struct.unpack_from("<HH", payload, tlv)
                if kind == SEND_A_DATA and size > 64:
                    at = pos + 10 + tlv + 4 + size // 2
                    forged = bytearray(payload)
                    forged[at - pos - 10] ^= 0x5A
                    new_crc = crc32c_raw(bytes(header) + bytes(forged))
                    patches = {at: stream[at] ^ 0x5A}
                    for i, byte in enumerate(struct.pack("<I", new_crc)):
                        patches[pos + 6 + i] = byte
                    return at, patches
                tlv += 4 + size
        pos += 10 + length
    raise AssertionError("no WRITE command with data in the stream")


# --- helpers ---------------------------------------------------------------------------------


def _visible(node: Node, name: str) -> list[str]:
    root = node.data / "imis" / name
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


class VisibilityWatch:
    """Polls DATA/imis/NAME of a replica: what appears there must be the
    finished version, once, and stay."""

    def __init__(self, node: Node, name: str):
        self.node, self.name = node, name
        self.seen: list[list[str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(OSError):
                now = _visible(self.node, self.name)
                if not self.seen or self.seen[-1] != now:
                    self.seen.append(now)

    def __enter__(self) -> VisibilityWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def check(self, final: list[str]) -> None:
        states = [s for s in self.seen if s]
        assert all(s == final for s in states), f"visible under imis/{self.name}: {self.seen}"
        first = next((i for i, s in enumerate(self.seen) if s), None)
        if first is not None:
            assert all(s == final for s in self.seen[first:]), f"a version came and went: {self.seen}"


def _transfer(node: Node, name: str) -> dict | None:
    running = [t for t in node.status()["transfers"] if t["imi"] == name and t["state"] == "running"]
    return running[-1] if running else None


def _children(pid: int) -> list[int]:
    kids = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
    return kids


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _freeze_receive(node: Node, timeout: float = 60) -> int:
    """SIGSTOP the replica's `btrfs receive` the moment it appears; its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.process.poll() is not None:
            raise AssertionError(f"{node.id} exited: {node.log.read_text()[-2000:]}")
        for kid in _children(node.pid):
            if b"receive" in _cmdline(kid):
                os.kill(kid, signal.SIGSTOP)
                return kid
        time.sleep(0.002)
    raise AssertionError("btrfs receive never started")


def _big_tree(path: Path, size: int) -> Path:
    path.mkdir()
    write_image(path / "disk.img", size)
    (path / "etc").mkdir()
    (path / "etc" / "hostname").write_text("big\n")
    return path


def _restart(node: Node) -> None:
    """Start a replica and have it sync at once. (Left alone, a restarted
    replica waits for its 10 s poll before it resumes: see the report.)"""
    node.start()
    wait_for(lambda: node.status()["master_reachable"], what=f"{node.id} to reach the master")
    answer = requests.post(f"{node.url}/v1/notify", json={"imi": "big"}, headers=HEADERS, timeout=10)
    assert answer.status_code == 200, answer.text


def _wait_holding(node: Node, name: str, timeout: float) -> dict:
    """Like Cluster.wait_held, but a replica that dies fails at once, with its log."""

    def held():
        node.ready()  # raises with the log's tail if the process exited
        status = node.status()
        return status if status["versions"].get(name) == [1] else None

    return wait_for(held, timeout, what=f"{node.id} to hold {name} [1]")


def _log_count(node: Node, text: str) -> int:
    return node.log.read_text(errors="replace").count(text)


def _cleanup(cluster: Cluster, root: Path) -> None:
    cluster.stop_all()
    if os.environ.get("ICBD_KEEP_TMP"):
        return
    if not any(is_mountpoint(p) for p in [*(n.data for n in cluster.nodes), *(m.mountpoint for m in cluster.mounts)]):
        shutil.rmtree(root, ignore_errors=True)


# --- a replica killed at every phase of a transfer ------------------------------------------------


def test_kill9_replica_at_every_phase_of_a_transfer(tmp_path):
    """kill -9 (1) in the stream, (2) while the restarted replica replays its
    spool into btrfs receive, (3) in the stream again after a resume, (4) right
    after the stream ended, before the version is accepted. Every restart
    removes the partial receive, nothing is ever visible before the end, and
    the fifth start completes the transfer."""
    size = 256 * MIB
    cluster = Cluster(tmp_path)
    proxy = None
    try:
        master = cluster.master(image_size="3G")
        proxy = FaultProxy(master.port)
        # Loopback is a fast link, where the default (auto) keeps no resume spool.
        r1 = cluster.replica("r1", image_size="3G", start=False, extra=["--resume-spool", "always"])
        r1.argv[r1.argv.index("--master") + 1] = proxy.url  # the replica sees the master through the proxy
        r1.start()
        tree = _big_tree(tmp_path / "tree", size)
        cluster.icbd("imi", "create", "big", "--from", str(tree))
        cluster.icbd("imi", "publish", "big")
        phases = []
        with VisibilityWatch(r1, "big") as watch:
            # 1. In the stream: the proxy stops it at 96 MiB.
            proxy.arm(hold_stream_at=96 * MIB)
            cluster.icbd("subscribe", "big", "--node", "r1")
            assert proxy.stream_held.wait(60), "the stream never reached 96 MiB"
            wait_for(lambda: (_transfer(r1, "big") or {}).get("bytes", 0) >= 90 * MIB, timeout=30,
                     what="the replica to take in 90 MiB")
            r1.kill9()
            phases.append("in the stream at 96 MiB")
            assert _visible(r1, "big") == []

            # 2. During the replay of the spool: btrfs receive frozen as it starts.
            proxy.arm()
            cleaned = _log_count(r1, "removing partial receive")
            _restart(r1)
            frozen = _freeze_receive(r1)
            transfer = _transfer(r1, "big")
            assert transfer is not None and transfer["bytes"] == 0, f"not replaying: {transfer}"
            spool = r1.data / "incoming" / "big" / "1-full.stream"
            assert spool.stat().st_size >= 90 * MIB
            assert _log_count(r1, "removing partial receive") > cleaned, "the partial receive was not removed"
            r1.kill9()
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGCONT)
            wait_for(lambda: not os.path.exists(f"/proc/{frozen}") or b"receive" not in _cmdline(frozen),
                     timeout=10, what="btrfs receive to die with the replica")
            phases.append("replaying the spool")
            assert _visible(r1, "big") == []

            # 3. In the stream again, after resuming with a Range request.
            proxy.arm(hold_stream_at=64 * MIB)
            cleaned = _log_count(r1, "removing partial receive")
            _restart(r1)
            assert proxy.stream_held.wait(60), "the resumed stream never got 64 MiB in"
            wait_for(lambda: (_transfer(r1, "big") or {}).get("bytes", 0) >= 150 * MIB, timeout=30,
                     what="the replica to take in 150 MiB")
            resumed = _transfer(r1, "big")
            assert resumed["resumed_from"] >= 90 * MIB, resumed
            assert _log_count(r1, "removing partial receive") > cleaned
            r1.kill9()
            phases.append("in the stream after a resume")
            assert _visible(r1, "big") == []

            # 4. Right after the stream ended: the manifest request (the step
            # before the rename) is held, so the stream is whole and verified.
            proxy.arm(hold_manifests=True)
            cleaned = _log_count(r1, "removing partial receive")
            _restart(r1)
            assert proxy.manifest_held.wait(90), "the replica never asked for the manifest"
            total = os.path.getsize(master.data / "streams" / "big" / "1-full.stream")
            transfer = _transfer(r1, "big")
            assert transfer is not None and transfer["bytes"] == total, (transfer, total)
            assert (r1.data / "incoming" / "big" / "1.recv" / "1").exists()
            assert _log_count(r1, "removing partial receive") > cleaned
            r1.kill9()
            phases.append("after the end of the stream, before the rename")
            assert _visible(r1, "big") == []

            # 5. No more faults: it completes from the spool, without the network.
            # (The master answers the resume from the end with 416; the proxy
            # delivers that answer's body 0.2 s after its head, as a network may.)
            proxy.disarm()
            proxy.split_pause = 0.2
            cleaned = _log_count(r1, "removing partial receive")
            _restart(r1)
            status = _wait_holding(r1, "big", timeout=120)
            assert _log_count(r1, "removing partial receive") > cleaned
        watch.check(["1"])
        assert describe(r1.data / "imis" / "big" / "1") == describe(tree)
        assert list((r1.data / "incoming").glob("*/*")) == []
        done = [t for t in status["transfers"] if t["state"] == "done"][-1]
        assert done["resumed_from"] == total and done["network_bytes"] == 0, done
        print(f"\nkill -9 at: {phases}; then done: {done}")
        assert len(phases) == 4
    finally:
        if proxy:
            proxy.close()
        _cleanup(cluster, tmp_path)


# --- bytes damaged in transit and on the master's disk --------------------------------------------


def _warm_spool(master: Node, name: str, node_id: str) -> bytes:
    """Make the master spool the whole stream (so answers carry a Content-Length); its bytes."""
    response = requests.get(f"{master.url}/v1/imis/{name}/versions/1/stream",
                            headers={**HEADERS, "X-Icbd-Node": node_id}, timeout=120)
    assert response.status_code == 200
    path = master.data / "streams" / name / "1-full.stream"
    wait_for(lambda: path.with_suffix(".json").exists(), what="the spool to be complete")
    assert path.read_bytes() == response.content
    return response.content


def test_stream_bytes_damaged_in_transit_are_refused(tmp_path):
    """A man in the middle flips one byte of file data (1) as is: btrfs
    receive's CRC32C refuses the command; (2) with the command's CRC32C fixed,
    as anyone who knows the format can: btrfs receive accepts, and only the
    end-to-end xxh3 digest refuses it. Nothing is visible in between, and the
    third, clean transfer is accepted."""
    cluster = Cluster(tmp_path)
    proxy = None
    try:
        master = cluster.master()
        proxy = FaultProxy(master.port)
        r1 = cluster.replica("r1", start=False)
        r1.argv[r1.argv.index("--master") + 1] = proxy.url
        r1.start()
        wait_for(lambda: "r1" in cluster.nodes_status(), what="r1 to register")
        tree = make_tree(tmp_path / "tree", big=24 * MIB + 77)
        cluster.icbd("imi", "create", "demo", "--from", str(tree))
        cluster.icbd("imi", "publish", "demo")
        stream = _warm_spool(master, "demo", "r1")
        naive_at = forge_write(stream, after=len(stream) // 3)[0]
        forged_at, forged = forge_write(stream, after=len(stream) // 2)
        proxy.patch_sets = [{naive_at: stream[naive_at] ^ 0x01}, forged]
        with VisibilityWatch(r1, "demo") as watch:
            cluster.icbd("subscribe", "demo", "--node", "r1")
            status = cluster.wait_held(r1, "demo", [1], timeout=60)
        watch.check(["1"])
        assert proxy.patched_answers == 2
        attempts = [t for t in status["transfers"] if t["imi"] == "demo"]
        assert [t["state"] for t in attempts] == ["failed", "failed", "done"], attempts
        assert "crc32" in attempts[0]["error"].lower(), attempts[0]
        assert "digest mismatch" in attempts[1]["error"], attempts[1]
        assert describe(r1.data / "imis" / "demo" / "1") == describe(tree)
        assert list((r1.data / "incoming").glob("*/*")) == []
        print(f"\nin transit: {[(t['state'], t.get('error', '')[:70]) for t in attempts]}")
    finally:
        if proxy:
            proxy.close()
        _cleanup(cluster, tmp_path)


@pytest.mark.parametrize("damage", ["forged-crc", "plain"])
def test_damaged_master_spool_is_detected_and_sent_afresh(tmp_path, damage):
    """A byte of a complete spool (DATA/streams/NAME/1-full.stream) changes on
    the master's disk. The replica must never accept it, and the master must
    notice and send the version afresh, so the replica gets it.

    `forged-crc`: the damage keeps btrfs's CRC32C right, so the replica reads
    the stream to the end and the master's full-read digest check fires.
    `plain`: btrfs receive stops at the bad command after a few MiB, so the
    master never reads to the end and never re-checks (see the report)."""
    cluster = Cluster(tmp_path)
    try:
        master = cluster.master()
        r1 = cluster.replica("r1")
        source = tmp_path / "tree"
        source.mkdir()
        write_image(source / "disk.img", 96 * MIB)
        cluster.icbd("imi", "create", "demo", "--from", str(source))
        cluster.icbd("imi", "publish", "demo")
        stream = _warm_spool(master, "demo", "r1")
        at, patches = forge_write(stream, after=4 * MIB)
        if damage == "plain":
            patches = {at: stream[at] ^ 0xFF}
        spool = master.data / "streams" / "demo" / "1-full.stream"
        with open(spool, "r+b") as f:
            for offset, byte in patches.items():
                f.seek(offset)
                f.write(bytes([byte]))
        with VisibilityWatch(r1, "demo") as watch:
            cluster.icbd("subscribe", "demo", "--node", "r1")
            try:
                cluster.wait_held(r1, "demo", [1], timeout=30)
            except AssertionError:
                errors = [t.get("error") for t in r1.status()["transfers"]]
                noticed = "spool damaged" in master.log.read_text()
                raise AssertionError(
                    f"the version never arrived: {len(errors)} attempts failed ({errors[-1]!r}); the master "
                    f"{'noticed' if noticed else 'never noticed'} the damaged spool") from None
        watch.check(["1"])
        assert "spool damaged on the master's disk" in master.log.read_text()
        assert describe(r1.data / "imis" / "demo" / "1") == describe(source)
        failed = [t for t in r1.status()["transfers"] if t["state"] == "failed"]
        assert failed, "the damaged stream was accepted"
    finally:
        _cleanup(cluster, tmp_path)


# --- a site: master, one replica, a cache server, a mount --------------------------------------------


@dataclass
class Site:
    cluster: Cluster
    r1: Node
    cache: Node
    source: Path
    manifest: Manifest
    content: dict[str, bytes] = field(default_factory=dict)  # path -> bytes, for checking reads


FILES = 24
FILE_SIZE = 4 * MIB


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """96 MiB in 24 files (more than the mount's 64 MiB of memory, so reads
    keep reaching the cache server), held by r1, read through a cache server."""
    root = tmp_path_factory.mktemp("faults-site")
    cluster = Cluster(root)
    try:
        cluster.master()
        r1 = cluster.replica("r1")
        source = root / "tree"
        (source / "files").mkdir(parents=True)
        for i in range(FILES):
            write_image(source / "files" / f"f{i:02d}", FILE_SIZE)
        cluster.icbd("imi", "create", "demo", "--from", str(source))
        cluster.icbd("imi", "publish", "demo")
        cluster.icbd("subscribe", "demo", "--node", "r1")
        cluster.wait_held(r1, "demo", [1])
        cache = cluster.cache("cache")
        wait_for(lambda: "r1" in {u["id"] for u in cache.status()["fetcher"]["upstreams"]},
                 what="the cache to know r1")
        manifest = Manifest.from_bytes(cluster.api("GET", "/v1/imis/demo/versions/1/manifest").content)
        content = {f"files/f{i:02d}": (source / "files" / f"f{i:02d}").read_bytes() for i in range(FILES)}
        yield Site(cluster, r1, cache, source, manifest, content)
    finally:
        _cleanup(cluster, root)


def _block(site: Site, digest: str) -> requests.Response:
    return requests.get(f"{site.cache.url}/v1/blocks/{digest}?imi=demo&version=1", headers=HEADERS, timeout=30)


def _served(node: Node) -> int:
    return node.status()["served"]["blocks"]


def test_damaged_blocks_in_the_cache_store_are_never_served(site, tmp_path):
    """Block files in the cache server's store (DATA/blocks/ab/<digest>)
    damaged seven ways: each read still returns the right bytes (refetched
    from the replica), never the damaged ones nor a file outside the store,
    and the store is repaired (the next read is a hit)."""
    digests = sorted(site.manifest.digests())
    for digest in digests[:8]:
        assert _block(site, digest).status_code == 200
    blocks = site.cache.data / "blocks"
    secret = tmp_path / "secret"
    marker = os.urandom(16).hex().encode()
    secret.write_bytes(marker * (MIB // len(marker)))

    def path(d: str) -> Path:
        return blocks / d[:2] / d

    def flip(p: Path) -> None:
        with open(p, "r+b") as f:
            f.seek(MIB // 2)
            byte = f.read(1)
            f.seek(MIB // 2)
            f.write(bytes([byte[0] ^ 0xFF]))

    def replace(p: Path, how) -> None:
        p.unlink()
        how(p)

    damages = {
        "one byte flipped": flip,
        "truncated to half": lambda p: os.truncate(p, MIB // 2),
        "emptied": lambda p: os.truncate(p, 0),
        "another block's bytes": lambda p: replace(p, lambda q: q.write_bytes(path(digests[0]).read_bytes())),
        "deleted": lambda p: p.unlink(),
        "a symlink to a file outside": lambda p: replace(p, lambda q: q.symlink_to(secret)),
        "a directory": lambda p: replace(p, lambda q: q.mkdir()),
    }
    victims = dict(zip(damages, digests[1:8], strict=True))
    for what, digest in victims.items():
        damages[what](path(digest))
    try:
        _check_damaged_blocks(site, victims, path, marker)
    finally:
        # Leave no damage behind for the tests that share this cache server.
        for digest in victims.values():
            if path(digest).is_symlink():
                path(digest).unlink()
            elif path(digest).is_dir():
                path(digest).rmdir()


def _check_damaged_blocks(site: Site, victims: dict[str, str], path, marker: bytes) -> None:
    before, served = site.cache.status()["store"], _served(site.r1)
    results = {}
    for what, digest in victims.items():
        answer = _block(site, digest)
        assert answer.status_code == 200, (what, answer.status_code, answer.text[:200])
        assert xxhash.xxh3_128_hexdigest(answer.content) == digest, f"{what}: wrong bytes served"
        assert marker not in answer.content
        results[what] = "refetched"
    refetched = _served(site.r1) - served
    assert refetched == len(victims), f"{refetched} of {len(victims)} damaged blocks refetched from the replica"
    store = site.cache.status()["store"]
    print(f"\ncache store damage: {results}; dropped corrupt {store['corrupt_dropped'] - before['corrupt_dropped']},"
          f" missing {store['missing_dropped'] - before['missing_dropped']}")
    # Repaired: the next read of each comes from the store, not the replica.
    served = _served(site.r1)
    for digest in victims.values():
        answer = _block(site, digest)
        assert answer.status_code == 200 and xxhash.xxh3_128_hexdigest(answer.content) == digest
    unrepaired = [what for what, digest in victims.items() if not path(digest).is_file() or path(digest).is_symlink()]
    assert _served(site.r1) == served and not unrepaired, \
        f"the store was not repaired for: {unrepaired} ({_served(site.r1) - served} fetched again)"


class Readers:
    """Threads reading random ranges of the site's files, through a mount or
    straight from the cache server, checking every byte. Errors and short
    reads of good bytes are counted (allowed while something restarts);
    wrong data is the failure."""

    def __init__(self, site: Site, mountpoint: Path | None, threads: int):
        self.site = site
        self.mountpoint = mountpoint
        self.counts = {"ok": 0, "short": 0, "errors": 0, "wrong": 0}
        self.wrong: list[str] = []
        self.errnos: dict[str, int] = {}
        self.last_ok = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _note(self, key: str, detail: str = "") -> None:
        with self._lock:
            self.counts[key] += 1
            if key == "ok":
                self.last_ok = time.monotonic()
            elif key == "wrong":
                self.wrong.append(detail)
            elif key == "errors":
                self.errnos[detail] = self.errnos.get(detail, 0) + 1

    def _run(self, index: int) -> None:
        rng = random.Random(index)
        digests = {d: (rel, i) for rel in self.site.content for i, d in enumerate(self.site.manifest.find(rel).chunks)}
        order = list(digests)
        while not self._stop.is_set():
            if self.mountpoint is not None:
                rel = rng.choice(list(self.site.content))
                offset = rng.randrange(0, FILE_SIZE - 1)
                length = rng.choice([4096, 128 << 10, MIB, 3 * MIB])
                try:
                    fd = os.open(self.mountpoint / "demo" / "1" / rel, os.O_RDONLY)
                    try:
                        data = os.pread(fd, length, offset)
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)
                except OSError as error:
                    self._note("errors", errno.errorcode.get(error.errno, str(error.errno)))
                    time.sleep(0.02)
                    continue
                expected = self.site.content[rel][offset:offset + length]
                if data == expected:
                    self._note("ok")
                elif 0 < len(data) < len(expected) and data == expected[:len(data)]:
                    # The kernel cut the read into FUSE requests and one failed:
                    # read(2) returns the good bytes before it (POSIX), the next call the error.
                    self._note("short")
                else:
                    self._note("wrong", f"{rel}@{offset}+{length}: {len(data)} bytes")
            else:
                digest = rng.choice(order)
                try:
                    answer = _block(self.site, digest)
                except requests.RequestException as error:
                    self._note("errors", type(error).__name__)
                    time.sleep(0.02)
                    continue
                if answer.status_code != 200:
                    self._note("errors", str(answer.status_code))
                    continue
                rel, i = digests[digest]
                if answer.content != self.site.content[rel][i * MIB:(i + 1) * MIB]:
                    self._note("wrong", f"block {digest}")
                else:
                    self._note("ok")

    def __enter__(self) -> Readers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def wait_ok(self, what: str, timeout: float = 30) -> None:
        mark = time.monotonic()
        wait_for(lambda: self.last_ok > mark, timeout=timeout, what=f"reads to succeed again after {what}")


def test_cache_server_restarts_under_load(site):
    """Readers through a mount and straight over HTTP while the cache server
    is stopped and started twice and killed with -9 once: errors at worst,
    never wrong data; afterwards its store is whole (audit) and still serves
    what it held without asking the replica."""
    cluster, cache = site.cluster, site.cache
    # A small memory cache in the mount, so its reads keep reaching the cache server.
    mount = cluster.mount("mnt-cache-restarts", cache=cache, timeout=5, extra=["--memory-cache", "16M"])
    try:
        with Readers(site, mount.mountpoint, 6) as via_mount, Readers(site, None, 4) as via_http:
            time.sleep(3)
            for how in ("stop", "stop", "kill9"):
                if how == "stop":
                    cache.stop()
                else:
                    cache.kill9()
                time.sleep(0.5)  # readers meet a dead server
                cache.start()
                via_mount.wait_ok(f"a cache {how}")
                via_http.wait_ok(f"a cache {how}")
                time.sleep(1.5)
        counts = {"mount": via_mount.counts, "http": via_http.counts}
        print(f"\ncache restarts under load: {counts}; errors {via_mount.errnos} {via_http.errnos}")
        assert not via_mount.wrong and not via_http.wrong, via_mount.wrong + via_http.wrong
        assert via_mount.counts["ok"] > 50 and via_http.counts["ok"] > 50
        assert via_mount.counts["errors"] + via_mount.counts["short"] > 0 and via_http.counts["errors"] > 0, \
            "the restarts were not felt"
    finally:
        mount.stop()
    wait_for(lambda: not cache.status()["store"]["recovering"], what="the store's recovery after kill -9")
    held = cache.status()["store"]["blocks"]
    assert held > 0
    served = _served(site.r1)
    for digest in sorted(site.manifest.digests()):
        assert xxhash.xxh3_128_hexdigest(_block(site, digest).content) == digest
    refetched = _served(site.r1) - served
    assert refetched <= len(site.manifest.digests()) - held, \
        f"{refetched} blocks fetched again though the store held {held} of {len(site.manifest.digests())}"
    cache.stop()
    from cache.blockstore import BlockStore

    with BlockStore(cache.data / "blocks", 1 << 30) as store:
        store.wait_recovered(30)
        audit = store.audit()
    cache.start()
    assert audit["missing"] == [] and audit["damaged"] == [] and audit["orphans"] == [], audit
    assert audit["totals_ok"] and audit["order_mismatch"] == 0, audit


def test_mount_restarts_under_load(site):
    """Readers on a mount whose daemon is stopped (SIGTERM) and killed (-9),
    then mounted again: errors while it is gone, never wrong data, and reads
    go on after each restart."""
    cluster = site.cluster
    mount = cluster.mount("mnt-restarts", cache=site.cache, timeout=5)
    root = mount.mountpoint
    try:
        with Readers(site, root, 8) as readers:
            time.sleep(2)
            for how in ("kill9", "stop", "kill9"):
                if how == "kill9":
                    mount.process.kill()
                    mount.process.wait(10)
                    time.sleep(0.3)  # readers meet a dead mount (ENOTCONN)
                    fuse_unmount(root)
                else:
                    mount.stop()
                assert not is_mountpoint(root)
                mount = cluster.mount("mnt-restarts", cache=site.cache, timeout=5)
                readers.wait_ok(f"a mount {how}")
                time.sleep(1.5)
        print(f"\nmount restarts under load: {readers.counts}; errors {readers.errnos}")
        assert not readers.wrong, readers.wrong
        assert readers.counts["ok"] > 100
        assert readers.counts["errors"] > 0  # the faults were felt
    finally:
        mount.stop()
