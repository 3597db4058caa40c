"""The master's stream spools (replicator/streams.py) without btrfs: a Spool
over a temporary file, grown by hand the way `btrfs send` and the
write-behind task grow it (`_advance`: bytes sent, in memory; `_on_disk`:
written to the file; `_finish`), and read the way GET /v1/streams/DIGEST
serves a whole stream or a Range; and SendSpools making, expiring, making
again and withdrawing streams, with `cat FILE` standing in for `btrfs send`
(a real process whose output changes only when the file does). As any user.

Pieces are 16 bytes here instead of 4 MiB (streams.READ_SIZE), and no piece
is kept in memory once it is on disk (RECENT_CHUNKS) unless a test says
otherwise, so that reads from the file are easy to reach.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from icbdcore.layout import Layout
from icbdcore.records import write_json
from icbdcore.signing import SigningKey
from icbdcore.wire import content_digest, stream_digest
from replicator import streams
from replicator.streams import SendSpools, Spool, StreamChanged, StreamFailed, Withdrawn

PIECE = 16
DATA = bytes(range(256))[: 5 * PIECE + 7]  # five whole pieces and a short last one


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    monkeypatch.setattr(streams, "READ_SIZE", PIECE)
    monkeypatch.setattr(streams, "RECENT_CHUNKS", 0)


class Sender:
    """Grows a spool as `_send_into` does: bytes go to the spool's memory
    first (readers may have them at once), then to its file."""

    def __init__(self, spool: Spool):
        self.spool = spool
        self.sent = bytearray()

    def send(self, data: bytes) -> None:
        self.spool._advance(data)
        self.sent += data

    def write_behind(self) -> None:
        """Everything sent so far onto the file, as the write-behind task does."""
        with open(self.spool.path, "r+b") as f:
            f.seek(self.spool.written)
            f.write(self.sent[self.spool.written:])
        self.spool._on_disk(len(self.sent) - self.spool.written)

    def send_pieces(self, data: bytes) -> None:
        for start in range(0, len(data), PIECE):
            self.send(data[start:start + PIECE])


def new_spool(tmp_path: Path) -> tuple[Spool, Sender]:
    path = tmp_path / "1-full.stream"
    path.write_bytes(b"")  # as SendSpools.get: readers may open it before the first byte
    spool = Spool("demo", 1, None, path)
    return spool, Sender(spool)


def complete_spool(tmp_path: Path, data: bytes = DATA) -> Spool:
    spool, sender = new_spool(tmp_path)
    sender.send_pieces(data)
    sender.write_behind()
    spool._finish(content_digest(data))
    return spool


async def read(spool: Spool, offset: int = 0, end: int | None = None, timeout: float = 10) -> bytes:
    out = bytearray()
    with trio.fail_after(timeout):  # a reader that never ends fails, not hangs
        async for data in spool.chunks(offset, end):
            out += data
    return bytes(out)


async def settle() -> None:
    """Let every task run until it waits (readers open and read the file in
    worker threads, which wait_all_tasks_blocked alone does not wait for)."""
    for _ in range(3):
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.02)
    await trio.testing.wait_all_tasks_blocked()


async def until(condition, what: str) -> None:
    with trio.move_on_after(5):
        while not condition():
            await trio.sleep(0.005)
        return
    raise AssertionError(f"timed out waiting for {what}")


def damage(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


# --- a spool still growing --------------------------------------------------------------------


async def test_readers_follow_a_growing_spool(tmp_path):
    spool, sender = new_spool(tmp_path)
    results: dict[str, bytes] = {}

    async def reader(key: str, offset: int, end: int | None = None) -> None:
        results[key] = await read(spool, offset, end)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader, "whole", 0)
        nursery.start_soon(reader, "range", 5, 40)  # a Range answer: bytes 5-39
        nursery.start_soon(reader, "tail", 3 * PIECE + 1)  # resumed beyond what exists yet
        await settle()
        assert spool.readers == 3 and results == {}

        sender.send(DATA[:PIECE])  # in memory only: readers have it before the file does
        await settle()
        assert spool.written == 0 and os.path.getsize(spool.path) == 0
        sender.write_behind()
        sender.send(DATA[PIECE:2 * PIECE])
        sender.send(DATA[2 * PIECE:3 * PIECE])  # 48 bytes: the range reader has its 5..39
        await until(lambda: "range" in results, "the range reader to end")
        await settle()
        assert results == {"range": DATA[5:40]}
        sender.write_behind()
        for start in range(3 * PIECE, len(DATA), PIECE):
            sender.send(DATA[start:start + PIECE])
            await settle()
            sender.write_behind()
        assert set(results) == {"range"}  # the others wait for the end of the stream
        spool._finish(content_digest(DATA))

    assert results == {"whole": DATA, "range": DATA[5:40], "tail": DATA[3 * PIECE + 1:]}
    assert spool.readers == 0
    assert spool.pieces == [content_digest(DATA[i:i + PIECE]) for i in range(0, len(DATA), PIECE)]
    assert spool.path.read_bytes() == DATA


async def test_a_reader_behind_the_file_reads_it_back(tmp_path):
    """Pieces already on disk (and no longer in memory) come from the file,
    then the reader follows the sender in memory."""
    spool, sender = new_spool(tmp_path)
    sender.send_pieces(DATA[:3 * PIECE])
    sender.write_behind()
    assert spool._recent == {}  # RECENT_CHUNKS = 0: all of it only on disk now
    got: list[bytes] = []

    async def reader() -> None:
        got.append(await read(spool, 7))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await settle()
        sender.send_pieces(DATA[3 * PIECE:])
        await settle()
        sender.write_behind()  # the sender finishes only once the file is whole
        spool._finish(content_digest(DATA))
    assert got == [DATA[7:]]


async def test_a_piece_neither_in_memory_nor_whole_on_disk_is_waited_for(tmp_path, monkeypatch):
    spool, sender = new_spool(tmp_path)
    sender.send_pieces(DATA[:2 * PIECE])
    spool._recent.clear()  # as if memory had let it go before the write-behind caught up
    got: list[bytes] = []

    async def reader() -> None:
        got.append(await read(spool, 0, 2 * PIECE))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await settle()
        assert got == []  # size says 32 bytes exist, but neither memory nor the file has them
        sender.write_behind()
    assert got == [DATA[:2 * PIECE]]


async def test_the_newest_pieces_are_served_from_memory(tmp_path, monkeypatch):
    """A reader right behind the sender never reads the file back: the
    newest RECENT_CHUNKS pieces stay in memory after they reach the disk."""
    monkeypatch.setattr(streams, "RECENT_CHUNKS", 2)
    spool, sender = new_spool(tmp_path)
    sender.send_pieces(DATA[:4 * PIECE])
    sender.write_behind()
    assert sorted(spool._recent) == [2 * PIECE, 3 * PIECE]
    damage(spool.path, 3 * PIECE + 1)  # the file is wrong where memory still has the piece
    assert await read(spool, 2 * PIECE, 4 * PIECE) == DATA[2 * PIECE:4 * PIECE]
    assert spool.error is None


async def test_a_failed_send_reaches_waiting_readers(tmp_path):
    spool, sender = new_spool(tmp_path)
    sender.send(DATA[:PIECE])
    failures: list[str] = []

    async def reader() -> None:
        with pytest.raises(StreamFailed) as failed:
            await read(spool)
        failures.append(str(failed.value))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(reader)
        await settle()
        spool._finish(error="btrfs send failed: exit status 1")
    assert failures == ["btrfs send failed: exit status 1"] * 2
    assert not spool.complete and spool.readers == 0


async def test_wait_beyond_returns_once_there_is_more_or_an_end(tmp_path):
    spool, sender = new_spool(tmp_path)
    woke: list[int] = []

    async def waiter(offset: int) -> None:
        await spool.wait_beyond(offset)
        woke.append(offset)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, 0)
        nursery.start_soon(waiter, PIECE)
        nursery.start_soon(waiter, 10 * PIECE)
        await settle()
        assert woke == []
        sender.send(DATA[:PIECE])
        await until(lambda: woke, "the first waiter")
        await settle()
        assert woke == [0]  # 16 bytes: more than 0, not more than 16
        sender.send(DATA[PIECE:2 * PIECE])
        await until(lambda: len(woke) == 2, "the second waiter")
        assert woke == [0, PIECE]
        spool._finish(content_digest(DATA[:2 * PIECE]))  # the end, short of 160 bytes
    assert woke == [0, PIECE, 10 * PIECE]


# --- a complete spool ----------------------------------------------------------------------------


async def test_a_complete_spool_serves_any_range_at_once(tmp_path):
    spool = complete_spool(tmp_path)
    assert spool.complete and spool.written == spool.size == len(DATA)
    assert await read(spool) == DATA
    for offset, end in [(0, 1), (5, 40), (PIECE, 2 * PIECE), (PIECE - 1, PIECE + 1),
                        (len(DATA) - 1, None), (3 * PIECE, 10_000)]:
        with trio.fail_after(5):
            assert await read(spool, offset, end) == DATA[offset:end], (offset, end)
    with trio.fail_after(5):
        assert await read(spool, len(DATA)) == b""  # nothing beyond: ends, never waits
        assert await read(spool, len(DATA) + 100) == b""
    assert spool.readers == 0


@pytest.mark.parametrize("where", ["first piece", "middle piece", "short last piece"])
async def test_a_damaged_piece_on_disk_is_refused(tmp_path, where, caplog):
    spool = complete_spool(tmp_path)
    at = {"first piece": 3, "middle piece": 2 * PIECE + 5, "short last piece": len(DATA) - 1}[where]
    damage(spool.path, at)
    piece = at - at % PIECE
    good: list[bytes] = []
    with pytest.raises(StreamFailed, match="spool damaged on the master's disk"), trio.fail_after(10):
        async for data in spool.chunks(0):
            good.append(data)
    assert b"".join(good) == DATA[:piece]  # up to the damaged piece, never a byte of it
    assert spool.error == "spool damaged on the master's disk"
    assert "it will be sent afresh" in caplog.text
    # A spool found damaged fails every reader from then on, even of intact pieces,
    # so that SendSpools.get starts it afresh.
    with pytest.raises(StreamFailed):
        await read(spool, piece + PIECE if piece + PIECE < len(DATA) else 0)


async def test_a_truncated_spool_is_refused(tmp_path):
    spool = complete_spool(tmp_path)
    os.truncate(spool.path, 2 * PIECE + 3)
    with pytest.raises(StreamFailed, match="damaged"):
        await read(spool, PIECE)


async def test_complete_spools_outlive_a_restart_and_incomplete_ones_do_not(tmp_path):
    layout = Layout(tmp_path)
    key = SigningKey.load_or_create(layout.keys)
    kept = layout.stream_spool("demo", 2, 1)
    dropped = layout.stream_spool("demo", 3, 2)
    unrecorded = layout.stream_spool("other", 1, None)
    unsigned = layout.stream_spool("demo", 4, 3)
    foreign = layout.stream_spool("demo", 5, 4)
    for path in (kept, dropped, unrecorded, unsigned, foreign):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(DATA)
    pieces = [content_digest(DATA[i:i + PIECE]) for i in range(0, len(DATA), PIECE)]
    record = {"imi": "demo", "parent": 1, "bytes": len(DATA),
              "digest": stream_digest(pieces), "pieces": pieces, "piece_size": PIECE}
    write_json(kept.with_suffix(".json"), key.sign({**record, "version": 2, "complete": True}))
    write_json(dropped.with_suffix(".json"), key.sign({**record, "version": 3, "parent": 2, "complete": False}))
    write_json(unsigned.with_suffix(".json"), {**record, "version": 4, "parent": 3, "complete": True})
    other_key = SigningKey.load_or_create(tmp_path / "other-keys")
    write_json(foreign.with_suffix(".json"), other_key.sign({**record, "version": 5, "parent": 4, "complete": True}))

    spools = SendSpools(layout, key=key)
    spools.load()
    assert [(s.name, s.version, s.parent) for s in spools.all()] == [("demo", 2, 1)]
    for gone in (dropped, unrecorded, unsigned, foreign):
        assert not gone.exists() and not gone.with_suffix(".json").exists()
    spool = spools.find("demo", 2, 1)
    assert spool.complete and spool.describe()["bytes"] == len(DATA)
    assert spools.record("demo", 2, 1)["digest"] == stream_digest(pieces)
    assert await read(spool, 9) == DATA[9:]
    damage(kept, 4 * PIECE)  # its pieces are checked as they are read back, as any spool's
    with pytest.raises(StreamFailed):
        await read(spool, 4 * PIECE)



async def test_a_record_outlives_its_spool_file(tmp_path):
    """A record whose spool file is gone (expired, or lost) is kept: the
    object stays, to be made again when asked for."""
    layout = Layout(tmp_path)
    key = SigningKey.load_or_create(layout.keys)
    path = layout.stream_spool("demo", 2, 1)
    path.parent.mkdir(parents=True)
    pieces = [content_digest(DATA[i:i + PIECE]) for i in range(0, len(DATA), PIECE)]
    doc = key.sign({"imi": "demo", "version": 2, "parent": 1, "bytes": len(DATA), "complete": True,
                    "digest": stream_digest(pieces), "pieces": pieces, "piece_size": PIECE})
    write_json(path.with_suffix(".json"), doc)
    path.write_bytes(DATA[:PIECE])  # cut short: not served, dropped
    spools = SendSpools(layout, key=key)
    spools.load()
    assert spools.all() == [] and not path.exists()
    assert spools.record("demo", 2, 1) == doc
    assert spools.key_of(doc["digest"]) == ("demo", 2, 1)


# --- a regenerated stream is checked against its record -------------------------------------


async def test_a_regenerated_piece_that_differs_from_the_record_is_never_handed_out(tmp_path):
    spool, sender = new_spool(tmp_path)
    spool.expect = [content_digest(DATA[i:i + PIECE]) for i in range(0, len(DATA), PIECE)]
    sender.send(DATA[:PIECE])
    with pytest.raises(StreamChanged, match="piece 1"):
        spool._advance(b"x" * PIECE)
    assert spool.size == PIECE and len(spool.pieces) == 1  # the bad piece never reached readers
    spool.expect = spool.expect[:5]  # a record of five whole pieces
    with pytest.raises(StreamChanged, match="piece 5"):  # one piece more than the record lists
        for start in range(PIECE, 6 * PIECE, PIECE):
            spool._advance(DATA[start:start + PIECE] or b"y")


class FakeSend:
    """`cat FILE` for `btrfs send`: the bytes of (version, parent) are FILE's."""

    def __init__(self, tmp_path: Path, monkeypatch):
        self.folder = tmp_path / "snapshots"
        self.folder.mkdir()
        self.runs = 0

        def argv(snapshot: Path, parent: Path | None) -> list[str]:
            self.runs += 1
            return ["cat", str(snapshot)]

        monkeypatch.setattr(streams.btrfs, "send_argv", argv)

    def snapshot(self, data: bytes) -> Path:
        path = self.folder / "v2"
        path.write_bytes(data)
        return path


