"""Credentials and roles: who may call what, checked the same way on every node.

Three roles, each holding every right of the one before it:

    reader  the catalogue, manifests, blocks, boot profiles, the master's key:
            all a mount needs
    node    reader + register, heartbeat, version streams, profile uploads
    admin   everything: create, publish, rollback, delete, subscribe, tokens

A token is 256 random bits (`new_token`). Only the master issues them, and
it keeps none: DATA/tokens.json holds each one's SHA-256, its name and its
role. Its own `--token` is the admin credential and is never stored.

The master hands its nodes the token table (names, roles and hashes, never
tokens) in every heartbeat reply (`TokenTable`, `NodeTokens`). A node
checks a presented token against the table it holds, so a site cut off from
the master keeps admitting its mounts, and a revocation reaches every node
within a heartbeat. A table carries the id of the master's token store and
a serial that grows with every change: a node never goes back to an older
table of the same store (an old table could bring a revoked token back).

Looking a token up by its SHA-256 leaks through timing at most which hashes
exist, never a byte of a token: an attacker cannot choose the hash he tries.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .records import read_json, write_json

log = logging.getLogger(__name__)

READER, NODE, ADMIN = "reader", "node", "admin"
ROLES = (READER, NODE, ADMIN)  # each holds every right of those before it

_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_HASH = re.compile(r"[0-9a-f]{64}\Z")
# 256 bits: a hash in a node's table is no help in finding the token.
TOKEN_BYTES = 32
# The shortest token a node takes (the master's own --token may be chosen by
# a person; issued tokens are 43 characters).
MIN_TOKEN = 8


class BadTable(ValueError):
    """A token table that is not well formed, or not newer than the one held."""


@dataclass(frozen=True)
class Identity:
    """Who presented a token: its name and its role."""

    name: str
    role: str

    def may(self, role: str) -> bool:
        return allows(self.role, role)


def allows(held: str, needed: str) -> bool:
    """Whether a credential of role `held` may call a route that needs `needed`."""
    return ROLES.index(held) >= ROLES.index(needed)


def check_role(role: object) -> str:
    if role not in ROLES:
        raise ValueError(f"invalid role {role!r}: one of {', '.join(ROLES)}")
    return role  # type: ignore[return-value]


def check_token_name(name: object) -> str:
    if not isinstance(name, str) or not _TOKEN_NAME.match(name):
        raise ValueError(f"invalid token name {name!r}: use 1-64 of A-Z a-z 0-9 . _ -")
    return name


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class Entry:
    """One line of the token table."""

    name: str
    role: str
    hash: str

    def to_json(self) -> dict:
        return {"name": self.name, "role": self.role, "hash": self.hash}

    @classmethod
    def from_json(cls, doc: object) -> Entry:
        if not isinstance(doc, dict):
            raise BadTable("a token entry is not an object")
        try:
            name, role = check_token_name(doc.get("name")), check_role(doc.get("role"))
        except ValueError as error:
            raise BadTable(str(error)) from None
        digest = doc.get("hash")
        if not isinstance(digest, str) or not _HASH.match(digest):
            raise BadTable(f"token {name!r} has no valid SHA-256 hash")
        return cls(name, role, digest)


class TokenTable:
    """The lookup every node's guard makes: a presented token to an Identity.

    `doc` is the table as the master distributes it:
    {"id": STORE-ID, "serial": N, "tokens": [{"name", "role", "hash"}, ...]}
    (and, once the master signs it, "signature").
    """

    def __init__(self) -> None:
        self.doc: dict | None = None
        self._by_hash: dict[str, Identity] = {}
        # Why the last table offered to a node that holds none was refused
        # (e.g. not signed by the master's key), for its 503 answers.
        self.refused: str | None = None

    @property
    def ready(self) -> bool:
        """False on a node that has never had a table from its master."""
        return self.doc is not None

    def identify(self, token: str) -> Identity | None:
        return self._by_hash.get(token_hash(token))

    def install(self, doc: object) -> None:
        """Take `doc` as the table (checked whole first; raises BadTable)."""
        store, serial, entries = parse_table(doc)
        self._by_hash = {e.hash: Identity(e.name, e.role) for e in entries}
        self.doc = doc  # type: ignore[assignment]


def parse_table(doc: object) -> tuple[str, int, list[Entry]]:
    if not isinstance(doc, dict):
        raise BadTable("the token table is not a JSON object")
    store, serial, tokens = doc.get("id"), doc.get("serial"), doc.get("tokens")
    if not isinstance(store, str) or not 0 < len(store) <= 64:
        raise BadTable("the token table has no store id")
    if not isinstance(serial, int) or isinstance(serial, bool) or serial < 0:
        raise BadTable("the token table has no serial")
    if not isinstance(tokens, list) or len(tokens) > 100_000:
        raise BadTable("the token table has no list of tokens")
    return store, serial, [Entry.from_json(t) for t in tokens]


class NodeTokens:
    """A node's copy of its master's token table, kept in DATA so the node
    admits its mounts across restarts while the master is unreachable.

    `verify`, when given, checks the master's signature on a table (it
    returns the document or raises) before anything of it is believed.
    """

    def __init__(self, path: Path, verify: Callable[[dict], dict] | None = None):
        self.path = path
        self.verify = verify
        self.table = TokenTable()

    def load(self) -> None:
        doc = read_json(self.path)
        if doc is None:
            return
        try:
            self.table.install(self.verify(doc) if self.verify else doc)
        except ValueError as error:
            log.warning("ignoring %s (%s); waiting for the master's token table", self.path, error)

    def offer(self, doc: object) -> bool:
        """Take the table from a heartbeat reply if it is well formed, signed
        (with `verify`) and not older than the one held; True if it changed.
        Raises BadTable, or the error of `verify`."""
        try:
            changed = self._offer(doc)
        except ValueError as error:
            if not self.table.ready:
                self.table.refused = str(error)
            raise
        self.table.refused = None
        return changed

    def _offer(self, doc: object) -> bool:
        if self.verify is not None:
            doc = self.verify(doc)  # type: ignore[arg-type]
        store, serial, _ = parse_table(doc)
        held = self.table.doc
        if held is not None and held == doc:
            return False
        if held is not None and held.get("id") == store:
            if serial < held["serial"]:
                raise BadTable(f"the master sent token table {serial}, older than {held['serial']} held here")
            if serial == held["serial"]:
                raise BadTable(f"the master sent a different token table under the same serial {serial}")
        elif held is not None:
            log.warning("the master's token store changed (a new master?): taking its table")
        self.table.install(doc)
        try:
            write_json(self.path, doc)
        except OSError as error:  # a full disk: keep it in memory, take it again next time
            log.warning("cannot save the token table in %s: %s", self.path, error.strerror or error)
        log.info("token table %d: %d tokens", serial, len(doc["tokens"]))  # type: ignore[index]
        return True
