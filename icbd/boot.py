"""`icbd boot`: boot a desktop from a mounted iMI under qemu.

The mount shows MOUNT/NAME/VERSION/... and MOUNT/NAME/latest -> VERSION. A
version that can boot carries `icbd-boot.toml` at its root naming the kernel,
initrd and disk image inside the iMI. Each desktop writes to its own qcow2
overlay backed by the read-only disk image in the mount, so any number of
desktops share one cached image and none can change it.

How a run ends is read from qemu's QMP monitor, not from its exit status:
with `-no-reboot` a guest power-off and a guest reset (a reboot, or a panic
before the pvpanic driver is loaded, e.g. a kernel that cannot find its root)
both end qemu with status 0. QMP's SHUTDOWN event says which ("guest-shutdown"
or "guest-reset"), and GUEST_PANICKED reports a panic through the pvpanic
device. qemu starts paused (-S) and runs only once we listen, so no event is
lost.

The accelerator is KVM only where it was seen to boot a kernel (a bounded
probe, remembered per host boot); elsewhere TCG. qemu runs in its own session
and is stopped by us on a timeout, Ctrl-C, SIGTERM or SIGHUP; only a SIGKILL
of icbd leaves it running until its guest stops.

A desktop says its session is up with a line holding READY_LINE on its
first serial port (the Debian desktop iMI prints it from a unit ordered after
graphical.target and the session's start). With `stop_when_ready` or a
`screenshot`, the run waits for that line, reads qemu's block statistics,
saves the screen through QMP `screendump`, and stops qemu: the result is then
"ready". Whenever that line comes, the icbd mount the version lies in is
told (icbdcore/mounts.py: SESSION_UP_XATTR), which ends the version's boot
profile recording there. Every desktop has a standard VGA; `display` shows
it to a person (`vnc=:N`, `sdl`, `gtk`); headless (`none`) is the default.

Python callers use `boot()` (or `boot_async()` under trio), which return a
BootResult; `main()` is the `icbd boot` command.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TextIO

import trio

from icbd.qmp import Monitor, QmpError, screendump
from icbdcore.errors import CliError
from icbdcore.mounts import SESSION_UP_XATTR, containing_mount, is_icbd
from icbdcore.wire import InvalidInput, check_name, parse_version

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"
CONFIG_FILE = "icbd-boot.toml"
CONFIG_KEYS = ("kernel", "initrd", "disk", "append", "memory")
DEFAULT_APPEND = "console=ttyS0"
DEFAULT_MEMORY = "512M"
DEFAULT_TIMEOUT = 300.0
# What a desktop prints on its first serial port once its session is up.
READY_LINE = "icbd-desktop: session up"
_DISPLAY = re.compile(r"(none|sdl|gtk|vnc=[^,\s]+|spice-app|curses|dbus)(,[^\s]*)?\Z")
_MEMORY = re.compile(r"[1-9][0-9]{0,9}[KMGT]?\Z", re.IGNORECASE)

# A killed qemu normally disappears within milliseconds; a vCPU stuck inside a
# broken KVM took 25 s here to let go. We never wait longer than this for it.
REAP_TIMEOUT = 2.0

# Under TCG the sample kernel reaches its "cannot mount root" panic in 2.6 s;
# a working KVM does it in well under one. A KVM that has not done it in 5 s
# is broken (here it hangs after "Probing EDD") or no faster than TCG.
KVM_PROBE_TIMEOUT = 5.0
KVM_PROBE_CACHE = (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                   / "icbd" / "kvm-probe.json")


@dataclass(frozen=True)
class BootSpec:
    """What to boot: files of one mounted version, checked to be inside it."""

    name: str
    version: int
    root: Path
    kernel: Path
    initrd: Path | None
    disk: Path | None
    append: str
    memory: str


@dataclass
class BootResult:
    """How a desktop run ended. `returncode` is 0 only for a guest power-off, or
    for a guest stopped once its session was up (`ready`) when that was asked."""

    returncode: int
    seconds: float
    console_text: str
    version: int
    outcome: str  # poweroff | ready | not-ready | panic | reset | timeout | qemu-failed
    message: str = ""
    ready_seconds: float | None = None  # when the guest said its session was up
    screenshot: Path | None = None
    # The guest's reads from its disk when it was ready (QMP query-blockstats;
    # the kernel and initrd are read by qemu, not through the disk).
    disk_read_bytes: int | None = None
    disk_read_ops: int | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0


# ---- what to boot -----------------------------------------------------------

def resolve_version(mount: Path, name: str, version: int | None) -> tuple[int, Path]:
    """The version number and folder of NAME[@VERSION] in the mount (None: latest)."""
    mount = Path(mount)
    try:
        check_name(name)
        if version is not None:
            version = parse_version(version)
    except InvalidInput as error:
        raise CliError(str(error)) from None
    imi_dir = mount / name
    if not imi_dir.is_dir():
        if not mount.is_dir():
            raise CliError(f"{mount} is not a folder: mount the iMIs there first (icbd mount {mount} ...)")
        raise CliError(f"no iMI {name!r} under {mount}: check the name (ls {mount})")
    if version is None:
        try:
            target = os.readlink(imi_dir / "latest")
            version = parse_version(target)
        except OSError:
            raise CliError(f"{imi_dir} has no 'latest' link: give a version, {name}@N") from None
        except InvalidInput:
            raise CliError(f"{imi_dir}/latest points to {target!r}, not a version: give {name}@N") from None
    version_dir = imi_dir / str(version)
    if not version_dir.is_dir():
        raise CliError(f"no version {version} of {name!r} under {mount}: see icbd imi versions {name}")
    return version, version_dir


def load_spec(mount: Path, name: str, version: int | None = None,
              overrides: Mapping[str, str | None] | None = None) -> BootSpec:
    """Read icbd-boot.toml of the version; non-None `overrides` replace its keys."""
    version, root = resolve_version(mount, name, version)
    config = _read_config(root)
    for key, value in (overrides or {}).items():
        if key not in CONFIG_KEYS:
            raise ValueError(f"unknown boot setting {key!r}")
        if value is not None:
            config[key] = value
    if "kernel" not in config:
        raise CliError(f"{root} has no {CONFIG_FILE} naming a kernel: add one or give --kernel")
    memory = config.get("memory", DEFAULT_MEMORY)
    if not _MEMORY.match(memory):
        raise CliError(f"memory {memory!r} is not a size like 512M or 2G: fix {CONFIG_FILE} or give --memory")
    return BootSpec(
        name=name, version=version, root=root,
        kernel=_inside(root, config["kernel"], "kernel"),
        initrd=_inside(root, config["initrd"], "initrd") if config.get("initrd") else None,
        disk=_inside(root, config["disk"], "disk") if config.get("disk") else None,
        append=config.get("append", DEFAULT_APPEND),
        memory=memory,
    )


def _read_config(root: Path) -> dict[str, str]:
    path = root / CONFIG_FILE
    try:
        # Read only what lies inside the iMI: a symlink to /etc/... or to
        # another version would choose the kernel and its command line.
        real = path.resolve(strict=True)
        if not real.is_relative_to(root.resolve()):
            raise CliError(f"{path} leads out of the iMI through a symlink: make it a file in the iMI")
        with open(real, "rb") as f:
            config = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise CliError(f"{path} is not valid TOML ({error}): fix it or override with flags") from None
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop
        raise CliError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise CliError(f"{path}: unknown key {unknown[0]!r}; the keys are {', '.join(CONFIG_KEYS)}")
    wrong = [k for k, v in config.items() if not isinstance(v, str)]
    if wrong:
        raise CliError(f"{path}: {wrong[0]} must be a string in quotes")
    return config


def _inside(root: Path, relative: str, what: str) -> Path:
    """`relative` as a file inside the iMI `root`; absolute paths and escapes are refused."""
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise CliError(f"{what} path {relative!r} must stay inside the iMI (relative, no '..')")
    path = (root / pure).resolve()
    # A symlink in the iMI must not lead out of it either.
    if not path.is_relative_to(root.resolve()):
        raise CliError(f"{what} path {relative!r} leads out of the iMI through a symlink")
    if not path.is_file():
        raise CliError(f"{what} {relative!r} is not a file in {root}: fix {CONFIG_FILE} or give --{what}")
    return path


# ---- the per-desktop overlay ------------------------------------------------

async def create_overlay(disk: Path, folder: Path, stem: str) -> Path:
    """A fresh qcow2 file in `folder` whose reads fall through to the raw `disk`."""
    folder.mkdir(parents=True, exist_ok=True)
    # mkstemp gives each desktop its own name even with many booting at once.
    fd, name = tempfile.mkstemp(prefix=f"{stem}-", suffix=".qcow2", dir=folder)
    os.close(fd)
    overlay = Path(name)
    try:
        result = await trio.run_process(
            [QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(disk.absolute()), str(overlay)],
            capture_stdout=True, capture_stderr=True, check=False,
        )
    except FileNotFoundError:
        overlay.unlink(missing_ok=True)
        raise CliError(f"{QEMU_IMG} is not installed: install qemu-utils") from None
    if result.returncode != 0:
        overlay.unlink(missing_ok=True)
        raise CliError(f"cannot create the overlay for {disk}: {_last_line(result.stderr)}")
    return overlay


def disk_reads_direct(disk: Path) -> bool:
    """Whether qemu reads the shared disk image with O_DIRECT: when it lies on
    an icbd mount.

    Through the host's page cache, each 4-64 KiB read of the guest reached
    the mount as a read of up to 1 MiB (the mount's read_ahead_kb, which
    sequential readers need): a Debian desktop's boot read 54 MB of its disk,
    the mount was asked for 91 MB of it, touching 176 blocks of 1 MiB instead
    of 152. With O_DIRECT the mount sees the guest's own reads (its kernel
    reads ahead already), keeps the blocks in its memory, and the host keeps
    no second copy of pages the guest caches itself. A plain folder keeps the
    page cache (tmpfs, for one, refuses O_DIRECT).
    """
    entry = containing_mount(disk)
    return entry is not None and is_icbd(entry)


# ---- the accelerator --------------------------------------------------------

async def choose_accel(requested: str, kernel: Path, cache_file: Path | None = KVM_PROBE_CACHE) -> str:
    """`kvm` or `tcg`. `auto` uses KVM only after a bounded probe showed it boots a kernel."""
    if requested in ("kvm", "tcg"):
        return requested
    if requested != "auto":
        raise CliError(f"unknown accelerator {requested!r}: use auto, kvm or tcg")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    key = _kvm_probe_key()
    cached = _read_probe_cache(cache_file, key)
    if cached is None:
        cached = await probe_accel("kvm", kernel)
        _write_probe_cache(cache_file, key, cached)
    return "kvm" if cached else "tcg"


async def probe_accel(accel: str, kernel: Path, timeout: float = KVM_PROBE_TIMEOUT) -> bool:
    """Whether `kernel` runs under `accel` to its no-root panic within `timeout` seconds.

    A probe that only opens /dev/kvm, or runs the BIOS, is not enough: on a
    test host both worked while every Linux kernel hung before its first line.
    """
    argv = [QEMU, "-accel", accel, *(["-cpu", "host"] if accel == "kvm" else []),
            "-machine", "pc", "-m", "128M",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
            "-kernel", str(kernel),
            "-append", "console=ttyS0 panic=-1 root=/dev/icbd-kvm-probe rdinit=/icbd-kvm-probe"]
    output = bytearray()
    try:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True)
    except FileNotFoundError:
        raise CliError(f"{QEMU} is not installed: install qemu-system-x86") from None
    try:
        with trio.move_on_after(timeout):
            async with process.stdout:
                while chunk := await process.stdout.receive_some(65536):
                    output += chunk
            await process.wait()
    finally:
        await _stop(process)
    works = process.returncode == 0 and b"Kernel panic" in output
    log.info("%s probe: %s", accel, "boots a kernel" if works else "does not boot a kernel")
    return works


def _kvm_probe_key() -> str:
    """What the probe result depends on: this host boot, the qemu binary, the KVM device."""
    parts = []
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    for path in (shutil.which(QEMU), "/dev/kvm"):
        with contextlib.suppress(OSError, TypeError):
            st = os.stat(path)
            parts.append(f"{path}:{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _read_probe_cache(cache_file: Path | None, key: str) -> bool | None:
    if cache_file is None:
        return None
    try:
        record = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("kvm"), bool):
        return None
    return record["kvm"]


def _write_probe_cache(cache_file: Path | None, key: str, works: bool) -> None:
    if cache_file is None:
        return
    with contextlib.suppress(OSError):
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "kvm": works}))
        os.replace(tmp, cache_file)


# ---- qemu -------------------------------------------------------------------

@dataclass(frozen=True)
class Screen:
    """What a run does with the desktop's screen and its readiness."""

    display: str = "none"  # qemu's -display: none (headless), vnc=:N, sdl, gtk
    screenshot: Path | None = None  # a PNG of the screen once the session is up
    stop_when_ready: bool = False  # stop the guest once its session is up

    def __post_init__(self) -> None:
        if not _DISPLAY.match(self.display):
            raise CliError(f"display {self.display!r}: use none, vnc=:N (e.g. vnc=:1), sdl or gtk")

    @property
    def waits_for_session(self) -> bool:
        return self.stop_when_ready or self.screenshot is not None


