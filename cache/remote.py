"""A site cache server seen from a mount: icbdcore.source.ImageSource over HTTP.

Control calls (catalogue, manifests, profiles) go through httpx; blocks go
through the BlockClient (urllib3 in worker threads, verified on arrival), the
same path a cache uses to fill from replicas. The last catalogue is kept in
memory, so the mount's view survives a restart of the cache server; the
master's key and the highest catalogue serial seen are kept on disk (the
mount's --cache-dir), so a replayed older catalogue is refused after a restart
of the mount too. (The catalogue itself is not: without its cache server a
mount has no blocks to serve, so it does not start on a catalogue alone.)

The cache server is not trusted: the catalogue must be signed by the
master's key and no older than one the mount has seen, each manifest must
have the digest of the signed version record, each block the digest the
manifest gives, each boot profile the master's signature (icbdcore/trust.py).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import httpx
import trio

from icbdcore.catalog import Catalog, Profile
from icbdcore.clients import Credentials, async_client
from icbdcore.layout import Layout
from icbdcore.manifest import Manifest
from icbdcore.signing import PublicKey, Untrusted
from icbdcore.source import Unavailable
from icbdcore.trust import Trust
from icbdcore.wire import (
    IMIS_ROUTE,
    PREFETCH_ROUTE,
    InvalidInput,
    check_name,
    manifest_path,
    parse_version,
    profile_path,
)

from .blockclient import BlockClient, FetchFailure

log = logging.getLogger(__name__)

CONTROL_TIMEOUT = 10.0


class RemoteCache:
    def __init__(self, url: str, token: str, timeout: float = 10.0, *, trust: Trust):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.trust = trust
        self.http = async_client(Credentials(token), self.url, timeout=CONTROL_TIMEOUT)
        # A fetch gives up at `timeout`, the mount's own bound, so the worker
        # thread (which trio cannot interrupt) frees its connection slot then too;
        # enough slots that reads stuck on an unreachable block do not starve
        # reads of blocks the cache server holds.
        self.client = BlockClient(token, connections=64, read_timeout=timeout)
        self._catalog: Catalog | None = None
        self._refusal: str | None = None

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str, token: str, timeout: float = 10.0, *, state_dir: Path,
                   master_key: PublicKey | None = None):
        """`state_dir` keeps the master's key and the highest serial seen (the mount's --cache-dir)."""
        state_dir.mkdir(parents=True, exist_ok=True)
        trust = await trio.to_thread.run_sync(partial(Trust, Layout(state_dir), master_key, keep_catalog=False))
        remote = cls(url, token, timeout, trust=trust)
        try:
            yield remote
        finally:
            await remote.http.aclose()
            remote.client.close()

    async def catalog(self) -> Catalog:
        where = f"the cache server at {self.url}"
        try:
            await self.trust.fetch_key(self.http, where)
            response = await self.http.get(IMIS_ROUTE)
            response.raise_for_status()
            signed = await trio.to_thread.run_sync(self.trust.catalog, response.json())
            self._catalog = signed.catalog
            self._refusal = None
        except (Untrusted, InvalidInput) as error:
            if str(error) != self._refusal:
                explained = await self.trust.explain(self.http, where)
                log.error("refusing the catalogue from %s: %s%s", where, error,
                          f" ({explained})" if explained else "")
            self._refusal = str(error)
            if self._catalog is None:
                raise Unavailable(f"refusing the catalogue from {where}: {error}") from None
        except (httpx.HTTPError, ValueError, KeyError) as error:
            if self._catalog is None:
                raise Unavailable(f"cannot reach the cache server at {self.url}: {error}") from None
            log.debug("cache server unreachable (%s); keeping the last catalogue", error)
        self.trust.freshness()  # logs when the catalogue turns stale, and fresh again
        return self._catalog

    def freshness(self) -> dict:
        """How old the catalogue is (now - when the master signed it) and its serial."""
        return self.trust.freshness()

    async def manifest(self, imi: str, version: int) -> Manifest:
        catalog = self._catalog or await self.catalog()
        info = catalog.imis.get(check_name(imi))
        record = info.versions.get(parse_version(version)) if info else None
        if record is None:
            raise Unavailable(f"{imi} has no version {version}")
        try:
            response = await self.http.get(manifest_path(imi, version), timeout=60)
            response.raise_for_status()
        except httpx.HTTPError as error:
            raise Unavailable(f"manifest of {imi} v{version}: {error}") from None
        return await trio.to_thread.run_sync(Manifest.from_bytes, response.content, record.digest)

    async def block(self, digest: str, imi: str, version: int) -> bytes:
        try:
            return await self.client.fetch(self.url, digest, imi=imi, version=version, timeout=self.timeout)
        except FetchFailure as error:
            raise Unavailable(str(error)) from None

    async def prefetch(self, digests: list[str], imi: str, version: int) -> None:
        try:
            response = await self.http.post(PREFETCH_ROUTE, json={"blocks": digests, "imi": imi, "version": version})
            response.raise_for_status()
        except httpx.HTTPError as error:
            log.info("prefetch request to the cache server failed: %s", error)

    async def profile(self, imi: str, version: int) -> Profile | None:
        response = await self.http.get(profile_path(imi, version))
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return self.trust.profile(response.json(), imi, version)

    async def save_profile(self, imi: str, version: int, digests: list[str]) -> bool:
        response = await self.http.put(profile_path(imi, version), json={"digests": digests}, timeout=30)
        response.raise_for_status()
        return bool(response.json().get("stored"))
