"""A man in the middle for TLS tests: a TLS server with a certificate from
another CA than the one the clients are told to trust. It records every
connection made to it and whatever application data it could read after a
handshake; a client that verifies refuses the handshake, so that data stays
empty: no request line, no token."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path


class Mitm:
    def __init__(self, folder: Path, host: str = "127.0.0.1"):
        import trustme

        folder.mkdir(parents=True, exist_ok=True)
        self.authority = trustme.CA()  # not the cluster's
        leaf = self.authority.issue_cert(host, "localhost")
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        leaf.configure_cert(self.context)
        self.listener = socket.create_server((host, 0))
        self.listener.settimeout(0.2)
        self.url = f"https://{host}:{self.listener.getsockname()[1]}"
        self.connections = 0
        self.handshakes = 0
        self.received = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Mitm:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                self.handshakes += 1
                while chunk := tls.recv(65536):
                    self.received += chunk
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()
