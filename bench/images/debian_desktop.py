"""A real desktop iMI: Debian bookworm with systemd, Xorg, a window manager and a terminal.

    OUT/boot/vmlinuz       Debian's kernel (linux-image-amd64)
    OUT/boot/initrd.img    the initramfs initramfs-tools made inside the image
    OUT/rootfs.img         raw ext4 root (written by ext4.py), mounted by the guest as /dev/vda
    OUT/icbd-boot.toml     how `icbd boot` starts it

The root is made by mmdebstrap (variant apt: the Essential set and apt, then
PACKAGES without recommends) from a local repository of pinned packages
(packages.py), then configured here: a user `desktop` that nodm logs in on
vt7 into a session of twm and xterm (twm using the X server's built-in
font, so no font package); X on the modesetting driver of the
standard VGA (bochs-drm) with no acceleration and no GLX, since under TCG
llvmpipe would only cost time; and a readiness signal. The terminal's shell
creates /run/icbd/session-up; `icbd-ready.path` sees it and starts
`icbd-ready.service` (ordered after graphical.target and the display
manager), which writes "icbd-desktop: session up, release LABEL" to ttyS0.
The marker is made as the terminal's shell shows its first prompt, so the
session has a window manager, a terminal and a shell ready for input.
`icbd boot --screenshot` waits for that line.

Why these packages: the cloud kernel has no DRM and no VGA framebuffer, so X
would have nothing to draw on; linux-image-amd64 has bochs-drm. Its modules
for hardware a desktop under qemu never has (sound, media, wireless,
InfiniBand, AMD/Intel/NVIDIA GPUs...) and all documentation, manual pages
and translations are left out by dpkg path excludes (DPKG_EXCLUDES):
together about 240 MB. nodm is the smallest display manager with auto-login
(50 KB, no greeter, X as root so no Xorg wrapper or logind seat is needed);
twm and xterm share the X libraries xterm needs anyway. dbus: the
systemd-logind that multi-user.target starts needs the system bus.

Reproducible: the same recipe and pinned packages give the same bytes.
SOURCE_DATE_EPOCH for mmdebstrap, dpkg and initramfs-tools, fixed machine-id, filesystem UUID and hash seed, no host files (hostname,
resolv.conf) in the image, every time clamped to the epoch, and the
filesystem laid out by ext4.py, which does not depend on the host's readdir
order. With `base` (the rootfs.img of the previous release), every file
that is in both keeps its place, so two releases differ where their files
differ: one more small package (and a new label) changed 79 blocks of 4 KiB,
half of them dpkg's status file.

Builds are cached by recipe (cache.py): a rebuild with no change copies the
cached files (0.35 s); a cold one about 40 s on a quiet 2-core machine
(download 5 s, mmdebstrap 29 s), three minutes on a loaded one.

    python -m bench.images.debian_desktop OUT [--label TEXT] [--extra-package P ...] [--base IMAGE]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import cache, ext4
from .desktop import FIXED_TIME, ImageBuildError
from .packages import Lock, PackageError, PackagePool

log = logging.getLogger(__name__)

KIND = "debian-desktop"
CACHE_KEEP = 4  # cached images kept (about 700 MB each): two releases and a test's pair
SUITE = "bookworm"
SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
PACKAGES = (
    "systemd", "systemd-sysv", "udev", "dbus",
    "linux-image-amd64", "initramfs-tools",
    "xserver-xorg-core", "xserver-xorg-input-libinput",
    "nodm", "twm", "xterm",
)
_MODULES = "/lib/modules/*/kernel"  # as the kernel package ships them (before usrmerge moves them)
DPKG_EXCLUDES = (
    "/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*",
    "/usr/share/lintian/*",
    f"{_MODULES}/sound/*", f"{_MODULES}/drivers/media/*", f"{_MODULES}/drivers/net/wireless/*",
    f"{_MODULES}/net/wireless/*", f"{_MODULES}/net/mac80211/*", f"{_MODULES}/net/bluetooth/*",
    f"{_MODULES}/drivers/bluetooth/*", f"{_MODULES}/drivers/infiniband/*",
    f"{_MODULES}/drivers/iio/*", f"{_MODULES}/drivers/staging/*", f"{_MODULES}/drivers/comedi/*",
    f"{_MODULES}/drivers/isdn/*", f"{_MODULES}/drivers/gpu/drm/amd/*",
    f"{_MODULES}/drivers/gpu/drm/nouveau/*", f"{_MODULES}/drivers/gpu/drm/i915/*",
    f"{_MODULES}/drivers/gpu/drm/radeon/*",
)
DPKG_INCLUDES = ("/usr/share/doc/*/copyright",)

FS_UUID = uuid.uuid5(uuid.NAMESPACE_DNS, "rootfs.debian-desktop.icbd")
FS_HASH_SEED = uuid.uuid5(uuid.NAMESPACE_DNS, "hash-seed.debian-desktop.icbd")
MACHINE_ID = uuid.uuid5(uuid.NAMESPACE_DNS, "machine-id.debian-desktop.icbd").hex
USER, UID = "desktop", 1000
# qemu's standard VGA offers 1280x800 as its preferred mode (EDID) and X takes it.
SCREEN_SIZE = (1280, 800)
FREE_BYTES = 256 << 20  # room in the root for what the desktop writes at run time (into its overlay)

BOOT_TOML = """\
# Written by bench/images/debian_desktop.py. Paths are inside the iMI.
kernel = "boot/vmlinuz"
initrd = "boot/initrd.img"
disk = "rootfs.img"
# rw: every desktop writes to its own overlay, never to the shared image.
# panic=-1: a guest panic ends the run at once. tsc=reliable, no_timer_check:
# skip clocksource checks that only cost time under TCG.
append = "console=ttyS0 root=/dev/vda rw quiet panic=-1 tsc=reliable no_timer_check"
memory = "1G"
"""

# Run by mmdebstrap after the Essential set is installed, before the kernel:
# initramfs-tools must know what to put in the initrd when the kernel's
# postinst calls it. MODULES=list with our own hook: only what reaches the
# root disk (MODULES=most makes a 30 MB initrd; MODULES=dep cannot see a
# disk in a chroot).
ESSENTIAL_HOOK = """\
#!/bin/sh
set -eu
mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/etc/initramfs-tools/hooks"
printf 'MODULES=list\\nCOMPRESS=gzip\\n' > "$1/etc/initramfs-tools/conf.d/icbd.conf"
cat > "$1/etc/initramfs-tools/hooks/icbd" <<'EOF'
#!/bin/sh
# icbd: the drivers that reach the desktop's root disk (virtio-blk, ext4).
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
manual_add_modules virtio_pci virtio_blk ext4 crc32c_generic
EOF
chmod 755 "$1/etc/initramfs-tools/hooks/icbd"
"""

# Files written into the root after mmdebstrap: path -> (mode, owner uid, content).
# {label} and {machine_id} are filled in.
FILES: dict[str, tuple[int, int, str]] = {
    "/etc/hostname": (0o644, 0, "desktop\n"),
    "/etc/hosts": (0o644, 0, "127.0.0.1\tlocalhost\n127.0.1.1\tdesktop\n"
                              "::1\tlocalhost ip6-localhost ip6-loopback\n"),
    "/etc/machine-id": (0o444, 0, "{machine_id}\n"),
    "/etc/fstab": (0o644, 0, "# The shared root image; this desktop's writes go to its qcow2 overlay.\n"
                             "/dev/vda / ext4 rw,noatime 0 0\n"),
    "/etc/icbd-release": (0o644, 0, "{label}\n"),
    "/etc/default/nodm": (0o644, 0, f"""\
