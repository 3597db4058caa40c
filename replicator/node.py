"""What every node process shares: logging, the token, running until a
signal, its persistent id, and membership (registration and heartbeats).
"""

from __future__ import annotations

import logging
import logging.handlers
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import trio

from icbdfs.errors import CliError

from .records import read_json, write_json
from .wire import API, NODE_HEADER

log = logging.getLogger(__name__)

LOG_BYTES = 10 << 20
LOG_BACKUPS = 3


def setup_logging(log_file: str | None, verbose: bool) -> None:
    """Log to stderr, or to a file rotated at 10 MiB (three kept)."""
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=LOG_BYTES, backupCount=LOG_BACKUPS
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("httpx", "httpcore", "hypercorn.access", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def require_token(token: str | None) -> str:
    if not token:
        raise CliError("no token: give --token or set ICBD_TOKEN (the same on every node)")
    if len(token) < 8:
        raise CliError("the token is too short: use at least 8 characters")
    return token


def node_id(data: Path, role: str, given: str | None) -> str:
    """The node's id: --name if given, else one generated once and kept in DATA."""
    path = data / "node-id.json"
    doc = read_json(path, {})
    if given:
        if doc.get("id") != given:
            write_json(path, {"id": given})
        return given
    if isinstance(doc, dict) and doc.get("id"):
        return doc["id"]
    generated = f"{role}-{secrets.token_hex(3)}"
    write_json(path, {"id": generated})
    return generated


def run_until_signal(main: Callable[[trio.Event], Awaitable[None]]) -> int:
    """Run `main(shutdown)` under trio; SIGINT/SIGTERM set `shutdown`."""

    async def wrapper() -> None:
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        log.info("%s: stopping", signal.Signals(signum).name)
                        shutdown.set()
                        return

            nursery.start_soon(watch_signals)
            await main(shutdown)
            nursery.cancel_scope.cancel()

    try:
        trio.run(wrapper)
    except CliError:
        raise
    except OSError as error:
        raise CliError(str(error)) from None
    return 0


class NodeClient:
    """Async calls from one node to another (control traffic, JSON)."""

    def __init__(self, base_url: str, token: str, node_id: str | None = None, timeout: float = 10.0):
        headers = {"Authorization": f"Bearer {token}"}
        if node_id:
            headers[NODE_HEADER] = node_id
        self.base_url = base_url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def get_json(self, path: str, **params) -> dict:
        response = await self.http.get(path, params=params or None)
        response.raise_for_status()
        return response.json()

    async def post_json(self, path: str, doc: dict, timeout: float | None = None) -> dict:
        kwargs = {"timeout": timeout} if timeout else {}
        response = await self.http.post(path, json=doc, **kwargs)
        response.raise_for_status()
        return response.json()

    async def get_bytes(self, path: str) -> bytes:
        response = await self.http.get(path)
        response.raise_for_status()
        return response.content


class Membership:
    """Registers a node with the master and keeps sending heartbeats.

    Each heartbeat carries `status()` and its answer goes to `on_reply`. While
    the master is unreachable the node carries on with what it has; it
    re-registers when the master no longer knows it (e.g. a new master).
    """

    def __init__(
        self,
        master: NodeClient,
        node_id: str,
        role: str,
        site: str,
        url: str,
        status: Callable[[], dict],
        on_reply: Callable[[dict], Awaitable[None]] | None = None,
        interval: float = 2.0,
    ):
        self.master = master
        self.registration = {"id": node_id, "role": role, "site": site, "url": url}
        self.status = status
        self.on_reply = on_reply
        self.interval = interval
        self.reachable = False
        self._registered = False
        self._warned = False
        self._poke = trio.Event()

    def poke(self) -> None:
        """Send the next heartbeat now (e.g. a transfer finished)."""
        self._poke.set()

    async def run(self) -> None:
        node = self.registration["id"]
        while True:
            try:
                # A heartbeat that takes longer than two periods counts as lost,
                # so a cut-off node notices within seconds, as the master does.
                timeout = max(2.0, 2 * self.interval)
                if not self._registered:
                    await self.master.post_json(f"{API}/nodes", self.registration, timeout=timeout)
                    self._registered = True
                    log.info("registered with the master as %s", node)
                reply = await self.master.post_json(f"{API}/nodes/{node}/heartbeat", self.status(), timeout=timeout)
                if not self.reachable:
                    log.info("master reachable")
                self.reachable = True
                if self.on_reply is not None:
                    await self.on_reply(reply)
            except httpx.HTTPStatusError as error:
                if error.response.status_code == 404:
                    self._registered = False
                    continue
                self._lost(f"master answered {error.response.status_code}")
            except (httpx.HTTPError, OSError, ValueError, RecursionError) as error:
                self._lost(describe_error(error))
            with trio.move_on_after(self.interval):
                await self._poke.wait()
            self._poke = trio.Event()

    def _lost(self, why: str) -> None:
        if self.reachable or not self._warned:
            log.warning("master unreachable (%s); carrying on with what this node holds", why)
        self.reachable = False
        self._warned = True


def describe_error(error: BaseException) -> str:
    """`ReadTimeout` or `ConnectError: [Errno 111] ...`: timeouts carry no text."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
