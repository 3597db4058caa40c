"""Delta transfers over a bandwidth-limited WAN link, as a fraction of the link rate.

The master runs in site "central", the replica in site "a" (network
namespaces, bench/netns.py). Central's link is shaped with tbf (both ways;
this kernel has no netem), so every byte from the master to the replica, and
from an rsync daemon in central to an rsync client in the root namespace,
crosses the same shaped link once. After a full first version (unshaped), a
known number of bytes of the image changes and the new version is published.

Per link rate, the row says how much of the link the delta transfer used:
value = the stream bytes that came over the network / the replica's transfer
time (request to accepted version), baseline = the link rate in bytes/s. The
detail adds publish-to-held time, the bytes counted on the link's interface
against the stream's bytes (headers, retransmissions, heartbeats), and
`rsync --no-whole-file` of the same change over the same link.

    python -m bench.wan [--full | --tiny]    # prints the results as JSON
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from harness.cluster import free_port, wait_for
from harness.data import MIB, change_image, drop_caches, write_image
from harness.netns import Site, SiteNetwork, sites

from .context import BenchContext
from .results import Result
from .transfer import _rsync, _subscribe_and_wait, _transfer

log = logging.getLogger(__name__)

NAME = "wan"


def _pick(ctx: BenchContext, *, quick, full, tiny):
    """ctx.pick, with the suite's `tiny` size (for its tests) when it asks for it."""
    return tiny if getattr(ctx, "tiny", False) else ctx.pick(quick=quick, full=full)


def delta_over_link(ctx: BenchContext) -> list[Result]:
    size = _pick(ctx, quick=256 * MIB, full=1 << 30, tiny=16 * MIB)
    # (link rate in bit/s, changed bytes): about 3 s of link time each in quick mode.
    links = _pick(ctx, quick=[(100_000_000, 32 * MIB), (20_000_000, 8 * MIB)],
                  full=[(100_000_000, 128 * MIB), (20_000_000, 32 * MIB)],
                  tiny=[(100_000_000, 2 * MIB)])
    room = f"{3 * size // (1 << 30) + 3}G"
    with sites("central", "a") as net:
        cluster = ctx.cluster("wan")
        try:
            return _measure(ctx, net, cluster, size, links, room)
        finally:
            cluster.stop_all()  # before the namespaces go


def _measure(ctx: BenchContext, net: SiteNetwork, cluster, size: int, links, room: str) -> list[Result]:
    central, site = net["central"], net["a"]
    master = central.adopt(cluster.master(image_size=room, host=central.ip, start=False)).start()
    replica = site.adopt(cluster.replica("r1", site="a", image_size=room, host=site.ip, start=False)).start()
    source = ctx.scratch / "wan-src"
    source.mkdir()
    write_image(source / "disk.img", size)
    cluster.icbd("imi", "create", NAME, "--from", str(source))
    cluster.icbd("imi", "publish", NAME)
    ctx.step("delta over a link: first version, unshaped")
    _subscribe_and_wait(cluster, NAME, [replica])
    # rsync's side: a copy of the replica's version, kept one version behind the master.
    rsync_dest = ctx.scratch / "rsync-dest"
    subprocess.run(["cp", "-a", "--sparse=always", f"{master.data / 'imis' / NAME / '1'}/.", str(rsync_dest)],
                   check=True)
    results = []
    with _rsync_daemon(central, master.data / "imis" / NAME, ctx.scratch) as rsync_url:
        for version, (rate, changed_target) in enumerate(links, start=2):
            mbit = rate // 1_000_000
            net.shape("central", rate)
            try:
                ctx.step(f"delta over a {mbit} Mbit/s link: icbd")
                changed = change_image(master.data / "work" / NAME / "disk.img", changed_target)
                drop_caches()
                before = net.counters("central")
                start = time.perf_counter()
                cluster.icbd("imi", "publish", NAME)
                _wait_held(replica, version)
                held_seconds = time.perf_counter() - start
                on_link = net.counters("central") - before
                transfer = _transfer(replica, NAME, version)
                ctx.step(f"delta over a {mbit} Mbit/s link: rsync")
                before = net.counters("central")
                rsync = _rsync(f"{rsync_url}/{version}", rsync_dest)  # an rsync:// source works too
                rsync_on_link = net.counters("central") - before
            finally:
                net.unshape("central")
            results.append(_row(mbit, rate, changed, transfer, held_seconds, on_link, rsync, rsync_on_link))
    return results


