"""What Prometheus metrics cost: reads through a mount with metrics on and
off, in the same run, and the size of the master's `/metrics` with 100
nodes registered.

- `metrics_cold_read`: a file read through a fresh mount over an empty site
  cache server (every block from the replica), metrics on: the cache server
  records its fetch latency by upstream and serves /metrics, the mount too
  (--metrics-listen), and both are scraped every second while the file is
  read (Prometheus scrapes every 15 to 60 s). Baseline: the same, metrics
  off (the cache server with --no-metrics, the mount without
  --metrics-listen). The two alternate, the first of each pair switching,
  so a busy moment of the shared host weighs on both. Budget: within 2%.
- `metrics_warm_read`: the second and later reads through the same mounts
  (page cache), on against off. Budget: within 2%.
- `metrics_size_100_nodes`: bytes of the master's `GET /metrics` once 100
  nodes (half replicas subscribed to an iMI, half caches) have registered
  and sent a heartbeat each; baseline: the same master with none. The
  render time is in the detail. No budget.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import requests

from harness.cluster import Cluster, MountProcess, Node, free_port
from harness.data import MIB, drop_caches, write_image

from .context import BenchContext
from .readpath import MOUNT_TIMEOUT, WARM_PAIRS, read_sequentially
from .results import Result, median

BUDGET = 0.98  # within 2% of no metrics
SCRAPE_EVERY = 1.0
NODES = 100


class Scraper:
    """Scrapes URLs every SCRAPE_EVERY seconds in a thread, as Prometheus would (more often)."""

    def __init__(self, urls: list[str]):
        self.urls = urls
        self.scrapes = 0
        self.seconds: list[float] = []
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            for url in self.urls:
                started = time.perf_counter()
                try:
                    response = requests.get(url, timeout=5)
                except requests.RequestException:
                    continue
                self.seconds.append(time.perf_counter() - started)
                self.bytes += len(response.content)
                self.scrapes += 1
            self._stop.wait(SCRAPE_EVERY)


def _mb_s(path: Path, expect: int) -> float:
    size, seconds = read_sequentially(path)
    if size != expect:
        raise RuntimeError(f"read {size} bytes of {path}, expected {expect}")
    return size / seconds / 1e6


def _run(cluster: Cluster, name: str, on: bool, size: int, inside: Path, scratch: Path) -> dict:
    """One cold read and WARM_PAIRS warm reads, metrics `on` or off."""
    cache = cluster.cache(name, site="a", size=f"{2 * size // MIB + 64}M", extra=[] if on else ["--no-metrics"])
    port = free_port()
    mount: MountProcess = cluster.mount(f"{name}-m", cache=cache, timeout=MOUNT_TIMEOUT,
                                        cache_dir=scratch / f"{name}-m-cache",
                                        extra=["--metrics-listen", f"127.0.0.1:{port}"] if on else [])
    try:
        (mount.mountpoint / "img").stat()  # the catalogue is in
        drop_caches()
        scraper = Scraper([cache.url + "/metrics", f"http://127.0.0.1:{port}/metrics"] if on else [])
        with scraper:
            cold = _mb_s(mount.mountpoint / inside, size)
            warm = [_mb_s(mount.mountpoint / inside, size) for _ in range(WARM_PAIRS)]
        return {"cold": cold, "warm": warm, "scrapes": scraper.scrapes,
                "scrape_ms": round(1000 * statistics.median(scraper.seconds), 2) if scraper.seconds else None}
    finally:
        mount.stop()
        cache.stop()


def metrics_cost(ctx: BenchContext) -> list[Result]:
    size = ctx.pick(quick=256 * MIB, full=1 << 30, tiny=24 * MIB)
    pairs = ctx.pick(quick=3, full=5, tiny=1)
    room = f"{2 * size // (1 << 30) + 3}G"
    cluster = ctx.cluster("metrics")
    master = cluster.master(image_size=room)
    replica = cluster.replica("r1", site="a", image_size=room)
    source = ctx.scratch / "metrics-src"
    source.mkdir()
    write_image(source / "disk.img", size)
    cluster.icbd("imi", "create", "img", "--from", str(source))
    cluster.icbd("imi", "publish", "img")
    cluster.icbd("subscribe", "img", "--node", replica.id)
    cluster.wait_held(replica, "img", [1], timeout=600)
    (source / "disk.img").unlink()
    inside = Path("img") / "1" / "disk.img"

    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for pair in range(pairs):
        order = ("on", "off") if pair % 2 == 0 else ("off", "on")
        for mode in order:
            ctx.step(f"pair {pair + 1}/{pairs}: read with metrics {mode}")
            runs[mode].append(_run(cluster, f"{mode}{pair}", mode == "on", size, inside, ctx.scratch))

    cold = {mode: [r["cold"] for r in rows] for mode, rows in runs.items()}
    warm = {mode: [w for r in rows for w in r["warm"]] for mode, rows in runs.items()}
    rounded = {k: {mode: [round(v, 1) for v in values] for mode, values in d.items()}
               for k, d in (("cold", cold), ("warm", warm))}
    # Each pair's own ratio too: a pair's two runs are minutes apart at most.
    pair_ratios = {k: [round(on / off, 4) for on, off in zip(d["on"], d["off"], strict=True)]
                   for k, d in (("cold", cold), ("warm", {m: [r["warm"][-1] for r in runs[m]] for m in runs}))}
    common = {"image_bytes": size, "pairs": pairs, "mb_s": rounded, "pair_ratios": pair_ratios,
              "scrape_every_s": SCRAPE_EVERY,
              "scrapes": [r["scrapes"] for r in runs["on"]], "scrape_ms": [r["scrape_ms"] for r in runs["on"]],
              "observe_us": _observe_cost_us()}
    results = [
        Result("metrics_cold_read", median(cold["on"]), median(cold["off"]), "MB/s", detail={
            "what": f"a {size // MIB} MiB file through a fresh mount over an empty cache server (blocks from the "
                    "replica), the cache server and the mount recording metrics and scraped every second; "
                    "baseline: the same with metrics off (--no-metrics, no --metrics-listen), runs alternating.",
            **common}, target=BUDGET, higher_is_better=True),
        Result("metrics_warm_read", median(warm["on"]), median(warm["off"]), "MB/s", detail={
            "what": "the second and later reads through the same mounts (page cache), metrics on against off.",
            **common}, target=BUDGET, higher_is_better=True),
    ]
    results.append(_size_with_nodes(ctx, cluster, master))
    return results


def _observe_cost_us() -> float:
    """Microseconds of one latency observation (the read path's only added work)."""
    from icbdcore import metrics

    count = 20000
    started = time.perf_counter()
    for i in range(count):
        metrics.observe_fetch("bench-upstream", 0.001 * (i % 50))
    return round((time.perf_counter() - started) / count * 1e6, 3)


def _size_with_nodes(ctx: BenchContext, cluster: Cluster, master: Node) -> Result:
    ctx.step(f"/metrics of the master, then with {NODES} more nodes")
    baseline, _ = _scrape_size(master)
    node_token = cluster.token("node")
    for i in range(NODES):
        role = "replica" if i % 2 == 0 else "cache"
        node_id = f"bench-{role}-{i}"
        site = f"site{i % 20}"
        registered = cluster.api("POST", "/v1/nodes", token=node_token, json={
            "id": node_id, "role": role, "site": site, "url": f"http://node{i}.example.org:7401"})
        registered.raise_for_status()
        if role == "replica":
            cluster.api("POST", "/v1/subscriptions", json={"imi": "img", "node": node_id}).raise_for_status()
        status = {"id": node_id, "role": role, "site": site, "versions": {"img": [1]} if role == "replica" else {},
                  "transfers": [{"imi": "img", "version": 1, "parent": None, "state": "done", "bytes": 1 << 30,
                                 "seconds": 12.5}] if role == "replica" else [],
                  "catalog_serial": 5, "catalog_age_s": 12.0}
        if role == "cache":
            status["fetcher"] = {"hits": 1000, "demand_fetches": 100, "hit_bytes": 1 << 30, "demand_bytes": 1 << 27}
            status["store"] = {"bytes": 1 << 30, "bound": 10 << 30, "evictions": 0}
        cluster.api("POST", f"/v1/nodes/{node_id}/heartbeat", token=node_token, json=status).raise_for_status()
    size, seconds = _scrape_size(master)
    return Result("metrics_size_100_nodes", size, baseline, "bytes", detail={
        "what": f"bytes of the master's GET /metrics with {NODES} nodes registered (half replicas subscribed to "
                "an iMI, half cache servers, one heartbeat each); baseline: the same master with its own "
                "replica only. No budget.",
        "bytes_per_node": round((size - baseline) / NODES), "render_ms": round(1000 * seconds, 1),
        "gzip_bytes": _gzip_size(master)})


def _scrape_size(master: Node) -> tuple[int, float]:
    sizes, times = [], []
    for _ in range(5):
        started = time.perf_counter()
        response = requests.get(master.url + "/metrics", timeout=30)
        times.append(time.perf_counter() - started)
        response.raise_for_status()
        sizes.append(len(response.content))
    return sizes[-1], statistics.median(times)


def _gzip_size(master: Node) -> int:
    import gzip

    return len(gzip.compress(requests.get(master.url + "/metrics", timeout=30).content))
