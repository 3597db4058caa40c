"""Prometheus metrics: every node's `GET /metrics` and a mount's
`--metrics-listen` pass Debian's `promtool check metrics`, and answer the
admin's questions (liveness, replica lag in versions and seconds, transfers,
cache hit ratio and evictions, block fetch latency by upstream, failovers
and EIOs, the catalogue's age at every node, boot-profile blocks ready
before their read) with figures that follow what happened."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
import trio

from harness.cluster import Cluster, free_port, wait_for
from icbdcore import metrics
from icbdcore.catalog import Profile
from icbdfs.profiles import BootProfiles, ProfileOptions

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text as (name, labels) -> value."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        pairs = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels or ""))
        out[(name, pairs)] = float(value)
    return out


def value(samples: dict, name: str, **labels: str) -> float | None:
    wanted = set(labels.items())
    found = [v for (n, pairs), v in samples.items() if n == name and wanted <= set(pairs)]
    return sum(found) if found else None


def promtool_clean(text: str) -> None:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("needs promtool (Debian's prometheus; scripts/install-packages installs it)")
    result = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
        f"promtool: {result.stdout}{result.stderr}"


def scrape(url: str) -> str:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return response.text


def test_every_declared_metric_follows_the_naming_rules():
    for name, spec in metrics.METRICS.items():
        assert name.startswith("icbd_") and re.fullmatch(r"[a-z0-9_]+", name), name
        assert name.endswith("_total") == (spec.kind == "counter"), name
        assert spec.help and not spec.help.endswith(".")
    sample = metrics.Sample()
    sample.add("icbd_cache_hits_total", 3)
    with pytest.raises(ValueError, match="takes labels"):
        sample.add("icbd_node_up", 1, node="x")
    sample.add("icbd_node_up", None, node="x", role="replica", site="a")  # unknown: left out
    assert [f.name for f in sample.families()] == ["icbd_cache_hits"]


def test_every_metric_is_documented():
    text = (REPO / "docs" / "OPERATIONS.md").read_text()
    for name in [*metrics.METRICS, "icbd_block_fetch_seconds", "icbd_process_"]:
        assert f"`{name}" in text, name


def test_the_dashboard_uses_only_metrics_that_exist():
    doc = json.loads((REPO / "contrib" / "grafana" / "icbd.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    known = set(metrics.METRICS) | {"icbd_block_fetch_seconds_bucket"}
    used = {name for expr in exprs for name in re.findall(r"\bicbd_[a-z0-9_]+", expr)}
    assert used <= known, used - known
    # Every admin question of the metrics has a panel.
    for name in ("icbd_node_up", "icbd_replica_lag_versions", "icbd_replica_lag_seconds", "icbd_transfer_bytes_total",
                 "icbd_transfers_total", "icbd_cache_hits_total", "icbd_cache_hit_bytes_total",
                 "icbd_cache_evicted_bytes_total", "icbd_block_fetch_seconds_bucket", "icbd_mount_failovers_total",
                 "icbd_mount_eio_total", "icbd_site_catalog_age_seconds", "icbd_profile_blocks_ready_total"):
        assert name in used, name


async def test_profile_blocks_are_counted_ready_or_late_at_their_first_read():
    class Source:
        async def profile(self, imi, version):
            return Profile(1, ["a" * 64, "b" * 64, "c" * 64, "d" * 64], imi)

        async def prefetch(self, digests, imi, version):
            pass

        async def save_profile(self, imi, version, digests):
            return False

    in_memory = {"b" * 64, "c" * 64}
    stats: Counter[str] = Counter()
    async with trio.open_nursery() as nursery:
        profiles = BootProfiles(Source(), nursery, ProfileOptions(quiet=0.1), stats, held=in_memory.__contains__)
        profiles.first_access("img", 1, frozenset(c * 64 for c in "abcde"))
        await trio.sleep(0.05)  # the replay has the profile
        profiles.touched("img", 1, ["a" * 64, "b" * 64])  # a: not there yet; b: ready
        profiles.touched("img", 1, ["b" * 64, "c" * 64, "e" * 64])  # b again: counted once; e: not in the profile
        nursery.cancel_scope.cancel()
    assert (stats["profile_blocks_ready"], stats["profile_blocks_late"]) == (2, 1)


@pytest.mark.btrfs
@pytest.mark.fuse
def test_every_node_s_metrics_pass_promtool_and_follow_what_happens(tmp_path):
    cluster = Cluster(tmp_path / "c")
    try:
        master = cluster.master()
        replica = cluster.replica("r1", site="a")
        cache = cluster.cache("c1", site="a")
        quiet = cluster.cache("c2", site="a", extra=["--no-metrics"])
        tree = tmp_path / "c" / "tree"
        tree.mkdir()
        content = os.urandom(12 * MIB)  # 12 distinct blocks
        (tree / "disk.img").write_bytes(content)
        cluster.icbd("imi", "create", "img", "--from", str(tree))
        cluster.icbd("imi", "publish", "img")
        cluster.icbd("subscribe", "img", "--node", "r1")
        cluster.wait_held(replica, "img", [1])

        # Two mounts read the same file: the first fills the cache from the
        # replica (misses), the second is served from its store (hits).
        ports = [free_port(), free_port()]
        for name, port, more in zip(("m1", "m2"), ports, ([], ["--no-replica-fallback"]), strict=True):
            mount = cluster.mount(name, cache=cache, extra=["--metrics-listen", f"127.0.0.1:{port}", *more])
            image = mount.mountpoint / "img" / "1" / "disk.img"
            wait_for(image.exists, timeout=30, what="the version in the mount")
            assert image.read_bytes() == content
        wait_for(lambda: cluster.nodes_status()["c1"].get("fetcher", {}).get("hits"), timeout=20,
                 what="the cache's hits in its heartbeat")

        texts = {"master": scrape(master.url + "/metrics"), "replica": scrape(replica.url + "/metrics"),
                 "cache": scrape(cache.url + "/metrics"), "mount": scrape(f"http://127.0.0.1:{ports[1]}/metrics")}
        for text in texts.values():
            promtool_clean(text)
        m, r, c, mnt = (parse(texts[k]) for k in ("master", "replica", "cache", "mount"))

        # Liveness and lag, from the master.
        assert value(m, "icbd_node_up", node="r1", role="replica", site="a") == 1
        assert value(m, "icbd_node_state", node="c1", state="alive") == 1
        assert value(m, "icbd_replica_lag_versions", node="r1", imi="img") == 0
        assert value(m, "icbd_replica_lag_seconds", node="r1", imi="img") == 0
        assert value(m, "icbd_imi_latest_version", imi="img") == 1
        assert 0 <= value(m, "icbd_site_catalog_age_seconds", node="c1") < 180
        # Transfers, at the replica.
        assert value(r, "icbd_transfers_total", imi="img", result="done") == 1
        assert value(r, "icbd_transfer_bytes_total", imi="img") > 12 * MIB
        assert value(r, "icbd_transfer_seconds_total", imi="img") > 0
        assert value(r, "icbd_served_bytes_total") >= 12 * MIB  # the cache filled from it
        assert value(r, "icbd_node_info", node="r1", role="replica", site="a") == 1
        # The cache: misses then hits, blocks and bytes; latency by upstream; fill.
        # (The first mount's readahead has the cache prefetch some blocks: not misses.)
        misses, prefetched = value(c, "icbd_cache_misses_total"), value(c, "icbd_cache_prefetched_blocks_total")
        assert misses >= 1 and misses + prefetched == 12
        assert value(c, "icbd_cache_miss_bytes_total") == misses * MIB
        hits = value(c, "icbd_cache_hits_total")  # every block of the second mount, and some of the first's
        assert hits >= 12 and value(c, "icbd_cache_hit_bytes_total") == hits * MIB
        assert value(c, "icbd_block_fetch_seconds_count", upstream="r1") == 12
        assert value(c, "icbd_cache_store_bytes") >= 12 * MIB
        assert value(c, "icbd_cache_store_capacity_bytes") > value(c, "icbd_cache_store_bytes")
        assert value(c, "icbd_cache_evictions_total") == 0
        assert 0 <= value(c, "icbd_catalog_age_seconds") < 180 and value(c, "icbd_catalog_stale") == 0
        # The mount: reads, its cache server's latency, no EIO yet.
        assert value(mnt, "icbd_mount_read_bytes_total") == 12 * MIB
        assert value(mnt, "icbd_block_fetch_seconds_count", upstream=cache.url) == 12
        assert value(mnt, "icbd_mount_cache_up", cache=cache.url) == 1
        assert value(mnt, "icbd_mount_eio_total") == 0
        assert value(mnt, "icbd_node_info", role="mount", site="") == 1
        # A node may turn metrics off.
        assert requests.get(quiet.url + "/metrics", timeout=10).status_code == 404

        # The replica goes away and a version is published: the master shows
        # it down, one version behind, for longer and longer.
        replica.stop()
        (tree / "disk.img").write_bytes(b"version two" * 1000)
        cluster.icbd("imi", "update", "img", "--from", str(tree))
        cluster.icbd("imi", "publish", "img")
        time.sleep(cluster.down_after + 1.5)
        m = parse(scrape(master.url + "/metrics"))
        assert value(m, "icbd_node_up", node="r1") == 0 and value(m, "icbd_node_state", node="r1", state="down") == 1
        assert value(m, "icbd_replica_lag_versions", node="r1", imi="img") == 1
        assert value(m, "icbd_replica_lag_seconds", node="r1", imi="img") >= cluster.down_after
        assert value(m, "icbd_imi_latest_version", imi="img") == 2

        # A read that no source can serve (its one cache server down, no
        # fallback to the replicas): an EIO, counted.
        cache.stop()
        mount = cluster.mounts[1]
        with pytest.raises(OSError):
            (mount.mountpoint / "img" / "2" / "disk.img").read_bytes()
        assert value(parse(scrape(f"http://127.0.0.1:{ports[1]}/metrics")), "icbd_mount_eio_total") >= 1

        # 100 more nodes registered: the master's metrics grow, and stay clean.
        for i in range(100):
            response = cluster.api("POST", "/v1/nodes", token=cluster.token("node"), json={
                "id": f"extra-{i}", "role": "replica" if i % 2 else "cache", "site": f"s{i % 10}",
                "url": f"http://10.0.{i // 100}.{i % 100 + 1}:7401"})
            assert response.status_code == 201, response.text
        text = scrape(master.url + "/metrics")
        promtool_clean(text)
        assert value(parse(text), "icbd_nodes", role="replica", state="alive") is not None
        print(f"\n/metrics of the master with {len(cluster.nodes_status()) - 1} nodes: {len(text)} bytes")
    finally:
        cluster.stop_all()
