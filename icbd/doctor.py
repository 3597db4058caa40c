"""`icbd doctor`: what is wrong with this host, for the roles it plays.

Roles come from --role (repeatable), else from the config file's tables
([master], [replica], [cache], [mount]), else `admin` (a host that runs
commands against the master). Each check gives one verdict, with the fix
where one is known; the command exits 1 if any check fails.

    role      checks
    all       the config file; the master answers (and its certificate, if
              https); the clock against the master's; the token's role
    master    btrfs in the kernel and btrfs-progs; loop devices when DATA is
    replica   not on btrfs; disk space of DATA; the TLS certificate and key
              of the node and their expiry; (replica) nothing else
    cache     disk space of DATA; TLS; the replicas of its site answer
    mount     /dev/fuse and fusermount3; the cache servers answer; disk
              space of --cache-dir
    desktop   a mount's checks, and qemu, and whether KVM boots a kernel
              (a bounded probe, icbd/boot.py: a broken KVM hangs, so the
              probe is killed after a few seconds)
    admin     every registered node answers

`--json` prints {"checks": [{"name", "ok", "detail"}, ...]}.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlsplit

import requests

from icbdcore.auth import ADMIN, NODE, READER, allows
from icbdcore.clients import Credentials, session, tls_failure
from icbdcore.errors import CliError
from icbdcore.wire import AUTH_ROUTE, NODES_ROUTE

from . import config

SKEW_LIMIT = 10.0  # seconds; catalogue ages and certificates are judged by this host's clock
CERT_WARN_DAYS = 30
CERT_FAIL_DAYS = 7
DISK_MIN_BYTES = 1 << 30
DISK_MIN_SHARE = 0.05
ROLES = ("master", "replica", "cache", "mount", "desktop", "admin")
TOKEN_ROLE = {"master": ADMIN, "replica": NODE, "cache": NODE, "mount": READER, "desktop": READER, "admin": ADMIN}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _ok(name: str, detail: str) -> Check:
    return Check(name, True, detail)


def _fail(name: str, detail: str, fix: str | None = None) -> Check:
    return Check(name, False, f"{detail}; fix: {fix}" if fix else detail)


# --- the host ---------------------------------------------------------------------------

def check_btrfs() -> list[Check]:
    checks = []
    try:
        known = "btrfs" in Path("/proc/filesystems").read_text().split()
    except OSError:
        known = False
    if known:
        checks.append(_ok("btrfs", "btrfs is in the kernel (/proc/filesystems)"))
    elif _modprobe_can("btrfs"):
        checks.append(_ok("btrfs", "btrfs is a module of this kernel; it loads on the first mount"))
    else:
        checks.append(_fail("btrfs", "this kernel has no btrfs", "install a kernel with btrfs (CONFIG_BTRFS_FS)"))
    missing = [tool for tool in ("btrfs", "mkfs.btrfs") if shutil.which(tool) is None]
    checks.append(_fail("btrfs-progs", f"{', '.join(missing)} not found", "apt-get install btrfs-progs")
                  if missing else _ok("btrfs-progs", "btrfs and mkfs.btrfs found"))
    return checks


def _modprobe_can(module: str) -> bool:
    tool = shutil.which("modprobe") or "/sbin/modprobe"
    try:
        return subprocess.run([tool, "-n", module], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def check_loop(data: str | None) -> Check | None:
    """Loop devices, when DATA is not on btrfs (the node then makes DATA/btrfs.img)."""
    if not data or _fs_type(data) == "btrfs":
        return None
    if os.path.exists("/dev/loop-control"):
        return _ok("loop devices", f"{data} is not on btrfs: the node loop-mounts DATA/btrfs.img "
                   "(/dev/loop-control is there)")
    return _fail("loop devices", f"{data} is not on btrfs and /dev/loop-control is missing",
                 "modprobe loop, or put DATA on a btrfs filesystem")


def _fs_type(path: str) -> str | None:
    """The type of the filesystem holding `path` (its nearest existing parent)."""
    target = _existing(path)
    best, fstype = "", None
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            point = fields[1].replace("\\040", " ")
            if (str(target) == point or str(target).startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                best, fstype = point, fields[2]
    except OSError:
        return None
    return fstype


def _existing(path: str) -> Path:
    target = Path(path).absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    return target


def check_fuse() -> list[Check]:
    checks = []
    try:
        st = os.stat("/dev/fuse")
        if not stat.S_ISCHR(st.st_mode):
            checks.append(_fail("fuse", "/dev/fuse is not a character device", "modprobe fuse"))
        else:
            fd = os.open("/dev/fuse", os.O_RDWR)
            os.close(fd)
            checks.append(_ok("fuse", "/dev/fuse opens for reading and writing"))
    except FileNotFoundError:
        checks.append(_fail("fuse", "/dev/fuse is missing", "modprobe fuse (a container needs --device /dev/fuse)"))
    except OSError as error:
        checks.append(_fail("fuse", f"/dev/fuse does not open: {error.strerror}", "run the mount as root"))
    tool = shutil.which("fusermount3")
    checks.append(_ok("fusermount3", tool) if tool else
                  _fail("fusermount3", "fusermount3 not found", "apt-get install fuse3"))
    return checks


def check_qemu(kernel: str | None) -> list[Check]:
    from . import boot

    checks = []
    qemu = shutil.which(boot.QEMU)
    if qemu is None:
        return [_fail("qemu", f"{boot.QEMU} not found", "apt-get install qemu-system-x86 qemu-utils")]
    try:
        version = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10).stdout
        checks.append(_ok("qemu", (version.splitlines() or [qemu])[0]))
    except (OSError, subprocess.TimeoutExpired) as error:
        checks.append(_fail("qemu", f"{qemu} --version failed: {error}"))
    checks.append(check_kvm(kernel))
    return checks


def check_kvm(kernel: str | None) -> Check:
    """Whether KVM boots a kernel: /dev/kvm alone proves nothing (on some
    hosts it opens, and every guest hangs), so a kernel is booted to its
    no-root panic under a bounded probe (icbd/boot.py), or the answer of an
    earlier probe on this boot of the host is taken."""
    import trio

    from . import boot

    if not os.path.exists("/dev/kvm"):
        return _fail("kvm", "/dev/kvm is missing: desktops boot under TCG, about 10 times slower",
                     "enable virtualisation in the firmware and modprobe kvm_intel (or kvm_amd)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return _fail("kvm", "/dev/kvm is there but this user cannot open it", "add the user to the kvm group")
    probe = Path(kernel) if kernel else _host_kernel()
    cached = boot._read_probe_cache(boot.KVM_PROBE_CACHE, boot._kvm_probe_key())
    if probe is None and cached is None:
        return _ok("kvm", "/dev/kvm is there; not probed: no kernel to boot (give --kernel FILE to check that "
                   "KVM boots one)")
    if probe is not None:
        works = trio.run(boot.probe_accel, "kvm", probe)
        boot._write_probe_cache(boot.KVM_PROBE_CACHE, boot._kvm_probe_key(), works)
        how = f"a bounded boot of {probe}"
    else:
        works, how = bool(cached), "the last probe on this boot of the host"
    if works:
        return _ok("kvm", f"KVM boots a kernel ({how})")
    return _fail("kvm", f"KVM does not boot a kernel within {boot.KVM_PROBE_TIMEOUT:g} s ({how}): "
                 "`icbd boot` falls back to TCG, about 10 times slower",
                 "check the host's virtualisation (nested KVM, firmware settings), or use --accel tcg")


def _host_kernel() -> Path | None:
    for candidate in (Path(f"/boot/vmlinuz-{os.uname().release}"), Path("/vmlinuz"), Path("/boot/vmlinuz")):
        if candidate.is_file() and os.access(candidate, os.R_OK):
            return candidate
    return None


def check_disk(name: str, path: str | None) -> Check | None:
    if not path:
        return None
    target = _existing(path)
    try:
        usage = shutil.disk_usage(target)
    except OSError as error:
        return _fail(name, f"cannot see the filesystem of {path}: {error.strerror}")
    free_gib = usage.free / (1 << 30)
    detail = f"{path}: {free_gib:.1f} GiB free of {usage.total / (1 << 30):.1f} GiB"
    if usage.free < DISK_MIN_BYTES or usage.free < DISK_MIN_SHARE * usage.total:
        return _fail(name, detail + " (below 1 GiB or 5%)", "free space there, or give the node a larger disk")
    return _ok(name, detail)


def check_certificate(name: str, cert: str | None, key: str | None) -> Check | None:
    """A node's TLS certificate file: readable, matching its key, not near its end."""
    if not cert and not key:
        return None
    if not cert or not key:
        return _fail(name, "tls-cert and tls-key go together", "give both, or neither for plain http")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as error:
        return _fail(name, f"{cert} / {key} are not a certificate chain and its key ({error.reason or error})",
                     "give the PEM chain and the key it was issued for")
    except OSError as error:
        return _fail(name, f"cannot read {cert} or {key}: {error.strerror or error}")
    from cryptography import x509

    with open(cert, "rb") as f:
        leaf = x509.load_pem_x509_certificate(f.read())
    return _expiry(name, leaf.not_valid_after_utc, f"{cert} ({leaf.subject.rfc4514_string()})")


