"""The `icbd` command line: servers, admin commands, mount, boot and bench.

Global options come before the subcommand. Every command exits 0 on success
and otherwise prints one line on stderr and exits non-zero. Every command
reads the config file (icbd/config.py) for what its command line leaves out.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from icbdcore.errors import CliError

from . import config

# Commands that keep running: a token given to them on the command line is
# moved into their environment at once (see _token_out_of_argv).
DAEMONS = ("master", "replica", "cache", "mount")

EPILOG = """\
config file: /etc/icbd/icbd.toml, or --config FILE (env ICBD_CONFIG): global keys (master,
  token-file, ca, master-key) and a table per command with its options by their long names
  ([replica] data = "/srv/icbd"); the command line and the environment override it.
  `icbd config show COMMAND` prints the effective settings and where each came from.
environment: ICBD_MASTER (for --master), ICBD_TOKEN (for --token), ICBD_CA (for --ca),
  ICBD_MASTER_KEY (for --master-key), ICBD_CONFIG (for --config)
examples:
  icbd master --data /srv/icbd --listen 0.0.0.0:7400 --token-file /etc/icbd/admin.token \\
      --source-root /srv/trees
  icbd --master http://master:7400 key show
  icbd --master http://master:7400 imi create desktop --from /srv/trees/desktop
  icbd --master http://master:7400 imi publish desktop --message "security fixes"
  icbd --master http://master:7400 subscribe desktop --node site-a-1
  icbd mount /imis --cache http://cache.site-a:7402
  icbd boot desktop --mount /imis
"""


def _size(text: str) -> int:
    """A byte count: 123, 64K, 512M, 2G, 1T (powers of 1024)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 4G)") from None


def _connection_options(p: argparse.ArgumentParser, *, master: bool = True) -> None:
    """--master, --token, --token-file and --ca are global, but also accepted
    after the subcommand of the commands that run (nodes and mounts)."""
    if master:
        p.add_argument("--master", default=argparse.SUPPRESS, metavar="URL", help="the master's URL (env ICBD_MASTER)")
    _credential_options(p, default=argparse.SUPPRESS)


