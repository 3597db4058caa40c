"""The replica node: holds the versions of the iMIs it is subscribed to,
receives new ones as deltas, serves manifests and blocks, and keeps working
on what it holds while the master is unreachable.

It believes only what the master's key signed (icbdcore/trust.py): the
catalogue in its heartbeat replies (never an older one than it has seen),
each version record in it, and the stream record whose digest the received
stream must have; the manifest must have the digest the record gives."""

from __future__ import annotations

import logging
import shutil
from collections import Counter, deque
from pathlib import Path

import httpx
import trio
from starlette.requests import Request
from starlette.responses import Response

from icbdcore import http, metrics
from icbdcore.auth import NODE, READER, BadTable, NodeTokens
from icbdcore.catalog import Catalog, ImiInfo
from icbdcore.clients import Credentials, async_client
from icbdcore.errors import CliError
from icbdcore.http import OPEN, Endpoint, json_body, json_response
from icbdcore.layout import DATA_FORMAT, Layout
from icbdcore.logs import request_id, setup_logging
from icbdcore.manifest import MAX_MANIFEST, Manifest, VersionRecord
from icbdcore.node import (
    Membership,
    advertised_url,
    describe_error,
    node_id,
    require_token,
    run_until_signal,
)
from icbdcore.records import read_capped, read_json, write_json
from icbdcore.signing import PublicKey, Untrusted
from icbdcore.trust import SignedCatalog, Trust, master_key_argument
from icbdcore.wire import (
    IMIS_ROUTE,
    METRICS_ROUTE,
    NOTIFY_ROUTE,
    InvalidInput,
    check_name,
    check_site,
)

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
        master_key: PublicKey | None = None,
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
        self.master_key = master_key
        # The master's table of tokens, believed only with its signature.
        self.tokens = NodeTokens(self.layout.token_table_file, verify=self._verify_table)
        self.blocks = BlockIndex(self.layout)
        self.held: dict[str, dict[int, VersionRecord]] = {}  # name -> version -> record
        self.trust: Trust | None = None  # made in run(), once DATA is there
        self.signed: SignedCatalog | None = None  # the newest catalogue the master signed
        self.catalog = Catalog()  # the subscribed iMIs, as the master last said
        self.transfers: deque[Transfer] = deque(maxlen=TRANSFERS_KEPT)
        # Finished transfers since start, for metrics: (imi, result) -> count; imi -> bytes, seconds.
        self.transfer_counts: Counter[tuple[str, str]] = Counter()
        self.transfer_bytes: Counter[str] = Counter()
        self.transfer_seconds: Counter[str] = Counter()
        self.id = ""
        self._wake = trio.Event()
        self._retry_at: dict[str, float] = {}
        self._retry_delay: dict[str, float] = {}
        self.membership: Membership | None = None
        # Set once a heartbeat reply said what is subscribed (with a catalogue
        # the master signed): only then is a resume spool known to be stale.
        self.subscriptions_known = False
        self._refusal: str | None = None  # the last reason a heartbeat reply was refused, logged once

    # --- start-up -----------------------------------------------------------------

    async def run(self, shutdown: trio.Event, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await btrfs.ensure_btrfs(self.data, self.image_size)
        _check_format(self.layout)
        self.layout.make_dirs()
        self.layout.mark_format()
        self.id = node_id(self.layout, "replica", self.given_name)
        self.trust = Trust(self.layout, self.master_key)
        credentials = self.credentials.as_node(self.id)
        master = async_client(credentials, self.master_url)
        self.master = master
        if self.trust.key is None and any(self.layout.imis.iterdir()):
            await self._first_contact()  # the records held must be checked against some key
        self.tokens.load()
        self.receiver = Receiver(self.layout, self.master_url, credentials, self.resume_spool, self.trust)
        await self.receiver.clean_incoming()
        await self._load_held()
        self.signed = self.trust.saved_catalog()
        if self.signed is not None:  # until the master says what is subscribed: what is held
            self.catalog = Catalog({n: i for n, i in self.signed.catalog.imis.items() if n in self.held})
        # Resume spools stay until the master has said what is subscribed: a
        # spool of a version not held yet is what this start resumes from.
        for doc in read_json(self.layout.transfers_file, []) or []:
            if doc.get("state") == "running":
                doc["state"], doc["error"] = "failed", "interrupted by a restart"
            self.transfers.append(_transfer_from_json(doc))
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
                with metrics.NodeCollector(self.describe_metrics):
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
                record = self._version_record(name, version)
                if record is None or not btrfs.is_subvolume(path):
                    log.warning("%s: version %d has no record the master signed; removing it", name, version)
                    await btrfs.remove_tree(path)
                    continue
                if not btrfs.get_readonly(path):
                    btrfs.set_readonly(path, True)  # a crash inside move_readonly_subvolume
                raw = read_capped(self.layout.manifest_file(name, version), MAX_MANIFEST)
                manifest = Manifest.from_bytes(raw, record.digest)
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
            **(self.trust.freshness() if self.trust else {}),
        }

    def describe_metrics(self, sample: metrics.Sample) -> None:
        metrics.node_info(sample, self.id, "replica", self.site)
        sample.add("icbd_master_reachable", bool(self.membership and self.membership.reachable))
        if self.trust is not None:
            metrics.describe_catalog(sample, self.trust.freshness())
        for name, versions in self.versions_held().items():
            sample.add("icbd_replica_versions_held", len(versions), imi=name)
        for (name, result), count in sorted(self.transfer_counts.items()):
            sample.add("icbd_transfers_total", count, imi=name, result=result)
        for name in sorted(self.transfer_bytes.keys() | self.transfer_seconds.keys()):
            sample.add("icbd_transfer_bytes_total", self.transfer_bytes[name], imi=name)
            sample.add("icbd_transfer_seconds_total", round(self.transfer_seconds[name], 3), imi=name)
        running = [t for t in self.transfers if t.state == "running"]
        sample.add("icbd_transfers_running", len(running))
        sample.add("icbd_transfer_running_bytes", sum(t.network_bytes for t in running))
        sample.add("icbd_served_blocks_total", self.blocks.served_blocks)
        sample.add("icbd_served_bytes_total", self.blocks.served_bytes)
        sample.add("icbd_disk_free_bytes", shutil.disk_usage(self.data).free)

    def _count_transfer(self, transfer: Transfer) -> None:
        self.transfer_counts[(transfer.imi, transfer.state)] += 1
        self.transfer_bytes[transfer.imi] += transfer.network_bytes
        self.transfer_seconds[transfer.imi] += transfer.seconds

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

    def _verify_table(self, doc: dict) -> dict:
        key = self.trust.key if getattr(self, "trust", None) is not None else None
        if key is None:
            raise BadTable("the master's key is not known yet")
        return key.verify(doc, "token table")

    async def _first_contact(self) -> None:
        """Without --master-key: take the master's key now (trust on first use)."""
        assert self.trust is not None
        try:
            await self.trust.fetch_key(self.master, f"the master at {self.master_url}")
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
            raise CliError(f"no master key to check what this replica holds: give --master-key, or let it reach "
                           f"the master ({describe_error(error)})") from None

    async def _on_heartbeat_reply(self, reply: dict) -> None:
        """The subscribed names, and perhaps a newer signed catalogue. A reply
        whose catalogue the master's key did not sign, or older than one seen,
        is ignored whole: nothing in it is believed."""
        assert self.trust is not None
        names = reply.get("subscriptions") if isinstance(reply, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            log.warning("the master's heartbeat reply has no list of subscriptions; keeping the last catalogue")
            return
        doc = reply.get("catalog")
        if doc is not None:
            try:
                if self.trust.key is None:
                    await self.trust.fetch_key(self.master, f"the master at {self.master_url}")
                self.signed = await trio.to_thread.run_sync(self.trust.catalog, doc)
            except (Untrusted, InvalidInput) as error:
                await self._refused(str(error))
                return
            except (httpx.HTTPError, ValueError) as error:
                log.warning("cannot get the master's key (%s); nothing it sends is believed yet", describe_error(error))
                return
        if self.signed is None:
            return  # no catalogue yet: the next reply brings one
        self._refusal = None
        wanted = set(names)
        catalog = Catalog({n: i for n, i in self.signed.catalog.imis.items() if n in wanted})
        if catalog != self.catalog or not self.subscriptions_known:
            self.catalog = catalog
            self.subscriptions_known = True
            self._wake.set()

    async def _refused(self, why: str) -> None:
        if why != self._refusal:
            assert self.trust is not None
            explained = await self.trust.explain(self.master, f"the master at {self.master_url}")
            log.error("refusing the master's heartbeat reply: %s%s; keeping catalogue serial %s", why,
                      f" ({explained})" if explained else "", self.signed.serial if self.signed else "none")
        self._refusal = why

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
                try:
                    await self._sync_imi(name)
                except Exception as error:  # one iMI's trouble (a full disk...) must never end the replica
                    if not isinstance(error, OSError | btrfs.BtrfsError | ValueError):
                        log.exception("%s: unexpected failure while syncing", name)
                    self._back_off(name, f"syncing failed: {error}")
            try:
                self._drop_stale_spools()
            except OSError as error:
                log.error("cannot remove stale resume spools: %s", error)

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

    def _drop_stale_spools(self) -> None:
        """Delete the resume spools of (version, parent) pairs this replica
        would no longer ask for: an iMI no longer subscribed, a version held
        or no longer wanted, a parent that is no longer the one it would use.
        Each may be as large as a whole version. Nothing is stale before
        the master has said what is subscribed."""
        if not self.subscriptions_known:
            return
        wanted = {
            self.layout.resume_spool(name, version, self.choose_parent(name, version))
            for name in self.catalog.imis
            for version in self.wanted(name)
            if version not in self.held.get(name, {})
        }
        for spool in self.layout.incoming.glob("*/*.stream"):
            if spool not in wanted:
                log.info("removing resume spool %s: that stream is no longer wanted", spool)
                spool.unlink(missing_ok=True)
                spool.with_suffix(".json").unlink(missing_ok=True)

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
        # The transfer's request id goes with every call it makes to the master.
        with request_id(transfer.rid):
            return await self._transfer(name, version, record, transfer)

    async def _transfer(self, name: str, version: int, record: VersionRecord, transfer: Transfer) -> bool:
        parent = transfer.parent
        log.info("fetching %s version %d (%s)", name, version, f"delta from {parent}" if parent else "full")
        try:
            manifest = await self.receiver.receive(name, version, parent, record, transfer)
        except Exception as error:  # one failed transfer must never take the replica down
            if not isinstance(error, ReceiveFailed | OSError | btrfs.BtrfsError | ValueError):
                log.exception("%s version %d: unexpected failure", name, version)
            transfer.finish(str(error) or type(error).__name__)
            self._count_transfer(transfer)
            self._back_off(name, f"version {version} failed: {error}")
            self._save_transfers()
            if self.membership:
                self.membership.poke()
            return False
        transfer.finish()
        self._count_transfer(transfer)
        self._retry_delay.pop(name, None)
        self._retry_at.pop(name, None)
        self.blocks.add(name, version, manifest)
        self.held.setdefault(name, {})[version] = record
        self._save_transfers()
        log.info("holding %s version %d (%d bytes in %.2fs)", name, version, transfer.bytes, transfer.seconds)
        if self.membership:
            self.membership.poke()
        return True

    def _back_off(self, name: str, why: str) -> None:
        """Try `name` again later: 1 s after its first failure, doubling to 60 s."""
        delay = min(self._retry_delay.get(name, RETRY_MIN / 2) * 2, RETRY_MAX)
        self._retry_delay[name] = delay
        self._retry_at[name] = trio.current_time() + delay
        log.error("%s %s (retrying in %.0fs)", name, why, delay)

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
        record = self.held[name].pop(version, None)
        self.blocks.remove(name, version)  # no longer served, before its files go
        try:
            await btrfs.remove_tree(self.layout.version_dir(name, version))
        except BaseException:
            # A subvolume delete is all or nothing: the version is still whole.
            # Hold and serve it again; the next sync prunes it again.
            if record is not None:
                self._hold_again(name, version, record)
            raise
        self.layout.version_record(name, version).unlink(missing_ok=True)
        self.layout.manifest_file(name, version).unlink(missing_ok=True)

    def _hold_again(self, name: str, version: int, record: VersionRecord) -> None:
        try:
            raw = read_capped(self.layout.manifest_file(name, version), MAX_MANIFEST)
            self.blocks.add(name, version, Manifest.from_bytes(raw, record.digest))
        except (OSError, ValueError) as error:
            log.error("%s version %d: cannot serve it again (%s); the next start checks it", name, version, error)
            return
        self.held.setdefault(name, {})[version] = record

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

    def _version_record(self, name: str, version: int) -> VersionRecord | None:
        assert self.trust is not None
        doc = read_json(self.layout.version_record(name, version))
        try:
            return self.trust.version_record(doc, name) if isinstance(doc, dict) else None
        except (Untrusted, InvalidInput) as error:
            log.error("%s version %d: %s", name, version, error)
            return None

    def _version_of(self, digest: str) -> tuple[str, int] | None:
        """The held (iMI, version) whose manifest has this digest."""
        for name, versions in self.held.items():
            for version, record in versions.items():
                if record.digest == digest:
                    return name, version
        return None

    def _manifest(self, name: str, version: int) -> tuple[bytes, str] | None:
        record = self.held.get(name, {}).get(version)
        if record is None:
            return None
        return read_capped(self.layout.manifest_file(name, version), MAX_MANIFEST), record.digest

    def routes(self) -> list[Endpoint]:
        """Every route of a replica and the role it needs (docs/API.md)."""
        return [
            Endpoint("GET", "/", self.status, OPEN),
            Endpoint("GET", METRICS_ROUTE, metrics.endpoint, OPEN),
            Endpoint("POST", NOTIFY_ROUTE, self.notify, NODE),
            Endpoint("GET", IMIS_ROUTE, self.list_imis, READER),
            *read_routes(self._manifest, self.blocks, self._version_of),
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
    transfer.rid = doc.get("rid") or transfer.rid
    return transfer


def run(args) -> int:
    setup_logging(args.log, args.verbose)
    metrics.set_recording(not args.no_metrics)
    token = require_token(args.token)
    if not args.master:
        raise CliError("a replica needs --master URL (or ICBD_MASTER)")
    tls = http.ServerTls.from_options(args.tls_cert, args.tls_key)
    replica = Replica(
        Path(args.data).resolve(), args.listen, args.master, Credentials(token, ca=args.ca), args.site,
        name=args.name, url=advertised_url(args.advertise, args.listen, tls), keep=args.keep,
        image_size=args.image_size, heartbeat=args.heartbeat, resume_spool=args.resume_spool, tls=tls,
        master_key=master_key_argument(args),
    )
    return run_until_signal(replica.run, "replica")


def _check_format(layout: Layout) -> None:
    """A replica never converts: what it holds is fetched again more simply."""
    found = layout.data_format()
    if found == 1:
        raise CliError(f"{layout.root} holds versions in the old data format 1 (xxh3 digests, unsigned records): "
                       f"stop this replica, empty {layout.root} (unmount it first if it is a loop-mounted "
                       f"btrfs.img) and start it again; it fetches its versions anew")
    if found is not None and found != DATA_FORMAT:
        raise CliError(f"{layout.root} holds data of format {found}; this icbd reads format {DATA_FORMAT}")
