"""What every node process shares: its credential, running until a signal,
its persistent id and URL, and membership (registration, heartbeats, and the
token table the master hands out with each heartbeat reply).
"""

from __future__ import annotations

import logging
import secrets
import signal
from collections.abc import Awaitable, Callable

import httpx
import trio

from . import http
from .auth import MIN_TOKEN, BadTable, NodeTokens
from .clients import tls_failure
from .errors import CliError, plain_errors
from .layout import Layout
from .records import read_json, write_json
from .service import ReadyNotice, ServiceManager
from .wire import NODES_ROUTE, InvalidInput, check_node_url, heartbeat_path

log = logging.getLogger(__name__)

# The heartbeat key in which a node says which token table it holds, and the
# reply key in which the master sends a newer one.
TABLE_HELD = "token_table"
TABLE_SENT = "tokens"


def require_token(token: str | None, hint: str = "a node token from `icbd token create --role node`") -> str:
    if not token:
        raise CliError(f"no token: give --token-file FILE (or --token, or ICBD_TOKEN); {hint}")
    if len(token) < MIN_TOKEN:
        raise CliError(f"the token is too short: use at least {MIN_TOKEN} characters")
    return token


def advertised_url(given: str | None, listen: str, tls: http.ServerTls | None) -> str:
    """The URL other nodes and mounts call this node at: --advertise, or one
    made from --listen (https when the node has a certificate)."""
    url = given.rstrip("/") if given else http.url_for_listen(listen, tls)
    try:
        return check_node_url(url)
    except InvalidInput as error:
        raise CliError(f"--advertise: {error}") from None


def node_id(layout: Layout, role: str, given: str | None) -> str:
    """The node's id: --name if given, else one generated once and kept in DATA."""
    path = layout.node_id_file
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


def run_until_signal(main: Callable[..., Awaitable[None]], what: str = "icbd") -> int:
    """Run `main(shutdown, task_status=...)` under trio; SIGINT/SIGTERM set
    `shutdown`. Under systemd (icbdcore/service.py) the service manager
    hears READY=1 when `main` reports that it serves, STOPPING=1 at the
    signal, and WATCHDOG=1 from this loop while it turns."""
    manager = ServiceManager()

    async def wrapper() -> None:
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        log.info("%s: stopping", signal.Signals(signum).name)
                        manager.stopping()
                        shutdown.set()
                        return

            nursery.start_soon(watch_signals)
            nursery.start_soon(manager.feed_watchdog)
            await main(shutdown, task_status=ReadyNotice(manager, what))
            nursery.cancel_scope.cancel()

    try:
        with plain_errors():  # a CliError from inside the nursery: one line, no traceback
            trio.run(wrapper)
    except CliError:
        raise
    except OSError as error:
        raise CliError(str(error)) from None
    return 0


