"""Prometheus metrics: one registry per process, every name defined here.

Every node serves the registry at `GET /metrics` (no credential, like
`GET /`); a mount serves it with `--metrics-listen HOST:PORT`. Names start
with `icbd_` and follow Prometheus's conventions (base units, `_total` on
counters), which `promtool check metrics` enforces; docs/OPERATIONS.md
says what each one answers.

What it costs the read path: almost nothing, by construction. Nearly every
figure is a counter the node keeps anyway for its status (the fetcher's
hits and misses, the block store's evictions, the mount's reads and EIOs);
a node's collector (`NodeCollector`) reads them when Prometheus scrapes, not
when a block moves. The one figure recorded as blocks move is the
histogram of block fetch latency by upstream, one `observe` (about a
microsecond) per block fetched from an upstream, against the milliseconds
of the fetch itself. bench/metrics.py measures reads with metrics on and
off in the same run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.requests import Request
from starlette.responses import Response

log = logging.getLogger(__name__)

PREFIX = "icbd_"

# The process's one registry. Each node or mount adds its collector when it
# starts (NodeCollector) and removes it when it stops.
REGISTRY = CollectorRegistry()
ProcessCollector(namespace="icbd", registry=REGISTRY)  # icbd_process_cpu_seconds_total, ..._resident_memory_bytes


@dataclass(frozen=True)
class Spec:
    kind: str  # gauge | counter
    help: str
    labels: tuple[str, ...] = ()


# Every metric a node's collector reports: name -> what it is. The
# dashboard (contrib/grafana/icbd.json) and docs/OPERATIONS.md use these.
METRICS: dict[str, Spec] = {
    # --- every node and mount
    "icbd_node_info": Spec("gauge", "Always 1; the labels say what this process is", ("node", "role", "site", "version")),
    "icbd_master_reachable": Spec("gauge", "1 while this node's last call to the master was answered"),
    "icbd_catalog_serial": Spec("gauge", "Serial of the newest catalogue the master signed that this node holds"),
    "icbd_catalog_age_seconds": Spec("gauge", "Seconds since the master signed the newest catalogue this node holds"),
    "icbd_catalog_stale": Spec("gauge", "1 when the newest catalogue held is older than the staleness limit"),
    "icbd_catalogs_refused_total": Spec("counter", "Catalogues refused (bad signature, or older than one seen)"),
    # --- the master: the whole system as the name server sees it
    "icbd_node_up": Spec("gauge", "1 if the node's heartbeats arrive (state alive), else 0", ("node", "role", "site")),
    "icbd_node_state": Spec("gauge", "1 for the node's current state (alive, suspect, down)",
                            ("node", "role", "site", "state")),
    "icbd_node_heartbeat_age_seconds": Spec("gauge", "Seconds since the node's last heartbeat",
                                            ("node", "role", "site")),
    "icbd_nodes": Spec("gauge", "Registered nodes, by role and state", ("role", "state")),
    "icbd_imi_latest_version": Spec("gauge", "The version `latest` names, per iMI", ("imi",)),
    "icbd_imi_versions": Spec("gauge", "Published versions kept on the master, per iMI", ("imi",)),
    "icbd_replica_lag_versions": Spec("gauge", "Published versions up to latest that the replica does not hold "
                                      "(0: up to date)", ("node", "site", "imi")),
    "icbd_replica_lag_seconds": Spec("gauge", "Seconds since the oldest version the replica lacks was published "
                                     "(0: up to date)", ("node", "site", "imi")),
    "icbd_site_catalog_age_seconds": Spec("gauge", "Age of the newest catalogue each node holds (as it said in "
                                          "its last heartbeat, plus the time since)", ("node", "role", "site")),
    "icbd_master_streams_running": Spec("gauge", "Version streams the master is producing or sending now"),
    "icbd_master_stream_spool_bytes": Spec("gauge", "Bytes of version streams spooled on the master"),
    "icbd_served_blocks_total": Spec("counter", "Blocks this node served from the versions it holds"),
    "icbd_served_bytes_total": Spec("counter", "Bytes of blocks this node served from the versions it holds"),
    # --- replicas
    "icbd_replica_versions_held": Spec("gauge", "Complete versions this replica holds, per iMI", ("imi",)),
    "icbd_transfers_total": Spec("counter", "Version transfers finished by this replica, by result",
                                 ("imi", "result")),
    "icbd_transfer_bytes_total": Spec("counter", "Stream bytes received over the network by finished transfers",
                                      ("imi",)),
    "icbd_transfer_seconds_total": Spec("counter", "Seconds spent in finished transfers", ("imi",)),
    "icbd_transfers_running": Spec("gauge", "Transfers in progress"),
    "icbd_transfer_running_bytes": Spec("gauge", "Stream bytes received so far by transfers in progress"),
    "icbd_disk_free_bytes": Spec("gauge", "Free bytes on the filesystem of the node's data folder"),
    # --- cache servers (and a mount's embedded cache)
    "icbd_cache_hits_total": Spec("counter", "Block requests served from the store"),
    "icbd_cache_misses_total": Spec("counter", "Block requests fetched from an upstream on demand"),
    "icbd_cache_hit_bytes_total": Spec("counter", "Bytes of block requests served from the store"),
    "icbd_cache_miss_bytes_total": Spec("counter", "Bytes of blocks fetched from an upstream on demand"),
    "icbd_cache_coalesced_total": Spec("counter", "Block requests that joined a fetch already under way"),
    "icbd_cache_prefetched_blocks_total": Spec("counter", "Blocks fetched ahead of any reader (prefetch, profiles)"),
    "icbd_cache_unavailable_total": Spec("counter", "Block requests no upstream could serve in time"),
    "icbd_cache_evictions_total": Spec("counter", "Blocks evicted from the store to stay within its size"),
    "icbd_cache_evicted_bytes_total": Spec("counter", "Bytes of blocks evicted from the store"),
    "icbd_cache_store_bytes": Spec("gauge", "Bytes of blocks in the store"),
    "icbd_cache_store_blocks": Spec("gauge", "Blocks in the store"),
    "icbd_cache_store_capacity_bytes": Spec("gauge", "The store's bound (--size less the documents' share)"),
    "icbd_upstream_failovers_total": Spec("counter", "Fetches retried on another upstream after one failed"),
    "icbd_upstream_requests_total": Spec("counter", "Requests to each upstream", ("upstream",)),
    "icbd_upstream_errors_total": Spec("counter", "Failed requests to each upstream, by kind",
                                       ("upstream", "kind")),
    "icbd_upstream_up": Spec("gauge", "1 unless the upstream is backing off after failures", ("upstream",)),
    # --- mounts
    "icbd_mount_reads_total": Spec("counter", "Read requests the kernel sent to the mount"),
    "icbd_mount_read_bytes_total": Spec("counter", "Bytes the mount returned to readers"),
    "icbd_mount_eio_total": Spec("counter", "Requests answered with EIO (a block not served in time)"),
    "icbd_mount_memory_hits_total": Spec("counter", "Block lookups served from the mount's memory"),
    "icbd_mount_memory_misses_total": Spec("counter", "Block lookups that went to the source"),
    "icbd_mount_memory_bytes": Spec("gauge", "Bytes of whole blocks held in the mount's memory"),
    "icbd_mount_source_blocks_total": Spec("counter", "Blocks fetched from the source (cache servers or replicas)"),
    "icbd_mount_source_bytes_total": Spec("counter", "Bytes fetched from the source"),
    "icbd_mount_source_errors_total": Spec("counter", "Block fetches the source could not serve"),
    "icbd_mount_failovers_total": Spec("counter", "Blocks asked of another source after the first failed"),
    "icbd_mount_replica_fallback_blocks_total": Spec("counter", "Blocks read from the replicas because no cache "
                                                     "server delivered them"),
    "icbd_mount_cache_up": Spec("gauge", "1 while the mount uses this cache server, 0 while it is down",
                                ("cache",)),
    "icbd_mount_cache_blocks_total": Spec("counter", "Blocks each cache server delivered", ("cache",)),
    "icbd_mount_cache_errors_total": Spec("counter", "Failed block requests to each cache server", ("cache",)),
    "icbd_mount_degraded_seconds_total": Spec("counter", "Seconds during which some cache server was down"),
    "icbd_profile_blocks_ready_total": Spec("counter", "Boot-profile blocks that were in memory when first read"),
    "icbd_profile_blocks_late_total": Spec("counter", "Boot-profile blocks first read before they had arrived"),
    "icbd_profile_replays_total": Spec("counter", "Boot profiles replayed"),
}

# Block fetch latency by upstream (the one figure recorded as blocks move).
FETCH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BLOCK_FETCH_SECONDS = Histogram(
    "icbd_block_fetch_seconds",
    "Seconds to fetch one block from an upstream (a replica, the master or a cache server), "
    "successful fetches only",
    ["upstream"], buckets=FETCH_BUCKETS, registry=REGISTRY)

_recording = True


def set_recording(on: bool) -> None:
    """Turn the recording of metrics on the read path on or off for this
    process (off: `--no-metrics`, or a mount without --metrics-listen)."""
    global _recording
    _recording = on


def recording() -> bool:
    return _recording


def observe_fetch(upstream: str, seconds: float) -> None:
    """One block arrived from `upstream` after `seconds`."""
    if _recording:
        BLOCK_FETCH_SECONDS.labels(upstream).observe(seconds)


class Sample:
    """The metric families of one scrape, filled by a node's describe()."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def add(self, name: str, value: float | int | bool | None, **labels: object) -> None:
        """One sample of metric `name` (declared in METRICS); None is left out."""
        if value is None:
            return
        spec = METRICS[name]
        if set(labels) != set(spec.labels):
            raise ValueError(f"{name} takes labels {spec.labels}, got {sorted(labels)}")
        family = self._families.get(name)
        if family is None:
            kind = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
            family = self._families[name] = kind(name, spec.help, labels=list(spec.labels))
        family.add_metric([str(labels[k]) for k in spec.labels], float(value))

    def families(self) -> list[Metric]:
        return list(self._families.values())