def _expiry(name: str, not_after: datetime, what: str) -> Check:
    days = (not_after - datetime.now(UTC)).total_seconds() / 86400
    if days < 0:
        return _fail(name, f"{what} expired {-days:.0f} days ago", "renew the certificate and restart the node")
    if days < CERT_FAIL_DAYS:
        return _fail(name, f"{what} expires in {days:.1f} days", "renew the certificate now")
    soon = " (renew it soon)" if days < CERT_WARN_DAYS else ""
    return _ok(name, f"{what} valid for {days:.0f} more days{soon}")


def check_ca(ca: str | None) -> Check | None:
    if not ca:
        return None
    try:
        ssl.create_default_context(cafile=ca)
    except (ssl.SSLError, OSError) as error:
        return _fail("ca", f"{ca}: {getattr(error, 'strerror', None) or error}", "give a PEM file of CA certificates")
    return _ok("ca", f"{ca} holds CA certificates")


# --- the network -------------------------------------------------------------------------

class Calls:
    """Calls to nodes, with this host's CA and token."""

    def __init__(self, ca: str | None, token: str | None, timeout: float):
        self.ca = ca
        self.timeout = timeout
        self.open = session(Credentials(None, ca=ca))
        self.authed = session(Credentials(token, ca=ca))

    def get(self, url: str, *, authed: bool = False) -> tuple[requests.Response, float]:
        started = time.monotonic()
        response = (self.authed if authed else self.open).get(url, timeout=self.timeout)
        return response, time.monotonic() - started