def qemu_command(spec: BootSpec, overlay: Path | None, accel: str, monitor_fd: int,
                 extra: Sequence[str] = (), display: str = "none", direct_disk: bool = False) -> list[str]:
    """The one place that says how a desktop runs under qemu. `direct_disk`:
    read the shared disk image with O_DIRECT (see disk_reads_direct)."""
    argv = [
        QEMU,
        "-machine", "pc",
        "-accel", accel,
        *(["-cpu", "host"] if accel == "kvm" else []),
        "-m", spec.memory,
        # No default NIC or option ROMs: nothing the desktop does not use, and
        # no iPXE ROM to load. A standard VGA, as every PC has a screen: it
        # added no measurable time to the small desktop's boot under TCG.
        "-nodefaults", "-no-user-config",
        "-vga", "std",
        "-display", display,
        # The serial console on qemu's stdout, which we stream to ours.
        "-serial", "stdio",
        "-kernel", str(spec.kernel),
        "-append", spec.append,
        # A guest reboot ends the run; QMP says it was a reset, not a power-off.
        "-no-reboot",
        # A guest panic is reported through pvpanic (GUEST_PANICKED) and makes
        # qemu exit 1 even if nobody reads the monitor.
        "-device", "pvpanic-pci",
        "-action", "panic=exit-failure",
        # Start paused; run_desktop sends `cont` once it listens to QMP.
        "-S",
        "-chardev", f"socket,id=monitor,fd={monitor_fd}",
        "-mon", "chardev=monitor,mode=control",
    ]
    if spec.initrd is not None:
        argv += ["-initrd", str(spec.initrd)]
    if overlay is not None:
        # cache=unsafe: the overlay is the desktop's scratch space, thrown away
        # (or kept for a look) after the run, so flushes to it buy nothing.
        drive = f"file={_option_value(overlay)},format=qcow2,if=virtio,cache=unsafe"
        if direct_disk:
            drive += ",backing.cache.direct=on"
        argv += ["-drive", drive]
    return argv + list(extra)


