"""The master node: repository, name server, keep-alive, version streams,
fan-out to subscribed replicas, the admin API, and the tokens every node
checks.

It holds the Ed25519 key every other tier checks (DATA/keys/, made at first
start) and signs with it the catalogue (catalogue.py), every version record
(repository.py), every stream record (streams.py), every boot profile it
stores (here) and the token table it hands its nodes (tokens.py)."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import trio
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse

from icbdcore import http, metrics
from icbdcore.auth import ADMIN, NODE, READER
from icbdcore.clients import Credentials, async_client
from icbdcore.errors import CliError
from icbdcore.http import (
    OPEN,
    UNSATISFIABLE,
    Endpoint,
    byte_range,
    immutable_response,
    json_body,
    json_response,
    not_modified,
    object_headers,
)
from icbdcore.layout import DATA_FORMAT, Layout
from icbdcore.logs import setup_logging
from icbdcore.node import TABLE_HELD, TABLE_SENT, advertised_url, require_token, run_until_signal
from icbdcore.records import read_json, write_json
from icbdcore.signing import SigningKey
from icbdcore.wire import (
    HEARTBEAT_ROUTE,
    IMI_ROUTE,
    IMIS_ROUTE,
    KEY_ROUTE,
    METRICS_ROUTE,
    NODE_HEADER,
    NODE_ROUTE,
    NODES_ROUTE,
    NOTIFY_ROUTE,
    PROFILE_OBJECT_ROUTE,
    PROFILE_ROUTE,
    PUBLISH_ROUTE,
    REVALIDATE,
    ROLLBACK_ROUTE,
    STREAM_DIGEST_ROUTE,
    STREAM_OBJECT_ROUTE,
    STREAM_ROUTE,
    SUBSCRIPTIONS_ROUTE,
    TOKEN_ROUTE,
    TOKENS_ROUTE,
    UI_ROUTE,
    UI_STATUS_ROUTE,
    UPDATE_ROUTE,
    VERSION_ROUTE,
    Refused,
    check_digest,
    check_name,
    check_node_url,
    content_digest,
    parse_version,
    profile_object_path,
    stream_object_path,
)

from . import btrfs
from .blockindex import BlockIndex
from .catalogue import SignedCatalogue
from .conversion import convert_format1
from .nameserver import ALIVE, NameServer, UnknownNode
from .overview import Overview
from .readroutes import read_routes
from .repository import Repository, RepositoryError
from .sources import SourceRoots
from .statuspage import status_page
from .streams import SendsBusy, SendSpools, Spool, StreamFailed, Withdrawn
from .tokens import TokenStore

log = logging.getLogger(__name__)

MASTER_ID = "master"
MAX_PROFILE_BODY = 16 << 20
NOTIFY_TIMEOUT = 3.0
# A request for a stream's record waits this long for a send under way to
# end, then answers 202 (ask again): long enough that a delta made at
# publish is usually ready in one call, short enough for any proxy between.
RECORD_WAIT = 20.0
# The old route GET .../stream waits longer: its caller wants the bytes.
STREAM_WAIT = 120.0
# Issued tokens are 43 characters (256 bits); the master's own is chosen by a person.
STRONG_TOKEN = 32


class Master:
    def __init__(
        self,
        data: Path,
        listen: str,
        token: str,
        *,
        url: str | None = None,
        site: str = "central",
        image_size: int = 64 << 30,
        chunk_size: int = 1 << 20,
        suspect_after: float = 6.0,
        down_after: float = 15.0,
        source_roots: SourceRoots | None = None,
        tls: http.ServerTls | None = None,
        ca: str | None = None,
        spool_ttl: float = 600.0,
    ):
        self.data = data
        self.listen = listen
        self.tls = tls
        self.ca = ca
        self.url = url or http.url_for_listen(listen, tls)
        self.site = site
        self.image_size = image_size
        self.layout = Layout(data)
        self.chunk_size = chunk_size
        self.names = NameServer(self.layout.nodes_file, suspect_after, down_after)
        self.blocks = BlockIndex(self.layout)
        self.sources = source_roots or SourceRoots([], data)
        self.tokens = TokenStore(self.layout.tokens_file, token)
        self.spool_ttl = spool_ttl
        self.stream_served = {"requests": 0, "bytes": 0}  # stream objects sent, for status and benchmarks
        # Made in run(), once DATA (perhaps a btrfs image mounted on it) is there.
        self.key: SigningKey
        self.repo: Repository
        self.spools: SendSpools
        self.catalogue: SignedCatalogue
        self._nursery: trio.Nursery | None = None
        self._http: httpx.AsyncClient | None = None
        self.overview = Overview(self)
        self._profiles: dict[str, tuple[str, int]] = {}  # profile digest -> (iMI, version)

    async def run(self, shutdown: trio.Event, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await btrfs.ensure_btrfs(self.data, self.image_size)
        self.layout.make_dirs()
        self.key = SigningKey.load_or_create(self.layout.keys)
        await self._check_format()
        self.repo = Repository(self.layout, self.chunk_size, self.key)
        self.spools = SendSpools(self.layout, ttl=self.spool_ttl, key=self.key)
        await self.repo.open()
        self.catalogue = SignedCatalogue(self.layout, self.key, self.repo.catalog)
        self.catalogue.bump("started")
        self.names.load()
        self.spools.load()
        self.tokens.sign = self.key.sign
        self.tokens.load()
        for imi in self.repo.imis.values():
            for version in imi.versions:
                self.blocks.add(imi.name, version, self.repo.manifest(imi.name, version))
        # The master calls its nodes with a node credential of its own, never
        # with its admin token: the URLs it calls are the ones nodes registered.
        client = async_client(Credentials(self.tokens.notify_token, MASTER_ID, self.ca), timeout=NOTIFY_TIMEOUT)
        async with client, trio.open_nursery() as nursery:
            self._http = client
            self._nursery = nursery
            await nursery.start(self.spools.run)
            nursery.start_soon(self.names.watch)
            nursery.start_soon(self.catalogue.keep_fresh)
            log.info("master on %s (data %s; %s; key %s)", self.listen, self.data,
                     "https" if self.tls else "plain http", self.key.public.text)
            if self.sources.roots:
                log.info("imi create takes sources below %s", self.sources.describe())
            else:
                log.info("no --source-root: imi create is refused")
            # serve() returns once SIGINT/SIGTERM closed the server; then stop the rest.
            with metrics.NodeCollector(self.describe_metrics):
                await http.serve(http.build_app(self.routes(), self.tokens.table), self.listen, shutdown,
                                 tls=self.tls, task_status=task_status)
            nursery.cancel_scope.cancel()
        log.info("master stopped")

    async def _check_format(self) -> None:
        found = self.layout.data_format()
        if found == 1:
            await convert_format1(self.layout, self.key)
        elif found is not None and found != DATA_FORMAT:
            raise CliError(f"{self.data} holds data of format {found}; this icbd reads format {DATA_FORMAT}: "
                           f"run the icbd that made it")
        if found != DATA_FORMAT:
            self.layout.mark_format()

    # --- status --------------------------------------------------------------

    def self_description(self) -> dict:
        transfers = [
            {"imi": s.name, "version": s.version, "parent": s.parent, "bytes": s.size,
             "state": "failed" if s.error else ("done" if s.complete else "running"), "readers": s.readers,
             **({"digest": s.digest} if s.complete else {}), **({"again": True} if s.expect is not None else {})}
            for s in self.spools.all()
        ]
        return {
            "id": MASTER_ID, "role": "master", "site": self.site, "url": self.url, "state": ALIVE,
            "versions": {n: sorted(i.versions) for n, i in sorted(self.repo.imis.items())},
            "transfers": transfers,
            "served": {"blocks": self.blocks.served_blocks, "bytes": self.blocks.served_bytes,
                       "stream_requests": self.stream_served["requests"],
                       "stream_bytes": self.stream_served["bytes"]},
            "streams": {"records": self.spools.records(), "made_again": self.spools.regenerated,
                        "withdrawn": self.spools.withdrawn},
            "catalog_serial": self.catalogue.serial,
        }

    async def status(self, request: Request) -> Response:
        doc = self.self_description()
        doc["imis"] = len(self.repo.imis)
        doc["nodes"] = len(self.names.nodes)
        doc["time"] = time.time()  # the master's clock, for `icbd doctor`'s skew check
        return json_response(doc)

    def catalogue_age(self) -> float | None:
        """Seconds since the served catalogue was signed."""
        issued = self.catalogue.doc.get("issued") if self.catalogue.doc else None
        try:
            return round((datetime.now(UTC) - datetime.fromisoformat(issued)).total_seconds(), 1)
        except (TypeError, ValueError):
            return None

    def describe_metrics(self, sample: metrics.Sample) -> None:
        metrics.node_info(sample, MASTER_ID, "master", self.site)
        sample.add("icbd_catalog_serial", self.catalogue.serial)
        sample.add("icbd_catalog_age_seconds", self.catalogue_age())
        spools = self.spools.all()
        sample.add("icbd_master_streams_running", sum(1 for s in spools if not s.complete and not s.error))
        sample.add("icbd_master_stream_spool_bytes", sum(s.written for s in spools))
        sample.add("icbd_served_blocks_total", self.blocks.served_blocks)
        sample.add("icbd_served_bytes_total", self.blocks.served_bytes)
        self.overview.describe(sample)

    async def ui_status(self, request: Request) -> Response:
        """`GET /ui/status`: what the status page shows (open, like `GET /`)."""
        return json_response(self.overview.document(), headers={"Cache-Control": "no-store"})

    # --- iMIs ------------------------------------------------------------------

    def _imi_doc(self, name: str) -> dict:
        imi = self.repo.get(name)
        doc = imi.info().to_json()
        doc["path"] = str(self.repo.work_path(name))
        doc["subscribers"] = [n.id for n in self.names.subscribers(name)]
        progress = self.repo.publishing.get(name)
        doc["publishing"] = progress.to_json() if progress else None
        updating = self.repo.updating.get(name)
        doc["updating"] = updating.to_json() if updating else None
        return doc

    async def list_imis(self, request: Request) -> Response:
        return json_response(self.catalogue.doc)

    async def get_key(self, request: Request) -> Response:
        return json_response({"key": self.key.public.text})

    async def create_imi(self, request: Request) -> Response:
        body = await json_body(request)
        name = check_name(body.get("name"))
        source = body.get("from")
        if not isinstance(source, str) or not source or "\0" in source:
            raise Refused(400, "'from' must be a path on the master host")
        await self.repo.create(name, self.sources.check(source))
        self.catalogue.bump("created " + name)
        return json_response(self._imi_doc(name), status=201)

    async def update_imi(self, request: Request) -> Response:
        name = check_name(request.path_params["name"])
        body = await json_body(request)
        source = body.get("from")
        if not isinstance(source, str) or not source or "\0" in source:
            raise Refused(400, "'from' must be a path on the master host")
        await self.repo.update(name, self.sources.check(source))
        return json_response(self._imi_doc(name))

    async def get_imi(self, request: Request) -> Response:
        return json_response(self._imi_doc(request.path_params["name"]))

    async def delete_imi(self, request: Request) -> Response:
        name = check_name(request.path_params["name"])
        subscribers = self.names.subscribers(name)
        await self.repo.delete(name)
        self.catalogue.bump("deleted " + name)
        self.blocks.remove_imi(name)
        self.spools.drop_imi(name)
        self.names.drop_imi(name)
        self._notify(subscribers, name)
        return json_response({"deleted": name})

    async def publish(self, request: Request) -> Response:
        name = check_name(request.path_params["name"])
        body = await json_body(request)
        message = body.get("message", "")
        if not isinstance(message, str) or len(message) > 4096:
            raise Refused(400, "'message' must be a string of at most 4096 characters")
        record = await self.repo.publish(name, message)
        self.catalogue.bump(f"published {name} version {record.version}")
        self.blocks.add(name, record.version, self.repo.manifest(name, record.version))
        self._make_at_publish(name, record.version)
        self._notify(self.names.subscribers(name), name)
        return json_response({**record.to_json(), "publish": self.repo.last_publish.get(name)}, status=201)

    async def get_version(self, request: Request) -> Response:
        record = self.repo.version(request.path_params["name"], parse_version(request.path_params["version"]))
        return json_response(record.to_json())

    async def rollback(self, request: Request) -> Response:
        name = check_name(request.path_params["name"])
        body = await json_body(request)
        version = parse_version(body.get("version"))
        await self.repo.rollback(name, version)
        self.catalogue.bump(f"rolled {name} back to version {version}")
        self._notify(self.names.subscribers(name), name)
        return json_response(self._imi_doc(name))

    def _version_of(self, digest: str) -> tuple[str, int] | None:
        """The (iMI, version) whose manifest has this digest."""
        for imi in self.repo.imis.values():
            for version, record in imi.versions.items():
                if record.digest == digest:
                    return imi.name, version
        return None

    def _manifest(self, name: str, version: int) -> tuple[bytes, str] | None:
        try:
            record = self.repo.version(name, version)
            return self.repo.manifest_bytes(name, version), record.digest
        except RepositoryError:
            return None

    # --- fan-out ---------------------------------------------------------------

    def _notify(self, nodes, name: str) -> None:
        """Tell live subscribers at once; each fetches on its own. A replica
        that misses this learns the same from its next heartbeat reply."""
        for node in nodes:
            if self.names.state(node) == ALIVE and self._nursery is not None:
                self._nursery.start_soon(self._notify_one, node.url, node.id, name)

    async def _notify_one(self, url: str, node_id: str, name: str) -> None:
        assert self._http is not None
        try:
            response = await self._http.post(url + NOTIFY_ROUTE, json={"imi": name})
            response.raise_for_status()
        except httpx.HTTPError as error:
            log.info("could not notify %s of %s: %s", node_id, name, error)

    # --- version streams -------------------------------------------------------

    def _stream_args(self, request: Request) -> tuple[str, int, int | None]:
        node = request.headers.get(NODE_HEADER, "")
        if not self.names.is_registered(node):
            raise Refused(403, "streams are for registered nodes: register with POST /v1/nodes first")
        name = check_name(request.path_params["name"])
        version = parse_version(request.path_params["version"])
        self.repo.version(name, version)
        parent_arg = request.query_params.get("parent")
        parent = parse_version(parent_arg) if parent_arg is not None else None
        if parent is not None:
            self.repo.version(name, parent)
            if parent == version:
                raise Refused(400, "a version cannot be its own parent")
        return name, version, parent

    def _snapshots(self, name: str, version: int, parent: int | None) -> tuple[Path, Path | None]:
        return (self.repo.snapshot_path(name, version),
                self.repo.snapshot_path(name, parent) if parent else None)

    def _make_at_publish(self, name: str, version: int) -> None:
        """Start the stream every up-to-date replica will ask for (the delta
        from the previous version; the full stream of a first version) now,
        so its record is ready, or nearly, when they are told."""
        parent = max((v for v in self.repo.get(name).versions if v < version), default=None)
        try:
            self.spools.make(name, version, parent, *self._snapshots(name, version, parent), node=MASTER_ID)
        except SendsBusy as busy:
            log.info("not making %s v%d from %s at publish (%s); it is made when asked for", name, version,
                     parent, busy)

    async def _made(self, name: str, version: int, parent: int | None, node: str, wait: float) -> dict | None:
        """The signed record of a stream, made first if it was not (waiting
        at most `wait` seconds for that); None if it is still being made."""
        try:
            spool = self.spools.make(name, version, parent, *self._snapshots(name, version, parent), node=node)
        except SendsBusy as busy:
            raise Refused(503, str(busy), retry_after=busy.retry_after) from None
        if spool is not None:
            with trio.move_on_after(wait):
                await spool.wait_done()
            if spool.error is not None:
                raise Refused(503, f"stream failed on the master: {spool.error}; retry later", retry_after=1)
        return self.spools.record(name, version, parent)

    async def get_stream_digest(self, request: Request) -> Response:
        """The stream's signed record (a control call: never cached). 202
        with Retry-After while the master is still making the stream."""
        name, version, parent = self._stream_args(request)
        record = await self._made(name, version, parent, request.headers.get(NODE_HEADER, ""), RECORD_WAIT)
        if record is None:
            spool = self.spools.find(name, version, parent)
            return json_response({"state": "making", "bytes": spool.size if spool else 0}, status=202,
                                 headers={"Retry-After": "1"})
        return json_response(record, headers={"Content-Location": stream_object_path(record["digest"])})

    async def get_stream(self, request: Request) -> Response:
        """The stream of (version, parent): a redirect to its object once made."""
        name, version, parent = self._stream_args(request)
        record = await self._made(name, version, parent, request.headers.get(NODE_HEADER, ""), STREAM_WAIT)
        if record is None:
            return json_response({"error": "the stream is still being made; ask again"}, status=202,
                                 headers={"Retry-After": "1"})
        return RedirectResponse(stream_object_path(record["digest"]), status_code=307)

    async def get_stream_object(self, request: Request) -> Response:
        """`GET /v1/streams/DIGEST`: the stream's bytes, immutable: one URL,
        one content forever, whoever asks; Range and If-None-Match as for
        any object. Made again (and checked) if its spool has expired."""
        digest = check_digest(request.path_params["digest"])
        try:
            key = self.spools.key_of(digest)
        except Withdrawn:
            raise Refused(410, f"stream {digest} can no longer be made (its bytes changed); ask for the "
                               "stream record again") from None
        except KeyError:
            raise Refused(404, f"no stream {digest} on the master") from None
        record = self.spools.record(*key)
        assert record is not None
        headers = object_headers(digest)
        etag = headers["ETag"]
        if not_modified(request, etag):
            return Response(status_code=304, headers=headers)
        size = record["bytes"]
        part = byte_range(request, size, etag)
        if part == UNSATISFIABLE:
            return json_response({"error": "range beyond the end of the stream"}, status=416,
                                 headers={**headers, "Content-Range": f"bytes */{size}"})
        start, end = part if part is not None else (0, size)
        if part is not None:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        status = 206 if part is not None else 200
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers, media_type="application/octet-stream")
        try:
            spool = self.spools.spool_of(key, *self._snapshots(*key), node=request.headers.get(NODE_HEADER, ""))
        except SendsBusy as busy:
            raise Refused(503, str(busy), retry_after=busy.retry_after) from None
        self.stream_served["requests"] += 1
        node = request.headers.get(NODE_HEADER) or "a caller that gave no node id"
        what = f"{key[0]} version {key[1]} ({f'delta from {key[2]}' if key[2] else 'full'}) to {node} (stream {digest[:16]})"
        log.info("sending %s%s", what, f" from byte {start}" if start else "")
        return StreamingResponse(self._served(spool, start, end, what), status_code=status,
                                 media_type="application/octet-stream", headers=headers)

    async def _served(self, spool: Spool, start: int, end: int, what: str):
        """The chunks of a stream answer, counted, and a log line when it ends
        (carrying the transfer's request id, as the line that began it)."""
        sent = 0
        started = time.monotonic()
        try:
            async for data in spool.chunks(start, end):
                self.stream_served["bytes"] += len(data)
                yield data
                sent += len(data)
        except StreamFailed as error:
            # Cut the answer short: a reader never takes a short body for a whole one.
            log.warning("stream %s v%s from %s cut off for a reader: %s", spool.name, spool.version,
                        spool.parent, error)
            raise
        finally:
            log.info("sent %d bytes of %s%s in %.2fs", sent, what, f" from byte {start}" if start else "",
                     time.monotonic() - started)

    # --- boot profiles -----------------------------------------------------------

    async def get_profile(self, request: Request) -> Response:
        """The boot profile for a version (or the nearest older one): what the
        name maps to now, so a cache must ask again (If-None-Match gives 304);
        the same bytes are the immutable object /v1/profiles/DIGEST."""
        name = check_name(request.path_params["name"])
        version = parse_version(request.path_params["version"])
        imi = self.repo.get(name)
        for candidate in sorted((v for v in imi.versions if v <= version), reverse=True):
            doc = read_json(self.layout.profile_file(name, candidate))
            if isinstance(doc, dict):
                raw = _rendered(doc)  # as signed when stored
                digest = content_digest(raw)
                self._profiles[digest] = (name, candidate)
                return immutable_response(raw, digest, "application/json", request, cache_control=REVALIDATE,
                                          headers={"Content-Location": profile_object_path(digest)})
        raise Refused(404, f"no boot profile for {name} version {version} or older")

    async def get_profile_object(self, request: Request) -> Response:
        digest = check_digest(request.path_params["digest"])
        where = self._profiles.get(digest)
        if where is None:
            self._index_profiles()
            where = self._profiles.get(digest)
        doc = read_json(self.layout.profile_file(*where)) if where else None
        raw = _rendered(doc) if isinstance(doc, dict) else None
        if raw is None or content_digest(raw) != digest:
            raise Refused(404, f"no boot profile {digest} on the master")
        return immutable_response(raw, digest, "application/json", request)

    def _index_profiles(self) -> None:
        for imi in self.repo.imis.values():
            for version in imi.versions:
                doc = read_json(self.layout.profile_file(imi.name, version))
                if isinstance(doc, dict):
                    self._profiles[content_digest(_rendered(doc))] = (imi.name, version)

    async def put_profile(self, request: Request) -> Response:
        name = check_name(request.path_params["name"])
        version = parse_version(request.path_params["version"])
        self.repo.version(name, version)
        body = await json_body(request, limit=MAX_PROFILE_BODY)
        digests = body.get("digests")
        if not isinstance(digests, list) or not digests:
            raise Refused(400, "'digests' must be a non-empty list of block digests")
        for digest in digests:
            check_digest(digest)
        path = self.layout.profile_file(name, version)
        if path.exists() and request.query_params.get("replace") != "1":
            return json_response({"stored": False, "reason": "a profile exists for this version"})
        write_json(path, self.key.sign({"imi": name, "recorded_on": version, "digests": digests}))
        log.info("stored a boot profile of %d blocks for %s version %d", len(digests), name, version)
        return json_response({"stored": True, "blocks": len(digests)}, status=201)

    # --- name server -------------------------------------------------------------

    async def list_nodes(self, request: Request) -> Response:
        nodes = [self.self_description()]
        nodes += [self.names.describe(n) for _, n in sorted(self.names.nodes.items())]
        return json_response({"nodes": nodes})

    async def register_node(self, request: Request) -> Response:
        body = await json_body(request)
        if body.get("id") == MASTER_ID:
            raise Refused(400, f"node id {MASTER_ID!r} is the master's")
        check_node_url(body.get("url"))
        try:
            node = self.names.register(body.get("id"), body.get("role"), body.get("site"), body.get("url"))
        except (ValueError, TypeError) as error:
            raise Refused(400, str(error)) from None
        return json_response(self.names.describe(node), status=201)

    async def heartbeat(self, request: Request) -> Response:
        node_id = request.path_params["node_id"]
        body = await json_body(request)
        held = body.get(TABLE_HELD)  # kept in the status: shows how far a revocation got
        try:
            node = self.names.heartbeat(node_id, body)
        except UnknownNode:
            raise Refused(404, f"unknown node {node_id!r}: register first") from None
        # The subscribed names, and the signed catalogue unless the node says
        # it has this one already (one copy per change or re-signing, not
        # one per heartbeat): a replica takes its subscribed iMIs from it.
        subscriptions = sorted(n for n in self.names.subscriptions_of(node.id) if n in self.repo.imis)
        reply = {"state": self.names.state(node), "subscriptions": subscriptions}
        if body.get("catalog_serial") != self.catalogue.serial:
            reply["catalog"] = self.catalogue.doc
        table = self.tokens.table_doc()
        if held != {"id": table["id"], "serial": table["serial"]}:
            reply[TABLE_SENT] = table  # only when the node holds another one: it may be long
        return json_response(reply)

    async def forget_node(self, request: Request) -> Response:
        node_id = request.path_params["node_id"]
        if node_id not in self.names.nodes:
            raise Refused(404, f"unknown node {node_id!r}")
        self.names.forget(node_id)
        return json_response({"forgotten": node_id})

    async def list_subscriptions(self, request: Request) -> Response:
        return json_response({"subscriptions": {k: sorted(v) for k, v in sorted(self.names.subscriptions.items())}})

    async def _subscription_args(self, request: Request) -> tuple[str, str]:
        body = await json_body(request)
        if not body:
            body = dict(request.query_params)
        name = check_name(body.get("imi"))
        node = body.get("node")
        if not isinstance(node, str) or node not in self.names.nodes:
            raise Refused(404, f"unknown node {node!r} (see icbd status)")
        return name, node

    async def subscribe(self, request: Request) -> Response:
        name, node = await self._subscription_args(request)
        self.repo.get(name)
        self.names.subscribe(name, node)
        self._notify([self.names.nodes[node]], name)
        return json_response({"imi": name, "node": node, "subscribed": True}, status=201)

    async def unsubscribe(self, request: Request) -> Response:
        name, node = await self._subscription_args(request)
        if not self.names.unsubscribe(name, node):
            raise Refused(404, f"{node} is not subscribed to {name}")
        self._notify([self.names.nodes[node]], name)
        return json_response({"imi": name, "node": node, "subscribed": False})

    # --- tokens ------------------------------------------------------------------

    async def list_tokens(self, request: Request) -> Response:
        return json_response({"tokens": self.tokens.describe(), "serial": self.tokens.serial})

    async def create_token(self, request: Request) -> Response:
        body = await json_body(request)
        role = body.get("role")
        name, token = self.tokens.create(role, body.get("name"))
        return json_response({"token": token, "role": role, "name": name}, status=201)

    async def revoke_token(self, request: Request) -> Response:
        name = request.path_params["token_name"]
        self.tokens.revoke(name)
        return json_response({"revoked": name})

    # --- routes ------------------------------------------------------------------

    def routes(self) -> list[Endpoint]:
        """Every route of the master and the role it needs (docs/API.md)."""
        return [
            Endpoint("GET", "/", self.status, OPEN),
            Endpoint("GET", METRICS_ROUTE, metrics.endpoint, OPEN),
            Endpoint("GET", UI_ROUTE, status_page, OPEN),
            Endpoint("GET", UI_STATUS_ROUTE, self.ui_status, OPEN),
            Endpoint("GET", IMIS_ROUTE, self.list_imis, READER),
            Endpoint("POST", IMIS_ROUTE, self.create_imi, ADMIN),
            Endpoint("GET", KEY_ROUTE, self.get_key, READER),
            Endpoint("GET", IMI_ROUTE, self.get_imi, READER),
            Endpoint("DELETE", IMI_ROUTE, self.delete_imi, ADMIN),
            Endpoint("POST", PUBLISH_ROUTE, self.publish, ADMIN),
            Endpoint("POST", ROLLBACK_ROUTE, self.rollback, ADMIN),
            Endpoint("POST", UPDATE_ROUTE, self.update_imi, ADMIN),
            Endpoint("GET", VERSION_ROUTE, self.get_version, READER),
            Endpoint("GET", STREAM_ROUTE, self.get_stream, NODE),
            Endpoint("GET", STREAM_DIGEST_ROUTE, self.get_stream_digest, NODE),
            Endpoint("GET", STREAM_OBJECT_ROUTE, self.get_stream_object, NODE),
            Endpoint("GET", PROFILE_ROUTE, self.get_profile, READER),
            Endpoint("GET", PROFILE_OBJECT_ROUTE, self.get_profile_object, READER),
            Endpoint(("PUT", "POST"), PROFILE_ROUTE, self.put_profile, NODE),
            Endpoint("GET", NODES_ROUTE, self.list_nodes, READER),
            Endpoint("POST", NODES_ROUTE, self.register_node, NODE),
            Endpoint("POST", HEARTBEAT_ROUTE, self.heartbeat, NODE),
            Endpoint("DELETE", NODE_ROUTE, self.forget_node, ADMIN),
            Endpoint("GET", SUBSCRIPTIONS_ROUTE, self.list_subscriptions, READER),
            Endpoint("POST", SUBSCRIPTIONS_ROUTE, self.subscribe, ADMIN),
            Endpoint("DELETE", SUBSCRIPTIONS_ROUTE, self.unsubscribe, ADMIN),
            Endpoint("GET", TOKENS_ROUTE, self.list_tokens, ADMIN),
            Endpoint("POST", TOKENS_ROUTE, self.create_token, ADMIN),
            Endpoint("DELETE", TOKEN_ROUTE, self.revoke_token, ADMIN),
            *read_routes(self._manifest, self.blocks, self._version_of),
        ]


def run(args) -> int:
    setup_logging(args.log, args.verbose)
    metrics.set_recording(not args.no_metrics)
    token = require_token(args.token, "the master's own token is the admin credential: choose a long random "
                          "one (e.g. `openssl rand -base64 32`) and give it to the admins")
    if len(token) < STRONG_TOKEN:
        log.warning("the admin token has only %d characters: every node holds its SHA-256, so whoever reads a "
                    "node's token table can try to guess it offline; use %d or more random ones",
                    len(token), STRONG_TOKEN)
    data = Path(args.data).resolve()
    tls = http.ServerTls.from_options(args.tls_cert, args.tls_key)
    master = Master(
        data,
        args.listen,
        token,
        url=advertised_url(args.advertise, args.listen, tls),
        image_size=args.image_size,
        chunk_size=args.chunk_size,
        suspect_after=args.suspect_after,
        down_after=args.down_after,
        source_roots=SourceRoots.from_options(args.source_root or [], data),
        tls=tls,
        ca=args.ca,
        spool_ttl=args.spool_ttl,
    )
    return run_until_signal(master.run, "master")



def _rendered(doc: dict) -> bytes:
    """A stored document's bytes as served (json_response's rendering)."""
    return json_response(doc).body
