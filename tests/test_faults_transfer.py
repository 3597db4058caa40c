"""Faults on purpose during a transfer: a replica killed again and again,
bytes damaged in transit and on the master's disk, a hostile stream in
place of the master's. (An HTTP cache in front of the master that serves a
damaged object: tests/test_http_caches.py.)

What must hold, whatever breaks: no partial or wrong version is ever
visible under DATA/imis/, and the transfer completes once the fault is gone.
(Extends tests/test_recovery.py; it does not repeat it. The read path's
faults are in tests/test_faults_readpath.py.)

The replica sees the master through a `FaultProxy` (tests/faultproxy.py),
which holds, patches or replaces stream answers on request;
tests/sendstream.py forges a btrfs send command with its CRC32C fixed, or a
whole hostile stream.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import requests
from cluster_teardown import stop_and_remove
from faultproxy import FaultProxy
from procs import children, cmdline
from sendstream import escape_streams, forge_write
from trees import describe, make_tree

from harness.cluster import TOKEN, Cluster, Node, wait_for
from harness.data import write_image

MIB = 1 << 20
HEADERS = {"Authorization": f"Bearer {TOKEN}"}

# Every test runs its own master and replica (on btrfs).
pytestmark = pytest.mark.btrfs


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


def _freeze_receive(node: Node, timeout: float = 60) -> int:
    """SIGSTOP the replica's `btrfs receive` the moment it appears; its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.process.poll() is not None:
            raise AssertionError(f"{node.id} exited: {node.log.read_text()[-2000:]}")
        for kid in children(node.pid):
            if b"receive" in cmdline(kid):
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
            wait_for(lambda: not os.path.exists(f"/proc/{frozen}") or b"receive" not in cmdline(frozen),
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
        stop_and_remove(cluster, tmp_path)


def _replica_through(cluster: Cluster, proxy: FaultProxy, **options) -> Node:
    """Replica r1, which sees the master through `proxy`, started and registered."""
    r1 = cluster.replica("r1", start=False, **options)
    r1.argv[r1.argv.index("--master") + 1] = proxy.url
    r1.start()
    wait_for(lambda: "r1" in cluster.nodes_status(), what="r1 to register")
    return r1


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


def test_stream_bytes_damaged_in_transit_are_caught_at_their_piece_and_failed_over(tmp_path):
    """A man in the middle (or a broken HTTP cache) flips one byte of file
    data. The replica finds that the 4 MiB piece that holds it does not match
    the signed stream record before `btrfs receive` sees a byte of it, takes
    the stream from the master's own URL from that piece on, and accepts the
    clean version in the same transfer. Nothing is visible in between."""
    cluster = Cluster(tmp_path)
    proxy = None
    try:
        master = cluster.master()
        proxy = FaultProxy(master.port)
        r1 = _replica_through(cluster, proxy)
        tree = make_tree(tmp_path / "tree", big=24 * MIB + 77)
        cluster.icbd("imi", "create", "demo", "--from", str(tree))
        cluster.icbd("imi", "publish", "demo")
        stream = _warm_spool(master, "demo", "r1")
        naive_at = forge_write(stream, after=len(stream) // 3)[0]
        proxy.patch_sets = [{naive_at: stream[naive_at] ^ 0x01}]
        with VisibilityWatch(r1, "demo") as watch:
            cluster.icbd("subscribe", "demo", "--node", "r1")
            status = cluster.wait_held(r1, "demo", [1], timeout=60)
        watch.check(["1"])
        assert proxy.patched_answers == 1
        attempts = [t for t in status["transfers"] if t["imi"] == "demo"]
        assert [t["state"] for t in attempts] == ["done"], attempts
        assert attempts[0]["sources"] == [proxy.url, master.url], attempts[0]
        log = r1.log.read_text()
        assert f"sent piece {naive_at // (4 * MIB)} of stream" in log and "does not match the stream record" in log
        assert "crc32" not in log.lower()  # btrfs receive never saw the damaged command
        assert describe(r1.data / "imis" / "demo" / "1") == describe(tree)
        assert list((r1.data / "incoming").glob("*/*")) == []
    finally:
        if proxy:
            proxy.close()
        stop_and_remove(cluster, tmp_path)


def test_a_forged_crc_in_transit_is_caught_as_well(tmp_path):
    """The same with the CRC32C of the changed command fixed, as anyone who
    knows the format can: btrfs receive would take it; the piece check does not."""
    cluster = Cluster(tmp_path)
    proxy = None
    try:
        master = cluster.master()
        proxy = FaultProxy(master.port)
        r1 = _replica_through(cluster, proxy)
        tree = make_tree(tmp_path / "tree", big=24 * MIB + 77)
        cluster.icbd("imi", "create", "demo", "--from", str(tree))
        cluster.icbd("imi", "publish", "demo")
        stream = _warm_spool(master, "demo", "r1")
        _, forged = forge_write(stream, after=len(stream) // 2)
        proxy.patch_sets = [forged]
        with VisibilityWatch(r1, "demo") as watch:
            cluster.icbd("subscribe", "demo", "--node", "r1")
            status = cluster.wait_held(r1, "demo", [1], timeout=60)
        watch.check(["1"])
        assert proxy.patched_answers == 1
        attempts = [t for t in status["transfers"] if t["imi"] == "demo"]
        assert [t["state"] for t in attempts] == ["done"] and attempts[0]["sources"] == [proxy.url, master.url]
        assert "does not match the stream record" in r1.log.read_text()
        assert describe(r1.data / "imis" / "demo" / "1") == describe(tree)
    finally:
        if proxy:
            proxy.close()
        stop_and_remove(cluster, tmp_path)


@pytest.mark.parametrize("damage", ["forged-crc", "plain"])
def test_damaged_master_spool_is_detected_and_made_again(tmp_path, damage):
    """A byte of a complete spool (DATA/streams/NAME/1-full.stream) changes on
    the master's disk. The master checks every piece it reads back against
    the record it signed, so it cuts the answer off before the damaged piece;
    it then drops the spool and runs `btrfs send` again, checking the new
    bytes against the same record, and the replica goes on from the last good
    piece. No damaged byte is ever sent, whether or not its CRC32C was fixed."""
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
            cluster.wait_held(r1, "demo", [1], timeout=60)
        watch.check(["1"])
        assert "spool damaged on the master's disk" in master.log.read_text()
        assert master.status()["streams"]["made_again"] >= 1
        assert describe(r1.data / "imis" / "demo" / "1") == describe(source)
        assert "does not match the stream record" not in r1.log.read_text()  # never sent
        assert spool.read_bytes() == stream  # the spool made again is the very stream
    finally:
        stop_and_remove(cluster, tmp_path)


# --- a hostile stream in place of the master's -------------------------------------------------


def test_forged_stream_escapes_write_nothing_outside_incoming_and_are_never_accepted(tmp_path):
    """A man in the middle answers the replica's stream requests with streams
    of his own (tests/sendstream.py, `escape_streams`), each with its own
    digest in the answer: one makes a symlink to an absolute path outside
    DATA (as to /etc/cron.d) and writes through it, one names `..` paths
    that climb out of DATA/incoming. Their first piece does not match the
    signed stream record (nor does their length), so `btrfs receive` (which
    runs chrooted into the receive's folder besides) never sees a byte of
    them: the replica takes
    the stream from the master's own URL instead, and accepts the master's
    version in the same transfer."""
    cluster = Cluster(tmp_path)
    proxy = None
    try:
        master = cluster.master()
        proxy = FaultProxy(master.port)
        r1 = _replica_through(cluster, proxy)
        outside = tmp_path / "outside"  # a folder on the replica's host, outside its DATA
        outside.mkdir()
        target = r1.data / "incoming" / "demo" / "1.recv"
        forged = escape_streams("1", str(outside), os.path.relpath(outside, target / "1"))
        proxy.forged_streams = [forged["absolute-symlink"], forged["dotdot-mkfile"]]
        top_before = sorted(p.name for p in r1.data.iterdir() if p.name not in ("catalog.json", "transfers.json"))
        tree = make_tree(tmp_path / "tree")
        cluster.icbd("imi", "create", "demo", "--from", str(tree))
        cluster.icbd("imi", "publish", "demo")
        with VisibilityWatch(r1, "demo") as watch:
            cluster.icbd("subscribe", "demo", "--node", "r1")
            status = cluster.wait_held(r1, "demo", [1], timeout=60)
        watch.check(["1"])
        attempts = [t for t in status["transfers"] if t["imi"] == "demo"]
        print(f"\nforged streams: {[(t['state'], t.get('error', '')[:90]) for t in attempts]}")
        assert sorted(p.name for p in outside.iterdir()) == [], "a forged stream wrote outside DATA"
        assert proxy.forged_answers == 1
        assert [str(p) for p in tmp_path.rglob("by-*")] == [], "a forged stream left a file behind"
        assert [t["state"] for t in attempts] == ["done"], attempts
        assert attempts[0]["sources"] == [proxy.url, master.url], attempts
        assert "the stream object has" in r1.log.read_text()  # another length than the record's
        # What is kept is the master's version, and nothing else changed outside incoming/.
        assert describe(r1.data / "imis" / "demo" / "1") == describe(tree)
        written = {"catalog.json", "transfers.json"}  # what a replica writes there of its own
        assert sorted(p.name for p in r1.data.iterdir() if p.name not in written) == top_before
        assert sorted(p.name for p in (r1.data / "meta" / "demo").iterdir()) == [
            "1.json", "1.manifest.json", "imi.json"]
        assert list((r1.data / "incoming").glob("*/*")) == []
    finally:
        if proxy:
            proxy.close()
        stop_and_remove(cluster, tmp_path)
