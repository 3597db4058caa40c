"""A running icbd filesystem, its parts wired together: `open_filesystem()`.

    async with open_filesystem(source, options) as ops:
        await ops.refresh()  # the first catalogue
        ...                  # ops.lookup(), ops.read(), or pyfuse3.init(ops, ...)

The memory cache (blockcache.py), the manifests (manifests.py), the boot
profiles (profiles.py), the reader (reader.py) and the namespace
(namespace.py) are built here, inside one nursery that runs all their
background tasks: fetches, readahead, profile replay and recording, the
catalogue refresh and the invalidations sent to the kernel. Leaving the
block cancels them all. Operations (fs.py) is handed the parts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from icbdcore.errors import CliError
from icbdcore.source import ImageSource

from .blockcache import BlockCache
from .fs import MountOptions, Operations
from .manifests import Manifests
from .namespace import Namespace
from .profiles import BootProfiles, ProfileOptions
from .reader import Reader
from .tracing import ReadTracer


@asynccontextmanager
async def open_filesystem(
    source: ImageSource, options: MountOptions | None = None
) -> AsyncIterator[Operations]:
    """The FUSE operations over `source`, their background tasks running
    until the block is left. The catalogue is empty until `ops.refresh()`."""
    options = options or MountOptions()
    stats: Counter[str] = Counter()
    async with trio.open_nursery() as nursery:
        blocks = BlockCache(
            source,
            nursery,
            capacity=options.lru_bytes,
            # A reader gives up after `timeout`; the fetch goes on a while
            # longer, so the reader's retry can still find it.
            fetch_timeout=2 * options.timeout,
            stats=stats,
        )
        profiles = BootProfiles(
            source,
            nursery,
            ProfileOptions(
                quiet=options.profile_quiet,
                max_seconds=options.profile_max_seconds,
                max_blocks=options.profile_max_blocks,
                timeout=max(30.0, options.timeout),
                follow_idle=options.profile_follow_idle,
            ),
            stats,
            follow=blocks.follow,
            held=blocks.__contains__,
        )
        manifests = Manifests(
            source,
            nursery,
            stats,
            timeout=options.timeout,
            profiles=profiles if options.profiles else None,
            # Half the memory cache may hold profile blocks fetched ahead of the readers.
            profile_bytes=options.lru_bytes // 2,
        )
        reader = Reader(
            source,
            blocks,
            profiles,
            nursery,
            stats,
            timeout=options.timeout,
            readahead=options.readahead,
            max_near=options.max_near,
            max_far=options.max_far,
        )
        tracer = None
        if options.trace is not None:
            try:
                tracer = ReadTracer(options.trace)
            except OSError as error:
                raise CliError(f"cannot write the read trace {options.trace}: {error.strerror or error}") from None
            nursery.start_soon(tracer.keep_writing)
        ops = Operations(
            Namespace(), manifests, reader, profiles, source=source, nursery=nursery, stats=stats,
            tracer=tracer,
        )
        if options.refresh > 0:
            nursery.start_soon(ops.keep_current, options.refresh, options.timeout)
        try:
            yield ops
        finally:
            ops.attach_kernel(False)
            nursery.cancel_scope.cancel()
