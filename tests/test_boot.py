"""`icbd boot`: real qemu (TCG) booting the sample desktop from a mount-shaped folder.

Until these tests run over the FUSE mount, a plain folder laid out like one
stands in for it: ROOT/demo/1, ROOT/demo/2 (another label) and
ROOT/demo/latest -> 2. Each boot takes 3-5 s, so boots are shared where a
test can check several things at once.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import trio
from sample_desktop import build_or_skip

from icbd import boot as icbd_boot
from icbd.boot import BootResult, Screen, boot, boot_async, load_spec
from icbdcore.errors import CliError

REPO = Path(__file__).resolve().parents[1]
# The icbd command of the Python running the tests (its venv's console script).
ICBD = [str(Path(sys.executable).parent / "icbd")] if (Path(sys.executable).parent / "icbd").exists() \
    else [sys.executable, "-m", "icbd.cli"]
FILLER = 4 << 20


@pytest.fixture(scope="module")
def mount(tmp_path_factory):
    """ROOT/demo/{1,2}, latest -> 2; version 2 carries 4 MiB of filler the boot reads."""
    root = tmp_path_factory.mktemp("mount")
    build_or_skip(root / "demo" / "1", label="1")
    build_or_skip(root / "demo" / "2", label="2", filler_bytes=FILLER)
    (root / "demo" / "latest").symlink_to("2")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _remove_tmp_path(tmp_path):
    """Overlays and copies go away with the test, not with pytest's old runs."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def append_line(mount: Path, version: int, extra: str) -> str:
    config = tomllib.loads((mount / "demo" / str(version) / "icbd-boot.toml").read_text())
    return f"{config['append']} {extra}"