def _option_value(path: Path) -> str:
    """A path inside a qemu option string, where a comma must be doubled."""
    return str(path).replace(",", ",,")


@dataclass
class _Run:
    """What the tasks watching one qemu process learn."""

    console: TextIO | None
    text: list[str] = field(default_factory=list)
    stderr: bytearray = field(default_factory=bytearray)
    events: list[dict] = field(default_factory=list)
    pending_cr: bool = False
    partial_line: str = ""
    ready: trio.Event = field(default_factory=trio.Event)
    ready_at: float | None = None
    stopped_when_ready: bool = False
    failure: str = ""  # what went wrong after the session came up
    disk_read_bytes: int | None = None
    disk_read_ops: int | None = None

    def show(self, chunk: str) -> None:
        # Serial consoles end lines with \r\n; keep plain \n for the terminal and the record.
        if self.pending_cr:
            chunk = "\r" + chunk
        self.pending_cr = chunk.endswith("\r")
        if self.pending_cr:
            chunk = chunk[:-1]
        chunk = chunk.replace("\r\n", "\n")
        self.text.append(chunk)
        if self.ready_at is None:
            *lines, partial = (self.partial_line + chunk).split("\n")
            self.partial_line = partial[-4096:]
            if any(READY_LINE in line for line in lines):
                self.ready_at = time.monotonic()
                self.ready.set()
        if self.console is not None and chunk:
            try:
                self.console.write(chunk)
                self.console.flush()
            except (BrokenPipeError, ValueError):
                self.console = None  # the reader went away; keep booting, keep recording

    def event(self, name: str) -> dict | None:
        return next((e for e in self.events if e.get("event") == name), None)


