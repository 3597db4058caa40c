"""Real icbd nodes for tests: processes on loopback ports, each with its own
data folder (a loop-mounted btrfs image when the node needs one), stopped by
pid and unmounted on teardown.

Each process holds the least credential its role needs, as in production:
the master and the command line the admin token (TOKEN), replicas and cache
servers a node token, mounts a reader token, both issued by the master the
first time a node or mount starts. `Cluster(tls=True)` makes a CA and a
certificate per node (trustme), so every hop speaks https and verifies.

Once the master has started, its public key (read from its data folder) is
in the cluster's environment as ICBD_MASTER_KEY, so every replica, cache and
mount started afterwards checks it, as an admin would set them up; a node or
mount made with `tofu=True` gets no key and trusts the master at first contact."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from icbdcore.clients import Credentials
from icbdcore.layout import Layout
from icbdcore.mounts import is_mountpoint
from icbdcore.wire import NODES_ROUTE, TOKENS_ROUTE

REPO = Path(__file__).resolve().parent.parent
ICBD = [sys.executable, "-m", "icbd.cli"]
TOKEN = "test-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    """Poll `condition()` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except (requests.RequestException, OSError, KeyError, ValueError) as error:
            last_error = error
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


def unmount(path: Path, command: tuple[str, ...] = ("umount",), lazy: str = "-l") -> None:
    """Unmount `path`, retrying while it is busy, lazily as the last resort."""
    for _ in range(25):
        if not is_mountpoint(path):
            return
        subprocess.run([*command, str(path)], capture_output=True)
        if is_mountpoint(path):
            time.sleep(0.2)
    subprocess.run([*command, lazy, str(path)], capture_output=True)


