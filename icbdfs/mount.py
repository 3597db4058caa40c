"""`icbd mount` and `icbd umount`, and `serve()` for programs and tests.

    icbd mount MOUNTPOINT (--cache URL | --master URL [--cache-dir DIR]) [--site SITE]

`--cache URL` reads through a site cache server (cache.remote.RemoteCache);
`--master URL` embeds the cache in the mount process, its blocks under
--cache-dir (cache.site.SiteCache).

By default the command returns once the mount answers and keeps serving in
the background: it forks before trio starts (a process with threads must not
fork), the child detaches and logs to --log or <cache-dir>/mount.log
(rotated), and tells the waiting parent "ready" or one error line through a
pipe; the parent exits 0 or 1 on that line. `--foreground` serves in the
calling process (what tests and service managers use). SIGINT and SIGTERM
unmount cleanly.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from pathlib import Path

import pyfuse3
import trio

from cache.source import ImageSource, Unavailable

from .errors import CliError
from .fs import MountOptions, Operations

log = logging.getLogger(__name__)

FUSE_OPTIONS = frozenset({"fsname=icbd", "subtype=icbd", "ro", "default_permissions", "allow_other"})
DEFAULT_CACHE_DIR = Path("/var/cache/icbd/mount")
LOG_BYTES = 10 << 20  # per log file; 3 old ones are kept

SourceOpener = Callable[[], AbstractAsyncContextManager[ImageSource]]


# --- serving -----------------------------------------------------------------

async def serve(
    source: ImageSource,
    mountpoint: str | os.PathLike,
    options: MountOptions | None = None,
    *,
    ready: Callable[[], None] | None = None,
) -> None:
    """Mount every iMI of `source` at `mountpoint` and serve until unmounted or signalled.

    `ready` is called once the mount answers. Raises CliError when the
    catalogue cannot be read or the mount fails.
    """
    options = options or MountOptions()
    mountpoint = os.path.abspath(mountpoint)
    ops = Operations(source, options)
    with _plain_errors():
        await _serve(ops, mountpoint, options, ready)


async def _serve(ops: Operations, mountpoint: str, options: MountOptions,
                 ready: Callable[[], None] | None) -> None:
    async with ops.running():
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


@contextmanager
def _plain_errors() -> Iterator[None]:
    """Let a lone exception out of the nurseries' groups, so that a CliError
    reaches the command line as one line."""
    try:
        yield
    except BaseExceptionGroup as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if error is group:
            raise
        raise error from None


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


# --- the command line ------------------------------------------------------------

def main(args) -> int:
    """`icbd mount`: see the module docstring."""
    options = _options(args)
    mountpoint = _check_mountpoint(args.mountpoint)
    open_source = _source_opener(args)
    cache_dir = Path(args.cache_dir or DEFAULT_CACHE_DIR).absolute()
    if args.foreground:
        _setup_logging(Path(args.log).absolute() if args.log else None, args.verbose)
        trio.run(_serve_opened, open_source, mountpoint, options, None)
        return 0
    log_file = Path(args.log).absolute() if args.log else cache_dir / "mount.log"
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CliError(f"cannot create {log_file.parent} for the log: {error.strerror}; give --log FILE") from None
    pid = _start_in_background(
        lambda ready: trio.run(_serve_opened, open_source, mountpoint, options, ready),
        log_file,
        args.verbose,
        wait=max(60.0, 3 * options.timeout),
    )
    log.debug("mount process %d serves %s", pid, mountpoint)
    return 0


def umount(args) -> int:
    """`icbd umount MOUNTPOINT`."""
    mountpoint = _mount_path(args.mountpoint)
    found = mount_info(mountpoint)
    if found is None:
        raise CliError(f"{mountpoint} is not mounted")
    fstype, fsname = found
    if not _is_icbd(fstype, fsname):
        raise CliError(f"{mountpoint} is not an icbd mount (it is {fstype}); use umount(8)")
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
) -> None:
    try:
        with _plain_errors():
            async with open_source() as source:
                await serve(source, mountpoint, options, ready=ready)
    except (Unavailable, OSError) as error:
        raise CliError(f"cannot open the source of iMIs: {error}") from None


def _options(args) -> MountOptions:
    if not args.timeout > 0:
        raise CliError("--timeout must be more than 0 seconds")
    if args.refresh < 0:
        raise CliError("--refresh must be 0 (never) or more seconds")
    if args.profile_quiet <= 0:
        raise CliError("--profile-quiet must be more than 0 seconds")
    return MountOptions(timeout=args.timeout, refresh=args.refresh, lru_bytes=args.memory_cache,
                        profiles=not args.no_profiles, profile_quiet=args.profile_quiet)


def _source_opener(args) -> SourceOpener:
    token = args.token or ""
    if args.cache:
        try:
            from cache.remote import RemoteCache
        except ImportError as error:
            raise CliError(f"this icbd has no site cache client ({error}); update icbd") from None
        url, timeout = args.cache, args.timeout
        return lambda: RemoteCache.open(url, token, timeout)
    if args.master:
        try:
            from cache.site import SiteCache
        except ImportError as error:
            raise CliError(f"this icbd has no embedded cache ({error}); update icbd") from None
        data_dir = Path(args.cache_dir or DEFAULT_CACHE_DIR).absolute()
        master, site, size = args.master, args.site, args.cache_size
        return lambda: SiteCache.open(data_dir, master, token, site, size)
    raise CliError(
        "say where to read iMIs from: --cache URL (the site cache server) "
        "or --master URL (embedded cache, blocks kept in --cache-dir)"
    )


def _check_mountpoint(path: str) -> str:
    mountpoint = _mount_path(path)
    found = mount_info(mountpoint)
    if found is not None:
        if _is_icbd(*found):
            raise CliError(f"{mountpoint} is already an icbd mount: run `icbd umount {mountpoint}` first")
        raise CliError(f"{mountpoint} is already a mount point ({found[0]}): choose an empty folder")
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


def _is_icbd(fstype: str, fsname: str) -> bool:
    return fstype == "fuse.icbd" or (fstype.startswith("fuse") and fsname == "icbd")


def _unescape(field: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as \ooo.
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def mount_info(mountpoint: str) -> tuple[str, str] | None:
    """(filesystem type, source) of what is mounted at `mountpoint`, or None."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) != mountpoint:
                continue
            tail = fields[fields.index("-") + 1:]
            found = (tail[0], _unescape(tail[1]))  # the last one mounted there wins
    return found


