"""Bounded resources: the cache's size bound, file descriptors and memory
under 50 concurrent readers, and log files.

One master, a cache server with a 64 MiB bound and a FUSE mount reading
through it run for the module. There is no replica: the cache falls back to
the master, which serves blocks the same way, and 600 MiB fewer go through
`btrfs receive`.

Measured figures are printed (run with -s) and asserted against bounds
justified next to each assertion.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import xxhash

from harness.cluster import Cluster, wait_for
from harness.data import write_image
from icbdcore.mounts import is_mountpoint
from icbdfs.fs import MountOptions

MIB = 1 << 20
BOUND = 64 * MIB
STREAM = 512 * MIB
FILES = 30
FILE_SIZE = 4 * MIB
READERS = 50
LRU_BYTES = MountOptions().lru_bytes  # the mount's memory for whole blocks
MOUNT_CONNECTIONS = 64  # block connections a mount keeps to its cache server (cache/remote.py)


def _tree(root: Path) -> tuple[Path, dict[str, str]]:
    """stream.img (512 MiB) and files/f00..f29 (4 MiB each), every MiB distinct."""
    root.mkdir()
    (root / "files").mkdir()
    write_image(root / "stream.img", STREAM)
    for i in range(FILES):
        write_image(root / "files" / f"f{i:02d}", FILE_SIZE)
    hashes = {}
    for path in [root / "stream.img", *sorted((root / "files").iterdir())]:
        hashes[str(path.relative_to(root))] = _hash_file(path)
    return root, hashes


def _hash_file(path: Path, chunk: int = MIB) -> str:
    hasher = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            hasher.update(data)
    return hasher.hexdigest()


@dataclass
class Site:
    cluster: Cluster
    cache: object
    mount: object
    root: Path  # the mounted version: MOUNT/bulk/1
    hashes: dict[str, str]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("bounded")
    cluster = Cluster(base)
    try:
        cluster.master(image_size="4G")
        tree, hashes = _tree(base / "tree")
        cluster.icbd("imi", "create", "bulk", "--from", str(tree))
        cluster.icbd("imi", "publish", "bulk")
        shutil.rmtree(tree)  # the master holds it now; the hashes are what we compare with
        cache = cluster.cache("cache", size="64M")
        wait_for(lambda: cache.status()["master_reachable"], what="the cache to reach the master")
        mount = cluster.mount("mnt", cache=cache, timeout=20)
        yield Site(cluster, cache, mount, mount.mountpoint / "bulk" / "1", hashes)
    finally:
        cluster.stop_all()
        if not any(is_mountpoint(p) for p in [*(n.data for n in cluster.nodes), *(m.mountpoint for m in cluster.mounts)]):
            shutil.rmtree(base, ignore_errors=True)


# --- sampling a process ------------------------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def disk_bytes(folder: Path) -> int:
    """Bytes allocated on disk to the files under `folder`."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # evicted while we looked
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


@dataclass
class Sampler:
    """Samples fds and RSS of some processes (and anything else) in a thread."""

    pids: dict[str, int]
    interval: float = 0.05
    extra: dict = field(default_factory=dict)  # name -> callable
    peaks: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    errors: list[str] = field(default_factory=list)

    def _note(self, key: str, value: int) -> None:
        self.peaks[key] = max(self.peaks.get(key, 0), value)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for name, pid in self.pids.items():
                    self._note(f"{name} fds", fd_count(pid))
                    self._note(f"{name} rss", rss_bytes(pid))
                for name, probe in self.extra.items():
                    self._note(name, probe())
                self.samples += 1
            except Exception as error:  # report it; the test decides
                self.errors.append(repr(error))
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(10)


def _store(site: Site) -> dict:
    return site.cache.status()["store"]


# --- the size bound ----------------------------------------------------------------------------