async def test_streams_are_made_expire_are_made_again_and_are_withdrawn_when_they_change(tmp_path, monkeypatch):
    send = FakeSend(tmp_path, monkeypatch)
    layout = Layout(tmp_path / "data")
    key = SigningKey.load_or_create(layout.keys)
    snapshot = send.snapshot(DATA)
    async with trio.open_nursery() as nursery:
        spools = SendSpools(layout, ttl=3600, key=key)
        await nursery.start(spools.run)

        # Made once: the record names the bytes; a second make() finds it.
        spool = spools.make("demo", 2, None, snapshot, None)
        with trio.fail_after(10):
            await spool.wait_done()
        record = spools.record("demo", 2, None)
        key.public.verify(record, "stream record")
        assert record["digest"] == stream_digest(spool.pieces) and record["bytes"] == len(DATA)
        assert "stream_id" not in record  # nothing in it names one run of the send
        assert spools.make("demo", 2, None, snapshot, None) is None
        digest = record["digest"]
        assert spools.key_of(digest) == ("demo", 2, None)

        # The spool expires; the record and the object stay.
        spools.ttl = 0
        spools._expire()
        assert spools.all() == [] and not spool.path.exists() and spool.meta_path.exists()
        spools.ttl = 3600

        # Asked for again: made again, checked, the same bytes under the same name.
        again = spools.spool_of(("demo", 2, None), snapshot, None)
        assert again.expect == record["pieces"]
        with trio.fail_after(10):
            assert await read(again) == DATA
        assert again.complete and spools.regenerated == 1 and send.runs == 2
        assert spools.record("demo", 2, None) == record

        # The snapshot's bytes change: the next making again is refused before a
        # reader gets a changed byte, and the record is withdrawn.
        spools._drop_spool(("demo", 2, None))
        changed = bytearray(DATA)
        changed[2 * PIECE + 3] ^= 1
        send.snapshot(bytes(changed))
        third = spools.spool_of(("demo", 2, None), snapshot, None)
        got = bytearray()
        with pytest.raises(StreamFailed), trio.fail_after(10):
            async for data in third.chunks(0):
                got += data
        assert bytes(got) == DATA[:2 * PIECE]  # up to the changed piece, never a byte of it
        assert spools.record("demo", 2, None) is None and spools.withdrawn == 1
        with pytest.raises(Withdrawn):
            spools.key_of(digest)
        assert not third.meta_path.exists()

        # The next request makes a new stream, with a new digest and record.
        fresh = spools.make("demo", 2, None, snapshot, None)
        with trio.fail_after(10):
            await fresh.wait_done()
        renewed = spools.record("demo", 2, None)
        assert renewed["digest"] != digest and renewed["digest"] == stream_digest(fresh.pieces)
        assert spools.key_of(renewed["digest"]) == ("demo", 2, None)
        nursery.cancel_scope.cancel()
