"""Real FUSE mounts: a TreeSource served by `icbdfs.mount.serve` in a
subprocess (tests/tree_source.py run as a script), read through the kernel.
Every mount is unmounted and every process stopped by pid in teardown."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tree_source import ODD_NAME, SAMPLE_CHUNK, build_sample_tree

from icbd.mounting import _start_in_background
from icbdcore.errors import CliError
from icbdcore.mounts import mounted_at

REPO = Path(__file__).resolve().parent.parent
RUNNER = REPO / "tests" / "tree_source.py"

# Tests that mount are marked fuse (tests/conftest.py skips them without root,
# /dev/fuse or fusermount3); the command line's refusals and the background
# start run as any user.


def is_mounted(path: Path) -> bool:
    return mounted_at(path) is not None


class Mount:
    def __init__(self, tmp_path: Path, **options):
        self.root = tmp_path / "imis"
        self.path = tmp_path / "mnt"
        self.control = tmp_path / "control"
        self.path.mkdir()
        (self.control / "latest").mkdir(parents=True)
        self.options = {"timeout": 10, "refresh": 2, "chunk-size": SAMPLE_CHUNK, **options}
        self.process: subprocess.Popen | None = None
        self.log = tmp_path / "mount.log"

    def start(self) -> None:
        command = [sys.executable, str(RUNNER), "--root", str(self.root), "--mount", str(self.path),
                   "--control", str(self.control)]
        for key, value in self.options.items():
            command += [f"--{key}", str(value)]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, cwd=REPO)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            readable = select.select([self.process.stdout], [], [], 0.2)[0]
            if readable and self.process.stdout.readline().strip() == b"ready":
                return
            if self.process.poll() is not None:
                break
        raise AssertionError(f"mount did not come up: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if is_mounted(self.path):
            subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True)
        if self.process is not None:
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                try:
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process.stdout.close()
        if is_mounted(self.path):
            subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True)

    def status(self) -> dict:
        return json.loads((self.path / ".icbd" / "status").read_bytes())


@pytest.fixture
def mount(tmp_path):
    mounts: list[Mount] = []

    def start(versions=(1, 2), **options) -> Mount:
        m = Mount(tmp_path, **options)
        for version in versions:
            build_sample_tree(m.root / "demo" / str(version), variant=version)
        mounts.append(m)
        m.start()
        return m

    try:
        yield start
    finally:
        for m in mounts:
            m.stop()


def digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def snapshot(top: Path) -> dict[str, tuple]:
    """Every path under `top` with what must survive the trip through the mount."""
    out = {}
    for folder, dirs, files in os.walk(top):
        for name in dirs + files:
            path = Path(folder) / name
            st = os.lstat(path)
            rel = os.fsdecode(path.relative_to(top))
            item = [st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns]
            if stat.S_ISREG(st.st_mode):
                item += [st.st_size, digest(path)]
            elif stat.S_ISLNK(st.st_mode):
                item += [st.st_size, os.readlink(path)]
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                item += [st.st_rdev]
            out[rel] = tuple(item)
    return out


@pytest.mark.fuse
def test_the_tree_through_the_kernel_equals_the_tree(mount):
    m = mount()
    for version in ("1", "2"):
        original = snapshot(m.root / "demo" / version)
        mounted = snapshot(m.path / "demo" / version)
        assert mounted == original
        assert ODD_NAME in mounted and "sparse.img" in mounted
    assert os.readlink(m.path / "demo" / "latest") == "2"
    assert (m.path / "demo/latest/etc/motd").read_text() == "welcome to version 2\n"
    assert sorted(os.listdir(m.path)) == ["demo"]
    found = mounted_at(m.path)
    assert (found.fstype, found.source) == ("fuse.icbd", "icbd")
    dev = os.stat(m.path).st_dev
    with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb") as f:
        assert f.read().strip() == "1024", "1 MiB kernel requests, not 128 KiB"
    for cmd in (["cmp", m.root / "demo/1/bin/tool", m.path / "demo/1/bin/tool"],
                ["cmp", m.root / "demo/1/sparse.img", m.path / "demo/1/sparse.img"]):
        assert subprocess.run(cmd).returncode == 0


@pytest.mark.fuse
def test_the_kernel_refuses_writes(mount):
    m = mount()
    motd = m.path / "demo/1/etc/motd"
    attempts = [
        lambda: os.open(motd, os.O_WRONLY),
        lambda: os.open(motd, os.O_RDWR),
        lambda: os.open(motd, os.O_RDONLY | os.O_TRUNC),
        lambda: os.open(m.path / "demo/1/new", os.O_WRONLY | os.O_CREAT),
        lambda: os.mkdir(m.path / "demo/1/newdir"),
        lambda: os.unlink(motd),
        lambda: os.chmod(motd, 0o777),
        lambda: os.rename(motd, m.path / "demo/1/etc/other"),
        lambda: os.symlink("x", m.path / "demo/1/sym"),
        lambda: os.mkdir(m.path / "newimi"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as raised:
            attempt()
        assert raised.value.errno == errno.EROFS
    assert motd.read_text() == "welcome to version 1\n"


READER = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
started = time.monotonic()
try:
    os.read(fd, 1 << 20)
    print("read", time.monotonic() - started, flush=True)
except OSError as error:
    print(error.errno, time.monotonic() - started, flush=True)
sys.stdin.read()  # stay alive, asleep, until the test has looked at us
"""


