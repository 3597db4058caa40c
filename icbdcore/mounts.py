"""What is mounted where: the one reader of /proc/self/mountinfo; and what
other programs may ask of an icbd mount besides its files."""

from __future__ import annotations

import os
from dataclasses import dataclass

# Reading this extended attribute of a version folder of an icbd mount
# (MOUNT/NAME/VERSION) tells the mount that a boot of that version reached
# its session: the version's boot profile recording ends there. The value is
# the recording's state as JSON: {"state": "none"|"recording"|"ended",
# "blocks": N, "ended_by": ...}. `icbd boot` reads it when the guest's
# session line comes.
SESSION_UP_XATTR = "user.icbd.session-up"


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    options: frozenset[str]  # per-mount options (ro, nosuid, nodev, ...)


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo.
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def mounts() -> list[MountEntry]:
    """Every mount this process sees, in mount order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            tail = fields[fields.index("-") + 1:]
            out.append(MountEntry(_unescape(fields[4]), tail[0], _unescape(tail[1]),
                                  frozenset(fields[5].split(","))))
    return out


def mounted_at(path: str | os.PathLike) -> MountEntry | None:
    """What is mounted exactly at `path` (the last mount there wins), or None.
    The parent is resolved, not `path` itself: a dead FUSE mount cannot be stat-ed."""
    absolute = os.path.abspath(path)
    target = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    found = None
    for entry in mounts():
        if entry.mountpoint == target:
            found = entry
    return found


def is_mountpoint(path: str | os.PathLike) -> bool:
    return mounted_at(path) is not None


def mounts_under(folder: str | os.PathLike) -> list[str]:
    """Mount points strictly below `folder`."""
    prefix = os.path.realpath(folder).rstrip("/") + "/"
    return [m.mountpoint for m in mounts() if m.mountpoint.startswith(prefix)]


def containing_mount(path: str | os.PathLike) -> MountEntry | None:
    """The mount that holds `path` (the deepest mount point above it, or at it)."""
    target = os.path.realpath(path)
    found = None
    for entry in mounts():
        point = entry.mountpoint.rstrip("/") + "/"
        if (target + "/").startswith(point) and (found is None or len(entry.mountpoint) >= len(found.mountpoint)):
            found = entry
    return found


def is_icbd(entry: MountEntry) -> bool:
    """Whether `entry` is an icbd FUSE mount."""
    return entry.fstype == "fuse.icbd" or (entry.fstype.startswith("fuse") and entry.source == "icbd")