async def run_desktop(spec: BootSpec, *, overlay_dir: Path | None = None,
                      timeout: float = DEFAULT_TIMEOUT, accel: str = "auto",
                      console: TextIO | None = None, qemu_args: Sequence[str] = (),
                      screen: Screen = Screen()) -> BootResult:
    """Boot `spec` once under qemu and return how it ended; qemu never outlives the call."""
    if not timeout > 0:
        raise CliError(f"timeout {timeout} must be a positive number of seconds")
    accel = await choose_accel(accel, spec.kernel)
    with contextlib.ExitStack() as stack:
        if overlay_dir is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="icbd-boot-")))
        else:
            folder = Path(overlay_dir)
        overlay = None
        if spec.disk is not None:
            overlay = await create_overlay(spec.disk, folder, f"{spec.name}@{spec.version}")
        log.info("booting %s@%s with %s%s", spec.name, spec.version, accel,
                 f", overlay {overlay}" if overlay else "")
        return await _run_qemu(spec, overlay, accel, timeout, console, qemu_args, screen)


async def _run_qemu(spec: BootSpec, overlay: Path | None, accel: str, timeout: float,
                    console: TextIO | None, qemu_args: Sequence[str], screen: Screen) -> BootResult:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    run = _Run(console)
    started = time.monotonic()
    try:
        direct = spec.disk is not None and disk_reads_direct(spec.disk)
        argv = qemu_command(spec, overlay, accel, theirs.fileno(), qemu_args, screen.display, direct)
        try:
            # Its own session: a Ctrl-C on the terminal reaches us, and we stop qemu.
            process = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
                start_new_session=True)
        except FileNotFoundError:
            raise CliError(f"{QEMU} is not installed: install qemu-system-x86") from None
        theirs.close()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        monitor = Monitor(stream, run.events.append)
        timed_out = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_read_console, process.stdout, run)
                nursery.start_soon(_read_stderr, process.stderr, run)
                nursery.start_soon(monitor.serve)
                watch, tell = trio.CancelScope(), trio.CancelScope()
                nursery.start_soon(_tell_the_mount_when_ready, run, spec.root, tell)
                if screen.waits_for_session:
                    nursery.start_soon(_stop_when_ready, monitor, run, screen, watch)
                with trio.move_on_after(timeout) as deadline:
                    await process.wait()
                watch.cancel()
                tell.cancel()
                timed_out = deadline.cancelled_caught
                if timed_out:
                    await _stop(process)
                # What qemu wrote before it exited is still in the pipes: the
                # readers drain it and end at EOF, but are stopped if they take longer.
                nursery.cancel_scope.deadline = trio.current_time() + REAP_TIMEOUT
        finally:
            await _stop(process)
            await stream.aclose()
    finally:
        theirs.close()
        ours.close()
    seconds = time.monotonic() - started
    outcome, message = _outcome(run, process.returncode, timed_out, timeout, screen)
    shot = screen.screenshot if outcome == "ready" and screen.screenshot is not None else None
    return BootResult(returncode=0 if outcome in ("poweroff", "ready") else 1, seconds=seconds,
                      console_text="".join(run.text), version=spec.version,
                      outcome=outcome, message=message,
                      ready_seconds=None if run.ready_at is None else run.ready_at - started,
                      screenshot=shot, disk_read_bytes=run.disk_read_bytes,
                      disk_read_ops=run.disk_read_ops)


