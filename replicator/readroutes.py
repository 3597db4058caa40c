"""The read path a node serves from the versions it holds (master and
replicas alike): manifests and blocks. An object named by its digest
(`/v1/blocks/DIGEST`, `/v1/manifests/DIGEST`) is immutable and cacheable
forever by any tier or stock HTTP cache; a manifest named by its version
(`.../versions/V/manifest`) has the same bytes and ETag, but a cache asks
again before reusing it (an iMI deleted and created again reuses the name)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response

from icbdcore.auth import READER
from icbdcore.http import Endpoint, batch_response, immutable_response
from icbdcore.wire import (
    BLOCK_ROUTE,
    BLOCKS_ROUTE,
    MANIFEST_OBJECT_ROUTE,
    MANIFEST_ROUTE,
    REVALIDATE,
    Refused,
    check_digest,
    check_name,
    manifest_object_path,
    parse_batch,
    parse_version,
)

from .blockindex import BlockIndex

log = logging.getLogger(__name__)

ManifestLookup = Callable[[str, int], tuple[bytes, str] | None]  # -> (bytes, digest)
VersionLookup = Callable[[str], tuple[str, int] | None]  # manifest digest -> (iMI, version)


def read_routes(manifests: ManifestLookup, blocks: BlockIndex, versions: VersionLookup) -> list[Endpoint]:
    async def get_manifest(request: Request) -> Response:
        name = check_name(request.path_params["name"])
        version = parse_version(request.path_params["version"])
        found = manifests(name, version)
        if found is None:
            raise Refused(404, f"this node holds no version {version} of {name}")
        raw, digest = found
        return immutable_response(raw, digest, "application/json", request, cache_control=REVALIDATE,
                                  headers={"Content-Location": manifest_object_path(digest)})

    async def get_manifest_object(request: Request) -> Response:
        digest = check_digest(request.path_params["digest"])
        where = versions(digest)
        found = manifests(*where) if where is not None else None
        if found is None or found[1] != digest:
            raise Refused(404, f"this node holds no manifest {digest}")
        return immutable_response(found[0], digest, "application/json", request)

    async def get_block(request: Request) -> Response:
        digest = check_digest(request.path_params["digest"])
        data = await blocks.read(digest)
        if data is None:
            log.debug("block %s: not held", digest)
            raise Refused(404, f"this node holds no intact block {digest}")
        log.debug("block %s: %d bytes served", digest, len(data))
        return immutable_response(data, digest, "application/octet-stream", request)

    async def get_blocks(request: Request) -> Response:
        digests = parse_batch(request.query_params.get("d"))
        return batch_response(await blocks.read_many(digests))

    return [
        Endpoint("GET", MANIFEST_ROUTE, get_manifest, READER),
        Endpoint("GET", MANIFEST_OBJECT_ROUTE, get_manifest_object, READER),
        Endpoint("GET", BLOCK_ROUTE, get_block, READER),
        Endpoint("GET", BLOCKS_ROUTE, get_blocks, READER),
    ]