@pytest.mark.btrfs
@pytest.mark.fuse
def test_cache_stays_near_its_bound_while_500_mib_pass(site):
    blocks_dir = site.cache.data / "blocks"
    store_before = _store(site)
    sampler = Sampler(
        {"mount": site.mount.pid, "cache": site.cache.pid}, interval=0.1,
        extra={
            "store footprint": lambda: _store(site)["footprint"],
            "block files on disk": lambda: disk_bytes(blocks_dir) - disk_bytes(blocks_dir / "index"),
            "index on disk": lambda: disk_bytes(blocks_dir / "index"),
        },
    )
    with sampler:
        got = _hash_file(site.root / "stream.img")
    assert got == site.hashes["stream.img"], "the 512 MiB file read back wrong"
    store = _store(site)
    print(f"\ncache bound {BOUND >> 20} MiB, {sampler.samples} samples while 512 MiB passed: "
          + ", ".join(f"{k} {v / MIB:.1f} MiB" if v > 4096 else f"{k} {v}" for k, v in sampler.peaks.items())
          + f"; store after: {store['footprint'] / MIB:.1f} MiB in {store['blocks']} blocks, "
          f"{store['evictions']} evictions, {store['put_bytes'] / MIB:.0f} MiB put")
    assert not sampler.errors, sampler.errors
    assert sampler.samples >= 10
    passed = store["put_bytes"] - store_before["put_bytes"]
    assert passed >= 500 * MIB, f"only {passed / MIB:.0f} MiB went through the store"
    # The bound holds after every put (docs/CACHE.md, invariant 5), so at every sample.
    assert sampler.peaks["store footprint"] <= BOUND
    # On disk: the indexed files (<= bound) plus blocks being written in tmp/,
    # at most one per store thread (8 x 1 MiB); the walk is not atomic (a
    # block renamed or evicted while it runs may count twice): 8 MiB more.
    assert sampler.peaks["block files on disk"] <= BOUND + 16 * MIB
    # The LMDB index: a few hundred bytes per block; a few MiB of pages at most.
    assert sampler.peaks["index on disk"] <= 16 * MIB
    # "Near": the store is used, not emptied by eviction.
    assert store["footprint"] >= 0.75 * BOUND
    assert store["evictions"] - store_before["evictions"] >= (STREAM - BOUND) // MIB
    # And the disk now agrees with the index.
    assert disk_bytes(blocks_dir) - disk_bytes(blocks_dir / "index") <= BOUND + 8 * MIB


# --- 50 concurrent readers -----------------------------------------------------------------------


def _drop_pages(path: Path) -> None:
    """Forget this file's pages, so the next read goes to the mount again."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.btrfs
@pytest.mark.fuse
def test_fds_and_memory_stay_bounded_under_50_readers(site):
    """25 readers each read a file of their own, 25 share 5 files (5 per
    file); three rounds each, pages dropped between rounds. 120 MiB of
    distinct data against a 64 MiB cache and a 64 MiB mount LRU: eviction runs
    all the time."""
    files = [f"files/f{i:02d}" for i in range(FILES)]
    plan = [files[i] for i in range(25)] + [files[25 + i % 5] for i in range(25)]
    assert len(plan) == READERS
    rounds = 3
    results: list[tuple[str, str]] = []
    failures: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(READERS)
    open_files: list = []

    def reader(index: int, rel: str) -> None:
        path = site.root / rel
        try:
            start.wait(60)
            # Half the readers keep one extra descriptor open all along.
            if index % 2:
                with lock:
                    open_files.append(open(path, "rb"))  # noqa: SIM115 (closed below)
            for _ in range(rounds):
                got = _hash_file(path, chunk=128 << 10 if index % 3 else MIB)
                with lock:
                    results.append((rel, got))
                _drop_pages(path)
        except Exception as error:
            with lock:
                failures.append(f"reader {index} ({rel}): {error!r}")

    baseline = {name: (fd_count(pid), rss_bytes(pid))
                for name, pid in (("mount", site.mount.pid), ("cache", site.cache.pid))}
    threads = [threading.Thread(target=reader, args=(i, rel)) for i, rel in enumerate(plan)]
    with Sampler({"mount": site.mount.pid, "cache": site.cache.pid}) as sampler:
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        seconds = time.monotonic() - started
    for f in open_files:
        f.close()
    assert not any(t.is_alive() for t in threads), "readers hung"
    assert not failures, failures
    wrong = [(rel, got) for rel, got in results if got != site.hashes[rel]]
    assert not wrong, f"wrong data: {wrong[:5]}"
    assert len(results) == READERS * rounds
    after = {name: (fd_count(pid), rss_bytes(pid))
             for name, pid in (("mount", site.mount.pid), ("cache", site.cache.pid))}
    print(f"\n{READERS} readers x {rounds} rounds in {seconds:.1f}s, {sampler.samples} samples; "
          + "; ".join(f"{n}: fds {baseline[n][0]} -> peak {sampler.peaks[f'{n} fds']} -> {after[n][0]}, "
                      f"RSS {baseline[n][1] / MIB:.0f} -> peak {sampler.peaks[f'{n} rss'] / MIB:.0f} "
                      f"-> {after[n][1] / MIB:.0f} MiB" for n in ("mount", "cache")))
    assert not sampler.errors, sampler.errors
    assert sampler.samples >= 10
    # The mount: a reader's open file is a FUSE handle, not a descriptor of the
    # mount process. Its own: /dev/fuse, the control client, and the pool of
    # block connections to the cache server (RemoteCache keeps up to
    # MOUNT_CONNECTIONS alive). Not one per reader: 50 readers and 25 extra
    # open files must not show.
    assert sampler.peaks["mount fds"] <= baseline["mount"][0] + MOUNT_CONNECTIONS + 16
    # The cache server: the mount's connections, its own pool to the upstream
    # (32 per host), the block files open in its 8 store threads.
    assert sampler.peaks["cache fds"] <= baseline["cache"][0] + MOUNT_CONNECTIONS + 32 + 8 + 16
    # Memory. The mount keeps at most MountOptions.lru_bytes of whole blocks
    # (part of it is in the baseline already) plus the blocks in flight (one
    # per connection) and their copies on the way to the kernel; the cache
    # server keeps blocks only while they travel (32 upstream fetches plus
    # the answers to the mount). 96 MiB on top is room for CPython's
    # allocator slack.
    in_flight = MOUNT_CONNECTIONS * MIB
    assert sampler.peaks["mount rss"] <= baseline["mount"][1] + LRU_BYTES + in_flight + 96 * MIB
    assert sampler.peaks["cache rss"] <= baseline["cache"][1] + in_flight + 32 * MIB + 96 * MIB
    # Absolute sanity: neither grows with the 120 MiB read three times over.
    assert sampler.peaks["mount rss"] < LRU_BYTES + 384 * MIB and sampler.peaks["cache rss"] < 384 * MIB
    # Nothing leaks once the readers are gone.
    # Nothing leaks once the readers are gone: kept-alive connections at most.
    assert after["mount"][0] <= baseline["mount"][0] + MOUNT_CONNECTIONS + 8
    assert after["cache"][0] <= baseline["cache"][0] + MOUNT_CONNECTIONS + 32 + 8


# --- logs ------------------------------------------------------------------------------------------


@pytest.fixture
def clean_logging():
    """Put the root logger back as pytest had it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def _log_files(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name))


