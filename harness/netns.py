"""Sites as network namespaces, for tests and benchmarks: hosts on their own
addresses, WAN links that can be cut and healed, and links shaped to a rate.

    with sites("central", "a") as net:
        master = cluster.master(host=net["central"].ip, start=False)
        net["central"].adopt(master).start()
        ...
        with net.partition("a", "central"):
            ...                      # a and central cannot reach each other
        net.shape("a", 100_000_000)  # a's link at 100 Mbit/s, both ways

Topology: a star. Each site is a namespace joined to the root namespace (the
test's own, the hub) by a veth pair on a /30 of its own: 10.N.I.1 in the
root, 10.N.I.2 (the site's host, `Site.ip`) on `eth0` in the site, with `lo`
up. The root forwards between the site links only (per-interface
`forwarding`; the host's global ip_forward and its other interfaces are left
alone), and a site routes only the lab's 10.N.0.0/16 to the root, so nothing
leaves for the outside. The root namespace reaches every site directly: it is
the test's console, on both sides of any partition.

A cut is a pair of policy rules in the root, `ip rule add iif <a's link> to
<b's /30> blackhole` and the reverse. Forwarded packets between the two sites
are then dropped silently in the middle, as when a WAN link fails somewhere
between two routers: both hosts keep their addresses and routes, new
connections wait for a SYN-ACK that never comes (connect timeouts), and open
ones stall on retransmissions (read timeouts) instead of being reset. That is
the behaviour a real partition gives and the one that tests timeouts.
The alternatives give something else: `ip link set down` removes the site's
route, so its sockets fail at once with ENETUNREACH; `prohibit`/`unreachable`
answer with ICMP, so connects fail at once; `tc` drop actions need the
`act_gact` module, which this kernel does not have.

Shaping puts a `tbf` qdisc on both ends of a site's link (root side: into the
site; site side: out of it). `close()` (or leaving the `with`) heals every
cut, and deletes the rules, the veth pairs and the namespaces whatever
happened.

Namespaced processes should enter only the network namespace
(`Site.command`: `nsenter --net=...`). `ip netns exec` also gives the process
a mount namespace of its own, so what it mounts (a node's loop-mounted btrfs,
a FUSE mount) is invisible to the test.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import re
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
RULE_PRIORITY = 1000  # before the main table (32766)


class NetworkError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run("ip", *args, check=check)


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NetworkError(f"{' '.join(argv)}: {result.stderr.strip() or f'exit {result.returncode}'}")
    return result


def _sysctl(key: str, value: str, netns: str | None = None) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    if netns is None:
        Path(path).write_text(value)
    else:
        _run("nsenter", f"--net={NETNS_DIR / netns}", "sh", "-c", f"echo {value} > {path}")


@dataclass
class Site:
    """One site: a network namespace with one host address."""

    name: str
    netns: str  # the namespace's name (ip netns)
    ip: str  # the site's host address, on eth0
    gateway: str  # the root's end of the link
    prefix: str  # the link's /30
    root_if: str  # the link's interface in the root namespace
    inner_if: str = "eth0"

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside this site's network namespace (and nothing else)."""
        return ["nsenter", f"--net={NETNS_DIR / self.netns}", "--", *argv]

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), **kwargs)

    def adopt(self, node):
        """Make a not yet started harness.cluster Node (or MountProcess) run in
        this site: its command is prefixed with `command()`. Give the node
        `host=site.ip` when creating it so it listens on the site's address."""
        assert node.process is None, "adopt a node before starting it"
        node.argv = self.command(list(node.argv))
        return node


@dataclass
class LinkCounters:
    """Bytes and packets on a site's link, counted at the root's end."""

    received: int  # by the site (root -> site)
    sent: int  # by the site (site -> root)
    received_packets: int
    sent_packets: int

    def __sub__(self, other: LinkCounters) -> LinkCounters:
        return LinkCounters(self.received - other.received, self.sent - other.sent,
                            self.received_packets - other.received_packets,
                            self.sent_packets - other.sent_packets)


