"""The site cache server: serves a site's mounts from its SiteCache, and
pre-stages versions or boot profiles before a boot storm."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import trio
from starlette.requests import Request
from starlette.responses import Response

from icbdcore import http, metrics
from icbdcore.auth import READER, BadTable, NodeTokens
from icbdcore.catalog import Profile
from icbdcore.clients import Credentials, async_client
from icbdcore.errors import CliError
from icbdcore.http import (
    OPEN,
    Endpoint,
    batch_response,
    immutable_response,
    json_body,
    json_response,
)
from icbdcore.layout import Layout
from icbdcore.logs import setup_logging
from icbdcore.node import Membership, advertised_url, node_id, require_token, run_until_signal
from icbdcore.signing import PublicKey, Untrusted
from icbdcore.source import Unavailable
from icbdcore.trust import master_key_argument
from icbdcore.wire import (
    BLOCK_ROUTE,
    BLOCKS_ROUTE,
    IMIS_ROUTE,
    KEY_ROUTE,
    MANIFEST_OBJECT_ROUTE,
    MANIFEST_ROUTE,
    METRICS_ROUTE,
    PREFETCH_JOB_ROUTE,
    PREFETCH_ROUTE,
    PROFILE_OBJECT_ROUTE,
    PROFILE_ROUTE,
    REVALIDATE,
    InvalidInput,
    Refused,
    check_digest,
    check_name,
    check_site,
    content_digest,
    manifest_object_path,
    parse_batch,
    parse_version,
    profile_object_path,
)

from .fetcher import PrefetchProgress
from .site import SiteCache

log = logging.getLogger(__name__)

MAX_PREFETCH_BODY = 16 << 20
JOBS_KEPT = 32
# How long a first start waits for the master's token table before serving
# (answering 503 to credentials until it comes).
STARTUP_WAIT = 10.0


class PrefetchJob:
    """An admin's pre-staging of a version (or its boot profile) at this site."""

    def __init__(self, job_id: int, imi: str, version: int, progress: PrefetchProgress):
        self.id = job_id
        self.imi = imi
        self.version = version
        self.progress = progress

    def to_json(self) -> dict:
        p = self.progress
        state = "running" if p.finished is None else ("failed" if p.failed else "done")
        return {"id": self.id, "imi": self.imi, "version": self.version, "state": state,
                "blocks": p.total, "done": p.done, "fetched": p.fetched, "failed": p.failed,
                "already": p.already, "bytes": p.bytes}


