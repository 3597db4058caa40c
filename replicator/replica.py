"""The replica node: holds the versions of the iMIs it is subscribed to,
receives new ones as deltas, serves manifests and blocks, and keeps working
on what it holds while the master is unreachable."""

from __future__ import annotations

import logging
import shutil
from collections import deque
from pathlib import Path

import trio
from starlette.requests import Request
from starlette.responses import Response

from icbdcore import http
from icbdcore.auth import NODE, READER, NodeTokens
from icbdcore.catalog import Catalog, ImiInfo
from icbdcore.clients import Credentials, async_client
from icbdcore.errors import CliError
from icbdcore.http import OPEN, Endpoint, json_body, json_response
from icbdcore.layout import Layout
from icbdcore.logs import setup_logging
from icbdcore.manifest import Manifest, VersionRecord
from icbdcore.node import Membership, advertised_url, node_id, require_token, run_until_signal
from icbdcore.records import read_json, write_json
from icbdcore.wire import IMIS_ROUTE, NOTIFY_ROUTE, InvalidInput, check_name, check_site

from . import btrfs
from .blockindex import BlockIndex
from .readroutes import read_routes
from .receiver import ReceiveFailed, Receiver, Transfer

log = logging.getLogger(__name__)

TRANSFERS_KEPT = 20
# How long a first start waits for the master's token table before serving
# (answering 503 to credentials until it comes).
STARTUP_WAIT = 10.0
RETRY_MIN, RETRY_MAX = 1.0, 60.0
POLL = 10.0


