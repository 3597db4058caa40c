"""A read trace: the reads a mount served, in the order it got them, with when
each began and how long it took. The mount writes one (`icbd mount --trace
FILE`); `icbd replay` plays it back at full speed against a mount or a plain
folder laid out like one.

The file is JSON lines. The first line is the header, every other line one
read:

    {"format": "icbd-read-trace", "version": 1, "started": 1733068800.25}
    {"t": 0.012031, "d": 0.000912, "file": "desk/1/rootfs.img", "off": 1048576, "len": 131072, "ok": true}

`t` is when the mount began to serve the read, in seconds after `started`
(the mount's start); `d` how long it took to answer; `file` the path
relative to the mount point (NAME/VERSION/PATH); `off` and `len` the byte
range the kernel asked for; `ok` false for a read answered with an error.
Reads are written in the order they began. A reader of a trace ignores keys
it does not know, so later versions may add some.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

FORMAT = "icbd-read-trace"
VERSION = 1


class TraceError(ValueError):
    """A file that is not a read trace, or a damaged line in one."""


@dataclass(frozen=True)
class TracedRead:
    t: float  # seconds after the trace began when the read was asked for
    d: float  # seconds it took to answer
    file: str  # NAME/VERSION/PATH, relative to the mount point
    off: int
    len: int
    ok: bool = True

    @property
    def end(self) -> float:
        return self.t + self.d

    def to_line(self) -> str:
        return json.dumps({"t": round(self.t, 6), "d": round(self.d, 6), "file": self.file,
                           "off": self.off, "len": self.len, "ok": self.ok},
                          separators=(",", ":"), ensure_ascii=True) + "\n"


def header_line(started: float) -> str:
    return json.dumps({"format": FORMAT, "version": VERSION, "started": round(started, 6)}) + "\n"


def read_trace(path: Path) -> list[TracedRead]:
    """Every read of the trace at `path`, in the order they began; raises
    TraceError for a file that is not a trace, OSError if it cannot be read."""
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            return list(parse_trace(f))
        except UnicodeDecodeError:
            raise TraceError(f"{path} is not a read trace (not text)") from None


def parse_trace(lines: Iterable[str]) -> Iterator[TracedRead]:
    numbered = enumerate(lines, 1)
    header = next(numbered, (1, ""))[1]
    try:
        doc = json.loads(header)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise TraceError(f"not a read trace: the first line is not an {FORMAT} header")
    if doc.get("version") != VERSION:
        raise TraceError(f"read trace of version {doc.get('version')!r}: this icbd reads version {VERSION}")
    reads = []
    for number, line in numbered:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            read = TracedRead(float(record["t"]), float(record["d"]), str(record["file"]),
                              int(record["off"]), int(record["len"]), bool(record.get("ok", True)))
        except (ValueError, KeyError, TypeError):
            raise TraceError(f"line {number} of the trace is not a read record") from None
        if read.off < 0 or read.len < 0 or read.d < 0 or not read.file or read.file.startswith("/") \
                or ".." in read.file.split("/"):
            raise TraceError(f"line {number} of the trace has a bad file, offset, length or duration")
        reads.append(read)
    reads.sort(key=lambda r: r.t)
    yield from reads
