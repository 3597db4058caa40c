"""The master's repository: iMIs as btrfs subvolumes, versions as read-only
snapshots, records that survive restarts.

Commit points, so that a crash at any moment leaves a consistent repository
(checked and repaired by `open()`):

- create: the copy is made in work/.NAME.creating, renamed to work/NAME, and
  the iMI exists once meta/NAME/imi.json is written.
- publish: the working copy is snapshotted to imis/NAME/V (complete at
  once), its manifest is built, the chunks that equal the parent's are made
  to share its extents (dedupe.py), the snapshot is made read-only, its
  manifest is written, and the version exists once meta/NAME/V.json is
  written. A snapshot without a record is deleted at the next start.
- delete: removing imi.json is the commit; the rest is cleanup.
- `latest` is the newest version unless a rollback pinned an older one, so a
  publish needs no second record to move it.

Every version record is signed with the master's key when it is written
(icbdcore/signing.py); one found at start that this key did not sign (the key
was replaced) is signed again.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import trio

from icbdcore.catalog import Catalog, ImiInfo
from icbdcore.layout import Layout
from icbdcore.manifest import MAX_MANIFEST, Manifest, VersionRecord
from icbdcore.records import now_iso, read_capped, read_json, write_bytes, write_json
from icbdcore.signing import SigningKey, Untrusted
from icbdcore.wire import InvalidInput, Refused, check_name, parse_version

from . import btrfs
from .dedupe import share_with_parent
from .manifest_builder import BuildStats, Parent, build_manifest
from .working_copy import UpdateFailed, UpdateProgress, bring_to

log = logging.getLogger(__name__)


class RepositoryError(Refused):
    """A request the repository refuses, with the HTTP status to answer."""


@dataclass
class Imi:
    name: str
    uuid: str
    created: str
    pinned: int | None = None
    versions: dict[int, VersionRecord] = field(default_factory=dict)

    @property
    def latest(self) -> int | None:
        if self.pinned in self.versions:
            return self.pinned
        return max(self.versions, default=None)

    def record(self) -> dict:
        return {"name": self.name, "uuid": self.uuid, "created": self.created, "pinned": self.pinned}

    def info(self) -> ImiInfo:
        """This iMI as the catalogue shows it."""
        return ImiInfo(name=self.name, latest=self.latest, versions=dict(self.versions),
                       uuid=self.uuid, created=self.created)


@dataclass
class PublishProgress:
    version: int
    bytes_done: int = 0
    bytes_total: int = 0
    phase: str = "reading the new version"
    seconds: dict[str, float] = field(default_factory=dict)  # by phase, as they end
    _lap: float = field(default_factory=time.perf_counter)

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._lap, 3)
        self._lap = now

    def to_json(self) -> dict:
        return {"version": self.version, "bytes_done": self.bytes_done, "bytes_total": self.bytes_total,
                "phase": self.phase}


class Repository:
    def __init__(self, layout: Layout, chunk_size: int, key: SigningKey):
        self.layout = layout
        self.chunk_size = chunk_size
        self.key = key
        self.imis: dict[str, Imi] = {}
        self.publishing: dict[str, PublishProgress] = {}
        self.updating: dict[str, UpdateProgress] = {}
        self.last_publish: dict[str, dict] = {}  # where the time of each iMI's last publish went
        self._locks: dict[str, trio.Lock] = {}

    def _lock(self, name: str) -> trio.Lock:
        return self._locks.setdefault(name, trio.Lock())

    # --- start-up ------------------------------------------------------------

    async def open(self) -> None:
        self.layout.make_dirs()
        for leftover in self.layout.work.glob(".*.creating"):
            log.warning("removing unfinished create %s", leftover)
            await btrfs.remove_tree(leftover)
        names = {p.name for p in self.layout.meta.iterdir() if p.is_dir()}
        names |= {p.name for p in self.layout.work.iterdir() if not p.name.startswith(".")}
        names |= {p.name for p in self.layout.imis.iterdir()}
        for name in sorted(names):
            try:
                check_name(name)
            except InvalidInput:
                log.warning("ignoring %r in the data folder: not an iMI name", name)
                continue
            doc = read_json(self.layout.imi_record(name))
            if not isinstance(doc, dict):
                log.warning("removing remains of iMI %s (never finished or deleted)", name)
                await self._remove_files(name)
                continue
            imi = Imi(name=name, uuid=doc["uuid"], created=doc["created"], pinned=doc.get("pinned"))
            await self._load_versions(imi)
            self.imis[name] = imi
        log.info("repository: %d iMIs", len(self.imis))

    async def _load_versions(self, imi: Imi) -> None:
        meta = self.layout.meta_dir(imi.name)
        snapshots = {}
        imi_dir = self.layout.imi_dir(imi.name)
        if imi_dir.is_dir():
            for path in imi_dir.iterdir():
                if path.name.isdigit():
                    snapshots[int(path.name)] = path
        for path in meta.glob("*.json"):
            stem = path.name.removesuffix(".json")
            if not stem.isdigit():
                continue
            version = int(stem)
            if version not in snapshots:
                log.warning("%s: record of version %d without snapshot; dropping it", imi.name, version)
                path.unlink()
                self.layout.manifest_file(imi.name, version).unlink(missing_ok=True)
                continue
            doc = read_json(path)
            try:
                self.key.public.verify(doc, "record")
            except Untrusted:
                log.warning("%s: signing the record of version %d with this master's key", imi.name, version)
                doc = self.sign_record(VersionRecord.from_json(doc), imi.name)
                write_json(path, doc)
            imi.versions[version] = VersionRecord.from_json(doc)
        for version, path in snapshots.items():
            if version not in imi.versions:
                log.warning("%s: snapshot of version %d was never published; deleting it", imi.name, version)
                await btrfs.delete_subvolume(path)
            elif not btrfs.get_readonly(path):
                btrfs.set_readonly(path, True)

    async def _remove_files(self, name: str) -> None:
        imi_dir = self.layout.imi_dir(name)
        if imi_dir.is_dir():
            for path in imi_dir.iterdir():
                await btrfs.remove_tree(path)
            imi_dir.rmdir()
        await btrfs.remove_tree(self.layout.work_dir(name))
        shutil.rmtree(self.layout.meta_dir(name), ignore_errors=True)

    # --- queries -------------------------------------------------------------

    def sign_record(self, record: VersionRecord, name: str) -> dict:
        """The record as published: with the iMI's name, signed."""
        unsigned = VersionRecord(record.version, record.digest, record.bytes, record.created, record.message,
                                 record.chunk_size, imi=name)
        return self.key.sign(unsigned.to_json())

    def catalog(self) -> Catalog:
        return Catalog({name: imi.info() for name, imi in self.imis.items()})

    def get(self, name: str) -> Imi:
        imi = self.imis.get(check_name(name))
        if imi is None:
            raise RepositoryError(404, f"no iMI named {name!r}")
        return imi

    def version(self, name: str, version: int) -> VersionRecord:
        imi = self.get(name)
        record = imi.versions.get(parse_version(version))
        if record is None:
            raise RepositoryError(404, f"{name} has no version {version}")
        return record

    def snapshot_path(self, name: str, version: int) -> Path:
        self.version(name, version)
        return self.layout.version_dir(name, version)

    def manifest_bytes(self, name: str, version: int) -> bytes:
        self.version(name, version)
        return read_capped(self.layout.manifest_file(name, version), MAX_MANIFEST)

    def manifest(self, name: str, version: int) -> Manifest:
        record = self.version(name, version)
        return Manifest.from_bytes(self.manifest_bytes(name, version), record.digest)

    def work_path(self, name: str) -> Path:
        self.get(name)
        return self.layout.work_dir(name)

    # --- changes -------------------------------------------------------------

    async def create(self, name: str, source: Path) -> Imi:
        check_name(name)
        _check_source(source)
        async with self._lock(name):
            if name in self.imis:
                raise RepositoryError(409, f"iMI {name!r} exists already")
            staging = self.layout.work / f".{name}.creating"
            await btrfs.remove_tree(staging)
            await btrfs.create_subvolume(staging)
            try:
                await _copy_into(source, staging)
                os.rename(staging, self.layout.work_dir(name))
            except BaseException:
                with trio.CancelScope(shield=True):
                    await btrfs.remove_tree(staging)
                raise
            imi = Imi(name=name, uuid=uuid.uuid4().hex, created=now_iso())
            write_json(self.layout.imi_record(name), imi.record())
            self.imis[name] = imi
            log.info("created iMI %s from %s", name, source)
            return imi

    async def update(self, name: str, source: Path) -> None:
        """Bring the working copy to `source`'s content in place (working_copy.py)."""
        self.get(name)
        _check_source(source)
        async with self._lock(name):
            progress = self.updating[name] = UpdateProgress()
            try:
                await bring_to(source, self.layout.work_dir(name), progress)
            except UpdateFailed as error:
                raise RepositoryError(400, f"updating {name} from {source} failed: {error}") from None
            finally:
                self.updating.pop(name, None)
        log.info("updated the working copy of %s from %s", name, source)

    async def publish(self, name: str, message: str = "") -> VersionRecord:
        imi = self.get(name)
        async with self._lock(name):
            version = self._next_version(imi)
            snapshot = self.layout.version_dir(name, version)
            snapshot.parent.mkdir(parents=True, exist_ok=True)
            progress = self.publishing[name] = PublishProgress(version)
            try:
                # Writable until its extents are shared with the parent (the
                # kernel refuses to dedupe into a read-only subvolume); it is
                # not a version before its record exists, and nobody else
                # writes into imis/.
                await btrfs.snapshot(self.layout.work_dir(name), snapshot, readonly=False)
                progress.lap("snapshot")
                parent = None
                if imi.versions:
                    newest = max(imi.versions)
                    parent = Parent(self.layout.version_dir(name, newest), self.manifest(name, newest))

                def report(done: int, total: int) -> None:
                    progress.bytes_done, progress.bytes_total = done, total

                try:
                    manifest, stats = await trio.to_thread.run_sync(
                        build_manifest, snapshot, self.chunk_size, parent, report
                    )
                    progress.lap("manifest")
                    shared = None
                    if parent is not None and stats.fresh:
                        progress.phase = "sharing extents with the parent"
                        shared = await trio.to_thread.run_sync(
                            share_with_parent, snapshot, manifest, parent.root, parent.manifest, stats.fresh
                        )
                    progress.lap("dedupe")
                    btrfs.set_readonly(snapshot, True)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await btrfs.delete_subvolume(snapshot)
                    raise
                signed = self.sign_record(VersionRecord(
                    version=version,
                    digest=manifest.digest,
                    bytes=manifest.bytes,
                    created=now_iso(),
                    message=message,
                    chunk_size=self.chunk_size,
                ), name)
                record = VersionRecord.from_json(signed)
                write_bytes(self.layout.manifest_file(name, version), manifest.canonical())
                write_json(self.layout.version_record(name, version), signed)
                imi.versions[version] = record
                if imi.pinned is not None:
                    imi.pinned = None
                    write_json(self.layout.imi_record(name), imi.record())
                progress.lap("commit")
                self.last_publish[name] = {
                    "seconds": progress.seconds, "bytes_total": stats.bytes_total,
                    "bytes_hashed": stats.bytes_hashed, "dedupe": shared.to_json() if shared else None,
                }
            finally:
                self.publishing.pop(name, None)
        _log_publish(name, record, stats)
        return record

    def _next_version(self, imi: Imi) -> int:
        on_disk = [int(p.name) for p in self.layout.imi_dir(imi.name).glob("*") if p.name.isdigit()]
        return max([*imi.versions, *on_disk, 0]) + 1

    async def rollback(self, name: str, version: int) -> Imi:
        imi = self.get(name)
        self.version(name, version)
        async with self._lock(name):
            imi.pinned = None if version == max(imi.versions) else version
            write_json(self.layout.imi_record(name), imi.record())
        log.info("%s: latest is now version %d", name, version)
        return imi

    async def delete(self, name: str) -> None:
        self.get(name)
        async with self._lock(name):
            self.layout.imi_record(name).unlink()
            del self.imis[name]
            await self._remove_files(name)
        log.info("deleted iMI %s", name)


