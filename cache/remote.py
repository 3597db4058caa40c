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
from icbdcore.clients import Credentials, async_client, tls_failure
from icbdcore.layout import Layout
from icbdcore.manifest import MAX_MANIFEST, Manifest, VersionRecord
from icbdcore.signing import PublicKey, Untrusted
from icbdcore.source import Unavailable
from icbdcore.trust import Trust
from icbdcore.wire import (
    IMIS_ROUTE,
    MAX_BATCH,
    PREFETCH_ROUTE,
    InvalidInput,
    check_name,
    manifest_object_path,
    parse_version,
    profile_path,
)

from .blockclient import BlockClient, FetchFailure

log = logging.getLogger(__name__)

CONTROL_TIMEOUT = 10.0


class CatalogRefused(Unavailable):
    """The cache server answered with a catalogue the mount does not believe
    (not the master's key, older than one seen): it is up, but not a source
    of catalogues now."""


async def open_trust(state_dir: Path, master_key: PublicKey | None) -> Trust:
    """A mount's trust, kept in its --cache-dir (no catalogue kept: without a
    cache server a mount has no blocks to serve)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    return await trio.to_thread.run_sync(partial(Trust, Layout(state_dir), master_key, keep_catalog=False))


class RemoteCache:
    def __init__(self, url: str, credentials: Credentials, timeout: float = 10.0, *, trust: Trust):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.trust = trust
        self.http = async_client(credentials, self.url, timeout=CONTROL_TIMEOUT)
        # A fetch gives up at `timeout`, the mount's own bound, so the worker
        # thread (which trio cannot interrupt) frees its connection slot then too;
        # enough slots that reads stuck on an unreachable block do not starve
        # reads of blocks the cache server holds.
        self.client = BlockClient(credentials, connections=64, read_timeout=timeout)
        self._catalog: Catalog | None = None
        self._refusal: str | None = None

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str, credentials: Credentials, timeout: float = 10.0, *,
                   state_dir: Path | None = None, master_key: PublicKey | None = None,
                   trust: Trust | None = None):
        """A client of the cache server at `url`. Its trust is `trust` (shared
        by a mount's cache servers), else one kept in `state_dir` (the mount's
        --cache-dir: the master's key and the highest serial seen)."""
        if trust is None:
            if state_dir is None:
                raise ValueError("a cache client needs a trust or a folder to keep one in")
            trust = await open_trust(state_dir, master_key)
        remote = cls(url, credentials, timeout, trust=trust)
        try:
            yield remote
        finally:
            await remote.http.aclose()
            remote.client.close()

    async def catalog(self) -> Catalog:
        """The cache server's catalogue; the last one when it does not answer
        or answers with one the mount refuses."""
        try:
            return await self.fresh_catalog()
        except Unavailable as error:
            if self._catalog is None:
                raise
            log.debug("%s; keeping the last catalogue", error)
        return self._catalog

    async def fresh_catalog(self) -> Catalog:
        """The cache server's catalogue now; raises Unavailable if it does not
        answer or its catalogue is refused (icbdcore/trust.py)."""
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
            raise CatalogRefused(f"refusing the catalogue from {where}: {error}") from None
        except (httpx.HTTPError, ValueError, KeyError) as error:
            raise Unavailable(f"cannot reach the cache server at {self.url}: {_why(error)}") from None
        self.trust.freshness()  # logs when the catalogue turns stale, and fresh again
        return self._catalog

    def freshness(self) -> dict:
        """How old the catalogue is (now - when the master signed it) and its serial."""
        return self.trust.freshness()

    async def upstream_list(self) -> list[dict]:
        """The replicas (and master) the cache server fills from, from its status."""
        response = await self.http.get("/")
        response.raise_for_status()
        fetcher = response.json().get("fetcher")
        upstreams = fetcher.get("upstreams") if isinstance(fetcher, dict) else None
        if not isinstance(upstreams, list):
            raise ValueError("the cache server's status lists no upstreams")
        return upstreams

    def status(self) -> dict:
        return {"cache": self.url}

    async def manifest(self, imi: str, version: int, record: VersionRecord | None = None) -> Manifest:
        """The manifest of a version, checked against `record` (the signed
        version record), or against this cache server's own catalogue."""
        if record is None:
            catalog = self._catalog or await self.catalog()
            info = catalog.imis.get(check_name(imi))
            record = info.versions.get(parse_version(version)) if info else None
        if record is None:
            raise Unavailable(f"{imi} has no version {version}")
        try:
            raw = await self._capped_get(manifest_object_path(record.digest), MAX_MANIFEST, timeout=60)
        except httpx.HTTPError as error:
            raise Unavailable(f"manifest of {imi} v{version}: {error}") from None
        try:
            return await trio.to_thread.run_sync(Manifest.from_bytes, raw, record.digest)
        except InvalidInput as error:
            raise Unavailable(f"manifest of {imi} v{version}: {error}") from None

    async def _capped_get(self, path: str, limit: int, *, timeout: float) -> bytes:
        """The body of a GET, refused (Unavailable) as soon as it is announced
        or found to be longer than `limit`."""
        async with self.http.stream("GET", path, timeout=timeout) as response:
            response.raise_for_status()
            length = response.headers.get("Content-Length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                raise Unavailable(f"{path}: the cache server announced {length} bytes, over {limit}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise Unavailable(f"{path}: the cache server sent more than {limit} bytes")
            return bytes(body)

    async def block(self, digest: str, imi: str, version: int) -> bytes:
        try:
            return await self.client.fetch(self.url, digest, imi=imi, version=version, timeout=self.timeout)
        except FetchFailure as error:
            raise Unavailable(str(error)) from None

    async def blocks(self, digests: list[str], imi: str, version: int) -> list[bytes | None]:
        """The blocks in order, in batches; None for one the cache server does not deliver."""
        found: dict[str, bytes] = {}
        for start in range(0, len(digests), MAX_BATCH):
            try:
                found.update(await self.client.fetch_many(self.url, digests[start:start + MAX_BATCH], imi=imi,
                                                          version=version, timeout=self.timeout))
            except FetchFailure as error:
                raise Unavailable(str(error)) from None
        return [found.get(d) for d in digests]

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


def _why(error: Exception) -> str:
    """One line on why the cache server did not answer as it should."""
    if isinstance(error, httpx.HTTPStatusError):
        status = error.response.status_code
        hint = {401: ": unknown or revoked token (check --token-file)",
                403: ": the token lacks the reader role"}.get(status, "")
        return f"it answered {status}{hint}"
    return tls_failure(error) or str(error) or type(error).__name__
