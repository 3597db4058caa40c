"""The suite's output: report.json, report.md (a table with a plain verdict
per row, the machine, how to reproduce) and PNG plots.

report.json is `{"machine": {...}, "run": {...}, "results": [row, ...]}`;
each row has name, value, baseline, ratio (= value / baseline), unit and
detail, plus target, target_is, meets_target and status. A row whose
benchmark failed or could not run has null value, baseline and ratio, and
says why in detail.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend first)

from .results import Result  # noqa: E402

MIB = 1 << 20

# Where each budget comes from: icbd's performance budget (bench/README.md).
BUDGETS = {
    "full_transfer": "≥ 0.9 × a bare `btrfs send | btrfs receive` pipe",
    "delta_transfer": "bytes on the wire ≤ 1.05 × changed bytes + 1 MiB",
    "fanout": "one publish to 3 replicas ≤ 1.3 × the time for one",
    "fuse_read_cold": "≥ 0.5 × the replica's cold disk read, through an empty site cache",
    "fuse_read_local_cache": "≥ 300 MB/s sequential, blocks in the local cache",
    "fuse_read_warm": "page-cache speed (taken as ≥ 0.9 × a warm local read)",
    "boot_cold": "≤ 1.3 × booting the same files from local disk",
    "boot_cold_profile": "≤ 1.1 × booting from local disk, with a boot profile",
    "boot_warm": "≤ 1.05 × booting from local disk, cache warm",
    "boot_storm": "replica egress ≤ 1.05 × the boot working set, whatever N",
    "boot_storm_readers": "replica egress ≤ 1.05 × the boot working set, whatever N",
    "metrics_cold_read": "with metrics within 2% of without (≥ 0.98 ×)",
    "metrics_warm_read": "with metrics within 2% of without (≥ 0.98 ×)",
    "desktop_boot_cold": "≤ 1.3 × booting the same desktop from local disk, to its session",
    "desktop_boot_profile": "≤ 1.1 × booting from local disk, with a boot profile",
    "desktop_boot_warm": "≤ 1.05 × booting from local disk, cache warm",
    "desktop_storm_egress": "replica egress ≤ 1.05 × the boot working set, 8 desktops at once",
    "desktop_read_amplification": "bytes fetched ≤ 1.5 × the bytes the guest read, with a profile",
    "desktop_profile_coverage": "the profile holds ≥ 0.95 of the blocks a boot reads",
    "desktop_replay_cold": "≤ 2 × replaying the boot's reads from local disk, cold cache",
    "desktop_replay_profile": "≤ 1.2 × replaying from local disk, with a boot profile",
    "desktop_replay_warm": "≤ 1.1 × replaying from local disk, cache warm",
}

NOTES = [
    "Every node (master, replicas, cache servers, FUSE mounts) and every qemu desktop runs on this one "
    "host and talks over loopback: they share its cores, memory and disk, so a benchmark with several "
    "nodes measures them competing for the same CPU, which separate hosts would not.",
    "Each node keeps its data on its own loop-mounted btrfs image, all on the same underlying disk.",
    "Caches are dropped (sync; echo 3 > /proc/sys/vm/drop_caches) where a row says so; that affects the "
    "whole host, including anything else running on it.",
    "Ratios are value / baseline, the baseline measured in the same run; a verdict compares the ratio "
    "with icbd's performance budget. Nothing here is asserted: a row short of budget is reported, not raised.",
]


# --- the machine ------------------------------------------------------------------------

def machine_info(scratch: Path | None = None) -> dict:
    info: dict = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_bytes": _meminfo("MemTotal"),
        "kernel": platform.release(),
        "os": _os_release(),
        "python": sys.version.split()[0],
        "btrfs_progs": _first_line(["btrfs", "--version"]),
        "qemu": _first_line(["qemu-system-x86_64", "--version"]),
        "rsync": _first_line(["rsync", "--version"]),
        "kvm_device": os.access("/dev/kvm", os.R_OK | os.W_OK),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "icbd_commit": _git_commit(),
    }
    if scratch is not None:
        usage = shutil.disk_usage(scratch)
        info["scratch_filesystem"] = {"path": str(scratch.parent), "type": _fs_type(scratch),
                                      "free_bytes": usage.free}
    return info


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return found.group(1).strip() if found else platform.processor() or "unknown"


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _os_release() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return platform.platform()
    found = re.search(r'^PRETTY_NAME="?([^"\n]+)"?$', text, re.MULTILINE)
    return found.group(1) if found else platform.platform()


def _first_line(argv: list[str]) -> str | None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else None


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parent.parent
    commit = _first_line(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    if commit is None or " " in commit:
        return None
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return commit + (" (with local changes)" if dirty else "")


def _fs_type(path: Path) -> str | None:
    return _first_line(["stat", "-f", "-c", "%T", str(path)])


# --- rows -------------------------------------------------------------------------------

def row_json(result: Result) -> dict:
    doc = result.to_json()
    doc["status"] = result.detail.get("status", "ok")
    return _finite(doc)


def _finite(value):
    """NaN and infinities as null: report.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def verdict(result: Result) -> str:
    status = result.detail.get("status", "ok")
    if status != "ok":
        why = result.detail.get("error") or result.detail.get("not_available") or status
        return f"{status}: {why}"
    if not math.isfinite(result.ratio):
        return "not measured"
    if result.target is None:
        return "no budget"
    bound = f"{'≥' if result.higher_is_better else '≤'} {result.target:.3g}"
    return f"meets budget ({bound})" if result.meets_target else f"**short of budget** (needs {bound})"


