"""The benchmark suite keeps working: `icbd bench` in its tiny size runs every
benchmark end to end and writes a well-formed report. No performance number
is asserted: the suite measures, it does not judge here."""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

import pytest

from bench import suite
from bench.cluster import is_mountpoint
from bench.results import Result

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROW_KEYS = {"name", "value", "baseline", "ratio", "unit", "detail"}


def _mounts_under(folder: Path) -> list[str]:
    prefix = os.path.realpath(folder) + "/"
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


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
        result = subprocess.run([sys.executable, "-m", "icbdfs.cli", "bench", "--out", str(out)],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        left = sorted(p.name for p in scratch.iterdir())
        mounted = _mounts_under(scratch)
        yield out, result, left, mounted
    finally:
        for point in _mounts_under(parent):  # only if the suite failed to clean up
            subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.slow
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
