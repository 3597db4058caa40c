"""Recording the reads a mount serves into a read trace (icbdcore/trace.py).

A read only appends a line to a list; a task of the mount's nursery writes
the list out every FLUSH_EVERY seconds in a worker thread, and once more when
the mount stops, so the request path never waits on the trace's disk.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import trio

from icbdcore.trace import TracedRead, header_line

log = logging.getLogger(__name__)

FLUSH_EVERY = 0.5


class ReadTracer:
    def __init__(self, path: Path):
        """Start a trace in `path` (replaced if it exists); raises OSError."""
        self.path = path
        self._file = open(path, "w", encoding="ascii")  # noqa: SIM115 (closed by close())
        self._started = trio.current_time()
        self._file.write(header_line(time.time()))
        self._file.flush()
        self._pending: list[str] = []
        self.reads = 0

    def now(self) -> float:
        """Seconds since the trace began (what a read's `t` is)."""
        return trio.current_time() - self._started

    def read(self, began: float, file: str, off: int, size: int, ok: bool) -> None:
        """A read of `size` bytes at `off` of `file` that began at `began` (from now()) has been answered."""
        self._pending.append(TracedRead(began, max(0.0, self.now() - began), file, off, size, ok).to_line())
        self.reads += 1

    async def keep_writing(self) -> None:
        """Write what was recorded every FLUSH_EVERY seconds until cancelled, then the rest."""
        try:
            while True:
                await trio.sleep(FLUSH_EVERY)
                await self._flush()
        finally:
            with trio.CancelScope(shield=True):
                await self._flush()
                await trio.to_thread.run_sync(self._file.close)

    async def _flush(self) -> None:
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        try:
            await trio.to_thread.run_sync(self._write, "".join(lines))
        except OSError as error:
            log.warning("cannot write the read trace %s: %s", self.path, error)

    def _write(self, text: str) -> None:
        self._file.write(text)
        self._file.flush()