def _number(x: float, unit: str = "") -> str:
    if not isinstance(x, int | float) or not math.isfinite(x):
        return "–"
    if unit == "bytes":
        return _bytes(x)
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# --- writing ----------------------------------------------------------------------------

def write_report(out: Path, results: list[Result], machine: dict, run: dict) -> dict[str, Path]:
    """Write report.json, report.md and the plots into `out`; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    plots = write_plots(out, results)
    images = write_attachments(out, results)
    run = {**run, "plots": [p.name for p in plots], "images": [p.name for p in images]}
    doc = {"machine": machine, "run": run, "results": [row_json(r) for r in results]}
    paths["json"].write_text(json.dumps(_finite(doc), indent=1, allow_nan=False) + "\n")
    paths["md"].write_text(markdown(results, machine, run, plots, images))
    return paths


def write_attachments(out: Path, results: list[Result]) -> list[Path]:
    """The files rows carry (a desktop's screenshot), written beside report.md."""
    written = []
    for result in results:
        for name, data in result.attachments.items():
            path = out / Path(name).name
            path.write_bytes(data)
            written.append(path)
    return written


def markdown(results: list[Result], machine: dict, run: dict, plots: list[Path],
             images: list[Path] = ()) -> str:
    lines = [
        "# icbd benchmark report",
        "",
        f"{run['size']} run started {run['started']}, took {duration(run['seconds'])}"
        + (" — **interrupted**: only the rows below were measured" if run.get("interrupted") else "") + ".",
        "",
        "| name | value | baseline | ratio | unit | target | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        target = "–" if r.target is None else f"{'≥' if r.higher_is_better else '≤'} {r.target:.3g}"
        lines.append(f"| `{r.name}` | {_number(r.value, r.unit)} | {_number(r.baseline, r.unit)} | "
                     f"{_number(r.ratio)} | {r.unit if r.unit != 'bytes' else ''} | {target} | "
                     f"{_cell(verdict(r))} |")
    lines += ["", "## Against the performance budget", ""]
    short = [r for r in results if r.meets_target is False]
    met = [r for r in results if r.meets_target is True]
    failed = [r for r in results if r.detail.get("status", "ok") != "ok"]
    if short:
        lines.append("icbd falls short of its budget here:")
        lines.append("")
        for r in short:
            lines.append(f"- **`{r.name}`**: ratio {r.ratio:.3g} where the budget is "
                         f"{'at least' if r.higher_is_better else 'at most'} {r.target:.3g} "
                         f"({BUDGETS.get(r.name, r.detail.get('budget', 'see bench/README.md'))}).")
    else:
        lines.append("No measured row falls short of its budget.")
    if met:
        lines += ["", "Within budget: " + ", ".join(f"`{r.name}`" for r in met) + "."]
    if failed:
        lines += ["", "Not measured (see the row's detail and bench.log): "
                  + ", ".join(f"`{r.name}` ({r.detail.get('status')})" for r in failed) + "."]
    lines += ["", "## What each row measures", ""]
    for r in results:
        what = r.detail.get("what") or r.detail.get("measured") or ""
        budget = BUDGETS.get(r.name)
        lines.append(f"- `{r.name}`: {what}" + (f" Budget: {budget}." if budget else ""))
    lines += ["", "## Details", ""]
    for r in results:
        lines.append(f"<details><summary><code>{r.name}</code></summary>")
        lines.append("")
        lines.append("```json")
        lines.append(json.dumps(_finite(r.detail), indent=1, allow_nan=False))
        lines.append("```")
        lines.append("</details>")
        lines.append("")
    if images:
        lines += ["## Screens", "", "What the booted desktop showed when its session came up:", ""]
        lines += [f"![{p.stem}]({p.name})" for p in images]
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({p.name})" for p in plots]
        lines.append("")
    lines += ["## Machine", "", "| | |", "|---|---|"]
    for key, value in machine.items():
        if key == "memory_bytes" and isinstance(value, int):
            value = f"{value / (1 << 30):.1f} GiB"
        lines.append(f"| {key} | {_cell(str(value))} |")
    lines += ["", "## Reproduce", "", "From the checkout, after `make setup`:", "", "```",
              f"{run['command']}", "```", "",
              "(`make bench` runs the full size; `--only NAMES` runs some of: "
              + ", ".join(f"`{b['name']}`" for b in run.get("benchmarks", [])) + ".)", "",
              "## Notes", ""]
    lines += [f"- {note}" for note in NOTES]
    accels = sorted({r.detail["accel"] for r in results if r.detail.get("accel")})
    if accels == ["tcg"]:
        lines.append("- Guests ran under qemu TCG (KVM did not boot a kernel here): a boot is CPU-bound, and "
                     "the mount, the cache server and the replica compete with qemu for the same cores.")
    elif accels:
        lines.append(f"- Guests ran under qemu with {', '.join(accels)}.")
    loads = [b["load_average_after"][0] for b in run.get("benchmarks", []) if b.get("load_average_after")]
    if loads:
        lines.append(f"- The 1-minute load average after each benchmark ranged from {min(loads):g} to "
                     f"{max(loads):g} on {machine.get('cores_usable')} cores.")
    load = machine.get("load_average_before"), machine.get("load_average_after")
    lines.append(f"- Load average (1, 5, 15 min) before the run {load[0]}, after it {load[1]}: other work on "
                 "the host during the run shows up as noise in every figure.")
    for b in run.get("benchmarks", []):
        if b.get("status") != "ok":
            lines.append(f"- `{b['name']}` {b['status']}: {b.get('error', '')}")
    return "\n".join(lines) + "\n"


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --- plots ------------------------------------------------------------------------------

def write_plots(out: Path, results: list[Result]) -> list[Path]:
    by_name = {r.name: r for r in results if math.isfinite(r.ratio)}
    written = [_plot_ratios(out / "ratios.png", results)]
    for plot in (_plot_boot, _plot_transfer, _plot_reads, _plot_storm, _plot_scale_egress, _plot_scale_sites,
                 _plot_scale_throughput):
        path = plot(out, by_name)
        if path is not None:
            written.append(path)
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_ratios(path: Path, results: list[Result]) -> Path:
    """Every measured row's ratio, with its budget; green within, red short, grey without."""
    rows = [r for r in results if math.isfinite(r.ratio) and r.ratio > 0]
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(len(rows), 2) + 1.2))
    if not rows:
        ax.text(0.5, 0.5, "no rows measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, path)
    names = [r.name for r in rows][::-1]
    ratios = [r.ratio for r in rows][::-1]
    colours = [{True: "tab:green", False: "tab:red", None: "tab:gray"}[r.meets_target] for r in rows][::-1]
    ax.barh(names, ratios, color=colours)
    for i, r in enumerate(rows[::-1]):
        if r.target is not None:
            ax.plot([r.target, r.target], [i - 0.4, i + 0.4], color="black", linewidth=2)
    ax.axvline(1.0, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("ratio = value / baseline (log scale); black tick: budget")
    ax.set_title("Every row against its baseline and budget")
    return _save(fig, path)


def _plot_boot(out: Path, rows: dict[str, Result]) -> Path | None:
    states = [("local disk", None), ("cold cache", "boot_cold"), ("cold + profile", "boot_cold_profile"),
              ("warm cache", "boot_warm")]
    present = [(label, rows.get(name)) for label, name in states if name is None or name in rows]
    measured = [r for _, r in present if r is not None]
    if not measured:
        return None
    local = measured[0].detail.get("local_seconds") or [measured[0].baseline]
    series = [(label, local if r is None else r.detail.get("seconds") or [r.value]) for label, r in present]
    storm = rows.get("boot_storm")
    if storm is not None and storm.detail.get("boot_seconds"):
        n = storm.detail.get("desktops")
        if storm.detail.get("local_storm_boot_seconds"):
            series.append((f"local, {n} at once", storm.detail["local_storm_boot_seconds"]))
        series.append((f"storm, {n} at once", storm.detail["boot_seconds"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, values) in enumerate(series):
        local = label.startswith("local")
        ax.bar(i, sorted(values)[len(values) // 2], color="tab:gray" if local else "tab:blue", alpha=0.7)
        ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(series)), [label for label, _ in series], rotation=15)
    ax.set_ylabel("seconds to power-off (bar: median, dots: runs)")
    ax.set_title("Desktop boot time by cache state")
    return _save(fig, out / "boot_by_cache_state.png")


def _plot_transfer(out: Path, rows: dict[str, Result]) -> Path | None:
    full = rows.get("full_transfer")
    if full is None:
        return None
    sizes = full.detail.get("by_size") or [{"image_bytes": full.detail.get("image_bytes", 0),
                                            "icbd_mb_s": full.value, "bare_pipe_mb_s": full.baseline}]
    labels = [_bytes(s["image_bytes"]) for s in sizes]
    x = range(len(sizes))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([i - 0.2 for i in x], [s["icbd_mb_s"] for s in sizes], width=0.4, label="icbd master → replica")
    ax.bar([i + 0.2 for i in x], [s["bare_pipe_mb_s"] for s in sizes], width=0.4,
           label="btrfs send | btrfs receive", color="tab:gray")
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("image size")
    ax.set_ylabel("MB/s (stream bytes / seconds)")
    ax.set_title("Full transfer throughput by image size")
    ax.legend()
    return _save(fig, out / "transfer_throughput.png")


def _plot_reads(out: Path, rows: dict[str, Result]) -> Path | None:
    names = [("cold\n(from replica)", "fuse_read_cold"), ("site cache\n(warm store)", "fuse_read_site_cache"),
             ("local cache", "fuse_read_local_cache"), ("second read\n(page cache)", "fuse_read_warm")]
    present = [(label, rows[name]) for label, name in names if name in rows and rows[name].unit == "MB/s"]
    if not present:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(present))
    ax.bar([i - 0.2 for i in x], [r.value for _, r in present], width=0.4, label="through the icbd mount")
    ax.bar([i + 0.2 for i in x], [r.baseline for _, r in present], width=0.4, color="tab:gray",
           label="baseline (local file)")
    ax.axhline(300, color="tab:red", linestyle="--", linewidth=1, label="budget with blocks in local cache")
    ax.set_xticks(list(x), [label for label, _ in present])
    ax.set_yscale("log")
    ax.set_ylabel("MB/s, 1 MiB sequential reads (log)")
    ax.set_title("FUSE read throughput")
    ax.legend(fontsize="small")
    return _save(fig, out / "read_throughput.png")


def _plot_storm(out: Path, rows: dict[str, Result]) -> Path | None:
    storms = [rows[n] for n in ("boot_storm", "boot_storm_readers") if n in rows]
    if not storms:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r.name}\nN = {r.detail.get('desktops') or r.detail.get('readers')}" for r in storms]
    x = range(len(storms))
    ax.bar([i - 0.2 for i in x], [r.value / MIB for r in storms], width=0.4, label="replica egress")
    ax.bar([i + 0.2 for i in x], [r.baseline / MIB for r in storms], width=0.4, color="tab:gray",
           label="boot working set")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("MiB")
    ax.set_title("Boot storm through one site cache")
    ax.legend()
    return _save(fig, out / "boot_storm_egress.png")


def _plot_scale_egress(out: Path, rows: dict[str, Result]) -> Path | None:
    """Master egress per publish over one stream: replicas straight to the
    master, and N replicas behind one nginx; replica egress with M cache
    servers behind one nginx, and straight to the replica."""
    master, replica = rows.get("scale_master_egress"), rows.get("scale_replica_egress")
    if master is None and replica is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if master is not None:
        sweep = master.detail.get("by_replicas_behind_nginx", {})
        labels = [f"{master.detail.get('sites_count')} direct"] + [f"{n} behind nginx" for n in sweep]
        values = [master.detail.get("direct_master_over_one_stream", 0)] + \
            [v["master_over_one_stream"] for v in sweep.values()]
        left.bar(range(len(values)), values, color=["tab:gray"] + ["tab:blue"] * len(sweep))
        left.axhline(1.05, color="tab:red", linestyle="--", linewidth=1, label="budget 1.05")
        left.set_xticks(range(len(values)), labels, rotation=15)
        left.set_ylabel("master stream bytes / one stream")
        left.set_title("Master egress per publish")
        left.legend(fontsize="small")
    if replica is not None:
        by = replica.detail.get("by_cache_servers", {})
        x = range(len(by))
        right.bar([i - 0.2 for i in x], [v["direct"]["over_working_set"] for v in by.values()], width=0.4,
                  color="tab:gray", label="straight to the replica")
        right.bar([i + 0.2 for i in x], [v["nginx"]["over_working_set"] for v in by.values()], width=0.4,
                  label="behind one nginx")
        right.axhline(1.05, color="tab:red", linestyle="--", linewidth=1, label="budget 1.05")
        right.set_xticks(list(x), [f"M = {m}" for m in by])
        right.set_ylabel("replica egress / boot working set")
        right.set_title("Replica egress, M cache servers")
        right.legend(fontsize="small")
    return _save(fig, out / "scale_egress.png")


def _plot_scale_sites(out: Path, rows: dict[str, Result]) -> Path | None:
    """Per site: publish-to-held seconds (direct, nginx) and storm latency p50/p99."""
    converge, storm = rows.get("scale_converge_seconds"), rows.get("scale_storm_p99_ms")
    if converge is None and storm is None:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7))
    if converge is not None:
        sites = converge.detail.get("sites", {})
        x = range(len(sites))
        labels = [f"{name}\n{v['rate_mbit']} Mbit/s" for name, v in sites.items()]
        top.bar([i - 0.27 for i in x], [v["seconds_direct"] for v in sites.values()], width=0.27,
                color="tab:gray", label="replicas straight to the master")
        top.bar(list(x), [v["seconds_nginx"] for v in sites.values()], width=0.27,
                label="replicas behind the shared nginx")
        top.bar([i + 0.27 for i in x], [v["link_seconds_for_one_stream"] for v in sites.values()], width=0.27,
                color="tab:green", alpha=0.6, label="link time of one delta stream")
        top.set_xticks(list(x), labels, fontsize="small")
        top.set_ylabel("seconds, publish to held")
        top.set_title("Time until each site holds the update")
        top.legend(fontsize="small")
    if storm is not None:
        sites = storm.detail.get("sites", {})
        x = range(len(sites))
        bottom.bar([i - 0.2 for i in x], [v["p50_ms"] for v in sites.values()], width=0.4, label="p50")
        bottom.bar([i + 0.2 for i in x], [v["p99_ms"] for v in sites.values()], width=0.4, color="tab:orange",
                   label="p99")
        bottom.axhline(storm.baseline, color="black", linestyle=":", linewidth=1,
                       label="one reader alone, warm cache (p99)")
        bottom.set_xticks(list(x), list(sites), fontsize="small")
        bottom.set_ylabel("block latency, ms")
        bottom.set_title(f"Boot storm at every site at once ({storm.detail.get('readers')} readers)")
        bottom.legend(fontsize="small")
    return _save(fig, out / "scale_sites.png")


def _plot_scale_throughput(out: Path, rows: dict[str, Result]) -> Path | None:
    present = [(label, rows[name]) for label, name in (("site cache server", "scale_cache_throughput"),
                                                       ("replica", "scale_replica_throughput")) if name in rows]
    if not present:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(present))
    ax.bar([i - 0.2 for i in x], [r.value for _, r in present], width=0.4, label="icbd (Python, one process)")
    ax.bar([i + 0.2 for i in x], [r.baseline for _, r in present], width=0.4, color="tab:gray",
           label="nginx serving the same blocks from its cache")
    ax.set_xticks(list(x), [label for label, _ in present])
    ax.set_ylabel("MB/s per core (bytes served / server CPU s)")
    ax.set_title("Serving warm 1 MiB blocks, per core")
    ax.legend(fontsize="small")
    return _save(fig, out / "scale_throughput.png")
