"""Mounting like any other filesystem: mount(8) runs /sbin/mount.fuse.icbd
(icbd/fstab.py) for `mount -t fuse.icbd` and for fstab lines of that type;
`umount` ends the mount and its process. The root test puts a helper that
runs this checkout's code at /sbin/mount.fuse.icbd for its duration (unless
an installed one is there, then it is skipped)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cluster import Cluster, wait_for
from icbd import fstab
from icbdcore.errors import CliError
from icbdcore.mounts import is_mountpoint, mounted_at

REPO = Path(__file__).resolve().parent.parent
HELPER = Path("/sbin/mount.fuse.icbd")
MARK = "# icbd test helper"
MIB = 1 << 20


def test_mount_options_become_icbd_mount_options():
    argv = fstab.translate("https://c1:7402", "/imis",
                           ["ro", "_netdev", "nofail", "x-systemd.automount", "site=paris", "token-file=/etc/t",
                            "cache=https://c2:7402", "no-profiles", "timeout=20", "config=/etc/other.toml",
                            "master-key=/etc/icbd/master.pub", "nosuid", "nodev", "comment=x"])
    assert argv == ["--config", "/etc/other.toml", "mount", "/imis", "--cache", "https://c1:7402",
                    "--site", "paris", "--token-file", "/etc/t", "--cache", "https://c2:7402", "--no-profiles",
                    "--timeout", "20", "--master-key", "/etc/icbd/master.pub"]
    # A source that is not a URL: the caches come from the config file.
    assert fstab.translate("icbd", "/imis", ["ro"]) == ["mount", "/imis"]
    assert fstab.translate("https://c1:7402", "/imis", ["rw"]) == ["mount", "/imis", "--cache", "https://c1:7402"]
    for options, message in ((["foreground"], "background"), (["sitee=x"], "not an option"),
                             (["site"], "give site=VALUE"), (["no-profiles=1"], "takes no value")):
        with pytest.raises(CliError, match=message):
            fstab.translate("https://c1:7402", "/imis", options)
    assert fstab.translate("https://c1:7402", "/imis", ["sitee=x"], sloppy=True) == [
        "mount", "/imis", "--cache", "https://c1:7402"]
    source, mountpoint, options, flags = fstab.parse_arguments(
        ["https://c1:7402", "/imis", "-n", "-s", "-o", "ro,site=a", "-t", "fuse.icbd"])
    assert (source, mountpoint, options, flags["sloppy"], flags["fake"]) == (
        "https://c1:7402", "/imis", ["ro", "site=a"], True, False)


def test_the_helper_fakes_and_reports_like_mount_helpers_do(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "ICBD_CONFIG": "/dev/null"}
    result = subprocess.run([sys.executable, "-m", "icbd.fstab", "https://c1:7402", str(tmp_path), "-f", "-v",
                             "-o", "ro,site=a"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0
    assert result.stderr.strip() == f"mount.fuse.icbd: icbd mount {tmp_path} --cache https://c1:7402 --site a"
    result = subprocess.run([sys.executable, "-m", "icbd.fstab", "https://c1:7402", str(tmp_path), "-o", "foreground"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode != 0 and result.stderr.startswith("mount.fuse.icbd: -o foreground: mount(8) waits")


@pytest.fixture
def helper():
    """This checkout's mount.fuse.icbd where mount(8) looks for it."""
    if HELPER.exists() and MARK not in HELPER.read_text(errors="replace"):
        pytest.skip(f"{HELPER} is installed: not replacing it with this checkout's")
    HELPER.write_text(f"#!/bin/sh\n{MARK}\nPYTHONPATH={REPO} exec {sys.executable} -m icbd.fstab \"$@\"\n")
    HELPER.chmod(0o755)
    try:
        yield HELPER
    finally:
        HELPER.unlink(missing_ok=True)


def mount_processes(mountpoint: Path) -> list[int]:
    """The pids of processes whose command line names the mount point."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(mountpoint).encode() in argv and any(b"icbd" in a for a in argv):
                found.append(int(entry.name))
    return found


@pytest.mark.btrfs
@pytest.mark.fuse
def test_fstab_line_and_mount_t_then_umount(tmp_path, helper):
    cluster = Cluster(tmp_path / "c")
    mountpoints = [tmp_path / "imis", tmp_path / "second"]
    try:
        cluster.master()
        replica = cluster.replica("r1")
        cache = cluster.cache("c1")
        tree = tmp_path / "c" / "tree"
        tree.mkdir()
        content = os.urandom(2 * MIB)
        (tree / "disk.img").write_bytes(content)
        cluster.icbd("imi", "create", "img", "--from", str(tree))
        cluster.icbd("imi", "publish", "img")
        cluster.icbd("subscribe", "img", "--node", "r1")
        cluster.wait_held(replica, "img", [1])
        token_file = tmp_path / "reader.token"
        token_file.write_text(cluster.token("reader") + "\n")
        token_file.chmod(0o600)
        key_file = tmp_path / "master.pub"
        key_file.write_text(cluster.learn_master_key() + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ICBD_")}
        env["ICBD_CONFIG"] = "/dev/null"

        # An fstab line, as an admin writes it, mounted with mount -T.
        first = mountpoints[0]
        first.mkdir()
        options = (f"ro,_netdev,site=a,token-file={token_file},master-key={key_file},"
                   f"cache-dir={tmp_path / 'cache1'},log={tmp_path / 'mount1.log'},timeout=5")
        table = tmp_path / "fstab"
        table.write_text(f"# icbd\n{cache.url} {first} fuse.icbd {options} 0 0\n")
        result = subprocess.run(["mount", "-T", str(table), str(first)], capture_output=True, text=True, env=env,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        found = mounted_at(str(first))
        assert found is not None and found.fstype == "fuse.icbd", found
        image = first / "img" / "1" / "disk.img"
        wait_for(image.exists, timeout=30, what="the version in the mount")
        assert image.read_bytes() == content
        assert mount_processes(first)

        # The same with mount -t and -o.
        second = mountpoints[1]
        second.mkdir()
        result = subprocess.run(["mount", "-t", "fuse.icbd", cache.url, str(second), "-o",
                                 f"site=a,token-file={token_file},master-key={key_file},"
                                 f"cache-dir={tmp_path / 'cache2'},log={tmp_path / 'mount2.log'}"],
                                capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        wait_for((second / "img" / "1" / "disk.img").exists, timeout=30, what="the version in the second mount")
        assert (second / "img" / "1" / "disk.img").read_bytes() == content

        # umount ends each cleanly: the mount point and the process are gone.
        for mountpoint, log in ((first, tmp_path / "mount1.log"), (second, tmp_path / "mount2.log")):
            result = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            assert not is_mountpoint(mountpoint)
            deadline = time.monotonic() + 30
            while mount_processes(mountpoint) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not mount_processes(mountpoint)
            assert f"unmounted {mountpoint}" in log.read_text()

        # A bad option: mount(8) reports the helper's one line, nothing is mounted.
        result = subprocess.run(["mount", "-t", "fuse.icbd", cache.url, str(first), "-o", "sitee=a"],
                                capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode != 0 and "sitee=a: not an option of fuse.icbd" in result.stderr
        assert not is_mountpoint(first)
    finally:
        for mountpoint in mountpoints:
            if is_mountpoint(mountpoint):
                subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)
        cluster.stop_all()
