"""Debian packages for image builds: resolved once, downloaded once, then pinned.

The archive moves (point releases, security updates) and snapshot.debian.org
is out of reach here, so a build installs the packages it was first built
with, never whatever the mirror has today:

- `resolve()` runs apt on the host in a private root (its own sources, lists,
  empty dpkg status and cache) to work out what installing a package set on
  an empty system takes: the Essential:yes set, apt, the packages asked for
  and their dependencies, without recommends, as mmdebstrap's `apt` variant
  installs them. Versions already in the pool win (pinned at 1001), so a new
  package set keeps the versions an earlier one fetched. Missing .debs are
  downloaded into the pool. The answer, one `name_version_arch.deb` per line,
  is the set's lock, kept under `locks/` and keyed by the set.
- `repository()` makes a flat apt repository of exactly the lock's files
  (hard links into the pool and a Packages index) that mmdebstrap installs
  from, with no network.

Layout (under bench/images/cache.deb_dir("debian")):

    pool/*.deb                 every package ever fetched, as apt names them
    locks/<set>.lock           the files of one package set
    repos/<lock digest>/       Packages and links to the pool, one per lock
    apt/                       apt's private root for resolving
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import cache

log = logging.getLogger(__name__)

# "Inst libc6 (2.36-9+deb12u10 Debian:12.11/stable, Debian-Security:12/stable-security [amd64])"
_INST = re.compile(r"^Inst (\S+) \((\S+) .*\[(\S+)\]\)")


class PackageError(RuntimeError):
    """Packages cannot be resolved or fetched (no network, an unknown package)."""


@dataclass(frozen=True)
class Lock:
    """The exact .deb files of one package set."""

    files: tuple[str, ...]
    path: Path

    @property
    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.files).encode()).hexdigest()


class PackagePool:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache.deb_dir("debian")
        self.pool = self.root / "pool"

    def lock_path(self, suite: str, sources: tuple[str, ...], packages: tuple[str, ...]) -> Path:
        key = json.dumps({"suite": suite, "sources": list(sources), "packages": sorted(set(packages))},
                         sort_keys=True)
        return self.root / "locks" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.lock"

    def lock(self, suite: str, sources: tuple[str, ...], packages: tuple[str, ...],
             resolve: bool = True) -> Lock:
        """The lock of this package set: read if it exists (and its files are in the pool),
        else resolved and fetched now (unless `resolve` is false: then PackageError)."""
        path = self.lock_path(suite, sources, packages)
        with cache.locked(self.root / ".lock"):
            if path.is_file():
                files = tuple(path.read_text().split())
                missing = [f for f in files if not (self.pool / f).is_file()]
                if not missing:
                    return Lock(files, path)
                log.info("%d packages of %s left the pool: resolving again", len(missing), path.name)
            if not resolve:
                raise PackageError(f"no lock {path} for this package set")
            files = self._resolve(sources, packages)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(f + "\n" for f in files))
            os.replace(tmp, path)
            return Lock(files, path)

    def repository(self, lock: Lock) -> Path:
        """A flat apt repository (`deb [trusted=yes] file:PATH ./`) of exactly the lock's files."""
        repo = self.root / "repos" / lock.digest[:24]
        if (repo / "Packages").is_file():
            return repo
        repo.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=repo.parent, prefix=".repo-"))
        try:
            for name in lock.files:
                os.link(self.pool / name, scratch / name)
            index = _run(["dpkg-scanpackages", "--multiversion", "."], cwd=scratch)
            (scratch / "Packages").write_text(index)
            try:
                scratch.rename(repo)
            except OSError:
                if not (repo / "Packages").is_file():
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return repo

    # ---- resolving ------------------------------------------------------------

    def _resolve(self, sources: tuple[str, ...], packages: tuple[str, ...]) -> tuple[str, ...]:
        self.pool.mkdir(parents=True, exist_ok=True)
        (self.pool / "partial").mkdir(exist_ok=True)
        apt = self.root / "apt"
        config = self._apt_root(apt, sources)
        env = dict(os.environ, APT_CONFIG=str(config), DEBIAN_FRONTEND="noninteractive")
        log.info("resolving %d packages against %s", len(packages), ", ".join(sources))
        _run(["apt-get", "-q", "update"], env=env, what="apt-get update (is the Debian mirror reachable?)")
        wanted = ["?essential", "apt", *packages]
        plan = _run(["apt-get", "-q", "-s", "install", *wanted], env=env, what="resolving the packages")
        files = []
        for line in plan.splitlines():
            match = _INST.match(line)
            if match:
                name, version, arch = match.groups()
                files.append(f"{name}_{version.replace(':', '%3a')}_{arch}.deb")
        if not files:
            raise PackageError("apt planned to install nothing: check the package names")
        missing = [f for f in files if not (self.pool / f).is_file()]
        if missing:
            log.info("downloading %d of %d packages into %s", len(missing), len(files), self.pool)
            _run(["apt-get", "-q", "-y", "--download-only", "install", *wanted], env=env,
                 what="downloading the packages")
        still = [f for f in files if not (self.pool / f).is_file()]
        if still:
            raise PackageError(f"apt did not leave {still[0]} in {self.pool}")
        return tuple(sorted(files))

    def _apt_root(self, apt: Path, sources: tuple[str, ...]) -> Path:
        """apt's private root: the sources, an empty dpkg status, the pool as its cache and,
        if the pool holds packages already, the pool as a source whose versions win."""
        for sub in ("etc/apt/preferences.d", "etc/apt/apt.conf.d", "etc/apt/sources.list.d",
                    "var/lib/apt/lists/partial", "var/lib/dpkg"):
            (apt / sub).mkdir(parents=True, exist_ok=True)
        (apt / "var/lib/dpkg/status").write_text("")
        lines = list(sources)
        pins = []
        debs = sorted(self.pool.glob("*.deb"))
        if debs:
            (self.pool / "Packages").write_text(
                _run(["dpkg-scanpackages", "--multiversion", "."], cwd=self.pool))
            lines.append(f"deb [trusted=yes] file:{self.pool} ./")
            for deb in debs:
                name, version, _ = deb.name[:-4].split("_")
                pins.append(f"Package: {name}\nPin: version {version.replace('%3a', ':')}\n"
                            "Pin-Priority: 1001\n")
        (apt / "etc/apt/sources.list").write_text("".join(line + "\n" for line in lines))
        (apt / "etc/apt/preferences").write_text("\n".join(pins))
        config = apt / "apt.conf"
        config.write_text(f'''Dir "{apt}/";
Dir::State::status "{apt}/var/lib/dpkg/status";
Dir::Cache::Archives "{self.pool}/";
Dir::Etc::Trusted "/etc/apt/trusted.gpg";
Dir::Etc::TrustedParts "/etc/apt/trusted.gpg.d/";
APT::Architecture "amd64";
APT::Install-Recommends "false";
APT::Sandbox::User "root";
Acquire::Languages "none";
Debug::NoLocking "true";
''')
        return config


def _run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
         what: str | None = None) -> str:
    try:
        result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    except FileNotFoundError:
        raise PackageError(f"{argv[0]} is not installed (see scripts/install-packages)") from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        raise PackageError(f"{what or ' '.join(argv[:2])} failed: {lines[-1] if lines else result.returncode}")
    return result.stdout