class SiteNetwork:
    """Sites joined through the root namespace. Use `sites(...)`, which closes it."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)  # in every name, so parallel runs do not collide
        self.lab = _free_lab()
        self.sites: dict[str, Site] = {}
        self._cuts: set[tuple[str, str]] = set()

    def __getitem__(self, name: str) -> Site:
        return self.sites[name]

    # --- building ------------------------------------------------------------

    def add(self, name: str) -> Site:
        index = len(self.sites) + 1
        if index > 63:
            raise NetworkError("at most 63 sites")
        net = ipaddress.ip_network(f"{self.lab.network_address + 4 * index}/30")
        gateway, host = (str(a) for a in net.hosts())
        site = Site(name, f"icbd-{self.tag}-{index}", host, gateway, str(net), f"ic{self.tag}-{index}")
        peer = f"ip{self.tag}-{index}"
        self.sites[name] = site  # from here on close() removes whatever exists
        _ip("netns", "add", site.netns)
        _ip("link", "add", site.root_if, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", site.netns)
        _ip("-n", site.netns, "link", "set", peer, "name", site.inner_if)
        _sysctl(f"net.ipv6.conf.{site.root_if}.disable_ipv6", "1")
        _sysctl(f"net.ipv6.conf.{site.inner_if}.disable_ipv6", "1", site.netns)
        _ip("addr", "add", f"{gateway}/30", "dev", site.root_if)
        _ip("link", "set", site.root_if, "up")
        _sysctl(f"net.ipv4.conf.{site.root_if}.forwarding", "1")
        _ip("-n", site.netns, "link", "set", "lo", "up")
        _ip("-n", site.netns, "addr", "add", f"{host}/30", "dev", site.inner_if)
        _ip("-n", site.netns, "link", "set", site.inner_if, "up")
        _ip("-n", site.netns, "route", "add", str(self.lab), "via", gateway)
        log.info("site %s: namespace %s, host %s, link %s", name, site.netns, host, site.root_if)
        return site

    # --- partitions ------------------------------------------------------------

    def _rules(self, a: str, b: str) -> list[list[str]]:
        sa, sb = self.sites[a], self.sites[b]
        return [["iif", sa.root_if, "to", sb.prefix, "blackhole", "priority", str(RULE_PRIORITY)],
                ["iif", sb.root_if, "to", sa.prefix, "blackhole", "priority", str(RULE_PRIORITY)]]

    def cut(self, a: str, b: str) -> None:
        """Drop, silently and both ways, every packet between sites a and b."""
        key = tuple(sorted((a, b)))
        if key in self._cuts:
            return
        self._cuts.add(key)  # first, so that close() removes a half-made cut too
        for rule in self._rules(a, b):
            _ip("rule", "add", *rule)
        log.info("cut %s | %s", a, b)

    def heal(self, a: str, b: str) -> None:
        key = tuple(sorted((a, b)))
        if key not in self._cuts:
            return
        for rule in self._rules(a, b):
            _ip("rule", "del", *rule, check=False)
        self._cuts.discard(key)
        log.info("healed %s | %s", a, b)

    @contextlib.contextmanager
    def partition(self, a: str, b: str) -> Iterator[None]:
        self.cut(a, b)
        try:
            yield
        finally:
            self.heal(a, b)

    # --- shaping -------------------------------------------------------------

    def shape(self, name: str, rate_bit: int, *, burst: int | None = None, latency: float = 0.05) -> None:
        """Limit the site's link to `rate_bit` bits/s each way (a tbf qdisc on
        both ends). `burst` (bytes) defaults to 10 ms at the rate, at least
        64 KiB: tbf needs at least rate/HZ, and more than one 64 KiB GSO
        packet or it splits them; `latency` bounds the queue."""
        site = self.sites[name]
        burst = burst or max(64 << 10, rate_bit // 8 // 100)
        spec = ["root", "tbf", "rate", f"{rate_bit}bit", "burst", str(burst),
                "latency", f"{round(latency * 1000)}ms"]
        _run("tc", "qdisc", "replace", "dev", site.root_if, *spec)
        _run("tc", "-n", site.netns, "qdisc", "replace", "dev", site.inner_if, *spec)
        log.info("site %s: link shaped to %d bit/s (burst %d, latency %g s)", name, rate_bit, burst, latency)

    def unshape(self, name: str) -> None:
        site = self.sites[name]
        _run("tc", "qdisc", "del", "dev", site.root_if, "root", check=False)
        _run("tc", "-n", site.netns, "qdisc", "del", "dev", site.inner_if, "root", check=False)

    def counters(self, name: str) -> LinkCounters:
        stats = Path("/sys/class/net") / self.sites[name].root_if / "statistics"

        def read(key: str) -> int:
            return int((stats / key).read_text())

        return LinkCounters(read("tx_bytes"), read("rx_bytes"), read("tx_packets"), read("rx_packets"))

    # --- teardown ------------------------------------------------------------

    def close(self) -> None:
        """Heal, then delete every link (its qdiscs go with it) and namespace;
        runs to the end whatever fails."""
        for a, b in list(self._cuts):
            with contextlib.suppress(Exception):
                self.heal(a, b)
        for site in self.sites.values():
            _ip("link", "del", site.root_if, check=False)  # the peer in the namespace goes with it
            _ip("netns", "del", site.netns, check=False)
        self.sites.clear()


def _free_lab() -> ipaddress.IPv4Network:
    """A 10.N.0.0/16 that no address or route on this host uses yet."""
    text = _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "addr").stdout
    used = [ipaddress.ip_network(m, strict=False)
            for m in re.findall(r"\b\d+\.\d+\.\d+\.\d+(?:/\d+)?\b", text)]
    for _ in range(100):
        lab = ipaddress.ip_network(f"10.{random.randrange(64, 250)}.0.0/16")
        if not any(lab.overlaps(net) for net in used if net.prefixlen >= 12):
            return lab
    raise NetworkError("no free 10.N.0.0/16 for the test sites")


@contextlib.contextmanager
def sites(*names: str) -> Iterator[SiteNetwork]:
    """Namespaces for these sites, joined through the root namespace; torn down on exit."""
    net = SiteNetwork()
    try:
        for name in names:
            net.add(name)
        yield net
    finally:
        net.close()