# Written by bench/images/debian_desktop.py: log {USER} in on vt7, no password.
NODM_ENABLED=true
NODM_USER={USER}
NODM_FIRST_VT=7
NODM_XSESSION=/etc/X11/Xsession
NODM_OPTIONS=
NODM_X_OPTIONS='-nolisten tcp'
NODM_MIN_SESSION_TIME=60
NODM_X_TIMEOUT=300
"""),
    "/etc/X11/xorg.conf.d/10-icbd.conf": (0o644, 0, """\
# The standard VGA through bochs-drm. No acceleration and no GLX: both would
# run llvmpipe, which under TCG only costs time.
Section "Device"
    Identifier "vga"
    Driver "modesetting"
    Option "AccelMethod" "none"
EndSection
Section "Module"
    Disable "glx"
EndSection
"""),
    "/etc/default/locale": (0o644, 0, "LANG=C.UTF-8\n"),
    f"/home/{USER}/.xsession": (0o755, UID, """\
#!/bin/sh
# The icbd desktop session: a terminal and a window manager.
xterm -geometry 100x30+60+60 -title desktop -e bash --rcfile /usr/local/lib/icbd/session.bashrc -i &
# twm's fonts are the X server's built-in "fixed"; in the C locale it does not
# warn about every character set that font lacks.
exec env LC_ALL=C twm
"""),
    f"/home/{USER}/.twmrc": (0o644, UID, """\
