"""Where the image builders keep what they fetch and what they make.

Two places, so that a fresh clone on the same machine builds nothing twice:

    /var/cache/icbd/    (ICBD_CACHE_DIR overrides it) shared by every checkout;
                        written when this user may, else only read
    <checkout>/build/   the checkout's own; the fallback when the shared one
                        cannot be written

Under either: `debs/<recipe>/` holds .deb files, `images/<builder>/<key>/`
finished images, each entry a folder made elsewhere and renamed into place,
so a reader sees all of it or nothing. An entry found in one place is hard
linked into the other (copied across file systems); entries are never
changed once made, so sharing their files is safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

CHECKOUT_BUILD = Path(__file__).resolve().parents[2] / "build"


def system_root() -> Path:
    return Path(os.environ.get("ICBD_CACHE_DIR") or "/var/cache/icbd")


def roots() -> list[Path]:
    """Where entries are looked for, the checkout's first."""
    return [CHECKOUT_BUILD, system_root()]


def _writable(folder: Path) -> bool:
    """Whether `folder` exists or can be made, and this user can write in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def deb_dir(recipe: str) -> Path:
    """The .deb cache of one package recipe: the shared one if it is usable, else the checkout's.

    Usable: this user can write it, or it already holds packages to read.
    """
    shared = system_root() / "debs" / recipe
    if _writable(shared) or any(shared.glob("*.deb")):
        return shared
    return CHECKOUT_BUILD / "debs" / recipe


def find_entry(kind: str, key: str) -> Path | None:
    """A finished entry `images/KIND/KEY` in either place, now present in both where possible
    (and marked as just used, for `prune`)."""
    found = [root / "images" / kind / key for root in roots()
             if (root / "images" / kind / key).is_dir()]
    if not found:
        return None
    for entry in found:
        with contextlib.suppress(OSError):
            os.utime(entry)
    for root in roots():
        mirror = root / "images" / kind / key
        if not mirror.is_dir():
            with contextlib.suppress(OSError):
                link_tree(found[0], mirror)
    return found[0]


@contextlib.contextmanager
def new_entry(kind: str, key: str) -> Iterator[Path]:
    """A scratch folder to build entry KIND/KEY in; renamed into place if the block ends
    without an error, then linked into the other place. Yields the scratch folder."""
    home = next((root for root in (system_root(), CHECKOUT_BUILD)
                 if _writable(root / "images" / kind)), None)
    if home is None:
        raise PermissionError(f"cannot write {system_root()} or {CHECKOUT_BUILD}: run as root")
    parent = home / "images" / kind
    scratch = Path(tempfile.mkdtemp(dir=parent, prefix=f".{key}."))
    try:
        yield scratch
        try:
            scratch.rename(parent / key)
        except OSError:
            if not (parent / key).is_dir():  # not lost to a concurrent build: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    find_entry(kind, key)


def prune(kind: str, keep: int) -> None:
    """Remove all but the `keep` most recently used entries of KIND, in both places.

    A Debian desktop entry takes about 700 MB, and every change of recipe or
    builder code makes a new one.
    """
    for root in roots():
        folder = root / "images" / kind
        if not folder.is_dir():
            continue
        entries = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[keep:]:
            log.info("pruning the cached image %s", old)
            shutil.rmtree(old, ignore_errors=True)


def link_tree(source: Path, dest: Path) -> None:
    """`dest` as a copy of `source` made of hard links (plain copies across file systems),
    built beside `dest` and renamed into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        for path in sorted(source.rglob("*")):
            target = scratch / path.relative_to(source)
            if path.is_dir():
                target.mkdir(exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                copy_file(path, target)
        scratch.rename(dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def copy_file(source: Path, dest: Path) -> None:
    """A copy that keeps holes (images are sparse) and the mtime."""
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", "--preserve=timestamps,mode",
                    str(source), str(dest)], check=True)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the file `path` (made if missing), held for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
