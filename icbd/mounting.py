"""`icbd mount` and `icbd umount`.

    icbd mount MOUNTPOINT (--cache URL | --master URL [--cache-dir DIR]) [--site SITE]

`--cache URL` (repeatable) reads through the site's cache servers, spread
by digest with failover, and from the replicas when none answers
(cache.group.CacheGroup); `--master URL` embeds the cache in the mount
process, its blocks under --cache-dir (cache.site.SiteCache). The
filesystem itself is icbdfs. Either way the mount keeps the master's key
and the newest catalogue it has seen in --cache-dir (see
icbdcore/trust.py): `--master-key` (env ICBD_MASTER_KEY) names the key,
else the source's key is pinned at first contact.

By default the command returns once the mount answers and keeps serving in
the background: it forks before trio starts (a process with threads must not
fork), the child detaches and logs to --log or <cache-dir>/mount.log
(rotated), and tells the waiting parent "ready" or one error line through a
pipe; the parent exits 0 or 1 on that line. `--foreground` serves in the
calling process (what tests and service managers use): under systemd it
reports READY=1 once the mount answers and feeds the watchdog from its trio
loop (icbdcore/service.py). SIGINT, SIGTERM and `umount MOUNTPOINT`
unmount cleanly.

`--metrics-listen HOST:PORT` serves the mount's Prometheus metrics
(`GET /metrics`, icbdcore/metrics.py) from the same trio loop.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from functools import partial
from pathlib import Path

import trio

from cache.group import CacheGroup
from cache.site import SiteCache
from icbdcore import http, metrics
from icbdcore.clients import Credentials
from icbdcore.errors import CliError, plain_errors
from icbdcore.layout import Layout
from icbdcore.logs import setup_logging, stderr_is_journal
from icbdcore.mounts import is_icbd, mounted_at
from icbdcore.service import ServiceManager
from icbdcore.source import ImageSource, Unavailable
from icbdcore.trust import master_key_argument
from icbdfs.fs import MountOptions
from icbdfs.mount import serve

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("/var/cache/icbd/mount")

SourceOpener = Callable[[], AbstractAsyncContextManager[ImageSource]]


# --- the command line ------------------------------------------------------------

def main(args) -> int:
    """`icbd mount`: see the module docstring."""
    options = _options(args)
    mountpoint = _check_mountpoint(args.mountpoint)
    open_source = _source_opener(args)
    cache_dir = Path(args.cache_dir or DEFAULT_CACHE_DIR).absolute()
    listen = getattr(args, "metrics_listen", None)
    if listen:
        try:
            http.parse_listen(listen)
        except ValueError as error:
            raise CliError(f"--metrics-listen: {error}") from None
    metrics.set_recording(bool(listen))
    labels = {"node": f"{socket.gethostname()}:{mountpoint}", "site": args.site or ""} if listen else None
    serving = partial(_serve_opened, open_source, mountpoint, options, metrics_listen=listen, metrics_labels=labels)
    if args.foreground:
        setup_logging(Path(args.log).absolute() if args.log else None, args.verbose)
        manager = ServiceManager()
        trio.run(partial(serving, lambda: manager.ready(f"serving {mountpoint}"), manager))
        return 0
    # Started by systemd (a .mount unit, fstab): the journal keeps the log, unless --log says otherwise.
    log_file = Path(args.log).absolute() if args.log else None if stderr_is_journal() else Layout(cache_dir).mount_log
    try:
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CliError(f"cannot create {log_file.parent} for the log: {error.strerror}; give --log FILE") from None
    pid = _start_in_background(
        lambda ready: trio.run(serving, ready),
        log_file,
        args.verbose,
        wait=max(60.0, 3 * options.timeout),
    )
    log.debug("mount process %d serves %s", pid, mountpoint)
    return 0


def umount(args) -> int:
    """`icbd umount MOUNTPOINT`."""
    mountpoint = _mount_path(args.mountpoint)
    found = mounted_at(mountpoint)
    if found is None:
        raise CliError(f"{mountpoint} is not mounted")
    if not is_icbd(found):
        raise CliError(f"{mountpoint} is not an icbd mount (it is {found.fstype}); use umount(8)")
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    command = [tool, "-u", mountpoint] if tool else ["umount", mountpoint]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or ["failed"])[-1]
        if "busy" in message.lower():
            raise CliError(f"{mountpoint} is busy: close what uses it (fuser -vm {mountpoint}) and retry")
        raise CliError(f"cannot unmount {mountpoint}: {message}")
    return 0


async def _serve_opened(
    open_source: SourceOpener,
    mountpoint: str,
    options: MountOptions,
    ready: Callable[[], None] | None,
    manager: ServiceManager | None = None,
    *,
    metrics_listen: str | None = None,
    metrics_labels: dict[str, str] | None = None,
) -> None:
    try:
        with plain_errors():
            async with open_source() as source, trio.open_nursery() as nursery:
                if metrics_listen:
                    await _start_metrics(nursery, metrics_listen)
                if manager is not None:
                    nursery.start_soon(manager.feed_watchdog)
                await serve(source, mountpoint, options, ready=ready, metrics_labels=metrics_labels)
                if manager is not None:
                    manager.stopping(f"unmounted {mountpoint}")
                nursery.cancel_scope.cancel()
    except (Unavailable, OSError) as error:
        raise CliError(f"cannot open the source of iMIs: {error}") from None


async def _start_metrics(nursery: trio.Nursery, listen: str) -> None:
    """`GET /metrics` on `listen`, in the mount's own trio loop, until the mount ends."""
    never = trio.Event()  # the nursery's cancellation stops it
    try:
        await nursery.start(partial(http.serve, metrics.metrics_app(), listen, never, max_connections=64))
    except OSError as error:
        raise CliError(f"--metrics-listen {listen}: cannot listen there: {error.strerror or error}") from None
    log.info("metrics on http://%s/metrics", listen)


