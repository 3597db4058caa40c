"""A real ImageSource over local directories, for tests and benchmarks.

ROOT/NAME/VERSION/ holds the tree of each version (the layout of DATA/imis/ on
a node). Manifests come from replicator.manifest_builder; blocks are read back
from the files through a digest -> (path, offset, length) index and verified,
so a mount over a TreeSource reads exactly what a mount over a site cache
would, without a network.

Switches for tests: `delay`, `fail` (raise Unavailable) and `hang` (never
answer) as attributes, or as files in a control folder (`delay` holding
seconds, `fail`, `hang`, and `latest/NAME` holding a version for a rollback)
so a test can flip them in a mount served by another process. Calls are counted in `calls` (by method) and `block_calls` (by digest).

Run as a script, it mounts a TreeSource in the foreground (what the real-mount
tests do):

    python tests/tree_source.py --root ROOT --mount MOUNTPOINT [--chunk-size N]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import stat
from collections import Counter
from pathlib import Path

import trio

from icbdcore.catalog import Catalog, ImiInfo, Profile
from icbdcore.manifest import Manifest, VersionRecord
from icbdcore.source import Unavailable
from icbdcore.wire import DEFAULT_CHUNK_SIZE, check_name, content_digest
from icbdfs.fs import MountOptions
from icbdfs.mount import serve
from replicator.manifest_builder import build_manifest

log = logging.getLogger(__name__)


class TreeSource:
    def __init__(
        self,
        root: Path,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        control: Path | None = None,
    ):
        self.root = Path(root)
        self.chunk_size = chunk_size
        self.control = control
        self.latest: dict[str, int] = {}  # rollbacks: overrides the newest version
        self.delay = 0.0
        self.fail = False
        self.hang = False
        self.calls: Counter[str] = Counter()
        self.block_calls: Counter[str] = Counter()
        self.prefetched: list[tuple[str, int, list[str]]] = []
        self.profiles: dict[tuple[str, int], list[str]] = {}
        self._manifests: dict[tuple[str, int], Manifest] = {}
        self._where: dict[str, list[tuple[Path, int, int]]] = {}  # digest -> pieces, in order
        self._last_catalog: Catalog | None = None
        self._limiter = trio.CapacityLimiter(8)
        self._stalled: dict[str, trio.Event] = {}

    # --- switches --------------------------------------------------------

    def stall_block(self, digest: str) -> None:
        """Hold every fetch of this block until release_block()."""
        self._stalled[digest] = trio.Event()

    def release_block(self, digest: str) -> None:
        self._stalled.pop(digest).set()

    def rollback(self, imi: str, version: int) -> None:
        self.latest[imi] = version

    def _switch(self, name: str) -> bool:
        return self.control is not None and (self.control / name).exists()

    def status(self) -> dict:
        return {"tree": str(self.root)}

    async def _gate(self) -> None:
        """Apply the delay/fail/hang switches to one call."""
        if self.hang or self._switch("hang"):
            await trio.sleep_forever()
        if self.fail or self._switch("fail"):
            raise Unavailable("tree source switched to fail")
        delay = self.delay
        if self.control is not None and (self.control / "delay").exists():
            delay = float((self.control / "delay").read_text() or 0)
        if delay:
            await trio.sleep(delay)

    # --- ImageSource -------------------------------------------------------

    async def catalog(self) -> Catalog:
        self.calls["catalog"] += 1
        if self.fail or self.hang or self._switch("fail") or self._switch("hang"):
            if self._last_catalog is None:
                raise Unavailable("tree source switched off and no catalogue known")
            return self._last_catalog  # what the real sources do when upstream is gone
        imis = {}
        for imi_dir in sorted(self.root.iterdir()):
            try:
                name = check_name(imi_dir.name)
            except ValueError:
                continue
            versions = {}
            for version_dir in imi_dir.iterdir():
                if version_dir.name.isdigit():
                    version = int(version_dir.name)
                    manifest = await self._manifest(name, version)
                    versions[version] = VersionRecord(version, manifest.digest, manifest.bytes)
            latest = self.latest.get(name, max(versions, default=None))
            if self.control is not None and (self.control / "latest" / name).exists():
                latest = int((self.control / "latest" / name).read_text())
            imis[name] = ImiInfo(name, latest, versions)
        self._last_catalog = Catalog(imis)
        return self._last_catalog

    async def manifest(self, imi: str, version: int) -> Manifest:
        self.calls["manifest"] += 1
        await self._gate()
        return await self._manifest(imi, version)

    async def block(self, digest: str, imi: str, version: int) -> bytes:
        self.calls["block"] += 1
        self.block_calls[digest] += 1
        await self._gate()
        if digest in self._stalled:
            await self._stalled[digest].wait()
        try:
            where = self._where[digest]
        except KeyError:
            raise Unavailable(f"no block {digest}") from None
        return await trio.to_thread.run_sync(_read_block, digest, where, limiter=self._limiter)

    async def blocks(self, digests: list[str], imi: str, version: int) -> list[bytes | None]:
        self.calls["blocks"] += 1
        out: list[bytes | None] = []
        for digest in digests:
            try:
                out.append(await self.block(digest, imi, version))
            except Unavailable:
                out.append(None)
        return out

    async def prefetch(self, digests: list[str], imi: str, version: int) -> None:
        self.calls["prefetch"] += 1
        self.prefetched.append((imi, version, list(digests)))

    async def profile(self, imi: str, version: int) -> Profile | None:
        self.calls["profile"] += 1
        older = [v for (name, v) in self.profiles if name == imi and v <= version]
        if not older:
            return None
        return Profile(max(older), list(self.profiles[imi, max(older)]))

    async def save_profile(self, imi: str, version: int, digests: list[str]) -> None:
        self.calls["save_profile"] += 1
        self.profiles[imi, version] = list(digests)

    # --- internals -----------------------------------------------------------

    async def _manifest(self, imi: str, version: int) -> Manifest:
        key = (imi, version)
        if key not in self._manifests:
            path = self.root / imi / str(version)
            manifest, _ = await trio.to_thread.run_sync(build_manifest, path, self.chunk_size)
            for entry in manifest.files():
                for index, digest in enumerate(entry.chunks):
                    start, length = entry.chunk_span(index, manifest.chunk_size)
                    self._where.setdefault(digest, [(path / entry.path, start, length)])
            members: dict[int, list] = {}
            for entry in manifest.files():
                if entry.pack is not None:
                    members.setdefault(entry.pack[0], []).append((entry.pack[1], (path / entry.path, 0, entry.size)))
            for index, pieces in members.items():
                self._where.setdefault(manifest.packs[index].digest, [piece for _, piece in sorted(pieces)])
            self._manifests[key] = manifest
        return self._manifests[key]


def _read_block(digest: str, pieces: list[tuple[Path, int, int]]) -> bytes:
    parts = []
    for path, offset, length in pieces:
        fd = os.open(path, os.O_RDONLY)
        try:
            parts.append(os.pread(fd, length, offset))
        finally:
            os.close(fd)
    data = b"".join(parts)
    if content_digest(data) != digest:
        raise Unavailable(f"block {digest} at {pieces[0][0]}:{pieces[0][1]} does not match its digest")
    return data


# --- a sample tree with every kind of entry ------------------------------------

SAMPLE_CHUNK = 64 << 10
ODD_NAME = os.fsdecode(b"bad\xffname")  # not UTF-8: travels with surrogateescape


def build_sample_tree(path: Path, variant: int = 1, chunk_size: int = SAMPLE_CHUNK) -> Path:
    """A version tree with files of several chunks, an empty and a sparse file,
    odd names, symlinks, device nodes and fifos (as root), owners, modes and
    nanosecond mtimes. `variant` changes a few files, as a new version would."""
    rng = random.Random(variant)
    path.mkdir(parents=True)
    files = {
        "etc/motd": f"welcome to version {variant}\n".encode(),
        "bin/tool": rng.randbytes(3 * chunk_size + 1234),
        "big.bin": rng.randbytes(4 * chunk_size),  # ends exactly on a chunk boundary
        "empty": b"",
        "with space/na\u00efve \u0444\u0430\u0439\u043b.txt": "gr\u00fc\u00dfe\n".encode(),
        ODD_NAME: b"odd name\n",
        "private/secret": b"s3cret\n",
        "owned": b"owned by someone else\n",
        "setuid": b"#!/bin/sh\n",
    }
    for rel, data in files.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    with open(path / "sparse.img", "wb") as f:
        f.truncate(10 * chunk_size)
        f.seek(5 * chunk_size + 10)
        f.write(b"an island in a sea of holes")
    os.chmod(path / "bin/tool", 0o755)
    os.chmod(path / "setuid", 0o4755)
    os.chmod(path / "private", 0o700)
    os.chmod(path / "private/secret", 0o600)
    os.symlink("etc/motd", path / "link")
    os.symlink("/nonexistent/target", path / "dangling")
    (path / "dev").mkdir()
    os.mkfifo(path / "dev/fifo", 0o640)
    if os.geteuid() == 0:
        os.chown(path / "owned", 1234, 5678)
        os.chmod(path / "owned", 0o640)
        os.mknod(path / "dev/null0", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(path / "dev/disk0", 0o660 | stat.S_IFBLK, os.makedev(8, 0))
        os.lchown(path / "link", 42, 43)
    # Distinct nanosecond mtimes, deepest entries first so folders keep theirs.
    entries = sorted(path.rglob("*"), key=lambda p: -len(p.parts))
    for i, entry in enumerate([*entries, path]):
        ns = 1_600_000_000_123_456_789 + variant * 10**12 + i * 1_000_001
        os.utime(entry, ns=(ns, ns), follow_symlinks=False)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Mount a TreeSource in the foreground.")
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--mount", required=True)
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    p.add_argument("--control", type=Path)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--refresh", type=float, default=2.0)
    p.add_argument("--profile-quiet", type=float, default=10.0)
    p.add_argument("--trace", type=Path)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    source = TreeSource(args.root, args.chunk_size, args.control)
    options = MountOptions(
        timeout=args.timeout, refresh=args.refresh, profile_quiet=args.profile_quiet, trace=args.trace
    )

    def ready() -> None:
        print("ready", flush=True)

    trio.run(lambda: serve(source, args.mount, options, ready=ready))


if __name__ == "__main__":
    main()
