"""Mounting an icbd filesystem in the kernel and serving it: `serve()`.

Programs and tests call `serve(source, mountpoint, options)`; the `icbd mount`
command (icbd/mounting.py) adds options, the choice of source and running in
the background around it. SIGINT and SIGTERM unmount cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from icbdcore import metrics
from icbdcore.errors import CliError, plain_errors
from icbdcore.source import ImageSource

from .filesystem import open_filesystem
from .fs import MountOptions, Operations

log = logging.getLogger(__name__)

# nosuid, nodev: the iMIs' setuid binaries and device nodes are for the
# desktops that boot them, not for the host that mounts them (fusermount3
# adds both for an unprivileged user, but a mount made as root gets only
# what it asks for).
FUSE_OPTIONS = frozenset({"fsname=icbd", "subtype=icbd", "ro", "nosuid", "nodev", "default_permissions",
                          "allow_other"})


async def serve(
    source: ImageSource,
    mountpoint: str | os.PathLike,
    options: MountOptions | None = None,
    *,
    ready: Callable[[], None] | None = None,
    metrics_labels: dict[str, str] | None = None,
) -> None:
    """Mount every iMI of `source` at `mountpoint` and serve until unmounted or signalled.

    `ready` is called once the mount answers. With `metrics_labels` (node,
    site) the mount's figures are in the process's metrics registry while it
    serves. Raises CliError when the catalogue cannot be read or the mount
    fails.
    """
    options = options or MountOptions()
    mountpoint = os.path.abspath(mountpoint)
    with plain_errors():
        await _serve(source, mountpoint, options, ready, metrics_labels)


async def _serve(source: ImageSource, mountpoint: str, options: MountOptions,
                 ready: Callable[[], None] | None, metrics_labels: dict[str, str] | None) -> None:
    async with open_filesystem(source, options) as ops:
        collecting = contextlib.nullcontext()
        if metrics_labels is not None:
            collecting = metrics.NodeCollector(lambda sample: describe_mount(ops, sample, metrics_labels))
        with collecting:
            await _serve_filesystem(ops, mountpoint, options, ready)


def describe_mount(ops: Operations, sample: metrics.Sample, labels: dict[str, str]) -> None:
    """A mount's metrics: reads, EIOs, its memory, its source (cache servers,
    failovers, the replica fallback, or an embedded cache), profiles."""
    status = ops.status()
    metrics.node_info(sample, labels.get("node", ""), "mount", labels.get("site", ""))
    for name, key in (("icbd_mount_reads_total", "reads"), ("icbd_mount_read_bytes_total", "read_bytes"),
                      ("icbd_mount_eio_total", "eio"), ("icbd_mount_memory_hits_total", "lru_hits"),
                      ("icbd_mount_memory_misses_total", "lru_misses"),
                      ("icbd_mount_source_blocks_total", "source_blocks"),
                      ("icbd_mount_source_bytes_total", "source_bytes"),
                      ("icbd_mount_source_errors_total", "source_errors"),
                      ("icbd_profile_blocks_ready_total", "profile_blocks_ready"),
                      ("icbd_profile_blocks_late_total", "profile_blocks_late"),
                      ("icbd_profile_replays_total", "profile_replays")):
        sample.add(name, status.get(key, 0))
    sample.add("icbd_mount_memory_bytes", status.get("lru_bytes"))
    metrics.describe_catalog(sample, status)
    source = status.get("source") or {}
    if "caches" in source:  # cache servers (cache/group.py)
        sample.add("icbd_mount_failovers_total", source.get("failovers"))
        sample.add("icbd_mount_replica_fallback_blocks_total", source.get("fallback_blocks"))
        sample.add("icbd_mount_degraded_seconds_total", source.get("degraded_seconds"))
        for cache in source["caches"]:
            sample.add("icbd_mount_cache_up", cache.get("state") == "up", cache=cache.get("url"))
            sample.add("icbd_mount_cache_blocks_total", cache.get("blocks"), cache=cache.get("url"))
            sample.add("icbd_mount_cache_errors_total", cache.get("errors"), cache=cache.get("url"))
    else:  # an embedded cache (cache/site.py)
        sample.add("icbd_master_reachable", source.get("master_reachable"))
        if isinstance(source.get("store"), dict):
            metrics.describe_store(sample, source["store"])
        if isinstance(source.get("fetcher"), dict):
            metrics.describe_fetcher(sample, source["fetcher"])
            sample.add("icbd_mount_failovers_total", source["fetcher"].get("failovers"))


async def _serve_filesystem(ops: Operations, mountpoint: str, options: MountOptions,
                            ready: Callable[[], None] | None) -> None:
    await _first_catalog(ops, options.timeout)
    try:
        pyfuse3.init(ops, mountpoint, set(FUSE_OPTIONS))
    except RuntimeError as error:
        raise CliError(
            f"cannot mount at {mountpoint} ({error}): it must be an empty folder and /dev/fuse usable"
        ) from None
    ops.attach_kernel()
    log.info("mounted at %s (timeout %g s, refresh %g s)", mountpoint, options.timeout, options.refresh)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal)
            nursery.start_soon(_announce, mountpoint, options, ready)
            await pyfuse3.main(options.min_tasks, options.max_tasks)
            nursery.cancel_scope.cancel()
    finally:
        ops.attach_kernel(False)
        # Also right after an external unmount: libfuse sees the dead
        # connection and skips the unmount.
        pyfuse3.close(unmount=True)
        log.info("unmounted %s; %s", mountpoint, dict(ops.stats))


async def _first_catalog(ops: Operations, timeout: float) -> None:
    with trio.move_on_after(timeout):
        try:
            await ops.refresh()
            return
        except Exception as error:  # the first call on the network: say what failed, in one line
            raise CliError(f"cannot read the catalogue of iMIs: {error or type(error).__name__}") from None
    raise CliError(f"the source did not answer within {timeout:g} s: check its URL and that it is up")


async def _announce(mountpoint: str, options: MountOptions, ready: Callable[[], None] | None) -> None:
    # A stat of the root goes through our own request loop: when it returns,
    # the kernel and the loop both work.
    st = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
    if options.kernel_readahead_kb:
        await trio.to_thread.run_sync(_set_readahead, st.st_dev, options.kernel_readahead_kb)
    await trio.to_thread.run_sync(_set_max_background, st.st_dev, options.max_tasks)
    log.info("mount at %s answers", mountpoint)
    if ready is not None:
        ready()


def _set_readahead(device: int, kb: int) -> None:
    """Let the kernel read ahead `kb` on this mount (best effort: needs root).

    The default, 128 KiB, cuts a sequential reader's 1 MiB reads into eight
    requests, each a round trip through the single-threaded request loop.
    Reading 512 MiB from a warm local tree (2 busy cores) took 512 requests
    instead of 4096, about a third less CPU in the mount (0.6-0.7 s against
    0.7-1.1 s) and ran at 760-890 MB/s against 700-750 MB/s.
    """
    path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as error:
        log.debug("cannot set %s: %s", path, error)


FUSECTL = Path("/sys/fs/fuse/connections")


def _set_max_background(device: int, requests: int) -> None:
    """Let the kernel have `requests` background requests (readahead, async
    reads) outstanding on this mount instead of 12 (best effort: needs root).

    With 12, the 13th concurrent reader of an unreachable block waits in the
    kernel before the mount even sees its request, so its EIO comes after
    several --timeout periods instead of one (measured with 40 readers and a
    2 s timeout: EIO in waves at 2, 3.7, 5.6 and 7.5 s). pyfuse3 does not
    expose libfuse's max_background, so it is set through fusectl, mounted
    first if the system has not.
    """
    folder = FUSECTL / str(device)
    try:
        if not folder.exists() and not os.path.ismount(FUSECTL):
            subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)], capture_output=True, check=False)
        for name, value in (("max_background", requests), ("congestion_threshold", requests * 3 // 4)):
            (folder / name).write_text(str(value))
    except OSError as error:
        log.info("cannot raise the kernel's background request limit (%s): many concurrent "
                 "readers of unreachable blocks will see EIO later than --timeout", error)


async def _stop_on_signal() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # signals only reach the main thread; the caller stops us otherwise
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


