"""Boot profiles: which blocks a version needs first, recorded and replayed.

A desktop booting from a cold cache would otherwise wait for its blocks one
by one, each a round trip to a replica. The first mount that boots a version
writes down the distinct blocks its readers touched, in first-touch order;
every later mount hands that list to `source.prefetch` as soon as the version
is first accessed, so the blocks stream in ahead of the boot.

Recording follows the boot, not the clock:

- It starts at the first read of a version and counts demand reads only
  (readahead does not touch blocks, it guesses).
- It goes on while any file of the version is open: a desktop's qemu holds
  its disk image open from its start to its end, so however long the guest
  spends on the CPU between two reads (under TCG a Debian boot spends 10-11 s
  between its initrd and its first read of the root filesystem, and a
  recording that closed after 10 s without a new block held only the kernel
  and the initrd: 30 blocks of 146), the recording waits for it.
- It ends when the boot says its session is up (`session_up`: `icbd boot`
  reads the version folder's `user.icbd.session-up` attribute when the
  guest's session line comes), once no file of the version is open and
  `quiet` seconds have passed since the last close or new block (the boot's
  qemu exited), after `max_seconds`, or at `max_blocks` blocks, whichever
  comes first.
- It is saved with `source.save_profile` only when the source had no
  profile recorded on this exact version when recording began (it may have
  answered with an older version's, which replays well but is not this
  version's own).

Replay filters the profile to blocks of this version's manifest (an older
version's profile mostly still applies) and does two things at once: it asks
the source to prefetch the whole list (a site cache fills its store from the
replicas at high concurrency), and it pulls the list, in order, into the
mount's own memory, a window ahead of the readers (`follow`). The first turns
a cold site into a warm one; the second spares a warm boot its round trip to
the site cache on each block, and fetches while the guest kernel is still
busy with the CPU.

Everything here runs in background tasks of the filesystem's nursery, off
the request path: a read only appends a digest to a dict.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import trio

from icbdcore.catalog import Profile
from icbdcore.source import ImageSource

log = logging.getLogger(__name__)

_UNKNOWN = object()  # the source's profile could not be fetched

# BlockCache.follow: pull blocks into memory in order, a window ahead of the readers.
Follow = Callable[..., Awaitable[int]]


@dataclass
class ProfileOptions:
    quiet: float = 10.0  # once no file of the version is open: end after this long without a close or new block
    max_seconds: float = 600.0
    max_blocks: int = 1 << 16
    timeout: float = 30.0  # bound on each profile/prefetch/save call to the source
    follow_concurrency: int = 3  # batches (of up to 8 blocks) pulled into memory at once
    follow_idle: float = 10.0  # stop pulling when readers take none of them for this long


@dataclass
class _Version:
    imi: str
    version: int
    digests: frozenset[str]  # every block of the version's manifest
    window: int  # profile blocks the mount's memory may hold ahead of the readers
    known: object = None  # what source.profile said (Profile, None or _UNKNOWN)
    known_ready: trio.Event = field(default_factory=trio.Event)
    replayed: set[str] = field(default_factory=set)  # profile blocks replayed and not read yet
    recording: dict[str, None] | None = None  # ordered set; None: not started
    closed: bool = False
    last_new: float = 0.0  # when the last new block (or the last close of a file) came
    open_files: int = 0  # handles of the version's files open now
    ended_by: str = ""  # why the recording ended: session, closed, max_seconds, max_blocks
    changed: trio.Event = field(default_factory=trio.Event)  # a file closed, or the boot said it is up


class BootProfiles:
    def __init__(
        self,
        source: ImageSource,
        nursery: trio.Nursery,
        options: ProfileOptions,
        stats: Counter[str],
        follow: Follow | None = None,
        held: Callable[[str], bool] | None = None,
    ):
        """`follow`: pulls a replayed profile into the mount's memory;
        `held`: whether a block is in that memory now (to count the profile's
        blocks that were there before a reader asked for them)."""
        self._source = source
        self._follow = follow
        self._held = held
        self._nursery = nursery
        self._options = options
        self._stats = stats
        self._versions: dict[tuple[str, int], _Version] = {}

    def first_access(self, imi: str, version: int, digests: frozenset[str], window: int = 0) -> None:
        """A version's manifest was just loaded: replay its profile in the background."""
        key = (imi, version)
        if key in self._versions:
            return
        state = self._versions[key] = _Version(imi, version, digests, window)
        self._nursery.start_soon(self._replay, state)

    def touched(self, imi: str, version: int, digests: Iterable[str]) -> None:
        """Readers touched these blocks of the version (called on every read,
        before the blocks are looked up)."""
        state = self._versions.get((imi, version))
        if state is None:
            return
        if state.replayed:
            self._count_ready(state, digests)
        if state.closed:
            return
        recording = state.recording
        if recording is None:
            recording = state.recording = {}
            state.last_new = trio.current_time()
            self._nursery.start_soon(self._record, state)
        for digest in digests:
            if digest not in recording:
                recording[digest] = None
                state.last_new = trio.current_time()
        if len(recording) >= self._options.max_blocks:
            self._end(state, "max_blocks")

    def _count_ready(self, state: _Version, digests: Iterable[str]) -> None:
        """For each replayed profile block read for the first time: was it in memory already?"""
        for digest in digests:
            if digest in state.replayed:
                state.replayed.discard(digest)
                ready = self._held is not None and self._held(digest)
                self._stats["profile_blocks_ready" if ready else "profile_blocks_late"] += 1

    def opened(self, imi: str, version: int) -> None:
        """A file of the version was opened (its recording goes on while one is)."""
        state = self._versions.get((imi, version))
        if state is not None:
            state.open_files += 1

    def released(self, imi: str, version: int) -> None:
        """A file of the version was closed."""
        state = self._versions.get((imi, version))
        if state is None or state.open_files == 0:
            return
        state.open_files -= 1
        if state.open_files == 0 and not state.closed:
            state.last_new = trio.current_time()
            state.changed.set()

    def session_up(self, imi: str, version: int) -> dict:
        """The boot of this version reached its session: end its recording
        now. Returns what recording_state() says of it."""
        state = self._versions.get((imi, version))
        if state is not None and state.recording is not None and not state.closed:
            self._end(state, "session")
        return self.recording_state(imi, version)

    def recording_state(self, imi: str, version: int) -> dict:
        """The state of a version's recording: `state` (none, recording,
        ended), its block count and why it ended."""
        state = self._versions.get((imi, version))
        if state is None or state.recording is None:
            return {"state": "none", "blocks": 0}
        return {"state": "ended" if state.closed else "recording", "blocks": len(state.recording),
                **({"ended_by": state.ended_by} if state.ended_by else {})}

    def recordings(self) -> dict[str, dict]:
        """recording_state() of every version with a recording, by NAME@VERSION (for the status)."""
        return {f"{imi}@{version}": self.recording_state(imi, version)
                for (imi, version), state in self._versions.items() if state.recording is not None}

    def _end(self, state: _Version, why: str) -> None:
        if not state.closed:
            state.closed = True
            state.ended_by = why
            state.changed.set()

    def recorded(self, imi: str, version: int) -> list[str] | None:
        """The recording so far (for tests and status)."""
        state = self._versions.get((imi, version))
        return None if state is None or state.recording is None else list(state.recording)

    async def _replay(self, state: _Version) -> None:
        try:
            with trio.fail_after(self._options.timeout):
                state.known = await self._source.profile(state.imi, state.version)
        except Exception as error:
            log.warning("no boot profile for %s@%d: %s", state.imi, state.version, error)
            state.known = _UNKNOWN
        finally:
            state.known_ready.set()
        if not isinstance(state.known, Profile):
            return
        wanted = [d for d in dict.fromkeys(state.known.digests) if d in state.digests]
        if not wanted:
            return
        self._stats["profile_replays"] += 1
        self._stats["profile_blocks"] += len(wanted)
        # Blocks read before the replay could start were not ready for their readers.
        early = set(wanted) & set(state.recording or ())
        state.replayed = set(wanted) - early
        self._stats["profile_blocks_late"] += len(early)
        log.info("replaying boot profile of %s@%d: %d blocks", state.imi, state.version, len(wanted))
        if self._follow is not None and state.window > 0:
            self._nursery.start_soon(self._follow_in_memory, state, wanted)
        try:
            with trio.fail_after(self._options.timeout):
                await self._source.prefetch(wanted, state.imi, state.version)
        except Exception as error:
            log.warning("prefetch of the boot profile of %s@%d failed: %s", state.imi, state.version, error)

    async def _follow_in_memory(self, state: _Version, wanted: list[str]) -> None:
        options = self._options
        fetched = await self._follow(wanted, state.imi, state.version, window=state.window,
                                     concurrency=options.follow_concurrency, idle=options.follow_idle)
        log.debug("boot profile of %s@%d: %d blocks pulled into memory", state.imi, state.version, fetched)

    async def _record(self, state: _Version) -> None:
        options = self._options
        started = trio.current_time()
        while not state.closed:
            deadline = started + options.max_seconds
            if state.open_files == 0:
                deadline = min(deadline, state.last_new + options.quiet)
            if trio.current_time() >= deadline:
                self._end(state, "max_seconds" if deadline == started + options.max_seconds else "closed")
                break
            state.changed = trio.Event()
            with trio.move_on_at(deadline):
                await state.changed.wait()
        digests = list(state.recording or ())
        if not digests:
            return
        self._stats["profiles_recorded"] += 1
        log.info("boot profile of %s@%d recorded: %d blocks (ended: %s)", state.imi, state.version,
                 len(digests), state.ended_by)
        await state.known_ready.wait()
        known = state.known
        if known is _UNKNOWN:
            log.info("boot profile of %s@%d not saved: the source's profile is unknown", state.imi, state.version)
            return
        if isinstance(known, Profile) and known.recorded_on == state.version:
            log.debug("boot profile of %s@%d already known", state.imi, state.version)
            return
        try:
            with trio.fail_after(options.timeout):
                await self._source.save_profile(state.imi, state.version, digests)
        except Exception as error:
            log.warning("saving the boot profile of %s@%d failed: %s", state.imi, state.version, error)
            return
        self._stats["profiles_saved"] += 1
        log.info("saved the boot profile of %s@%d: %d blocks", state.imi, state.version, len(digests))
