"""The capacity model of docs/SCALING.md, computed from a bench report.

    python -m bench.scaling_model OUT/report.json                 # print the tables
    python -m bench.scaling_model OUT/report.json --write docs/SCALING.md

With --write, the text between `<!-- model:begin -->` and
`<!-- model:end -->` in that file is replaced by the tables, so the
document always shows figures measured by `icbd bench --only scale` (the
report's scale_* rows) and the assumptions below, never numbers typed by
hand.

The deployment modelled: SITES sites of DESKTOPS desktops, each desktop
booting a WORKING_SET of bytes, all of a site's desktops within
BOOT_WINDOW seconds; an update whose stream is UPDATE bytes; site links
(and server NICs) of 1 GbE and 10 GbE, of which USABLE is payload.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

SITES = 100
DESKTOPS = 1000
WORKING_SET = 500e6  # bytes a desktop reads to boot (a Windows 7 boot reads 420-600 MB)
BOOT_WINDOW = 300.0  # seconds: 1,000 boots in 5 minutes
UPDATE = 2e9  # bytes of a version stream (a delta)
LINKS = {"1 GbE": 1e9 / 8, "10 GbE": 10e9 / 8}  # bytes/s
USABLE = 0.9  # of a link's rate, for payload (TCP/IP, HTTP, other traffic)
CONTROL_INTERVAL = 2.0  # seconds between heartbeats, and between a cache server's polls
CACHE_SERVERS_PER_SITE = 2  # for the control-plane figures
MIB = 1 << 20

BEGIN, END = "<!-- model:begin -->", "<!-- model:end -->"


class Missing(Exception):
    pass


def _rows(report: dict) -> dict[str, dict]:
    if not isinstance(report, dict) or not isinstance(report.get("results", []), list):
        raise ValueError("not a bench report (an object with a list of results)")
    rows = {r["name"]: r for r in report.get("results", []) if isinstance(r, dict) and "name" in r}
    wanted = ("scale_master_egress", "scale_converge_seconds", "scale_storm_p99_ms", "scale_replica_egress",
              "scale_cache_throughput", "scale_replica_throughput")
    missing = [name for name in wanted if rows.get(name, {}).get("value") is None]
    if missing:
        raise Missing(f"the report has no measured {', '.join(missing)}: run `icbd bench --only scale`")
    return rows


def measured(report: dict) -> dict:
    """The figures the model is calibrated on, from the report's rows."""
    rows = _rows(report)
    master = rows["scale_master_egress"]["detail"]
    converge = rows["scale_converge_seconds"]
    storm = rows["scale_storm_p99_ms"]["detail"]
    cache = rows["scale_cache_throughput"]["detail"]
    replica = rows["scale_replica_throughput"]["detail"]
    sweep = master.get("by_replicas_behind_nginx", {})
    slowest = min(converge["detail"]["sites"].values(), key=lambda v: v["rate_mbit"])
    control = master.get("control", {})
    return {
        "sites_measured": master["sites_count"],
        "master_over_stream_nginx": rows["scale_master_egress"]["ratio"],
        "master_over_stream_direct": master["direct_master_over_one_stream"],
        "sweep": {int(n): v["master_over_one_stream"] for n, v in sweep.items()},
        "wan_over_stream": master.get("wan_over_one_stream", 1.0),
        "publish_overhead_s": max(0.0, slowest["seconds_nginx"] - slowest["link_seconds_for_one_stream"]),
        "stream_bytes": master["nginx"]["stream_bytes"],
        "converge_s": converge["value"],
        "replica_over_working_set": rows["scale_replica_egress"]["ratio"],
        "replica_per_site_storm": storm.get("replica_egress_over_working_set_per_site", 1.0),
        "cache_mb_per_core": cache["icbd"]["mb_per_cpu_s"] * 1e6,
        "cache_blocks_per_core": cache["icbd"]["blocks_per_cpu_s"],
        "nginx_mb_per_core": cache["nginx"]["mb_per_cpu_s"] * 1e6,
        "replica_mb_per_core": replica["icbd"]["mb_per_cpu_s"] * 1e6,
        "nginx_replica_mb_per_core": replica["nginx"]["mb_per_cpu_s"] * 1e6,
        "storm_p50_ms": storm["p50_ms"], "storm_p99_ms": storm["p99_ms"],
        "storm_readers": storm.get("readers") or master["sites_count"] * master.get("readers_per_site", 0),
        "slowest_mbit": slowest["rate_mbit"],
        "node_list_bytes_per_node": control.get("node_list_bytes_per_node"),
        "catalogue_bytes": control.get("catalogue_bytes"),
        "heartbeat_body_bytes": control.get("heartbeat_body_bytes"),
        "master_cpu_s_per_gb": master.get("master_cpu_seconds_per_gb_direct"),
        "node_list_bytes_per_cpu_s": control.get("node_list_bytes_per_master_cpu_s"),
        "control_bytes_per_s_per_node": (
            (control["master_link_bytes_per_s_out"] + control["master_link_bytes_per_s_in"])
            / (control["replicas"] + control["cache_servers"]) if control else None),
        "run": report.get("run", {}), "machine": report.get("machine", {}),
    }


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.0f} MB"


