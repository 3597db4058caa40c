"""The read path a node serves from the versions it holds (master and
replicas alike): manifests and blocks, immutable and cacheable forever, and
batches of blocks (one request for a run of them)."""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response

from icbdcore.auth import READER
from icbdcore.http import Endpoint, batch_response, immutable_response
from icbdcore.wire import (
    BLOCK_ROUTE,
    BLOCKS_ROUTE,
    MANIFEST_ROUTE,
    Refused,
    check_digest,
    check_name,
    parse_batch,
    parse_version,
)

from .blockindex import BlockIndex

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
            raise Refused(404, f"this node holds no intact block {digest}")
        return immutable_response(data, digest, "application/octet-stream")

    async def get_blocks(request: Request) -> Response:
        digests = parse_batch(request.query_params.get("d"))
        return batch_response(await blocks.read_many(digests))

    return [
        Endpoint("GET", MANIFEST_ROUTE, get_manifest, READER),
        Endpoint("GET", BLOCK_ROUTE, get_block, READER),
        Endpoint("GET", BLOCKS_ROUTE, get_blocks, READER),
    ]
