"""`icbd doctor`: one verdict per check, the fix where known, exit 1 on any
failure, `--json` as {"checks": [{"name", "ok", "detail"}]}; against a real
cluster for the checks that need one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
import trustme

from harness.cluster import Cluster
from icbd import doctor

REPO = Path(__file__).resolve().parent.parent


def run_doctor(*args: str, config: Path | None = None, env: dict | None = None) -> tuple[int, list[dict]]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ICBD_")}
    base.update({"PYTHONPATH": str(REPO), "ICBD_CONFIG": str(config) if config else "/dev/null", **(env or {})})
    result = subprocess.run([sys.executable, "-m", "icbd.cli", "--json", "doctor", *args], capture_output=True,
                            text=True, env=base, cwd=REPO, timeout=180)
    doc = json.loads(result.stdout)
    assert set(doc) == {"checks"}
    for check in doc["checks"]:
        assert set(check) == {"name", "ok", "detail"} and isinstance(check["ok"], bool) and check["detail"]
    return result.returncode, doc["checks"]


def by_name(checks: list[dict]) -> dict[str, dict]:
    return {c["name"]: c for c in checks}


def test_the_verdicts_and_the_exit_status(tmp_path):
    code, checks = run_doctor("--role", "admin")
    names = by_name(checks)
    assert code == 1 and names["master"]["ok"] is False and "fix: give master" in names["master"]["detail"]
    assert names["config"]["ok"] is True and names["roles"]["detail"].startswith("admin")
    text = subprocess.run([sys.executable, "-m", "icbd.cli", "doctor", "--role", "admin"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO), "ICBD_CONFIG": "/dev/null"},
                          timeout=120)
    assert text.returncode == 1 and "FAIL  master" in text.stdout and text.stdout.rstrip().endswith("1 failed")
    # A bad config file is a failed check, not a refusal to run.
    bad = tmp_path / "bad.toml"
    bad.write_text('[replica]\nsitee = "x"\n')
    code, checks = run_doctor("--role", "admin", config=bad)
    assert code == 1 and not by_name(checks)["config"]["ok"] and "unknown key 'sitee'" in by_name(checks)["config"][
        "detail"]


def test_the_clock_check_sees_skew():
    class Answer:
        headers = {"Date": "Mon, 01 Jan 2024 00:00:00 GMT"}

    now = datetime.now(UTC).timestamp()
    assert doctor._skew({"time": now + 0.2}, Answer(), now, now + 0.1).ok
    late = doctor._skew({"time": now + 60}, Answer(), now, now + 0.1)
    assert not late.ok and "behind the master's" in late.detail and "NTP" in late.detail
    assert not doctor._skew({}, Answer(), now, now).ok  # from the Date header: 2024 is long ago


def test_certificates_and_their_expiry(tmp_path):
    ca = trustme.CA()
    now = datetime.now(UTC)

    def issue(name: str, days: float) -> tuple[str, str]:
        leaf = ca.issue_cert("node.example.org", not_before=now - timedelta(days=30),
                             not_after=now + timedelta(days=days))
        cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        return str(cert), str(key)

    good = doctor.check_certificate("tls", *issue("good", 200))
    assert good.ok and ("valid for 200 more days" in good.detail or "valid for 199 more days" in good.detail)
    soon = doctor.check_certificate("tls", *issue("soon", 20))
    assert soon.ok and "renew it soon" in soon.detail
    ending = doctor.check_certificate("tls", *issue("ending", 3))
    assert not ending.ok and "expires in" in ending.detail and "fix: renew" in ending.detail
    expired = doctor.check_certificate("tls", *issue("expired", -2))
    assert not expired.ok and "expired" in expired.detail
    cert, _ = issue("one", 100)
    _, other_key = issue("two", 100)
    assert not doctor.check_certificate("tls", cert, other_key).ok
    assert not doctor.check_certificate("tls", cert, None).ok
    assert doctor.check_certificate("tls", None, None) is None


@pytest.mark.btrfs
def test_doctor_on_the_hosts_of_a_real_cluster(tmp_path):
    cluster = Cluster(tmp_path / "c")
    try:
        master = cluster.master()
        cluster.replica("r1", site="a")
        cache = cluster.cache("c1", site="a")
        node_token = tmp_path / "node.token"
        node_token.write_text(cluster.token("node"))
        reader_token = tmp_path / "reader.token"
        reader_token.write_text(cluster.token("reader"))

        # A cache server's host, as its config file says.
        conf = tmp_path / "cache.toml"
        conf.write_text(f'master = "{master.url}"\ntoken-file = "{node_token}"\n'
                        f'[cache]\ndata = "{tmp_path / "cache-data"}"\nlisten = "0.0.0.0:7402"\nsite = "a"\n')
        code, checks = run_doctor(config=conf)
        names = by_name(checks)
        assert code == 0, [c for c in checks if not c["ok"]]
        assert names["roles"]["detail"].startswith("cache")
        assert names["master"]["ok"] and "answers in" in names["master"]["detail"]
        assert names["clock"]["ok"] and "± " in names["clock"]["detail"]
        assert "has the node role (a cache needs node)" in names["token (cache)"]["detail"]
        assert names["disk (cache)"]["ok"] and "GiB free" in names["disk (cache)"]["detail"]
        assert names["reach replica r1"]["ok"]

        # A mount's host whose second cache server is not there, with a
        # reader token where a replica's node token should be.
        dead = "http://127.0.0.1:9"
        conf = tmp_path / "mount.toml"
        conf.write_text(f'master = "{master.url}"\ntoken-file = "{reader_token}"\n'
                        f'[mount]\ncache = ["{cache.url}", "{dead}"]\ncache-dir = "{tmp_path / "m"}"\n')
        code, checks = run_doctor("--role", "mount", "--role", "replica", config=conf)
        names = by_name(checks)
        assert code == 1
        assert names["fuse"]["ok"] and names["fusermount3"]["ok"] and names["btrfs"]["ok"]
        assert names[f"reach cache {cache.url}"]["ok"]
        assert not names[f"reach cache {dead}"]["ok"] and "cannot connect" in names[f"reach cache {dead}"]["detail"]
        assert names["token (mount)"]["ok"]
        assert not names["token (replica)"]["ok"] and "fix: icbd token create --role node" in names[
            "token (replica)"]["detail"]

        # A revoked token.
        cluster.icbd("token", "revoke", "harness-reader")
        code, checks = run_doctor("--role", "mount", config=conf)
        assert code == 1 and "unknown or revoked" in by_name(checks)["token (mount)"]["detail"]

        # An admin's host: every registered node answers, until one stops.
        cache.stop()
        admin = tmp_path / "admin.token"
        admin.write_text(cluster.env["ICBD_TOKEN"])
        conf = tmp_path / "admin.toml"
        conf.write_text(f'master = "{master.url}"\ntoken-file = "{admin}"\n')
        code, checks = run_doctor(config=conf)
        names = by_name(checks)
        assert code == 1 and names["reach replica r1"]["ok"] and not names["reach cache c1"]["ok"]
        assert requests.get(master.url + "/", timeout=10).json()["time"] > 0
    finally:
        cluster.stop_all()


def test_a_desktop_host_gets_a_verdict_on_qemu_and_kvm(tmp_path):
    """qemu is there (scripts/install-packages), and KVM gets a verdict: from
    a bounded probe of a kernel, the last probe on this boot of the host, or
    'not probed' when there is neither; never a hang (-enable-kvm may hang)."""
    code, checks = run_doctor("--role", "desktop", "--timeout", "2")
    names = by_name(checks)
    assert names["qemu"]["ok"] and names["qemu"]["detail"].startswith("QEMU emulator version")
    kvm = names["kvm"]
    assert "KVM boots a kernel" in kvm["detail"] or "KVM does not boot a kernel" in kvm["detail"] \
        or "not probed" in kvm["detail"] or "/dev/kvm is missing" in kvm["detail"], kvm
    assert code == (0 if all(c["ok"] for c in checks) else 1)