async def _tell_the_mount_when_ready(run: _Run, root: Path, scope: trio.CancelScope) -> None:
    """Once the guest says its session is up, tell the icbd mount the version
    folder `root` lies in, which ends the version's boot profile recording
    there (icbdcore/mounts.py). Nothing to tell a plain folder."""
    with scope:
        await run.ready.wait()
        try:
            state = await trio.to_thread.run_sync(os.getxattr, root, SESSION_UP_XATTR, abandon_on_cancel=True)
            log.info("told the mount the session is up: its profile recording %s", state.decode(errors="replace"))
        except OSError as error:  # not an icbd mount (ENODATA, ENOTSUP): nobody to tell
            log.debug("no mount to tell at %s: %s", root, error)


async def _stop_when_ready(monitor: Monitor, run: _Run, screen: Screen, scope: trio.CancelScope) -> None:
    """Once the guest says its session is up: its disk reads so far, the
    screenshot, then stop qemu (its overlay is thrown away or kept as it is)."""
    with scope:
        await run.ready.wait()
        try:
            stats = await monitor.execute("query-blockstats")
            devices = [d.get("stats", {}) for d in stats or []]
            run.disk_read_bytes = sum(int(d.get("rd_bytes", 0)) for d in devices)
            run.disk_read_ops = sum(int(d.get("rd_operations", 0)) for d in devices)
            if screen.screenshot is not None:
                await screendump(monitor, screen.screenshot)
        except QmpError as error:
            run.failure = f"after the session came up: {error}"
        run.stopped_when_ready = True
        with contextlib.suppress(QmpError):
            await monitor.execute("quit")


