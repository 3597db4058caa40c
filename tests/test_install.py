"""`make install` and `make uninstall`, for real, in a temporary prefix (the
installed icbd runs from there) and staged in a DESTDIR (what a package
build does). pip fetches the dependencies from the package index (its cache
makes it quick after the first time). As any user; slow."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNITS = ("icbd-master.service", "icbd-replica@.service", "icbd-cache@.service", "icbd-mount@.service")

pytestmark = pytest.mark.slow


def make(target: str, **variables: str) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("needs make")
    argv = ["make", "-C", str(REPO), target, *(f"{k}={v}" for k, v in variables.items())]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900,
                            env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS")})
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def test_install_in_a_prefix_runs_and_uninstall_removes_it(tmp_path):
    root = tmp_path / "root"
    where = {"PREFIX": str(root / "usr"), "SBINDIR": str(root / "sbin"), "SYSCONFDIR": str(root / "etc")}
    make("install", **where)
    usr = root / "usr"
    icbd = usr / "bin" / "icbd"
    helper = root / "sbin" / "mount.fuse.icbd"
    env = {**os.environ, "ICBD_CONFIG": "/dev/null"}
    env.pop("PYTHONPATH", None)  # the installed package, not this checkout
    version = subprocess.run([str(icbd), "--version"], capture_output=True, text=True, env=env, check=True)
    assert version.stdout.startswith("icbd ")
    # mount(8)'s helper translates and, with -f (fake), stops there.
    fake = subprocess.run([str(helper), "https://cache:7402", "/imis", "-f", "-v", "-o", "ro,_netdev,site=paris"],
                          capture_output=True, text=True, env=env)
    assert fake.returncode == 0 and "mount /imis --cache https://cache:7402 --site paris" in fake.stderr, fake
    for unit in UNITS:
        text = (usr / "lib" / "systemd" / "system" / unit).read_text()
        assert f"ExecStart={icbd} --config {root / 'etc'}/icbd/" in text and "@" not in text.split("ExecStart=")[1][:40]
    # The units as installed pass systemd's own check, man page included.
    if shutil.which("systemd-analyze"):
        units = [str(usr / "lib/systemd/system" / u.replace("@.", "@icbd.")) for u in UNITS]
        for unit, installed in zip(UNITS, units, strict=True):
            if unit != Path(installed).name:
                shutil.copy(usr / "lib/systemd/system" / unit, installed)
        verify = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True,
                                env={**env, "MANPATH": f"{usr / 'share/man'}:"}, timeout=120)
        assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
        for installed, unit in zip(units, UNITS, strict=True):
            if unit != Path(installed).name:
                os.unlink(installed)
    sample = (root / "etc/icbd/icbd.toml.sample").read_text()
    assert (root / "etc/icbd/icbd.toml").read_text() == sample and "#[replica]" in sample
    assert (usr / "share/man/man1/icbd.1").read_text().startswith(".\\\" DO NOT MODIFY")
    assert "_shtab_icbd" in (usr / "share/bash-completion/completions/icbd").read_text()
    assert (usr / "share/doc/icbd/grafana-icbd.json").exists()
    assert (usr / "share/doc/icbd/examples/imis.automount").exists()

    # An edited config file is the admin's: uninstall keeps it; all the rest goes.
    (root / "etc/icbd/icbd.toml").write_text('[mount]\ncache = ["https://c1:7402"]\n')
    make("uninstall", **where)
    assert files_under(root) == ["etc/icbd/icbd.toml"]
    # Untouched, it goes too.
    (root / "etc/icbd/icbd.toml").unlink()
    make("install", **where)
    make("uninstall", **where)
    assert files_under(root) == []


def test_install_staged_in_destdir_names_the_final_paths(tmp_path):
    stage = tmp_path / "stage"
    make("install", DESTDIR=str(stage), PREFIX="/usr/local")
    lib = stage / "usr/local/lib/icbd"
    for script in (lib / "bin" / "icbd", lib / "bin" / "mount.fuse.icbd"):
        first = script.read_text().splitlines()[0]
        assert first.startswith("#!/usr/local/lib/icbd/bin/python"), first
    for script in (lib / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            assert str(stage) not in script.read_text(errors="replace"), script
    assert os.readlink(stage / "usr/local/bin/icbd") == "/usr/local/lib/icbd/bin/icbd"
    assert os.readlink(stage / "sbin/mount.fuse.icbd") == "/usr/local/lib/icbd/bin/mount.fuse.icbd"
    unit = (stage / "usr/local/lib/systemd/system/icbd-master.service").read_text()
    assert "ExecStart=/usr/local/bin/icbd --config /etc/icbd/icbd.toml master" in unit
    assert (stage / "etc/icbd/icbd.toml.sample").exists()
    make("uninstall", DESTDIR=str(stage), PREFIX="/usr/local")
    assert files_under(stage) == []
