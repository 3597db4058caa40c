"""Many sites on this machine: what a publish costs the master and each WAN
link, with and without a shared nginx in front of the master, how long until
every site holds it, how a boot storm at every site at once fares, and what
each tier (icbd's Python processes, nginx) serves per core.

The emulation (rows scale_master_egress, scale_converge_seconds,
scale_storm_p99_ms): K sites, each a network namespace behind its own tbf
WAN link (harness/netns.py; rates from 20 to 200 Mbit/s), each with a
replica, a site cache server and R desktops (readers); the master in a site
"central", an nginx (contrib/nginx/icbd-master-cache.conf) in a site "edge",
as a CDN or a central proxy would be. Both are unshaped.

1. v1 goes to every replica, links unshaped (not measured).
2. Run "direct": the replicas' --master is the master. An update is
   published; measured: the master's stream bytes and its link's bytes, each
   site's link bytes, and when each replica holds the version.
3. Run "nginx": the replicas restart with --master the edge nginx; another
   update of the same size; the same measures, and the nginx's.
4. N replicas behind the nginx, N = 2, 5, K: one more iMI, subscribed by N
   replicas, then an update; the master's stream bytes per publish.
5. A boot profile is recorded by a real FUSE mount reading the boot files
   of the newest version (through a cache server in "central").
6. The storm: every reader of every site replays that profile through its
   site's cache server at once, as a mount does (bench/scale_reader.py, one
   process per site, in the site's namespace): block latencies per site,
   replica egress per site, CPU per tier.

Then, on loopback (rows scale_replica_egress, scale_cache_throughput,
scale_replica_throughput, scale_cpu_seconds_per_gb):

7. M cache servers behind one nginx in front of a replica
   (contrib/nginx/icbd-replica-cache.conf, each cache server with
   --upstream): the replica's egress for the working set, M = 2, 4.
8. Throughput per core: a warm cache server against an nginx serving the
   same blocks from its cache (the same config in front of that cache
   server), and the replica against its warm nginx: 4 client threads
   fetching the working set's blocks for a few seconds; blocks/s and MB/s
   per second of CPU the server used.

What this host bounds: 2 cores run every process of every site, so CPU,
not the links, limits the storm and the unshaped runs; a figure per core is
what carries over to other hardware (docs/SCALING.md).

    python -m bench.scale [--tiny | --full]    # prints the rows as JSON
"""

from __future__ import annotations

import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

from harness.cluster import ICBD, REPO, Cluster, MountProcess, Node, free_port, wait_for
from harness.data import MIB, change_image, write_image
from harness.netns import Site, SiteNetwork, sites
from harness.nginx import Nginx, NginxMissing
from harness.nginx import available as nginx_available
from icbdcore.clients import Credentials, session
from icbdcore.manifest import Manifest
from icbdcore.wire import SUBSCRIPTIONS_ROUTE, block_path, profile_path

from .context import BenchContext
from .results import Result
from .scale_reader import replay

log = logging.getLogger(__name__)

IMI = "desk"
SWEEP = "sweep"
RATES_MBIT = [20, 25, 30, 40, 50, 60, 80, 100, 150, 200]
BOOT_FILES = ["boot/vmlinuz", "boot/initrd.img", "usr/lib/libs.bin"]


def _pick(ctx: BenchContext, *, quick, full, tiny):
    return tiny if getattr(ctx, "tiny", False) else ctx.pick(quick=quick, full=full)


@dataclass(frozen=True)
class Sizes:
    sites: int
    readers: int  # per site
    boot: list[int]  # bytes of each boot file (the working set)
    apps: int  # bytes never read at boot
    change: int  # bytes changed by an update
    sweep: int  # the sweep iMI's size
    sweep_change: int
    sweep_counts: list[int]  # N replicas behind the nginx
    caches_behind: list[int]  # M cache servers behind one nginx
    load_seconds: float
    idle_seconds: float  # control traffic alone, measured over this long

    @property
    def working_set(self) -> int:
        return sum(self.boot)


def sizes_for(ctx: BenchContext) -> Sizes:
    sites_count = _pick(ctx, quick=10, full=12, tiny=2)
    return Sizes(
        sites=sites_count,
        readers=_pick(ctx, quick=5, full=8, tiny=2),
        boot=_pick(ctx, quick=[8 * MIB, 16 * MIB, 24 * MIB], full=[16 * MIB, 48 * MIB, 64 * MIB],
                   tiny=[MIB, MIB, 2 * MIB]),
        apps=_pick(ctx, quick=80 * MIB, full=320 * MIB, tiny=4 * MIB),
        change=_pick(ctx, quick=32 * MIB, full=96 * MIB, tiny=2 * MIB),
        sweep=_pick(ctx, quick=16 * MIB, full=32 * MIB, tiny=4 * MIB),
        sweep_change=_pick(ctx, quick=4 * MIB, full=8 * MIB, tiny=MIB),
        sweep_counts=sorted({min(n, sites_count) for n in (2, 5, sites_count)}),
        caches_behind=_pick(ctx, quick=[2, 4], full=[2, 4, 8], tiny=[2]),
        load_seconds=_pick(ctx, quick=5.0, full=10.0, tiny=1.5),
        idle_seconds=_pick(ctx, quick=10.0, full=20.0, tiny=3.0),
    )


