"""Small JSON documents a node keeps on disk, written so a crash leaves either
the old or the new version of a file, never a torn one."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path


def write_json(path: Path, doc: object) -> None:
    """Atomically replace `path` with `doc` (tmp file, fsync, rename, fsync dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    data = json.dumps(doc, indent=1, sort_keys=True).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_bytes(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