class CacheServer:
    def __init__(self, data: Path, listen: str, master_url: str, credentials: Credentials, site: str, size: int,
                 *, name: str | None = None, url: str | None = None, heartbeat: float = 2.0,
                 tls: http.ServerTls | None = None, master_key: PublicKey | None = None,
                 upstreams: list[str] = ()):
        self.data = data
        self.listen = listen
        self.master_url = master_url
        self.credentials = credentials
        self.site = check_site(site)
        self.size = size
        self.given_name = name
        self.tls = tls
        self.url = url or http.url_for_listen(listen, tls)
        self.heartbeat = heartbeat
        self.master_key = master_key
        self.static_upstreams = [upstream_url(url) for url in upstreams]
        self._profiles: dict[str, tuple[str, int]] = {}  # digest of a profile served -> (iMI, version)
        # The master's table of tokens, believed only with its signature.
        self.tokens = NodeTokens(Layout(data).token_table_file, verify=self._verify_table)
        self.id = ""
        self.cache: SiteCache | None = None
        self.jobs: dict[int, PrefetchJob] = {}
        self._job_ids = itertools.count(1)

    def _verify_table(self, doc: dict) -> dict:
        key = self.cache.trust.key if self.cache is not None else None
        if key is None:
            raise BadTable("the master's key is not known yet")
        return key.verify(doc, "token table")

    async def run(self, shutdown: trio.Event, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        Layout(self.data).make_private_root()
        self.id = node_id(Layout(self.data), "cache", self.given_name)
        # Everything this server asks of the master and the replicas, it asks
        # with its own node credential: a boot profile a mount (a reader)
        # recorded reaches the master that way.
        credentials = self.credentials.as_node(self.id)
        async with SiteCache.open(self.data, self.master_url, credentials, self.site, self.size,
                                  master_key=self.master_key, upstreams=self.static_upstreams) as cache:
            self.cache = cache
            self.tokens.load()  # once the master's key is known
            master = async_client(credentials, self.master_url)
            membership = Membership(master, self.id, "cache", self.site, self.url, self.status_doc,
                                    on_reply=self._on_heartbeat_reply, interval=self.heartbeat,
                                    tokens=self.tokens)
            try:
                async with trio.open_nursery() as nursery:
                    log.info("cache %s (site %s) on %s", self.id, self.site, self.listen)
                    nursery.start_soon(membership.run)
                    await membership.ready(STARTUP_WAIT, shutdown)
                    with metrics.NodeCollector(self.describe_metrics):
                        await http.serve(http.build_app(self.routes(), self.tokens.table), self.listen, shutdown,
                                         tls=self.tls, task_status=task_status)
                    nursery.cancel_scope.cancel()
            finally:
                await master.aclose()
        log.info("cache %s stopped", self.id)

    async def _on_heartbeat_reply(self, reply: dict) -> None:
        """The master answers again, and this cache has no key to check its
        token table with yet (a first start while the master was away, no
        --master-key): take the key and the catalogue now, before the table
        in this reply is looked at, rather than at the next poll."""
        assert self.cache is not None
        if self.cache.trust.key is None:
            await self.cache.poll_master()

    def status_doc(self) -> dict:
        assert self.cache is not None
        return {"id": self.id, "role": "cache", "site": self.site, "url": self.url,
                "versions": {}, "transfers": [], **self.cache.stats(),
                "prefetch_jobs": [j.to_json() for j in list(self.jobs.values())[-8:]]}

    def describe_metrics(self, sample: metrics.Sample) -> None:
        assert self.cache is not None
        metrics.node_info(sample, self.id, "cache", self.site)
        sample.add("icbd_master_reachable", self.cache.master_reachable)
        metrics.describe_catalog(sample, self.cache.freshness())
        metrics.describe_store(sample, self.cache.store.stats())
        if self.cache.fetcher is not None:
            metrics.describe_fetcher(sample, self.cache.fetcher.stats())

    # --- routes --------------------------------------------------------------------

    async def status(self, request: Request) -> Response:
        return json_response(self.status_doc())

    async def list_imis(self, request: Request) -> Response:
        """The newest catalogue the master signed, passed on as it was signed
        (mounts check it themselves)."""
        assert self.cache is not None
        await self.cache.catalog()
        if self.cache.signed is None:
            raise Refused(504, "this site has no catalogue yet: the master has not been reached "
                               "(or sent nothing its key signed)")
        return json_response(self.cache.signed.doc)

    async def get_key(self, request: Request) -> Response:
        """The master key this cache trusts: a mount's first contact is its cache."""
        assert self.cache is not None
        if self.cache.trust.key is None:
            raise Refused(504, "this site does not know the master's key yet: the master has not been reached")
        return json_response({"key": self.cache.trust.key.text})

    async def get_manifest(self, request: Request) -> Response:
        assert self.cache is not None
        name = check_name(request.path_params["name"])
        version = parse_version(request.path_params["version"])
        if (await self.cache.catalog()).record(name, version) is None:
            raise Refused(404, f"{name} has no version {version} in this site's catalogue")
        try:
            raw, digest = await self.cache.manifest_bytes(name, version)
        except Unavailable as error:
            # In the catalogue, but no upstream delivers it now: a gateway failing.
            raise Refused(504, str(error)) from None
        return immutable_response(raw, digest, "application/json", request, cache_control=REVALIDATE,
                                  headers={"Content-Location": manifest_object_path(digest)})

    async def get_manifest_object(self, request: Request) -> Response:
        """A manifest by its digest: immutable, whichever version lists it."""
        assert self.cache is not None
        digest = check_digest(request.path_params["digest"])
        catalog = await self.cache.catalog()
        where = next(((name, version) for name, info in catalog.imis.items()
                      for version, record in info.versions.items() if record.digest == digest), None)
        if where is None:
            raise Refused(404, f"no version in this site's catalogue has manifest {digest}")
        try:
            raw, _ = await self.cache.manifest_bytes(*where)
        except Unavailable as error:
            raise Refused(504, str(error)) from None
        return immutable_response(raw, digest, "application/json", request)

    async def get_block(self, request: Request) -> Response:
        assert self.cache is not None
        digest = check_digest(request.path_params["digest"])
        imi, version = _hints(request)
        try:
            data = await self.cache.block(digest, imi, version)
        except Unavailable as error:
            # The site cannot get it now: a gateway failing, not a bad request.
            raise Refused(504, f"block {digest} unavailable: {error}") from None
        return immutable_response(data, digest, "application/octet-stream", request)

    async def get_blocks(self, request: Request) -> Response:
        """A batch: the blocks the site can get now, "-" for the others."""
        assert self.cache is not None
        digests = parse_batch(request.query_params.get("d"))
        imi, version = _hints(request)
        return batch_response(await self.cache.blocks(digests, imi, version))

    async def prefetch(self, request: Request) -> Response:
        """{"imi", "version"?, "profile"?: bool} stages a version (or just its boot
        profile); {"blocks": [...], "imi"?, "version"?} stages those blocks."""
        assert self.cache is not None
        body = await json_body(request, limit=MAX_PREFETCH_BODY)
        imi = check_name(body["imi"]) if body.get("imi") is not None else None
        version = parse_version(body["version"]) if body.get("version") is not None else None
        if "blocks" in body:
            blocks = body["blocks"]
            if not isinstance(blocks, list):
                raise Refused(400, "'blocks' must be a list of digests")
            digests = [check_digest(d) for d in blocks]
        else:
            if imi is None:
                raise Refused(400, "give 'imi' (and optionally 'version') or 'blocks'")
            version, digests = await self._version_blocks(imi, version, bool(body.get("profile")))
        progress = self.cache.start_prefetch(digests, imi, version, concurrency=32)
        job = PrefetchJob(next(self._job_ids), imi or "", version or 0, progress)
        self.jobs[job.id] = job
        while len(self.jobs) > JOBS_KEPT:
            self.jobs.pop(next(iter(self.jobs)))
        return json_response(job.to_json(), status=202)

    async def _version_blocks(self, imi: str, version: int | None, profile_only: bool) -> tuple[int, list[str]]:
        assert self.cache is not None
        info = (await self.cache.catalog()).imis.get(imi)
        if info is None or not info.versions:
            raise Refused(404, f"no iMI named {imi!r} with versions at this site")
        version = version or info.latest
        if version not in info.versions:
            raise Refused(404, f"{imi} has no version {version}")
        try:
            manifest = await self.cache.manifest(imi, version)
        except Unavailable as error:
            raise Refused(504, str(error)) from None
        if not profile_only:
            return version, manifest.read_set()
        profile = await self._profile(imi, version)
        blocks = manifest.digests()
        return version, [d for d in profile.digests if d in blocks]

    async def _profile(self, imi: str, version: int) -> Profile:
        assert self.cache is not None
        try:
            profile = await self.cache.profile(imi, version)
        except httpx.HTTPError as error:
            raise Refused(504, f"cannot reach the master for the boot profile: {error}") from None
        except (Untrusted, ValueError) as error:
            log.error("refusing the boot profile of %s version %d: %s", imi, version, error)
            raise Refused(504, f"the boot profile the master sent is refused: {error}") from None
        if profile is None:
            raise Refused(404, f"no boot profile recorded for {imi} version {version} or older")
        return profile

    async def get_job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        job = self.jobs.get(int(job_id)) if job_id.isdigit() and len(job_id) < 10 else None
        if job is None:
            raise Refused(404, f"no prefetch job {job_id}")
        return json_response(job.to_json())

    async def get_profile(self, request: Request) -> Response:
        assert self.cache is not None
        name = check_name(request.path_params["name"])
        version = parse_version(request.path_params["version"])
        profile = await self._profile(name, version)
        raw = json_response(profile.to_json()).body  # as the master signed it
        digest = content_digest(raw)
        self._profiles[digest] = (name, version)
        return immutable_response(raw, digest, "application/json", request, cache_control=REVALIDATE,
                                  headers={"Content-Location": profile_object_path(digest)})

    async def get_profile_object(self, request: Request) -> Response:
        """A boot profile this server served, by its digest: immutable."""
        digest = check_digest(request.path_params["digest"])
        where = self._profiles.get(digest)
        if where is not None:
            raw = json_response((await self._profile(*where)).to_json()).body
            if content_digest(raw) == digest:
                return immutable_response(raw, digest, "application/json", request)
        raise Refused(404, f"no boot profile {digest} here (ask for it by its version first)")

    async def put_profile(self, request: Request) -> Response:
        assert self.cache is not None
        name = check_name(request.path_params["name"])
        version = parse_version(request.path_params["version"])
        body = await json_body(request, limit=MAX_PREFETCH_BODY)
        digests = body.get("digests")
        if not isinstance(digests, list) or not digests:
            raise Refused(400, "'digests' must be a non-empty list of block digests")
        try:
            stored = await self.cache.save_profile(name, version, [check_digest(d) for d in digests])
        except httpx.HTTPStatusError as error:
            raise Refused(error.response.status_code, "the master refused the profile") from None
        except httpx.HTTPError as error:
            raise Refused(504, f"cannot reach the master to store the profile: {error}") from None
        return json_response({"stored": stored}, status=201 if stored else 200)

    def routes(self) -> list[Endpoint]:
        """Every route of a cache server and the role it needs (docs/API.md).
        All of them serve mounts, which hold reader tokens: prefetch is how a
        mount replays a boot profile, and a profile a mount uploads goes on to
        the master under this server's node credential."""
        return [
            Endpoint("GET", "/", self.status, OPEN),
            Endpoint("GET", METRICS_ROUTE, metrics.endpoint, OPEN),
            Endpoint("GET", IMIS_ROUTE, self.list_imis, READER),
            Endpoint("GET", KEY_ROUTE, self.get_key, READER),
            Endpoint("GET", MANIFEST_ROUTE, self.get_manifest, READER),
            Endpoint("GET", MANIFEST_OBJECT_ROUTE, self.get_manifest_object, READER),
            Endpoint("GET", BLOCK_ROUTE, self.get_block, READER),
            Endpoint("GET", BLOCKS_ROUTE, self.get_blocks, READER),
            Endpoint("POST", PREFETCH_ROUTE, self.prefetch, READER),
            Endpoint("GET", PREFETCH_JOB_ROUTE, self.get_job, READER),
            Endpoint("GET", PROFILE_ROUTE, self.get_profile, READER),
            Endpoint("GET", PROFILE_OBJECT_ROUTE, self.get_profile_object, READER),
            Endpoint(("PUT", "POST"), PROFILE_ROUTE, self.put_profile, READER),
        ]


def upstream_url(url: str) -> str:
    """An --upstream URL: http or https, a host, perhaps a port and a path
    prefix (a CDN's), no user, query or fragment; without a trailing slash."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        parts = None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc
            or parts.query or parts.fragment or not url.isascii() or not url.isprintable()):
        raise InvalidInput(f"invalid --upstream {url[:100]!r}: give http(s)://HOST[:PORT][/PATH] of an HTTP cache")
    return url.rstrip("/")


def _hints(request: Request) -> tuple[str | None, int | None]:
    imi = request.query_params.get("imi")
    version = request.query_params.get("version")
    return (check_name(imi) if imi is not None else None,
            parse_version(version) if version is not None else None)


def run(args) -> int:
    setup_logging(args.log, args.verbose)
    metrics.set_recording(not args.no_metrics)
    token = require_token(args.token)
    if not args.master:
        raise CliError("a cache server needs --master URL (or ICBD_MASTER)")
    tls = http.ServerTls.from_options(args.tls_cert, args.tls_key)
    try:
        upstreams = [upstream_url(url) for url in getattr(args, "upstream", None) or []]
    except InvalidInput as error:
        raise CliError(str(error)) from None
    server = CacheServer(
        Path(args.data).resolve(), args.listen, args.master, Credentials(token, ca=args.ca), args.site, args.size,
        name=args.name, url=advertised_url(args.advertise, args.listen, tls), heartbeat=args.heartbeat, tls=tls,
        master_key=master_key_argument(args), upstreams=upstreams,
    )
    return run_until_signal(server.run, "cache server")