class Membership:
    """Registers a node with the master and keeps sending heartbeats.

    `master` is a client whose base URL is the master's. Each heartbeat
    carries `status()` and its answer goes to `on_reply`. While the master is
    unreachable the node carries on with what it has; it re-registers when
    the master no longer knows it (e.g. a new master).
    """

    def __init__(
        self,
        master: httpx.AsyncClient,
        node_id: str,
        role: str,
        site: str,
        url: str,
        status: Callable[[], dict],
        on_reply: Callable[[dict], Awaitable[None]] | None = None,
        interval: float = 2.0,
        tokens: NodeTokens | None = None,
    ):
        self.master = master
        self.registration = {"id": node_id, "role": role, "site": site, "url": url}
        self.status = status
        self.on_reply = on_reply
        self.interval = interval
        self.tokens = tokens
        self.answered = trio.Event()  # set at the first heartbeat reply
        self.reachable = False
        self._registered = False
        self._warned = False
        self._table_refusal: str | None = None  # the last reason a token table was refused, logged once
        self._poke = trio.Event()

    def poke(self) -> None:
        """Send the next heartbeat now (e.g. a transfer finished)."""
        self._poke.set()

    async def run(self) -> None:
        node = self.registration["id"]
        while True:
            registered_now = False
            try:
                # A heartbeat that takes longer than two periods counts as lost,
                # so a cut-off node notices within seconds, as the master does.
                timeout = max(2.0, 2 * self.interval)
                if not self._registered:
                    await self._post(NODES_ROUTE, self.registration, timeout)
                    self._registered = registered_now = True
                    log.info("registered with the master as %s", node)
                reply = await self._post(heartbeat_path(node), self._heartbeat(), timeout)
                if not self.reachable:
                    log.info("master reachable")
                self.reachable = True
                # The node's own part first: a reply may pin the master's key,
                # which the token table's signature is then checked against.
                await self._take(reply)
                self._take_tokens(reply)
                self.answered.set()
            except httpx.HTTPStatusError as error:
                if error.response.status_code == 404 and self._registered:
                    self._registered = False  # the master forgot this node: register again
                    if not registered_now:
                        continue  # at once; but a "master" that forgets at once is no master (a wrong URL)
                status = error.response.status_code
                why = {401: ": it does not know this node's token (check --token-file)",
                       403: ": this node's token lacks the node role"}.get(status, "")
                self._lost(f"master answered {status} to {error.request.url.path}{why}")
            except (httpx.HTTPError, OSError, ValueError, RecursionError) as error:
                self._lost(describe_error(error))
            with trio.move_on_after(self.interval):
                await self._poke.wait()
            self._poke = trio.Event()

    async def _take(self, reply: dict) -> None:
        """Hand a heartbeat reply to the node; whatever is wrong with it is
        logged, and the node carries on (a reply never ends a node)."""
        if self.on_reply is None:
            return
        try:
            await self.on_reply(reply)
        except Exception:
            log.exception("the master's heartbeat reply could not be taken; carrying on with what this node has")

    async def ready(self, timeout: float, shutdown: trio.Event) -> None:
        """Wait (up to `timeout` s, or until `shutdown`) for the master's first
        answer, when this node holds no token table yet: without one it can
        admit nobody."""
        if self.tokens is not None and not self.tokens.table.ready:
            with trio.move_on_after(timeout):
                async with trio.open_nursery() as nursery:

                    async def first(event: trio.Event) -> None:
                        await event.wait()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(first, self.answered)
                    nursery.start_soon(first, shutdown)
            if not self.tokens.table.ready and not shutdown.is_set():
                log.warning("no token table from the master yet: refusing credentials (503) until one comes")

    def _heartbeat(self) -> dict:
        doc = self.status()
        held = self.tokens.table.doc if self.tokens is not None else None
        if held is not None:
            doc[TABLE_HELD] = {"id": held["id"], "serial": held["serial"]}
        return doc

    def _take_tokens(self, reply: dict) -> None:
        if self.tokens is None or not isinstance(reply, dict) or reply.get(TABLE_SENT) is None:
            return
        try:
            self.tokens.offer(reply[TABLE_SENT])
        except (BadTable, ValueError) as error:
            if str(error) != self._table_refusal:  # the master sends it again with every reply: log it once
                held = "keeping the token table held" if self.tokens.table.ready else "no token table held"
                log.warning("%s: refusing the master's token table: %s", held, error)
            self._table_refusal = str(error)
        else:
            self._table_refusal = None

    async def _post(self, path: str, doc: dict, timeout: float) -> dict:
        response = await self.master.post(path, json=doc, timeout=timeout)
        response.raise_for_status()
        return response.json()

    def _lost(self, why: str) -> None:
        if self.reachable or not self._warned:
            log.warning("master unreachable (%s); carrying on with what this node holds", why)
        self.reachable = False
        self._warned = True


def describe_error(error: BaseException) -> str:
    """`ReadTimeout` or `ConnectError: [Errno 111] ...`: timeouts carry no text;
    a TLS failure says so, and what to check."""
    tls = tls_failure(error)
    if tls:
        return tls
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
