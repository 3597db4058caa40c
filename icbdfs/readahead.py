"""Readahead at block granularity, per open file.

The kernel reads ahead 128 KiB at a time; that hides nothing of a source
that answers a 1 MiB block in milliseconds (site cache) or tens of
milliseconds (a replica across a WAN). So each open file keeps a detector:
once reads run sequentially, the blocks ahead are fetched before they are
asked for, in two tiers:

- near: the next `window` blocks go into the in-memory LRU (blockcache.py),
  so the next requests are hits. The window starts at one block and doubles
  each time the reader enters a new block, up to `max_near`.
- far: a batch further out is handed to `source.prefetch`, so the tier
  behind the source (site cache, replica) streams it in parallel. It is
  topped up in batches, once less than half of it is left, to keep the
  number of prefetch calls low.

A jump (not the same block nor the next one) resets everything: random
readers (mmap of libraries, databases) would otherwise waste fetches.
This class only decides; reader.py carries out the fetches.
"""

from __future__ import annotations

from dataclasses import dataclass

NOTHING = range(0)


@dataclass
class Readahead:
    chunks: int  # number of blocks in the file
    max_near: int = 8
    max_far: int = 32
    window: int = 0
    streak: int = 0  # consecutive sequential reads
    last: int = -1  # last block index read
    near_until: int = -1  # highest block index warmed into memory
    far_until: int = -1  # highest block index handed to source.prefetch

    def advise(self, first: int, last: int) -> tuple[range, range]:
        """Given a read of blocks first..last, the blocks to warm (near) and to prefetch (far)."""
        sequential = self.last >= 0 and self.last <= first <= self.last + 1
        entered_new_block = last > self.last
        if not sequential:
            self.window = self.streak = 0
            self.near_until = self.far_until = last
            self.last = last
            return NOTHING, NOTHING
        self.streak += 1
        if entered_new_block or self.window == 0:
            self.window = min(self.max_near, max(1, self.window * 2))
        self.last = last
        end = self.chunks - 1
        near_end = min(end, last + self.window)
        near = range(max(self.near_until, last) + 1, near_end + 1)
        self.near_until = max(self.near_until, near_end)
        far = NOTHING
        if self.max_far > self.max_near and self.far_until - last < self.max_far // 2:
            far_end = min(end, last + self.max_far)
            far = range(max(self.far_until, near_end) + 1, far_end + 1)
            self.far_until = max(self.far_until, far_end)
        return near, far