# The X server's built-in "fixed" font: no font packages needed.
TitleFont "fixed"
ResizeFont "fixed"
MenuFont "fixed"
IconFont "fixed"
IconManagerFont "fixed"
RandomPlacement
NoGrabServer
Color
{
    BorderColor "slategrey"
    TitleBackground "steelblue"
    TitleForeground "white"
    MenuBackground "white"
    MenuForeground "black"
    MenuTitleBackground "steelblue"
    MenuTitleForeground "white"
}
Button1 = : root : f.menu "desktop"
menu "desktop"
{
    "desktop"   f.title
    "Terminal"  f.exec "exec xterm &"
    "Restart"   f.restart
}
"""),
    "/usr/local/lib/icbd/session.bashrc": (0o644, 0, """\
# The first shell of the desktop's terminal: the user's own bashrc, then,
# just before the first prompt, tell icbd-ready.path the session is up.
[ -f ~/.bashrc ] && . ~/.bashrc
echo "icbd desktop, release $(cat /etc/icbd-release)"
icbd_session_up() {
    : > /run/icbd/session-up
    PROMPT_COMMAND=$icbd_prompt_command
}
icbd_prompt_command=$PROMPT_COMMAND
PROMPT_COMMAND=icbd_session_up
"""),
    "/usr/local/libexec/icbd-ready": (0o755, 0, """\
#!/bin/sh
# Tell the host, on the first serial port, that the desktop session is up.
echo "icbd-desktop: session up, release $(cat /etc/icbd-release)" > /dev/ttyS0
"""),
    "/etc/tmpfiles.d/icbd.conf": (0o644, 0, f"d /run/icbd 0755 {USER} {USER} -\n"),
    "/etc/systemd/system/icbd-ready.path": (0o644, 0, """\
[Unit]
Description=Wait for the desktop session (icbd)

[Path]
PathExists=/run/icbd/session-up

[Install]
WantedBy=graphical.target
"""),
    "/etc/systemd/system/icbd-ready.service": (0o644, 0, """\
[Unit]
Description=Tell the host the desktop session is up (icbd)
After=graphical.target display-manager.service

