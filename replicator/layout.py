"""Where things live in a node's data folder (a contract: see DESIGN.md).

    DATA/imis/NAME/VERSION/   complete, verified, read-only snapshots
    DATA/work/NAME/           master: the writable working copy
    DATA/incoming/            replica: receives in progress (cleaned on start)
    DATA/meta/NAME/           records: imi.json, V.json, V.manifest.json, V.profile.json
    DATA/streams/             master: spooled send streams, shared by readers

Every path built from a name or number validates it first, so nothing from
the network is joined into a path unchecked.
"""

from __future__ import annotations

from pathlib import Path

from .wire import check_name, parse_version


class Layout:
    def __init__(self, root: Path):
        self.root = root
        self.imis = root / "imis"
        self.work = root / "work"
        self.incoming = root / "incoming"
        self.meta = root / "meta"
        self.streams = root / "streams"

    def make_dirs(self) -> None:
        for path in (self.imis, self.work, self.incoming, self.meta, self.streams):
            path.mkdir(parents=True, exist_ok=True)

    def imi_dir(self, name: str) -> Path:
        return self.imis / check_name(name)

    def version_dir(self, name: str, version: int) -> Path:
        return self.imi_dir(name) / str(parse_version(version))

    def work_dir(self, name: str) -> Path:
        return self.work / check_name(name)

    def meta_dir(self, name: str) -> Path:
        return self.meta / check_name(name)

    def imi_record(self, name: str) -> Path:
        return self.meta_dir(name) / "imi.json"

    def version_record(self, name: str, version: int) -> Path:
        return self.meta_dir(name) / f"{parse_version(version)}.json"

    def manifest_file(self, name: str, version: int) -> Path:
        return self.meta_dir(name) / f"{parse_version(version)}.manifest.json"

    def profile_file(self, name: str, version: int) -> Path:
        return self.meta_dir(name) / f"{parse_version(version)}.profile.json"

    def node_record(self) -> Path:
        return self.root / "node.json"
