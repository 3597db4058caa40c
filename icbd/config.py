"""The config file: `/etc/icbd/icbd.toml`, or `--config FILE` (env
ICBD_CONFIG), given before the subcommand.

    master = "https://master.example.org:7400"     # global keys: the global options
    ca = "/etc/icbd/ca.pem"
    master-key = "/etc/icbd/master.pub"

    [replica]                                      # one table per command,
    data = "/srv/icbd"                             # options by their long names
    site = "paris"
    name = "paris-1"

    [mount]
    cache = ["https://c1:7402", "https://c2:7402"] # a repeatable option takes a list
    no-profiles = true                             # a switch takes true or false

    [imi.create]                                   # a command's action: a table within
    from = "/srv/trees/desktop"

The keys a table may hold are the options of its command, taken from the
command line's own parser (icbd/cli.py), so the file and the command line
cannot drift apart; only `--token` (a secret: use `token-file`), `--json`
(a choice per call) and `--config` itself are not settings. A command's
table may also set the global keys for that command alone.

Precedence, highest first: the command line, the environment (ICBD_MASTER,
ICBD_TOKEN, ICBD_CA, ICBD_MASTER_KEY), the command's table, the file's
global keys, the built-in default. `icbd config show [COMMAND]` prints each
setting's value and where it came from.

The whole file is checked before any command runs: a key no command
takes, a value of the wrong kind or out of its choices, a file that is not
TOML, each is one line naming the file, the key and what is allowed, and
nothing starts.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from icbdcore.errors import CliError

DEFAULT_PATH = Path("/etc/icbd/icbd.toml")
ENV_VAR = "ICBD_CONFIG"
# Options that are not settings, and why.
NOT_SETTINGS = {
    "help": "not a setting",
    "version": "not a setting",
    "config": "the file cannot name another one",
    "token": "a token does not belong in a config file: keep it in a file of mode 0600 and name that file "
             "with token-file",
    "json": "--json is a choice per call: give it on the command line",
}
# Options the environment may set (it outranks the file), by dest.
ENVIRONMENT = {"master": "ICBD_MASTER", "ca": "ICBD_CA", "master_key": "ICBD_MASTER_KEY", "token": "ICBD_TOKEN"}
# Exit status of a bad config file (as argparse's for a bad command line).
EXIT_BAD_CONFIG = 2
# TOML cannot hold a key `master` and a table [master] at once.
MASTER_CLASH = re.compile(r"(?ms)^\s*master\s*=.*^\s*\[\s*master\s*\]|^\s*\[\s*master\s*\].*^\s*master\s*=")


class ConfigError(CliError):
    def __init__(self, message: str):
        super().__init__(message, EXIT_BAD_CONFIG)


class _Unset:
    """The default of every setting while the command line is parsed: a
    value still holding it was not given on the command line."""

    def __repr__(self) -> str:
        return "<unset>"


UNSET = _Unset()


@dataclass
class Value:
    value: object
    key: str  # as written in the file
    table: str  # "" for the global keys, else e.g. "replica" or "imi.create"


@dataclass
class ConfigFile:
    path: Path
    origin: str  # "--config", "ICBD_CONFIG" or "default"
    loaded: bool = False  # False: no file (the default path is optional)
    data: dict = field(default_factory=dict)
    settings: dict[tuple[str, ...], dict[str, Value]] = field(default_factory=dict)  # command path -> dest -> value

    def describe(self) -> str:
        return str(self.path) if self.loaded else f"{self.path} (absent)"


# --- the parser's tree ---------------------------------------------------------------

def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every (sub)command's parser by its path: (), ("replica",), ("imi", "create"), ..."""
    found = {path: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(commands(sub, (*path, name)))
    return found


def _subcommands(parser: argparse.ArgumentParser) -> list[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    return []


def _long_name(action: argparse.Action) -> str | None:
    return next((option[2:] for option in action.option_strings if option.startswith("--")), None)


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The settings a parser's table may hold: long option name -> action."""
    found = {}
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        name = _long_name(action)
        if name is None or name in NOT_SETTINGS:
            continue
        found[name] = action
    return found


def prepare(parser: argparse.ArgumentParser) -> dict[int, tuple[object, bool]]:
    """Make every setting's default UNSET (None for repeatable ones) and no
    option required, so that after parsing, what the command line gave is
    told apart from what it did not, and the file can fill in. Returns the
    original default and required flag of each action, by id()."""
    original: dict[int, tuple[object, bool]] = {}
    for sub in commands(parser).values():
        for action in options(sub).values():
            if id(action) in original or action.default is argparse.SUPPRESS:
                continue
            original[id(action)] = (action.default, action.required)
            action.default = None if isinstance(action, argparse._AppendAction) else UNSET
            action.required = False
    return original


# --- the file -------------------------------------------------------------------------

def locate(given: str | None, environ: dict[str, str] | None = None) -> ConfigFile:
    env = os.environ if environ is None else environ
    if given:
        return ConfigFile(Path(given), "--config")
    if env.get(ENV_VAR):
        return ConfigFile(Path(env[ENV_VAR]), ENV_VAR)
    return ConfigFile(DEFAULT_PATH, "default")


def load(parser: argparse.ArgumentParser, config: ConfigFile) -> ConfigFile:
    """Read and check the whole file (ConfigError on anything wrong). The
    default path may be absent; a file named by --config or ICBD_CONFIG must
    be there."""
    try:
        raw = config.path.read_bytes()
    except FileNotFoundError:
        if config.origin == "default":
            return config
        raise ConfigError(f"{config.path}: no such config file (named by {config.origin})") from None
    except OSError as error:
        raise ConfigError(f"{config.path}: cannot read the config file: {error.strerror or error}") from None
    try:
        config.data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{config.path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        if "overwrite" in str(error) and MASTER_CLASH.search(raw.decode("utf-8", "replace")):
            raise ConfigError(f"{config.path}: the global key master and the [master] table cannot both be in "
                              f"one TOML file: on the master's own host leave master out (commands there reach "
                              f"the master at its [master] advertise, or listen, address)") from None
        raise ConfigError(f"{config.path}: not valid TOML: {error}") from None
    config.loaded = True
    config.settings = check(parser, config.data, str(config.path))
    return config


def check(parser: argparse.ArgumentParser, data: dict, where: str) -> dict[tuple[str, ...], dict[str, Value]]:
    """Every table and key of `data` against the parser; the settings by command path."""
    tree = commands(parser)
    settings: dict[tuple[str, ...], dict[str, Value]] = {}

    def walk(table: dict, path: tuple[str, ...]) -> None:
        sub = tree[path]
        allowed = options(sub)
        children = _subcommands(sub)
        name = ".".join(path)
        label = f"[{name}] " if path else ""
        for key, value in table.items():
            if key in children and isinstance(value, dict):
                walk(value, (*path, key))
            elif key in allowed:
                action = allowed[key]
                settings.setdefault(path, {})[action.dest] = Value(convert(action, value, where, label, key), key,
                                                                    name)
            elif key in NOT_SETTINGS and not isinstance(value, dict):
                raise ConfigError(f"{where}: {label}{key!r} is not a setting: {NOT_SETTINGS[key]}")
            elif key in children:
                raise ConfigError(f"{where}: {label}{key} names a command: write its settings as a table "
                                  f"[{'.'.join((*path, key))}]")
            elif key.replace("_", "-") in allowed:
                raise ConfigError(f"{where}: {label}unknown key {key!r}: options are spelt with dashes "
                                  f"({key.replace('_', '-')!r})")
            else:
                keys = ", ".join(sorted(allowed)) or "none"
                prefix = name + "." if name else ""
                tables = "; tables: " + ", ".join(f"[{prefix}{c}]" for c in children) if children else ""
                what = "global key" if not path else f"key of [{name}]"
                raise ConfigError(f"{where}: {label}unknown key {key!r}: a {what} is one of {keys}{tables}")

    walk(data, ())
    return settings


def convert(action: argparse.Action, value: object, where: str, label: str, key: str) -> object:
    """A value from the file as the option's own type would make it from the command line."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{where}: {label}{key} = {value!r}: {why}")

    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction | argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise bad("wants true or false")
        if isinstance(action, argparse.BooleanOptionalAction):
            return value
        return action.const if value else not action.const
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_scalar(action, item, bad) for item in items]
    if isinstance(action, argparse._StoreAction) and action.nargs in (None, "?"):
        return _scalar(action, value, bad)
    raise bad("this option cannot be set in the file")


def _scalar(action: argparse.Action, value: object, bad) -> object:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise bad(f"wants {_kind(action)}")
    text = value if isinstance(value, str) else repr(value)
    converted: object = text
    if action.type is not None:
        try:
            converted = action.type(text)
        except argparse.ArgumentTypeError as error:
            raise bad(str(error)) from None
        except (TypeError, ValueError):
            raise bad(f"wants {_kind(action)}") from None
    if action.choices is not None and converted not in action.choices:
        raise bad(f"wants one of {', '.join(map(str, action.choices))}")
    return converted


def _kind(action: argparse.Action) -> str:
    if action.type is float:
        return "a number"
    if action.type is int:
        return "a whole number"
    if action.choices is not None:
        return f"one of {', '.join(map(str, action.choices))}"
    if action.type is not None:
        return f"a value like {action.metavar or 'the option takes'}"
    return "a string"


# --- putting it together ----------------------------------------------------------------

def command_path(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """The path of the command that was parsed: ("replica",), ("imi", "create"), ..."""
    tree = commands(parser)
    path: tuple[str, ...] = ()
    for dest in ("command", "action"):
        name = getattr(args, dest, None)
        if isinstance(name, str) and (*path, name) in tree:
            path = (*path, name)
    return path


def resolve(parser: argparse.ArgumentParser, path: tuple[str, ...], args: argparse.Namespace,
            config: ConfigFile, original: dict[int, tuple[object, bool]],
            environ: dict[str, str] | None = None) -> dict[str, str]:
    """Fill in `args` what the command line left out, from the environment,
    the file and the defaults, in that order; returns where each setting of
    the command came from (dest -> "command line", "environment ICBD_CA",
    "FILE [replica]", "default"). Raises ConfigError for a required option
    that nothing gave."""
    origins, missing = _resolve(parser, path, args, config, original, environ)
    if missing:
        needed = ", ".join(f"--{name}" for name, _ in missing)
        tables = sorted({".".join(level) for _, level in missing})
        raise ConfigError(f"{' '.join(path) or 'icbd'}: the following arguments are required: {needed} "
                          f"(on the command line, or in [{tables[0]}] of {config.path})")
    return origins


def _resolve(parser, path, args, config, original, environ) -> tuple[dict[str, str], list]:
    env = os.environ if environ is None else environ
    tree = commands(parser)
    chain = [path[:i] for i in range(len(path) + 1)]
    origins: dict[str, str] = {}
    missing = []
    for level in chain:
        for name, action in options(tree[level]).items():
            if action.default is argparse.SUPPRESS or id(action) not in original:
                continue  # a global option repeated after a subcommand: its top-level twin decides
            default, required = original[id(action)]
            dest = action.dest
            current = getattr(args, dest, UNSET)
            given = current is not None if isinstance(action, argparse._AppendAction) else current is not UNSET
            if given:
                origins[dest] = "command line"
                continue
            value, origin = _from_environment(dest, env, args)
            if origin is None:
                value, origin = _from_file(dest, chain, level, config)
            if origin is None:
                value, origin = default, "default"
            setattr(args, dest, value)
            origins[dest] = origin
            if required and value is None:
                missing.append((name, level))
    return origins, missing


def _from_environment(dest: str, env, args) -> tuple[object, str | None]:
    if dest == "token_file":
        # A token given by --token or ICBD_TOKEN outranks a token file from the config file.
        if getattr(args, "token", None):
            return None, "--token (command line)"
        if env.get("ICBD_TOKEN"):
            return None, "environment ICBD_TOKEN (the token itself)"
        return None, None
    var = ENVIRONMENT.get(dest)
    if var and env.get(var):
        return env[var], f"environment {var}"
    return None, None


def _from_file(dest: str, chain: list[tuple[str, ...]], level: tuple[str, ...],
               config: ConfigFile) -> tuple[object, str | None]:
    """The most specific table on the command's path that sets `dest`. A
    global option (level ()) may be set by any table on the path; a
    command's own option only by its own table."""
    candidates = reversed(chain) if level == () else [level]
    for table in candidates:
        found = config.settings.get(table, {}).get(dest)
        if found is not None:
            return found.value, f"{config.path} [{found.table}]" if found.table else f"{config.path} (global)"
    if dest == "master" and level == () and ("master",) in config.settings:
        # The master's own host: its [master] table takes the place of the global key.
        url = master_url(config.settings[("master",)])
        if url:
            return url, f"{config.path} [master] advertise/listen"
    return None, None


def master_url(table: dict[str, Value]) -> str | None:
    """Where the master of a [master] table answers: its advertise URL, else
    its listen address (a wildcard address as loopback), https if it has a
    certificate."""
    if "advertise" in table:
        return str(table["advertise"].value)
    listen = table.get("listen")
    if listen is None:
        return None
    host, _, port = str(listen.value).rpartition(":")
    host = host.strip("[]")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    scheme = "https" if "tls_cert" in table else "http"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def effective(parser: argparse.ArgumentParser, path: tuple[str, ...], config: ConfigFile,
              original: dict[int, tuple[object, bool]], environ: dict[str, str] | None = None) -> list[dict]:
    """Every setting of the command at `path` as it would start now (no
    command line): key, value and where it comes from."""
    tree = commands(parser)
    args = argparse.Namespace()
    for level in [path[:i] for i in range(len(path) + 1)]:
        for action in options(tree[level]).values():
            if action.default is not argparse.SUPPRESS:
                setattr(args, action.dest, None if isinstance(action, argparse._AppendAction) else UNSET)
    origins, _ = _resolve(parser, path, args, config, original, environ)
    out = []
    for level in [path[:i] for i in range(len(path) + 1)]:
        for name, action in sorted(options(tree[level]).items()):
            if action.default is argparse.SUPPRESS or id(action) not in original:
                continue
            value = getattr(args, action.dest, None)
            origin = origins.get(action.dest, "default")
            if value is None and original[id(action)][1]:
                origin = "required: not set"
            if isinstance(action, argparse._StoreFalseAction) and isinstance(value, bool):
                value = not value  # no-replica-fallback = true turns replica_fallback off
            out.append({"key": name, "table": ".".join(level), "value": _plain(value), "from": origin})
    return out


def _plain(value: object) -> object:
    if value is UNSET:
        return None
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


# --- `icbd config show` and `icbd config sample` ---------------------------------------

def show(args) -> int:
    """`icbd config show [COMMAND ...]`."""
    import json
    import sys

    parser, found = args.config_parser, args.config_file
    tree = commands(parser)
    if args.target:
        path = tuple(args.target)
        if path not in tree or path == ("config", "show"):
            known = ", ".join(" ".join(p) for p in tree if p and len(p) == 1)
            raise CliError(f"no command {' '.join(path)!r}: one of {known} (or e.g. `imi create`)")
        paths = [path]
    else:
        paths = [(), *sorted(p for p in found.settings if p)]
    shown = {(".".join(p) or "global"): effective(parser, p, found, args.config_original) for p in paths}
    if not args.target:  # each command's table alone; the global keys once
        shown = {name: [s for s in rows if name == "global" or s["table"]] for name, rows in shown.items()}
    if args.json:
        json.dump({"file": str(found.path), "loaded": found.loaded, "named_by": found.origin,
                   "settings": shown}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"# config file: {found.describe()} (named by {found.origin})")
    for name, rows in shown.items():
        print(f"\n[{name}]" if name != "global" else "\n# global")
        width = max((len(r["key"]) + len(_toml(r["value"])) for r in rows), default=0) + 3
        for row in rows:
            text = f"{row['key']} = {_toml(row['value'])}"
            where = row["from"] + (f" (for [{row['table']}])" if row["table"] and name == "global" else "")
            print(f"{text:<{width}}  # {where}")
    return 0


def _toml(value: object) -> str:
    import json

    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


# Example values for the sample file, by key (or table.key).
EXAMPLES = {
    "master": "https://master.example.org:7400", "token-file": "/etc/icbd/node.token",
    "ca": "/etc/icbd/ca.pem", "master-key": "/etc/icbd/master.pub",
    "data": "/var/lib/icbd", "master.listen": "0.0.0.0:7400", "replica.listen": "0.0.0.0:7401",
    "cache.listen": "0.0.0.0:7402", "site": "paris", "name": "paris-1",
    "tls-cert": "/etc/icbd/tls/node.pem", "tls-key": "/etc/icbd/tls/node.key",
    "advertise": "https://this-host.example.org:7401", "log": "/var/log/icbd/icbd.log",
    "source-root": ["/srv/trees"], "mount.token-file": "/etc/icbd/reader.token",
    "master.token-file": "/etc/icbd/admin.token",
    "cache": ["https://cache1.paris.example.org:7402", "https://cache2.paris.example.org:7402"],
    "cache-dir": "/var/cache/icbd/mount", "metrics-listen": "127.0.0.1:9402", "kernel": "/boot/vmlinuz",
    "overlay": "/var/lib/icbd/overlays", "role": ["mount"], "boot.timeout": 300.0,
}
SAMPLE_TABLES = ("master", "replica", "cache", "mount", "doctor", "boot")


def sample(args) -> int:
    """`icbd config sample`: every setting, commented out, with its help."""
    print(sample_text(args.config_parser, args.config_original))
    return 0


def sample_text(parser: argparse.ArgumentParser, original: dict[int, tuple[object, bool]]) -> str:
    import textwrap

    tree = commands(parser)
    lines = [
        "# icbd's config file: /etc/icbd/icbd.toml (or --config FILE, env ICBD_CONFIG).",
        "#",
        "# Every key is an option of the command line, by its long name; a repeatable option",
        "# takes a list, a switch true or false. The command line and the environment",
        "# (ICBD_MASTER, ICBD_TOKEN, ICBD_CA, ICBD_MASTER_KEY) override what is here; a",
        "# command's table may set the global keys for that command alone. Every command has",
        "# a table ([imi.create], [status], ...); the ones below are those a host usually needs.",
        "# `icbd config show COMMAND` prints what a command would start with, and from where.",
        "# Uncomment the tables and keys this host needs.",
        "",
    ]

    def entries(path: tuple[str, ...], actions: dict[str, argparse.Action]) -> None:
        table = ".".join(path)
        for key, action in actions.items():
            if action.default is argparse.SUPPRESS or id(action) not in original:
                continue
            default, required = original[id(action)]
            help_text = (action.help or "").replace("%(default)s", str(default))
            lines.extend("# " + line for line in textwrap.wrap(help_text + (" (required)" if required else ""), 86))
            example = EXAMPLES.get(f"{table}.{key}", EXAMPLES.get(key))
            if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
                value = True  # the switch, as the command line's flag turns it
            elif example is not None:
                value = example
            elif default not in (None, UNSET):
                value = default
            else:
                value = action.metavar or "VALUE"
            if isinstance(action, argparse._AppendAction) and not isinstance(value, list):
                value = [value]
            lines.append(f"#{key} = {_toml(value)}")
            lines.append("")

    lines.append("# --- global keys ---")
    lines.append("# (On the master's own host leave out `master`: TOML cannot hold the key master and")
    lines.append("# the table [master] at once, and commands there reach the master at its [master]")
    lines.append("# advertise or listen address.)")
    lines.append("")
    entries((), options(tree[()]))
    for name in SAMPLE_TABLES:
        if (name,) not in tree:
            continue
        lines.append(f"#[{name}]")
        lines.append("")
        entries((name,), options(tree[(name,)]))
    return "\n".join(lines).rstrip() + "\n"
