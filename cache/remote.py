"""A site cache server seen from a mount: icbdcore.source.ImageSource over HTTP.

Control calls (catalogue, manifests, profiles) go through httpx; blocks go
through the BlockClient (urllib3 in worker threads, verified on arrival), the
same path a cache uses to fill from replicas. The last catalogue is kept, so
the mount's view survives a restart of the cache server.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import httpx
import trio

from icbdcore.catalog import Catalog, Profile
from icbdcore.clients import Credentials, async_client, tls_failure
from icbdcore.manifest import Manifest
from icbdcore.source import Unavailable
from icbdcore.wire import (
    IMIS_ROUTE,
    PREFETCH_ROUTE,
    check_name,
    manifest_path,
    parse_version,
    profile_path,
)

from .blockclient import BlockClient, FetchFailure

log = logging.getLogger(__name__)

CONTROL_TIMEOUT = 10.0


class RemoteCache:
    def __init__(self, url: str, credentials: Credentials, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.http = async_client(credentials, self.url, timeout=CONTROL_TIMEOUT)
        # A fetch gives up at `timeout`, the mount's own bound, so the worker
        # thread (which trio cannot interrupt) frees its connection slot then too;
        # enough slots that reads stuck on an unreachable block do not starve
        # reads of blocks the cache server holds.
        self.client = BlockClient(credentials, connections=64, read_timeout=timeout)
        self._catalog: Catalog | None = None

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str, credentials: Credentials, timeout: float = 10.0):
        remote = cls(url, credentials, timeout)
        try:
            yield remote
        finally:
            await remote.http.aclose()
            remote.client.close()

    async def catalog(self) -> Catalog:
        try:
            response = await self.http.get(IMIS_ROUTE)
            response.raise_for_status()
            self._catalog = Catalog.from_json(response.json())
        except (httpx.HTTPError, ValueError, KeyError) as error:
            if self._catalog is None:
                raise Unavailable(f"cannot reach the cache server at {self.url}: {_why(error)}") from None
            log.debug("cache server unreachable (%s); keeping the last catalogue", error)
        return self._catalog

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
        return Profile.from_json(response.json())

    async def save_profile(self, imi: str, version: int, digests: list[str]) -> bool:
        response = await self.http.put(profile_path(imi, version), json={"digests": digests}, timeout=30)
        response.raise_for_status()
        return bool(response.json().get("stored"))


def _why(error: Exception) -> str:
    """One line on why the cache server did not answer as it should."""
    if isinstance(error, httpx.HTTPStatusError):
        status = error.response.status_code
        hint = {401: ": unknown or revoked token (check --token-file)",
                403: ": the token lacks the reader role"}.get(status, "")
        return f"it answered {status}{hint}"
    return tls_failure(error) or str(error) or type(error).__name__
