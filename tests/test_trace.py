"""Read traces: the mount writes one (`icbd mount --trace`), `icbd replay`
plays it back at full speed against a mount or a folder laid out like one,
keeping the trace's concurrency and the order in which reads depended on
each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio
from test_mount import Mount
from tree_source import SAMPLE_CHUNK, TreeSource, build_sample_tree

from icbd.replay import dependencies, in_flight, replay
from icbdcore.errors import CliError
from icbdcore.trace import TracedRead, TraceError, header_line, parse_trace, read_trace
from icbdfs.filesystem import open_filesystem
from icbdfs.fs import MountOptions

REPO = Path(__file__).resolve().parent.parent


def write_trace(path: Path, reads: list[TracedRead]) -> Path:
    path.write_text(header_line(1.0) + "".join(r.to_line() for r in reads))
    return path


# --- the format ------------------------------------------------------------------------

def test_a_trace_reads_back_what_was_written_in_the_order_reads_began(tmp_path):
    reads = [TracedRead(0.5, 0.1, "demo/1/a", 4096, 8192), TracedRead(0.2, 0.01, "demo/1/b", 0, 4096, ok=False)]
    back = read_trace(write_trace(tmp_path / "t", reads))
    assert back == sorted(reads, key=lambda r: r.t)


@pytest.mark.parametrize("text, why", [
    ("", "not a read trace"),
    ('{"format": "something else"}\n', "not a read trace"),
    ('{"format": "icbd-read-trace", "version": 9}\n', "version 9"),
    ('{"format": "icbd-read-trace", "version": 1}\n{"t": 1}\n', "line 2"),
    ('{"format": "icbd-read-trace", "version": 1}\n{"t":0,"d":0,"file":"../etc/passwd","off":0,"len":1}\n',
     "bad file"),
    ('{"format": "icbd-read-trace", "version": 1}\n{"t":0,"d":0,"file":"a/1/b","off":-4,"len":1}\n', "bad file"),
])
def test_what_is_not_a_trace_is_refused_saying_where(text, why):
    with pytest.raises(TraceError, match=why):
        list(parse_trace(text.splitlines(keepends=True)))


# --- playing it back -------------------------------------------------------------------

def test_a_read_waits_only_for_the_reads_that_ended_before_it_began():
    reads = [
        TracedRead(0.0, 1.0, "f", 0, 1),  # 0
        TracedRead(0.5, 1.0, "f", 1, 1),  # 1: in flight with 0
        TracedRead(1.2, 0.1, "f", 2, 1),  # 2: after 0 ended
        TracedRead(1.6, 0.0, "f", 3, 1),  # 3: after 0, 1 and 2 ended
        TracedRead(1.6, 0.1, "f", 4, 1),  # 4: began with 3, which took no time: does not wait for it
    ]
    by_end, needs = dependencies(reads)
    assert by_end == [0, 2, 1, 3, 4]
    waits_for = [set(by_end[:n]) for n in needs]
    assert waits_for == [set(), set(), {0}, {0, 1, 2}, {0, 1, 2}]
    assert in_flight(reads) == 2


def test_replay_reads_every_traced_byte_and_keeps_the_order_reads_depended_on(tmp_path):
    root = tmp_path / "root"
    (root / "demo" / "1").mkdir(parents=True)
    data = os.urandom(1 << 20)
    (root / "demo" / "1" / "disk.img").write_bytes(data)
    reads = [TracedRead(0.01 * i, 0.005, "demo/1/disk.img", 64 * 1024 * i, 4096) for i in range(16)]
    reads.append(TracedRead(1.0, 0.1, "demo/1/disk.img", 1 << 19, 1 << 19))
    reads.append(TracedRead(5.0, 0.1, "demo/1/nothing", 0, 1, ok=False))  # failed in the trace: skipped
    result = replay(reads, root)
    assert result.reads == 17 and result.skipped == 1
    assert result.bytes == 16 * 4096 + (1 << 19)
    assert result.threads == 1  # the trace never had two reads in flight
    assert result.seconds < result.traced_seconds  # no time between reads
    assert result.traced_read_seconds == pytest.approx(16 * 0.005 + 0.1)


def test_replay_on_a_folder_without_the_traced_file_says_so(tmp_path):
    reads = [TracedRead(0.0, 0.1, "demo/1/disk.img", 0, 4096)]
    with pytest.raises(CliError, match="does not exist: the trace was taken of another tree"):
        replay(reads, tmp_path)


def icbd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "icbd.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_icbd_replay_prints_the_time_and_refuses_what_is_not_a_trace(tmp_path):
    root = tmp_path / "root"
    (root / "demo" / "1").mkdir(parents=True)
    (root / "demo" / "1" / "disk.img").write_bytes(os.urandom(1 << 16))
    trace = write_trace(tmp_path / "trace", [TracedRead(0.0, 0.01, "demo/1/disk.img", 0, 1 << 16)])
    done = icbd("--json", "replay", str(trace), "--mount", str(root))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["bytes"] == 1 << 16
    text = icbd("replay", str(trace), "--mount", str(root))
    assert text.returncode == 0 and "1 reads, 0.1 MB in" in text.stdout
    (tmp_path / "junk").write_text("hello\n")
    bad = icbd("replay", str(tmp_path / "junk"), "--mount", str(root))
    assert bad.returncode == 1 and bad.stderr.startswith("icbd: cannot read the trace") and "Traceback" not in bad.stderr
    missing = icbd("replay", str(tmp_path / "none"), "--mount", str(root))
    assert missing.returncode == 1 and "record one with icbd mount --trace" in missing.stderr
    none = icbd("replay", str(trace), "--mount", str(root), "--only", "other")
    assert none.returncode == 1 and "holds no reads under other" in none.stderr


# --- recording it ----------------------------------------------------------------------

async def test_the_mount_records_every_read_it_serves(tmp_path):
    build_sample_tree(tmp_path / "imis" / "demo" / "1")
    source = TreeSource(tmp_path / "imis", SAMPLE_CHUNK)
    trace = tmp_path / "trace.jsonl"
    async with open_filesystem(source, MountOptions(refresh=0, trace=trace)) as ops:
        await ops.refresh()
        folder = await ops.lookup(1, b"demo", None)
        version = await ops.lookup(folder.st_ino, b"1", None)
        big = await ops.lookup(version.st_ino, b"big.bin", None)
        info = await ops.open(big.st_ino, os.O_RDONLY, None)
        await ops.read(info.fh, 0, 4096)
        await ops.read(info.fh, 3 * SAMPLE_CHUNK, 65536)
        await ops.release(info.fh)
        await trio.sleep(0.7)  # written out in the background, not on the request path
        assert len(read_trace(trace)) == 2
    reads = read_trace(trace)
    assert [(r.file, r.off, r.len, r.ok) for r in reads] == [
        ("demo/1/big.bin", 0, 4096, True), ("demo/1/big.bin", 3 * SAMPLE_CHUNK, 65536, True)]
    assert 0 <= reads[0].t <= reads[1].t and all(r.d >= 0 for r in reads)


@pytest.mark.fuse
def test_a_trace_taken_at_a_mount_replays_against_the_mount_and_the_local_tree(tmp_path):
    trace = tmp_path / "trace.jsonl"
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    first = Mount(tmp_path / "first", trace=trace)
    build_sample_tree(first.root / "demo" / "1")
    try:
        first.start()
        files = ["big.bin", "bin/tool", "etc/motd"]

        def read(name: str) -> None:
            with open(first.path / "demo" / "1" / name, "rb") as f:
                while f.read(1 << 16):
                    pass

        threads = [threading.Thread(target=read, args=(name,)) for name in files]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        first.stop()  # the trace is complete once the mount has stopped
    reads = read_trace(trace)
    assert {r.file for r in reads} == {f"demo/1/{name}" for name in files}
    assert sum(r.len for r in reads if r.file == "demo/1/big.bin") >= 4 * SAMPLE_CHUNK

    local = replay(reads, first.root)
    assert local.reads == len(reads) and local.direct
    expected = sum(min(r.len, max(0, (first.root / r.file).stat().st_size - r.off)) for r in reads)
    assert local.bytes == expected
    second = Mount(tmp_path / "second")
    second.root = first.root
    try:
        second.start()
        through = replay(reads, second.path)
        assert through.bytes == expected and through.direct, "a mount takes O_DIRECT"
    finally:
        second.stop()
