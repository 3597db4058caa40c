"""`icbd bench`: every benchmark in turn, each against a baseline measured in
the same run, then report.json, report.md and plots in the out folder.

    icbd bench [--quick] [--out DIR] [--only NAMES]

Each benchmark gets its own scratch folder (under /var/tmp, or
$ICBD_BENCH_SCRATCH) and its own nodes, which are stopped, unmounted and
removed as soon as it ends, so that one benchmark's disk and processes do
not weigh on the next. A benchmark that fails leaves rows saying why and the
suite goes on; Ctrl-C or SIGTERM stops it, cleans up and still writes the
rows measured so far.

The suite measures and never asserts: a row short of its budget is reported
as such, not raised. The exit status is non-zero only when a benchmark could
not run to its end.

Sizes: `full` (the default), `quick` (--quick, about 10 minutes on 2 cores)
and `tiny`, for the tests only (ICBD_BENCH_SIZE=tiny or `main(args,
size="tiny")`): images of a few MiB, one repetition, a minute or two.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from icbdcore.errors import CliError
from icbdcore.mounts import mounts_under

from .context import BenchContext
from .results import Result

log = logging.getLogger(__name__)

SIZES = ("tiny", "quick", "full")
SCRATCH_PARENT = Path(os.environ.get("ICBD_BENCH_SCRATCH", "/var/tmp"))


@dataclass(frozen=True)
class Benchmark:
    name: str
    target: str  # "module:function", imported when the benchmark runs
    rows: tuple[str, ...]  # the rows it reports (for the error rows if it fails)
    minutes: float  # rough duration in quick mode, for the progress bar
    # "module:Exception" that means the machine cannot run it (not a failure of icbd)
    unavailable_on: str | None = None


BENCHMARKS = (
    Benchmark("full_transfer", "bench.transfer:full_transfer", ("full_transfer",), 1.5),
    Benchmark("delta_transfer", "bench.transfer:delta_transfer",
              ("delta_transfer", "delta_vs_rsync_seconds"), 1.0),
    Benchmark("fanout", "bench.transfer:fanout", ("fanout",), 1.0),
    Benchmark("delta_rewritten", "bench.rewritten:delta_rewritten",
              ("delta_rewritten", "delta_rewritten_publish"), 1.5),
    Benchmark("delta_desktop_rebuild", "bench.rewritten:delta_desktop_rebuild", ("delta_desktop_rebuild",), 2.0),
    Benchmark("chunking", "bench.chunking:chunking", ("chunking_ext4_image", "chunking_tar", "chunking_cpio_gz"), 0.5),
    Benchmark("publish_small_change", "bench.transfer:publish_small_change", ("publish_small_change",), 0.7),
    # Network namespaces and tbf qdiscs: reported as not available where
    # this machine cannot make them.
    Benchmark("delta_over_link", "bench.wan:delta_over_link", ("delta_over_link",), 0.5,
              unavailable_on="harness.netns:NetworkError"),
    Benchmark("fanout_over_links", "bench.wan:fanout_over_links", ("fanout_over_links",), 0.7,
              unavailable_on="harness.netns:NetworkError"),
    Benchmark("fuse_read", "bench.readpath:fuse_read",
              ("fuse_read_cold", "fuse_read_warm", "fuse_read_local_cache", "fuse_read_site_cache"), 1.5),
    Benchmark("failover", "bench.failover:failover", ("failover_read_gap_ms", "failover_two_caches_mb_s"), 1.5),
    Benchmark("metrics", "bench.metrics:metrics_cost",
              ("metrics_cold_read", "metrics_warm_read", "metrics_size_100_nodes"), 2.0),
    Benchmark("tls", "bench.tls:tls_cost", ("tls_transfer", "tls_cold_read"), 1.5),
    Benchmark("trees", "bench.trees:trees",
              ("tree_walk_cold", "tree_walk_warm", "tree_read_cold", "tree_read_site_cache", "tree_read_warm"),
              3.0),
    Benchmark("boot", "bench.booting:boot_times", ("boot_cold", "boot_cold_profile", "boot_warm"), 3.0),
    Benchmark("boot_storm", "bench.booting:boot_storm",
              ("boot_storm", "boot_storm_readers", "boot_storm_seconds"), 2.0),
    # K sites in network namespaces behind tbf links, a shared nginx: not
    # available without namespaces or without nginx (scripts/install-packages).
    Benchmark("scale", "bench.scale:scale",
              ("scale_master_egress", "scale_converge_seconds", "scale_storm_p99_ms", "scale_replica_egress",
               "scale_cache_throughput", "scale_replica_throughput", "scale_cpu_seconds_per_gb"), 8.0,
              unavailable_on="harness.netns:NetworkError"),
    # The Debian desktop (the small one in the tests' tiny size): 18 boots of
    # 30-60 s under TCG, the replays, and 8 desktops at once.
    Benchmark("desktop", "bench.desktop:desktop",
              ("desktop_boot_cold", "desktop_boot_profile", "desktop_boot_warm", "desktop_read_amplification",
               "desktop_profile_coverage", "desktop_replay_cold", "desktop_replay_profile",
               "desktop_replay_warm", "desktop_storm_egress"), 25.0),
)


class NotAvailable(Exception):
    """A benchmark cannot run on this machine or in this checkout; not a failure of icbd."""


class SuiteContext(BenchContext):
    """BenchContext with a third, hidden size for the tests."""

    def __init__(self, scratch: Path, size: str, say: Callable[[str], None]):
        super().__init__(scratch, quick=size != "full", say=say)
        self.size = size

    @property
    def tiny(self) -> bool:
        return self.size == "tiny"

    def pick(self, *, quick, full, tiny=None):
        if self.size == "tiny" and tiny is not None:
            return tiny
        return super().pick(quick=quick, full=full)


@dataclass
class Outcome:
    """What one benchmark left: its rows, and how it ended."""

    benchmark: str
    results: list[Result]
    status: str  # ok | error | not available | interrupted
    seconds: float
    error: str = ""
    load_average_after: list[float] = field(default_factory=list)  # what else ran on the host

    def to_json(self) -> dict:
        return {"name": self.benchmark, "status": self.status, "seconds": round(self.seconds, 1),
                "rows": [r.name for r in self.results], "load_average_after": self.load_average_after,
                **({"error": self.error} if self.error else {})}


# --- choosing ---------------------------------------------------------------------------

def select(only: str | None) -> list[Benchmark]:
    """The benchmarks named (by benchmark or by row name), in suite order."""
    if not only:
        return list(BENCHMARKS)
    wanted = {name.strip() for name in only.split(",") if name.strip()}
    chosen = [b for b in BENCHMARKS if b.name in wanted or wanted & set(b.rows)]
    known = {b.name for b in BENCHMARKS} | {row for b in BENCHMARKS for row in b.rows}
    unknown = sorted(wanted - known)
    if unknown:
        raise CliError(f"no benchmark named {', '.join(unknown)}: choose from "
                       f"{', '.join(b.name for b in BENCHMARKS)}")
    return chosen


# --- running ----------------------------------------------------------------------------

class Progress:
    """A bar over the suite on a terminal, one line per finished benchmark
    otherwise; steps go to the log.

    The bar's length is each benchmark's rough duration; within a benchmark it
    moves with the clock (up to 95% of its share) and shows the current step,
    refreshed every second from a ticker thread."""

    SCALE = {"tiny": 0.3, "quick": 1.0, "full": 4.0}

    def __init__(self, benchmarks: list[Benchmark], interactive: bool, size: str = "quick"):
        self.interactive = interactive
        self.scale = self.SCALE.get(size, 1.0)
        self.bar = tqdm(total=sum(self._share(b) for b in benchmarks), disable=not interactive,
                        bar_format="{l_bar}{bar}| {elapsed} elapsed{postfix}", dynamic_ncols=True)
        self.current: Benchmark | None = None
        self.started = 0.0
        self.finished = 0.0  # the bar's position when the current benchmark began
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if interactive:
            threading.Thread(target=self._tick, name="bench-progress", daemon=True).start()

    def _share(self, benchmark: Benchmark) -> float:
        return round(benchmark.minutes * 60 * self.scale, 1)

    def start(self, benchmark: Benchmark) -> None:
        with self._lock:
            self.current, self.started, self.finished = benchmark, time.monotonic(), self.bar.n
            self.bar.set_description(benchmark.name, refresh=True)

    def step(self, message: str) -> None:
        log.info("%s: %s", self.current.name if self.current else "suite", message)
        with self._lock:
            self.bar.set_postfix_str(message[:60], refresh=False)
            self._advance()

    def done(self, benchmark: Benchmark, line: str) -> None:
        with self._lock:
            self.bar.update(self.finished + self._share(benchmark) - self.bar.n)
            self.current = None
        if self.interactive:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self.bar.close()

    def _advance(self) -> None:
        if self.current is not None:
            elapsed = min(time.monotonic() - self.started, 0.95 * self._share(self.current))
            self.bar.update(max(0.0, self.finished + elapsed - self.bar.n))
        self.bar.refresh()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                if not self.bar.disable:
                    self._advance()


def run_one(benchmark: Benchmark, scratch: Path, size: str, progress: Progress) -> Outcome:
    """Run one benchmark in its own scratch folder; never raises but for Ctrl-C."""
    results: list[Result] = []
    started = time.perf_counter()
    ctx = SuiteContext(scratch / benchmark.name, size, progress.step)
    ctx.scratch.mkdir(parents=True, exist_ok=True)
    status, error = "ok", ""
    try:
        for result in _load(benchmark)(ctx):
            results.append(result)
            log.info("%s: %s", benchmark.name, result.to_json())
    except NotAvailable as why:
        status, error = "not available", str(why)
        log.warning("%s not available: %s", benchmark.name, why)
    except KeyboardInterrupt:
        status, error = "interrupted", "interrupted (Ctrl-C or SIGTERM)"
        raise
    except Exception as failure:
        if _is_unavailable(benchmark, failure):
            status, error = "not available", f"cannot set it up here: {failure}"
            log.warning("%s not available: %s", benchmark.name, failure)
        else:
            status, error = "error", f"{type(failure).__name__}: {failure}"
            log.exception("%s failed", benchmark.name)
    finally:
        progress.step("cleaning up")
        try:
            ctx.close()
        except Exception:  # teardown must not hide the result
            log.exception("%s: cleanup failed", benchmark.name)
        if status != "ok":
            results += missing_rows(benchmark, results, status, error)
        _outcomes.append(Outcome(benchmark.name, results, status, time.perf_counter() - started, error,
                                 _load_average()))
    return _outcomes[-1]


_outcomes: list[Outcome] = []  # what run_one finished, kept across an interrupt


def _load(benchmark: Benchmark) -> Callable[[BenchContext], Iterable[Result]]:
    module_name, function_name = benchmark.target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        raise NotAvailable(f"{module_name.replace('.', '/')}.py is not in this checkout") from None
    function = getattr(module, function_name, None)
    if function is None:
        raise NotAvailable(f"{module_name} has no {function_name}()")
    return function


def _is_unavailable(benchmark: Benchmark, failure: Exception) -> bool:
    if benchmark.unavailable_on is None:
        return False
    module_name, class_name = benchmark.unavailable_on.split(":")
    module = sys.modules.get(module_name)
    kind = getattr(module, class_name, None) if module else None
    return isinstance(kind, type) and isinstance(failure, kind)


def missing_rows(benchmark: Benchmark, results: list[Result], status: str, error: str) -> list[Result]:
    """A row for each expected row the benchmark did not deliver, saying why."""
    have = {r.name for r in results}
    key = "error" if status == "error" else ("not_available" if status == "not available" else status)
    return [Result(name, math.nan, math.nan, "", detail={"status": status, key: error})
            for name in benchmark.rows if name not in have]


def summary_line(outcome: Outcome, index: int, count: int) -> str:
    head = f"[{index}/{count}] {outcome.benchmark} ({outcome.seconds:.0f} s)"
    if outcome.status != "ok":
        return f"{head}: {outcome.status}: {outcome.error}"
    parts = []
    for r in outcome.results:
        verdict = {True: "meets budget", False: "SHORT of budget", None: "no budget"}[r.meets_target]
        parts.append(f"{r.name} {r.ratio:.3g}x ({verdict})")
    return f"{head}: " + "; ".join(parts)


# --- the command ------------------------------------------------------------------------

def main(args, size: str | None = None) -> int:
    """`icbd bench`: run the suite, write the report; 0 unless a benchmark failed to run."""
    size = size or getattr(args, "size", None) or os.environ.get("ICBD_BENCH_SIZE") or (
        "quick" if args.quick else "full")
    if size not in SIZES:
        raise CliError(f"unknown benchmark size {size!r}: use one of {', '.join(SIZES)}")
    benchmarks = select(getattr(args, "only", None))
    if os.geteuid() != 0:
        raise CliError("icbd bench mounts btrfs and FUSE and drops the page cache: run it as root")
    out = Path(args.out).absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CliError(f"cannot create {out}: {error.strerror}") from None
    # matplotlib is slow to import: only when the suite runs.
    from .report import duration, machine_info, write_report

    handler = _log_to(out / "bench.log")
    scratch = Path(tempfile.mkdtemp(prefix="icbd-bench-", dir=SCRATCH_PARENT))
    interactive = sys.stdout.isatty()
    progress = Progress(benchmarks, interactive, size)
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    _outcomes.clear()
    started = time.time()
    machine = machine_info(scratch)
    interrupted = False
    log.info("icbd bench: size %s, benchmarks %s, scratch %s, out %s", size,
             [b.name for b in benchmarks], scratch, out)
    try:
        for index, benchmark in enumerate(benchmarks, 1):
            progress.start(benchmark)
            outcome = run_one(benchmark, scratch, size, progress)
            progress.done(benchmark, summary_line(outcome, index, len(benchmarks)))
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: cleaning up and writing what was measured")
    finally:
        progress.close()
        signal.signal(signal.SIGTERM, previous_sigterm)
        _remove_scratch(scratch)
        machine["load_average_after"] = _load_average()
        meta = {
            "size": size, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "seconds": round(time.time() - started, 1), "interrupted": interrupted,
            "command": reproduce_command(size, args), "benchmarks": [o.to_json() for o in _outcomes],
        }
        results = [r for o in _outcomes for r in o.results]
        paths = write_report(out, results, machine, meta)
        logging.getLogger().removeHandler(handler)
        handler.close()
    print(f"report: {paths['md']} ({len(results)} rows, {duration(meta['seconds'])})")
    short = [r.name for r in results if r.meets_target is False]
    if short:
        print(f"short of budget: {', '.join(short)}")
    if interrupted:
        raise KeyboardInterrupt
    failed = [o.benchmark for o in _outcomes if o.status == "error"]
    if failed:
        print(f"icbd: benchmarks that could not run: {', '.join(failed)} (see {out / 'bench.log'})",
              file=sys.stderr)
        return 1
    return 0


def reproduce_command(size: str, args) -> str:
    env = "ICBD_BENCH_SIZE=tiny " if size == "tiny" else ""
    quick = " --quick" if size == "quick" else ""
    only = f" --only {args.only}" if getattr(args, "only", None) else ""
    return f"sudo {env}.venv/bin/icbd bench{quick}{only} --out {args.out}"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _log_to(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    for noisy in ("urllib3", "httpx", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _remove_scratch(scratch: Path) -> None:
    """Remove the scratch area, unmounting first whatever a failed teardown
    left mounted under it (so rmtree never walks into a mount)."""
    for mountpoint in sorted(mounts_under(scratch), key=len, reverse=True):
        log.warning("still mounted after teardown: %s; unmounting it lazily", mountpoint)
        if shutil.which("fusermount3"):
            subprocess.run(["fusermount3", "-uz", mountpoint], capture_output=True)
        subprocess.run(["umount", "-l", mountpoint], capture_output=True)
    if mounts_under(scratch):
        log.error("cannot unmount everything under %s: leaving it in place", scratch)
        return
    shutil.rmtree(scratch, ignore_errors=True)
