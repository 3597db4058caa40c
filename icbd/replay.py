"""`icbd replay TRACE --mount DIR`: play a read trace back at full speed.

A read trace (icbdcore/trace.py, written by `icbd mount --trace FILE`) holds
the reads a mount served during, say, a desktop's boot: which file, which
bytes, when each began and how long it took. Under qemu's TCG a boot spends
most of its time on the CPU, which hides the read path; a hypervisor with
KVM would not. Replaying the trace without the CPU time shows what the reads
alone cost: against a mount (cold, with a boot profile, warm) and against
the same files on local disk, the physical bound.

How it plays: every read of the trace in the order they began, each as soon
as the reads that had *finished* before it began in the trace have finished
here too. Reads the guest had in flight together run together; a read the
guest issued only after another one ended (it needed those bytes first)
waits for it. So the replay keeps the trace's concurrency and dependencies
and drops only the time between them. Reads run in worker threads, as many
as the trace ever had in flight.

Files are opened with O_DIRECT where the filesystem allows it: the trace
holds what the mount was asked for after the kernel's page cache, so the
replay asks for exactly those bytes, with no readahead of its own on top
(both a mount and a local folder take O_DIRECT; tmpfs does not, and is read
through the page cache with readahead turned off). Drop the page cache
before a replay of local files to read them from the disk.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import mmap
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from icbdcore.errors import CliError
from icbdcore.trace import TracedRead, TraceError, read_trace

ALIGN = 4096
MAX_THREADS = 64


@dataclass
class ReplayResult:
    seconds: float  # from the first open to the last read's end
    reads: int
    bytes: int  # bytes the reads returned
    threads: int  # worker threads: the most reads the trace had in flight at once
    traced_seconds: float  # from the trace's first read to its last read's end
    traced_read_seconds: float  # the sum of the traced reads' durations
    direct: bool  # every file was read with O_DIRECT
    skipped: int = 0  # reads the trace marks as failed, not replayed
    open_seconds: float = 0.0  # opening the files (on a mount: looking the version up, its manifest)
    read_seconds: float = 0.0  # the sum of the replayed reads' durations
    slowest_read_seconds: float = 0.0

    def to_json(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def in_flight(reads: list[TracedRead]) -> int:
    """The most reads of the trace that were in flight at once."""
    events = sorted([(r.t, 1) for r in reads] + [(r.end, -1) for r in reads])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def dependencies(reads: list[TracedRead]) -> tuple[list[int], list[int]]:
    """(the reads in the order they ended, and for each read how many of
    those had ended before it began): read i may start once the first
    `needs[i]` reads of `by_end` are done."""
    by_end = sorted(range(len(reads)), key=lambda i: (reads[i].end, i))
    ends = [reads[i].end for i in by_end]
    # Strictly before: a read never waits for itself, nor for one that began
    # after it (all of those end at or after its start), so every read it
    # waits for comes before it in `reads`.
    needs = [bisect.bisect_left(ends, r.t) for r in reads]
    return by_end, needs


class _Files:
    """The trace's files under `root`, each opened once."""

    def __init__(self, root: Path, names: list[str], direct: bool):
        self.fds: dict[str, int] = {}
        self.direct: dict[str, bool] = {}
        try:
            for name in names:
                path = root / name
                fd = -1
                if direct:
                    with contextlib.suppress(OSError):
                        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                self.direct[name] = fd >= 0
                if fd < 0:
                    try:
                        fd = os.open(path, os.O_RDONLY)
                    except FileNotFoundError:
                        raise CliError(f"{path} does not exist: the trace was taken of another tree "
                                       f"(replay it against the mount or folder that holds {name})") from None
                    except OSError as error:
                        raise CliError(f"cannot open {path}: {error.strerror}") from None
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                self.fds[name] = fd
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def replay(reads: list[TracedRead], root: Path, *, direct: bool = True) -> ReplayResult:
    """Replay `reads` against the files under `root` (a mount, or a folder laid
    out like one: NAME/VERSION/PATH). Raises CliError for a file it cannot
    open, OSError for a read that fails."""
    done_reads = [r for r in reads if r.ok]
    skipped = len(reads) - len(done_reads)
    reads = done_reads
    threads = max(1, min(MAX_THREADS, in_flight(reads)))
    by_end, needs = dependencies(reads)
    rank_of = {index: rank for rank, index in enumerate(by_end)}
    finished = [False] * len(reads)
    state = {"prefix": 0, "bytes": 0, "error": None, "read_seconds": 0.0, "slowest": 0.0}
    changed = threading.Condition()
    buffers = threading.local()
    largest = max((r.len for r in reads), default=0) + 2 * ALIGN

    def buffer() -> mmap.mmap:  # page-aligned, as O_DIRECT needs
        if getattr(buffers, "map", None) is None:
            buffers.map = mmap.mmap(-1, largest)
        return buffers.map

    started = time.perf_counter()
    files = _Files(Path(root), list(dict.fromkeys(r.file for r in reads)), direct)
    opened = time.perf_counter() - started
    try:
        def one(index: int) -> None:
            read = reads[index]
            try:
                fd = files.fds[read.file]
                off, end = read.off, read.off + read.len
                if files.direct[read.file]:  # whole aligned pages around the traced bytes
                    off, end = off - off % ALIGN, -(-end // ALIGN) * ALIGN
                view = memoryview(buffer())[:end - off]
                began = time.perf_counter()
                got = os.preadv(fd, [view], off)
                took = time.perf_counter() - began
                with changed:
                    state["bytes"] += min(got, read.len)
                    state["read_seconds"] += took
                    state["slowest"] = max(state["slowest"], took)
            except OSError as error:
                with changed:
                    state["error"] = state["error"] or error
            finally:
                with changed:
                    finished[rank_of[index]] = True
                    while state["prefix"] < len(reads) and finished[state["prefix"]]:
                        state["prefix"] += 1
                    changed.notify_all()

        with ThreadPoolExecutor(threads, thread_name_prefix="replay") as pool:
            for index in range(len(reads)):
                with changed:
                    while state["prefix"] < needs[index] and state["error"] is None:
                        changed.wait()
                    if state["error"] is not None:
                        break
                pool.submit(one, index)
        seconds = time.perf_counter() - started
    finally:
        files.close()
    if state["error"] is not None:
        raise state["error"]
    traced = (max(r.end for r in reads) - min(r.t for r in reads)) if reads else 0.0
    return ReplayResult(seconds=seconds, reads=len(reads), bytes=state["bytes"], threads=threads,
                        traced_seconds=traced, traced_read_seconds=sum(r.d for r in reads),
                        direct=all(files.direct.values()), skipped=skipped, open_seconds=opened,
                        read_seconds=state["read_seconds"], slowest_read_seconds=state["slowest"])


def main(args) -> int:
    """`icbd replay TRACE --mount DIR [--only PREFIX] [--buffered]`."""
    try:
        reads = read_trace(Path(args.trace))
    except FileNotFoundError:
        raise CliError(f"no read trace at {args.trace}: record one with icbd mount --trace FILE") from None
    except (TraceError, OSError) as error:
        raise CliError(f"cannot read the trace {args.trace}: {error}") from None
    if args.only:
        reads = [r for r in reads if r.file == args.only or r.file.startswith(args.only.rstrip("/") + "/")]
    if not reads:
        raise CliError(f"{args.trace} holds no reads{' under ' + args.only if args.only else ''} to replay")
    root = Path(args.mount)
    if not root.is_dir():
        raise CliError(f"{root} is not a folder: give the mount point (or a folder laid out like one)")
    try:
        result = replay(reads, root, direct=not args.buffered)
    except OSError as error:
        raise CliError(f"a read failed during the replay: {error.strerror or error}") from None
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
        return 0
    print(f"{result.reads} reads, {result.bytes / 1e6:.1f} MB in {result.seconds:.3f} s "
          f"({result.bytes / max(result.seconds, 1e-9) / 1e6:.0f} MB/s, {result.threads} at most at once"
          f"{', O_DIRECT' if result.direct else ', through the page cache'}); "
          f"the trace: {result.traced_seconds:.1f} s, {result.traced_read_seconds:.3f} s of it in reads",
          file=sys.stdout)
    return 0
