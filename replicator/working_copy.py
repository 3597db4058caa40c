"""Bringing an iMI's working copy to the content of a new build, in place.

`icbd imi update NAME --from PATH` is how an admin says "here is the new
build": a tree, or a disk image that a tool wrote from scratch. Copying it
over the working copy would rewrite every byte, and btrfs would then share
nothing with the last version. rsync, with `--inplace --no-whole-file`,
writes only the blocks that differ and leaves every other extent where it
is; unchanged files (same content) are not written at all. Publishing
then reads and sends only what changed. (A publish also shares extents with
the parent wherever the bytes match, see dedupe.py, so even a copy made
another way costs what changed on the wire; `update` spares the publish the
reading of every rewritten byte.)

A tree replaces the working copy's whole content (files absent from the
tree are deleted); an image file replaces the file of the same name at the
working copy's root and leaves the rest (an icbd-boot.toml, a kernel) alone.
"""

from __future__ import annotations

import functools
import logging
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import trio

log = logging.getLogger(__name__)

# --info=progress2 lines: "    123,456,789  45%   12.34MB/s    0:00:10 (xfr#3, to-chk=0/10)"
_PROGRESS = re.compile(rb"^\s*([\d,]+)\s+(\d+)%")


class UpdateFailed(Exception):
    pass


@dataclass
class UpdateProgress:
    bytes_done: int = 0
    percent: int = 0

    def to_json(self) -> dict:
        return {"bytes_done": self.bytes_done, "percent": self.percent}


def rsync_argv(source: Path, work: Path) -> list[str]:
    common = [
        "rsync", "--archive", "--hard-links", "--acls", "--xattrs", "--numeric-ids",
        # Compare content, not size and mtime: a build written within the same
        # second as the last, at the same size, would pass a quick check
        # (seen here: a changed file skipped). Both sides are read once.
        "--checksum",
        # Times to the nanosecond (rsync compares whole seconds by default and
        # then leaves a folder's sub-second mtime as it was, which a manifest would see).
        "--modify-window=-1",
        "--inplace", "--no-whole-file",  # write only the blocks that differ, where they are
        "--info=progress2", "--no-inc-recursive",  # one overall progress line, with a total
    ]
    if source.is_dir():
        return [*common, "--delete", f"{source}/", f"{work}/"]
    return [*common, str(source), f"{work}/{source.name}"]


async def bring_to(source: Path, work: Path, progress: UpdateProgress) -> None:
    """Make `work` hold `source`'s content (see the module docstring)."""
    argv = rsync_argv(source, work)
    log.info("updating %s from %s", work, source)
    errors = bytearray()
    async with trio.open_nursery() as nursery:
        # run_process owns the child: it is killed if we are cancelled.
        process = await nursery.start(functools.partial(
            trio.run_process, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False))

        async def read_errors() -> None:
            async for data in process.stderr:
                errors.extend(data[-4096:])

        nursery.start_soon(read_errors)
        pending = b""
        async for data in process.stdout:
            pending += data
            # progress2 rewrites its line with \r; read every complete one
            *lines, pending = re.split(rb"[\r\n]", pending)
            for line in lines:
                match = _PROGRESS.match(line)
                if match:
                    progress.bytes_done = int(match.group(1).replace(b",", b""))
                    progress.percent = int(match.group(2))
    code = process.returncode
    if code != 0:
        lines = errors.decode(errors="replace").strip().splitlines()
        raise UpdateFailed(f"rsync failed ({code}): {lines[-1] if lines else 'no message'}")
    progress.percent = 100
