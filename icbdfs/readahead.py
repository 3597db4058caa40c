"""Readahead at block granularity, per open file, for readers that really
read in sequence.

The kernel reads ahead by itself (the mount's read_ahead_kb); that hides
nothing of a source that answers a 1 MiB block in milliseconds (site cache)
or tens of milliseconds (a replica across a WAN). So each open file keeps a
detector, and once a reader has read a whole block's worth of bytes in
sequence, the blocks ahead are fetched before they are asked for, in two
tiers:

- near: the next blocks go into the in-memory LRU (blockcache.py), so the
  next requests are hits: one block ahead per block read in sequence so far,
  up to `max_near`, topped up once half of it is used, so that the blocks
  go to the source as one batch (one request) rather than one by one.
- far: once the near window is full, a batch further out (up to `max_far`
  blocks ahead) is handed to `source.prefetch`, so the tier behind the
  source (site cache, replica) streams it in parallel. It is topped up in
  batches, once less than half of it is left, to keep prefetch calls few.

Sequence is judged in bytes, not blocks, and per stream: a read continues a
stream when it starts where one of the file's recent streams ended (within
GAP bytes). A disk image is read by many guest processes at once through one
open file, so up to STREAMS streams are followed side by side; a read that
continues none starts a new one, replacing the least recently used.

Why bytes: a boot reads 4-64 KiB here and there, often two reads in the same
or the next 1 MiB block without any sequence. Judged by blocks ("the same
block or the next one"), those looked sequential: readahead started at once
and, with the far tier, prefetched 32 blocks at a time around scattered
reads. A Debian desktop's boot read 54 MB of its disk; the mount fetched 292
MB from its site cache and the cache 494 MB from the replica. Judged in
bytes, a stream starts reading ahead only after a whole block's worth in
sequence, and a boot's short runs never get a far window.

This class only decides; reader.py carries out the fetches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NOTHING = range(0)
GAP = 128 << 10  # a read this far past a stream's end still continues it (holes, the kernel's rounding)
STREAMS = 8


@dataclass
class Stream:
    next_off: int  # where its last read ended
    run: int  # bytes read in sequence
    near_until: int = -1  # highest block index warmed into memory
    far_until: int = -1  # highest block index handed to source.prefetch
    used: int = 0  # when it was last read (a counter), to replace the least recent


@dataclass
class Readahead:
    chunks: int  # number of blocks in the file
    chunk_size: int
    max_near: int = 8
    max_far: int = 32
    streams: list[Stream] = field(default_factory=list)
    _clock: int = 0

    def advise(self, off: int, end: int) -> tuple[range, range]:
        """Given a read of bytes [off, end), the blocks to warm (near) and to prefetch (far)."""
        self._clock += 1
        stream = self._continued(off)
        if stream is None:
            stream = Stream(next_off=end, run=end - off, used=self._clock)
            if len(self.streams) >= STREAMS:
                self.streams.remove(min(self.streams, key=lambda s: s.used))
            self.streams.append(stream)
        else:
            stream.run += max(0, end - max(off, stream.next_off))
            stream.next_off = max(stream.next_off, end)
            stream.used = self._clock
        window = min(self.max_near, stream.run // self.chunk_size)
        if window <= 0:
            return NOTHING, NOTHING
        last = (end - 1) // self.chunk_size
        final = self.chunks - 1
        near_end = min(final, last + window)
        near = NOTHING
        if stream.near_until - last <= window // 2:  # topped up in batches: one request for several blocks
            near = range(max(stream.near_until, last) + 1, near_end + 1)
            stream.near_until = max(stream.near_until, near_end)
        far = NOTHING
        if window >= self.max_near and self.max_far > self.max_near \
                and stream.far_until - last < self.max_far // 2:
            far_end = min(final, last + self.max_far)
            far = range(max(stream.far_until, near_end) + 1, far_end + 1)
            stream.far_until = max(stream.far_until, far_end)
        return near, far

    def _continued(self, off: int) -> Stream | None:
        """The stream a read at `off` continues, if any: the most recent one
        whose end is within GAP of `off`."""
        best = None
        for stream in self.streams:
            if stream.next_off - GAP <= off <= stream.next_off + GAP \
                    and (best is None or stream.used > best.used):
                best = stream
        return best
