"""Running under systemd: the units pass `systemd-analyze verify`; nodes and
mounts speak sd_notify (READY=1 once they serve, WATCHDOG=1 from their
loop, STOPPING=1 at SIGTERM) to a real notify socket; logs under journald
carry no timestamp of their own and say their priority."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from harness.cluster import Cluster
from icbdcore.mounts import is_mountpoint
from icbdcore.service import ServiceManager

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "contrib" / "systemd"


def test_the_units_pass_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze (scripts/install-packages installs systemd)")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "icbd").write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m icbd.cli \"$@\"\n")
    (bindir / "icbd").chmod(0o755)
    names = {"icbd-master.service": "icbd-master.service", "icbd-replica@.service": "icbd-replica@icbd.service",
             "icbd-cache@.service": "icbd-cache@icbd.service", "icbd-mount@.service": "icbd-mount@imis.service",
             "imis.mount": "imis.mount", "imis.automount": "imis.automount"}
    assert {p.name for p in UNITS.iterdir()} == set(names)
    for source, name in names.items():
        text = (UNITS / source).read_text().replace("@BINDIR@", str(bindir)).replace("@SYSCONFDIR@", "/etc")
        (tmp_path / name).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in names.values())],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    for name in ("icbd-master.service", "icbd-replica@icbd.service", "icbd-cache@icbd.service",
                 "icbd-mount@imis.service"):
        text = (tmp_path / name).read_text()
        assert "Type=notify" in text and "WatchdogSec=" in text and "Restart=on-failure" in text
    # A deliberately broken unit fails the same check: the check can fail.
    broken = tmp_path / "icbd-broken.service"
    broken.write_text((tmp_path / "icbd-master.service").read_text().replace("Type=notify", "Type=notifi"))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(broken)], capture_output=True, text=True,
                            timeout=60)
    assert "Failed to parse service type" in result.stderr


class NotifySocket:
    """A service manager's notify socket: what a process tells it, with when."""

    def __init__(self, folder: Path):
        self.path = str(folder / "notify.sock")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.messages: list[tuple[float, str]] = []

    def env(self, watchdog_s: float | None = None) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": self.path}
        if watchdog_s:
            env["WATCHDOG_USEC"] = str(int(watchdog_s * 1e6))
        return env

    def wait_for(self, line: str, timeout: float, on_each=None) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.socket.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.socket.recv(4096).decode()
            except TimeoutError:
                break
            now = time.monotonic()
            self.messages.append((now, data))
            if on_each:
                on_each(data)
            if line in data.split("\n"):
                return now
        raise AssertionError(f"no {line} within {timeout} s; got {[m for _, m in self.messages]}")

    def count(self, line: str) -> int:
        return sum(1 for _, m in self.messages if line in m.split("\n"))

    def close(self) -> None:
        self.socket.close()


