"""What TLS costs on every hop: a full transfer and a cold read over https,
against the same over plain http, in the same run.

Two clusters side by side (one with a CA and a certificate per node, one
without), runs alternating between them so that a busy moment of the host
hits both: a new iMI from the master to a replica (streams: urllib3 in a
worker thread on the replica, hypercorn on the master), and a file read
through a fresh mount over an empty site cache server (blocks: the mount
asks the cache, the cache asks the replica, both over the network stack).
"""

from __future__ import annotations

import logging

from harness.cluster import Cluster
from harness.data import MIB, drop_caches, write_image

from .context import BenchContext
from .readpath import _mb_s
from .results import Result, median
from .transfer import _subscribe_and_wait, _transfer

log = logging.getLogger(__name__)


def tls_cost(ctx: BenchContext) -> list[Result]:
    size = ctx.pick(quick=512 * MIB, full=2 << 30, tiny=16 * MIB)
    reps = ctx.pick(quick=3, full=3, tiny=1)
    room = f"{2 * (reps + 1) * size // (1 << 30) + 3}G"
    source = ctx.scratch / "tls-src"
    source.mkdir()
    write_image(source / "disk.img", size)
    clusters: dict[str, tuple[Cluster, object]] = {}
    for kind in ("plain", "tls"):
        cluster = ctx.cluster(f"tls-{kind}", tls=kind == "tls")
        cluster.master(image_size=room)
        clusters[kind] = (cluster, cluster.replica("r1", site="a", image_size=room))
    transfer = {"plain": [], "tls": []}
    read = {"plain": [], "tls": []}
    stream_bytes = 0
    for rep in range(reps):
        for kind, (cluster, replica) in clusters.items():
            name = f"tls{rep}"
            ctx.step(f"{kind} {rep + 1}/{reps}: full transfer of {size // MIB} MiB")
            cluster.icbd("imi", "create", name, "--from", str(source))
            cluster.icbd("imi", "publish", name)
            drop_caches()
            seconds = _subscribe_and_wait(cluster, name, [replica])
            stream_bytes = _transfer(replica, name, 1)["network_bytes"]
            transfer[kind].append(stream_bytes / seconds / 1e6)
            ctx.step(f"{kind} {rep + 1}/{reps}: cold read through a site cache")
            cache = cluster.cache(f"cache{rep}", site="a", size=f"{2 * size // MIB + 64}M")
            mount = _mount_named(cluster, f"cold{rep}", cache, name)
            drop_caches()
            read[kind].append(_mb_s(mount.mountpoint / name / "1" / "disk.img", size))
            mount.stop()
            cache.stop()
    rounded = {"transfer_mb_s": {k: [round(v, 1) for v in vs] for k, vs in transfer.items()},
               "cold_read_mb_s": {k: [round(v, 1) for v in vs] for k, vs in read.items()}}
    common = {"image_bytes": size, "stream_bytes": stream_bytes, "runs": reps, **rounded,
              "tls": "TLS 1.3 from Python's ssl (OpenSSL) on both ends; hypercorn serves, urllib3, httpx and "
                     "requests verify against the cluster's CA"}
    return [
        Result("tls_transfer", median(transfer["tls"]), median(transfer["plain"]), "MB/s", detail={
            "what": f"a new {size // MIB} MiB iMI from the master to one replica over https, caches dropped; "
                    "baseline: the same over plain http, runs alternating.", **common,
        }),
        Result("tls_cold_read", median(read["tls"]), median(read["plain"]), "MB/s", detail={
            "what": f"a {size // MIB} MiB file read through a fresh mount over an empty site cache server, "
                    "every hop (mount to cache, cache to replica) over https, caches dropped; baseline: the "
                    "same over plain http, runs alternating.", **common,
        }),
    ]


def _mount_named(cluster: Cluster, name: str, cache, imi: str):
    mount = cluster.mount(name, cache=cache, timeout=30.0)
    (mount.mountpoint / imi).stat()  # the catalogue is in: the timed read starts with the file
    return mount