class Replica:
    def __init__(
        self,
        data: Path,
        listen: str,
        master_url: str,
        credentials: Credentials,
        site: str,
        *,
        name: str | None = None,
        url: str | None = None,
        keep: int = 5,
        image_size: int = 64 << 30,
        heartbeat: float = 2.0,
        resume_spool: str = "auto",
        tls: http.ServerTls | None = None,
    ):
        self.data = data
        self.listen = listen
        self.master_url = master_url.rstrip("/")
        self.credentials = credentials
        self.site = check_site(site)
        self.given_name = name
        self.tls = tls
        self.url = url or http.url_for_listen(listen, tls)
        self.keep = max(1, keep)
        self.image_size = image_size
        self.heartbeat_interval = heartbeat
        self.resume_spool = resume_spool
        self.layout = Layout(data)
        self.tokens = NodeTokens(self.layout.token_table_file)
        self.blocks = BlockIndex(self.layout)
        self.held: dict[str, dict[int, VersionRecord]] = {}  # name -> version -> record
        self.catalog = Catalog()  # the subscribed iMIs, as the master last said
        self.transfers: deque[Transfer] = deque(maxlen=TRANSFERS_KEPT)
        self.id = ""
        self._wake = trio.Event()
        self._retry_at: dict[str, float] = {}
        self._retry_delay: dict[str, float] = {}
        self.membership: Membership | None = None

    # --- start-up -----------------------------------------------------------------

    async def run(self, shutdown: trio.Event, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await btrfs.ensure_btrfs(self.data, self.image_size)
        self.layout.make_dirs()
        self.id = node_id(self.layout, "replica", self.given_name)
        self.tokens.load()
        credentials = self.credentials.as_node(self.id)
        self.receiver = Receiver(self.layout, self.master_url, credentials, self.resume_spool)
        await self.receiver.clean_incoming()
        await self._load_held()
        self.catalog = _saved_catalog(self.layout)
        for doc in read_json(self.layout.transfers_file, []) or []:
            if doc.get("state") == "running":
                doc["state"], doc["error"] = "failed", "interrupted by a restart"
            self.transfers.append(_transfer_from_json(doc))
        master = async_client(credentials, self.master_url)
        self.membership = Membership(
            master, self.id, "replica", self.site, self.url, self.status_doc,
            on_reply=self._on_heartbeat_reply, interval=self.heartbeat_interval, tokens=self.tokens,
        )
        try:
            async with trio.open_nursery() as nursery:
                log.info("replica %s (site %s) on %s", self.id, self.site, self.listen)
                nursery.start_soon(self.membership.run)
                self._wake.set()  # resume what an earlier run left unfinished, now
                nursery.start_soon(self._sync_loop)
                await self.membership.ready(STARTUP_WAIT, shutdown)
                await http.serve(http.build_app(self.routes(), self.tokens.table), self.listen, shutdown,
                                 tls=self.tls, task_status=task_status)
                nursery.cancel_scope.cancel()
        finally:
            await master.aclose()
            self._save_transfers()
        log.info("replica %s stopped", self.id)

    async def _load_held(self) -> None:
        for imi_dir in sorted(self.layout.imis.iterdir()):
            name = imi_dir.name
            for path in sorted(imi_dir.iterdir()):
                if not path.name.isdigit():
                    continue
                version = int(path.name)
                record = _version_record(self.layout, name, version)
                if record is None or not btrfs.is_subvolume(path):
                    log.warning("%s: version %d has no record; removing it", name, version)
                    await btrfs.remove_tree(path)
                    continue
                if not btrfs.get_readonly(path):
                    btrfs.set_readonly(path, True)  # a crash inside move_readonly_subvolume
                manifest = Manifest.from_bytes(self.layout.manifest_file(name, version).read_bytes(), record.digest)
                self.blocks.add(name, version, manifest)
                self.held.setdefault(name, {})[version] = record
        log.info("holding %s", {n: sorted(v) for n, v in self.held.items()} or "nothing")

    # --- status ---------------------------------------------------------------------

    def versions_held(self) -> dict[str, list[int]]:
        return {name: sorted(versions) for name, versions in sorted(self.held.items()) if versions}

    def status_doc(self) -> dict:
        return {
            "id": self.id,
            "role": "replica",
            "site": self.site,
            "url": self.url,
            "versions": self.versions_held(),
            "transfers": [t.to_json() for t in self.transfers],
            "master_reachable": bool(self.membership and self.membership.reachable),
            "disk": dict(zip(("total", "used", "free"), shutil.disk_usage(self.data), strict=True)),
            "blocks": len(self.blocks),
            "served": {"blocks": self.blocks.served_blocks, "bytes": self.blocks.served_bytes},
        }

    def _save_transfers(self) -> None:
        self._save(self.layout.transfers_file, [t.to_json() for t in self.transfers])

    def _save(self, path: Path, doc: object) -> None:
        """Keep a record across restarts; on a full disk, keep it in memory only
        (a replica must outlive its disk filling up)."""
        try:
            write_json(path, doc)
        except OSError as error:
            log.warning("cannot save %s: %s", path.name, error.strerror or error)

    # --- what the master says -------------------------------------------------------------

    async def _on_heartbeat_reply(self, reply: dict) -> None:
        subscriptions = reply.get("subscriptions") if isinstance(reply, dict) else None
        if not isinstance(subscriptions, dict):
            log.warning("the master's heartbeat reply has no subscriptions; keeping the last catalogue")
            return
        try:
            catalog = Catalog.from_json({"imis": list(subscriptions.values())})
        except InvalidInput as error:
            log.warning("the master's heartbeat reply is malformed (%s); keeping the last catalogue", error)
            return
        if catalog != self.catalog:
            self.catalog = catalog
            self._save(self.layout.catalog_file, catalog.to_json())
            self._wake.set()

    def wanted(self, name: str) -> list[int]:
        """The versions this replica should hold: the newest `keep`, and latest."""
        info = self.catalog.imis.get(name)
        if info is None:
            return []
        wanted = set(info.newest(self.keep))
        if info.latest is not None:
            wanted.add(info.latest)
        return sorted(wanted)

    def _on_master(self, name: str) -> set[int]:
        info = self.catalog.imis.get(name)
        return set(info.versions) if info else set()

    def choose_parent(self, name: str, version: int) -> int | None:
        """The held version, also still on the master, nearest below `version`
        (else nearest above): the smallest delta this replica can apply."""
        shared = sorted(set(self.held.get(name, {})) & self._on_master(name))
        below = [v for v in shared if v < version]
        above = [v for v in shared if v > version]
        if below:
            return below[-1]
        return above[0] if above else None

    # --- sync -------------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        while True:
            timeout = POLL
            if self._retry_at:
                timeout = min(POLL, max(0.05, min(self._retry_at.values()) - trio.current_time()))
            with trio.move_on_after(timeout):
                await self._wake.wait()
            self._wake = trio.Event()
            if self.membership is not None and not self.membership.reachable:
                continue
            for name in sorted(set(self.catalog.imis) | set(self.held)):
                await self._sync_imi(name)

    async def _sync_imi(self, name: str) -> None:
        info = self.catalog.imis.get(name)
        if info is None:
            await self._drop_imi(name, "no longer subscribed")
            return
        await self._check_uuid(info)
        if trio.current_time() < self._retry_at.get(name, 0):
            return
        for version in self.wanted(name):
            if version in self.held.get(name, {}):
                continue
            if not await self._fetch(name, version, info.versions[version]):
                return
        await self._prune(name)

    async def _check_uuid(self, info: ImiInfo) -> None:
        """Drop what this replica holds of an iMI the master has re-created
        under the same name: its versions are not the new one's."""
        record = self.layout.imi_record(info.name)
        known = read_json(record, {})
        known = known if isinstance(known, dict) else {}
        if known.get("uuid") not in (None, info.uuid):
            await self._drop_imi(info.name, "the master re-created it")
        if known.get("uuid") != info.uuid:
            self._save(record, {"uuid": info.uuid})

    async def _fetch(self, name: str, version: int, record: VersionRecord) -> bool:
        parent = self.choose_parent(name, version)
        transfer = Transfer(name, version, parent)
        self.transfers.append(transfer)
        log.info("fetching %s version %d (%s)", name, version, f"delta from {parent}" if parent else "full")
        try:
            manifest = await self.receiver.receive(name, version, parent, record, transfer)
        except Exception as error:  # one failed transfer must never take the replica down
            if not isinstance(error, ReceiveFailed | OSError | btrfs.BtrfsError | ValueError):
                log.exception("%s version %d: unexpected failure", name, version)
            transfer.finish(str(error) or type(error).__name__)
            delay = min(self._retry_delay.get(name, RETRY_MIN / 2) * 2, RETRY_MAX)
            self._retry_delay[name] = delay
            self._retry_at[name] = trio.current_time() + delay
            log.error("%s version %d failed: %s (retrying in %.0fs)", name, version, error, delay)
            self._save_transfers()
            if self.membership:
                self.membership.poke()
            return False
        transfer.finish()
        self._retry_delay.pop(name, None)
        self._retry_at.pop(name, None)
        self.blocks.add(name, version, manifest)
        self.held.setdefault(name, {})[version] = record
        self._save_transfers()
        log.info("holding %s version %d (%d bytes in %.2fs)", name, version, transfer.bytes, transfer.seconds)
        if self.membership:
            self.membership.poke()
        return True

    async def _prune(self, name: str) -> None:
        held = self.held.get(name, {})
        keep = set(self.wanted(name))
        shared = sorted(set(held) & self._on_master(name))
        if shared:
            keep.add(shared[-1])  # the parent of the next delta
        for version in sorted(set(held) - keep):
            await self._remove_version(name, version)

    async def _remove_version(self, name: str, version: int) -> None:
        log.info("pruning %s version %d", name, version)
        self.held[name].pop(version, None)
        self.blocks.remove(name, version)
        await btrfs.remove_tree(self.layout.version_dir(name, version))
        self.layout.version_record(name, version).unlink(missing_ok=True)
        self.layout.manifest_file(name, version).unlink(missing_ok=True)

    async def _drop_imi(self, name: str, why: str) -> None:
        if not self.held.get(name):
            self.held.pop(name, None)
            return
        log.info("dropping %s: %s", name, why)
        for version in sorted(self.held.get(name, {})):
            await self._remove_version(name, version)
        self.held.pop(name, None)

    # --- routes -------------------------------------------------------------------------

    async def status(self, request: Request) -> Response:
        return json_response(self.status_doc())

    async def notify(self, request: Request) -> Response:
        body = await json_body(request)
        check_name(body.get("imi"))
        if self.membership:
            self.membership.poke()  # the heartbeat reply brings the new catalogue
        self._retry_at.pop(body["imi"], None)
        self._wake.set()
        return json_response({"ok": True})

    async def list_imis(self, request: Request) -> Response:
        imis = []
        for name, versions in sorted(self.held.items()):
            info = self.catalog.imis.get(name)
            latest = info.latest if info else None
            imis.append({
                "name": name,
                "latest": latest if latest in versions else max(versions, default=None),
                "versions": [versions[v].to_json() for v in sorted(versions)],
            })
        return json_response({"imis": imis})

    def _manifest(self, name: str, version: int) -> tuple[bytes, str] | None:
        record = self.held.get(name, {}).get(version)
        if record is None:
            return None
        return self.layout.manifest_file(name, version).read_bytes(), record.digest

    def routes(self) -> list[Endpoint]:
        """Every route of a replica and the role it needs (docs/API.md)."""
        return [
            Endpoint("GET", "/", self.status, OPEN),
            Endpoint("POST", NOTIFY_ROUTE, self.notify, NODE),
            Endpoint("GET", IMIS_ROUTE, self.list_imis, READER),
            *read_routes(self._manifest, self.blocks),
        ]


def _transfer_from_json(doc: dict) -> Transfer:
    transfer = Transfer(doc["imi"], doc["version"], doc.get("parent"))
    transfer.state = doc.get("state", "failed")
    transfer.bytes = doc.get("bytes", 0)
    transfer.network_bytes = doc.get("network_bytes", 0)
    transfer.seconds = doc.get("seconds", 0.0)
    transfer.started = doc.get("started", "")
    transfer.error = doc.get("error")
    transfer.resumed_from = doc.get("resumed_from", 0)
    return transfer


def run(args) -> int:
    setup_logging(args.log, args.verbose)
    token = require_token(args.token)
    if not args.master:
        raise CliError("a replica needs --master URL (or ICBD_MASTER)")
    tls = http.ServerTls.from_options(args.tls_cert, args.tls_key)
    replica = Replica(
        Path(args.data).resolve(), args.listen, args.master, Credentials(token, ca=args.ca), args.site,
        name=args.name, url=advertised_url(args.advertise, args.listen, tls), keep=args.keep,
        image_size=args.image_size, heartbeat=args.heartbeat, resume_spool=args.resume_spool, tls=tls,
    )
    return run_until_signal(replica.run)


def _saved_catalog(layout: Layout) -> Catalog:
    try:
        return Catalog.from_json(read_json(layout.catalog_file, {"imis": []}))
    except (InvalidInput, ValueError) as error:
        log.warning("ignoring %s (%s); waiting for the master's catalogue", layout.catalog_file, error)
        return Catalog()


def _version_record(layout: Layout, name: str, version: int) -> VersionRecord | None:
    doc = read_json(layout.version_record(name, version))
    try:
        return VersionRecord.from_json(doc) if isinstance(doc, dict) else None
    except (KeyError, TypeError, ValueError):
        return None
