"""The master's token store: the tokens it issued, kept hashed in
DATA/tokens.json, and the table it hands its nodes (see icbdcore/auth.py).

Two entries are the master's own and never written to disk:

- `master`, role admin: the hash of its `--token`, so an admin's calls to a
  replica or a cache server (e.g. `icbd prefetch`) are admitted there too;
- `master-notify`, role node: a token made at each start, with which the
  master calls its nodes (`POST /v1/notify`). The master never sends its
  admin token to a URL a node registered.

Every change (a token created or revoked, a start) bumps the serial, so
that nodes take the new table and never an older one.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Callable
from pathlib import Path

from icbdcore.auth import (
    ADMIN,
    NODE,
    Entry,
    Identity,
    TokenTable,
    check_role,
    check_token_name,
    new_token,
    parse_table,
    token_hash,
)
from icbdcore.errors import CliError
from icbdcore.records import now_iso, read_json, write_json
from icbdcore.wire import Refused

log = logging.getLogger(__name__)

OWN_ADMIN = "master"
OWN_NODE = "master-notify"
MAX_TOKENS = 10_000


class TokenStore:
    def __init__(self, path: Path, admin_token: str, *, sign: Callable[[dict], dict] | None = None):
        self.path = path
        self.sign = sign
        self.notify_token = new_token()
        self._own = [Entry(OWN_ADMIN, ADMIN, token_hash(admin_token)),
                     Entry(OWN_NODE, NODE, token_hash(self.notify_token))]
        self._issued: dict[str, dict] = {}  # name -> {"role", "hash", "created"}
        self._store_id = ""
        self._serial = 0
        self._doc: dict | None = None  # the table as handed out, signed, until the next change
        self.table = TokenTable()

    def load(self) -> None:
        try:
            doc = read_json(self.path)
            if doc is None:
                self._store_id = uuid.uuid4().hex
            else:
                self._store_id, self._serial, entries = parse_table(doc)
                created = {t["name"]: t.get("created", "") for t in doc["tokens"]}
                for entry in entries:
                    self._issued[entry.name] = {"role": entry.role, "hash": entry.hash, "created": created[entry.name]}
        except (ValueError, TypeError) as error:
            raise CliError(f"{self.path} is damaged ({error}): restore it from a backup, or move it away "
                           "to start with no issued tokens") from None
        self._commit(self._issued)  # a new master-notify token at every start
        log.info("token store: %d issued tokens", len(self._issued))

    @property
    def serial(self) -> int:
        return self._serial

    def identify(self, token: str) -> Identity | None:
        return self.table.identify(token)

    # --- issuing ------------------------------------------------------------------

    def create(self, role: str, name: str | None = None) -> tuple[str, str]:
        """A new token of `role`: (name, token). The token is shown this once."""
        try:
            check_role(role)
            name = check_token_name(name) if name is not None else f"{role}-{secrets.token_hex(3)}"
        except ValueError as error:
            raise Refused(400, str(error)) from None
        if name in (OWN_ADMIN, OWN_NODE):
            raise Refused(409, f"the token name {name!r} is the master's own")
        if name in self._issued:
            raise Refused(409, f"a token named {name!r} exists already (revoke it first)")
        if len(self._issued) >= MAX_TOKENS:
            raise Refused(409, f"{MAX_TOKENS} tokens exist already: revoke some first")
        token = new_token()
        self._commit({**self._issued, name: {"role": role, "hash": token_hash(token), "created": now_iso()}})
        log.info("issued %s token %s", role, name)
        return name, token

    def revoke(self, name: str) -> None:
        if name in (OWN_ADMIN, OWN_NODE):
            raise Refused(400, f"{name!r} is the master's own credential: change the master's --token instead")
        if name not in self._issued:
            raise Refused(404, f"no token named {name!r} (see icbd token list)")
        self._commit({n: t for n, t in self._issued.items() if n != name})
        log.info("revoked token %s", name)

    def describe(self) -> list[dict]:
        """Every token's name, role and creation time (never a hash or a token)."""
        own = [{"name": e.name, "role": e.role, "created": None, "builtin": True} for e in self._own]
        issued = [{"name": name, "role": t["role"], "created": t["created"], "builtin": False}
                  for name, t in sorted(self._issued.items())]
        return own + issued

    # --- the table nodes get ---------------------------------------------------------

    def table_doc(self) -> dict:
        """The table as the nodes get it: names, roles and hashes."""
        if self._doc is None:
            entries = self._own + [Entry(name, t["role"], t["hash"]) for name, t in sorted(self._issued.items())]
            doc = {"id": self._store_id, "serial": self._serial, "tokens": [e.to_json() for e in entries]}
            self._doc = self.sign(doc) if self.sign else doc
        return self._doc

    def _commit(self, issued: dict[str, dict]) -> None:
        """Make `issued` the store, under the next serial: on disk first, so a
        failed write changes nothing (a revocation that did not persist must
        not look done)."""
        serial = self._serial + 1
        write_json(self.path, {
            "id": self._store_id,
            "serial": serial,
            "tokens": [{"name": name, **t} for name, t in sorted(issued.items())],
        })
        self._issued, self._serial, self._doc = issued, serial, None
        self.table.install(self.table_doc())
