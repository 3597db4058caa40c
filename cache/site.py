"""The site cache: what a site knows of its iMIs and the blocks it keeps.

One SiteCache serves a site cache server (cache/server.py) or, embedded, a
single host's FUSE mount. It puts together

- the catalogue of iMIs and versions, polled from the master, believed
  only if the master's key signed it and it is no older than one seen
  (icbdcore/trust.py), and kept on disk, so a site cut off from the master
  keeps the last one it saw (and says how old it is);
- manifests, fetched once from a replica holding the version (or the
  master), with the same failover as blocks, checked against the digest in
  the signed version record and kept on disk;
- blocks: the BlockStore, filled by the Fetcher from the Upstreams, each
  checked against its digest (from a manifest checked as above) on arrival;
- boot profiles, read from and recorded to the master, signed by it, kept
  on disk too (and checked again when read from there).

It implements icbdcore.source.ImageSource.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from icbdcore.catalog import Catalog, Profile
from icbdcore.clients import Credentials, async_client
from icbdcore.flights import Flights
from icbdcore.layout import DATA_FORMAT, Layout
from icbdcore.manifest import MAX_MANIFEST, Manifest
from icbdcore.node import describe_error
from icbdcore.signing import PublicKey, Untrusted
from icbdcore.source import Unavailable
from icbdcore.trust import SignedCatalog, Trust
from icbdcore.wire import (
    IMIS_ROUTE,
    NODES_ROUTE,
    InvalidInput,
    check_name,
    content_digest,
    manifest_object_path,
    parse_version,
    profile_path,
)

from .blockclient import BlockClient
from .blockstore import BlockStore
from .fetcher import Fetcher, PrefetchProgress
from .metastore import META_SHARE, MetaStore
from .upstreams import Upstreams

log = logging.getLogger(__name__)

MANIFESTS_IN_MEMORY = 32
MAX_PROFILE = 16 << 20  # as the master takes them
# A manifest may be tens of MiB: 60 s per attempt is 1 MB/s for the largest.
MANIFEST_ATTEMPT = 60.0
MANIFEST_DEADLINE = 180.0
CONTROL_TIMEOUT = 5.0


class SiteCache:
    def __init__(self, data: Path, master_url: str, credentials: Credentials, site: str | None, size_bound: int,
                 *, refresh: float = 2.0, master_key: PublicKey | None = None, upstreams: list[str] = ()):
        self.data = data
        self.master_url = master_url.rstrip("/")
        self.site = site or ""
        self.refresh = refresh
        self.layout = Layout(data)
        _prepare_folder(self.layout)
        # --size bounds blocks and documents together: the documents (manifests,
        # profiles) get a share, the block store the rest.
        share = size_bound // META_SHARE
        self.store = BlockStore(self.layout.blocks, size_bound - share)
        self.meta = MetaStore([self.layout.cached_manifests, self.layout.cached_profiles], share)
        self.trust = Trust(self.layout, master_key)
        self.upstreams = Upstreams(self.site, self.layout.upstreams_file, master_url=self.master_url,
                                   static=list(upstreams))
        self.client = BlockClient(credentials)
        self.http = async_client(credentials, self.master_url, timeout=CONTROL_TIMEOUT)
        self.fetcher: Fetcher | None = None
        self._catalog = Catalog()
        self.signed: SignedCatalog | None = None  # what _catalog was taken from, as the master signed it
        self._catalog_at = 0.0  # time.monotonic() of the last answer from the master
        self._refusal: str | None = None  # the last reason a catalogue was refused, logged once
        self._manifests: OrderedDict[tuple[str, int], tuple[str, Manifest]] = OrderedDict()  # (digest, manifest)
        # One load per manifest digest, however many mounts ask at once.
        self._manifest_loads: Flights[str, bytes] = Flights()
        self.master_reachable = False
        self._warned = False  # that the master is unreachable, since it last answered
        self._polling = trio.Lock()

    @classmethod
    @asynccontextmanager
    async def open(cls, data_dir: Path, master_url: str, credentials: Credentials, site: str | None,
                   size_bound: int, *, refresh: float = 2.0, master_key: PublicKey | None = None,
                   upstreams: list[str] = ()):
        Layout(data_dir).make_private_root()
        cache = await trio.to_thread.run_sync(lambda: cls(data_dir, master_url, credentials, site, size_bound,
                                                          refresh=refresh, master_key=master_key,
                                                          upstreams=upstreams))
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
        self.signed = self.trust.saved_catalog()
        if self.signed is not None:
            self._catalog = self.signed.catalog
        self.upstreams.load()

    async def poll_master(self) -> bool:
        """Ask the master for the catalogue and the node list; keep the last
        answers if it does not reply."""
        async with self._polling:
            return await self._poll_master()

    async def _poll_master(self) -> bool:
        where = f"the master at {self.master_url}"
        try:
            await self.trust.fetch_key(self.http, where)  # at first contact only, without --master-key
            imis = await self.http.get(IMIS_ROUTE)
            imis.raise_for_status()
            nodes = await self.http.get(NODES_ROUTE)
            nodes.raise_for_status()
            doc, node_list = imis.json(), _node_list(nodes.json())
        except Untrusted as error:  # a key other than the one pinned
            await self._refused(str(error))
            return False
        except (httpx.HTTPError, ValueError, KeyError, TypeError, RecursionError) as error:
            if self.master_reachable or not self._warned:
                log.warning("master unreachable (%s); serving the last catalogue", describe_error(error))
            self.master_reachable = False
            self._warned = True
            return False
        self.master_reachable = True
        self._warned = False
        self._catalog_at = time.monotonic()
        try:
            signed = await trio.to_thread.run_sync(self.trust.catalog, doc)
        except (Untrusted, InvalidInput) as error:
            await self._refused(str(error))
            return False
        if self._refusal is not None or self.signed is None:
            log.info("master reachable: catalogue serial %d, %d iMIs", signed.serial, len(signed.catalog.imis))
        self._refusal = None
        self.upstreams.update(node_list)
        self.signed, self._catalog = signed, signed.catalog
        return True

    async def _refused(self, why: str) -> None:
        """Log a refusal once per reason (a poll every 2 s would repeat it)."""
        if why != self._refusal:
            explained = await self.trust.explain(self.http, f"the master at {self.master_url}")
            log.error("refusing what the master sent: %s%s; serving catalogue serial %s", why,
                      f" ({explained})" if explained else "", self.signed.serial if self.signed else "none")
        self._refusal = why

    async def _keep_polling(self) -> None:
        while True:
            await trio.sleep(self.refresh)
            try:
                await self.poll_master()
                self.trust.freshness()  # logs when the catalogue turns stale, and fresh again
            except Exception:  # whatever the master answers, the site keeps serving
                log.exception("polling the master failed; trying again in %g s", self.refresh)

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
        raw = await trio.to_thread.run_sync(_read_if_matches, self.meta, path, digest)
        if raw is None:
            assert self.fetcher is not None
            raw = await self.fetcher.fetch_object(manifest_object_path(digest), digest, imi=imi, version=version,
                                                  limit=MAX_MANIFEST, attempt_timeout=MANIFEST_ATTEMPT,
                                                  deadline=MANIFEST_DEADLINE)
            await self._keep(path, raw)
        return raw

    async def _keep(self, path: Path, data: bytes) -> None:
        """Keep a document on disk if there is room; served from memory if not."""
        try:
            await trio.to_thread.run_sync(self.meta.write, path, data)
        except OSError as error:
            log.warning("cannot keep %s: %s", path, error.strerror or error)

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

    async def blocks(self, digests: list[str], imi: str | None, version: int | None) -> list[bytes | None]:
        """The blocks in order, None for one unavailable (one batch upstream for the missing)."""
        assert self.fetcher is not None
        return await self.fetcher.get_many(digests, imi=imi, version=version)

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
        the last one seen when the master is unreachable. Raises Untrusted
        for one the master's key did not sign."""
        path = self.layout.cached_profile(imi, version)
        try:
            response = await self.http.get(profile_path(imi, version))
            if response.status_code == 404:
                return None
            response.raise_for_status()
            doc = response.json()
        except httpx.HTTPError:
            raw = await trio.to_thread.run_sync(self.meta.read, path, MAX_PROFILE)
            if raw is not None:
                return self.trust.profile(json.loads(raw), imi, version)
            raise
        profile = self.trust.profile(doc, imi, version)
        await self._keep(path, json.dumps(doc).encode())
        return profile

    async def save_profile(self, imi: str, version: int, digests: list[str]) -> bool:
        response = await self.http.put(profile_path(imi, version), json={"digests": digests}, timeout=30)
        response.raise_for_status()
        return bool(response.json().get("stored"))

    # --- status ------------------------------------------------------------------------

    def status(self) -> dict:
        return {"embedded": str(self.data), **self.stats()}

    def freshness(self) -> dict:
        """How old the catalogue is (now - when the master signed it) and its serial."""
        return self.trust.freshness()

    def stats(self) -> dict:
        return {
            "master_reachable": self.master_reachable,
            "master_heard_s": None if not self._catalog_at else round(time.monotonic() - self._catalog_at, 1),
            **self.freshness(),
            "store": self.store.stats(),
            "documents": self.meta.stats(),
            "fetcher": self.fetcher.stats() if self.fetcher else {},
        }


