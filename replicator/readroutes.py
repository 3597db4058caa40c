"""The read path a node serves from the versions it holds (master and
replicas alike): manifests and blocks, immutable and cacheable forever."""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .blockindex import BlockIndex
from .http import HttpError
from .wire import API, IMMUTABLE, check_digest, check_name, parse_version

ManifestLookup = Callable[[str, int], tuple[bytes, str] | None]  # -> (bytes, digest)

MANIFEST_ROUTE = API + "/imis/{name}/versions/{version}/manifest"
BLOCK_ROUTE = API + "/blocks/{digest}"


def manifest_response(raw: bytes, digest: str) -> Response:
    return Response(
        raw,
        media_type="application/json",
        headers={"Cache-Control": IMMUTABLE, "ETag": f'"{digest}"', "X-Icbd-Digest": digest},
    )


def block_response(data: bytes, digest: str) -> Response:
    return Response(
        data,
        media_type="application/octet-stream",
        headers={"Cache-Control": IMMUTABLE, "ETag": f'"{digest}"'},
    )


def read_routes(manifests: ManifestLookup, blocks: BlockIndex) -> list[Route]:
    async def get_manifest(request: Request) -> Response:
        name = check_name(request.path_params["name"])
        version = parse_version(request.path_params["version"])
        found = manifests(name, version)
        if found is None:
            raise HttpError(404, f"this node holds no version {version} of {name}")
        return manifest_response(*found)

    async def get_block(request: Request) -> Response:
        digest = check_digest(request.path_params["digest"])
        data = await blocks.read(digest)
        if data is None:
            raise HttpError(404, f"this node holds no intact block {digest}")
        return block_response(data, digest)

    return [
        Route(MANIFEST_ROUTE, get_manifest, methods=["GET"]),
        Route(BLOCK_ROUTE, get_block, methods=["GET"]),
    ]
