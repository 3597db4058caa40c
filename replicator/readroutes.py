"""The read path a node serves from the versions it holds (master and
replicas alike): manifests and blocks, immutable and cacheable forever."""

from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response

from icbdcore.auth import READER
from icbdcore.http import Endpoint, immutable_response
from icbdcore.wire import (
    BLOCK_ROUTE,
    MANIFEST_ROUTE,
    Refused,
    check_digest,
    check_name,
    parse_version,
)

from .blockindex import BlockIndex

log = logging.getLogger(__name__)

ManifestLookup = Callable[[str, int], tuple[bytes, str] | None]  # -> (bytes, digest)


def read_routes(manifests: ManifestLookup, blocks: BlockIndex) -> list[Endpoint]:
    async def get_manifest(request: Request) -> Response:
        name = check_name(request.path_params["name"])
        version = parse_version(request.path_params["version"])
        found = manifests(name, version)
        if found is None:
            raise Refused(404, f"this node holds no version {version} of {name}")
        raw, digest = found
        return immutable_response(raw, digest, "application/json")

    async def get_block(request: Request) -> Response:
        digest = check_digest(request.path_params["digest"])
        data = await blocks.read(digest)
        if data is None:
            log.debug("block %s: not held", digest)
            raise Refused(404, f"this node holds no intact block {digest}")
        log.debug("block %s: %d bytes served", digest, len(data))
        return immutable_response(data, digest, "application/octet-stream")

    return [
        Endpoint("GET", MANIFEST_ROUTE, get_manifest, READER),
        Endpoint("GET", BLOCK_ROUTE, get_block, READER),
    ]