def _outcome(run: _Run, returncode: int | None, timed_out: bool, timeout: float,
             screen: Screen = Screen()) -> tuple[str, str]:
    shutdown = run.event("SHUTDOWN")
    reason = (shutdown or {}).get("data", {}).get("reason")
    if timed_out:
        what = " without saying its session was up" if screen.waits_for_session and run.ready_at is None else ""
        return "timeout", f"the guest was still running after {timeout:g} s{what}: stopped it (raise --timeout?)"
    if run.stopped_when_ready:
        if run.failure:
            return "qemu-failed", run.failure
        return "ready", ""
    if run.event("GUEST_PANICKED") or reason == "guest-panic":
        return "panic", "the guest kernel panicked (see the console above)"
    if reason == "guest-shutdown" and returncode == 0:
        if screen.waits_for_session:
            return "not-ready", (f"the guest powered off without saying its session was up "
                                 f"(no {READY_LINE!r} line on its serial console)")
        return "poweroff", ""
    if reason == "guest-reset":
        return "reset", ("the guest rebooted or crashed early (before pvpanic could report a "
                         "panic): check the kernel, initrd and append line")
    detail = _last_line(bytes(run.stderr)) or f"exit status {returncode}"
    return "qemu-failed", f"qemu failed: {detail}"


async def _read_console(stream: trio.abc.ReceiveStream, run: _Run) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := await stream.receive_some(65536):
        run.show(decoder.decode(chunk))
    run.show(decoder.decode(b"", final=True))


async def _read_stderr(stream: trio.abc.ReceiveStream, run: _Run) -> None:
    while chunk := await stream.receive_some(65536):
        run.stderr += chunk
        del run.stderr[:-65536]  # only the end matters: qemu's last words