def _options(args) -> MountOptions:
    if not args.timeout > 0:
        raise CliError("--timeout must be more than 0 seconds")
    if args.refresh < 0:
        raise CliError("--refresh must be 0 (never) or more seconds")
    if args.profile_quiet <= 0:
        raise CliError("--profile-quiet must be more than 0 seconds")
    trace = None
    if args.trace:
        trace = Path(args.trace).absolute()
        if not trace.parent.is_dir():
            raise CliError(f"no folder {trace.parent} for the read trace: create it first")
    return MountOptions(timeout=args.timeout, refresh=args.refresh, lru_bytes=args.memory_cache,
                        profiles=not args.no_profiles, profile_quiet=args.profile_quiet, trace=trace)


def _source_opener(args) -> SourceOpener:
    # A reader token is all a mount needs (an embedded cache's boot profiles
    # reach the master only with a node token; through a cache server they
    # travel under the server's own).
    credentials = Credentials(args.token or None, ca=args.ca)
    master_key = master_key_argument(args)
    data_dir = Path(args.cache_dir or DEFAULT_CACHE_DIR).absolute()
    if args.cache:
        urls, timeout, site, fallback = list(dict.fromkeys(args.cache)), args.timeout, args.site, args.replica_fallback
        return lambda: CacheGroup.open(urls, credentials, timeout, state_dir=data_dir, site=site,
                                       replica_fallback=fallback, master_key=master_key)
    if args.master:
        master, site, size = args.master, args.site, args.cache_size
        return lambda: SiteCache.open(data_dir, master, credentials, site, size, master_key=master_key)
    raise CliError(
        "say where to read iMIs from: --cache URL (a site cache server; repeat it for several) "
        "or --master URL (embedded cache, blocks kept in --cache-dir)"
    )


def _check_mountpoint(path: str) -> str:
    mountpoint = _mount_path(path)
    found = mounted_at(mountpoint)
    if found is not None:
        if is_icbd(found):
            raise CliError(f"{mountpoint} is already an icbd mount: run `icbd umount {mountpoint}` first")
        raise CliError(f"{mountpoint} is already a mount point ({found.fstype}): choose an empty folder")
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise CliError(f"{mountpoint} does not exist: create an empty folder to mount on") from None
    except OSError as error:
        raise CliError(f"cannot use {mountpoint}: {error.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CliError(f"{mountpoint} is not a folder")
    if not os.path.exists("/dev/fuse"):
        raise CliError("/dev/fuse is missing: load the fuse module (modprobe fuse)")
    if os.geteuid() != 0 and not _user_allow_other():
        raise CliError("a mount for every user needs `user_allow_other` in /etc/fuse.conf, or run as root")
    return mountpoint


def _user_allow_other() -> bool:
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.split("#")[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def _mount_path(path: str) -> str:
    # Resolve the parent only: a dead FUSE mount cannot be stat-ed.
    absolute = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))


# --- running in the background ---------------------------------------------------

def _start_in_background(run: Callable[[Callable[[], None]], None], log_file: Path | None, verbose: bool,
                         wait: float) -> int:
    """Fork; the child calls `run(ready)` detached, logging to `log_file`
    (None: to stderr, which is then the journal's stream).

    Returns the child's pid once it called `ready`; raises CliError with its
    error line if it failed first.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        _wait_for_child(pid, read_fd, log_file, wait)
        return pid
    os.close(read_fd)
    code = 1

    def report(line: str) -> None:
        nonlocal write_fd
        if write_fd >= 0:
            try:
                os.write(write_fd, line.encode(errors="replace") + b"\n")
                os.close(write_fd)
            except OSError:
                pass
            write_fd = -1

    try:
        os.setsid()
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1) if log_file is None else (0, 1, 2):
            os.dup2(devnull, fd)
        setup_logging(log_file, verbose)
        run(lambda: report("ready"))
        code = 0
    except CliError as error:
        log.error("%s", error)
        report(f"error: {error}")
    except BaseException as error:
        log.exception("mount failed")
        report(f"error: {type(error).__name__}: {error}; see {log_file or 'the journal'}")
    finally:
        logging.shutdown()
        os._exit(code)


def _wait_for_child(pid: int, read_fd: int, log_file: Path | None, wait: float) -> None:
    where = log_file or "the journal"
    deadline = time.monotonic() + wait
    data = b""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([pipe], [], [], left)[0]:
                os.kill(pid, signal.SIGTERM)
                raise CliError(f"the mount was not ready within {wait:g} s; see {where}")
            chunk = pipe.read(4096)
            if not chunk:
                break
            data += chunk
    line = data.decode(errors="replace").strip()
    if line == "ready":
        return
    os.waitpid(pid, 0)  # it has reported and is exiting
    raise CliError(line.removeprefix("error: ") or f"the mount process died; see {where}")
