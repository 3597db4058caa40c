"""The site cache: what a site knows of its iMIs and the blocks it keeps.

One SiteCache serves a site cache server (cache/server.py) or, embedded, a
single host's FUSE mount. It puts together

- the catalogue of iMIs and versions, polled from the master and kept on
  disk, so a site cut off from the master keeps the last one it saw;
- manifests, fetched once from a replica holding the version (or the
  master), with the same failover as blocks, checked against the
  catalogue's digest and kept on disk;
- blocks: the BlockStore, filled by the Fetcher from the Upstreams;
- boot profiles, read from and recorded to the master, kept on disk too.

It implements icbdcore.source.ImageSource.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from icbdcore.catalog import Catalog, Profile
from icbdcore.clients import Credentials, async_client
from icbdcore.flights import Flights
from icbdcore.layout import Layout
from icbdcore.manifest import MAX_MANIFEST, Manifest
from icbdcore.node import describe_error
from icbdcore.records import read_json, write_bytes, write_json
from icbdcore.source import Unavailable
from icbdcore.wire import (
    IMIS_ROUTE,
    NODES_ROUTE,
    InvalidInput,
    check_name,
    content_digest,
    manifest_path,
    parse_version,
    profile_path,
)

from .blockclient import BlockClient
from .blockstore import BlockStore
from .fetcher import Fetcher, PrefetchProgress
from .upstreams import Upstreams

log = logging.getLogger(__name__)

MANIFESTS_IN_MEMORY = 32
# A manifest may be tens of MiB: 60 s per attempt is 1 MB/s for the largest.
MANIFEST_ATTEMPT = 60.0
MANIFEST_DEADLINE = 180.0
CONTROL_TIMEOUT = 5.0


class SiteCache:
    def __init__(self, data: Path, master_url: str, credentials: Credentials, site: str | None, size_bound: int,
                 *, refresh: float = 2.0):
        self.data = data
        self.master_url = master_url.rstrip("/")
        self.site = site or ""
        self.refresh = refresh
        self.layout = Layout(data)
        self.store = BlockStore(self.layout.blocks, size_bound)
        self.upstreams = Upstreams(self.site, self.layout.upstreams_file, master_url=self.master_url)
        self.client = BlockClient(credentials)
        self.http = async_client(credentials, self.master_url, timeout=CONTROL_TIMEOUT)
        self.fetcher: Fetcher | None = None
        self._catalog = Catalog()
        self._catalog_at = 0.0  # time.monotonic() of the last answer from the master
        self._manifests: OrderedDict[tuple[str, int], tuple[str, Manifest]] = OrderedDict()  # (digest, manifest)
        # One load per manifest digest, however many mounts ask at once.
        self._manifest_loads: Flights[str, bytes] = Flights()
        self.master_reachable = False
        self._polling = trio.Lock()

    @classmethod
    @asynccontextmanager
    async def open(cls, data_dir: Path, master_url: str, credentials: Credentials, site: str | None,
                   size_bound: int, *, refresh: float = 2.0):
        data_dir.mkdir(parents=True, exist_ok=True)
        cache = await trio.to_thread.run_sync(lambda: cls(data_dir, master_url, credentials, site, size_bound,
                                                          refresh=refresh))
        try:
            cache._load()
            async with Fetcher(cache.store, cache.upstreams, cache.client) as fetcher, trio.open_nursery() as nursery:
                cache.fetcher = fetcher
                cache._manifest_loads.attach(nursery)
                await cache.poll_master()
                nursery.start_soon(cache._keep_polling)
                nursery.start_soon(cache.upstreams.keep_probing, cache.client)
                yield cache
                nursery.cancel_scope.cancel()
        finally:
            await cache.http.aclose()
            cache.client.close()
            await trio.to_thread.run_sync(cache.store.close)

    # --- the catalogue and the upstream list ---------------------------------------

    def _load(self) -> None:
        doc = read_json(self.layout.catalog_file)
        if doc is not None:
            try:
                self._catalog = Catalog.from_json(doc)
            except InvalidInput as error:
                log.warning("ignoring %s (%s); waiting for the master's catalogue", self.layout.catalog_file, error)
        self.upstreams.load()

    async def poll_master(self) -> bool:
        """Ask the master for the catalogue and the node list; keep the last
        answers if it does not reply."""
        async with self._polling:
            return await self._poll_master()

    async def _poll_master(self) -> bool:
        try:
            imis = await self.http.get(IMIS_ROUTE)
            imis.raise_for_status()
            nodes = await self.http.get(NODES_ROUTE)
            nodes.raise_for_status()
            catalog = Catalog.from_json(imis.json())
        except (httpx.HTTPError, ValueError, KeyError, TypeError, RecursionError) as error:
            if self.master_reachable:
                log.warning("master unreachable (%s); serving the last catalogue", describe_error(error))
            self.master_reachable = False
            return False
        if not self.master_reachable:
            log.info("master reachable: %d iMIs", len(catalog.imis))
        self.master_reachable = True
        self._catalog_at = time.monotonic()
        self.upstreams.update(nodes.json()["nodes"])
        if catalog != self._catalog:
            self._catalog = catalog
            await trio.to_thread.run_sync(write_json, self.layout.catalog_file, catalog.to_json())
        return True

    async def _keep_polling(self) -> None:
        while True:
            await trio.sleep(self.refresh)
            await self.poll_master()

    async def catalog(self) -> Catalog:
        """The catalogue, refreshed first if it is older than `refresh` and the
        master answers within a second (so a new version shows up at once)."""
        stale = time.monotonic() - self._catalog_at > self.refresh
        if stale and self.master_reachable and not self._polling.locked():
            with trio.move_on_after(1.0):
                await self.poll_master()
        return self._catalog

    def _record(self, imi: str, version: int):
        info = self._catalog.imis.get(check_name(imi))
        record = info.versions.get(parse_version(version)) if info else None
        if record is None:
            raise Unavailable(f"{imi} has no version {version} in the catalogue")
        return record

    # --- manifests ---------------------------------------------------------------------

    async def manifest_bytes(self, imi: str, version: int) -> tuple[bytes, str]:
        """The canonical bytes of a version's manifest and its digest."""
        record = self._record(imi, version)
        flight, _ = self._manifest_loads.fetch(record.digest, lambda: self._load_manifest(imi, version, record.digest))
        await flight.answered.wait()
        return flight.result(), record.digest

    async def _load_manifest(self, imi: str, version: int, digest: str) -> bytes:
        path = self.layout.cached_manifest(imi, version)
        raw = await trio.to_thread.run_sync(_read_if_matches, path, digest)
        if raw is None:
            assert self.fetcher is not None
            raw = await self.fetcher.fetch_object(manifest_path(imi, version), digest, imi=imi, version=version,
                                                  limit=MAX_MANIFEST, attempt_timeout=MANIFEST_ATTEMPT,
                                                  deadline=MANIFEST_DEADLINE)
            await trio.to_thread.run_sync(write_bytes, path, raw)
        return raw

    async def manifest(self, imi: str, version: int) -> Manifest:
        key = (imi, version)
        cached = self._manifests.get(key)
        if cached is not None and cached[0] == self._record(imi, version).digest:
            self._manifests.move_to_end(key)
            return cached[1]
        raw, digest = await self.manifest_bytes(imi, version)
        manifest = await trio.to_thread.run_sync(Manifest.from_bytes, raw, digest)
        self._manifests[key] = (digest, manifest)
        while len(self._manifests) > MANIFESTS_IN_MEMORY:
            self._manifests.popitem(last=False)
        return manifest

    # --- blocks ------------------------------------------------------------------------

    async def block(self, digest: str, imi: str, version: int) -> bytes:
        assert self.fetcher is not None
        return await self.fetcher.get(digest, imi=imi, version=version)

    async def prefetch(self, digests: list[str], imi: str, version: int) -> None:
        assert self.fetcher is not None
        self.fetcher.start_prefetch(digests, imi=imi, version=version, concurrency=16)

    def start_prefetch(self, digests: list[str], imi: str | None, version: int | None,
                       concurrency: int = 16) -> PrefetchProgress:
        assert self.fetcher is not None
        return self.fetcher.start_prefetch(digests, imi=imi, version=version, concurrency=concurrency)

    # --- boot profiles -----------------------------------------------------------------

    async def profile(self, imi: str, version: int) -> Profile | None:
        """The master's profile for this version (or the nearest older one);
        the last one seen when the master is unreachable."""
        path = self.layout.cached_profile(imi, version)
        try:
            response = await self.http.get(profile_path(imi, version))
            if response.status_code == 404:
                return None
            response.raise_for_status()
            profile = Profile.from_json(response.json())
        except httpx.HTTPError:
            doc = await trio.to_thread.run_sync(read_json, path)
            if isinstance(doc, dict):
                return Profile.from_json(doc)
            raise
        await trio.to_thread.run_sync(write_json, path, profile.to_json())
        return profile

    async def save_profile(self, imi: str, version: int, digests: list[str]) -> bool:
        response = await self.http.put(profile_path(imi, version), json={"digests": digests}, timeout=30)
        response.raise_for_status()
        return bool(response.json().get("stored"))

    # --- status ------------------------------------------------------------------------

    def stats(self) -> dict:
        return {
            "master_reachable": self.master_reachable,
            "catalog_age_s": None if not self._catalog_at else round(time.monotonic() - self._catalog_at, 1),
            "store": self.store.stats(),
            "fetcher": self.fetcher.stats() if self.fetcher else {},
        }


def _read_if_matches(path: Path, digest: str) -> bytes | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    if content_digest(raw) != digest:
        log.warning("cached manifest %s is damaged; fetching it again", path)
        return None
    return raw