async def _stop(process: trio.Process) -> None:
    """Kill qemu if it still runs and reap it, within REAP_TIMEOUT even if cancelled."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with trio.move_on_after(REAP_TIMEOUT):
                await process.wait()
            if process.returncode is None:
                log.warning("qemu (pid %d) does not die; leaving it to the kernel", process.pid)


def _last_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---- API and command line ---------------------------------------------------

async def boot_async(mount: Path, name: str, version: int | None = None, *,
                     overlay_dir: Path | None = None, timeout: float = DEFAULT_TIMEOUT,
                     console: TextIO | None = None, accel: str = "auto",
                     overrides: Mapping[str, str | None] | None = None,
                     qemu_args: Sequence[str] = (), screen: Screen = Screen()) -> BootResult:
    """Boot NAME (VERSION, or latest) from `mount`; for callers already under trio."""
    spec = load_spec(Path(mount), name, version, overrides)
    return await run_desktop(spec, overlay_dir=overlay_dir, timeout=timeout, accel=accel,
                             console=console, qemu_args=qemu_args, screen=screen)


def boot(mount: Path, name: str, version: int | None = None, *,
         overlay_dir: Path | None = None, timeout: float = DEFAULT_TIMEOUT,
         console: TextIO | None = None, accel: str = "auto",
         overrides: Mapping[str, str | None] | None = None,
         qemu_args: Sequence[str] = (), screen: Screen = Screen()) -> BootResult:
    """Boot NAME (VERSION, or latest) from `mount` and wait until the guest stops
    (or, as `screen` asks, until its session is up).

    Raises CliError for what the user must fix (a bad name, version or
    icbd-boot.toml); a guest that panics, reboots or overruns `timeout`
    gives a BootResult with a non-zero returncode.
    """
    return trio.run(lambda: boot_async(
        mount, name, version, overlay_dir=overlay_dir, timeout=timeout, console=console,
        accel=accel, overrides=overrides, qemu_args=qemu_args, screen=screen))


def parse_target(target: str) -> tuple[str, int | None]:
    """NAME or NAME@VERSION."""
    name, at, version = target.partition("@")
    try:
        return check_name(name), (parse_version(version) if at else None)
    except InvalidInput as error:
        raise CliError(f"{error} in {target!r}: give NAME or NAME@VERSION") from None


def main(args) -> int:
    """`icbd boot NAME[@VERSION] --mount MOUNTPOINT ...`: exit 0 when the guest powers
    off, or with --screenshot once its session is up and the screen is saved."""
    name, version = parse_target(args.target)
    overrides = {key: getattr(args, key) for key in CONFIG_KEYS}
    screen = Screen(display=args.display or "none",
                    screenshot=Path(args.screenshot).absolute() if args.screenshot else None)
    if screen.screenshot is not None and not screen.screenshot.parent.is_dir():
        raise CliError(f"no folder {screen.screenshot.parent} for the screenshot: create it first")
    # A person at the display decides when the desktop stops; headless runs time out.
    timeout = args.timeout if args.timeout is not None else (
        math.inf if screen.display != "none" else DEFAULT_TIMEOUT)
    spec = load_spec(Path(args.mount), name, version, overrides)
    overlay_dir = Path(args.overlay) if args.overlay else None
    qemu_args = [a for a in args.qemu_args if a != "--"]
    outcome: list[BootResult | CliError] = []

    async def run_until_signal() -> None:
        # Ctrl-C, SIGTERM and SIGHUP cancel the run, whose cleanup stops qemu
        # and removes the temporary overlay; no KeyboardInterrupt in mid-air.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                async def run() -> None:
                    try:
                        outcome.append(await run_desktop(
                            spec, overlay_dir=overlay_dir, timeout=timeout, accel=args.accel,
                            console=sys.stdout, qemu_args=qemu_args, screen=screen))
                    except CliError as error:
                        outcome.append(error)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(run)
                async for signum in signals:
                    outcome.append(CliError(f"stopped the desktop on {signal.Signals(signum).name}",
                                            exit_code=128 + signum))
                    nursery.cancel_scope.cancel()
                    break

    trio.run(run_until_signal)
    result = outcome[0]
    if isinstance(result, CliError):
        raise result
    if not result.ok:
        raise CliError(f"{name}@{result.version}: {result.message}",
                       exit_code=124 if result.outcome == "timeout" else 1)
    if result.outcome == "ready":
        shot = f"; screenshot saved to {result.screenshot}" if result.screenshot else ""
        print(f"icbd: {name}@{result.version}: session up after {result.ready_seconds:.1f} s{shot}",
              file=sys.stderr)
    return 0
