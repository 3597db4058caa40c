"""The master's name server and keep-alive.

Nodes register (id, role, site, URL) and then send heartbeats carrying their
status (versions held, transfers). A node's state follows from the time since
its last heartbeat: `alive`, then `suspect` after `suspect_after` seconds of
silence, then `down` after `down_after`; a heartbeat makes it `alive` again.
After a master restart every node is `suspect` until it is heard from.
Registrations and subscriptions persist; liveness does not need to.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from icbdcore.records import read_json, write_json
from icbdcore.wire import check_name, check_node_id, check_node_url, check_role, check_site

log = logging.getLogger(__name__)

ALIVE, SUSPECT, DOWN = "alive", "suspect", "down"


class UnknownNode(KeyError):
    pass


@dataclass
class Node:
    id: str
    role: str
    site: str
    url: str
    last_seen: float | None = None  # time.monotonic() of the last heartbeat
    status: dict = field(default_factory=dict)  # what the node said in its last heartbeat

    def registration(self) -> dict:
        return {"id": self.id, "role": self.role, "site": self.site, "url": self.url}


class NameServer:
    def __init__(self, path: Path, suspect_after: float, down_after: float):
        if not 0 < suspect_after < down_after:
            raise ValueError("need 0 < suspect-after < down-after")
        self.path = path
        self.suspect_after = suspect_after
        self.down_after = down_after
        self.started = time.monotonic()
        self.nodes: dict[str, Node] = {}
        self.subscriptions: dict[str, set[str]] = {}
        self._states: dict[str, str] = {}
        self.changed = trio.Event()  # set (and replaced) when a node changes state

    def load(self) -> None:
        doc = read_json(self.path, {})
        for reg in doc.get("nodes", []):
            self.nodes[reg["id"]] = Node(reg["id"], reg["role"], reg["site"], reg["url"])
        self.subscriptions = {imi: set(ids) for imi, ids in doc.get("subscriptions", {}).items()}

    def _save(self) -> None:
        write_json(self.path, {
            "nodes": [n.registration() for n in self.nodes.values()],
            "subscriptions": {imi: sorted(ids) for imi, ids in self.subscriptions.items()},
        })

    # --- registry ------------------------------------------------------------

    def register(self, node_id: str, role: str, site: str, url: str) -> Node:
        check_node_id(node_id)
        check_role(role)
        check_site(site)
        check_node_url(url)
        node = self.nodes.get(node_id)
        if node is None or node.registration() != {"id": node_id, "role": role, "site": site, "url": url}:
            log.info("registered %s node %s at %s (site %s)", role, node_id, url, site)
            node = self.nodes[node_id] = Node(node_id, role, site, url, status=node.status if node else {})
            self._save()
        node.last_seen = time.monotonic()
        return node

    def heartbeat(self, node_id: str, status: dict) -> Node:
        node = self.nodes.get(node_id)
        if node is None:
            raise UnknownNode(node_id)
        node.last_seen = time.monotonic()
        node.status = status
        self._note_state(node)
        return node

    def forget(self, node_id: str) -> None:
        self.nodes.pop(node_id, None)
        for ids in self.subscriptions.values():
            ids.discard(node_id)
        self._save()

    def state(self, node: Node, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        if node.last_seen is None:
            return DOWN if now - self.started > self.down_after else SUSPECT
        silence = now - node.last_seen
        if silence <= self.suspect_after:
            return ALIVE
        return SUSPECT if silence <= self.down_after else DOWN

    def is_registered(self, node_id: str) -> bool:
        return node_id in self.nodes

    def _note_state(self, node: Node) -> None:
        state = self.state(node)
        old = self._states.get(node.id)
        if state != old:
            self._states[node.id] = state
            if old is not None:
                log.info("node %s (%s, site %s): %s -> %s", node.id, node.role, node.site, old, state)
            self.changed.set()
            self.changed = trio.Event()

    async def watch(self, period: float = 0.5) -> None:
        """Notice and log state changes of silent nodes."""
        while True:
            for node in list(self.nodes.values()):
                self._note_state(node)
            await trio.sleep(period)

    # --- subscriptions -------------------------------------------------------

    def subscribe(self, imi: str, node_id: str) -> None:
        check_name(imi)
        if node_id not in self.nodes:
            raise UnknownNode(node_id)
        self.subscriptions.setdefault(imi, set()).add(node_id)
        self._save()

    def unsubscribe(self, imi: str, node_id: str) -> bool:
        ids = self.subscriptions.get(imi, set())
        if node_id not in ids:
            return False
        ids.discard(node_id)
        if not ids:
            del self.subscriptions[imi]
        self._save()
        return True

    def drop_imi(self, imi: str) -> None:
        if self.subscriptions.pop(imi, None) is not None:
            self._save()

    def subscribers(self, imi: str) -> list[Node]:
        return [self.nodes[i] for i in sorted(self.subscriptions.get(imi, ())) if i in self.nodes]

    def subscriptions_of(self, node_id: str) -> list[str]:
        return sorted(imi for imi, ids in self.subscriptions.items() if node_id in ids)

    def describe(self, node: Node) -> dict:
        self._note_state(node)  # whoever sees a new state first logs the change
        status = node.status
        silence = None if node.last_seen is None else round(time.monotonic() - node.last_seen, 1)
        return {
            **status,  # what the node reports of itself, under the name server's own keys
            **node.registration(),
            "state": self.state(node),
            "seconds_since_heartbeat": silence,
            "subscriptions": self.subscriptions_of(node.id),
            "versions": status.get("versions", {}),
            "transfers": status.get("transfers", []),
        }