def _node_list(doc: object) -> list:
    """The node list of a `GET /v1/nodes` answer; InvalidInput if there is none."""
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        raise InvalidInput("the master's node list is not an object with a list of 'nodes'")
    return doc["nodes"]


def _prepare_folder(layout: Layout) -> None:
    """A folder of data format 1 (xxh3 names, unsigned documents) is emptied
    of what it kept: it is a cache. (The block store empties itself.)"""
    found = layout.data_format()
    if found == 1:
        log.warning("%s holds a cache of the old data format 1; dropping its manifests, profiles and "
                    "catalogue (they are fetched again)", layout.root)
        for folder in (layout.cached_manifests, layout.cached_profiles):
            shutil.rmtree(folder, ignore_errors=True)
        layout.catalog_file.unlink(missing_ok=True)
    elif found is not None and found != DATA_FORMAT:
        raise OSError(f"{layout.root} holds data of format {found}; this icbd reads format {DATA_FORMAT}")
    if found != DATA_FORMAT:
        layout.mark_format()


def _read_if_matches(meta: MetaStore, path: Path, digest: str) -> bytes | None:
    raw = meta.read(path, MAX_MANIFEST)
    if raw is None:
        return None
    if content_digest(raw) != digest:
        log.warning("cached manifest %s is damaged; fetching it again", path)
        meta.drop(path)
        return None
    return raw
