"""The manifests of a mount's versions: each fetched once, on first use, and
indexed for the kernel (namespace.VersionTree).

A lookup waits at most `timeout` and then raises Unavailable (EIO for the
kernel); the fetch it started carries on in the mount's nursery, so the
lookup the kernel retries finds it done. The first load of a version starts
the replay of its boot profile.
"""

from __future__ import annotations

import logging
from collections import Counter

import trio

from icbdcore.flights import Flights
from icbdcore.source import ImageSource, Unavailable

from .namespace import Version, VersionTree
from .profiles import BootProfiles

log = logging.getLogger(__name__)


class Manifests:
    def __init__(
        self,
        source: ImageSource,
        nursery: trio.Nursery,
        stats: Counter[str],
        *,
        timeout: float,
        profiles: BootProfiles | None = None,
        profile_bytes: int = 0,
    ):
        """`profiles`: replay boot profiles (None: do not); `profile_bytes`:
        how much of the memory cache a replay may fill ahead of the readers."""
        self._source = source
        self._stats = stats
        self._timeout = timeout
        self._profiles = profiles
        self._profile_bytes = profile_bytes
        # Manifests may be large and the link slow: a lookup gives up after
        # `timeout`, the fetch carries on for the next lookup.
        self._flights: Flights[int, VersionTree] = Flights(nursery, max(60.0, 6 * timeout))

    async def tree(self, version: Version) -> VersionTree:
        """The version's indexed manifest, fetched on first use; raises
        Unavailable after `timeout`."""
        if version.tree is not None:
            return version.tree
        with trio.move_on_after(self._timeout):
            try:
                return await self._flights.get_or_fetch(version.slot, lambda: self._load(version))
            except Unavailable as error:
                log.warning("manifest of %s@%d: %s", version.imi, version.number, error)
                raise
        log.warning("manifest of %s@%d: no answer within %g s",
                    version.imi, version.number, self._timeout)
        raise Unavailable(f"no manifest within {self._timeout:g} s")

    async def _load(self, version: Version) -> VersionTree:
        manifest = await self._source.manifest(version.imi, version.number)
        tree = await trio.to_thread.run_sync(VersionTree, manifest)
        version.tree = tree
        self._stats["manifests"] += 1
        if self._profiles is not None:
            window = max(1, self._profile_bytes // tree.chunk_size)
            self._profiles.first_access(version.imi, version.number, tree.digests, window)
        return tree
