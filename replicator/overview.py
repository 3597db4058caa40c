"""The whole system as the master sees it, for people and for Prometheus:
every site with its nodes and their state, the versions each replica holds
against `latest` (its lag, in versions and seconds, per iMI), the transfers
under way with their progress, and each cache's hit ratio and fill.

Built from the master's own records (iMIs and versions, stream spools) and
from what each node said in its last heartbeat. `overview()` is the
document behind the status page (`GET /ui/status`, open like `GET /`, so it
holds what `GET /` of the nodes shows and nothing secret: no tokens, no
keys, no paths); `describe()` turns the same facts into metrics.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from icbdcore.metrics import Sample

from .nameserver import ALIVE, DOWN, SUSPECT, NameServer
from .repository import Imi

TRANSFERS_SHOWN = 6  # per node: the running ones, then the most recent


@dataclass(frozen=True)
class Lag:
    """How far a replica is behind on one iMI."""

    versions: int  # published versions up to latest it does not hold
    seconds: float  # since the oldest of those was published
    latest: int | None
    newest_held: int | None


def lag_of(imi: Imi, held: list[int], now: datetime | None = None) -> Lag:
    """A replica holding `held` of `imi`: 0 when it holds latest; else the
    versions after the newest it holds up to latest, and how long ago the
    first of them was published."""
    latest = imi.latest
    newest = max((v for v in held if latest is None or v <= latest), default=None)
    if latest is None or latest in held:
        return Lag(0, 0.0, latest, newest)
    missing = sorted(v for v in imi.versions if (newest or 0) < v <= latest)
    if not missing:
        return Lag(0, 0.0, latest, newest)
    created = imi.versions[missing[0]].created
    seconds = 0.0
    with contextlib.suppress(TypeError, ValueError):  # a record without a readable time: no age
        seconds = max(0.0, ((now or datetime.now(UTC)) - datetime.fromisoformat(created)).total_seconds())
    return Lag(len(missing), round(seconds, 1), latest, newest)


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def cache_figures(status: dict) -> dict | None:
    """Hit ratio (blocks and bytes) and fill of a cache server, from its status."""
    fetcher, store = status.get("fetcher"), status.get("store")
    if not isinstance(fetcher, dict) or not isinstance(store, dict):
        return None
    hits, misses = _number(fetcher.get("hits")), _number(fetcher.get("demand_fetches"))
    hit_bytes, miss_bytes = _number(fetcher.get("hit_bytes")), _number(fetcher.get("demand_bytes"))
    used, bound = _number(store.get("bytes")), _number(store.get("bound"))
    return {
        "hits": hits, "misses": misses, "hit_bytes": hit_bytes, "miss_bytes": miss_bytes,
        "hit_ratio_blocks": _ratio(hits, hits + misses), "hit_ratio_bytes": _ratio(hit_bytes, hit_bytes + miss_bytes),
        "store_bytes": used, "store_capacity_bytes": bound, "fill": _ratio(used, bound),
        "evictions": _number(store.get("evictions")),
    }


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _transfers(node_status: dict, spools: dict) -> list[dict]:
    """A node's transfers, running first, each with the stream's total size
    when the master knows it (its spool is complete)."""
    out = []
    listed = node_status.get("transfers")
    for t in listed if isinstance(listed, list) else []:
        if not isinstance(t, dict):
            continue
        total = spools.get((t.get("imi"), t.get("version"), t.get("parent")))
        doc = {k: t.get(k) for k in ("imi", "version", "parent", "state", "bytes", "seconds", "error")}
        doc["total"] = total
        if t.get("state") == "running" and total:
            doc["progress"] = round(min(1.0, _number(t.get("bytes")) / total), 4)
        out.append(doc)
    running = [t for t in out if t["state"] == "running"]
    rest = [t for t in out if t["state"] != "running"]
    return (running + rest[::-1])[:max(TRANSFERS_SHOWN, len(running))]


class Overview:
    """The facts of the status page and of the master's metrics."""

    def __init__(self, master):
        self.master = master  # replicator.master.Master (duck-typed: names, repo, spools, self_description)

    @property
    def names(self) -> NameServer:
        return self.master.names

    def _spool_sizes(self) -> dict:
        return {(s.name, s.version, s.parent): s.size for s in self.master.spools.all() if s.complete}

    def nodes(self) -> list[dict]:
        """Every node, the master first, with state, versions, lag, transfers, cache figures."""
        master = self.master
        now_mono, now = time.monotonic(), datetime.now(UTC)
        imis = master.repo.imis
        spools = self._spool_sizes()
        me = master.self_description()
        out = [{
            "id": me["id"], "role": "master", "site": me["site"], "url": me["url"], "state": ALIVE,
            "heartbeat_age_s": 0.0, "versions": me["versions"], "lag": {}, "transfers": [],
            "catalog_serial": me.get("catalog_serial"), "catalog_age_s": self.master.catalogue_age(),
        }]
        for node in sorted(self.names.nodes.values(), key=lambda n: (n.site, n.role, n.id)):
            status = node.status if isinstance(node.status, dict) else {}
            versions = status.get("versions") if isinstance(status.get("versions"), dict) else {}
            silence = None if node.last_seen is None else now_mono - node.last_seen
            age = status.get("catalog_age_s")
            if isinstance(age, int | float) and not isinstance(age, bool) and silence is not None:
                age = round(age + silence, 1)  # as the node reported it, plus the time since
            doc = {
                "id": node.id, "role": node.role, "site": node.site, "url": node.url,
                "state": self.names.state(node, now_mono),
                "heartbeat_age_s": None if silence is None else round(silence, 1),
                "versions": {k: v for k, v in versions.items() if isinstance(v, list)},
                "catalog_serial": status.get("catalog_serial"),
                "catalog_age_s": age,
                "master_reachable": status.get("master_reachable"),
            }
            if node.role == "replica":
                wanted = set(self.names.subscriptions_of(node.id)) | set(doc["versions"])
                lags = {}
                for name in sorted(wanted):
                    if name in imis:
                        lag = lag_of(imis[name], [v for v in doc["versions"].get(name, []) if isinstance(v, int)], now)
                        lags[name] = {"versions": lag.versions, "seconds": lag.seconds, "latest": lag.latest,
                                      "newest_held": lag.newest_held}
                doc["lag"] = lags
                doc["transfers"] = _transfers(status, spools)
            else:
                doc["lag"], doc["transfers"] = {}, []
            if node.role == "cache":
                doc["cache"] = cache_figures(status)
            out.append(doc)
        return out

    def document(self) -> dict:
        """`GET /ui/status`: sites and their nodes, iMIs and their versions."""
        nodes = self.nodes()
        sites: dict[str, list[dict]] = {}
        for node in nodes:
            sites.setdefault(node["site"], []).append(node)
        imis = []
        for name, imi in sorted(self.master.repo.imis.items()):
            imis.append({"name": name, "latest": imi.latest, "versions": [
                {"version": v, "created": r.created, "bytes": r.bytes} for v, r in sorted(imi.versions.items())]})
        return {
            "generated": datetime.now(UTC).isoformat(timespec="seconds"),
            "master": {"url": self.master.url, "catalog_serial": self.master.catalogue.serial},
            "imis": imis,
            "sites": [{"name": site, "nodes": members} for site, members in sorted(sites.items())],
            "counts": {state: sum(1 for n in nodes if n["state"] == state) for state in (ALIVE, SUSPECT, DOWN)},
        }

    def describe(self, sample: Sample) -> None:
        """The master's metrics: liveness of every node, lag per replica and
        iMI, the catalogue's age at every node, the iMIs."""
        counts: dict[tuple[str, str], int] = {}
        for node in self.nodes():
            labels = {"node": node["id"], "role": node["role"], "site": node["site"]}
            if node["role"] != "master":
                sample.add("icbd_node_up", node["state"] == ALIVE, **labels)
                for state in (ALIVE, SUSPECT, DOWN):
                    sample.add("icbd_node_state", node["state"] == state, **labels, state=state)
                sample.add("icbd_node_heartbeat_age_seconds", node["heartbeat_age_s"], **labels)
                counts[(node["role"], node["state"])] = counts.get((node["role"], node["state"]), 0) + 1
            age = node.get("catalog_age_s")
            if isinstance(age, int | float) and not isinstance(age, bool):
                sample.add("icbd_site_catalog_age_seconds", age, **labels)
            for name, lag in node["lag"].items():
                sample.add("icbd_replica_lag_versions", lag["versions"], node=node["id"], site=node["site"], imi=name)
                sample.add("icbd_replica_lag_seconds", lag["seconds"], node=node["id"], site=node["site"], imi=name)
        for role in ("replica", "cache"):
            for state in (ALIVE, SUSPECT, DOWN):
                sample.add("icbd_nodes", counts.get((role, state), 0), role=role, state=state)
        for name, imi in sorted(self.master.repo.imis.items()):
            sample.add("icbd_imi_latest_version", imi.latest, imi=name)
            sample.add("icbd_imi_versions", len(imi.versions), imi=name)
