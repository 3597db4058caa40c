"""A small bootable desktop iMI: a Debian cloud kernel, our own initrd, an ext4 root.

    OUT/boot/vmlinuz       the kernel of linux-image-cloud-amd64
    OUT/boot/initrd.img    busybox-static, the modules that reach /dev/vda, an /init
    OUT/rootfs.img         raw ext4: busybox-static and an /sbin/init that prints
                           "icbd-desktop: up, release LABEL", reads the root fs, says
                           "icbd-desktop: session up, release LABEL", powers off
    OUT/icbd-boot.toml     how `icbd boot` starts it

The tree is what an admin would give `icbd imi create NAME --from OUT`. Every
build from the same packages, label and filler is byte-identical (fixed mtimes,
UUID, hash seed and filesystem clock), so two releases of the image differ only
in the blocks that really changed, as a delta transfer expects.

The .deb files come from `apt-get download` once and are kept in a cache folder
(default /var/cache/icbd/debs/small-desktop, shared by every checkout on the
machine, or <repo>/build/debs/small-desktop where that cannot be written; see
cache.py), with the kernel package unpacked beside them; later builds need no
network and take about 0.2 s.

    python -m bench.images.desktop OUT [--label TEXT] [--filler BYTES]
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cache import deb_dir

log = logging.getLogger(__name__)

KERNEL_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# The packages' cache folder is named for the recipe: a new recipe starts a new one.
CACHE_RECIPE = "small-desktop"

# What the initrd must load to mount /dev/vda, pvpanic first so that a panic in
# any later step is reported to qemu (and `icbd boot` fails instead of
# mistaking it for a reboot). In the Debian cloud kernel ext4, jbd2 and crc32c
# are built in; virtio, virtio_pci, virtio_blk and pvpanic are modules. The
# order of the rest comes from modules.dep.
INITRD_MODULES = ("pvpanic-pci", "virtio_pci", "virtio_blk", "ext4")

# Busybox applets the two init scripts call, as symlinks (cheaper at boot than
# `busybox --install`).
APPLETS = ("sh", "mount", "umount", "insmod", "usleep", "switch_root", "cat", "find", "wc",
           "xargs", "poweroff", "dd", "sleep")

FIXED_TIME = 1_700_000_000  # mtime of every file we write (2023-11-14), for reproducible images
FS_UUID = uuid.uuid5(uuid.NAMESPACE_DNS, "rootfs.desktop.icbd")
FS_HASH_SEED = uuid.uuid5(uuid.NAMESPACE_DNS, "hash-seed.desktop.icbd")
FILLER_FILE_SIZE = 4 << 20
MIN_ROOTFS_SIZE = 64 << 20
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+ -]{0,63}\Z")

BOOT_TOML = """\
# Written by bench/images/desktop.py. Paths are inside the iMI.
kernel = "boot/vmlinuz"
initrd = "boot/initrd.img"
disk = "rootfs.img"
# panic=-1: a guest panic ends the run at once instead of hanging until the timeout.
# tsc=reliable, no_timer_check: skip clocksource checks that only cost time under TCG.
append = "console=ttyS0 root=/dev/vda ro quiet panic=-1 tsc=reliable no_timer_check"
memory = "256M"
"""

INITRD_INIT = """\
#!/bin/sh
# icbd initrd: load the drivers for the root disk, mount it read-only, switch to it.
# If anything fails this script exits, the kernel panics and pvpanic tells qemu.
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
for module in {modules}; do
    insmod "/lib/modules/$module" || echo "icbd-initrd: cannot load $module"