def _why(error: Exception) -> str:
    tls = tls_failure(error)
    if tls:
        return tls
    if isinstance(error, requests.Timeout):
        return "no answer in time"
    if isinstance(error, requests.ConnectionError):
        return "cannot connect (is it running? a firewall?)"
    return f"{type(error).__name__}: {error}"


def check_master(calls: Calls, master: str) -> list[Check]:
    """The master answers `GET /`; the clock against its own; its certificate."""
    url = master.rstrip("/")
    before = time.time()
    try:
        response, seconds = calls.get(url + "/")
        response.raise_for_status()
        doc = response.json()
    except (requests.RequestException, ValueError) as error:
        fix = "check --ca / ICBD_CA" if tls_failure(error) else "check the master URL, and that the master runs"
        return [_fail("master", f"{url}: {_why(error)}", fix)]
    after = time.time()
    checks = [_ok("master", f"{url} answers in {seconds * 1000:.0f} ms (catalogue serial "
                  f"{doc.get('catalog_serial')}, {doc.get('nodes', '?')} nodes registered)")]
    checks.append(_skew(doc, response, before, after))
    if url.startswith("https://"):
        checks.append(_served_certificate(url, calls.ca))
    return checks


def _skew(doc: dict, response: requests.Response, before: float, after: float) -> Check:
    theirs = doc.get("time") if isinstance(doc, dict) else None
    resolution = 0.0
    if not isinstance(theirs, int | float):
        try:  # an older master: its Date header, to the second
            theirs = parsedate_to_datetime(response.headers["Date"]).timestamp()
            resolution = 1.0
        except (KeyError, TypeError, ValueError):
            return _fail("clock", "the master tells no time")
    skew = theirs - (before + after) / 2
    bound = (after - before) / 2 + resolution
    detail = f"this host's clock is {abs(skew):.2f} s {'behind' if skew > 0 else 'ahead of'} the master's " \
             f"(± {bound:.2f} s)"
    if abs(skew) - bound > SKEW_LIMIT:
        return _fail("clock", detail + f", more than {SKEW_LIMIT:g} s: catalogue ages and certificates are "
                     "judged by this clock", "keep time with NTP (timedatectl set-ntp true, or chrony)")
    return _ok("clock", detail)