def test_log_files_rotate_and_stay_bounded(tmp_path, monkeypatch, clean_logging):
    """The handler every process installs (icbdcore.logs.setup_logging, for
    nodes and mounts alike) rotates at LOG_BYTES and keeps LOG_BACKUPS old
    files: with the limit shrunk to 64 KiB, 16 MiB of log lines leave at
    most 4 files of at most 64 KiB each."""
    from icbdcore import logs

    which = "node"
    limit = 64 << 10
    log_file = tmp_path / "logs" / f"{which}.log"
    monkeypatch.setattr(logs, "LOG_BYTES", limit)
    logs.setup_logging(str(log_file), verbose=True)
    backups = logs.LOG_BACKUPS
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.handlers.RotatingFileHandler)
    log = logging.getLogger(f"icbd.test.{which}")
    line = "x" * 1000
    for i in range(16 * 1024):
        log.debug("line %d %s", i, line)
    handler.flush()
    files = _log_files(log_file)
    sizes = [p.stat().st_size for p in files]
    print(f"\n{which}: 16 MiB logged -> {len(files)} files, {sum(sizes)} bytes")
    assert len(files) == backups + 1, [p.name for p in files]
    assert max(sizes) <= limit + 2048  # a file rolls over before the record that would pass the limit
    assert sum(sizes) <= (backups + 1) * (limit + 2048)
    assert "line 16383 " in log_file.read_text()  # the newest lines are kept


@pytest.mark.btrfs
def test_real_node_log_rotates_at_10_mib(tmp_path):
    """A real master started with --log: the log files it finds full (10 MiB,
    and three backups) roll over instead of growing, so the node's logs never
    take more than 4 x 10 MiB."""
    from icbdcore.logs import LOG_BACKUPS, LOG_BYTES

    assert LOG_BYTES == 10 * MIB and LOG_BACKUPS == 3
    cluster = Cluster(tmp_path)
    log_file = tmp_path / "logs" / "master.log"
    log_file.parent.mkdir()
    filler = b"old line\n" * (LOG_BYTES // 9)
    for suffix in ("", ".1", ".2", ".3"):
        (log_file.parent / f"master.log{suffix}").write_bytes(filler[: LOG_BYTES - 20])
    try:
        master = cluster.master(extra=["--log", str(log_file), "-v"])
        cluster.icbd("imi", "list")
        master.stop()
        files = _log_files(log_file)
        sizes = {p.name: p.stat().st_size for p in files}
        print(f"\nreal master log files after start: {sizes}")
        assert set(sizes) == {"master.log", "master.log.1", "master.log.2", "master.log.3"}, sizes
        assert sizes["master.log"] < 1 * MIB  # rolled over: a fresh file with this run's lines
        assert b"master on" in log_file.read_bytes()
        assert sum(sizes.values()) <= (LOG_BACKUPS + 1) * LOG_BYTES
    finally:
        cluster.stop_all()
        if not any(is_mountpoint(n.data) for n in cluster.nodes):
            shutil.rmtree(tmp_path, ignore_errors=True)
