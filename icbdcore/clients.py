"""Every HTTP client an icbd process uses to call a node, built in one place:
the credential header, the node's own id, the user agent, and which servers
to trust.

Three libraries, each where it measured best: httpx on trio for control
calls (JSON, a few per second), urllib3 in worker threads for bulk bytes
(blocks, streams: about 2.5 GB/s on loopback against 450-650 MB/s for httpx),
and requests for the blocking command line.

The scheme of a URL says whether TLS is spoken. An https server is verified
against the CA of `--ca` (env ICBD_CA) alone when it is given, else against
the system's trust store; each library gets its own SSL context built here,
so none of them falls back to a bundle of its own (requests would use
certifi's).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, replace

import httpx
import requests
import requests.adapters
import urllib3

from .cutoff import POOL_CLASSES
from .errors import CliError
from .wire import NODE_HEADER

USER_AGENT = "icbd"


@dataclass(frozen=True)
class Credentials:
    """Who is calling (the bearer token and, for node-to-node calls, the
    node's id) and whom it trusts (`ca`: a PEM file of CA certificates, or
    None for the system's trust store)."""

    token: str | None
    node_id: str | None = None
    ca: str | None = None

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.node_id:
            headers[NODE_HEADER] = self.node_id
        return headers

    def as_node(self, node_id: str) -> Credentials:
        return replace(self, node_id=node_id)

    def ssl_context(self) -> ssl.SSLContext:
        """A new context that verifies servers (certificate and host name)."""
        return trust_context(self.ca)


def trust_context(ca: str | None) -> ssl.SSLContext:
    """An SSL context that trusts the CA certificates in `ca`, or the system's."""
    try:
        return ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    except ssl.SSLError as error:  # an OSError too: first
        raise CliError(f"{ca} holds no PEM CA certificate ({error.reason or error}) (--ca / ICBD_CA)") from None
    except OSError as error:
        raise CliError(f"cannot read the CA file {ca}: {error.strerror or error} (--ca / ICBD_CA)") from None


def tls_failure(error: BaseException) -> str | None:
    """A one-line description if `error` (or what caused it) is a failed TLS
    verification or handshake, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ssl.SSLCertVerificationError):
            return f"the server's TLS certificate is not trusted ({error.verify_message}): check --ca / ICBD_CA"
        if isinstance(error, ssl.SSLError):
            return f"TLS handshake failed ({error.reason or error})"
        text = str(error)
        if "CERTIFICATE_VERIFY_FAILED" in text:
            detail = text.split("certificate verify failed: ", 1)[-1].split(" (_ssl.c", 1)[0]
            return f"the server's TLS certificate is not trusted ({detail}): check --ca / ICBD_CA"
        if "[SSL" in text:
            return f"TLS handshake failed ({text.split('] ', 1)[-1].split(' (_ssl.c', 1)[0]})"
        error = error.__cause__ or error.__context__ or getattr(error, "reason", None)
    return None


def async_client(credentials: Credentials, base_url: str = "", *, timeout: float = 10.0) -> httpx.AsyncClient:
    """Control calls from a trio program."""
    return httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=credentials.headers(), timeout=timeout,
                             verify=credentials.ssl_context())


def pool(credentials: Credentials, *, maxsize: int, num_pools: int = 64, block: bool = False) -> urllib3.PoolManager:
    """Bulk transfers from worker threads; the caller sets timeouts per request.
    Its requests can be cut off from another thread (icbdcore.cutoff)."""
    manager = urllib3.PoolManager(num_pools=num_pools, maxsize=maxsize, block=block, retries=False,
                                  headers=credentials.headers(), ssl_context=credentials.ssl_context())
    manager.pool_classes_by_scheme = POOL_CLASSES
    return manager


class _TrustAdapter(requests.adapters.HTTPAdapter):
    """requests with our SSL context as the only source of trust."""

    def __init__(self, context: ssl.SSLContext):
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args, **kwargs) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)

    def cert_verify(self, conn, url, verify, cert) -> None:
        # requests would point the pool at certifi's bundle here; the context
        # already holds what to trust, and verifies (CERT_REQUIRED, host name).
        conn.cert_reqs = "CERT_REQUIRED"
        conn.ca_certs = conn.ca_cert_dir = None


def session(credentials: Credentials) -> requests.Session:
    """Blocking calls from the command line."""
    http = requests.Session()
    http.headers.update(credentials.headers())
    http.mount("https://", _TrustAdapter(credentials.ssl_context()))
    return http