done
root=/dev/vda
for arg in $(cat /proc/cmdline); do
    case "$arg" in root=/dev/*) root="${{arg#root=}}" ;; esac
done
tries=0
while [ ! -b "$root" ]; do
    tries=$((tries + 1))
    [ "$tries" -gt 500 ] && echo "icbd-initrd: no $root after 5 s" && exit 1
    usleep 10000
done
mount -t ext4 -o ro "$root" /newroot || exit 1
umount /proc
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
"""

ROOTFS_INIT = """\
#!/bin/sh
# The desktop: say which release booted, read every file of the root fs (the
# boot's working set, scaled by the filler), power off.
mount -t proc proc /proc
echo "icbd-desktop: up, release $(cat /etc/icbd-release)"
files=$(find / -xdev -type f | wc -l)
# To /dev/null: piping into `wc -c` or md5sum doubled the cost under TCG
# (64 MiB: 2.3 s to /dev/null, 4.8 s through md5sum).
find / -xdev -type f | xargs cat > /dev/null
echo "icbd-desktop: read $files files"
# Its session, such as it is, is up: the line `icbd boot --screenshot` waits for.
echo "icbd-desktop: session up, release $(cat /etc/icbd-release)"
# Hooks for tests, set on the kernel command line:
#   icbd.scribble  write 1 MiB over the root disk, to show the desktop's
#                  overlay takes the writes and the shared image does not change;
#   icbd.panic     crash the kernel, to show a panic is told from a power-off;
#   icbd.stay      keep the session up until the host stops the guest, so that
#                  `icbd boot --screenshot` is not racing the power-off.
case " $(cat /proc/cmdline) " in *" icbd.scribble "*)
    dd if=/dev/urandom of=/dev/vda bs=64k count=16 seek=64 conv=fsync 2>/dev/null &&
        echo "icbd-desktop: scribbled 1 MiB on /dev/vda" ;;
esac
case " $(cat /proc/cmdline) " in *" icbd.stay "*)
    while :; do sleep 3600; done ;;
esac
case " $(cat /proc/cmdline) " in *" icbd.panic "*)
    echo "icbd-desktop: panicking on request"
    echo c > /proc/sysrq-trigger ;;
esac
echo "icbd-desktop: powering off"
poweroff -f
"""


class ImageBuildError(RuntimeError):
    """Building the sample image failed (no package, a tool missing or failing)."""


@dataclass(frozen=True)
class KernelTree:
    """The unpacked kernel package, with modules.dep generated by depmod."""

    root: Path
    release: str

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release


def build_desktop_tree(
    out: Path,
    label: str = "1",
    cache_dir: Path | None = None,
    rootfs_size: int | None = None,
    filler_bytes: int = 0,
    filler_seed: int = 0,
) -> Path:
    """Build the desktop iMI root tree in `out` (created or reused) and return it.

    `filler_bytes` adds incompressible files under /usr/share/filler that the
    guest reads in full while booting, to scale the boot working set; the same
    seed gives the same bytes whatever the label. `rootfs_size` defaults to
    the content plus slack, at least 64 MiB (the image is sparse).
    """
    if not _LABEL.match(label):
        raise ValueError(f"label {label!r}: use 1-64 of A-Z a-z 0-9 . _ : + - and spaces")
    if filler_bytes < 0:
        raise ValueError("filler_bytes must be >= 0")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    kernel = unpacked_kernel(cache_dir)
    busybox = unpacked_busybox(cache_dir)

    out = Path(out)
    (out / "boot").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kernel.vmlinuz, out / "boot" / "vmlinuz")
    with tempfile.TemporaryDirectory(prefix="icbd-desktop-") as scratch:
        write_initrd(out / "boot" / "initrd.img", kernel, busybox, Path(scratch) / "initrd")
        write_rootfs(out / "rootfs.img", busybox, Path(scratch) / "rootfs", label,
                     rootfs_size, filler_bytes, filler_seed)
    (out / "icbd-boot.toml").write_text(BOOT_TOML)
    # Fixed mtimes down to the folders: the same image gives the same manifest.
    for path in (out / "boot" / "vmlinuz", out / "boot" / "initrd.img", out / "rootfs.img",
                 out / "icbd-boot.toml", out / "boot", out):
        os.utime(path, (FIXED_TIME, FIXED_TIME))
    return out


# ---- packages ---------------------------------------------------------------

def default_cache_dir() -> Path:
    """Where the .deb files are kept unless a caller says otherwise."""
    return deb_dir(CACHE_RECIPE)


def fetch_deb(package: str, cache_dir: Path) -> Path:
    """The .deb of `package` from the cache, downloaded with apt-get if absent.

    Concurrent callers each download into their own temporary folder and
    rename into place, so nobody ever sees a partial file.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Once cached, a package is used as it is (no network, same bytes every
    # build); empty the cache folder to pick up a newer kernel.
    cached = sorted(cache_dir.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]
    log.info("downloading %s into %s", package, cache_dir)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        # Run as root, apt warns that its sandbox user cannot write here; we don't need it.
        result = subprocess.run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package],
            cwd=tmp, capture_output=True, text=True,
        )
        debs = list(Path(tmp).glob("*.deb"))
        if result.returncode != 0 or len(debs) != 1:
            detail = (result.stderr.strip().splitlines() or ["no .deb written"])[-1]
            raise ImageBuildError(
                f"apt-get download {package} failed ({detail}); "
                "check the network or run apt-get update"
            )
        final = cache_dir / debs[0].name
        os.replace(debs[0], final)
    return final


def deb_field(deb: Path, field: str) -> str:
    return _run(["dpkg-deb", "--field", str(deb), field]).strip()


def unpack_deb_once(deb: Path, prepare: Callable[[Path], None] | None = None) -> Path:
    """`deb` unpacked beside itself (`NAME.deb` -> `NAME.tree/`), once for all callers."""
    tree = deb.with_suffix(".tree")
    if tree.is_dir():
        return tree
    tmp = Path(tempfile.mkdtemp(dir=deb.parent, prefix=".unpack-"))
    try:
        _run(["dpkg-deb", "--extract", str(deb), str(tmp)])
        if prepare is not None:
            prepare(tmp)
        try:
            tmp.rename(tree)
        except OSError:
            if not tree.is_dir():  # not lost to a concurrent caller: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tree


def unpacked_kernel(cache_dir: Path) -> KernelTree:
    """The real kernel package behind the linux-image-cloud-amd64 metapackage, unpacked."""
    meta = fetch_deb(KERNEL_PACKAGE, cache_dir)
    depends = [d.strip().split()[0] for d in deb_field(meta, "Depends").split(",")]
    image_packages = [d for d in depends if d.startswith("linux-image-")]
    if not image_packages:
        raise ImageBuildError(f"{meta.name} depends on no linux-image package: {depends}")
    package = image_packages[0]
    release = package.removeprefix("linux-image-")

    def depmod(root: Path) -> None:
        # The package leaves modules.dep to its postinst; we generate it here.
        _run(["depmod", "--basedir", str(root), release])

    root = unpack_deb_once(fetch_deb(package, cache_dir), prepare=depmod)
    kernel = KernelTree(root, release)
    if not kernel.vmlinuz.is_file() or not (kernel.modules_dir / "modules.dep").is_file():
        raise ImageBuildError(f"{root} holds no vmlinuz or modules.dep for {release}")
    return kernel


def unpacked_busybox(cache_dir: Path) -> Path:
    """The statically linked busybox binary."""
    busybox = unpack_deb_once(fetch_deb(BUSYBOX_PACKAGE, cache_dir)) / "bin" / "busybox"
    if not busybox.is_file():
        raise ImageBuildError(f"{BUSYBOX_PACKAGE} has no bin/busybox")
    return busybox


# ---- initrd -----------------------------------------------------------------

def module_load_order(kernel: KernelTree, names: tuple[str, ...]) -> list[str]:
    """Module files (relative to the modules dir) to insmod, dependencies first.

    Names built into the kernel need nothing; an unknown name is an error.
    """
    def key(name: str) -> str:  # modprobe treats - and _ alike
        return name.replace("-", "_")

    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (kernel.modules_dir / "modules.dep").read_text().splitlines():
        module, _, requires = line.partition(":")
        deps[module] = requires.split()
        by_name[key(Path(module).name.split(".ko")[0])] = module
    builtin = {
        key(Path(line).name.split(".ko")[0])
        for line in (kernel.modules_dir / "modules.builtin").read_text().split()
    }

    order: list[str] = []

    def visit(module: str) -> None:
        if module in order:
            return
        for dep in deps[module]:
            visit(dep)
        order.append(module)

    for name in names:
        if key(name) in builtin:
            continue
        if key(name) not in by_name:
            raise ImageBuildError(f"kernel {kernel.release} has no module {name}")
        visit(by_name[key(name)])
    return order


def write_initrd(dest: Path, kernel: KernelTree, busybox: Path, staging: Path) -> None:
    """A gzip'd newc cpio: busybox, the root-disk modules and /init."""
    modules = module_load_order(kernel, INITRD_MODULES)
    for sub in ("bin", "dev", "proc", "newroot", "lib/modules"):
        (staging / sub).mkdir(parents=True, exist_ok=True)
    _install_busybox(staging, busybox)
    for module in modules:
        target = staging / "lib" / "modules" / module
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kernel.modules_dir / module, target)
    init = staging / "init"
    init.write_text(INITRD_INIT.format(modules=" ".join(modules)))
    init.chmod(0o755)
    # No /dev/console here: the kernel's built-in initramfs (unpacked before
    # ours) already holds it, so /init gets a console without us calling mknod.
    _fix_times(staging)
    names = sorted(str(p.relative_to(staging)) for p in staging.rglob("*"))
    archive = _run(["cpio", "--create", "--format=newc", "--reproducible", "--quiet"],
                   cwd=staging, input=("\n".join(names) + "\n").encode(), binary=True)
    # mtime=0 keeps the gzip header reproducible. Level 6: 1.11 MB in 0.18 s;
    # level 9 saves 4 KB for 0.5 s.
    dest.write_bytes(gzip.compress(archive, compresslevel=6, mtime=0))


# ---- root filesystem --------------------------------------------------------

def write_rootfs(dest: Path, busybox: Path, staging: Path, label: str,
                 size: int | None, filler_bytes: int, filler_seed: int) -> None:
    """A raw ext4 image made from a staging tree with `mke2fs -d` (no mount needed)."""
    for sub in ("bin", "sbin", "dev", "proc", "sys", "tmp", "etc", "usr/share/doc/icbd"):
        (staging / sub).mkdir(parents=True, exist_ok=True)
    _install_busybox(staging, busybox)
    init = staging / "sbin" / "init"
    init.write_text(ROOTFS_INIT)
    init.chmod(0o755)
    (staging / "etc" / "icbd-release").write_text(label + "\n")
    (staging / "etc" / "os-release").write_text(
        f'NAME="icbd sample desktop"\nID=icbd-desktop\nVERSION_ID="{label}"\n')
    (staging / "usr" / "share" / "doc" / "icbd" / "README").write_text(
        "A sample desktop iMI built by bench/images/desktop.py.\n")
    content = _write_filler(staging / "usr" / "share" / "filler", filler_bytes, filler_seed)
    content += busybox.stat().st_size

    if size is None:
        # ext4 metadata (inode tables, bitmaps) takes ~3% plus a little fixed overhead.
        size = max(MIN_ROOTFS_SIZE, content + content // 16 + (16 << 20))
    size = -(-size // (1 << 20)) * (1 << 20)
    _fix_times(staging)
    dest.unlink(missing_ok=True)
    with open(dest, "wb") as f:
        f.truncate(size)
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(FIXED_TIME))
    # No journal: the root is only ever mounted read-only (each desktop's
    # writes go to its qcow2 overlay and are thrown away), so a journal would
    # only add 4+ MiB that the boot reads for nothing.
    _run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-b", "4096",
          "-L", "icbd-root", "-U", str(FS_UUID),
          "-E", f"hash_seed={FS_HASH_SEED},root_owner=0:0,lazy_itable_init=0",
          "-d", str(staging), str(dest)], env=env)
    # mke2fs copies each file's ctime, which no one can set on the source;
    # pin it so that the same content gives the same image.
    paths = ["/" + str(p.relative_to(staging)) for p in sorted(staging.rglob("*"))]
    script = "".join(f'set_inode_field "{p}" ctime @{FIXED_TIME}\n' for p in ["/", *paths])
    _run(["debugfs", "-w", "-f", "-", str(dest)], input=script.encode(), env=env)


def _write_filler(folder: Path, total: int, seed: int) -> int:
    """`total` bytes of incompressible files of 4 MiB, the same for the same seed."""
    if total <= 0:
        return 0
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    index = 0
    left = total
    while left > 0:
        size = min(FILLER_FILE_SIZE, left)
        (folder / f"part-{index:05d}.bin").write_bytes(rng.randbytes(size))
        left -= size
        index += 1
    return total


# ---- shared -----------------------------------------------------------------

def _install_busybox(root: Path, busybox: Path) -> None:
    shutil.copyfile(busybox, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")


def _fix_times(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        os.utime(path, (FIXED_TIME, FIXED_TIME), follow_symlinks=False)


def _run(argv: list[str], *, cwd: Path | None = None, input: bytes | None = None,
         binary: bool = False, env: dict[str, str] | None = None):
    try:
        result = subprocess.run(argv, cwd=cwd, input=input, capture_output=True, env=env)
    except FileNotFoundError:
        raise ImageBuildError(f"{argv[0]} is not installed (see scripts/install-packages)") from None
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        raise ImageBuildError(f"{' '.join(argv[:2])} failed: {detail[-1] if detail else result.returncode}")
    return result.stdout if binary else result.stdout.decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.images.desktop",
                                     description="Build the sample desktop iMI tree in OUT_DIR.")
    parser.add_argument("out", metavar="OUT_DIR")
    parser.add_argument("--label", default="1", help="release label the guest prints (default 1)")
    parser.add_argument("--cache-dir", type=Path,
                        help=f"where .deb files are kept (default {default_cache_dir()})")
    parser.add_argument("--filler", type=int, default=0, metavar="BYTES",
                        help="incompressible bytes the boot reads, to scale the working set")
    parser.add_argument("--rootfs-size", type=int, metavar="BYTES", help="size of rootfs.img")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = build_desktop_tree(Path(args.out), args.label, args.cache_dir,
                                 args.rootfs_size, args.filler)
    except (ImageBuildError, ValueError) as error:
        print(f"desktop: {error}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