def _credential_options(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("--token", default=default, metavar="T",
                   help="this caller's token (env ICBD_TOKEN); daemons move it out of their command line")
    p.add_argument("--token-file", default=default, metavar="FILE", help="read the token from FILE (preferred)")
    p.add_argument("--ca", default=default, metavar="FILE",
                   help="verify https servers against the CA certificate(s) in FILE (env ICBD_CA; "
                   "default: the system's trust store)")


def _trust_options(p: argparse.ArgumentParser) -> None:
    """--master-key is global, but also accepted after the subcommand."""
    p.add_argument("--master-key", default=argparse.SUPPRESS, metavar="KEY|FILE",
                   help="the master's public key, or a file holding it (env ICBD_MASTER_KEY; "
                   "default: trust the key presented at first contact and keep it)")


def _node_options(p: argparse.ArgumentParser, *, needs_master: bool) -> None:
    _connection_options(p, master=needs_master)
    p.add_argument("--data", required=True, metavar="DIR", help="the node's data folder")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to serve HTTP on")
    p.add_argument("--advertise", metavar="URL", help="URL other nodes use to reach this one (default: from --listen)")
    p.add_argument("--tls-cert", metavar="FILE", help="serve https only, with this PEM certificate chain")
    p.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    if needs_master:
        p.add_argument("--site", required=True, help="the site this node serves")
    p.add_argument("--heartbeat", type=float, default=2.0, metavar="S", help="seconds between heartbeats (default 2)")
    p.add_argument("--log", metavar="FILE", help="log to FILE (rotated) instead of stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--no-metrics", action="store_true",
                   help="serve no GET /metrics and record nothing for it (metrics cost next to nothing: "
                   "see docs/OPERATIONS.md)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("icbd")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icbd",
        description="Replicate and cache desktop machine images (iMIs).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--master", default=os.environ.get("ICBD_MASTER"), metavar="URL",
                        help="the master's URL (env ICBD_MASTER)")
    _credential_options(parser, default=None)
    parser.add_argument("--master-key", default=os.environ.get("ICBD_MASTER_KEY"), metavar="KEY|FILE",
                        help="replicas, caches and mounts: the master's public key (`icbd key show`), "
                        "or a file holding it (env ICBD_MASTER_KEY)")
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    parser.add_argument("--config", metavar="FILE",
                        help="the config file (env ICBD_CONFIG; default /etc/icbd/icbd.toml, if it exists)")
    parser.add_argument("--version", action="version", version=f"icbd {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("master", help="run the master node (repository, name server, keep-alive)")
    _node_options(p, needs_master=False)
    p.add_argument("--image-size", type=_size, default=_size("64G"), metavar="BYTES",
                   help="size of DATA/btrfs.img when DATA is not on btrfs (sparse; default 64G)")
    p.add_argument("--chunk-size", type=_size, default=1 << 20, metavar="BYTES",
                   help="manifest chunk size (default 1M)")
    p.add_argument("--suspect-after", type=float, default=6.0, metavar="S",
                   help="silence after which a node is suspect (default 6)")
    p.add_argument("--down-after", type=float, default=15.0, metavar="S",
                   help="silence after which a node is down (default 15)")
    p.add_argument("--source-root", action="append", metavar="DIR",
                   help="imi create --from takes only paths below DIR (repeatable; without it, create is refused)")
    p.add_argument("--spool-ttl", type=float, default=600.0, metavar="S",
                   help="keep a stream's spool this long after its last reader (default 600); its record stays, "
                   "and the stream is made again, and checked, when asked for later")
    p.set_defaults(handler="replicator.master:run")

    p = sub.add_parser("replica", help="run a replica node that holds subscribed iMIs")
    _node_options(p, needs_master=True)
    _trust_options(p)
    p.add_argument("--name", metavar="ID", help="node id (default: generated once and kept in DATA)")
    p.add_argument("--image-size", type=_size, default=_size("64G"), metavar="BYTES",
                   help="size of DATA/btrfs.img when DATA is not on btrfs (sparse; default 64G)")
    p.add_argument("--keep", type=int, default=5, metavar="N",
                   help="versions to keep per iMI, besides latest and the delta parent (default 5)")
    p.add_argument("--resume-spool", choices=("auto", "always", "never"), default="auto",
                   help="keep a copy of each incoming stream so a cut-off transfer resumes where it "
                   "stopped (auto: only on links slower than 100 MB/s, where starting over is costly)")
    p.set_defaults(handler="replicator.replica:run")

    p = sub.add_parser("cache", help="run a site cache server")
    _node_options(p, needs_master=True)
    _trust_options(p)
    p.add_argument("--name", metavar="ID", help="node id (default: generated once and kept in DATA)")
    p.add_argument("--size", type=_size, default=_size("10G"), metavar="BYTES",
                   help="bound on cached block bytes (default 10G)")
    p.add_argument("--upstream", action="append", metavar="URL",
                   help="an HTTP cache to fill from first (a site Squid or nginx in front of a replica, a CDN), "
                   "tried in the order given, before the replicas the master lists (repeatable)")
    p.set_defaults(handler="cache.server:run")

    p = sub.add_parser("mount", help="mount every iMI read-only at MOUNTPOINT")
    p.add_argument("mountpoint")
    _connection_options(p)
    _trust_options(p)
    p.add_argument("--cache", metavar="URL", action="append",
                   help="read through this site cache server; repeat it for several: blocks are spread "
                   "over them by digest, and a reader fails over to the others when one stops answering")
    p.add_argument("--no-replica-fallback", dest="replica_fallback", action="store_false",
                   help="with --cache: never read from the replicas, even when no cache server answers")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="with --master: keep blocks here (embedded cache); always: the master's key and the "
                   "newest catalogue seen, and with --cache the replicas to fall back on "
                   "(default /var/cache/icbd/mount)")
    p.add_argument("--cache-size", type=_size, default=_size("10G"), metavar="BYTES",
                   help="with --cache-dir: bound on cached bytes (default 10G)")
    p.add_argument("--site", help="prefer replicas of this site")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="a read that cannot be served within S seconds fails with EIO (default 10)")
    p.add_argument("--refresh", type=float, default=2.0, metavar="S",
                   help="seconds between checks for new versions and rollbacks (default 2)")
    p.add_argument("--memory-cache", type=_size, default=_size("128M"), metavar="BYTES",
                   help="whole recent blocks kept in the mount's memory (default 128M)")
    p.add_argument("--profile-quiet", type=float, default=10.0, metavar="S",
                   help="once no file of the version is open, a boot profile recording ends S seconds after the "
                   "last close or new block (default 10)")
    p.add_argument("--no-profiles", action="store_true",
                   help="neither record nor replay boot profiles")
    p.add_argument("--trace", metavar="FILE",
                   help="write every read the mount serves (file, offset, length, when, how long) to FILE, "
                   "a read trace `icbd replay` plays back")
    p.add_argument("--foreground", action="store_true",
                   help="stay in the foreground (under systemd: reports READY=1 once the mount answers)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve the mount's Prometheus metrics at http://HOST:PORT/metrics")
    p.add_argument("--log", metavar="FILE", help="log to FILE (rotated)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(handler="icbd.mounting:main")

    key = sub.add_parser("key", help="the master's public key").add_subparsers(dest="action", metavar="ACTION")
    key.required = True
    p = key.add_parser("show", help="print the master's public key (give it to replicas, caches and mounts "
                       "with --master-key)")
    p.add_argument("--data", metavar="DIR", help="read it from the master's data folder on this host "
                   "instead of asking the master")
    p.set_defaults(handler="icbd.keys:show")

    p = sub.add_parser("umount", help="unmount an icbd mount")
    p.add_argument("mountpoint")
    p.set_defaults(handler="icbd.mounting:umount")

    imi = sub.add_parser("imi", help="manage iMIs on the master").add_subparsers(dest="action", metavar="ACTION")
    imi.required = True
    p = imi.add_parser("create", help="create an iMI from a tree or image file on the master host")
    p.add_argument("name")
    p.add_argument("--from", dest="source", required=True, metavar="PATH",
                   help="absolute path on the master host: a directory tree or an image file")
    p.set_defaults(handler="icbd.admin:imi_create")
    p = imi.add_parser("update", help="bring the working copy to a new build's content, in place",
                       description="Bring NAME's working copy on the master to PATH's content, writing only "
                       "what differs, so the next publish reads and sends only what changed. PATH is a tree "
                       "(the working copy becomes it) or an image file (it replaces the file of the same name). "
                       "Publishing is left to you.")
    p.add_argument("name")
    p.add_argument("--from", dest="source", required=True, metavar="PATH",
                   help="absolute path on the master host: a directory tree or an image file")
    p.set_defaults(handler="icbd.admin:imi_update")
    p = imi.add_parser("publish", help="publish the working copy as the next version")
    p.add_argument("name")
    p.add_argument("--message", "-m", default="", metavar="TEXT")
    p.set_defaults(handler="icbd.admin:imi_publish")
    p = imi.add_parser("list", help="list iMIs")
    p.set_defaults(handler="icbd.admin:imi_list")
    p = imi.add_parser("versions", help="list the versions of an iMI")
    p.add_argument("name")
    p.set_defaults(handler="icbd.admin:imi_versions")
    p = imi.add_parser("path", help="print where the writable working copy is on the master")
    p.add_argument("name")
    p.set_defaults(handler="icbd.admin:imi_path")
    p = imi.add_parser("rollback", help="make an older version latest")
    p.add_argument("name")
    p.add_argument("version")
    p.set_defaults(handler="icbd.admin:imi_rollback")
    p = imi.add_parser("delete", help="delete an iMI and all its versions")
    p.add_argument("name")
    p.set_defaults(handler="icbd.admin:imi_delete")

    for verb in ("subscribe", "unsubscribe"):
        p = sub.add_parser(verb, help=f"{verb} a replica to an iMI")
        p.add_argument("name")
        p.add_argument("--node", required=True, metavar="ID")
        p.set_defaults(handler=f"icbd.admin:{verb}")

    token = sub.add_parser("token", help="issue, list and revoke tokens (admin)").add_subparsers(
        dest="action", metavar="ACTION")
    token.required = True
    p = token.add_parser("create", help="issue a new token and print it (shown this once)")
    p.add_argument("--role", required=True, choices=("admin", "node", "reader"),
                   help="reader: what a mount needs; node: replicas and caches; admin: everything")
    p.add_argument("--name", metavar="NAME", help="a name to list and revoke it by (default: generated)")
    p.set_defaults(handler="icbd.admin:token_create")
    p = token.add_parser("list", help="list tokens: names, roles, when issued")
    p.set_defaults(handler="icbd.admin:token_list")
    p = token.add_parser("revoke", help="revoke a token: every node refuses it within a heartbeat")
    p.add_argument("name")
    p.set_defaults(handler="icbd.admin:token_revoke")

    p = sub.add_parser("status", help="nodes, liveness, versions held, transfers")
    p.add_argument("--watch", action="store_true", help="keep showing, with progress bars for transfers")
    p.add_argument("--interval", type=float, default=1.0, metavar="S")
    p.set_defaults(handler="icbd.admin:status")

    p = sub.add_parser("prefetch", help="pre-stage a version (or its boot profile) at a site cache")
    p.add_argument("target", metavar="NAME[@VERSION]")
    p.add_argument("--cache", required=True, metavar="URL", help="the site cache server")
    p.add_argument("--profile", action="store_true", help="only the blocks of the boot profile")
    p.set_defaults(handler="icbd.admin:prefetch")

    p = sub.add_parser("boot", help="boot a desktop from a mounted iMI under qemu",
                       usage="icbd boot NAME[@VERSION] --mount MOUNTPOINT [options] [-- QEMU-ARGS...]",
                       description="Boot NAME[@VERSION] from the mount under qemu, through a "
                       "per-desktop copy-on-write overlay. The serial console goes to stdout. "
                       "Exits 0 when the guest powers off, or with --screenshot once its session "
                       "is up and the screen is saved. Arguments after -- go to qemu.")
    p.add_argument("target", metavar="NAME[@VERSION]")
    p.add_argument("--mount", required=True, metavar="MOUNTPOINT")
    p.add_argument("--overlay", metavar="DIR", help="where to keep the desktop's overlay (default: a temporary folder)")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="fail if the guest runs longer (default 300; none with --display)")
    p.add_argument("--screenshot", metavar="FILE",
                   help="once the guest says its session is up, save its screen as PNG to FILE and stop it")
    p.add_argument("--display", metavar="SPEC",
                   help="show the desktop's screen: vnc=:N (VNC on port 5900+N), sdl or gtk "
                   "(default: headless)")
    p.add_argument("--kernel", help="override the kernel path inside the iMI")
    p.add_argument("--initrd", help="override the initrd path inside the iMI")
    p.add_argument("--disk", help="override the disk image path inside the iMI")
    p.add_argument("--append", help="override the kernel command line")
    p.add_argument("--memory", help="override the guest memory (e.g. 512M)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="qemu accelerator (auto: KVM when it answers, else TCG)")
    p.set_defaults(handler="icbd.boot:main", qemu_args=[])

    p = sub.add_parser("replay", help="play a read trace back at full speed against a mount or a folder",
                       description="Replay the reads of TRACE (written by icbd mount --trace) against the "
                       "files under DIR, without the time between them: each read starts as soon as the "
                       "reads that had finished before it in the trace have finished, as many at once as "
                       "the trace had. Prints the seconds it took (with the global --json, as JSON).")
    p.add_argument("trace", metavar="TRACE")
    p.add_argument("--mount", required=True, metavar="DIR",
                   help="the mount point, or a folder laid out like one (NAME/VERSION/PATH)")
    p.add_argument("--only", metavar="NAME[/VERSION[/PATH]]", help="replay only the reads of these files")
    p.add_argument("--buffered", action="store_true",
                   help="read through the page cache (readahead off) instead of with O_DIRECT")
    p.set_defaults(handler="icbd.replay:main")

    p = sub.add_parser("doctor", help="check this host for the roles it plays; exit 1 if anything fails",
                       description="Check this host for its roles (from --role, else from the config file's "
                       "tables): btrfs, /dev/fuse and fusermount3, qemu and KVM, the clock against the "
                       "master, reaching the master, replicas and caches, TLS certificates and their "
                       "expiry, the token's role, disk space and the config file. One verdict per check, "
                       "with the fix where one is known; exit 1 if any check fails.")
    p.add_argument("--role", action="append", choices=("master", "replica", "cache", "mount", "desktop", "admin"),
                   help="a role of this host (repeatable; default: from the config file's tables, else admin)")
    p.add_argument("--kernel", metavar="FILE",
                   help="a kernel to probe KVM with (default: /boot/vmlinuz-$(uname -r) if there)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="seconds to wait for each node that is checked (default 5)")
    p.set_defaults(handler="icbd.doctor:main")

    config = sub.add_parser("config", help="the config file").add_subparsers(dest="action", metavar="ACTION")
    config.required = True
    p = config.add_parser("show", help="print the effective settings of a command and where each came from")
    p.add_argument("target", nargs="*", metavar="COMMAND", help="e.g. replica, mount or imi create "
                   "(default: the global settings and every table of the file)")
    p.set_defaults(handler="icbd.config:show")
    p = config.add_parser("sample", help="print a commented sample config file")
    p.set_defaults(handler="icbd.config:sample")

    p = sub.add_parser("completion", help="print a shell completion script",
                       description="Print a completion script for SHELL: e.g. "
                       "`icbd completion bash > /etc/bash_completion.d/icbd`.")
    p.add_argument("shell", choices=("bash", "zsh", "tcsh"))
    p.set_defaults(handler="icbd.completion:main")

    p = sub.add_parser("bench", help="run the transfer and read-path benchmarks")
    p.add_argument("--quick", action="store_true", help="small images, fewer runs (about 10 minutes)")
    p.add_argument("--out", default="bench-out", metavar="DIR", help="where to write report.json, report.md and plots")
    p.add_argument("--only", metavar="NAMES", help="comma-separated benchmark names to run")
    p.set_defaults(handler="bench.suite:main")
    return parser


def _token_out_of_argv(argv: list[str]) -> list[str] | None:
    """`argv` without its --token options, or None if it has none.

    Every user of the host can read a process's command line
    (/proc/PID/cmdline, ps); a daemon lives for months, so it must not keep
    a token there. Only the exact forms count: any abbreviation of --token is
    also one of --token-file, which argparse refuses as ambiguous."""
    end = argv.index("--") if "--" in argv else len(argv)
    kept, found, i = [], False, 0
    while i < end:
        arg = argv[i]
        if arg == "--token" and i + 1 < end:
            found, i = True, i + 2
            continue
        if arg.startswith("--token="):
            found, i = True, i + 1
            continue
        kept.append(arg)
        i += 1
    return kept + argv[end:] if found else None


def _reexec_without_token(argv: list[str], token: str) -> None:
    """Start this command again, the token in ICBD_TOKEN instead of argv (same pid)."""
    stripped = _token_out_of_argv(argv)
    assert stripped is not None
    # sys.orig_argv holds the interpreter's own options and how the program was
    # named (-m icbd.cli, or the icbd script), followed by `argv`.
    head = sys.orig_argv[: len(sys.orig_argv) - len(sys.argv) + 1]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [*head, *stripped], {**os.environ, "ICBD_TOKEN": token})


def _resolve_credentials(args) -> None:
    """args.token from --token, --token-file or ICBD_TOKEN (in that order);
    args.ca from --ca or ICBD_CA, checked now."""
    token = getattr(args, "token", None)
    token_file = getattr(args, "token_file", None)
    if token and token_file:
        raise CliError("give --token or --token-file, not both")
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read(64 << 10).strip()
        except (OSError, UnicodeDecodeError) as error:
            raise CliError(f"cannot read the token file {token_file}: {getattr(error, 'strerror', None) or error}") \
                from None
        if not token or "\n" in token:
            raise CliError(f"the token file {token_file} must hold one token on one line")
    args.token = token or os.environ.get("ICBD_TOKEN") or None
    args.ca = getattr(args, "ca", None) or os.environ.get("ICBD_CA") or None
    if args.ca:
        from icbdcore.clients import trust_context

        trust_context(args.ca)  # a wrong file is a one-line error now, not a failure per call


def parse(argv: list[str]) -> tuple[argparse.Namespace, argparse.ArgumentParser, dict]:
    """`argv` parsed, before the config file fills in: the namespace, the
    parser and the original defaults of its settings (icbd.config.prepare)."""
    # argparse cannot take a trailing free-form list after options, so what
    # follows `--` is split off here and handed to `icbd boot` as qemu arguments.
    if "--" in argv and "boot" in argv[: argv.index("--")]:
        cut = argv.index("--")
        parser = build_parser()
        original = config.prepare(parser)
        args = parser.parse_args(argv[:cut])
        if args.command == "boot":
            args.qemu_args = argv[cut + 1:]
            return args, parser, original
        # "boot" was a value of another command; parse as usual
    parser = build_parser()
    original = config.prepare(parser)
    return parser.parse_args(argv), parser, original


def apply_config(args: argparse.Namespace, parser: argparse.ArgumentParser, original: dict) -> None:
    """Fill in from the environment, the config file and the defaults what
    the command line left out (icbd/config.py). `icbd doctor` reports a bad
    file as one of its checks instead of refusing to start."""
    found = config.locate(getattr(args, "config", None))
    args.config_file = found
    args.config_error = None
    try:
        config.load(parser, found)
    except config.ConfigError as error:
        if args.command != "doctor":
            raise
        args.config_error = str(error)
        found.settings = {}
    args.config_origins = config.resolve(parser, config.command_path(args, parser), args, found, original)
    args.config_original = original
    args.config_parser = parser


def main(argv: list[str] | None = None) -> int:
    from_sys = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    args, parser, original = parse(argv)
    try:
        apply_config(args, parser, original)
    except CliError as error:
        print(f"icbd: {error}", file=sys.stderr)
        return error.exit_code
    if (from_sys and args.command in DAEMONS and getattr(args, "token", None)
            and not getattr(args, "token_file", None) and _token_out_of_argv(argv) is not None):
        _reexec_without_token(argv, args.token)
    if args.command in DAEMONS:
        from icbdcore.heap import keep_freed_memory  # ctypes: only where it pays

        keep_freed_memory()  # they move blocks: see icbdcore/heap.py
    try:
        _resolve_credentials(args)
        module_name, func_name = args.handler.split(":")
        handler = getattr(importlib.import_module(module_name), func_name)
        return int(handler(args) or 0)
    except CliError as error:
        print(f"icbd: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("icbd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
