"""Would content-defined chunking pay? What a rebuild of each kind of file an
iMI holds leaves in place, found by fixed-offset pages (what a publish shares
today, see replicator/dedupe.py) and by content-defined chunks (FastCDC, as
casync and desync cut).

A rebuild that inserts or grows something shifts every byte after it within
its file. A filesystem image keeps files at block-aligned places, so a
change stays where it is; an archive (tar, cpio) is one stream, so it
shifts; a compressed archive changes from the first changed byte on, for
any chunker. For each kind, the same small change is made to a real tree
(Python's standard library from the Debian package, on this host) and the
artefact is built twice: the bytes each method would have to send are the
new artefact's bytes found nowhere in the old one.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import uuid
from pathlib import Path

from .context import BenchContext
from .results import Result

PAGE = 4096
TREE = Path("/usr/lib/python3.11")
FIXED_TIME = 1_700_000_000


def unmatched_fixed(old: bytes, new: bytes, page: int = PAGE) -> int:
    """Bytes of `new` in pages that differ from the page at the same offset in `old`."""
    return sum(min(page, len(new) - start) for start in range(0, len(new), page)
               if new[start:start + page] != old[start:start + page])


def unmatched_aligned(old: bytes, new: bytes, page: int = PAGE) -> int:
    """Bytes of `new` in pages found at no page-aligned offset of `old`."""
    known = {hashlib.blake2b(old[start:start + page], digest_size=16).digest() for start in range(0, len(old), page)}
    return sum(min(page, len(new) - start) for start in range(0, len(new), page)
               if hashlib.blake2b(new[start:start + page], digest_size=16).digest() not in known)


def unmatched_cdc(old: bytes, new: bytes, avg: int = 16 << 10) -> int:
    """Bytes of `new` in content-defined chunks found nowhere in `old`."""
    from fastcdc import fastcdc

    def chunks(data: bytes):
        return fastcdc(data, min_size=avg // 4, avg_size=avg, max_size=avg * 4, fat=True, hf=hashlib.sha256)

    known = {c.hash for c in chunks(old)}
    return sum(c.length for c in chunks(new) if c.hash not in known)


def _tree(dest: Path, grown: bool) -> Path:
    """A copy of the tree with fixed times; `grown`: one file in the middle
    of the tree's order grows by 3000 bytes (a package update in small)."""
    shutil.copytree(TREE, dest, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    files = sorted(p for p in dest.rglob("*.py") if p.is_file())
    if grown:
        victim = files[len(files) // 2]
        victim.write_bytes(victim.read_bytes() + b"# a changed line\n" * 176)
    for path in [dest, *dest.rglob("*")]:
        os.utime(path, (FIXED_TIME, FIXED_TIME), follow_symlinks=False)
    return dest


def _ext4(tree: Path, out: Path) -> bytes:
    size = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file()) * 2 + (32 << 20)
    with open(out, "wb") as f:
        f.truncate(size)
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(FIXED_TIME)}
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-b", "4096", "-F", "-d", str(tree), "-U",
                    str(uuid.uuid5(uuid.NAMESPACE_DNS, "chunking.icbd")), "-E",
                    f"hash_seed={uuid.uuid5(uuid.NAMESPACE_DNS, 'seed.chunking.icbd')}", str(out)],
                   check=True, capture_output=True, env=env)
    return out.read_bytes()


def _tar(tree: Path, out: Path) -> bytes:
    subprocess.run(["tar", "--sort=name", "--owner=0", "--group=0", "--numeric-owner",
                    f"--mtime=@{FIXED_TIME}", "-cf", str(out), "-C", str(tree), "."], check=True)
    return out.read_bytes()


def _cpio_gz(tree: Path, out: Path) -> bytes:
    names = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    archive = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "--reproducible"], cwd=tree,
                             input="\n".join(names).encode(), capture_output=True, check=True).stdout
    data = gzip.compress(archive, mtime=0)
    out.write_bytes(data)
    return data


KINDS = {"ext4_image": _ext4, "tar": _tar, "cpio_gz": _cpio_gz}


def chunking(ctx: BenchContext) -> list[Result]:
    if not TREE.is_dir():
        from .suite import NotAvailable

        raise NotAvailable(f"{TREE} is not on this host (Debian's python3.11)")
    old_tree = _tree(ctx.scratch / "old", grown=False)
    new_tree = _tree(ctx.scratch / "new", grown=True)
    rows = []
    for kind, build in KINDS.items():
        ctx.step(f"chunking: {kind}")
        old = build(old_tree, ctx.scratch / f"{kind}.old")
        new = build(new_tree, ctx.scratch / f"{kind}.new")
        fixed, aligned, cdc = unmatched_fixed(old, new), unmatched_aligned(old, new), unmatched_cdc(old, new)
        rows.append(Result(f"chunking_{kind}", fixed, cdc, "bytes", detail={
            "what": f"a {kind.replace('_', ' ')} of Python's standard library built twice, one file in the "
                    "middle grown by 3000 bytes: the new build's bytes that fixed-offset 4 KiB pages do not "
                    "find in the old build (what a publish sends), against those that content-defined "
                    "chunks (FastCDC, 16 KiB average) do not find. A ratio far above 1 says CDC would pay.",
            "artefact_bytes": len(new), "fixed_unmatched_bytes": fixed, "cdc_unmatched_bytes": cdc,
            "aligned_unmatched_bytes": aligned,
            "aligned": "4 KiB pages found at any page-aligned offset of the old build",
        }))
        for suffix in ("old", "new"):
            (ctx.scratch / f"{kind}.{suffix}").unlink()
    return rows
