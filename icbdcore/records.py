"""Small JSON documents a node keeps on disk, written so a crash leaves either
the old or the new version of a file, never a torn one."""

from __future__ import annotations

import errno
import json
import os
from datetime import UTC, datetime
from pathlib import Path


def write_json(path: Path, doc: object) -> None:
    """Atomically replace `path` with `doc` (tmp file, fsync, rename, fsync dir)."""
    _replace(path, json.dumps(doc, indent=1, sort_keys=True).encode(), sync_dir=True)


def write_bytes(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`."""
    _replace(path, data, sync_dir=False)


def _replace(path: Path, data: bytes, *, sync_dir: bool) -> None:
    """Write `data` whole to a tmp file beside `path`, fsync it and rename it
    over `path`; or fail, leaving `path` as it was and no tmp file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """All of `data` to `fd`: a write may take only part of it (a signal, a
    nearly full disk); the rest is written again, and an error is raised."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "a write made no progress", str(fd))
        view = view[written:]


def read_capped(path: Path, limit: int) -> bytes:
    """A file's bytes, refused (ValueError) before they are read if there are
    more than `limit` of them."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size > limit:
            raise ValueError(f"{path} is larger than {limit} bytes")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return data


def read_json(path: Path, default: object = None) -> object:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