def fanout_over_links(ctx: BenchContext) -> list[Result]:
    """One version to 3 replicas at 3 sites against 1, each site behind its own
    shaped link, as remote sites are: what the master does for N replicas
    shows when the links, not this machine's 2 cores, are the bottleneck."""
    size = _pick(ctx, quick=48 * MIB, full=256 * MIB, tiny=4 * MIB)
    rate = _pick(ctx, quick=100_000_000, full=200_000_000, tiny=100_000_000)
    room = f"{4 * size // (1 << 30) + 3}G"
    with sites("central", "a", "b", "c") as net:
        cluster = ctx.cluster("fanout-links")
        try:
            central = net["central"]
            central.adopt(cluster.master(image_size=room, host=central.ip, start=False)).start()
            replicas = [net[s].adopt(cluster.replica(f"r{s}", site=s, image_size=room, host=net[s].ip,
                                                     start=False)).start() for s in "abc"]
            source = ctx.scratch / "fanout-src"
            source.mkdir()
            write_image(source / "disk.img", size)
            for s in "abc":
                net.shape(s, rate)
            seconds = {}
            for count in (1, 3):
                name = f"fan{count}"
                cluster.icbd("imi", "create", name, "--from", str(source))
                cluster.icbd("imi", "publish", name)
                drop_caches()
                ctx.step(f"fan-out over {rate // 1_000_000} Mbit/s links to {count} replica(s)")
                seconds[count] = _subscribe_and_wait(cluster, name, replicas[:count])
        finally:
            cluster.stop_all()  # before the namespaces go
    return [Result("fanout_over_links", seconds[3], seconds[1], "s", detail={
        "what": f"a new {size // MIB} MiB iMI to 3 replicas at 3 sites, each behind its own "
                f"{rate // 1_000_000} Mbit/s tbf link, against the same to 1 replica",
        "seconds_3": round(seconds[3], 3), "seconds_1": round(seconds[1], 3),
        "link_time_seconds": round(size * 8 / rate, 3),
    }, target=1.3)]


def _wait_held(replica, version: int, timeout: float = 900) -> None:
    wait_for(lambda: version in replica.status()["versions"].get(NAME, []), timeout=timeout,
             interval=0.02, what=f"{replica.id} to hold {NAME} v{version}")


def _row(mbit: int, rate: int, changed: int, transfer: dict, held_seconds: float, on_link, rsync: dict,
         rsync_on_link) -> Result:
    link_bytes_per_s = rate / 8
    network = transfer["network_bytes"]
    seconds = transfer["seconds"]
    name = "delta_over_link" if mbit == 100 else f"delta_over_link_{mbit}mbit"
    return Result(name, network / seconds, link_bytes_per_s, "B/s", higher_is_better=True, detail={
        "what": f"a delta of {changed // MIB} MiB changed, master in one network namespace, replica in "
                f"another, across a link shaped with tbf to {mbit} Mbit/s: stream bytes over the network "
                "/ the replica's transfer time, against the link rate",
        "link_bit_per_s": rate,
        "changed_bytes": changed,
        "stream_bytes": transfer["bytes"],
        "network_bytes": network,
        "parent": transfer["parent"],
        "transfer_seconds": seconds,
        "publish_to_held_seconds": round(held_seconds, 3),
        "changed_bytes_per_s_publish_to_held": round(changed / held_seconds),
        "fraction_publish_to_held": round(network / held_seconds / link_bytes_per_s, 4),
        "link_bytes_from_master_site": on_link.sent,
        "link_bytes_to_master_site": on_link.received,
        "link_bytes_over_stream_bytes": round(on_link.sent / transfer["bytes"], 4),
        "rsync_seconds": round(rsync["seconds"], 3),
        "rsync_bytes": rsync["bytes"],
        "rsync_link_bytes_from_master_site": rsync_on_link.sent,
        "rsync_fraction_of_link": round(rsync_on_link.sent / rsync["seconds"] / link_bytes_per_s, 4),
        "note": "publish-to-held adds the master's snapshot and the start of `btrfs send`; the link "
                "also carries heartbeats; veth counts a GSO packet of up to 64 KiB with one set of headers, "
                "so link bytes leave out most of the ~2.7% of TCP/IP and Ethernet headers of a 1500-byte MTU",
    })


@contextlib.contextmanager
def _rsync_daemon(site: Site, path: Path, scratch: Path) -> Iterator[str]:
    """`rsync --daemon` in `site`, serving `path` read-only as module `imis`; yields its URL."""
    port = free_port()
    config = scratch / "rsyncd.conf"
    config.write_text(
        "use chroot = no\nuid = 0\ngid = 0\n"
        f"log file = {scratch / 'rsyncd.log'}\n"
        f"[imis]\n    path = {path}\n    read only = yes\n"
    )
    process = subprocess.Popen(site.command([
        "rsync", "--daemon", "--no-detach", f"--config={config}", f"--address={site.ip}", f"--port={port}",
    ]))
    url = f"rsync://{site.ip}:{port}/imis"
    try:
        wait_for(lambda: subprocess.run(["rsync", f"{url}/"], capture_output=True).returncode == 0,
                 timeout=15, what="the rsync daemon")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    size = "full" if "--full" in argv else "tiny" if "--tiny" in argv else "quick"

    class Context(BenchContext):
        tiny = size == "tiny"

    ctx = Context(Path(tempfile.mkdtemp(prefix="icbd-wan-", dir="/var/tmp")), quick=size != "full")
    try:
        results = delta_over_link(ctx)
    finally:
        ctx.close()
    print(json.dumps([r.to_json() for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