@pytest.mark.fuse
def test_hung_source_gives_eio_in_bounded_time_and_no_d_state(mount):
    m = mount(timeout=1.5)
    target = m.path / "demo/1/big.bin"
    os.stat(target)  # the manifest is in; its blocks are not
    (m.control / "hang").touch()
    reader = subprocess.Popen([sys.executable, "-c", READER, str(target)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready = select.select([reader.stdout], [], [], 20)[0]
        assert ready, "the reader is stuck"
        code, elapsed = reader.stdout.readline().split()
        assert int(code) == errno.EIO
        assert float(elapsed) < 1.5 + 2.0
        with open(f"/proc/{reader.pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        assert state != "D"
        assert m.status()["eio"] >= 1
    finally:
        reader.kill()
        reader.wait()
    (m.control / "hang").unlink()
    time.sleep(2.1)  # past the memo of blocks readers gave up on
    assert target.read_bytes() == (m.root / "demo/1/big.bin").read_bytes()


@pytest.mark.fuse
def test_second_read_comes_from_the_page_cache(mount):
    m = mount()
    target = m.path / "demo/1/bin/tool"
    expected = (m.root / "demo/1/bin/tool").read_bytes()
    assert target.read_bytes() == expected
    before = m.status()
    assert before["reads"] >= 1
    for _ in range(3):
        assert target.read_bytes() == expected
    after = m.status()
    assert after["reads"] == before["reads"]
    assert after["source_blocks"] == before["source_blocks"]


@pytest.mark.fuse
def test_new_versions_and_rollbacks_appear_without_remounting(mount):
    m = mount(refresh=0.2)
    latest = m.path / "demo/latest"
    assert os.readlink(latest) == "2"
    assert (latest / "etc/motd").read_text() == "welcome to version 2\n"
    build_sample_tree(m.root / "demo" / "3", variant=3)
    wait_until(lambda: os.readlink(latest) == "3")
    assert (latest / "etc/motd").read_text() == "welcome to version 3\n"
    assert sorted(os.listdir(m.path / "demo")) == ["1", "2", "3", "latest"]
    (m.control / "latest" / "demo").write_text("1")
    wait_until(lambda: os.readlink(latest) == "1")
    assert (latest / "etc/motd").read_text() == "welcome to version 1\n"


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.fuse
def test_signal_unmounts_cleanly(mount):
    m = mount()
    assert is_mounted(m.path)
    m.process.terminate()
    assert m.process.wait(timeout=20) == 0
    assert not is_mounted(m.path)


@pytest.mark.fuse
def test_icbd_umount(mount, tmp_path):
    m = mount()
    icbd = [sys.executable, "-m", "icbd.cli"]
    other = tmp_path / "plain"
    other.mkdir()
    result = subprocess.run([*icbd, "umount", str(other)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1 and "not mounted" in result.stderr
    result = subprocess.run([*icbd, "umount", "/proc"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1 and "not an icbd mount" in result.stderr
    result = subprocess.run([*icbd, "mount", str(m.path), "--cache", "http://127.0.0.1:9"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1 and "already an icbd mount" in result.stderr
    result = subprocess.run([*icbd, "umount", str(m.path)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert not is_mounted(m.path)
    assert m.process.wait(timeout=20) == 0


@pytest.mark.root  # for a user, icbd mount checks /etc/fuse.conf (user_allow_other) first
def test_icbd_mount_needs_a_source(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ICBD_MASTER"}
    result = subprocess.run([sys.executable, "-m", "icbd.cli", "mount", str(tmp_path)],
                            capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("icbd: ") and "--cache URL" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_icbd_mount_needs_an_existing_mountpoint(tmp_path):
    result = subprocess.run([sys.executable, "-m", "icbd.cli", "mount", str(tmp_path / "nope"),
                             "--cache", "http://127.0.0.1:9"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1 and "does not exist" in result.stderr


def test_background_start_reports_ready_or_the_error(tmp_path):
    log_file = tmp_path / "mount.log"
    pid = _start_in_background(lambda ready: ready(), log_file, False, wait=20)
    assert os.waitpid(pid, 0)[1] == 0

    def fail(ready):
        raise CliError("the source said no")

    with pytest.raises(CliError, match="the source said no"):
        _start_in_background(fail, log_file, False, wait=20)
    assert "the source said no" in log_file.read_text()


@pytest.mark.fuse
def test_icbd_mount_in_the_background(cluster, tmp_path):
    """`icbd mount` returns once the mount answers and serves from a daemon;
    `icbd umount` ends it. Through a real cache server."""
    from trees import make_tree

    from harness.cluster import free_port

    cluster.master()
    replica = cluster.replica("r1")
    cluster.icbd("imi", "create", "demo", "--from", str(make_tree(tmp_path / "tree", big=4096)))
    cluster.icbd("imi", "publish", "demo")
    cluster.icbd("subscribe", "demo", "--node", "r1")
    cluster.wait_held(replica, "demo", [1])
    cache = cluster.cache("cache")
    mountpoint, log_file = tmp_path / "mnt", tmp_path / "log" / "mount.log"
    mountpoint.mkdir()
    try:
        result = cluster.icbd("mount", str(mountpoint), "--cache", cache.url, "--log", str(log_file),
                              "--cache-dir", str(tmp_path / "state"), check=False)
        assert result.returncode == 0, result.stderr
        assert is_mounted(mountpoint), "returned before the mount was ready"
        assert (mountpoint / "demo/latest/etc/hostname").read_text() == "desktop-1\n"
        assert "answers" in log_file.read_text()
        result = cluster.icbd("umount", str(mountpoint), check=False)
        assert result.returncode == 0, result.stderr
        wait_until(lambda: "unmounted" in log_file.read_text())
    finally:
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)

    nowhere = f"http://127.0.0.1:{free_port()}"
    result = cluster.icbd("mount", str(mountpoint), "--cache", nowhere, "--log", str(log_file),
                          "--cache-dir", str(tmp_path / "state"), check=False)
    assert result.returncode == 1
    assert "cannot" in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert not is_mounted(mountpoint)
