"""Choosing where to fill a block from: the static upstreams given on the
command line (`--upstream URL`: HTTP caches such as a site Squid, an nginx
in front of a replica, a CDN), then the live replicas the master lists,
best first, with a memory of which failed.

Order of candidates for a block (hinted with an iMI version):

1. healthy static upstreams, in the order given: a shared cache holds what
   another cache server of the site already fetched, and asks a replica
   itself when it does not;
2. healthy replicas, ranked by: holds the hinted version, same site, then
   round-trip time (EWMA of pings and of small-block fetches; unmeasured last);
3. the master, if known: it serves blocks too, but is the last resort, so a
   boot storm lands on the site's replicas, not on the centre;
4. upstreams backing off after a failure, soonest retry first: tried only when
   every healthy one failed or lacks the block, so one lost packet does not
   leave a desktop with EIO for the whole backoff period.

A static upstream is an HTTP cache, not a node: it is taken to hold every
version (a 404 from it costs nothing, as from a replica), it is never saved
in the candidate list, and what it sends is checked like anything else (a
cache that serves a damaged block backs off as a replica would).

Failure memory: each host failure doubles the backoff (1 s, 2 s, ... 60 s);
corrupt data counts as three failures; one success clears it.

The candidate list is saved (tmp + rename) whenever the master's list
changes, and loaded at start, so a restarted cache keeps filling from its
replicas while the master is unreachable.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from icbdcore.records import read_json, write_json

from .blockclient import BlockClient, FetchFailure

log = logging.getLogger(__name__)

BACKOFF_FIRST = 1.0
BACKOFF_CAP = 60.0
CORRUPT_WEIGHT = 3  # corrupt data is a worse sign than a timeout: back off as if it failed three times
RTT_ALPHA = 0.3  # weight of a new sample in the EWMA
RTT_SAMPLE_MAX_BYTES = 64 << 10  # fetches of bigger blocks measure bandwidth more than round trips
STATIC = "static"  # the role of an upstream given on the command line (an HTTP cache)


@dataclass
class Upstream:
    id: str
    url: str
    role: str
    site: str
    versions: dict[str, list[int]] = field(default_factory=dict)
    rtt: float | None = None  # seconds, EWMA
    failures: int = 0  # weighted, since the last success
    retry_at: float = 0.0  # clock() before which the upstream is backing off
    requests: int = 0
    bytes: int = 0
    errors: int = 0
    corrupt: int = 0
    not_held: int = 0
    batches: bool = True  # False once it answered a batch of blocks 404 (an HTTP cache in front of a node)

    def holds(self, imi: str | None, version: int | None) -> bool:
        if imi is None or self.role == STATIC:
            return True
        held = self.versions.get(imi, [])
        return version in held if version is not None else bool(held)

    def registration(self) -> dict:
        return {"id": self.id, "url": self.url, "role": self.role, "site": self.site, "versions": self.versions}

    def describe(self, now: float) -> dict:
        return {
            **self.registration(),
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 2),
            "backoff_s": round(max(0.0, self.retry_at - now), 1),
            "requests": self.requests,
            "bytes": self.bytes,
            "errors": self.errors,
            "corrupt": self.corrupt,
            "not_held": self.not_held,
            "batches": self.batches,
        }


def _usable(doc: object) -> dict | None:
    """A node from the master's list as a candidate, or None if it is not one."""
    if not isinstance(doc, dict):
        return None
    role, url = doc.get("role"), doc.get("url")
    if role not in ("replica", "master") or doc.get("state", "alive") != "alive":
        return None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return None
    versions = doc.get("versions") or {}
    if not isinstance(versions, dict):
        versions = {}
    clean = {
        str(imi): sorted(v for v in held if isinstance(v, int))
        for imi, held in versions.items()
        if isinstance(held, list)
    }
    return {"id": str(doc.get("id", url)), "url": url.rstrip("/"), "role": role,
            "site": str(doc.get("site", "")), "versions": clean}