class NodeCollector:
    """A collector over a node's own state: `describe(sample)` fills a
    Sample each time Prometheus scrapes. Use as a context manager: it is in
    the registry while the node runs."""

    def __init__(self, describe: Callable[[Sample], None], registry: CollectorRegistry = REGISTRY):
        self._describe = describe  # not `describe`: the registry would take it for the collector's own
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        sample = Sample()
        try:
            self._describe(sample)
        except Exception:  # a scrape must never take the node down, nor fail whole
            log.exception("collecting metrics failed; serving those collected so far")
        yield from sample.families()

    def __enter__(self) -> NodeCollector:
        self.registry.register(self)
        return self

    def __exit__(self, *exc) -> None:
        self.registry.unregister(self)


def render(registry: CollectorRegistry = REGISTRY) -> bytes:
    return generate_latest(registry)


async def endpoint(request: Request) -> Response:
    """`GET /metrics`: the registry in Prometheus's text format."""
    if not _recording:
        return Response(b'{"error":"metrics are off on this node (--no-metrics)"}\n', status_code=404,
                        media_type="application/json")
    return Response(render(), media_type=CONTENT_TYPE_LATEST)


def metrics_app():
    """A web app that serves only `GET /metrics` (a mount's --metrics-listen)."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    from .wire import METRICS_ROUTE

    return Starlette(routes=[Route(METRICS_ROUTE, endpoint, methods=["GET"])])


def describe_catalog(sample: Sample, freshness: dict) -> None:
    """The catalogue figures every node and mount has (icbdcore/trust.py freshness())."""
    sample.add("icbd_catalog_serial", freshness.get("catalog_serial"))
    sample.add("icbd_catalog_age_seconds", freshness.get("catalog_age_s"))
    if freshness.get("catalog_age_s") is not None:
        sample.add("icbd_catalog_stale", bool(freshness.get("catalog_stale")))
    sample.add("icbd_catalogs_refused_total", freshness.get("catalogs_refused"))


def describe_fetcher(sample: Sample, stats: dict) -> None:
    """A Fetcher's counters (cache/fetcher.py stats()): hits, misses, the upstreams."""
    sample.add("icbd_cache_hits_total", stats.get("hits"))
    sample.add("icbd_cache_misses_total", stats.get("demand_fetches"))
    sample.add("icbd_cache_hit_bytes_total", stats.get("hit_bytes"))
    sample.add("icbd_cache_miss_bytes_total", stats.get("demand_bytes"))
    sample.add("icbd_cache_coalesced_total", stats.get("coalesced"))
    sample.add("icbd_cache_prefetched_blocks_total", stats.get("prefetched"))
    sample.add("icbd_cache_unavailable_total", stats.get("unavailable"))
    sample.add("icbd_upstream_failovers_total", stats.get("failovers"))
    for up in stats.get("upstreams") or []:
        name = up.get("id") or up.get("url")
        sample.add("icbd_upstream_requests_total", up.get("requests"), upstream=name)
        errors, corrupt = up.get("errors") or 0, up.get("corrupt") or 0
        # kinds: failed (refused, reset, timed out, 5xx), corrupt (bytes not matching
        # their digest), not_held (404: asked elsewhere at no cost)
        sample.add("icbd_upstream_errors_total", errors - corrupt, upstream=name, kind="failed")
        sample.add("icbd_upstream_errors_total", corrupt, upstream=name, kind="corrupt")
        sample.add("icbd_upstream_errors_total", up.get("not_held"), upstream=name, kind="not_held")
        sample.add("icbd_upstream_up", (up.get("backoff_s") or 0) <= 0, upstream=name)


def describe_store(sample: Sample, stats: dict) -> None:
    """A BlockStore's figures (cache/blockstore.py stats())."""
    sample.add("icbd_cache_store_bytes", stats.get("bytes"))
    sample.add("icbd_cache_store_blocks", stats.get("blocks"))
    sample.add("icbd_cache_store_capacity_bytes", stats.get("bound"))
    sample.add("icbd_cache_evictions_total", stats.get("evictions"))
    sample.add("icbd_cache_evicted_bytes_total", stats.get("evicted_bytes"))


def node_info(sample: Sample, node: str, role: str, site: str) -> None:
    sample.add("icbd_node_info", 1, node=node, role=role, site=site, version=package_version())


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("icbd")
    except PackageNotFoundError:
        return "unknown"

