"""What a process tells its service manager (systemd's sd_notify protocol):
READY=1 once it serves, STOPPING=1 when it begins to stop, and WATCHDOG=1
every half of WatchdogSec while its trio loop turns.

The messages go through the `sdnotify` package (a connected datagram
socket to NOTIFY_SOCKET; 40 lines, no C library to build), which does
nothing where NOTIFY_SOCKET is unset: a process started by hand, by the
tests or by another manager behaves exactly as before. systemd's own
Python bindings (`systemd.daemon.notify`) would do the same but need
libsystemd's headers and a compiler at install time.

The watchdog is fed from a task of the trio loop itself, not from a
thread: a loop that stops turning (a handler stuck in a blocking call)
stops the pings, and systemd restarts the service.
"""

from __future__ import annotations

import logging
import os

import trio

log = logging.getLogger(__name__)


class ServiceManager:
    """The service manager this process reports to, if any."""

    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        self.socket = env.get("NOTIFY_SOCKET") or None
        self.watchdog_interval = _watchdog_interval(env)
        self._notifier = None
        if self.socket:
            import sdnotify

            self._notifier = sdnotify.SystemdNotifier()

    @property
    def present(self) -> bool:
        return self._notifier is not None

    def notify(self, *lines: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(lines))

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str = "stopping") -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    async def feed_watchdog(self) -> None:
        """Send WATCHDOG=1 every half of the watchdog interval, forever;
        returns at once when there is no watchdog."""
        if self.watchdog_interval is None or self._notifier is None:
            return
        log.debug("feeding the service manager's watchdog every %.1f s", self.watchdog_interval / 2)
        while True:
            self.notify("WATCHDOG=1")
            await trio.sleep(self.watchdog_interval / 2)


def _watchdog_interval(env) -> float | None:
    """WATCHDOG_USEC in seconds, if it is meant for this process (WATCHDOG_PID
    unset or this pid)."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1e6


class ReadyNotice:
    """A trio task_status for a server: when it says it has started (it
    listens), the service manager hears READY=1."""

    def __init__(self, manager: ServiceManager, what: str):
        self.manager = manager
        self.what = what
        self.started_with = None

    def started(self, value=None) -> None:
        self.started_with = value
        where = ", ".join(value) if isinstance(value, list | tuple) else ""
        self.manager.ready(f"{self.what} serving on {where}" if where else f"{self.what} serving")