class Upstreams:
    def __init__(
        self,
        site: str | None,
        path: Path | None = None,
        *,
        master_url: str | None = None,
        static: list[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ):
        self.site = site
        self.path = path
        self._static = [Upstream(url.rstrip("/"), url.rstrip("/"), STATIC, site or "") for url in static]
        # The master from the command line, for when its own list does not name it.
        self._fallback_master = (
            Upstream("master", master_url.rstrip("/"), "master", "") if master_url else None
        )
        self.clock = clock
        self._by_id: dict[str, Upstream] = {}
        self._saved: list[dict] | None = None
        if path is not None:
            self.load()

    # --- the list ------------------------------------------------------------

    def load(self) -> bool:
        """Take the saved candidate list; False if there is none (or it is unreadable)."""
        try:
            doc = read_json(self.path, None)
        except (OSError, ValueError) as error:
            log.warning("upstream list %s unreadable (%s); waiting for the master's", self.path, error)
            return False
        if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
            return False
        self._replace([n for n in map(_usable, doc["nodes"]) if n is not None])
        self._saved = [u.registration() for u in self._by_id.values()]
        log.info("loaded %d upstreams from %s", len(self._by_id), self.path)
        return True

    def update(self, nodes: list[dict]) -> None:
        """Take the master's node list (`GET /v1/nodes` -> "nodes"); keep what
        is known of nodes that stay; save the list if it changed."""
        self._replace([n for n in map(_usable, nodes) if n is not None])
        current = [u.registration() for u in self._by_id.values()]
        if current != self._saved and self.path is not None:
            try:
                write_json(self.path, {"nodes": current})
                self._saved = current
            except OSError as error:
                log.warning("cannot save the upstream list to %s: %s", self.path, error)

    def _replace(self, docs: list[dict]) -> None:
        fresh: dict[str, Upstream] = {}
        for doc in docs:
            old = self._by_id.get(doc["id"])
            if old is not None and old.url == doc["url"]:
                old.role, old.site, old.versions = doc["role"], doc["site"], doc["versions"]
                fresh[doc["id"]] = old
            else:
                fresh[doc["id"]] = Upstream(**doc)
        gone = set(self._by_id) - set(fresh)
        added = set(fresh) - set(self._by_id)
        if gone or added:
            log.info("upstreams: %d (added %s, gone %s)", len(fresh), sorted(added) or "-", sorted(gone) or "-")
        self._by_id = fresh

    def __len__(self) -> int:
        return len(self._static) + len(self._by_id)

    def all(self) -> list[Upstream]:
        return [*self._static, *self._by_id.values()]

    def _master(self) -> Upstream | None:
        for up in self._by_id.values():
            if up.role == "master":
                return up
        return self._fallback_master

    # --- choosing ------------------------------------------------------------

    def candidates(self, imi: str | None = None, version: int | None = None) -> list[Upstream]:
        """Where to ask for a block of `imi` `version`, best first (see the module doc)."""
        now = self.clock()
        replicas = [u for u in self._by_id.values() if u.role == "replica"]
        healthy = [u for u in replicas if u.retry_at <= now]
        healthy.sort(key=lambda u: (
            not u.holds(imi, version),
            self.site is not None and u.site != self.site,
            u.rtt if u.rtt is not None else math.inf,
        ))
        master = self._master()
        tail = [u for u in [*self._static, *replicas] if u.retry_at > now]
        ordered = [u for u in self._static if u.retry_at <= now] + healthy
        if master is not None:
            (ordered if master.retry_at <= now else tail).append(master)
        tail.sort(key=lambda u: u.retry_at)
        return ordered + tail

    def nearest(self, imi: str | None = None, version: int | None = None) -> Upstream | None:
        found = self.candidates(imi, version)
        return found[0] if found else None

    # --- what happened -------------------------------------------------------

    def succeeded(self, up: Upstream, seconds: float, size: int) -> None:
        up.requests += 1
        up.bytes += size
        up.failures = 0
        up.retry_at = 0.0
        if size <= RTT_SAMPLE_MAX_BYTES:
            self.measured(up, seconds)

    def measured(self, up: Upstream, seconds: float) -> None:
        up.rtt = seconds if up.rtt is None else (1 - RTT_ALPHA) * up.rtt + RTT_ALPHA * seconds

    def failed(self, up: Upstream, error: FetchFailure) -> None:
        """Note a failed request: NotHeld costs nothing, the rest back off."""
        up.requests += 1
        if error.kind == "not_held":
            up.not_held += 1
            return
        weight = CORRUPT_WEIGHT if error.kind == "corrupt" else 1
        up.errors += 1
        up.corrupt += error.kind == "corrupt"
        first = up.failures == 0
        up.failures += weight
        backoff = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (up.failures - 1))
        up.retry_at = self.clock() + backoff
        (log.warning if first else log.debug)(
            "upstream %s failed (%s); skipping it for %.0f s", up.id, error, backoff
        )

    async def probe(self, client: BlockClient, timeout: float = 2.0) -> None:
        """Ping every node upstream once (`GET /`), concurrently, to measure round trips."""

        async def one(up: Upstream) -> None:
            try:
                self.measured(up, await client.ping(up.url, timeout=timeout))
            except FetchFailure as error:
                self.failed(up, error)

        async with trio.open_nursery() as nursery:
            for up in self._by_id.values():  # not the static ones: an HTTP cache has no status page
                nursery.start_soon(one, up)

    async def keep_probing(self, client: BlockClient, interval: float = 15.0) -> None:
        """Probe forever (run it in the owner's nursery)."""
        while True:
            await self.probe(client)
            await trio.sleep(interval)

    def stats(self) -> dict:
        now = self.clock()
        return {"site": self.site, "upstreams": [u.describe(now) for u in self.candidates()]}

