"""The master's catalogue as every other tier receives it: signed, with a
serial that only grows and the time it was issued.

The serial is written to disk before a catalogue that carries it is signed,
so a restart never issues a serial twice (nodes would refuse the second
document as a rollback). It grows on every change (create, publish, rollback,
delete) and every RESIGN_SECONDS, when the catalogue is signed again with a
fresh `issued`: a node that keeps receiving older `issued` times, or none,
knows its view is stale (see icbdcore/trust.py).

Signing costs one Ed25519 signature (~50 us) and the catalogue's canonical
JSON: nothing next to the change it follows; the document is kept and served
as is to every poll.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from icbdcore.catalog import Catalog
from icbdcore.layout import Layout
from icbdcore.records import now_iso, read_json, write_json
from icbdcore.signing import SigningKey
from icbdcore.trust import RESIGN_SECONDS

log = logging.getLogger(__name__)


class SignedCatalogue:
    def __init__(self, layout: Layout, key: SigningKey, build: Callable[[], Catalog]):
        self.layout = layout
        self.key = key
        self.build = build
        doc = read_json(layout.serial_file, {})
        serial = doc.get("serial") if isinstance(doc, dict) else None
        self.serial = serial if isinstance(serial, int) and serial > 0 else 0
        self.doc: dict = {}

    def bump(self, why: str = "changed") -> None:
        """Sign the catalogue as it is now under the next serial (persisted
        first). On a failing disk the last document stays served, and the
        next bump tries again."""
        serial = self.serial + 1
        try:
            write_json(self.layout.serial_file, {"serial": serial})
        except OSError as error:
            log.error("cannot keep catalogue serial %d on disk (%s); still serving serial %d",
                      serial, error.strerror or error, self.serial)
            return
        self.serial = serial
        self.doc = self.key.sign({**self.build().to_json(), "serial": serial, "issued": now_iso()})
        log.debug("catalogue serial %d (%s)", serial, why)

    async def keep_fresh(self, every: float = RESIGN_SECONDS) -> None:
        """Re-sign every `every` seconds, so `issued` tells nodes how fresh their copy is."""
        while True:
            await trio.sleep(every)
            self.bump("re-signed")
