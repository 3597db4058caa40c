"""What a node leaves on its host is safe, and what it writes is whole.

- Node btrfs mounts and FUSE mounts are nosuid,nodev: the setuid binaries
  and device nodes of every version a node holds are inert on its host
  (replicator/btrfs.py, icbdfs/mount.py); a data folder mounted by an older
  start is remounted so.
- A node's data folder is mode 0700 (icbdcore/layout.py).
- A record is written whole or not at all, even when a write takes only
  part of it (icbdcore/records.py).
- A replica stopped (SIGTERM) during a transfer stops its stream thread at
  once and keeps its resume spool (replicator/receiver.py).

(`icbd-boot.toml` that leads out of the iMI: tests/test_boot.py.)
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cluster_teardown import stop_and_remove
from faultproxy import FaultProxy
from procs import children, cmdline

from harness.cluster import Cluster, wait_for
from harness.data import write_image
from icbdcore import records
from icbdcore.mounts import mounted_at
from icbdfs.mount import FUSE_OPTIONS

MIB = 1 << 20


# --- records, whole or not at all ------------------------------------------------------------------


def test_a_record_is_written_whole_when_writes_are_short(tmp_path, monkeypatch):
    """Every write takes at most 7 bytes (a signal, a nearly full disk):
    the record still holds all of its document."""
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    doc = {"nodes": [{"id": f"node-{i}", "url": f"http://10.0.0.{i}:7401"} for i in range(50)]}
    records.write_json(tmp_path / "nodes.json", doc)
    records.write_bytes(tmp_path / "manifest", b"x" * 100_000)
    monkeypatch.setattr(os, "write", real_write)
    assert records.read_json(tmp_path / "nodes.json") == doc
    assert (tmp_path / "manifest").read_bytes() == b"x" * 100_000


def test_a_record_that_cannot_be_written_leaves_the_old_one_and_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "catalog.json"
    records.write_json(path, {"old": True})
    real_write = os.write
    calls = []

    def full(fd, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, bytes(data[:10]))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError):
        records.write_json(path, {"new": list(range(1000))})
    monkeypatch.setattr(os, "write", real_write)
    assert records.read_json(path) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.json"]


def test_fuse_mounts_ask_for_nosuid_and_nodev():
    assert {"nosuid", "nodev", "ro"} <= FUSE_OPTIONS


# --- real nodes and mounts -------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.fuse
def test_node_and_mount_folders_are_private_and_mounted_nosuid_nodev(cluster, tmp_path):
    master = cluster.master()
    r1 = cluster.replica("r1")
    cache = cluster.cache("c1")
    mount = cluster.mount("mnt", cache_dir=tmp_path / "mount-cache")
    found = {}
    for node in (master, r1):
        entry = mounted_at(node.data)
        found[node.id] = (oct(_mode(node.data)), sorted(entry.options & {"nosuid", "nodev", "noatime"}))
        assert entry.fstype == "btrfs"
        assert {"nosuid", "nodev"} <= entry.options, (node.id, entry.options)
        assert _mode(node.data) == 0o700, node.id
    assert _mode(cache.data) == 0o700
    assert _mode(tmp_path / "mount-cache") == 0o700
    fuse = mounted_at(mount.mountpoint)
    found["mount"] = sorted(fuse.options & {"nosuid", "nodev", "ro"})
    print(f"\n{found}")
    assert {"nosuid", "nodev", "ro"} <= fuse.options, fuse.options


def test_a_data_folder_mounted_without_nosuid_is_remounted_so(cluster):
    """An image mounted by a start before this change (or by hand) without
    nosuid,nodev, and a folder left 0755: the next start fixes both."""
    master = cluster.master()
    master.stop()
    subprocess.run(["mount", "-o", "remount,suid,dev", str(master.data)], check=True)
    os.chmod(master.data, 0o755)
    assert not {"nosuid", "nodev"} & mounted_at(master.data).options
    master.start()
    assert {"nosuid", "nodev"} <= mounted_at(master.data).options
    assert _mode(master.data) == 0o700


# --- stopping a replica during a transfer -------------------------------------------------------


@pytest.mark.btrfs
def test_sigterm_during_a_transfer_stops_at_once_and_keeps_the_resume_spool(tmp_path):
    """The stream stalls at 64 MiB (the proxy holds it; the replica's read
    timeout is 120 s). SIGTERM: the replica is gone within seconds, its
    `btrfs receive` with it, and the 64 MiB spool stays; the next start
    resumes from it and finishes."""
    cluster = Cluster(tmp_path)
    proxy = None
    try:
        master = cluster.master(image_size="2G")
        proxy = FaultProxy(master.port)
        r1 = cluster.replica("r1", image_size="2G", start=False, extra=["--resume-spool", "always"])
        r1.argv[r1.argv.index("--master") + 1] = proxy.url
        r1.start()
        tree = tmp_path / "tree"
        tree.mkdir()
        write_image(tree / "disk.img", 192 * MIB)
        cluster.icbd("imi", "create", "big", "--from", str(tree))
        cluster.icbd("imi", "publish", "big")
        proxy.arm(hold_stream_at=64 * MIB)
        cluster.icbd("subscribe", "big", "--node", "r1")
        assert proxy.stream_held.wait(60), "the stream never reached 64 MiB"
        spool = r1.data / "incoming" / "big" / "1-full.stream"
        wait_for(lambda: spool.exists() and spool.stat().st_size >= 60 * MIB, timeout=30,
                 what="64 MiB in the resume spool")
        receives = [pid for pid in children(r1.pid) if b"receive" in cmdline(pid)]
        started = time.monotonic()
        code = r1.stop(timeout=30)
        seconds = time.monotonic() - started
        kept = spool.stat().st_size if spool.exists() else 0
        print(f"\nSIGTERM mid-transfer: exited {code} in {seconds:.1f} s; spool kept {kept >> 20} MiB")
        assert seconds < 6, f"the replica took {seconds:.1f} s to stop"
        assert code == 0
        assert kept >= 60 * MIB and spool.with_suffix(".json").exists()
        assert all(not os.path.exists(f"/proc/{pid}") for pid in receives), "btrfs receive outlived the replica"
        assert list((r1.data / "imis").glob("big/*")) == []
        proxy.disarm()
        r1.start()
        status = cluster.wait_held(r1, "big", [1], timeout=120)
        done = [t for t in status["transfers"] if t["state"] == "done"][-1]
        assert done["resumed_from"] >= 60 * MIB, done
    finally:
        if proxy:
            proxy.close()
        stop_and_remove(cluster, tmp_path)