def test_watchdog_only_for_this_process():
    assert ServiceManager({"WATCHDOG_USEC": "2000000"}).watchdog_interval == 2.0
    assert ServiceManager({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 2.0
    assert ServiceManager({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert ServiceManager({}).watchdog_interval is None and not ServiceManager({}).present


@pytest.mark.btrfs
@pytest.mark.fuse
def test_nodes_and_mounts_tell_systemd_when_they_serve_and_feed_its_watchdog(tmp_path):
    notify = NotifySocket(tmp_path)
    cluster = Cluster(tmp_path / "c")
    try:
        master = cluster.master(start=False)
        master.env = {**cluster.env, **notify.env(watchdog_s=1.0)}
        master.start(wait=False)
        served_at_ready = []

        def check_serving(data: str) -> None:
            if "READY=1" in data.split("\n"):  # at that moment the port must answer
                served_at_ready.append(requests.get(master.url + "/", timeout=5).status_code)

        notify.wait_for("READY=1", timeout=60, on_each=check_serving)
        assert served_at_ready == [200]
        assert any("STATUS=master serving on http://127.0.0.1" in m for _, m in notify.messages)
        # WATCHDOG_USEC of 1 s: a ping every half of it, from the running loop.
        started = time.monotonic()
        while time.monotonic() - started < 3.0:
            notify.wait_for("WATCHDOG=1", timeout=2)
        pings = [t for t, m in notify.messages if "WATCHDOG=1" in m and t >= started]
        assert len(pings) >= 5, pings
        # A loop that stops turning stops the pings: systemd would restart it.
        master.pause()
        paused = len(notify.messages)
        with pytest.raises(AssertionError):
            notify.wait_for("WATCHDOG=1", timeout=1.5)
        assert len(notify.messages) == paused
        master.resume()
        notify.wait_for("WATCHDOG=1", timeout=5)

        # A mount in the foreground: READY=1 once it answers.
        replica = cluster.replica("r1")
        cache = cluster.cache("c1")
        assert replica.alive() and cache.alive()
        mountpoint = tmp_path / "c" / "m1"
        mountpoint.mkdir()
        env = {**cluster.env, "ICBD_TOKEN": cluster.token("reader"), **notify.env(watchdog_s=1.0)}
        mount = subprocess.Popen([sys.executable, "-m", "icbd.cli", "mount", str(mountpoint), "--foreground",
                                  "--cache", cache.url, "--cache-dir", str(tmp_path / "m1-cache")],
                                 env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            mounted_at_ready = []
            notify.wait_for("READY=1", timeout=60,
                            on_each=lambda d: mounted_at_ready.append(is_mountpoint(mountpoint))
                            if "READY=1" in d.split("\n") else None)
            assert mounted_at_ready == [True]
            notify.wait_for("WATCHDOG=1", timeout=3)
            mount.send_signal(signal.SIGTERM)
            notify.wait_for("STOPPING=1", timeout=30)
            assert mount.wait(30) == 0
            assert not is_mountpoint(mountpoint)
        finally:
            if mount.poll() is None:
                mount.kill()
                mount.wait(10)
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)

        master.process.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", timeout=30)
        assert master.process.wait(30) == 0
    finally:
        cluster.stop_all()
        notify.close()


def test_logs_under_journald_carry_no_time_and_say_their_priority(tmp_path):
    """stderr that is the journal stream (JOURNAL_STREAM names its device and
    inode): no timestamp, a syslog priority prefix, one line per event, the
    request id at the end. Elsewhere: the time and the pid."""
    code = ("import logging; from icbdcore.logs import setup_logging, request_id; setup_logging(None, False); "
            "log = logging.getLogger('icbd.test'); log.info('plain'); log.warning('two\\nlines')\n"
            "with request_id('abc123'): log.error('inside')\n"
            "try:\n 1/0\nexcept ZeroDivisionError:\n log.exception('failed')\n")
    out = tmp_path / "stderr"
    with open(out, "w") as f:
        st = os.fstat(f.fileno())
        env = {**os.environ, "PYTHONPATH": str(REPO), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        subprocess.run([sys.executable, "-c", code], stderr=f, env=env, check=True, timeout=60)
    lines = out.read_text().splitlines()
    assert lines[:3] == ["<6>INFO icbd.test: plain", "<4>WARNING icbd.test: two\\nlines",
                         "<3>ERROR icbd.test: inside rid=abc123"], lines
    assert len(lines) == 4 and lines[3].startswith("<3>ERROR icbd.test: failed\\nTraceback") \
        and "ZeroDivisionError" in lines[3]
    # The same program, stderr not the journal's: a timestamp and the pid first.
    with open(out, "w") as f:
        env = {**os.environ, "PYTHONPATH": str(REPO), "JOURNAL_STREAM": "1:1"}
        subprocess.run([sys.executable, "-c", code], stderr=f, env=env, check=True, timeout=60)
    first = out.read_text().splitlines()[0]
    assert first[:4].isdigit() and " INFO icbd.test: plain" in first and not first.startswith("<")