def _rate(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:,.2f} GB/s"
    return f"{n / 1e6:,.0f} MB/s" if n >= 10e6 else f"{n / 1e3:,.0f} kB/s"


def _s(seconds: float) -> str:
    if seconds >= 120:
        return f"{seconds / 60:,.1f} min"
    return f"{seconds:,.1f} s"


def tables(m: dict) -> str:
    demand = DESKTOPS * WORKING_SET / BOOT_WINDOW  # bytes/s a site's desktops read in a storm
    blocks_demand = demand / MIB
    out = []
    say = out.append
    say(f"Calibrated on `icbd bench --only scale` ({m['run'].get('size', '?')} run of "
        f"{m['run'].get('started', '?')}, {m['machine'].get('cores', '?')} cores, {m['machine'].get('cpu', '?')}); assumptions: {SITES} sites × "
        f"{DESKTOPS:,} desktops, a {_gb(WORKING_SET)} boot working set, {DESKTOPS:,} boots in "
        f"{BOOT_WINDOW / 60:g} minutes per site, an update stream of {_gb(UPDATE)}, {USABLE:.0%} of a link "
        "for payload. Regenerate: `python -m bench.scaling_model OUT/report.json --write docs/SCALING.md`.")
    say("")
    say("**Measured (this machine, per core of the process serving):**")
    say("")
    say("| figure | measured |")
    say("|---|---|")
    say(f"| site cache server, warm 1 MiB blocks | {_rate(m['cache_mb_per_core'])} per core "
        f"({m['cache_blocks_per_core']:,.0f} blocks/s) |")
    say(f"| nginx serving the same blocks from its cache | {_rate(m['nginx_mb_per_core'])} per core |")
    say(f"| replica, warm blocks | {_rate(m['replica_mb_per_core'])} per core (nginx in front of it: "
        f"{_rate(m['nginx_replica_mb_per_core'])}) |")
    sweep = ", ".join(f"{m['sweep'][n]:.3f} (N = {n})" for n in sorted(m["sweep"]))
    say(f"| master egress per publish, N replicas behind one nginx | {sweep} × one stream |")
    say(f"| master egress per publish, {m['sites_measured']} replicas straight to the master | "
        f"{m['master_over_stream_direct']:.2f} × one stream |")
    say(f"| replica egress, cache servers behind one nginx | {m['replica_over_working_set']:.3f} × the working set |")
    say(f"| replica egress per site in a storm (one cache server) | {m['replica_per_site_storm']:.3f} × the working "
        "set |")
    say(f"| WAN link bytes per site per update | {m['wan_over_stream']:.3f} × one stream |")
    say(f"| publish to held, less the link time (slowest site) | {m['publish_overhead_s']:.1f} s for a "
        f"{_gb(m['stream_bytes'])} stream |")
    say(f"| an update to every one of {m['sites_measured']} sites behind the nginx | {m['converge_s']:.1f} s "
        f"(slowest link {m['slowest_mbit']} Mbit/s) |")
    say(f"| boot storm, {m['storm_readers']} readers at {m['sites_measured']} sites on this host's cores | block "
        f"latency p50 {m['storm_p50_ms']:.0f} ms, p99 {m['storm_p99_ms']:.0f} ms (bound by this host's CPU) |")
    if m["node_list_bytes_per_node"]:
        say(f"| control calls, nothing published | {m['control_bytes_per_s_per_node']:,.0f} B/s per node at the "
            f"master; node list {m['node_list_bytes_per_node']:,} B per node listed, catalogue "
            f"{m['catalogue_bytes']:,} B |")
    say("")

    say(f"**A site: {DESKTOPS:,} boots in {BOOT_WINDOW / 60:g} minutes** "
        f"({_rate(demand)}, {blocks_demand:,.0f} blocks of 1 MiB per second):")
    say("")
    say("| server NIC | icbd cache servers needed (one process, one core each) | nginx caches needed | "
        "what bounds each |")
    say("|---|---|---|---|")
    for name, nic in LINKS.items():
        usable = nic * USABLE
        per_icbd = min(usable, m["cache_mb_per_core"])
        icbd = math.ceil(demand / per_icbd)
        cores_nginx = max(1, math.ceil(min(usable, demand) / m["nginx_mb_per_core"]))
        nginx = math.ceil(demand / min(usable, m["nginx_mb_per_core"] * cores_nginx))
        bound_icbd = "its core" if m["cache_mb_per_core"] < usable else "the NIC"
        say(f"| {name} | {icbd} ({demand / (per_icbd * icbd):.0%} busy; "
            f"{per_icbd * BOOT_WINDOW / WORKING_SET:,.0f} boots per server in 5 min) | {nginx} "
            f"({cores_nginx} core{'s' if cores_nginx > 1 else ''} each) | icbd: {bound_icbd}; nginx: the NIC |")
    say("")
    say(f"Behind them the site's replica sends each block once per version "
        f"({m['replica_over_working_set']:.2f} × the working set measured, {_gb(WORKING_SET)}), whatever the "
        "number of cache servers, when they fill through one HTTP cache in front of it (or through each other "
        "by digest behind one name); straight to the replica, each cache server fetches the working set "
        "itself (M × the working set).")
    say("")

    say(f"**An update of {_gb(UPDATE)} to {SITES} sites:**")
    say("")
    say("| | replicas straight to the master | replicas behind one shared HTTP cache |")
    say("|---|---|---|")
    say(f"| master egress | {_gb(UPDATE * SITES)} ({SITES} streams) | "
        f"{_gb(UPDATE * m['master_over_stream_nginx'])} (one stream) |")
    say(f"| the shared cache's egress | | {_gb(UPDATE * SITES * m['wan_over_stream'])} |")
    say(f"| each site's WAN link | {_gb(UPDATE * m['wan_over_stream'])} | "
        f"{_gb(UPDATE * m['wan_over_stream'])} |")
    master_cpu = UPDATE * SITES / 1e9 * (m["master_cpu_s_per_gb"] or 0)
    say(f"| the master's CPU for the streams | {_s(master_cpu)} ({m['master_cpu_s_per_gb'] or 0:.1f} s per GB "
        f"measured) | {_s(master_cpu / SITES)} |")
    for name, link in LINKS.items():
        usable = link * USABLE
        site = UPDATE * m["wan_over_stream"] / usable
        central = UPDATE * SITES * m["wan_over_stream"] / usable
        direct = max(site, central, master_cpu) + m["publish_overhead_s"]
        shared = max(site, central) + m["publish_overhead_s"]
        say(f"| time to every site, site links and the centre's link at {name} | {_s(direct)} (bound by "
            f"{'the master' if master_cpu > central else 'the master' + chr(39) + 's link'}) | {_s(shared)} (the "
            f"cache's link carries {SITES} streams); a site alone: {_s(site + m['publish_overhead_s'])} |")
    say("")
    say("With the shared cache the master's egress no longer grows with the sites; the shared cache's own link "
        "then carries one stream per site. Two levels (a cache per region in front of the sites, each filling "
        "from the central one, as CernVM-FS's Stratum 1s and site Squids) divide that by the number of regions; "
        "the master still sends one stream.")
    say("")

    if m["node_list_bytes_per_node"]:
        nodes = SITES * (1 + CACHE_SERVERS_PER_SITE)
        pollers = SITES * CACHE_SERVERS_PER_SITE
        node_list = m["node_list_bytes_per_node"] * (nodes + 1)
        polls = pollers / CONTROL_INTERVAL * (node_list + m["catalogue_bytes"])
        heartbeats = nodes / CONTROL_INTERVAL * (m["heartbeat_body_bytes"] + 200)
        say(f"**Control calls at {SITES} sites** ({nodes} nodes: a replica and {CACHE_SERVERS_PER_SITE} cache "
            "servers per site):")
        say("")
        say("| | per second at the master |")
        say("|---|---|")
        say(f"| heartbeats (one every {CONTROL_INTERVAL:g} s per node, {m['heartbeat_body_bytes']:,} B each) | "
            f"{nodes / CONTROL_INTERVAL:,.0f} calls, {_rate(heartbeats)} in |")
        say(f"| cache servers' polls of the node list ({_gb(node_list)} with {nodes} nodes) and the catalogue, "
            f"every {CONTROL_INTERVAL:g} s | {pollers / CONTROL_INTERVAL * 2:,.0f} calls, {_rate(polls)} out |")
        say("")
        cores = polls / m["node_list_bytes_per_cpu_s"] if m["node_list_bytes_per_cpu_s"] else None
        cost = f" (the master renders {_rate(m['node_list_bytes_per_cpu_s'])} of node list per core: " \
               f"{cores:.1f} cores)" if cores else ""
        say(f"The node list grows with the nodes and every cache server polls it, so its cost grows with the "
            f"square of the sites: {_rate(polls)} of JSON from one Python process at {SITES} sites{cost} (a "
            "control call, never cached). That, not a data path, is the first thing to give at this scale.")
        say("")
    return "\n".join(out)


def write(doc: Path, text: str) -> None:
    current = doc.read_text()
    if BEGIN not in current or END not in current:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} section to replace")
    head, rest = current.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling_model",
                                     description="docs/SCALING.md's tables from a bench report")
    parser.add_argument("report", help="report.json of `icbd bench --only scale`")
    parser.add_argument("--write", metavar="DOC", help="replace the model section of DOC (docs/SCALING.md)")
    args = parser.parse_args(argv)
    try:
        report = json.loads(Path(args.report).read_text())
        text = tables(measured(report))
    except (OSError, ValueError) as error:
        print(f"scaling_model: cannot read {args.report}: {error}", file=sys.stderr)
        return 1
    except Missing as error:
        print(f"scaling_model: {error}", file=sys.stderr)
        return 1
    if args.write:
        write(Path(args.write), text)
        print(f"wrote the model into {args.write}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
