"""Where things live in a node's data folder: the one place that names its
files (a contract: docs/LAYOUT.md describes it for admins and tools).

Every path built from a name or number validates it first, so nothing from
the network is joined into a path unchecked.
"""

from __future__ import annotations

import os
from pathlib import Path

from .records import read_json, write_json
from .signing import SigningKey
from .wire import check_name, parse_version

# The data format of this icbd: 2 names every object by BLAKE3-256 and keeps
# signed records. Folders made before (format 1, xxh3-128 names, unsigned
# records) have no format file; see DataFormat below and docs/LAYOUT.md.
DATA_FORMAT = 2


class Layout:
    """A master's, a replica's or a cache server's data folder (a mount's
    embedded cache folder is laid out as a cache server's)."""

    def __init__(self, root: Path):
        self.root = root
        # master and replicas
        self.imis = root / "imis"  # IMIS/NAME/VERSION: complete, verified, read-only snapshots
        self.work = root / "work"  # master: WORK/NAME, the writable working copy
        self.incoming = root / "incoming"  # replica: receives in progress, resumable spools
        self.meta = root / "meta"  # META/NAME: the records of an iMI and its versions
        self.streams = root / "streams"  # master: spooled `btrfs send` streams
        self.btrfs_image = root / "btrfs.img"  # when DATA itself is not on btrfs
        self.node_id_file = root / "node-id.json"  # every node but the master: its id
        self.nodes_file = root / "nodes.json"  # master: registrations and subscriptions
        self.catalog_file = root / "catalog.json"  # replica, cache: the last catalogue seen
        self.transfers_file = root / "transfers.json"  # replica: recent transfers
        self.tokens_file = root / "tokens.json"  # master: issued tokens (SHA-256 hashes, never tokens)
        self.token_table_file = root / "token-table.json"  # replica, cache: the master's token table
        self.keys = root / "keys"  # master: its Ed25519 signing key (master.key 0600, master.pub)
        # cache servers and mounts' embedded caches
        self.blocks = root / "blocks"  # the BlockStore
        self.cached_manifests = root / "manifests"
        self.cached_profiles = root / "profiles"
        self.upstreams_file = root / "upstreams.json"
        self.mount_log = root / "mount.log"  # a mount in the background logs here by default
        # trust
        self.format_file = root / "format.json"  # every node and mount cache: {"format": DATA_FORMAT}
        self.keys = root / "keys"  # master: its Ed25519 key (master.key 0600, never sent; master.pub)
        self.master_public_key = self.keys / SigningKey.PUBLIC
        self.serial_file = root / "catalog-serial.json"  # master: the catalogue's serial, persisted before use
        self.trust_file = root / "trust.json"  # replica, cache, mount: the master's key, the newest serial seen

    def make_private_root(self) -> None:
        """Create the data folder if needed and keep it mode 0700: it holds
        every file of every version (secrets included) and the node's records."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)

    def make_dirs(self) -> None:
        for path in (self.imis, self.work, self.incoming, self.meta, self.streams):
            path.mkdir(parents=True, exist_ok=True)

    # --- the data format -----------------------------------------------------------

    def data_format(self) -> int | None:
        """The format the folder's data is in: DATA_FORMAT or newer once
        marked; 1 for a folder with data but no mark (made before formats
        were marked); None for a folder with nothing in it yet."""
        doc = read_json(self.format_file)
        if isinstance(doc, dict) and isinstance(doc.get("format"), int):
            return doc["format"]
        return 1 if self._holds_data() else None

    def mark_format(self) -> None:
        write_json(self.format_file, {"format": DATA_FORMAT})

    def _holds_data(self) -> bool:
        """Anything a node or a mount cache of format 1 would have left."""
        for folder in (self.imis, self.meta, self.streams, self.incoming, self.cached_manifests,
                       self.cached_profiles, self.blocks / "index"):
            try:
                with os.scandir(folder) as entries:
                    if next(entries, None) is not None:
                        return True
            except (FileNotFoundError, NotADirectoryError):
                continue
        return any(p.exists() for p in (self.catalog_file, self.nodes_file))

    # --- master and replicas -----------------------------------------------------

    def imi_dir(self, name: str) -> Path:
        return self.imis / check_name(name)

    def version_dir(self, name: str, version: int) -> Path:
        return self.imi_dir(name) / str(parse_version(version))

    def work_dir(self, name: str) -> Path:
        return self.work / check_name(name)

    def meta_dir(self, name: str) -> Path:
        return self.meta / check_name(name)

    def imi_record(self, name: str) -> Path:
        """Master: the iMI (uuid, created, pinned latest); replica: the master's uuid of it."""
        return self.meta_dir(name) / "imi.json"

    def version_record(self, name: str, version: int) -> Path:
        return self.meta_dir(name) / f"{parse_version(version)}.json"

    def manifest_file(self, name: str, version: int) -> Path:
        return self.meta_dir(name) / f"{parse_version(version)}.manifest.json"

    def profile_file(self, name: str, version: int) -> Path:
        return self.meta_dir(name) / f"{parse_version(version)}.profile.json"

    @staticmethod
    def _stream_stem(version: int, parent: int | None) -> str:
        version = parse_version(version)
        return f"{version}-from-{parse_version(parent)}" if parent is not None else f"{version}-full"

    def stream_spool(self, name: str, version: int, parent: int | None) -> Path:
        """Master: the spool of `btrfs send` for (version, parent); its record beside it (.json)."""
        return self.streams / check_name(name) / f"{self._stream_stem(version, parent)}.stream"

    def incoming_dir(self, name: str) -> Path:
        return self.incoming / check_name(name)

    def resume_spool(self, name: str, version: int, parent: int | None) -> Path:
        """Replica: the copy of a stream so far, from which a cut-off transfer resumes (.json beside it)."""
        return self.incoming_dir(name) / f"{self._stream_stem(version, parent)}.stream"

    def receive_dir(self, name: str, version: int) -> Path:
        """Replica: where `btrfs receive` builds a version."""
        return self.incoming_dir(name) / f"{parse_version(version)}.recv"

    # --- caches ------------------------------------------------------------------

    def cached_manifest(self, name: str, version: int) -> Path:
        return self.cached_manifests / check_name(name) / f"{parse_version(version)}.json"

    def cached_profile(self, name: str, version: int) -> Path:
        return self.cached_profiles / check_name(name) / f"{parse_version(version)}.json"
