"""A QMP client for one qemu process: the greeting, commands by id, events.

`icbd boot` hands qemu one end of a socket pair as its monitor (`-mon
mode=control`) and starts it paused (-S). `Monitor.serve` reads that socket
until qemu closes it: it answers the greeting with `qmp_capabilities` and
`cont`, so that no event is lost, records every event, and routes each reply
to the `execute` call waiting for it (QMP echoes the "id" of a command).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger(__name__)


class QmpError(RuntimeError):
    """A command failed in qemu, or qemu went away before it answered."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        super().__init__(f"{command}: {description}")
        self.error_class = error_class
        self.description = description


class Monitor:
    """One QMP connection. Run `serve()` in a task; call `execute()` from others."""

    def __init__(self, stream: trio.SocketStream, on_event: Callable[[dict], None],
                 resume: bool = True) -> None:
        self._stream = stream
        self._on_event = on_event
        self._resume = resume
        self._send_lock = trio.Lock()
        self._waiting: dict[int, trio.Event] = {}
        self._replies: dict[int, dict] = {}
        self._next_id = 0
        self._closed = False

    async def serve(self) -> None:
        """Read until qemu closes the monitor; then wake every caller still waiting."""
        buffer = b""
        try:
            while chunk := await self._stream.receive_some(65536):
                *lines, buffer = (buffer + chunk).split(b"\n")
                for line in lines:
                    await self._handle(line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # qemu went away; its exit status and the events so far tell the rest
        finally:
            self._closed = True
            for event in self._waiting.values():
                event.set()

    async def _handle(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        if "QMP" in message:  # the greeting: qemu waits paused (-S) for us
            commands = [{"execute": "qmp_capabilities"}]
            if self._resume:
                commands.append({"execute": "cont"})
            await self._send(b"".join(json.dumps(c).encode() + b"\n" for c in commands))
        elif "event" in message:
            log.debug("qmp event %s", message)
            self._on_event(message)
        elif isinstance(message.get("id"), int) and message["id"] in self._waiting:
            self._replies[message["id"]] = message
            self._waiting.pop(message["id"]).set()
        elif "error" in message:
            log.warning("qmp error: %s", message["error"])

    async def execute(self, command: str, arguments: dict | None = None) -> Any:
        """Run one command and return its "return" value; QmpError if it failed."""
        if self._closed:
            raise QmpError(command, "Gone", "qemu has closed its monitor")
        self._next_id += 1
        ident = self._next_id
        done = self._waiting[ident] = trio.Event()
        request = {"execute": command, "id": ident}
        if arguments:
            request["arguments"] = arguments
        await self._send(json.dumps(request).encode() + b"\n")
        await done.wait()
        reply = self._replies.pop(ident, None)
        if reply is None:
            raise QmpError(command, "Gone", "qemu closed its monitor before it answered")
        if "error" in reply:
            error = reply["error"]
            raise QmpError(command, str(error.get("class")), str(error.get("desc")))
        return reply.get("return")

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            await self._stream.send_all(data)


async def screendump(monitor: Monitor, dest: Path) -> None:
    """Save the guest's screen as a PNG at `dest`.

    qemu 7.1 and later write PNG themselves (screendump's "format"); an older
    qemu writes PPM, which Pillow converts, if it is installed.
    """
    dest = Path(dest).absolute()
    try:
        await monitor.execute("screendump", {"filename": str(dest), "format": "png"})
        return
    except QmpError as error:
        if "format" not in error.description:
            raise
    ppm = dest.with_name(f".{dest.name}.ppm")
    try:
        await monitor.execute("screendump", {"filename": str(ppm)})
        await trio.to_thread.run_sync(_ppm_to_png, ppm, dest)
    finally:
        ppm.unlink(missing_ok=True)


def _ppm_to_png(ppm: Path, png: Path) -> None:
    try:
        from PIL import Image
    except ImportError:
        raise QmpError("screendump", "Unsupported",
                       "this qemu writes no PNG and Pillow is not installed to convert its PPM") from None
    with Image.open(ppm) as image:
        image.save(png, format="PNG")
