"""Master-to-replica transfers: full, delta (against rsync too), fan-out, and
the cost of publishing a small change against a full publish."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from pathlib import Path

from harness.cluster import Cluster, wait_for
from harness.data import MIB, change_image, drop_caches, write_image
from icbdcore.wire import SUBSCRIPTIONS_ROUTE

from .context import BenchContext
from .results import Result, median

log = logging.getLogger(__name__)


def _subscribe_and_wait(cluster: Cluster, name: str, replicas, version: int = 1, timeout: float = 900) -> float:
    """Seconds from the subscription until every replica holds `version`."""
    start = time.perf_counter()
    for replica in replicas:
        cluster.api("POST", SUBSCRIPTIONS_ROUTE, json={"imi": name, "node": replica.id}).raise_for_status()
    for replica in replicas:
        wait_for(lambda r=replica: version in r.status()["versions"].get(name, []),
                 timeout=timeout, interval=0.02, what=f"{replica.id} to hold {name} v{version}")
    return time.perf_counter() - start


def _transfer(replica, name: str, version: int) -> dict:
    return [t for t in replica.status()["transfers"] if t["imi"] == name and t["version"] == version
            and t["state"] == "done"][-1]


def _bare_pipe(snapshot: Path, target: Path, spool: Path | None = None) -> float:
    """A bare `btrfs send | btrfs receive` of the same snapshot, caches dropped;
    with `spool`, the stream is also written there on the way (`tee`), as the
    master's spool is."""
    target.mkdir(parents=True, exist_ok=True)
    drop_caches()
    tee = f" | tee '{spool}'" if spool else ""
    start = time.perf_counter()
    done = subprocess.run(f"set -o pipefail; btrfs send -q '{snapshot}'{tee} | btrfs receive -q '{target}'",
                          shell=True, executable="/bin/bash", capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bare send | receive failed: {done.stderr.strip()}")
    seconds = time.perf_counter() - start
    received = target / snapshot.name
    subprocess.run(["btrfs", "subvolume", "delete", str(received)], check=True, capture_output=True)
    if spool:
        spool.unlink()
    return seconds


def full_transfer(ctx: BenchContext) -> list[Result]:
    """Master to replica, the whole image, against a bare send | receive pipe.

    The headline is the largest size; smaller sizes (one run each) give the
    throughput-by-size curve of the report."""
    sizes = ctx.pick(quick=[256 * MIB, 1 << 30], full=[1 << 30, 4 << 30], tiny=[16 * MIB, 48 * MIB])
    reps = ctx.pick(quick=3, full=3, tiny=1)
    runs = [(size, 1) for size in sizes[:-1]] + [(sizes[-1], reps)]
    room = f"{sum(size * n for size, n in runs) * 5 // 4 // (1 << 30) + sizes[-1] // (1 << 30) + 4}G"
    cluster = ctx.cluster("full")
    master = cluster.master(image_size=room)
    replica = cluster.replica("r1", image_size=room)
    by_size = []
    for size, count in runs:
        source = ctx.scratch / f"full-src-{size}"
        source.mkdir()
        write_image(source / "disk.img", size)
        ours, bare, teed, wire = [], [], [], []
        for rep in range(count):
            name = f"full{size // MIB}m{rep}"
            cluster.icbd("imi", "create", name, "--from", str(source))
            cluster.icbd("imi", "publish", name)
            snapshot = master.data / "imis" / name / "1"
            ctx.step(f"full transfer of {size // MIB} MiB, {rep + 1}/{count}: bare pipe")
            bare.append(_bare_pipe(snapshot, replica.data / "bench-baseline"))
            ctx.step(f"full transfer of {size // MIB} MiB, {rep + 1}/{count}: bare pipe, teed to a spool")
            teed.append(_bare_pipe(snapshot, replica.data / "bench-baseline", master.data / "bench-spool"))
            ctx.step(f"full transfer of {size // MIB} MiB, {rep + 1}/{count}: icbd")
            drop_caches()
            ours.append(_subscribe_and_wait(cluster, name, [replica]))
            wire.append(_transfer(replica, name, 1)["network_bytes"])
        shutil.rmtree(source)
        by_size.append({
            "image_bytes": size, "stream_bytes": wire[0], "runs": count,
            "icbd_seconds": [round(s, 3) for s in ours], "bare_pipe_seconds": [round(s, 3) for s in bare],
            "teed_pipe_seconds": [round(s, 3) for s in teed],
            "icbd_mb_s": round(wire[0] / median(ours) / 1e6, 1), "bare_pipe_mb_s": round(wire[0] / median(bare) / 1e6, 1),
            "teed_pipe_mb_s": round(wire[0] / median(teed) / 1e6, 1),
        })
    last = by_size[-1]
    stream = last["stream_bytes"]
    return [Result(
        "full_transfer", stream / median(last["icbd_seconds"]) / 1e6, stream / median(last["bare_pipe_seconds"]) / 1e6,
        "MB/s",
        detail={
            "image_bytes": last["image_bytes"], "stream_bytes": stream, "runs": last["runs"],
            "icbd_seconds": last["icbd_seconds"], "bare_pipe_seconds": last["bare_pipe_seconds"],
            "teed_pipe_seconds": last["teed_pipe_seconds"],
            "teed_pipe_over_bare": round(median(last["bare_pipe_seconds"]) / median(last["teed_pipe_seconds"]), 3),
            "icbd_over_teed_pipe": round(median(last["teed_pipe_seconds"]) / median(last["icbd_seconds"]), 3),
            "teed_pipe": "btrfs send | tee SPOOL | btrfs receive: the bare pipe plus the one write the master's "
                         "spool adds (for fan-out and resume); on one host the two writes share a disk",
            "by_size": by_size,
            "what": f"a new {last['image_bytes'] // MIB} MiB iMI from the master to one replica: "
                    "subscription to a verified, visible version, caches dropped; "
                    "baseline: btrfs send | btrfs receive between the same two filesystems, caches dropped.",
        },
        target=0.9, higher_is_better=True,
    )]


def delta_transfer(ctx: BenchContext) -> list[Result]:
    size = ctx.pick(quick=512 * MIB, full=4 << 30, tiny=32 * MIB)
    changed_target = ctx.pick(quick=16 * MIB, full=64 * MIB, tiny=2 * MIB)
    cluster = ctx.cluster("delta")
    master = cluster.master(image_size=f"{3 * size // (1 << 30) + 4}G")
    replica = cluster.replica("r1", image_size=f"{3 * size // (1 << 30) + 4}G")
    source = ctx.scratch / "delta-src"
    source.mkdir()
    write_image(source / "disk.img", size)
    cluster.icbd("imi", "create", "delta", "--from", str(source))
    cluster.icbd("imi", "publish", "delta")
    _subscribe_and_wait(cluster, "delta", [replica])
    work = master.data / "work" / "delta"
    # rsync's view of the same change: the old version copied aside, then updated.
    rsync_dest = ctx.scratch / "rsync-dest"
    subprocess.run(["cp", "-a", "--sparse=always", f"{master.data / 'imis/delta/1'}/.", str(rsync_dest)], check=True)
    changed = change_image(work / "disk.img", changed_target)
    ctx.step("delta transfer: publish and replicate")
    start = time.perf_counter()
    cluster.icbd("imi", "publish", "delta")
    wait_for(lambda: 2 in replica.status()["versions"].get("delta", []), timeout=600, interval=0.02,
             what="delta version at the replica")
    seconds = time.perf_counter() - start
    transfer = _transfer(replica, "delta", 2)
    ctx.step("delta transfer: rsync of the same change")
    rsync = _rsync(master.data / "imis/delta/2", rsync_dest)
    baseline = changed + MIB
    return [
        Result("delta_transfer", transfer["network_bytes"], baseline, "bytes", detail={
            "what": f"bytes on the wire for the delta of a {changed // MIB} MiB change to a {size // MIB} MiB "
                    "image, master to replica; baseline: the changed bytes plus 1 MiB. rsync's bytes "
                    "for the same change are in rsync_bytes_on_wire.",
            "changed_bytes": changed, "image_bytes": size, "parent": transfer["parent"],
            "stream_bytes": transfer["bytes"], "publish_to_held_seconds": round(seconds, 3),
            "rsync_bytes_on_wire": rsync["bytes"], "rsync_seconds": round(rsync["seconds"], 3),
            "ratio_to_changed_bytes": round(transfer["network_bytes"] / changed, 4),
            "budget": "bytes on the wire <= 1.05 x changed + 1 MiB",
        }, target=(1.05 * changed + MIB) / baseline),
        Result("delta_vs_rsync_seconds", seconds, rsync["seconds"], "s", detail={
            "what": "publish-to-replicated time of the delta, against rsync --no-whole-file of the same change",
            "rsync_bytes_on_wire": rsync["bytes"], "icbd_bytes_on_wire": transfer["network_bytes"],
        }),
    ]


def _rsync(source: Path, dest: Path) -> dict:
    """rsync's delta of `source` onto `dest` (every file compared, whatever its mtime)."""
    if not shutil.which("rsync"):
        return {"bytes": float("nan"), "seconds": float("nan")}
    drop_caches()
    start = time.perf_counter()
    out = subprocess.run(
        ["rsync", "-a", "--ignore-times", "--no-whole-file", "--inplace", "--stats", f"{source}/", f"{dest}/"],
        check=True, capture_output=True, text=True,
    ).stdout
    seconds = time.perf_counter() - start
    sent = int(re.search(r"Total bytes sent: ([\d,]+)", out).group(1).replace(",", ""))
    received = int(re.search(r"Total bytes received: ([\d,]+)", out).group(1).replace(",", ""))
    return {"bytes": sent + received, "seconds": seconds}


def fanout(ctx: BenchContext) -> list[Result]:
    """Publishing one version to 3 replicas against publishing it to 1."""
    size = ctx.pick(quick=256 * MIB, full=1 << 30, tiny=16 * MIB)
    changed = ctx.pick(quick=32 * MIB, full=128 * MIB, tiny=2 * MIB)
    reps = ctx.pick(quick=2, full=3, tiny=1)
    room = f"{3 * size // (1 << 30) + 3}G"
    cluster = ctx.cluster("fanout")
    master = cluster.master(image_size=room)
    replicas = [cluster.replica(f"r{i}", site="ab"[i % 2], image_size=room) for i in range(3)]
    source = ctx.scratch / "fanout-src"
    source.mkdir()
    write_image(source / "disk.img", size)
    timings: dict[int, list[float]] = {1: [], 3: []}
    full: dict[int, float] = {}
    for count in (1, 3):
        name = f"fan{count}"
        cluster.icbd("imi", "create", name, "--from", str(source))
        cluster.icbd("imi", "publish", name)
        ctx.step(f"fan-out to {count}: first (full) version")
        full[count] = _subscribe_and_wait(cluster, name, replicas[:count])
        for rep in range(reps):
            change_image(master.data / "work" / name / "disk.img", changed)
            ctx.step(f"fan-out to {count}: delta {rep + 1}/{reps}")
            start = time.perf_counter()
            cluster.icbd("imi", "publish", name)
            for replica in replicas[:count]:
                wait_for(lambda r=replica, v=rep + 2, n=name: v in r.status()["versions"].get(n, []),
                         timeout=600, interval=0.02, what="fan-out")
            timings[count].append(time.perf_counter() - start)
    return [Result("fanout", median(timings[3]), median(timings[1]), "s", detail={
        "what": f"publish of a {changed // MIB} MiB change to an image of {size // MIB} MiB until every "
                "subscribed replica holds it: 3 replicas against 1",
        "seconds_3": [round(s, 3) for s in timings[3]], "seconds_1": [round(s, 3) for s in timings[1]],
        "full_first_version_seconds": {"1": round(full[1], 3), "3": round(full[3], 3)},
        "note": "all replicas share this machine's 2 cores and disk, so their receives compete; "
                "on separate hosts only the master's send is shared",
    }, target=1.3)]


def publish_small_change(ctx: BenchContext) -> list[Result]:
    """Publishing a ~1% change of a large image, against publishing the image
    in full: from `icbd imi publish` until the subscribed replica holds it."""
    size = ctx.pick(quick=1 << 30, full=4 << 30, tiny=48 * MIB)
    fraction = 0.01
    room = f"{3 * size // (1 << 30) + 4}G"
    cluster = ctx.cluster("publish")
    master = cluster.master(image_size=room)
    replica = cluster.replica("r1", image_size=room)
    source = ctx.scratch / "publish-src"
    source.mkdir()
    write_image(source / "disk.img", size)
    cluster.icbd("imi", "create", "pub", "--from", str(source))
    shutil.rmtree(source)
    cluster.api("POST", SUBSCRIPTIONS_ROUTE, json={"imi": "pub", "node": replica.id}).raise_for_status()
    ctx.step("publish: the whole image")
    full = _publish_and_wait(cluster, "pub", replica, 1)
    changed = change_image(master.data / "work" / "pub" / "disk.img", int(size * fraction))
    ctx.step("publish: a 1% change")
    small = _publish_and_wait(cluster, "pub", replica, 2)
    return [Result("publish_small_change", small["seconds"], full["seconds"], "s", detail={
        "what": f"from `icbd imi publish` until the replica holds the version: {changed / size:.1%} of a "
                f"{size // MIB} MiB image changed, against the first, full publish of the same image "
                "(caches dropped before each). No budget is set for it; a publish that costs what "
                f"changed would come near the changed fraction ({fraction}) plus fixed costs.",
        "image_bytes": size, "changed_bytes": changed,
        "small": small, "full": full,
        "publish_command_ratio": round(small["publish_seconds"] / full["publish_seconds"], 4),
        "wire_bytes_ratio": round(small["network_bytes"] / full["network_bytes"], 4),
    })]


def _publish_and_wait(cluster: Cluster, name: str, replica, version: int) -> dict:
    drop_caches()
    start = time.perf_counter()
    cluster.icbd("imi", "publish", name)
    published = time.perf_counter() - start
    wait_for(lambda: version in replica.status()["versions"].get(name, []), timeout=900, interval=0.02,
             what=f"{replica.id} to hold {name} v{version}")
    seconds = time.perf_counter() - start
    transfer = _transfer(replica, name, version)
    return {"seconds": round(seconds, 3), "publish_seconds": round(published, 3),
            "network_bytes": transfer["network_bytes"], "stream_bytes": transfer["bytes"]}
