"""One request id follows a transfer, and a block fetch, across the nodes
it involves (the X-Request-Id header, made at the first hop and passed on),
so that one grep of each host's log (`journalctl | grep rid=ID`) follows
it: the master's and the replica's lines of one transfer; the mount's, the
cache server's and the replica's of one block fetch."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import requests

from harness.cluster import Cluster, wait_for
from icbdcore.logs import valid_request_id

MIB = 1 << 20
RID = re.compile(r" rid=([0-9a-f]{16})$")


def lines_with(log: Path, rid: str) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if line.endswith(f" rid={rid}")]


def test_request_ids_from_a_header_are_checked():
    assert valid_request_id("0123abcd.ok-_") == "0123abcd.ok-_"
    for bad in ("", "a b", "x" * 65, "new\nline", "rid=forged", None, 3):
        assert valid_request_id(bad) is None


@pytest.mark.btrfs
@pytest.mark.fuse
def test_one_id_follows_a_transfer_and_a_block_fetch_across_nodes(tmp_path):
    cluster = Cluster(tmp_path / "c")
    try:
        master = cluster.master()
        replica = cluster.replica("r1", extra=["-v"])
        cache = cluster.cache("c1", extra=["-v"])
        tree = tmp_path / "c" / "tree"
        tree.mkdir()
        (tree / "disk.img").write_bytes(os.urandom(3 * MIB))
        cluster.icbd("imi", "create", "img", "--from", str(tree))
        cluster.icbd("imi", "publish", "img")
        cluster.icbd("subscribe", "img", "--node", "r1")
        status = cluster.wait_held(replica, "img", [1])

        # The transfer: its id is in the replica's status and in both logs.
        rid = status["transfers"][-1]["rid"]
        assert re.fullmatch(r"[0-9a-f]{16}", rid)
        on_replica = lines_with(replica.log, rid)
        on_master = lines_with(master.log, rid)
        assert any("fetching img version 1 (full)" in line for line in on_replica), on_replica
        assert any("holding img version 1" in line for line in on_replica), on_replica
        assert any("sending img version 1 (full) to r1" in line for line in on_master), on_master
        assert any("sent " in line and "img version 1" in line for line in on_master), on_master

        # A block fetch through a cold cache: the mount makes the id; the cache
        # and the replica log it too.
        mount = cluster.mount("m1", cache=cache, extra=["-v"])
        image = mount.mountpoint / "img" / "1" / "disk.img"
        wait_for(image.exists, timeout=30, what="the version in the mount")
        assert len(image.read_bytes()) == 3 * MIB
        fetched = [(m.group(1), line) for line in mount.log.read_text().splitlines()
                   if "block " in line and ": from " in line and (m := RID.search(line))]
        assert fetched, mount.log.read_text()[-3000:]
        followed = 0
        for block_rid, _ in fetched:
            at_cache = lines_with(cache.log, block_rid)
            at_replica = lines_with(replica.log, block_rid)
            if any("bytes from r1" in line for line in at_cache) and any("bytes served" in line for line in at_replica):
                followed += 1
        # Every block the cache fetched on a reader's demand carries the reader's id end to end.
        assert followed >= 1, (fetched, cache.log.read_text()[-2000:])

        # A node answers with the id it was given, or a new one.
        given = requests.get(cache.url + "/", headers={"X-Request-Id": "from-a-test-0001"}, timeout=10)
        assert given.headers["X-Request-Id"] == "from-a-test-0001"
        forged = requests.get(cache.url + "/", headers={"X-Request-Id": "x y"}, timeout=10)
        assert re.fullmatch(r"[0-9a-f]{16}", forged.headers["X-Request-Id"])
    finally:
        cluster.stop_all()