[Service]
Type=oneshot
ExecStart=/usr/local/libexec/icbd-ready
"""),
    "/etc/apt/sources.list": (0o644, 0, "".join(line + "\n" for line in SOURCES)),
}
LINKS = {
    "/etc/systemd/system/graphical.target.wants/icbd-ready.path": "/etc/systemd/system/icbd-ready.path",
    "/etc/systemd/system/default.target": "/lib/systemd/system/graphical.target",
}
REMOVE = ("/etc/resolv.conf", "/vmlinuz", "/vmlinuz.old", "/initrd.img", "/initrd.img.old")


BOOT_ORDER_FILE = Path(__file__).with_name("debian-desktop.boot-order")


def read_boot_order(path: Path = BOOT_ORDER_FILE) -> tuple[str, ...]:
    """The paths a boot reads, in the order it first reads them (boot_order.py made the file)."""
    try:
        return tuple(line.strip() for line in path.read_text().splitlines() if line.strip().startswith("/"))
    except FileNotFoundError:
        return ()


@dataclass(frozen=True)
class Recipe:
    """Everything a build depends on besides the pinned packages."""

    label: str = "1"
    extra_packages: tuple[str, ...] = ()
    base: Path | None = None  # the rootfs.img of the previous release
    suite: str = SUITE
    sources: tuple[str, ...] = SOURCES
    packages: tuple[str, ...] = PACKAGES
    epoch: int = FIXED_TIME
    # Laid out first, in this order (see "Boot order" above); paths missing from the tree are skipped.
    boot_order: tuple[str, ...] = field(default_factory=read_boot_order)

    @property
    def all_packages(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.packages + self.extra_packages))


@dataclass
class BuildInfo:
    key: str
    cached: bool
    seconds: float
    image_bytes: int = 0
    used_bytes: int = 0
    files: int = 0
    packages: int = 0
    kept_from_base: int = 0
    steps: dict[str, float] = field(default_factory=dict)


def build_debian_desktop(out: Path, recipe: Recipe = Recipe(), *, pool: PackagePool | None = None,
                         use_cache: bool = True) -> BuildInfo:
    """Build the desktop iMI tree of `recipe` in `out` (made or replaced), from the cache if it can."""
    started = time.monotonic()
    if os.geteuid() != 0:
        raise ImageBuildError("building the Debian desktop runs mmdebstrap as root: run as root")
    if shutil.which("mmdebstrap") is None:
        raise ImageBuildError("mmdebstrap is not installed (see scripts/install-packages)")
    pool = pool or PackagePool()
    try:
        lock = pool.lock(recipe.suite, recipe.sources, recipe.all_packages)
    except PackageError as error:
        raise ImageBuildError(str(error)) from None
    key = recipe_key(recipe, lock.digest)
    entry = cache.find_entry(KIND, key) if use_cache else None
    if entry is not None:
        _materialize(entry, Path(out))
        record = json.loads((entry / "build.json").read_text())
        return BuildInfo(**{**record["info"], "cached": True, "key": key,
                            "seconds": time.monotonic() - started})
    with cache.new_entry(KIND, key) as scratch:
        info = _build(scratch, recipe, pool, lock)
        info.key = key
        (scratch / "build.json").write_text(json.dumps(
            {"recipe": _recipe_record(recipe), "lock": lock.path.name, "lock_digest": lock.digest,
             "info": asdict(info)}, indent=2, default=str))
        # This very build's files, even when the cache already held an entry for the key.
        _materialize(scratch, Path(out))
    cache.prune(KIND, CACHE_KEEP)
    info.seconds = time.monotonic() - started
    return info


def recipe_key(recipe: Recipe, lock_digest: str) -> str:
    """What the image depends on: the recipe, the pinned packages, the base's layout and this code."""
    code = hashlib.sha256()
    for module in ("debian_desktop.py", "ext4.py", "packages.py"):
        code.update((Path(__file__).parent / module).read_bytes())
    # The base counts by its layout, not by where it lies.
    record = {"recipe": {**_recipe_record(recipe), "base": None}, "lock": lock_digest,
              "code": code.hexdigest()}
    if recipe.base is not None:
        record["base"] = layout_digest(recipe.base)
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


def layout_digest(image: Path) -> str:
    """The part of a base image a build depends on: its geometry and where each path lives."""
    try:
        layout = ext4.read_layout(Path(image))
    except (OSError, ext4.Ext4Error) as error:
        raise ImageBuildError(f"base image {image}: {error}") from None
    h = hashlib.sha256(repr(layout.geometry).encode())
    for path in sorted(layout.entries):
        e = layout.entries[path]
        h.update(path + b"\0" + repr((e.ino, e.kind, e.extents)).encode())
    return h.hexdigest()


def _recipe_record(recipe: Recipe) -> dict:
    record = asdict(recipe)
    record["base"] = str(recipe.base) if recipe.base else None
    return record


