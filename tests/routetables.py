"""Every route of every node and the role it needs, taken from the nodes'
own route tables (so a route added to a node is in every test that walks
them), and the contract they must match (docs/API.md)."""

from __future__ import annotations

from pathlib import Path

from cache.server import CacheServer
from icbdcore import http
from icbdcore.auth import ADMIN, NODE, READER
from icbdcore.clients import Credentials
from replicator.master import Master
from replicator.replica import Replica

OPEN = None

# (method, route template) -> the role it needs. HEAD goes with GET.
CONTRACT = {
    "master": {
        ("GET", "/"): OPEN,
        ("GET", "/metrics"): OPEN,
        ("GET", "/ui"): OPEN,
        ("GET", "/ui/status"): OPEN,
        ("GET", "/v1/auth"): READER,
        ("GET", "/v1/imis"): READER,
        ("GET", "/v1/key"): READER,
        ("POST", "/v1/imis"): ADMIN,
        ("GET", "/v1/imis/{name}"): READER,
        ("DELETE", "/v1/imis/{name}"): ADMIN,
        ("POST", "/v1/imis/{name}/versions"): ADMIN,
        ("POST", "/v1/imis/{name}/rollback"): ADMIN,
        ("POST", "/v1/imis/{name}/update"): ADMIN,
        ("GET", "/v1/imis/{name}/versions/{version}"): READER,
        ("GET", "/v1/imis/{name}/versions/{version}/manifest"): READER,
        ("GET", "/v1/imis/{name}/versions/{version}/stream"): NODE,
        ("GET", "/v1/imis/{name}/versions/{version}/stream/digest"): NODE,
        ("GET", "/v1/streams/{digest}"): NODE,
        ("GET", "/v1/manifests/{digest}"): READER,
        ("GET", "/v1/profiles/{digest}"): READER,
        ("GET", "/v1/imis/{name}/versions/{version}/profile"): READER,
        ("PUT", "/v1/imis/{name}/versions/{version}/profile"): NODE,
        ("POST", "/v1/imis/{name}/versions/{version}/profile"): NODE,
        ("GET", "/v1/blocks/{digest}"): READER,
        ("GET", "/v1/blocks"): READER,
        ("GET", "/v1/nodes"): READER,
        ("POST", "/v1/nodes"): NODE,
        ("POST", "/v1/nodes/{node_id}/heartbeat"): NODE,
        ("DELETE", "/v1/nodes/{node_id}"): ADMIN,
        ("GET", "/v1/subscriptions"): READER,
        ("POST", "/v1/subscriptions"): ADMIN,
        ("DELETE", "/v1/subscriptions"): ADMIN,
        ("GET", "/v1/tokens"): ADMIN,
        ("POST", "/v1/tokens"): ADMIN,
        ("DELETE", "/v1/tokens/{token_name}"): ADMIN,
    },
    "replica": {
        ("GET", "/"): OPEN,
        ("GET", "/metrics"): OPEN,
        ("GET", "/v1/auth"): READER,
        ("POST", "/v1/notify"): NODE,
        ("GET", "/v1/imis"): READER,
        ("GET", "/v1/imis/{name}/versions/{version}/manifest"): READER,
        ("GET", "/v1/manifests/{digest}"): READER,
        ("GET", "/v1/blocks/{digest}"): READER,
        ("GET", "/v1/blocks"): READER,
    },
    "cache": {
        ("GET", "/"): OPEN,
        ("GET", "/metrics"): OPEN,
        ("GET", "/v1/auth"): READER,
        ("GET", "/v1/imis"): READER,
        ("GET", "/v1/key"): READER,
        ("GET", "/v1/imis/{name}/versions/{version}/manifest"): READER,
        ("GET", "/v1/manifests/{digest}"): READER,
        ("GET", "/v1/profiles/{digest}"): READER,
        ("GET", "/v1/blocks/{digest}"): READER,
        ("GET", "/v1/blocks"): READER,
        ("POST", "/v1/prefetch"): READER,
        ("GET", "/v1/prefetch/{job_id}"): READER,
        ("GET", "/v1/imis/{name}/versions/{version}/profile"): READER,
        ("PUT", "/v1/imis/{name}/versions/{version}/profile"): READER,
        ("POST", "/v1/imis/{name}/versions/{version}/profile"): READER,
    },
}


def route_tables(scratch: Path) -> dict[str, dict[tuple[str, str], str | None]]:
    """What each node serves, from its route table: (method, template) -> role.
    The node objects are only built, never run (nothing is written)."""
    credentials = Credentials("unused-token")
    nodes = {
        "master": Master(scratch / "master", "127.0.0.1:1", "unused-token"),
        "replica": Replica(scratch / "replica", "127.0.0.1:1", "http://127.0.0.1:2", credentials, "a"),
        "cache": CacheServer(scratch / "cache", "127.0.0.1:1", "http://127.0.0.1:2", credentials, "a", 1 << 20),
    }
    tables = {}
    for kind, node in nodes.items():
        table = {}
        for endpoint in http.endpoints(node.routes()):
            for method in sorted(endpoint.methods - {"HEAD"}):
                key = (method, endpoint.path)
                assert key not in table, f"{kind} declares {key} twice"
                table[key] = endpoint.role
        tables[kind] = table
    return tables