def qemu_pids_using(path: Path) -> list[int]:
    """Processes whose command line mentions `path` (our unique temp folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(path).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def assert_powered_off(result: BootResult, label: str) -> None:
    assert result.returncode == 0, (result.message, result.console_text[-2000:])
    assert result.outcome == "poweroff"
    assert f"icbd-desktop: up, release {label}\n" in result.console_text


# ---- what to boot (no qemu) -------------------------------------------------

def write_imi(root: Path, version: int, toml: str | None, files=("vmlinuz",)) -> Path:
    folder = root / "bad" / str(version)
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(b"x")
    if toml is not None:
        (folder / "icbd-boot.toml").write_text(toml)
    return folder


@pytest.mark.parametrize("toml, message", [
    (None, "no icbd-boot.toml"),
    ('kernel = "vmlinuz"\nappend = ', "not valid TOML"),
    ('kernal = "vmlinuz"', "unknown key 'kernal'"),
    ("kernel = 3", "must be a string"),
    ('kernel = "/boot/vmlinuz"', "must stay inside the iMI"),
    ('kernel = "../../etc/passwd"', "must stay inside the iMI"),
    ('kernel = "escape"', "leads out of the iMI"),
    ('kernel = "missing"', "is not a file"),
    ('kernel = "vmlinuz"\nmemory = "lots"', "not a size"),
])
def test_bad_boot_config_is_a_cli_error(tmp_path, toml, message):
    folder = write_imi(tmp_path, 1, toml)
    (folder / "escape").symlink_to("/etc/hostname")
    with pytest.raises(CliError, match=message):
        load_spec(tmp_path, "bad", 1)
    # The same through the API a benchmark calls: refused before qemu starts.
    with pytest.raises(CliError, match=message):
        boot(tmp_path, "bad", 1, accel="tcg")


@pytest.mark.parametrize("target", ["outside", "../2/icbd-boot.toml"])
def test_a_boot_config_that_leads_out_of_the_imi_is_not_read(tmp_path, target):
    """icbd-boot.toml as a symlink out of the version (to a file of the host,
    or of another version) is refused, not read; one within it is read."""
    outside = tmp_path / "outside"
    outside.write_text('kernel = "vmlinuz"\nappend = "console=ttyS0 init=/bin/sh"\n')
    write_imi(tmp_path, 2, 'kernel = "vmlinuz"\nappend = "from version 2"\n')
    folder = write_imi(tmp_path, 1, None)
    (folder / "icbd-boot.toml").symlink_to(outside if target == "outside" else target)
    with pytest.raises(CliError, match="leads out of the iMI"):
        load_spec(tmp_path, "bad", 1)
    (folder / "icbd-boot.toml").unlink()
    (folder / "boot.toml").write_text('kernel = "vmlinuz"\nappend = "inside"\n')
    (folder / "icbd-boot.toml").symlink_to("boot.toml")
    assert load_spec(tmp_path, "bad", 1).append == "inside"


def test_flags_override_the_config(tmp_path):
    write_imi(tmp_path, 1, 'kernel = "vmlinuz"\nappend = "console=ttyS0"\nmemory = "256M"',
              files=("vmlinuz", "other"))
    spec = load_spec(tmp_path, "bad", 1, {"kernel": "other", "append": "quiet", "memory": None})
    assert spec.kernel == (tmp_path / "bad" / "1" / "other").resolve()
    assert (spec.append, spec.memory, spec.initrd, spec.disk) == ("quiet", "256M", None, None)
    with pytest.raises(CliError, match="must stay inside"):
        load_spec(tmp_path, "bad", 1, {"disk": "../1/other"})


def test_names_and_versions_are_checked(mount, tmp_path):
    for name, version, message in [
        ("Demo", None, "invalid iMI name"),
        ("../demo", None, "invalid iMI name"),
        ("demo", 0, "invalid version"),
        ("demo", 9, "no version 9 of 'demo'"),
        ("nosuch", None, "no iMI 'nosuch'"),
    ]:
        with pytest.raises(CliError, match=message):
            load_spec(mount, name, version)
    with pytest.raises(CliError, match="is not a folder"):
        load_spec(tmp_path / "not-mounted", "demo")
    (tmp_path / "demo" / "1").mkdir(parents=True)
    with pytest.raises(CliError, match="no 'latest' link"):
        load_spec(tmp_path, "demo")
    with pytest.raises(CliError, match="give NAME or NAME@VERSION"):
        icbd_boot.parse_target("demo@latest")
    assert icbd_boot.parse_target("demo@1") == ("demo", 1)
    assert load_spec(mount, "demo").version == 2


# ---- booting ----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.qemu
def test_latest_and_pinned_versions_boot_their_release(mount, tmp_path, monkeypatch):
    backing = {v: sha256(mount / "demo" / str(v) / "rootfs.img") for v in (1, 2)}
    # The default overlay lives in a temporary folder that must be gone afterwards.
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))

    latest = boot(mount, "demo", accel="tcg", timeout=120)
    assert_powered_off(latest, "2")
    assert latest.version == 2
    # Version 2 has 6 files of its own plus the 4 MiB of filler (1 part).
    assert "icbd-desktop: read 6 files" in latest.console_text
    assert list(tmp_path.iterdir()) == []

    # Version 1, with the guest writing over its root disk: the writes land in
    # the desktop's overlay (kept here), never in the shared image.
    overlays = tmp_path / "overlays"
    pinned = boot(mount, "demo", 1, accel="tcg", timeout=120, overlay_dir=overlays,
                  overrides={"append": append_line(mount, 1, "icbd.scribble")})
    assert_powered_off(pinned, "1")
    assert "scribbled 1 MiB on /dev/vda" in pinned.console_text
    (overlay,) = overlays.iterdir()
    assert overlay.name.startswith("demo@1-") and overlay.suffix == ".qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(overlay)],
                                     capture_output=True, check=True).stdout)
    assert info["backing-filename"] == str((mount / "demo" / "1" / "rootfs.img").resolve())
    assert info["actual-size"] >= 1 << 20

    assert {v: sha256(mount / "demo" / str(v) / "rootfs.img") for v in (1, 2)} == backing


@pytest.mark.slow
@pytest.mark.qemu
async def test_two_desktops_boot_at_once_with_their_own_overlays(mount, tmp_path):
    backing = sha256(mount / "demo" / "2" / "rootfs.img")
    results: dict[str, BootResult] = {}
    spans = {}

    async def desktop(key, version):
        started = time.monotonic()
        results[key] = await boot_async(mount, "demo", version, accel="tcg", timeout=180,
                                        overlay_dir=tmp_path)
        spans[key] = (started, time.monotonic())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(desktop, "a", None)
        nursery.start_soon(desktop, "b", 2)

    for result in results.values():
        assert_powered_off(result, "2")
    overlays = sorted(tmp_path.iterdir())
    assert len(overlays) == 2 and all(p.name.startswith("demo@2-") for p in overlays)
    (a0, a1), (b0, b1) = spans["a"], spans["b"]
    assert a0 < b1 and b0 < a1  # they really ran side by side
    assert sha256(mount / "demo" / "2" / "rootfs.img") == backing


@pytest.mark.slow
@pytest.mark.qemu
async def test_panic_and_reboot_are_told_from_a_power_off(mount, tmp_path):
    results = {}

    async def run(key, append):
        results[key] = await boot_async(mount, "demo", 1, accel="tcg", timeout=120,
                                        overlay_dir=tmp_path, overrides={"append": append})

    async with trio.open_nursery() as nursery:
        # A panic late in the boot, reported by pvpanic.
        nursery.start_soon(run, "panic", append_line(mount, 1, "icbd.panic"))
        # /init that exits at once: the kernel panics before pvpanic is loaded
        # and resets; qemu's exit status alone would call this a success.
        nursery.start_soon(run, "reset", append_line(mount, 1, "rdinit=/bin/mount"))

    panic, reset = results["panic"], results["reset"]
    assert (panic.returncode, panic.outcome) == (1, "panic"), panic.message
    assert "panicking on request" in panic.console_text
    assert (reset.returncode, reset.outcome) == (1, "reset"), reset.message
    assert "icbd-desktop: up" not in reset.console_text


@pytest.mark.slow
@pytest.mark.qemu
def test_timeout_stops_qemu(mount, tmp_path):
    result = boot(mount, "demo", accel="tcg", timeout=1.0, overlay_dir=tmp_path)
    assert result.returncode != 0 and result.outcome == "timeout"
    assert "still running after 1 s" in result.message
    assert result.seconds < 1.0 + icbd_boot.REAP_TIMEOUT + 1
    assert qemu_pids_using(tmp_path) == []


@pytest.mark.slow
@pytest.mark.qemu
def test_qemu_failure_is_reported(mount, tmp_path):
    result = boot(mount, "demo", accel="tcg", timeout=30, overlay_dir=tmp_path,
                  qemu_args=["-no-such-option"])
    assert (result.returncode, result.outcome) == (1, "qemu-failed")
    assert "no-such-option" in result.message


@pytest.mark.slow
@pytest.mark.qemu
async def test_the_kernel_probe_is_bounded(mount, tmp_path):
    kernel = mount / "demo" / "1" / "boot" / "vmlinuz"
    # The probe's yes: TCG boots the kernel to its no-root panic (about 3 s here).
    assert await icbd_boot.probe_accel("tcg", kernel, timeout=60)
    # auto never hangs, even where KVM does; its answer is remembered.
    cache = tmp_path / "kvm-probe.json"
    started = time.monotonic()
    accel = await icbd_boot.choose_accel("auto", kernel, cache)
    assert accel in ("kvm", "tcg")
    assert time.monotonic() - started < icbd_boot.KVM_PROBE_TIMEOUT + icbd_boot.REAP_TIMEOUT + 5
    if cache.exists():
        assert json.loads(cache.read_text())["kvm"] == (accel == "kvm")
        assert await icbd_boot.choose_accel("auto", kernel, cache) == accel


@pytest.mark.slow
@pytest.mark.qemu
def test_stop_when_ready_reads_block_stats_and_saves_the_screen(mount, tmp_path):
    shot = tmp_path / "screen.png"
    # icbd.stay: the small desktop would otherwise power off right after its
    # session line, racing the screenshot.
    result = boot(mount, "demo", 2, accel="tcg", timeout=120, overlay_dir=tmp_path / "ov",
                  overrides={"append": append_line(mount, 2, "icbd.stay")}, screen=Screen(screenshot=shot))
    assert (result.returncode, result.outcome) == (0, "ready"), result.message
    assert result.screenshot == shot and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "icbd-desktop: session up, release 2" in result.console_text
    assert "powering off" not in result.console_text  # stopped at its session line
    assert 0 < result.ready_seconds <= result.seconds
    # The guest read its whole root fs, filler included, through the disk.
    assert result.disk_read_bytes >= FILLER and result.disk_read_ops > 0


def test_a_guest_that_powers_off_without_its_session_is_not_ready():
    run = icbd_boot._Run(console=None)
    run.events.append({"event": "SHUTDOWN", "data": {"reason": "guest-shutdown"}})
    outcome, message = icbd_boot._outcome(run, 0, False, 60, Screen(screenshot=Path("x.png")))
    assert outcome == "not-ready" and icbd_boot.READY_LINE in message
    assert icbd_boot._outcome(run, 0, False, 60, Screen())[0] == "poweroff"


def test_display_is_checked_and_given_to_qemu(mount):
    spec = load_spec(mount, "demo", 1)
    argv = icbd_boot.qemu_command(spec, None, "tcg", 3, display="vnc=127.0.0.1:7")
    assert argv[argv.index("-display") + 1] == "vnc=127.0.0.1:7" and "-vga" in argv
    for bad in ("vnc", "x11; rm", "vnc=:1 -S"):
        with pytest.raises(CliError, match="display"):
            Screen(display=bad)


# ---- the command line -------------------------------------------------------

def icbd(*args, env=None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([*ICBD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=env, **kwargs)


@pytest.mark.slow
@pytest.mark.qemu
def test_cli_exit_codes(mount, tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    ok = icbd("boot", "demo@1", "--mount", str(mount), "--accel", "tcg", env=env)
    out, err = ok.communicate(timeout=120)
    assert ok.returncode == 0, err
    assert "icbd-desktop: up, release 1\n" in out
    assert list(tmp_path.iterdir()) == []  # the temporary overlay is gone

    missing = icbd("boot", "demo@9", "--mount", str(mount))
    out, err = missing.communicate(timeout=30)
    assert missing.returncode == 1
    assert err.startswith("icbd: no version 9 of 'demo'") and err.count("\n") == 1

    late = icbd("boot", "demo", "--mount", str(mount), "--accel", "tcg", "--timeout", "1",
                "--overlay", str(tmp_path / "kept"))
    out, err = late.communicate(timeout=30)
    assert late.returncode == 124 and "still running after 1 s" in err
    assert qemu_pids_using(tmp_path) == []
    assert len(list((tmp_path / "kept").iterdir())) == 1  # --overlay keeps it


@pytest.mark.slow
@pytest.mark.qemu
def test_cli_screenshot_and_display(mount, tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    shot = tmp_path / "shot.png"
    ok = icbd("boot", "demo@1", "--mount", str(mount), "--accel", "tcg", "--screenshot", str(shot),
              "--display", "vnc=127.0.0.1:0,to=99", "--append", append_line(mount, 1, "icbd.stay"), env=env)
    out, err = ok.communicate(timeout=120)
    assert ok.returncode == 0, err
    assert "icbd-desktop: session up, release 1\n" in out
    assert "session up after" in err and f"screenshot saved to {shot}" in err
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["shot.png"]  # no overlay left behind

    missing = icbd("boot", "demo", "--mount", str(mount), "--screenshot", str(tmp_path / "no" / "x.png"))
    out, err = missing.communicate(timeout=30)
    assert missing.returncode == 1 and "no folder" in err


@pytest.mark.slow
@pytest.mark.qemu
def test_cli_sigterm_stops_qemu_and_cleans_up(mount, tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    process = icbd("boot", "demo", "--mount", str(mount), "--accel", "tcg", env=env)
    try:
        deadline = time.monotonic() + 30
        while not qemu_pids_using(mount / "demo" / "2" / "boot") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM
    assert "stopped the desktop on SIGTERM" in err
    assert qemu_pids_using(mount / "demo" / "2" / "boot") == []
    assert list(tmp_path.iterdir()) == []