# --- CPU accounting -------------------------------------------------------------------------------

def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes and their reaped children (btrfs send
    and receive run as children of the nodes)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])
    return total / ticks


class CpuMeter:
    def __init__(self, pids: list[int]):
        self.pids = pids
        self.start = cpu_seconds(pids)

    def seconds(self) -> float:
        return cpu_seconds(self.pids) - self.start


def per_gb(cpu: float, served: int) -> float | None:
    return round(cpu / (served / 1e9), 3) if served else None


# --- the image ---------------------------------------------------------------------------------------

def build_tree(root: Path, sizes: Sizes) -> Path:
    """A desktop-like tree: boot files read at boot, applications that are not."""
    for rel, size in zip(BOOT_FILES, sizes.boot, strict=True):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_image(root / rel, size)
    (root / "usr" / "share").mkdir(parents=True, exist_ok=True)
    write_image(root / "usr" / "share" / "apps.img", sizes.apps)
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc" / "hostname").write_text("desk\n")
    return root


def update(work: Path, sizes: Sizes) -> int:
    """An update: most of it in the applications, some in a boot file."""
    changed = change_image(work / "usr" / "share" / "apps.img", sizes.change - sizes.change // 8)
    changed += change_image(work / "usr" / "lib" / "libs.bin", sizes.change // 8, spread=4)
    return changed


# --- the emulation ------------------------------------------------------------------------------------

@dataclass
class SiteNodes:
    name: str
    site: Site
    rate: int  # bit/s
    replica: Node
    cache: Node


@dataclass
class Run:
    """One publish to every site, measured."""

    label: str
    version: int
    stream_bytes: int = 0  # the stream's length, from its record
    master_stream_bytes: int = 0  # stream bytes the master sent
    master_link_bytes: int = 0  # bytes out of central's link
    edge_link_bytes: int = 0
    site_link_bytes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # per site, publish to held
    all_seconds: float = 0.0
    master_cpu: float = 0.0
    nginx_cpu: float = 0.0
    nginx_bytes: int = 0

    def to_json(self) -> dict:
        return {
            "version": self.version, "stream_bytes": self.stream_bytes,
            "master_stream_bytes": self.master_stream_bytes, "master_link_bytes": self.master_link_bytes,
            "edge_link_bytes": self.edge_link_bytes, "site_link_bytes": self.site_link_bytes,
            "seconds_by_site": {k: round(v, 3) for k, v in self.seconds.items()},
            "all_seconds": round(self.all_seconds, 3), "master_cpu_seconds": round(self.master_cpu, 3),
            "nginx_cpu_seconds": round(self.nginx_cpu, 3), "nginx_bytes": self.nginx_bytes,
            "master_over_one_stream": round(self.master_stream_bytes / self.stream_bytes, 4),
            "master_link_over_one_stream": round(self.master_link_bytes / self.stream_bytes, 4),
        }


class Emulation:
    def __init__(self, ctx: BenchContext, net: SiteNetwork, cluster: Cluster, sizes: Sizes, names: list[str]):
        self.ctx = ctx
        self.net = net
        self.cluster = cluster
        self.sizes = sizes
        self.names = names
        self.sites: list[SiteNodes] = []
        self.master: Node
        self.nginx: Nginx | None = None
        self.runs: dict[str, Run] = {}
        self.sweep: dict[int, dict] = {}
        self.storm: dict = {}
        self.lone: dict = {}
        self.control: dict = {}
        self.profile_digests: list[str] = []

    # --- setting up ---------------------------------------------------------------------------

    def start(self) -> None:
        ctx, net, cluster, sizes = self.ctx, self.net, self.cluster, self.sizes
        central, edge = net["central"], net["edge"]
        room = f"{4 * (sizes.working_set + sizes.apps + sizes.sweep) // (1 << 30) + 2}G"
        ctx.step(f"starting the master, the edge nginx and {sizes.sites} sites (replica and cache server each)")
        self.master = central.adopt(cluster.master(image_size=room, host=central.ip, start=False)).start()
        cluster.learn_master_key()
        cluster.token("node")  # issues the node and reader tokens before any node needs them
        self.nginx = Nginx(ctx.scratch / "edge-nginx", "icbd-master-cache.conf", upstreams=[self.master.url],
                           port=free_port(), host=edge.ip, wrap=edge.command).start()
        for index, name in enumerate(self.names):
            site = net[name]
            replica = site.adopt(cluster.replica(f"r-{name}", site=name, image_size=room, host=site.ip,
                                                 start=False, extra=["--resume-spool", "never"]))
            cache = site.adopt(cluster.cache(f"c-{name}", site=name, size="4G", host=site.ip, start=False))
            self.sites.append(SiteNodes(name, site, RATES_MBIT[index % len(RATES_MBIT)] * 1_000_000, replica, cache))
        self._start_all([n for s in self.sites for n in (s.replica, s.cache)])

    def _start_all(self, nodes: list[Node]) -> None:
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            wait_for(node.ready, timeout=180, what=f"{node.id} to serve")

    def shape(self) -> None:
        for s in self.sites:
            self.net.shape(s.name, s.rate)

    def unshape(self) -> None:
        for s in self.sites:
            self.net.unshape(s.name)

    def subscribe(self, name: str, nodes: list[SiteNodes]) -> None:
        for s in nodes:
            self.cluster.api("POST", SUBSCRIPTIONS_ROUTE, json={"imi": name, "node": s.replica.id}).raise_for_status()

    def wait_all(self, name: str, version: int, nodes: list[SiteNodes], timeout: float = 900,
                 start: float | None = None) -> dict[str, float]:
        """Seconds until each replica holds `version`, from `start` (default: now)."""
        start = time.perf_counter() if start is None else start
        held: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while len(held) < len(nodes):
            for s in nodes:
                if s.name in held:
                    continue
                try:
                    if version in s.replica.status()["versions"].get(name, []):
                        held[s.name] = time.perf_counter() - start
                except (requests.RequestException, ValueError):
                    pass
            if time.monotonic() > deadline:
                missing = sorted(s.name for s in nodes if s.name not in held)
                raise RuntimeError(f"sites {missing} did not get {name} v{version} within {timeout:.0f} s")
            time.sleep(0.05)
        return held

    def switch_to_nginx(self) -> None:
        """Every replica restarts with --master the edge nginx."""
        assert self.nginx is not None
        for s in self.sites:
            s.replica.stop()
            argv = s.replica.argv
            argv[argv.index("--master") + 1] = self.nginx.url
        self._start_all([s.replica for s in self.sites])
        wait_for(lambda: all(self.cluster.nodes_status()[s.replica.id]["state"] == "alive" for s in self.sites),
                 timeout=60, what="every replica alive again")

    # --- the measured publishes ------------------------------------------------------------------------

    def publish_and_measure(self, label: str, name: str, nodes: list[SiteNodes]) -> Run:
        work = self.master.data / "work" / name
        (update if name == IMI else _sweep_update)(work, self.sizes)
        served = self.master.status()["served"]["stream_bytes"]
        links = {s.name: self.net.counters(s.name) for s in nodes}
        central, edge = self.net.counters("central"), self.net.counters("edge")
        master_cpu = CpuMeter([self.master.pid])
        nginx_cpu = CpuMeter(self.nginx.workers() if self.nginx else [])
        nginx_lines = len(self.nginx.log_lines()) if self.nginx else 0
        started = time.perf_counter()
        record = self.cluster.api("POST", f"/v1/imis/{name}/versions", json={"message": label}).json()
        run = Run(label, record["version"])
        run.seconds = self.wait_all(name, record["version"], nodes, start=started)
        run.all_seconds = max(run.seconds.values())
        run.master_stream_bytes = self.master.status()["served"]["stream_bytes"] - served
        run.master_link_bytes = (self.net.counters("central") - central).sent
        run.edge_link_bytes = (self.net.counters("edge") - edge).sent
        run.site_link_bytes = {s.name: (self.net.counters(s.name) - links[s.name]).received for s in nodes}
        run.master_cpu = master_cpu.seconds()
        run.nginx_cpu = nginx_cpu.seconds()
        if self.nginx:
            run.nginx_bytes = sum(_sent(line) for line in self.nginx.log_lines()[nginx_lines:])
        parent = max(v for v in nodes[0].replica.status()["versions"][name] if v < run.version)
        stream = self.cluster.api("GET", f"/v1/imis/{name}/versions/{run.version}/stream/digest?parent={parent}",
                                  headers={"X-Icbd-Node": nodes[0].replica.id}).json()
        run.stream_bytes = stream["bytes"]
        return run

    def runs_direct_and_nginx(self) -> None:
        ctx, sizes = self.ctx, self.sizes
        ctx.step(f"v1 to {sizes.sites} replicas (links unshaped)")
        tree = build_tree(ctx.scratch / "desk-src", sizes)
        self.cluster.icbd("imi", "create", IMI, "--from", str(tree))
        self.cluster.icbd("imi", "publish", IMI)
        self.subscribe(IMI, self.sites)
        self.wait_all(IMI, 1, self.sites)
        self.shape()
        ctx.step("run direct: an update published to every site, replicas ask the master")
        self.runs["direct"] = self.publish_and_measure("direct", IMI, self.sites)
        ctx.step("restarting the replicas behind the edge nginx")
        self.switch_to_nginx()
        ctx.step("run nginx: an update published to every site through the edge nginx")
        self.runs["nginx"] = self.publish_and_measure("nginx", IMI, self.sites)

    def sweep_counts(self) -> None:
        """N replicas behind the nginx: the master's bytes for one publish."""
        sizes = self.sizes
        source = self.ctx.scratch / "sweep-src"
        source.mkdir()
        write_image(source / "disk.img", sizes.sweep)
        self.cluster.icbd("imi", "create", SWEEP, "--from", str(source))
        self.cluster.icbd("imi", "publish", SWEEP)
        subscribed: list[SiteNodes] = []
        for count in sizes.sweep_counts:
            added = self.sites[len(subscribed):count]
            self.ctx.step(f"{count} replicas behind the nginx: catching up, then an update")
            self.subscribe(SWEEP, added)
            subscribed += added
            latest = self.cluster.icbd_json("imi", "versions", SWEEP)["latest"]
            self.wait_all(SWEEP, latest, subscribed)
            run = self.publish_and_measure(f"sweep-{count}", SWEEP, subscribed)
            self.sweep[count] = run.to_json()

    def control_traffic(self) -> None:
        """What the control calls alone cost the master's link, nothing being
        published: heartbeats of every node, and each cache server's polls of
        the catalogue and the node list (every 2 s); and how large those are."""
        self.ctx.step(f"control traffic alone for {self.sizes.idle_seconds:g} s")
        before = self.net.counters("central")
        time.sleep(self.sizes.idle_seconds)
        used = self.net.counters("central") - before
        nodes = self.cluster.api("GET", "/v1/nodes")
        catalogue = self.cluster.api("GET", "/v1/imis")
        heartbeat = len(json.dumps(self.sites[0].replica.status()))
        count = len(nodes.json()["nodes"])
        # What one node list costs the master: its CPU for a run of them.
        calls = 50
        cpu = CpuMeter([self.master.pid])
        with session(Credentials(self.cluster.token("reader"))) as http:
            for _ in range(calls):
                http.get(self.master.url + "/v1/nodes", timeout=30).raise_for_status()
        node_list_cpu = cpu.seconds()
        self.control = {
            "seconds": self.sizes.idle_seconds, "nodes": count,
            "replicas": len(self.sites), "cache_servers": len(self.sites),
            "master_link_bytes_per_s_out": round(used.sent / self.sizes.idle_seconds),
            "master_link_bytes_per_s_in": round(used.received / self.sizes.idle_seconds),
            "node_list_bytes": len(nodes.content), "node_list_bytes_per_node": round(len(nodes.content) / count),
            "catalogue_bytes": len(catalogue.content), "heartbeat_body_bytes": heartbeat,
            "node_list_master_cpu_ms": round(node_list_cpu / calls * 1000, 3),
            "node_list_bytes_per_master_cpu_s": round(calls * len(nodes.content) / node_list_cpu)
            if node_list_cpu else None,
            "polls": "each cache server: GET /v1/imis and GET /v1/nodes every 2 s; each replica and cache server: "
                     "a heartbeat every 2 s (the defaults)",
        }

    # --- the storm ---------------------------------------------------------------------------------

    def record_profile(self) -> None:
        """A real mount reads the boot files of the newest version, in order,
        through a cache server of its own in central; the master keeps the profile."""
        ctx, cluster = self.ctx, self.cluster
        central = self.net["central"]
        ctx.step("recording the boot profile with a FUSE mount")
        recorder = central.adopt(cluster.cache("c-recorder", site="central", size="2G", host=central.ip,
                                               start=False)).start()
        version = self.cluster.icbd_json("imi", "versions", IMI)["latest"]
        name = "recorder"
        argv = [*ICBD, "mount", str(cluster.root / name), "--foreground", "--timeout", "60", "--refresh", "0.5",
                "--cache", recorder.url, "--cache-dir", str(cluster.root / f"{name}-cache"), "--profile-quiet", "2"]
        env = {**cluster.env, "ICBD_TOKEN": cluster.token("reader")}
        mount = MountProcess(cluster.root / name, central.command(argv), cluster.root / f"{name}.log", env)
        cluster.mounts.append(mount)
        mount.start()
        try:
            root = mount.mountpoint / IMI / str(version)
            wait_for(lambda: (root / BOOT_FILES[0]).exists(), timeout=30, what="the mount to show the version")
            for rel in BOOT_FILES:
                with open(root / rel, "rb") as f:
                    while f.read(1 << 20):
                        pass

            def recorded():
                answer = cluster.api("GET", profile_path(IMI, version))
                return answer.json() if answer.status_code == 200 else None

            profile = wait_for(recorded, timeout=90, interval=0.5, what="the boot profile to reach the master")
        finally:
            mount.stop()
            recorder.stop()
        self.profile_digests = list(dict.fromkeys(profile["digests"]))
        self.storm["version"] = version

    def run_storm(self) -> None:
        ctx, sizes = self.ctx, self.sizes
        version = self.storm["version"]
        readers = sizes.readers * len(self.sites)
        ctx.step(f"boot storm: {readers} readers at {len(self.sites)} sites replay the profile at once")
        served = {s.name: s.replica.status()["served"]["bytes"] for s in self.sites}
        replica_cpu = CpuMeter([s.replica.pid for s in self.sites])
        cache_cpu = CpuMeter([s.cache.pid for s in self.sites])
        start_at = time.time() + 3.0
        processes = {}
        for s in self.sites:
            argv = [sys.executable, "-m", "bench.scale_reader", "--cache", s.cache.url, "--imi", IMI,
                    "--version", str(version), "--readers", str(sizes.readers), "--start-at", str(start_at)]
            env = {**self.cluster.env, "ICBD_TOKEN": self.cluster.token("reader")}
            processes[s.name] = subprocess.Popen(s.site.command(argv), stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, env=env, cwd=REPO, text=True)
        results = {}
        for name, process in processes.items():
            out, err = process.communicate(timeout=900)
            if process.returncode != 0:
                raise RuntimeError(f"the readers of site {name} failed: {err.strip()[-500:]}")
            results[name] = json.loads(out)
        errors = [e for r in results.values() for e in r["errors"]]
        if errors:
            raise RuntimeError(f"{len(errors)} storm reads failed, e.g. {errors[0]}")
        per_site = {}
        for s in self.sites:
            flat = sorted(x for xs in results[s.name]["latencies_ms"] for x in xs)
            per_site[s.name] = {
                "rate_mbit": s.rate // 1_000_000, "readers": sizes.readers, "blocks_read": len(flat),
                "p50_ms": _quantile(flat, 0.5), "p99_ms": _quantile(flat, 0.99), "max_ms": round(flat[-1], 3),
                "seconds": results[s.name]["seconds"], "bytes_read": results[s.name]["bytes"],
                "replica_egress_bytes": s.replica.status()["served"]["bytes"] - served[s.name],
            }
        every = sorted(x for r in results.values() for xs in r["latencies_ms"] for x in xs)
        read_bytes = sum(r["bytes"] for r in results.values())
        replica_bytes = sum(v["replica_egress_bytes"] for v in per_site.values())
        self.storm.update({
            "sites": per_site, "readers": readers, "p50_ms": _quantile(every, 0.5), "p99_ms": _quantile(every, 0.99),
            "bytes_read": read_bytes, "replica_egress_bytes": replica_bytes,
            "cache_cpu_seconds": round(cache_cpu.seconds(), 3), "replica_cpu_seconds": round(replica_cpu.seconds(), 3),
        })
        # The floor: one reader alone at the first site, its cache now warm.
        ctx.step("one reader alone through a warm site cache (the storm's baseline)")
        first = self.sites[0]
        argv = [sys.executable, "-m", "bench.scale_reader", "--cache", first.cache.url, "--imi", IMI,
                "--version", str(version), "--readers", "1", "--no-prefetch"]
        env = {**self.cluster.env, "ICBD_TOKEN": self.cluster.token("reader")}
        done = subprocess.run(first.site.command(argv), capture_output=True, text=True, env=env, cwd=REPO,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"the lone reader failed: {done.stderr.strip()[-500:]}")
        alone = sorted(json.loads(done.stdout)["latencies_ms"][0])
        self.lone = {"p50_ms": _quantile(alone, 0.5), "p99_ms": _quantile(alone, 0.99), "blocks": len(alone)}

    def close(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        self.cluster.stop_all()


def _sweep_update(work: Path, sizes: Sizes) -> int:
    return change_image(work / "disk.img", sizes.sweep_change)


def _sent(line: str) -> int:
    """Body bytes of an access log line in contrib's `icbd` format."""
    try:
        return int(line.split('" ', 1)[1].split()[1])
    except (IndexError, ValueError):
        return 0


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


# --- on loopback: M cache servers behind one nginx, and throughput per core -------------------------------

def behind_one_nginx(ctx: BenchContext, sizes: Sizes) -> dict:
    """A replica, an nginx in front of it, and M cache servers filling through
    it (--upstream), each read by one reader replaying the working set."""
    cluster = ctx.cluster("scale-caches")
    proxies: list[Nginx] = []
    try:
        master = cluster.master()
        replica = cluster.replica("r1")
        nginx = Nginx(ctx.scratch / "replica-nginx", "icbd-replica-cache.conf", upstreams=[replica.url],
                      port=free_port())
        proxies.append(nginx.start())
        tree = build_tree(ctx.scratch / "caches-src", sizes)
        cluster.icbd("imi", "create", IMI, "--from", str(tree))
        cluster.icbd("imi", "publish", IMI)
        cluster.icbd("subscribe", IMI, "--node", replica.id)
        cluster.wait_held(replica, IMI, [1], timeout=300)
        digests, sizes_by_digest = _boot_blocks(cluster)
        working_set = sum(sizes_by_digest[d] for d in digests)
        cluster.api("PUT", profile_path(IMI, 1), json={"digests": digests}).raise_for_status()
        credentials = Credentials(cluster.token("reader"))
        by_count = {}
        warm_cache = None
        for count in sizes.caches_behind:
            for through in (True, False):
                label = f"{count} cache servers {'behind the nginx' if through else 'straight to the replica'}"
                ctx.step(label)
                extra = ["--upstream", nginx.url] if through else []
                caches = [cluster.cache(f"c{count}{'n' if through else 'd'}{i}", size="2G", extra=extra)
                          for i in range(count)]
                before = replica.status()["served"]["bytes"]
                if through:
                    _purge(nginx)
                with ThreadPoolExecutor(len(caches)) as pool:
                    results = list(pool.map(lambda c: replay(c.url, IMI, 1, 1, None, credentials), caches))
                if any(r["errors"] for r in results):
                    raise RuntimeError(f"{label}: {next(r for r in results if r['errors'])['errors'][0]}")
                egress = replica.status()["served"]["bytes"] - before
                by_count.setdefault(count, {})["nginx" if through else "direct"] = {
                    "replica_egress_bytes": egress, "over_working_set": round(egress / working_set, 4)}
                for cache in caches[1:] if warm_cache is None and through else caches:
                    cache.stop()
                if warm_cache is None and through:
                    warm_cache = caches[0]
        throughput = _throughput(ctx, cluster, sizes, replica, nginx, warm_cache, digests, credentials, proxies)
        return {"working_set_bytes": working_set, "working_set_blocks": len(digests), "by_count": by_count,
                "throughput": throughput, "master": master.id}
    finally:
        for proxy in proxies:
            proxy.stop()
        cluster.stop_all()


def _boot_blocks(cluster: Cluster) -> tuple[list[str], dict[str, int]]:
    manifest = Manifest.from_bytes(cluster.api("GET", f"/v1/imis/{IMI}/versions/1/manifest").content)
    order = [d for entry in manifest.files() if entry.path in BOOT_FILES for d in manifest.blocks_of(entry)]
    return list(dict.fromkeys(order)), manifest.block_sizes()


def _purge(nginx: Nginx) -> None:
    """Empty nginx's cache (a fresh shared cache for each measure)."""
    for path in nginx.cache_files():
        path.unlink(missing_ok=True)
    nginx.stop()
    nginx.start()


def _load(url: str, digests: list[str], credentials: Credentials, seconds: float, pids: list[int],
          threads: int = 4) -> dict:
    """`threads` clients fetching random blocks of `digests` from `url` for
    `seconds`; blocks/s and MB/s, wall and per second of the server's CPU."""
    stop = threading.Event()
    counts = [[0, 0] for _ in range(threads)]
    errors: list[str] = []

    def client(index: int) -> None:
        chooser = random.Random(index)
        with session(credentials) as http:
            while not stop.is_set():
                digest = chooser.choice(digests)
                answer = http.get(url + block_path(digest, IMI, 1), timeout=30)
                if answer.status_code != 200:
                    errors.append(f"HTTP {answer.status_code}")
                    return
                counts[index][0] += 1
                counts[index][1] += len(answer.content)

    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(threads)]
    cpu = CpuMeter(pids)
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join(30)
    wall = time.perf_counter() - started
    used = cpu.seconds()
    if errors:
        raise RuntimeError(f"load on {url}: {errors[0]}")
    blocks, served = sum(c[0] for c in counts), sum(c[1] for c in counts)
    return {
        "blocks": blocks, "bytes": served, "seconds": round(wall, 3), "server_cpu_seconds": round(used, 3),
        "blocks_per_s": round(blocks / wall, 1), "mb_per_s": round(served / wall / 1e6, 1),
        "blocks_per_cpu_s": round(blocks / used, 1) if used else None,
        "mb_per_cpu_s": round(served / used / 1e6, 1) if used else None,
        "cpu_seconds_per_gb": per_gb(used, served),
    }


def _throughput(ctx: BenchContext, cluster: Cluster, sizes: Sizes, replica: Node, replica_nginx: Nginx,
                cache: Node, digests: list[str], credentials: Credentials, proxies: list[Nginx]) -> dict:
    """A warm cache server and the replica, each against an nginx serving the
    same blocks from its cache (contrib's config in front of each)."""
    cache_nginx = Nginx(ctx.scratch / "cache-nginx", "icbd-replica-cache.conf", upstreams=[cache.url],
                        port=free_port())
    proxies.append(cache_nginx.start())
    found = {}
    for label, node, nginx in (("cache", cache, cache_nginx), ("replica", replica, replica_nginx)):
        ctx.step(f"throughput: the {label} against nginx, {sizes.load_seconds:g} s each")
        replay(nginx.url, IMI, 1, 1, None, credentials, prefetch=False)  # nginx's cache warm
        replay(node.url, IMI, 1, 1, None, credentials, prefetch=False)  # the node's page cache warm
        found[label] = _load(node.url, digests, credentials, sizes.load_seconds, [node.pid])
        found[f"nginx_in_front_of_{label}"] = _load(nginx.url, digests, credentials, sizes.load_seconds,
                                                    nginx.workers())
        misses = [line for line in nginx.log_lines()[-50:] if "cache=MISS" in line and "/v1/blocks/" in line]
        found[f"nginx_in_front_of_{label}"]["misses_in_the_last_50"] = len(misses)
    return found


# --- the rows -------------------------------------------------------------------------------------------

def scale(ctx: BenchContext) -> Iterator[Result]:
    from .suite import NotAvailable

    if not nginx_available():
        raise NotAvailable("nginx is not installed (scripts/install-packages installs it)")
    sizes = sizes_for(ctx)
    names = [f"s{i:02d}" for i in range(1, sizes.sites + 1)]
    with sites("central", "edge", *names) as net:
        # Heartbeats and liveness as a deployment has them by default (the
        # test harness's are faster), so the control traffic measured is real.
        cluster = ctx.cluster("scale", heartbeat=2.0, suspect_after=6.0, down_after=15.0)
        emulation = Emulation(ctx, net, cluster, sizes, names)
        try:
            emulation.start()
            emulation.runs_direct_and_nginx()
            emulation.sweep_counts()
            emulation.control_traffic()
            emulation.unshape()
            emulation.record_profile()
            emulation.run_storm()
        finally:
            emulation.close()  # before the namespaces go
    yield from emulation_rows(emulation, sizes)
    behind = behind_one_nginx(ctx, sizes)
    yield from loopback_rows(behind, emulation, sizes)


def emulation_rows(emu: Emulation, sizes: Sizes) -> Iterator[Result]:
    direct, nginx = emu.runs["direct"], emu.runs["nginx"]
    sites_detail = {}
    for s in emu.sites:
        sites_detail[s.name] = {
            "rate_mbit": s.rate // 1_000_000,
            "seconds_nginx": round(nginx.seconds[s.name], 3), "seconds_direct": round(direct.seconds[s.name], 3),
            "wan_bytes_nginx": nginx.site_link_bytes[s.name], "wan_bytes_direct": direct.site_link_bytes[s.name],
            "link_seconds_for_one_stream": round(nginx.stream_bytes * 8 / s.rate, 3),
        }
    slowest = min(s.rate for s in emu.sites)
    common = {"sites_count": len(emu.sites), "readers_per_site": sizes.readers,
              "update_changed_bytes": sizes.change, "image_bytes": sizes.working_set + sizes.apps,
              "host_bounds": "2 cores run the master, the nginx and every replica, cache server and reader of "
                             "every site: CPU, not the emulated links, bounds the storm and the unshaped phases"}
    yield Result("scale_master_egress", nginx.master_stream_bytes, nginx.stream_bytes, "bytes", detail={
        "what": f"one update published to {len(emu.sites)} sites whose replicas ask a shared nginx in front of the "
                "master (contrib/nginx/icbd-master-cache.conf): stream bytes the master sent, against one stream "
                "(the delta's length from its signed record)",
        "direct": direct.to_json(), "nginx": nginx.to_json(),
        "direct_master_over_one_stream": round(direct.master_stream_bytes / direct.stream_bytes, 3),
        "by_replicas_behind_nginx": {str(n): {"master_over_one_stream": d["master_over_one_stream"],
                                              "master_stream_bytes": d["master_stream_bytes"],
                                              "stream_bytes": d["stream_bytes"],
                                              "master_link_over_one_stream": d["master_link_over_one_stream"]}
                                     for n, d in emu.sweep.items()},
        "master_cpu_seconds_per_gb_direct": per_gb(direct.master_cpu, direct.master_stream_bytes),
        "nginx_cpu_seconds_per_gb": per_gb(nginx.nginx_cpu, nginx.nginx_bytes),
        "wan_bytes_per_site_per_update": {k: v["wan_bytes_nginx"] for k, v in sites_detail.items()},
        "wan_over_one_stream": round(statistics.fmean(v["wan_bytes_nginx"] for v in sites_detail.values())
                                     / nginx.stream_bytes, 4),
        "control": emu.control,
        **common,
    }, target=1.05)
    yield Result("scale_converge_seconds", nginx.all_seconds, nginx.stream_bytes * 8 / slowest, "s", detail={
        "what": f"publish to every one of {len(emu.sites)} sites holding the update (replicas behind the shared "
                "nginx), against the time the slowest site link needs to carry one delta stream",
        "sites": sites_detail, "direct_seconds": round(direct.all_seconds, 3),
        "slowest_link_mbit": slowest // 1_000_000, **common,
    })
    storm = emu.storm
    yield Result("scale_storm_p99_ms", max(v["p99_ms"] for v in storm["sites"].values()), emu.lone["p99_ms"], "ms",
                 detail={
                     "what": f"{storm['readers']} readers ({sizes.readers} per site) at {len(emu.sites)} sites replay "
                             "the recorded boot profile at once through their site's fresh cache server, as mounts "
                             "do (profile, prefetch, then each block in order, verified): the worst site's p99 block "
                             "latency, against one reader alone through a warm cache",
                     "sites": storm["sites"], "readers": storm["readers"], "p50_ms": storm["p50_ms"],
                     "p99_ms": storm["p99_ms"],
                     "lone_reader": emu.lone, "working_set_blocks": len(emu.profile_digests),
                     "bytes_read": storm["bytes_read"], "replica_egress_bytes": storm["replica_egress_bytes"],
                     "replica_egress_over_working_set_per_site": round(
                         storm["replica_egress_bytes"] / len(emu.sites) / max(1, sizes.working_set), 4),
                     "cache_cpu_seconds_per_gb": per_gb(storm["cache_cpu_seconds"], storm["bytes_read"]),
                     "replica_cpu_seconds_per_gb": per_gb(storm["replica_cpu_seconds"], storm["replica_egress_bytes"]),
                     **common,
                 })


def loopback_rows(behind: dict, emu: Emulation, sizes: Sizes) -> Iterator[Result]:
    working = behind["working_set_bytes"]
    worst = max(v["nginx"]["replica_egress_bytes"] for v in behind["by_count"].values())
    yield Result("scale_replica_egress", worst, working, "bytes", detail={
        "what": "M site cache servers fill the boot working set through one nginx in front of the replica "
                "(contrib/nginx/icbd-replica-cache.conf, --upstream): the replica's egress for the largest M, "
                "against the working set; `direct`: the same cache servers each straight to the replica",
        "by_cache_servers": behind["by_count"], "working_set_blocks": behind["working_set_blocks"],
    }, target=1.05)
    tp = behind["throughput"]
    for label in ("cache", "replica"):
        ours, theirs = tp[label], tp[f"nginx_in_front_of_{label}"]
        yield Result(f"scale_{label}_throughput", ours["mb_per_cpu_s"] or 0, theirs["mb_per_cpu_s"] or 0,
                     "MB/s per core", higher_is_better=True, detail={
                         "what": f"a warm {'site cache server' if label == 'cache' else 'replica'} serving random "
                                 "blocks of the working set to 4 client threads, MB/s per second of its CPU, "
                                 "against an nginx serving the same blocks from its cache (contrib's config in "
                                 f"front of the {label}), on loopback",
                         "icbd": ours, "nginx": theirs,
                         "blocks_per_s_per_core": ours["blocks_per_cpu_s"],
                         "nginx_blocks_per_s_per_core": theirs["blocks_per_cpu_s"],
                         "note": "the 4 clients are Python threads on the same 2 cores; per-core figures divide "
                                 "by the server's own CPU time, so the clients' share does not count",
                     })
    storm = emu.storm
    master = emu.runs["direct"]
    edge = emu.runs["nginx"]
    tiers = {
        "master (stream bytes, run direct)": per_gb(master.master_cpu, master.master_stream_bytes),
        "edge nginx (bytes served, run nginx)": per_gb(edge.nginx_cpu, edge.nginx_bytes),
        "replicas (blocks to cache servers, storm)": per_gb(storm["replica_cpu_seconds"],
                                                           storm["replica_egress_bytes"]),
        "cache servers (blocks to readers, storm)": per_gb(storm["cache_cpu_seconds"], storm["bytes_read"]),
        "cache server (warm, loopback load)": tp["cache"]["cpu_seconds_per_gb"],
        "nginx in front of it (loopback load)": tp["nginx_in_front_of_cache"]["cpu_seconds_per_gb"],
        "replica (warm, loopback load)": tp["replica"]["cpu_seconds_per_gb"],
        "nginx in front of the replica (loopback load)": tp["nginx_in_front_of_replica"]["cpu_seconds_per_gb"],
    }
    yield Result("scale_cpu_seconds_per_gb", tp["cache"]["cpu_seconds_per_gb"] or 0,
                 tp["nginx_in_front_of_cache"]["cpu_seconds_per_gb"] or 0, "CPU s/GB", detail={
                     "what": "CPU seconds per GB served by each tier; the row: a warm cache server against nginx "
                             "serving the same blocks from its cache",
                     "tiers": tiers,
                 })


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    size = "full" if "--full" in argv else "tiny" if "--tiny" in argv else "quick"

    class Context(BenchContext):
        tiny = size == "tiny"

    ctx = Context(Path(tempfile.mkdtemp(prefix="icbd-scale-", dir="/var/tmp")), quick=size != "full")
    try:
        results = list(scale(ctx))
    except NginxMissing as error:
        print(f"scale: {error}", file=sys.stderr)
        return 1
    finally:
        ctx.close()
    print(json.dumps([r.to_json() for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
