"""Eviction for the block store: a segmented LRU kept in the LMDB index.

The index has three LMDB databases, changed only inside the store's write
transactions (one writer at a time):

    entries  digest(32 bytes) -> size, tick, segment, check (xxh3-64 of the bytes)
    order    segment(1) | tick(8, big-endian) | digest(32) -> b""
    meta     the totals, the tick counter, the format and the clean flag

`order` sorts probation before protected and old before new, so its first key
is always the next victim. A new block enters probation; a hit promotes it to
protected, which may fill PROTECTED_SHARE of the bound and demotes its LRU
block back to probation when it overflows. So a one-off scan (a whole version
prefetched, every file read once) cycles through probation and leaves alone
what boots read again and again. This module decides; the store moves files.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import NamedTuple

import lmdb

PROBATION, PROTECTED = 0, 1
PROTECTED_SHARE = 0.8
ALLOCATION = 4096  # a tiny block still costs a filesystem block

_ENTRY = struct.Struct("<QQBQ")  # size, tick, segment, check
_U64 = struct.Struct("<Q")


class Entry(NamedTuple):
    size: int
    tick: int
    segment: int
    check: int  # xxh3-64 of the block's bytes: the store's cheap re-check on every read


def footprint(size: int) -> int:
    """What a block of `size` bytes is charged against the bound."""
    return max(ALLOCATION, -(-size // ALLOCATION) * ALLOCATION)


def parse_entry(raw: bytes) -> Entry | None:
    """The Entry of an index value; None if malformed (only a power loss
    under NOSYNC could leave one; it is treated as absent)."""
    return Entry(*_ENTRY.unpack(raw)) if len(raw) == _ENTRY.size else None


def order_key(segment: int, tick: int, key: bytes) -> bytes:
    return bytes((segment,)) + tick.to_bytes(8, "big") + key


class Totals:
    """The counters kept in `meta`, read at the start of a transaction and
    saved before it commits, so they always agree with the entries."""

    NAMES = ("bytes", "footprint", "blocks", "protected")

    def __init__(self, txn: lmdb.Transaction, meta) -> None:
        self.txn, self.meta = txn, meta
        for name in self.NAMES:
            raw = txn.get(name.encode(), db=meta)
            setattr(self, name, _U64.unpack(raw)[0] if raw and len(raw) == 8 else 0)

    def zero(self) -> None:
        for name in self.NAMES:
            setattr(self, name, 0)

    def save(self, tick: int) -> None:
        for name in self.NAMES:
            self.txn.put(name.encode(), _U64.pack(max(0, getattr(self, name))), db=self.meta)
        self.txn.put(b"tick", _U64.pack(tick), db=self.meta)

    def add(self, size: int, segment: int, sign: int = 1) -> None:
        self.bytes += sign * size
        self.footprint += sign * footprint(size)
        self.blocks += sign
        if segment == PROTECTED:
            self.protected += sign * footprint(size)


class SegmentedLRU:
    """Every method works inside a write transaction the caller holds."""

    def __init__(self, env: lmdb.Environment, bound: int, next_tick: Callable[[], int]):
        self.entries = env.open_db(b"entries")
        self.order = env.open_db(b"order")
        self.meta = env.open_db(b"meta")
        self.bound = bound
        self.protected_cap = int(bound * PROTECTED_SHARE)
        self.next_tick = next_tick
        self.malformed_seen = False  # the totals may be off: recount at the next open

    def totals(self, txn: lmdb.Transaction) -> Totals:
        return Totals(txn, self.meta)

    def insert(self, txn: lmdb.Transaction, totals: Totals, key: bytes, size: int, check: int, tick: int,
               segment: int = PROBATION) -> None:
        txn.put(key, _ENTRY.pack(size, tick, segment, check), db=self.entries)
        txn.put(order_key(segment, tick, key), b"", db=self.order)
        totals.add(size, segment)

    def delete(self, txn: lmdb.Transaction, totals: Totals, key: bytes) -> bool:
        """Remove `key`'s entry; False if there was none."""
        raw = txn.get(key, db=self.entries)
        if raw is None:
            return False
        txn.delete(key, db=self.entries)
        entry = parse_entry(raw)
        if entry is None:  # size and order key unknown
            self.malformed_seen = True
        else:
            txn.delete(order_key(entry.segment, entry.tick, key), db=self.order)
            totals.add(entry.size, entry.segment, -1)
        return True

    def evict(self, txn: lmdb.Transaction, totals: Totals) -> Iterator[tuple[bytes, int]]:
        """Remove entries until under the bound, probation LRU first; yield
        (key, size) of each so the caller unlinks its file in the same txn."""
        cursor = txn.cursor(db=self.order)
        while totals.footprint > self.bound and cursor.first():
            order = cursor.key()
            key = order[9:]
            cursor.delete()
            raw = txn.get(key, db=self.entries)
            entry = None if raw is None else parse_entry(raw)
            if entry is None or order_key(entry[2], entry[1], key) != order:
                continue  # a stray order key; the entry's own key comes up in turn
            txn.delete(key, db=self.entries)
            totals.add(entry.size, entry.segment, -1)
            yield key, entry.size

    def hits(self, txn: lmdb.Transaction, totals: Totals, touched: dict[bytes, int]) -> None:
        """Write hits noted since the last flush (key -> tick of the latest):
        each moves to protected's MRU end; then demote protected's overflow."""
        for key, tick in touched.items():
            raw = txn.get(key, db=self.entries)
            entry = None if raw is None else parse_entry(raw)
            if entry is None:
                continue  # evicted or dropped since the hit
            size, old_tick, segment, check = entry
            txn.delete(order_key(segment, old_tick, key), db=self.order)
            if segment == PROBATION:
                totals.protected += footprint(size)
            txn.put(key, _ENTRY.pack(size, tick, PROTECTED, check), db=self.entries)
            txn.put(order_key(PROTECTED, tick, key), b"", db=self.order)
        cursor = txn.cursor(db=self.order)
        while totals.protected > self.protected_cap and cursor.set_range(bytes((PROTECTED,))):
            key = cursor.key()[9:]
            cursor.delete()
            raw = txn.get(key, db=self.entries)
            entry = None if raw is None else parse_entry(raw)
            if entry is None:
                continue
            size = entry.size
            tick = self.next_tick()
            txn.put(key, _ENTRY.pack(size, tick, PROBATION, entry.check), db=self.entries)
            txn.put(order_key(PROBATION, tick, key), b"", db=self.order)
            totals.protected -= footprint(size)

    def recount(self, txn: lmdb.Transaction) -> Totals:
        """Make `order` match `entries` exactly and recount the totals."""
        stray = []
        for order in txn.cursor(db=self.order).iternext(values=False):
            raw = txn.get(order[9:], db=self.entries)
            entry = None if raw is None else parse_entry(raw)
            if entry is None or order_key(entry[2], entry[1], order[9:]) != order:
                stray.append(order)
        for order in stray:
            txn.delete(order, db=self.order)
        totals = self.totals(txn)
        totals.zero()
        for key, raw in txn.cursor(db=self.entries):
            entry = parse_entry(raw)
            if entry is None:
                continue
            totals.add(entry.size, entry.segment)
            txn.put(order_key(entry.segment, entry.tick, key), b"", db=self.order, overwrite=False)
        return totals
