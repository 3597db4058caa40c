"""`mount.fuse.icbd`: the helper mount(8) runs for `mount -t fuse.icbd` and
for fstab lines of that type, so icbd mounts like any other filesystem:

    mount -t fuse.icbd https://cache.paris:7402 /imis -o site=paris,token-file=/etc/icbd/reader.token
    https://cache.paris:7402  /imis  fuse.icbd  ro,_netdev,site=paris,token-file=/etc/icbd/reader.token  0 0

mount(8) calls it as `mount.fuse.icbd SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]`.
It runs `icbd mount MOUNTPOINT --cache SOURCE` with each `-o` option as the
option of the same long name (`site=S` is `--site S`, `cache=URL` adds a
cache server, `no-profiles` is `--no-profiles`, `config=FILE` names the
config file), and returns once the mount answers, the mount process
serving in the background. A SOURCE that is not a URL (e.g. `icbd`) adds no
cache server: the config file's `[mount] cache = [...]` says where to read.

The options every filesystem takes (ro, _netdev, nofail, noauto, user,
nosuid, nodev, noatime, x-systemd.*, ...) are for mount(8), systemd or the
kernel, and are left out: an icbd mount is always read-only, nosuid and
nodev (mount(8) passes `rw` when no `ro` is given; it changes nothing). `umount MOUNTPOINT` ends the mount: its process
sees the kernel close the connection and exits.
"""

from __future__ import annotations

import argparse
import sys

from icbdcore.errors import CliError

from . import cli, config

# Options of mount(8), systemd and the kernel that say nothing to icbd.
GENERIC = {"ro", "rw", "defaults", "_netdev", "nofail", "auto", "noauto", "user", "users", "nouser", "owner",
           "group", "nosuid", "nodev", "noexec", "exec", "suid", "dev", "async", "sync", "atime", "noatime",
           "relatime", "norelatime", "strictatime", "nostrictatime", "diratime", "nodiratime", "lazytime",
           "nolazytime", "silent", "loud", "iversion", "noiversion", "mand", "nomand", "allow_other",
           "default_permissions"}
GENERIC_PREFIXES = ("x-", "comment=", "fsname=", "subtype=", "uid=", "gid=", "context=", "helper=")
# Options of `icbd mount` that make no sense from mount(8).
REFUSED = {"foreground": "mount(8) waits for its helper to return: the mount always runs in the background"}


def translate(source: str, mountpoint: str, options: list[str], sloppy: bool = False) -> list[str]:
    """The `icbd` command line for mount(8)'s arguments."""
    mount_options = config.options(config.commands(cli.build_parser())[("mount",)])
    head: list[str] = []
    argv = ["mount", mountpoint]
    if source.startswith(("http://", "https://")):
        argv += ["--cache", source]
    for option in options:
        key, has_value, value = option.partition("=")
        if option in GENERIC or option.startswith(GENERIC_PREFIXES):
            continue
        if key in REFUSED:
            raise CliError(f"-o {option}: {REFUSED[key]}")
        if key == "config":
            if not value:
                raise CliError("-o config=FILE: name the config file")
            head += ["--config", value]
            continue
        action = mount_options.get(key)
        if action is None:
            if sloppy:
                continue
            known = ", ".join(sorted(k for k in mount_options if k not in REFUSED))
            raise CliError(f"-o {option}: not an option of fuse.icbd (icbd's are: config, {known})")
        switch = isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)
        if switch and has_value:
            raise CliError(f"-o {option}: {key} takes no value")
        if not switch and not value:
            raise CliError(f"-o {option}: give {key}=VALUE")
        argv += [f"--{key}"] if switch else [f"--{key}", value]
    return head + argv


def parse_arguments(argv: list[str]) -> tuple[str, str, list[str], dict[str, bool]]:
    """SOURCE, MOUNTPOINT, the -o options and the flags mount(8) passes."""
    positional: list[str] = []
    options: list[str] = []
    flags = {"fake": False, "sloppy": False, "verbose": False}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-o" and i + 1 < len(argv):
            options += [o for o in argv[i + 1].split(",") if o]
            i += 2
            continue
        if arg.startswith("-o") and len(arg) > 2:
            options += [o for o in arg[2:].split(",") if o]
        elif arg in ("-t", "-N") and i + 1 < len(argv):
            i += 2  # the type (fuse.icbd), a namespace: nothing for icbd
            continue
        elif arg.startswith("-") and len(arg) > 1:
            for letter in arg[1:]:
                if letter == "f":
                    flags["fake"] = True
                elif letter == "s":
                    flags["sloppy"] = True
                elif letter == "v":
                    flags["verbose"] = True
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 2:
        raise CliError("usage: mount.fuse.icbd SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS] (mount(8) runs it)")
    return positional[0], positional[1], options, flags


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        source, mountpoint, options, flags = parse_arguments(argv)
        command = translate(source, mountpoint, options, sloppy=flags["sloppy"])
    except CliError as error:
        print(f"mount.fuse.icbd: {error}", file=sys.stderr)
        return error.exit_code
    if flags["verbose"]:
        print("mount.fuse.icbd: icbd " + " ".join(command), file=sys.stderr)
    if flags["fake"]:
        return 0
    return cli.main(command)


if __name__ == "__main__":
    sys.exit(main())