def _materialize(entry: Path, out: Path) -> None:
    """Copy a cached entry's iMI files to `out` (copies: `out` may be changed afterwards)."""
    (out / "boot").mkdir(parents=True, exist_ok=True)
    for name in ("boot/vmlinuz", "boot/initrd.img", "rootfs.img", "icbd-boot.toml"):
        (out / name).unlink(missing_ok=True)
        cache.copy_file(entry / name, out / name)
        (out / name).chmod(0o644)
    for path in (out / "boot", out):
        os.utime(path, (FIXED_TIME, FIXED_TIME))


# ---- a build ---------------------------------------------------------------------

def _build(dest: Path, recipe: Recipe, pool: PackagePool, lock: Lock) -> BuildInfo:
    info = BuildInfo(key="", cached=False, seconds=0.0, packages=len(lock.files))
    started = time.monotonic()
    repo = pool.repository(lock)
    work = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".work-"))
    root = work / "root"
    try:
        step = time.monotonic()
        _mmdebstrap(root, work, recipe, repo)
        info.steps["mmdebstrap"] = round(time.monotonic() - step, 1)
        (dest / "boot").mkdir()
        _take_kernel(root, dest / "boot")
        _configure(root, recipe, repo)
        step = time.monotonic()
        try:
            stats = ext4.make_image(root, dest / "rootfs.img", epoch=recipe.epoch, uuid=FS_UUID.bytes,
                                    hash_seed=FS_HASH_SEED.bytes, label="icbd-root",
                                    free_bytes=FREE_BYTES, base=recipe.base,
                                    first=[os.fsencode(p) for p in recipe.boot_order])
            ext4.check_image(dest / "rootfs.img")
        except ext4.Ext4Error as error:
            raise ImageBuildError(str(error)) from None
        info.steps["ext4"] = round(time.monotonic() - step, 1)
        (dest / "icbd-boot.toml").write_text(BOOT_TOML)
        for path in (dest / "boot" / "vmlinuz", dest / "boot" / "initrd.img", dest / "rootfs.img",
                     dest / "icbd-boot.toml", dest / "boot"):
            os.utime(path, (FIXED_TIME, FIXED_TIME))
            if path.is_file():
                path.chmod(0o444)  # cache entries are never changed
        info.image_bytes = stats.geometry.blocks_count * ext4.BLOCK
        info.used_bytes = stats.used_bytes
        info.files = stats.files
        info.kept_from_base = stats.kept
    finally:
        _unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)
    info.seconds = round(time.monotonic() - started, 1)
    log.info("built the Debian desktop in %.0f s (%s)", info.seconds, info.steps)
    return info


def _mmdebstrap(root: Path, work: Path, recipe: Recipe, repo: Path) -> None:
    hook = work / "essential-hook"
    hook.write_text(ESSENTIAL_HOOK)
    hook.chmod(0o755)
    argv = ["mmdebstrap", "--variant=apt", "--mode=root", "--format=directory", "--verbose",
            f"--include={','.join(recipe.all_packages)}",
            "--hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount",
            f"--essential-hook={hook}",
            "--aptopt=Acquire::Languages \"none\"",
            *[f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES],
            *[f"--dpkgopt=path-include={p}" for p in DPKG_INCLUDES],
            recipe.suite, str(root), f"deb [trusted=yes] file:{repo} ./"]
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(recipe.epoch), TMPDIR=str(work),
               LC_ALL="C.UTF-8", DEBIAN_FRONTEND="noninteractive")
    env.pop("PYTHONPATH", None)
    logfile = work / "mmdebstrap.log"
    log.info("mmdebstrap: %d packages into %s (log: %s)", len(recipe.all_packages), root, logfile)
    with open(logfile, "wb") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   env=env)
        try:
            returncode = process.wait()
        except BaseException:
            # SIGTERM, not SIGKILL: mmdebstrap unmounts what it mounted in the chroot.
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise
    if returncode != 0:
        tail = logfile.read_text(errors="replace").strip().splitlines()[-3:]
        raise ImageBuildError(f"mmdebstrap failed ({returncode}): {' / '.join(tail)}")


