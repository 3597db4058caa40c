"""btrfs-progs and the few btrfs ioctls icbd needs, behind plain functions.

Long-running commands (send, receive) are started as child processes that die
with their parent (PR_SET_PDEATHSIG), so a `kill -9` of a node never leaves a
receive writing into a half-made subvolume behind its back.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import re
import signal
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import trio

from icbdcore.layout import Layout
from icbdcore.mounts import containing_mount, is_mountpoint, mounted_at

log = logging.getLogger(__name__)

BTRFS_SUPER_MAGIC = 0x9123683E
_SUBVOL_GETFLAGS = 0x80089419
_SUBVOL_SETFLAGS = 0x4008941A
_SUBVOL_RDONLY = 1 << 1
_PR_SET_PDEATHSIG = 1
F_SETPIPE_SZ = 1031
_libc = ctypes.CDLL(None, use_errno=True)


class BtrfsError(Exception):
    pass


def die_with_parent() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


async def _run(*argv: str) -> str:
    try:
        result = await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True, check=False)
    except FileNotFoundError:
        raise BtrfsError(f"{argv[0]} is not installed (apt-get install btrfs-progs)") from None
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        raise BtrfsError(f"{' '.join(argv[:3])} failed: {detail[-1] if detail else result.returncode}")
    return result.stdout.decode(errors="replace")


def fs_type(path: Path) -> int:
    """The f_type of the filesystem holding `path` (statfs)."""

    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]

    buf = StatFs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno), str(path))
    return buf.f_type & 0xFFFFFFFF


def is_btrfs(path: Path) -> bool:
    return fs_type(path) == BTRFS_SUPER_MAGIC


def is_subvolume(path: Path) -> bool:
    """A btrfs subvolume root has inode number 256."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return st.st_ino == 256 and os.path.isdir(path) and is_btrfs(path)


async def create_subvolume(path: Path) -> None:
    await _run("btrfs", "subvolume", "create", str(path))


async def snapshot(source: Path, dest: Path, *, readonly: bool = True) -> None:
    args = ["btrfs", "subvolume", "snapshot"] + (["-r"] if readonly else []) + [str(source), str(dest)]
    await _run(*args)


async def delete_subvolume(path: Path) -> None:
    """Delete a subvolume and any subvolumes nested in it (received ones are)."""
    for child in sorted(_nested_subvolumes(path), key=lambda p: -len(p.parts)):
        await _run("btrfs", "subvolume", "delete", str(child))
    await _run("btrfs", "subvolume", "delete", str(path))