def _log_publish(name: str, record: VersionRecord, stats: BuildStats) -> None:
    log.info(
        "published %s version %d: %d files, %d bytes (%d hashed), digest %s",
        name, record.version, stats.files, stats.bytes_total, stats.bytes_hashed, record.digest,
    )


def _check_source(source: Path) -> None:
    if not source.is_absolute():
        raise RepositoryError(400, f"--from must be an absolute path on the master host, not {source}")
    if not source.exists():
        raise RepositoryError(400, f"no such file or directory on the master host: {source}")
    if not (source.is_dir() or source.is_file()):
        raise RepositoryError(400, f"{source} is neither a directory nor a regular file")


async def _copy_into(source: Path, dest: Path) -> None:
    """Copy a tree's content, or an image file by its name, into `dest`.
    cp keeps modes, owners, timestamps, symlinks, sparseness and, on the same
    btrfs, shares extents instead of copying them."""
    if source.is_dir():
        argv = ["cp", "-a", "--reflink=auto", "--sparse=always", f"{source}/.", f"{dest}/"]
    else:
        argv = ["cp", "-a", "--reflink=auto", "--sparse=always", str(source), f"{dest}/{source.name}"]
    result = await trio.run_process(argv, capture_stderr=True, check=False)
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        raise RepositoryError(400, f"copying {source} failed: {detail[-1] if detail else result.returncode}")