def _take_kernel(root: Path, boot: Path) -> None:
    """Move the kernel and the initrd out of the root into the iMI's boot/."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if len(kernels) != 1 or len(initrds) != 1:
        raise ImageBuildError(f"expected one kernel and one initrd in /boot, found "
                              f"{[p.name for p in kernels + initrds]}")
    shutil.move(kernels[0], boot / "vmlinuz")
    shutil.move(initrds[0], boot / "initrd.img")


def _configure(root: Path, recipe: Recipe, repo: Path) -> None:
    """The desktop's own files, its user and units; what would differ between hosts goes."""
    for path in REMOVE:
        (root / path.lstrip("/")).unlink(missing_ok=True)
    # dpkg's and debconf's backups of their databases: the image never needs
    # them, and the dpkg status backup alone doubled what one more package changed.
    for pattern in ("var/lib/dpkg/*-old", "var/cache/debconf/*-old"):
        for path in sorted(root.glob(pattern)):
            path.unlink()
    # The empty folders file-mirror-automount made to mount the local repository
    # on, up to the first one a package owns (/var/tmp, if the cache is below it).
    owned = {line for lst in (root / "var/lib/dpkg/info").glob("*.list")
             for line in lst.read_text(errors="replace").splitlines()}
    folder = root / str(repo).lstrip("/")
    while (folder != root and folder.is_dir() and not any(folder.iterdir())
           and "/" + str(folder.relative_to(root)) not in owned):
        folder.rmdir()
        folder = folder.parent
    _add_user(root)
    for path, (mode, owner, text) in FILES.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        target.write_text(text.replace("{label}", recipe.label).replace("{machine_id}", MACHINE_ID))
        target.chmod(mode)
        os.chown(target, owner, owner)
    for path, to in LINKS.items():
        link = root / path.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(to)
    # journald's postinst gives /var/log/journal ACLs for the adm group; the
    # desktop has no such users, and ext4.py writes no extended attributes.
    for path in (root / "var/log/journal",):
        for name in ("system.posix_acl_access", "system.posix_acl_default"):
            with contextlib.suppress(OSError):
                os.removexattr(path, name)


def _add_user(root: Path) -> None:
    """The desktop user, written directly (useradd would date the shadow entry today)."""
    days = FIXED_TIME // 86400
    with open(root / "etc/passwd", "a") as f:
        f.write(f"{USER}:x:{UID}:{UID}:Desktop:/home/{USER}:/bin/bash\n")
    with open(root / "etc/group", "a") as f:
        f.write(f"{USER}:x:{UID}:\n")
    with open(root / "etc/shadow", "a") as f:
        f.write(f"{USER}:*:{days}:0:99999:7:::\n")
    with open(root / "etc/gshadow", "a") as f:
        f.write(f"{USER}:!::\n")
    home = root / "home" / USER
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o755)
    for skel in sorted((root / "etc/skel").iterdir()):
        shutil.copy2(skel, home / skel.name)
        os.chown(home / skel.name, UID, UID)
    os.chown(home, UID, UID)


def _unmount_under(folder: Path) -> None:
    """Unmount anything a killed mmdebstrap left mounted under `folder`, deepest first."""
    prefix = str(folder.resolve()) + "/"
    try:
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    except OSError:
        return
    for point in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.images.debian_desktop",
                                     description="Build the Debian desktop iMI tree in OUT_DIR.")
    parser.add_argument("out", metavar="OUT_DIR")
    parser.add_argument("--label", default="1", help="release label the guest prints (default 1)")
    parser.add_argument("--extra-package", action="append", default=[], metavar="NAME",
                        help="one more Debian package (repeatable)")
    parser.add_argument("--base", type=Path, metavar="IMAGE",
                        help="the previous release's rootfs.img: files in both keep their place")
    parser.add_argument("--no-cache", action="store_true", help="build even if the cache holds the image")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recipe = Recipe(label=args.label, extra_packages=tuple(args.extra_package), base=args.base)
    try:
        info = build_debian_desktop(Path(args.out), recipe, use_cache=not args.no_cache)
    except ImageBuildError as error:
        print(f"debian_desktop: {error}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(info), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