@dataclass
class Node:
    role: str
    argv: list[str]
    data: Path
    port: int
    log: Path
    env: dict
    id: str = ""
    process: subprocess.Popen | None = None
    extra: dict = field(default_factory=dict)
    host: str = "127.0.0.1"
    scheme: str = "http"
    verify: str | bool = True  # what requests verifies an https node against (the cluster's CA)
    credential: Callable[[], str] | None = None  # the token it runs with, issued when it first starts

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, wait: bool = True) -> Node:
        assert self.process is None or self.process.poll() is not None, "already running"
        env = {**self.env, "ICBD_TOKEN": self.credential()} if self.credential else self.env
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        if wait:
            wait_for(self.ready, timeout=60, what=f"{self.role} {self.id or ''} to serve on {self.url}")
        return self

    def ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"{self.role} exited with {self.process.returncode}; log:\n{self.log.read_text()[-3000:]}")
        return requests.get(self.url + "/", timeout=2, verify=self.verify).status_code == 200

    def status(self) -> dict:
        return requests.get(self.url + "/", timeout=5, verify=self.verify).json()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not stop in time."""
        if not self.alive():
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


def fuse_unmount(path: Path) -> None:
    unmount(path, ("fusermount3", "-u"), lazy="-z")


@dataclass
class MountProcess:
    """`icbd mount --foreground` in a subprocess."""

    mountpoint: Path
    argv: list[str]
    log: Path
    env: dict
    process: subprocess.Popen | None = None

    def start(self) -> MountProcess:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)

        def mounted() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"mount exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            return is_mountpoint(self.mountpoint)

        wait_for(mounted, timeout=60, what=f"the mount at {self.mountpoint}")
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def status(self) -> dict:
        return json.loads((self.mountpoint / ".icbd" / "status").read_text())

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
        fuse_unmount(self.mountpoint)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


class ClusterTls:
    """A CA made for one cluster, and a certificate for each of its nodes."""

    def __init__(self, folder: Path):
        import trustme  # a test dependency: only TLS clusters need it

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.authority = trustme.CA()
        self.ca = str(folder / "ca.pem")
        self.authority.cert_pem.write_to_path(self.ca)

    def issue(self, name: str, host: str) -> tuple[str, str]:
        """(certificate chain, key) files for node `name` reachable at `host`."""
        leaf = self.authority.issue_cert(host, "localhost", "127.0.0.1")
        cert, key = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        key.chmod(0o600)
        return str(cert), str(key)


class Cluster:
    def __init__(self, root: Path, suspect_after: float = 1.5, down_after: float = 3.0, heartbeat: float = 0.5,
                 *, tls: bool = False, source_roots: list[Path] | None = None):
        self.root = root
        self.nodes: list[Node] = []
        self.env = {**os.environ, "ICBD_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
        self.env.pop("ICBD_MASTER", None)
        self.env.pop("ICBD_CA", None)
        # The host's /etc/icbd/icbd.toml (a site's own settings) is not the test cluster's.
        self.env["ICBD_CONFIG"] = os.devnull
        self.tls = ClusterTls(root / "tls") if tls else None
        if self.tls:
            self.env["ICBD_CA"] = self.tls.ca
        # Where `imi create --from` may copy from: the tests' trees are made in the root.
        self.source_roots = [root] if source_roots is None else source_roots
        self.suspect_after = suspect_after
        self.down_after = down_after
        self.heartbeat = heartbeat
        self.master_node: Node | None = None
        self.mounts: list[MountProcess] = []
        self._tokens: dict[str, str] = {}

    @property
    def verify(self) -> str | bool:
        return self.tls.ca if self.tls else True

    def token(self, role: str) -> str:
        """A token of `role` ("node", "reader"), shared by every process of that
        role. Both are issued the first time one is asked for (as the first
        replica or cache starts): a node admits a new token only from its next
        heartbeat, so issuing the reader token before any cache server runs
        lets a mount use it at once."""
        if not self._tokens:
            for kind in ("node", "reader"):
                response = self.api("POST", TOKENS_ROUTE, json={"role": kind, "name": f"harness-{kind}"})
                response.raise_for_status()
                self._tokens[kind] = response.json()["token"]
        return self._tokens[role]

    def _node(self, role: str, name: str, args: list[str], port: int | None = None,
              host: str = "127.0.0.1", tofu: bool = False) -> Node:
        """A node listening on host:port (to run it in a network namespace,
        see harness.netns.Site.adopt)."""
        port = port or free_port()
        data = self.root / name
        data.mkdir(parents=True, exist_ok=True)
        tls_args = []
        if self.tls:
            cert, key = self.tls.issue(name, host)
            tls_args = ["--tls-cert", cert, "--tls-key", key]
        argv = [*ICBD, role, "--data", str(data), "--listen", f"{host}:{port}", *tls_args, *args]
        node = Node(role, argv, data, port, self.root / f"{name}.log", self._env(tofu), id=name, host=host,
                    scheme="https" if self.tls else "http", verify=self.verify,
                    credential=None if role == "master" else (lambda: self.token("node")))
        self.nodes.append(node)
        return node

    def _env(self, tofu: bool) -> dict:
        """The environment of a new process: the cluster's own (which gets the
        master's key once the master has started), or, for a process that is
        to trust the master at first contact, a copy without the key."""
        self.learn_master_key()
        if not tofu:
            return self.env
        return {k: v for k, v in self.env.items() if k != "ICBD_MASTER_KEY"}

    def learn_master_key(self) -> str | None:
        """The master's public key, from its data folder once it has started
        (None before); put in the cluster's environment for later processes."""
        if self.master_node is None:
            return None
        try:
            key = Layout(self.master_node.data).master_public_key.read_text().strip()
        except OSError:
            return None
        if self.env.get("ICBD_MASTER_KEY") != key:
            self.env["ICBD_MASTER_KEY"] = key
        return key

    def master(self, image_size: str = "2G", start: bool = True, extra: list[str] = (), **where) -> Node:
        roots = [arg for root in self.source_roots for arg in ("--source-root", str(root))]
        node = self._node("master", "master", [
            "--image-size", image_size, "--suspect-after", str(self.suspect_after),
            "--down-after", str(self.down_after), "--heartbeat", str(self.heartbeat), *roots, *extra,
        ], **where)
        self.master_node = node
        if start:
            node.start()
            self.learn_master_key()
        return node

    def replica(self, name: str, site: str = "a", image_size: str = "2G", start: bool = True,
                extra: list[str] = (), tofu: bool = False, **where) -> Node:
        assert self.master_node is not None
        node = self._node("replica", name, [
            "--master", self.master_node.url, "--site", site, "--name", name,
            "--image-size", image_size, "--heartbeat", str(self.heartbeat), *extra,
        ], tofu=tofu, **where)
        return node.start() if start else node

    def cache(self, name: str, site: str = "a", size: str = "1G", start: bool = True, extra: list[str] = (),
              tofu: bool = False, **where) -> Node:
        assert self.master_node is not None
        node = self._node("cache", name, [
            "--master", self.master_node.url, "--site", site, "--name", name,
            "--size", size, "--heartbeat", str(self.heartbeat), *extra,
        ], tofu=tofu, **where)
        return node.start() if start else node

    def mount(self, name: str, *, cache: Node | str | list[Node | str] | None = None,
              cache_dir: Path | None = None, site: str | None = None, timeout: float = 5.0,
              extra: list[str] = (), tofu: bool = False) -> MountProcess:
        """A FUSE mount reading through `cache` (a cache server, or several;
        a node or a URL, such as a proxy's in front of one), or through an
        embedded cache in `cache_dir` filled from the master's replicas.
        Either way `cache_dir` (default ROOT/NAME-cache, one per mount) keeps
        its key and catalogue (and, over caches, the replicas to fall back on)."""
        assert self.master_node is not None
        cache_dir = cache_dir or self.root / f"{name}-cache"
        if cache is not None:
            caches = cache if isinstance(cache, list) else [cache]
            source = [arg for c in caches for arg in ("--cache", c if isinstance(c, str) else c.url)]
        else:
            source = ["--master", self.master_node.url]
        argv = [*ICBD, "mount", str(self.root / name), "--foreground", "--timeout", str(timeout),
                "--refresh", "0.5", *source, "--cache-dir", str(cache_dir), *(["--site", site] if site else []),
                *extra]
        env = {**self._env(tofu), "ICBD_TOKEN": self.token("reader")}
        mount = MountProcess(self.root / name, argv, self.root / f"{name}.log", env)
        self.mounts.append(mount)
        return mount.start()

    # --- the command line -------------------------------------------------------

    def icbd(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        assert self.master_node is not None
        self.learn_master_key()
        result = subprocess.run(
            [*ICBD, "--master", self.master_node.url, *args],
            capture_output=True, text=True, env=self.env, cwd=REPO, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"icbd {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def icbd_json(self, *args: str) -> dict:
        return json.loads(self.icbd("--json", *args).stdout)

    def api(self, method: str, path: str, node: Node | None = None, **kwargs) -> requests.Response:
        node = node or self.master_node
        headers = {**Credentials(kwargs.pop("token", TOKEN)).headers(), **kwargs.pop("headers", {})}
        return requests.request(method, node.url + path, headers=headers, timeout=30, verify=self.verify, **kwargs)

    def nodes_status(self) -> dict[str, dict]:
        return {n["id"]: n for n in self.api("GET", NODES_ROUTE).json()["nodes"]}

    def wait_held(self, replica: Node, name: str, versions: list[int], timeout: float = 60) -> dict:
        def held():
            status = replica.status()
            return status if status["versions"].get(name) == versions else None

        return wait_for(held, timeout, what=f"{replica.id} to hold {name} {versions}")

    def stop_all(self) -> None:
        # Teardown goes on whatever one mount or node does.
        for mount in reversed(self.mounts):
            with contextlib.suppress(Exception):
                mount.stop()
        for node in reversed(self.nodes):
            with contextlib.suppress(Exception):
                node.stop()
        for node in reversed(self.nodes):
            unmount(node.data)
            # Data folders hold btrfs images of up to GiBs: never leave them behind.
            if not is_mountpoint(node.data):
                shutil.rmtree(node.data, ignore_errors=True)
