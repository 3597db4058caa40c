"""Every HTTP client an icbd process uses to call a node, built in one place:
the credential header, the node's own id, the user agent.

Three libraries, each where it measured best: httpx on trio for control
calls (JSON, a few per second), urllib3 in worker threads for bulk bytes
(blocks, streams: about 2.5 GB/s on loopback against 450-650 MB/s for httpx),
and requests for the blocking command line.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import requests
import urllib3

from .cutoff import POOL_CLASSES
from .wire import NODE_HEADER

USER_AGENT = "icbd"


@dataclass(frozen=True)
class Credentials:
    """Who is calling: the bearer token and, for node-to-node calls, the node's id."""

    token: str | None
    node_id: str | None = None

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.node_id:
            headers[NODE_HEADER] = self.node_id
        return headers


def async_client(credentials: Credentials, base_url: str = "", *, timeout: float = 10.0) -> httpx.AsyncClient:
    """Control calls from a trio program."""
    return httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=credentials.headers(), timeout=timeout)


def pool(credentials: Credentials, *, maxsize: int, num_pools: int = 64, block: bool = False) -> urllib3.PoolManager:
    """Bulk transfers from worker threads; the caller sets timeouts per request.
    Its requests can be cut off from another thread (icbdcore.cutoff)."""
    manager = urllib3.PoolManager(num_pools=num_pools, maxsize=maxsize, block=block, retries=False,
                                  headers=credentials.headers())
    manager.pool_classes_by_scheme = POOL_CLASSES
    return manager


def session(credentials: Credentials) -> requests.Session:
    """Blocking calls from the command line."""
    http = requests.Session()
    http.headers.update(credentials.headers())
    return http
