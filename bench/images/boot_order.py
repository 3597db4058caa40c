"""Which files of a root image a boot reads, in the order it first reads them.

    python -m bench.images.boot_order TRACE IMAGE [--out FILE]

TRACE is a read trace of the boot (`icbd mount --trace`; the boot's reads of
the disk image are those of the trace's files named like IMAGE), IMAGE the
rootfs.img that was booted, written by ext4.py. Prints one path per line
(or writes FILE): the order `debian-desktop.boot-order` holds, which the
Debian desktop builder lays out first (see debian_desktop.py, "Boot order").
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from icbdcore.trace import TraceError, read_trace

from .ext4 import Ext4Error, paths_read


def boot_order(trace: Path, image: Path) -> list[str]:
    """The paths of `image` the traced boot read, in first-read order."""
    reads = [r for r in read_trace(trace) if r.file.rsplit("/", 1)[-1] == image.name]
    if not reads:
        raise ValueError(f"the trace has no read of a file named {image.name}")
    return [os.fsdecode(p) for p in paths_read(image, ((r.off, r.len) for r in reads))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.images.boot_order", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    parser.add_argument("image", type=Path)
    parser.add_argument("--out", type=Path, help="write the list here instead of stdout")
    args = parser.parse_args(argv)
    try:
        paths = boot_order(args.trace, args.image)
    except (OSError, TraceError, Ext4Error, ValueError) as error:
        print(f"boot_order: {error}", file=sys.stderr)
        return 1
    text = "".join(f"{p}\n" for p in paths)
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