def _served_certificate(url: str, ca: str | None) -> Check:
    parts = urlsplit(url)
    try:
        context = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
        with socket.create_connection((parts.hostname, parts.port or 443), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=parts.hostname) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as error:
        return _fail("master certificate", f"{url}: {tls_failure(error) or error}", "check --ca / ICBD_CA")
    from cryptography import x509

    leaf = x509.load_der_x509_certificate(der)
    return _expiry("master certificate", leaf.not_valid_after_utc, f"{url}'s certificate")


def check_token(calls: Calls, master: str, token: str | None, role: str, name: str = "token") -> Check:
    needed = TOKEN_ROLE[role]
    if not token:
        return _fail(name, f"no token (a {role} host needs a {needed} token)",
                     f"give token-file in the config file (`icbd token create --role {needed}` on an admin host)")
    try:
        response, _ = calls.get(master.rstrip("/") + AUTH_ROUTE, authed=True)
    except requests.RequestException as error:
        return _fail(name, f"cannot ask the master: {_why(error)}")
    if response.status_code == 401:
        return _fail(name, "the master does not know this token (unknown or revoked)",
                     f"issue a new one: icbd token create --role {needed}")
    if response.status_code != 200:
        return _fail(name, f"the master answered {response.status_code} to {AUTH_ROUTE}")
    doc = response.json()
    held = doc.get("role")
    detail = f"{doc.get('name')!r} has the {held} role"
    if held not in (READER, NODE, ADMIN) or not allows(held, needed):
        return _fail(name, f"{detail}; a {role} needs {needed}", f"icbd token create --role {needed}")
    return _ok(name, f"{detail} (a {role} needs {needed})")


def check_nodes(calls: Calls, master: str, which) -> list[Check]:
    """The registered nodes `which(node)` picks answer `GET /`."""
    try:
        response, _ = calls.get(master.rstrip("/") + NODES_ROUTE, authed=True)
        response.raise_for_status()
        nodes = [n for n in response.json()["nodes"] if n.get("role") != "master" and which(n)]
    except (requests.RequestException, ValueError, KeyError, TypeError) as error:
        return [_fail("nodes", f"cannot list the nodes: {_why(error) if isinstance(error, requests.RequestException) else error}")]
    return reach(calls, [(f"{n['role']} {n['id']}", n["url"]) for n in nodes]) or [
        _ok("nodes", "none registered for this check")]


def reach(calls: Calls, targets: list[tuple[str, str]]) -> list[Check]:
    def one(target: tuple[str, str]) -> Check:
        label, url = target
        try:
            response, seconds = calls.get(url.rstrip("/") + "/")
            response.raise_for_status()
        except requests.RequestException as error:
            return _fail(f"reach {label}", f"{url}: {_why(error)}")
        return _ok(f"reach {label}", f"{url} answers in {seconds * 1000:.0f} ms")

    if not targets:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(targets))) as pool:
        return list(pool.map(one, targets))


