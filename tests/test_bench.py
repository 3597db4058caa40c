"""The benchmark suite keeps working: `icbd bench` in its tiny size runs every
benchmark end to end and writes a well-formed report. No performance number
is asserted: the suite measures, it does not judge here.

A benchmark may report "not available" only where this machine lacks what it
needs: each such row is checked against a probe of that need, made here and
now (network namespaces with tbf for bench.wan, the sample desktop image and
qemu for bench.booting). Everything else must run.

The tiny run needs root (nodes on btrfs, FUSE mounts); the suite's own
behaviour (error rows, interrupts, sizes, choosing) is tested without nodes,
as any user."""

import functools
import json
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

import pytest

from bench import suite
from bench.results import Result
from icbdcore.errors import CliError
from icbdcore.mounts import is_mountpoint, mounts_under

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROW_KEYS = {"name", "value", "baseline", "ratio", "unit", "detail"}


@pytest.fixture(scope="module")
def tiny_run():
    """One tiny run of the whole suite, through the command line."""
    # Scratch on /var/tmp like the real runs; its own parent, to see it emptied.
    parent = Path(tempfile.mkdtemp(prefix="icbd-bench-test-", dir="/var/tmp"))
    out = parent / "out"
    scratch = parent / "scratch"
    scratch.mkdir()
    env = {**os.environ, "ICBD_BENCH_SIZE": "tiny", "ICBD_BENCH_SCRATCH": str(scratch)}
    env.pop("ICBD_MASTER", None)
    try:
        result = subprocess.run([sys.executable, "-m", "icbd.cli", "bench", "--out", str(out)],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        left = sorted(p.name for p in scratch.iterdir())
        mounted = mounts_under(scratch)
        yield out, result, left, mounted
    finally:
        for point in mounts_under(parent):  # only if the suite failed to clean up
            subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(parent, ignore_errors=True)


# --- what this machine can run ---------------------------------------------------------


def _run(argv: list[str]) -> str | None:
    """None if the command succeeds, else what it said."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{' '.join(argv)}: {error}"
    if result.returncode != 0:
        return f"{' '.join(argv)}: {result.stderr.strip() or f'exit status {result.returncode}'}"
    return None


@functools.cache
def netns_with_tbf() -> str | None:
    """Why this machine cannot make a network namespace joined by a veth pair
    shaped with tbf on both ends (what bench.wan's links are), or None if it
    can. Made with ip and tc directly, not harness.netns (which is under test),
    and removed again."""
    tag = "icbdp" + secrets.token_hex(3)
    ns, outer, inner = tag, tag + "a", tag + "b"
    tbf = ["root", "tbf", "rate", "100mbit", "burst", "65536", "latency", "50ms"]
    try:
        for argv in (
            ["ip", "netns", "add", ns],
            ["ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns],
            ["ip", "link", "set", outer, "up"],
            ["ip", "-n", ns, "link", "set", inner, "up"],
            ["tc", "qdisc", "add", "dev", outer, *tbf],
            ["tc", "-n", ns, "qdisc", "add", "dev", inner, *tbf],
        ):
            why = _run(argv)
            if why:
                return why
        return None
    finally:
        subprocess.run(["ip", "link", "del", outer], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@functools.cache
def desktop_image() -> str | None:
    """Why the sample desktop image (bench/images/desktop.py) cannot be built here, or None."""
    from bench.images.desktop import ImageBuildError, build_desktop_tree

    with tempfile.TemporaryDirectory(prefix="icbd-bench-probe-") as folder:
        try:
            build_desktop_tree(Path(folder) / "desktop", label="probe")
        except (ImageBuildError, OSError) as error:
            return f"cannot build the sample desktop: {error}"
    return None


def qemu() -> str | None:
    return None if shutil.which("qemu-system-x86_64") else "qemu-system-x86_64 is not installed"


def nginx() -> str | None:
    return None if os.path.exists("/usr/sbin/nginx") else "nginx is not installed"


# What each benchmark module needs beyond root, btrfs and FUSE (which the tiny
# run has): the reasons it may be "not available" (bench/suite.py: NotAvailable
# and Benchmark.unavailable_on).
PROBES = {
    "bench.wan": (netns_with_tbf,),
    "bench.booting": (desktop_image, qemu),
    "bench.scale": (netns_with_tbf, nginx),
    "bench.desktop": (desktop_image, qemu),  # the tiny size boots the small desktop
}


def why_not_here(benchmark: suite.Benchmark) -> list[str]:
    """What this machine lacks for `benchmark` (empty: it can run here)."""
    module = benchmark.target.split(":")[0]
    return [why for probe in PROBES.get(module, ()) if (why := probe())]


def unjustified_unavailable(rows: list[dict]) -> list[str]:
    """The rows that say "not available" though this machine has what their benchmark needs."""
    benchmark_of = {name: b for b in suite.BENCHMARKS for name in b.rows}
    return [f"{row['name']} says not available ({row['detail'].get('not_available')}), "
            f"but this machine has what {benchmark_of[row['name']].target} needs"
            for row in rows if row["status"] == "not available" and not why_not_here(benchmark_of[row["name"]])]


def test_every_benchmark_that_may_be_unavailable_has_a_probe():
    for benchmark in suite.BENCHMARKS:
        if benchmark.unavailable_on is not None:
            assert benchmark.target.split(":")[0] in PROBES, \
                f"{benchmark.name} may be not available ({benchmark.unavailable_on}): probe for it in PROBES"
    for module in PROBES:
        assert any(b.target.startswith(module + ":") for b in suite.BENCHMARKS), f"no benchmark in {module}"


def test_not_available_is_accepted_only_where_a_probe_fails(monkeypatch):
    """The check the tiny run makes of its rows, on made-up rows."""
    lacking = {"netns": None, "qemu": None}
    monkeypatch.setattr(sys.modules[__name__], "PROBES", {
        "bench.wan": (lambda: lacking["netns"],),
        "bench.booting": (lambda: None, lambda: lacking["qemu"]),
    })

    def row(name: str, status: str = "not available") -> dict:
        return {"name": name, "status": status, "detail": {"not_available": "cannot set it up here"}}

    rows = [row("fuse_read_cold"), row("delta_over_link"), row("boot_cold"), row("fanout", "ok")]
    assert [m.split()[0] for m in unjustified_unavailable(rows)] == ["fuse_read_cold", "delta_over_link", "boot_cold"]
    lacking.update(netns="ip netns add: Operation not permitted", qemu="qemu-system-x86_64 is not installed")
    assert [m.split()[0] for m in unjustified_unavailable(rows)] == ["fuse_read_cold"]
    assert unjustified_unavailable([row("fanout", "ok"), row("boot_storm")]) == []


@pytest.mark.slow
@pytest.mark.btrfs
@pytest.mark.fuse
def test_tiny_run_writes_a_well_formed_report(tiny_run):
    out, result, left, mounted = tiny_run
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\n" \
        f"log:\n{(out / 'bench.log').read_text()[-4000:] if (out / 'bench.log').exists() else ''}"
    assert left == [] and mounted == [], "the suite left its scratch area behind"

    doc = json.loads((out / "report.json").read_text())
    assert {"machine", "results"} <= set(doc)
    machine = doc["machine"]
    for key in ("cpu", "cores", "memory_bytes", "kernel", "python", "btrfs_progs", "qemu"):
        assert key in machine, key
    rows = doc["results"]
    names = [row["name"] for row in rows]
    expected = [name for b in suite.BENCHMARKS for name in b.rows]
    assert set(expected) <= set(names), set(expected) - set(names)
    for row in rows:
        assert set(row) >= ROW_KEYS, row
        assert isinstance(row["detail"], dict)
        # Every benchmark ran, or says plainly why it could not here.
        assert row["status"] in ("ok", "not available"), row
        if row["status"] != "ok":
            assert row["value"] is None and row["ratio"] is None
            assert row["detail"]["not_available"]
            continue
        assert isinstance(row["value"], int | float) and isinstance(row["baseline"], int | float)
        assert row["baseline"] != 0, row
        assert math.isclose(row["ratio"], row["value"] / row["baseline"], rel_tol=1e-3, abs_tol=1e-4), row
        assert row["unit"]
        if row["meets_target"] is not None:
            assert isinstance(row["target"], int | float)

    # ... and "not available" only where this machine really lacks something it needs.
    unjustified = unjustified_unavailable(rows)
    assert not unjustified, "\n".join(unjustified)

    report = (out / "report.md").read_text()
    assert "| name | value | baseline | ratio | unit | target | verdict |" in report
    for name in names:
        assert f"| `{name}` |" in report, name
    assert "## Machine" in report and "## Reproduce" in report
    assert "ICBD_BENCH_SIZE=tiny" in report

    plots = doc["run"]["plots"]
    assert "ratios.png" in plots
    for name in plots:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, name
    assert (out / "bench.log").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.btrfs
@pytest.mark.fuse
def test_tiny_run_is_quiet_without_a_terminal(tiny_run):
    out, result, _, _ = tiny_run
    # No progress bar when stdout is not a terminal: one line per benchmark, then the report.
    assert "\r" not in result.stdout
    lines = result.stdout.strip().splitlines()
    assert len(lines) >= len(suite.BENCHMARKS) + 1
    assert lines[-1].startswith("report: ") or lines[-2].startswith("report: ")


# --- the suite's own behaviour, without nodes ----------------------------------------------

def _fine(ctx):
    ctx.step("measuring nothing")
    yield Result("fine_row", 2.0, 4.0, "s", detail={"what": "half"}, target=1.0)


def _broken(ctx):
    yield Result("broken_first", 1.0, 1.0, "s")
    raise RuntimeError("the product fell over")


def _short(ctx):
    yield Result("slow_row", 3.0, 1.0, "s", target=1.3)


def _interrupted(ctx):
    raise KeyboardInterrupt


def _fake_suite(monkeypatch, tmp_path, *benchmarks):
    # The suite refuses to start without root (its real benchmarks need it);
    # these fake ones need nothing.
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(suite, "BENCHMARKS", tuple(benchmarks))
    monkeypatch.setattr(suite, "SCRATCH_PARENT", tmp_path / "scratch")
    (tmp_path / "scratch").mkdir()
    return Namespace(quick=True, out=str(tmp_path / "out"), only=None)


def test_a_failing_benchmark_leaves_an_error_row_and_the_suite_goes_on(monkeypatch, tmp_path, capsys):
    args = _fake_suite(
        monkeypatch, tmp_path,
        suite.Benchmark("broken", "test_bench:_broken", ("broken_first", "broken_second"), 0.01),
        suite.Benchmark("missing", "bench.no_such_module:run", ("missing_row",), 0.01),
        suite.Benchmark("fine", "test_bench:_fine", ("fine_row",), 0.01),
    )
    assert suite.main(args) == 1
    rows = {r["name"]: r for r in json.loads((tmp_path / "out" / "report.json").read_text())["results"]}
    assert list(rows) == ["broken_first", "broken_second", "missing_row", "fine_row"]
    assert rows["broken_first"]["status"] == "ok" and rows["broken_first"]["ratio"] == 1.0
    assert rows["broken_second"]["status"] == "error"
    assert "the product fell over" in rows["broken_second"]["detail"]["error"]
    assert rows["broken_second"]["value"] is None and rows["broken_second"]["ratio"] is None
    assert rows["missing_row"]["status"] == "not available"
    assert rows["fine_row"]["ratio"] == 0.5 and rows["fine_row"]["meets_target"] is True
    report = (tmp_path / "out" / "report.md").read_text()
    assert "error: RuntimeError: the product fell over" in report
    assert list((tmp_path / "scratch").iterdir()) == []
    assert "benchmarks that could not run: broken" in capsys.readouterr().err


def test_short_of_budget_is_said_plainly(monkeypatch, tmp_path):
    args = _fake_suite(monkeypatch, tmp_path, suite.Benchmark("short", "test_bench:_short", ("slow_row",), 0.01))
    assert suite.main(args) == 0  # measured, not asserted
    report = (tmp_path / "out" / "report.md").read_text()
    assert "**short of budget** (needs ≤ 1.3)" in report
    assert "icbd falls short of its budget here" in report


def test_an_interrupt_still_cleans_up_and_writes_what_was_measured(monkeypatch, tmp_path):
    args = _fake_suite(
        monkeypatch, tmp_path,
        suite.Benchmark("fine", "test_bench:_fine", ("fine_row",), 0.01),
        suite.Benchmark("stop", "test_bench:_interrupted", ("stop_row",), 0.01),
        suite.Benchmark("never", "test_bench:_fine", ("never_row",), 0.01),
    )
    with pytest.raises(KeyboardInterrupt):
        suite.main(args)
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["run"]["interrupted"] is True
    assert [r["name"] for r in doc["results"]] == ["fine_row", "stop_row"]
    assert doc["results"][1]["status"] == "interrupted"
    assert list((tmp_path / "scratch").iterdir()) == []
    assert not is_mountpoint(tmp_path / "scratch")


def test_the_suite_refuses_to_start_without_root(monkeypatch, tmp_path):
    args = _fake_suite(monkeypatch, tmp_path, suite.Benchmark("fine", "test_bench:_fine", ("fine_row",), 0.01))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(CliError, match="run it as root"):
        suite.main(args)
    assert not (tmp_path / "out").exists()
    assert list((tmp_path / "scratch").iterdir()) == []


def test_only_picks_benchmarks_by_their_name_or_a_row_name():
    assert [b.name for b in suite.select("boot_cold,fanout")] == ["fanout", "boot"]
    assert [b.name for b in suite.select(None)] == [b.name for b in suite.BENCHMARKS]
    with pytest.raises(suite.CliError, match="no benchmark named nonsense"):
        suite.select("fanout,nonsense")


def test_tiny_is_a_third_size_that_falls_back_to_quick(tmp_path):
    ctx = suite.SuiteContext(tmp_path, "tiny", print)
    assert ctx.pick(quick=2, full=3, tiny=1) == 1
    assert ctx.pick(quick=2, full=3) == 2
    assert suite.SuiteContext(tmp_path, "full", print).pick(quick=2, full=3, tiny=1) == 3
