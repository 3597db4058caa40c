"""The config file (icbd/config.py), as any user: what it may hold comes
from the command line's own parser; the command line beats the environment,
which beats the file, which beats the defaults; a bad key or value names
the file, the key and what is allowed, and nothing starts. And the command
line's companions: --version, shell completion, the sample config."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from icbd import cli, config

REPO = Path(__file__).resolve().parent.parent
ICBD = [sys.executable, "-m", "icbd.cli"]


def run(*args: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ICBD_")}
    base["PYTHONPATH"] = str(REPO)
    result = subprocess.run([*ICBD, *args], capture_output=True, text=True, env={**base, **(env or {})},
                            cwd=REPO, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"icbd {' '.join(args)}: {result.returncode}: {result.stderr}")
    return result


def shown(path: Path, *command: str, env: dict | None = None) -> dict[str, dict]:
    """`icbd --config PATH --json config show COMMAND`: key -> {value, from, table}."""
    doc = json.loads(run("--config", str(path), "--json", "config", "show", *command, env=env, check=True).stdout)
    rows = doc["settings"][" ".join(command).replace(" ", ".") if command else "global"]
    return {row["key"]: row for row in rows}


class Recorder(http.server.BaseHTTPRequestHandler):
    """A stand-in master that answers `GET /v1/nodes` and remembers it was asked."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.server.asked.append(self.path)
        body = json.dumps({"nodes": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def masters():
    """Three stand-in masters on loopback: where `icbd status` goes tells which setting won."""
    servers = []
    for _ in range(3):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
        server.asked = []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield [(f"http://127.0.0.1:{s.server_address[1]}", s) for s in servers]
    for server in servers:
        server.shutdown()
        server.server_close()


def test_the_command_line_beats_the_environment_which_beats_the_file(tmp_path, masters):
    """A real command (`icbd status`) asks the master the file names, unless
    ICBD_MASTER names another, unless --master names a third."""
    (file_url, file_master), (env_url, env_master), (flag_url, flag_master) = masters
    conf = tmp_path / "icbd.toml"
    conf.write_text(f'master = "{file_url}"\ntoken-file = "{tmp_path / "token"}"\n')
    (tmp_path / "token").write_text("reader-token-0123456789\n")

    run("--config", str(conf), "status", check=True)
    assert file_master.asked == ["/v1/nodes"] and not env_master.asked and not flag_master.asked

    run("--config", str(conf), "status", env={"ICBD_MASTER": env_url}, check=True)
    assert env_master.asked == ["/v1/nodes"] and len(file_master.asked) == 1

    run("--config", str(conf), "--master", flag_url, "status", env={"ICBD_MASTER": env_url}, check=True)
    assert flag_master.asked == ["/v1/nodes"] and len(env_master.asked) == 1 and len(file_master.asked) == 1

    # The file named by ICBD_CONFIG instead of --config.
    run("status", env={"ICBD_CONFIG": str(conf)}, check=True)
    assert len(file_master.asked) == 2


def test_config_show_says_where_each_setting_came_from(tmp_path):
    conf = tmp_path / "icbd.toml"
    conf.write_text('master = "http://global:1"\nca = "/etc/ssl/certs/ca-certificates.crt"\n'
                    '[replica]\ndata = "/srv/icbd"\nsite = "paris"\nheartbeat = 3\nmaster = "http://replica:2"\n'
                    '[mount]\ncache = ["https://c1:7402", "https://c2:7402"]\nno-replica-fallback = true\n'
                    '[imi.create]\nfrom = "/srv/trees/desktop"\n')
    system_ca = "/etc/ssl/certs/ca-certificates.crt"  # a real CA file: the command line checks it
    if not Path(system_ca).exists():
        pytest.skip("needs the system's CA bundle (ca-certificates)")
    conf.write_text(conf.read_text().replace(f'ca = "{system_ca}"', 'ca = "/file/ca.pem"'))
    replica = shown(conf, "replica", env={"ICBD_CA": system_ca})
    assert replica["data"]["value"] == "/srv/icbd" and replica["data"]["from"] == f"{conf} [replica]"
    assert replica["heartbeat"]["value"] == 3.0  # the option's own type: a float
    assert replica["master"]["value"] == "http://replica:2"  # the command's table beats the global key
    assert replica["ca"]["value"] == system_ca and replica["ca"]["from"] == "environment ICBD_CA"
    assert replica["keep"] == {"key": "keep", "table": "replica", "value": 5, "from": "default"}
    assert replica["listen"]["from"] == "required: not set"
    mount = shown(conf, "mount", env={"ICBD_CA": system_ca})
    assert mount["cache"]["value"] == ["https://c1:7402", "https://c2:7402"]
    assert mount["no-replica-fallback"]["value"] is True
    assert mount["master"]["value"] == "http://global:1" and mount["master"]["from"] == f"{conf} (global)"
    assert shown(conf, "imi", "create", env={"ICBD_CA": system_ca})["from"]["value"] == "/srv/trees/desktop"
    text = run("--config", str(conf), "config", "show", "replica", env={"ICBD_CA": system_ca}, check=True).stdout
    assert 'data = "/srv/icbd"' in text and f"# {conf} [replica]" in text


def test_a_table_may_give_what_the_command_line_requires(tmp_path):
    """`icbd replica` needs --data, --listen and --site: the file may give them."""
    parser = cli.build_parser()
    original = config.prepare(parser)
    conf = tmp_path / "icbd.toml"
    conf.write_text('[replica]\ndata = "/srv/icbd"\nlisten = "0.0.0.0:7401"\nsite = "paris"\n'
                    'resume-spool = "always"\n')
    found = config.load(parser, config.locate(str(conf)))
    args = parser.parse_args(["replica", "--site", "lyon"])
    origins = config.resolve(parser, ("replica",), args, found, original, environ={})
    assert (args.data, args.listen, args.site, args.resume_spool) == ("/srv/icbd", "0.0.0.0:7401", "lyon", "always")
    assert origins["site"] == "command line" and origins["data"] == f"{conf} [replica]"
    # Without the file, what is required is still required.
    args = parser.parse_args(["replica", "--site", "lyon"])
    with pytest.raises(config.ConfigError, match="required: --data, --listen"):
        config.resolve(parser, ("replica",), args, config.locate(str(tmp_path / "none")), original, environ={})


def test_repeated_flags_replace_the_file_s_list(tmp_path):
    parser = cli.build_parser()
    original = config.prepare(parser)
    conf = tmp_path / "icbd.toml"
    conf.write_text('[mount]\ncache = ["https://c1:7402", "https://c2:7402"]\n')
    found = config.load(parser, config.locate(str(conf)))
    args = parser.parse_args(["mount", "/imis", "--cache", "https://c9:7402"])
    config.resolve(parser, ("mount",), args, found, original, environ={})
    assert args.cache == ["https://c9:7402"]
    args = parser.parse_args(["mount", "/imis"])
    config.resolve(parser, ("mount",), args, found, original, environ={})
    assert args.cache == ["https://c1:7402", "https://c2:7402"]


@pytest.mark.parametrize(("text", "message"), [
    ('[replica]\nsitee = "x"\n', "[replica] unknown key 'sitee': a key of [replica] is one of advertise, ca, data"),
    ('[replica]\nheartbeat = "fast"\n', "[replica] heartbeat = 'fast': wants a number"),
    ('[cache]\nsize = "lots"\n', "[cache] size = 'lots': not a size: 'lots' (e.g. 512M, 4G)"),
    ('[replica]\nresume-spool = "sometimes"\n', "wants one of auto, always, never"),
    ('[mount]\nno-profiles = "yes"\n', "[mount] no-profiles = 'yes': wants true or false"),
    ('[mount]\ncache = [["nested"]]\n', "[mount] cache = [['nested']]: wants a string"),
    ('[replica]\nimage_size = "1G"\n', "options are spelt with dashes ('image-size')"),
    ('token = "secret"\n', "'token' is not a setting: a token does not belong in a config file"),
    ('bogus = 1\n', "unknown key 'bogus': a global key is one of ca, master, master-key, token-file; tables:"),
    ('[imi]\ncreate = "x"\n', "[imi] create names a command: write its settings as a table [imi.create]"),
    ('[replica\ndata = 1\n', "not valid TOML"),
])
def test_a_bad_file_names_the_file_and_the_key_and_nothing_starts(tmp_path, text, message):
    conf = tmp_path / "icbd.toml"
    conf.write_text(text)
    # A command that needs none of it is refused too: the whole file is checked.
    result = run("--config", str(conf), "--master", "http://127.0.0.1:9", "key", "show")
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"icbd: {conf}: "), result.stderr
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_a_config_file_named_but_missing_is_refused_the_default_one_is_optional(tmp_path):
    result = run("--config", str(tmp_path / "nope.toml"), "config", "show")
    assert result.returncode == 2 and "no such config file (named by --config)" in result.stderr
    result = run("config", "show", env={"ICBD_CONFIG": str(tmp_path / "nope.toml")})
    assert result.returncode == 2 and "(named by ICBD_CONFIG)" in result.stderr
    if not config.DEFAULT_PATH.exists():
        doc = json.loads(run("--json", "config", "show", check=True).stdout)
        assert doc["loaded"] is False and doc["named_by"] == "default"


def test_every_option_of_every_command_is_a_key_and_the_sample_holds_them(tmp_path):
    """The sample config, uncommented, is a valid file setting every key of
    its tables: nothing a command line takes is missing from the file."""
    sample = run("config", "sample", check=True).stdout
    parser = cli.build_parser()
    tree = config.commands(parser)

    def uncommented(line: str) -> str:
        setting = line.startswith("#") and not line.startswith("# ") and (" = " in line or line.startswith("#["))
        return line[1:] if setting and not line.startswith("#master = ") else line

    # Every table and key but the global master, which TOML cannot hold beside [master].
    active = "\n".join(uncommented(line) for line in sample.splitlines())
    conf = tmp_path / "all.toml"
    conf.write_text(active)
    found = config.load(parser, config.locate(str(conf)))
    for table in config.SAMPLE_TABLES:
        keys = {name for name, action in config.options(tree[(table,)]).items()
                if action.default is not __import__("argparse").SUPPRESS}
        assert keys, table
        assert keys <= {value.key for value in found.settings.get((table,), {}).values()}, table
    assert {"token-file", "ca", "master-key"} <= {v.key for v in found.settings[()].values()}


def test_on_the_master_s_host_commands_reach_it_at_its_listen_address(tmp_path):
    conf = tmp_path / "icbd.toml"
    conf.write_text('[master]\nlisten = "0.0.0.0:7400"\n')
    assert shown(conf)["master"]["value"] == "http://127.0.0.1:7400"
    conf.write_text('[master]\nlisten = "0.0.0.0:7400"\nadvertise = "https://master.example.org:7400"\n')
    assert shown(conf)["master"]["value"] == "https://master.example.org:7400"
    conf.write_text('master = "https://elsewhere:7400"\n[master]\nlisten = "0.0.0.0:7400"\n')
    result = run("--config", str(conf), "config", "show")
    assert result.returncode == 2
    assert "the global key master and the [master] table cannot both be in one TOML file" in result.stderr


def test_version_and_completion():
    version = run("--version", check=True).stdout.strip()
    assert version.startswith("icbd ") and version != "icbd unknown"
    script = run("completion", "bash", check=True).stdout
    bash = shutil.which("bash")
    assert bash
    # Real bash completes the commands, and an option of one of them.
    probe = ('source /dev/stdin; COMP_WORDS=(icbd rep); COMP_CWORD=1; COMP_LINE="icbd rep"; COMP_POINT=8; '
             '_shtab_icbd; echo "${COMPREPLY[@]}"; '
             'COMP_WORDS=(icbd replica --resume-s); COMP_CWORD=2; COMP_LINE="icbd replica --resume-s"; '
             'COMP_POINT=23; _shtab_icbd; echo "${COMPREPLY[@]}"')
    out = subprocess.run([bash, "-c", probe], input=script, capture_output=True, text=True, timeout=30)
    lines = out.stdout.splitlines()
    assert sorted(lines[0].split()) == ["replay", "replica"], out
    assert "--resume-spool" in lines[1], out


def test_the_man_page_is_made_from_help(tmp_path):
    help2man = shutil.which("help2man")
    if help2man is None:
        pytest.skip("needs help2man (scripts/install-packages installs it)")
    wrapper = tmp_path / "icbd"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m icbd.cli \"$@\"\n")
    wrapper.chmod(0o755)
    page = tmp_path / "icbd.1"
    subprocess.run([help2man, "--no-info", "--section=1", f"--include={REPO / 'contrib' / 'icbd.h2m'}",
                    f"--output={page}", str(wrapper)], check=True, env={**os.environ, "ICBD_CONFIG": "/dev/null"},
                   timeout=60)
    text = page.read_text()
    assert ".TH ICBD" in text and "replicate and cache desktop machine images" in text
    assert "config show" in text and "/etc/icbd/icbd.toml" in text and "mount.fuse.icbd" in text
    if shutil.which("man"):
        rendered = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True,
                                  env={**os.environ, "MANPAGER": "cat", "COLUMNS": "100"}, timeout=60).stdout
        assert "doctor" in rendered and "FILES" in rendered