# --- putting it together ------------------------------------------------------------------

def roles_of(args) -> list[str]:
    if args.role:
        return list(dict.fromkeys(args.role))
    found = args.config_file
    roles = [r for r in ("master", "replica", "cache", "mount") if (r,) in found.settings]
    return roles or ["admin"]


def settings(args, command: str) -> dict:
    """The effective settings of `command` (from its table, the global keys, the environment)."""
    rows = config.effective(args.config_parser, (command,), args.config_file, args.config_original)
    return {row["key"]: row["value"] for row in rows}


def _token_from(setting: dict, fallback: str | None) -> str | None:
    path = setting.get("token-file")
    if path and not os.environ.get("ICBD_TOKEN"):
        try:
            return Path(path).read_text().strip() or None
        except OSError:
            return None
    return fallback


def run_checks(args) -> list[Check]:
    roles = roles_of(args)
    checks: list[Check] = []
    found = args.config_file
    if args.config_error:
        checks.append(_fail("config", args.config_error, "correct the file: nothing starts with it as it is"))
    elif found.loaded:
        tables = sorted(".".join(p) for p in found.settings if p)
        checks.append(_ok("config", f"{found.path}: good ({'tables ' + ', '.join(tables) if tables else 'global keys only'})"))
    else:
        checks.append(_ok("config", f"no config file at {found.path} (the command line gives every setting)"))
    checks.append(_ok("roles", ", ".join(roles) + (" (from --role)" if args.role else " (from the config file)"
                                                   if roles != ["admin"] else " (no role in the config file)")))
    if {"master", "replica"} & set(roles):
        checks += check_btrfs()
    if {"mount", "desktop"} & set(roles):
        checks += check_fuse()
    if "desktop" in roles:
        checks += check_qemu(args.kernel)
    ca_check = check_ca(args.ca)
    if ca_check:
        checks.append(ca_check)
    calls = Calls(args.ca, args.token, args.timeout)
    master = args.master
    if master:
        checks += check_master(calls, master)
    else:
        checks.append(_fail("master", "no master URL", "give master in the config file (or --master, ICBD_MASTER)"))
    for role in roles:
        setting = settings(args, role) if role in ("master", "replica", "cache", "mount") else {}
        if role in ("master", "replica", "cache"):
            checks.append(check_loop(setting.get("data")) if role != "cache" else None)
            checks.append(check_disk(f"disk ({role})", setting.get("data") or None))
            checks.append(check_certificate(f"tls ({role})", setting.get("tls-cert"), setting.get("tls-key")))
        if master:
            checks.append(check_token(calls, master, _token_from(setting, args.token), role, f"token ({role})"))
        if role == "mount":
            caches = setting.get("cache") or []
            checks.append(check_disk("disk (mount)", setting.get("cache-dir") or "/var/cache/icbd/mount"))
            checks += reach(calls, [(f"cache {url}", url) for url in caches]) or [
                _fail("caches", "no cache server in [mount] cache", "list the site's cache servers there")]
        if role == "cache" and master and setting.get("site"):
            site = setting["site"]
            checks += check_nodes(calls, master, lambda n, site=site: n.get("role") == "replica" and n.get("site") == site)
        if role == "admin" and master:
            checks += check_nodes(calls, master, lambda n: True)
    return [c for c in checks if c is not None]


def main(args) -> int:
    try:
        checks = run_checks(args)
    except KeyboardInterrupt:
        raise
    except Exception as error:  # a check that breaks is a failed check, not a traceback
        raise CliError(f"doctor could not finish: {type(error).__name__}: {error}") from None
    failed = [c for c in checks if not c.ok]
    if args.json:
        json.dump({"checks": [asdict(c) for c in checks]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}")
        print(f"\n{len(checks) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0