# --- running in the background ---------------------------------------------------

def _setup_logging(log_file: Path | None, verbose: bool) -> None:
    if log_file is None:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=LOG_BYTES, backupCount=3)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def _start_in_background(run: Callable[[Callable[[], None]], None], log_file: Path, verbose: bool,
                         wait: float) -> int:
    """Fork; the child calls `run(ready)` detached, logging to `log_file`.

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
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        _setup_logging(log_file, verbose)
        run(lambda: report("ready"))
        code = 0
    except CliError as error:
        log.error("%s", error)
        report(f"error: {error}")
    except BaseException as error:
        log.exception("mount failed")
        report(f"error: {type(error).__name__}: {error}; see {log_file}")
    finally:
        logging.shutdown()
        os._exit(code)


def _wait_for_child(pid: int, read_fd: int, log_file: Path, wait: float) -> None:
    deadline = time.monotonic() + wait
    data = b""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([pipe], [], [], left)[0]:
                os.kill(pid, signal.SIGTERM)
                raise CliError(f"the mount was not ready within {wait:g} s; see {log_file}")
            chunk = pipe.read(4096)
            if not chunk:
                break
            data += chunk
    line = data.decode(errors="replace").strip()
    if line == "ready":
        return
    os.waitpid(pid, 0)  # it has reported and is exiting
    raise CliError(line.removeprefix("error: ") or f"the mount process died; see {log_file}")