def _nested_subvolumes(path: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, _ in os.walk(path):
        for name in list(dirnames):
            child = Path(dirpath) / name
            if is_subvolume(child):
                found.append(child)
    return found


async def remove_tree(path: Path) -> None:
    """Remove a path that may be or contain subvolumes."""
    if not os.path.lexists(path):
        return
    if is_subvolume(path):
        await delete_subvolume(path)
        return
    if path.is_dir() and not path.is_symlink():
        for child in _nested_subvolumes(path):
            if child.exists():
                await delete_subvolume(child)
        await trio.to_thread.run_sync(_rmtree, path)
    else:
        path.unlink()


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def get_readonly(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, _SUBVOL_GETFLAGS, buf)
        return bool(struct.unpack("=Q", buf)[0] & _SUBVOL_RDONLY)
    finally:
        os.close(fd)


def set_readonly(path: Path, readonly: bool) -> None:
    """Flip a subvolume's read-only flag with the raw ioctl.

    `btrfs property set ro false` would also clear received_uuid, and without
    it the next incremental receive cannot find its parent. The kernel's
    ioctl leaves received_uuid alone.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, _SUBVOL_GETFLAGS, buf)
        flags = struct.unpack("=Q", buf)[0]
        flags = flags | _SUBVOL_RDONLY if readonly else flags & ~_SUBVOL_RDONLY
        fcntl.ioctl(fd, _SUBVOL_SETFLAGS, struct.pack("=Q", flags))
    finally:
        os.close(fd)


def move_readonly_subvolume(source: Path, dest: Path) -> None:
    """Rename a read-only subvolume into another directory.

    The VFS refuses to move a read-only directory to a new parent (its '..'
    would change), so the subvolume is made writable for the rename only.
    A crash in between can leave `dest` writable; Repository and Receiver
    startup checks make every version read-only again.
    """
    set_readonly(source, False)
    try:
        os.rename(source, dest)
    except OSError:
        set_readonly(source, True)
        raise
    set_readonly(dest, True)


@dataclass(frozen=True)
class SubvolumeInfo:
    uuid: str
    received_uuid: str | None
    readonly: bool
    generation: int


async def subvolume_info(path: Path) -> SubvolumeInfo:
    out = await _run("btrfs", "subvolume", "show", str(path))

    def field(name: str) -> str:
        match = re.search(rf"^\s*{name}:\s*(.*)$", out, re.MULTILINE)
        return match.group(1).strip() if match else ""

    received = field("Received UUID")
    return SubvolumeInfo(
        uuid=field("UUID"),
        received_uuid=None if received in ("", "-") else received,
        readonly="readonly" in field("Flags"),
        generation=int(field("Generation") or 0),
    )


def send_argv(snapshot: Path, parent: Path | None) -> list[str]:
    """`btrfs send [-p parent] snapshot`: the stream on stdout."""
    argv = ["btrfs", "send", "-q"]
    if parent is not None:
        argv += ["-p", str(parent)]
    argv.append(str(snapshot))
    return argv


def receive_argv(target_dir: Path) -> list[str]:
    """`btrfs receive`, confined to `target_dir`.

    A stream is a list of commands naming paths (mkfile, symlink, rename,
    write...) that btrfs receive carries out as root, following symlinks and
    `..`. Unconfined, a stream that makes a symlink to /etc/cron.d and then
    writes through it, or names `../../../etc/x`, writes anywhere on the host.
    `--chroot` confines every path to `target_dir` (the parent of an
    incremental stream is still found: receive opens the filesystem's root
    before it chroots), and `-E 1` stops at the first command that fails,
    so nothing after a refused escape runs either.
    """
    return ["btrfs", "receive", "-q", "-e", "--chroot", "-E", "1", str(target_dir)]


def start_receive(target_dir: Path) -> subprocess.Popen:
    """`btrfs receive` into target_dir (confined there), stdin a pipe for the stream."""
    process = subprocess.Popen(
        receive_argv(target_dir),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=die_with_parent,
    )
    with contextlib.suppress(OSError):
        # 1 MiB writes then cost one wake-up of receive, not sixteen.
        fcntl.fcntl(process.stdin.fileno(), F_SETPIPE_SZ, 1 << 20)
    return process


# --- a node's data folder on btrfs ------------------------------------------


# The loop mount of a node's image. A node holds every version of every iMI it
# serves, setuid binaries and device nodes included; nosuid and nodev make
# them inert on the node's host (they matter only inside a booted desktop).
IMAGE_MOUNT_OPTIONS = "loop,noatime,nosuid,nodev"
SAFE_MOUNT_OPTIONS = frozenset({"nosuid", "nodev"})


async def ensure_btrfs(data: Path, image_size: int) -> None:
    """Make sure `data` is on btrfs, mounted nosuid,nodev, and private (0700).

    If it is not on btrfs, the node keeps its repository in DATA/btrfs.img
    (sparse), formatted and loop-mounted on DATA itself, so DATA/imis,
    DATA/work and DATA/incoming all live on one btrfs (snapshots and receives
    need that). A later start finds the image and mounts it again.
    """
    Layout(data).make_private_root()
    if is_btrfs(data):
        await _keep_safe(data)
        return
    if is_mountpoint(data):
        raise BtrfsError(f"{data} is a mount point but not btrfs; give a btrfs folder or an empty one")
    image = Layout(data).btrfs_image
    if not image.exists():
        others = [p.name for p in data.iterdir()]
        if others:
            raise BtrfsError(
                f"{data} is not on btrfs and not empty ({', '.join(others[:3])}); "
                "give an empty folder (icbd then keeps a btrfs image in it) or a btrfs folder"
            )
        log.info("creating %s (%d bytes, sparse) as this node's btrfs", image, image_size)
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, image_size)
        finally:
            os.close(fd)
        await _run("mkfs.btrfs", "-q", "-L", "icbd", str(image))
    log.info("loop-mounting %s on %s", image, data)
    await _run("mount", "-o", IMAGE_MOUNT_OPTIONS, str(image), str(data))
    if not is_btrfs(data):
        raise BtrfsError(f"mounting {image} on {data} did not give a btrfs")
    Layout(data).make_private_root()  # the new filesystem's root is 0755


async def _keep_safe(data: Path) -> None:
    """A btrfs already mounted on DATA (an earlier start, or the admin) is
    remounted nosuid,nodev if it lacks them. A DATA inside a larger btrfs
    mount is the admin's to mount so: it is only warned about."""
    entry = mounted_at(data)
    if entry is not None:
        if not entry.options >= SAFE_MOUNT_OPTIONS:
            log.info("remounting %s nosuid,nodev", data)
            await _run("mount", "-o", "remount,nosuid,nodev", str(data))
        return
    outer = containing_mount(data)
    if outer is not None and not outer.options >= SAFE_MOUNT_OPTIONS:
        log.warning("%s is on %s, mounted without nosuid,nodev: setuid files and devices in the versions "
                    "this node holds are live on this host; mount it with nosuid,nodev", data, outer.mountpoint)
