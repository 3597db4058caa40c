"""Debian's nginx, run with the configs of contrib/nginx/ as an admin would
use them, for tests and benchmarks: its own prefix folder (cache, logs, temp
files, pid), started in the foreground, stopped by pid.

    proxy = Nginx(folder, "icbd-master-cache.conf", upstreams=[master.url], port=free_port())
    proxy.start()
    ...                        # replicas get --master proxy.url
    proxy.stop()

The contrib files mark the lines a site changes with `# icbd: ...`
comments (upstream servers, listen port, cache and log paths); those lines
and nothing else are rewritten here, so what is tested is the file shipped.
`site.command` (harness.netns) may wrap the command to run it in a site.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import requests

from .cluster import REPO, wait_for

CONTRIB = REPO / "contrib" / "nginx"
NGINX = "/usr/sbin/nginx"


class NginxMissing(RuntimeError):
    """nginx is not installed (scripts/install-packages installs it)."""


def available() -> bool:
    return Path(NGINX).exists()


def render(config: str, *, upstreams: list[str], port: int, host: str, prefix: Path) -> str:
    """A contrib config with the marked lines set for this run."""
    text = (CONTRIB / config).read_text()
    servers = iter(upstreams)
    lines = []
    first_upstream = True
    for line in text.splitlines():
        if "# icbd: upstream" in line:
            if first_upstream:
                indent = line[: len(line) - len(line.lstrip())]
                for url in servers:
                    lines.append(f"{indent}server {urlsplit(url).netloc};  # icbd: upstream")
                first_upstream = False
            continue
        if "# icbd: listen" in line:
            line = re.sub(r"listen\s+\S+;", f"listen {host}:{port};", line)
        elif "# icbd: access log" in line:
            line = re.sub(r"access_log\s+\S+", f"access_log {prefix / 'access.log'}", line)
        elif "# icbd: cache path" in line:
            line = re.sub(r"proxy_cache_path\s+\S+", f"proxy_cache_path {prefix / 'cache'}", line)
        elif "# icbd: auth cache path" in line:
            line = re.sub(r"proxy_cache_path\s+\S+", f"proxy_cache_path {prefix / 'auth-cache'}", line)
        lines.append(line)
    return "\n".join(lines) + "\n"


class Nginx:
    """One nginx serving one contrib server block (with icbd-common.conf)."""

    def __init__(self, folder: Path, config: str, *, upstreams: list[str], port: int, host: str = "127.0.0.1",
                 wrap: Callable[[list[str]], list[str]] | None = None):
        if not available():
            raise NginxMissing(f"{NGINX} is not installed: run scripts/install-packages (make setup)")
        self.folder = folder
        self.port = port
        self.host = host
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)
        for sub in ("cache", "auth-cache", "tmp"):
            (folder / sub).mkdir(exist_ok=True)
        # Only the files of this server: its own, and the common one (its cache paths).
        common = render("icbd-common.conf", upstreams=[], port=port, host=host, prefix=folder)
        server = render(config, upstreams=upstreams, port=port, host=host, prefix=folder)
        (folder / "icbd-common.conf").write_text(common)
        (folder / config).write_text(server)
        self.conf = folder / "nginx.conf"
        self.conf.write_text(f"""user root;
worker_processes 1;
pid {folder / 'nginx.pid'};
error_log {folder / 'error.log'} info;
events {{ worker_connections 4096; }}
http {{
    default_type application/octet-stream;
    sendfile on;
    client_body_temp_path {folder / 'tmp' / 'body'};
    proxy_temp_path {folder / 'tmp' / 'proxy'};
    fastcgi_temp_path {folder / 'tmp' / 'fastcgi'};
    uwsgi_temp_path {folder / 'tmp' / 'uwsgi'};
    scgi_temp_path {folder / 'tmp' / 'scgi'};
    include {folder / 'icbd-common.conf'};
    include {folder / config};
}}
""")
        self.wrap = wrap or (lambda argv: argv)
        self.argv = self.wrap([NGINX, "-p", str(folder), "-c", str(self.conf), "-g", "daemon off;"])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def check(self) -> None:
        """`nginx -t` on the config: a one-line error if it does not parse."""
        done = subprocess.run(self.wrap([NGINX, "-t", "-p", str(self.folder), "-c", str(self.conf)]),
                              capture_output=True, text=True)
        if done.returncode != 0:
            problems = [line for line in done.stderr.splitlines() if "[emerg]" in line] or done.stderr.splitlines()
            raise RuntimeError(f"nginx -t: {problems[0] if problems else done.returncode}")

    def start(self) -> Nginx:
        self.check()
        with open(self.folder / "stdout.log", "ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)

        def up() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"nginx exited with {self.process.returncode}: "
                                     f"{(self.folder / 'error.log').read_text()[-2000:]}")
            requests.get(self.url + "/", timeout=2)
            return True

        wait_for(up, timeout=30, what=f"nginx on {self.url}")
        return self

    def workers(self) -> list[int]:
        """The pids of nginx's processes (master and workers), for CPU accounting."""
        if self.process is None:
            return []
        found = [self.process.pid]
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.process.pid:
                    found.append(int(pid))
        return found

    def log_lines(self) -> list[str]:
        path = self.folder / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def cache_files(self) -> list[Path]:
        return [p for p in (self.folder / "cache").rglob("*") if p.is_file()]

    def cache_file(self, key: str) -> Path:
        """The file nginx keeps the object of cache key `key` in."""
        for path in self.cache_files():
            with open(path, "rb") as f:
                head = f.read(4096)
            if f"\nKEY: {key}\n".encode() in head:
                return path
        raise FileNotFoundError(f"no cached object with key {key}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # fast shutdown: workers end with it
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        # Workers exit with their master; wait until none is left.
        deadline = time.monotonic() + 10
        while self.workers()[1:] and time.monotonic() < deadline:
            time.sleep(0.1)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
