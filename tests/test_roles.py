"""Credentials and roles on real nodes: every route of every node answers
each kind of caller as the contract says; revocation reaches the master at
once and every node within a heartbeat; a site cut off from the master keeps
admitting its mounts; the token commands; source roots; node URL checks;
the master calls its nodes with a node credential; no token in a daemon's
command line."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
from dataclasses import dataclass

import pytest
import requests
from procs import cmdline
from routetables import route_tables
from trees import make_tree

from harness.cluster import ICBD, REPO, TOKEN, Cluster, wait_for
from icbdcore.auth import ADMIN, NODE, READER, allows, token_hash
from icbdcore.manifest import Manifest

pytestmark = pytest.mark.btrfs

MUTATING = ("POST", "PUT", "DELETE")


@dataclass
class World:
    cluster: Cluster
    urls: dict[str, str]
    tokens: dict[str | None, str | None]  # kind of caller -> the token it presents
    digest: str  # a block of demo v1


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("roles")
    cluster = Cluster(root)
    try:
        cluster.master()
        r1 = cluster.replica("r1")
        cluster.icbd("imi", "create", "demo", "--from", str(make_tree(root / "tree", big=2 << 20)))
        cluster.icbd("imi", "publish", "demo")
        cluster.icbd("subscribe", "demo", "--node", "r1")
        cluster.wait_held(r1, "demo", [1])
        cache = cluster.cache("cache")
        wait_for(lambda: "r1" in {u["id"] for u in cache.status()["fetcher"]["upstreams"]},
                 what="the cache to know r1")
        tokens = {None: None, "unknown": "not-a-token-anyone-issued"}
        for role in (READER, NODE, ADMIN):
            tokens[role] = _issue(cluster, role, f"matrix-{role}")
        tokens["revoked"] = _issue(cluster, ADMIN, "matrix-revoked")
        cluster.icbd("token", "revoke", "matrix-revoked")
        manifest = Manifest.from_bytes(cluster.api("GET", "/v1/imis/demo/versions/1/manifest").content)
        world = World(cluster, {"master": cluster.master_node.url, "replica": r1.url, "cache": cache.url},
                      tokens, sorted(manifest.digests())[0])
        # Every node holds the table without the revoked token before the matrix runs.
        for url in (r1.url, cache.url):
            wait_for(lambda url=url: _get(url + "/v1/auth", tokens["revoked"]).status_code == 401,
                     timeout=10, what="the revocation to reach every node")
        yield world
    finally:
        cluster.stop_all()


def _issue(cluster: Cluster, role: str, name: str) -> str:
    return json.loads(cluster.icbd("--json", "token", "create", "--role", role, "--name", name).stdout)["token"]


def _get(url: str, token: str | None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(url, headers=headers, timeout=10)


def _path(template: str, method: str, digest: str) -> str:
    """A concrete path for a route: real objects for reads, names that do not
    exist for changes (the admin's calls must change nothing)."""
    mutating = method in MUTATING
    return template.format(
        name="nosuch" if mutating else "demo", version="1", digest=digest, node_id="nosuch-node",
        token_name="nosuch-token", job_id="999")


def _expected(caller: str | None, needed: str | None) -> str:
    if needed is None:
        return "open"
    if caller in (None, "unknown", "revoked"):
        return "401"
    return "allowed" if allows(caller, needed) else "403"


def test_every_route_of_every_node_answers_each_caller_as_the_contract_says(world, tmp_path):
    tables = route_tables(tmp_path)
    checked = 0
    wrong = []
    for kind, table in tables.items():
        for (method, template), needed in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            path = _path(template, method, world.digest)
            for caller, token in world.tokens.items():
                headers = {"X-Icbd-Node": "r1"}  # streams are for registered nodes, whoever asks
                if token:
                    headers["Authorization"] = f"Bearer {token}"
                body = {} if method in MUTATING else None
                response = requests.request(method, world.urls[kind] + path, headers=headers, json=body,
                                            timeout=30, stream=True)
                status = response.status_code
                response.close()
                expected = _expected(caller, needed)
                ok = {"open": status == 200, "401": status == 401, "403": status == 403,
                      "allowed": status < 500 and status not in (401, 403)}[expected]
                if not ok:
                    wrong.append(f"{kind} {method} {path} as {caller}: {status}, expected {expected}")
                checked += 1
    assert not wrong, "\n".join(wrong)
    assert checked >= 6 * 40


def test_auth_route_names_the_caller(world):
    for role in (READER, NODE, ADMIN):
        for url in world.urls.values():
            answer = _get(url + "/v1/auth", world.tokens[role])
            assert answer.json() == {"role": role, "name": f"matrix-{role}"}
    assert _get(world.urls["replica"] + "/v1/auth", TOKEN).json() == {"role": ADMIN, "name": "master"}


def test_token_commands(world):
    cluster = world.cluster
    made = cluster.icbd("token", "create", "--role", "reader", "--name", "cli-made")
    token = made.stdout.strip()
    assert made.stdout == token + "\n" and "cli-made" in made.stderr  # the token alone on stdout
    assert _get(world.urls["master"] + "/v1/auth", token).json() == {"role": "reader", "name": "cli-made"}
    listed = cluster.icbd_json("token", "list")
    names = {t["name"]: t for t in listed["tokens"]}
    assert names["cli-made"]["role"] == "reader" and names["master"]["builtin"]
    assert "token" not in json.dumps(listed).replace('"tokens"', "")  # names and roles, never a token
    assert "cli-made" in cluster.icbd("token", "list").stdout
    stored = (cluster.root / "master" / "tokens.json").read_text()
    assert token not in stored and TOKEN not in stored and token_hash(token) in stored
    assert cluster.icbd("token", "revoke", "cli-made").returncode == 0
    assert _get(world.urls["master"] + "/v1/auth", token).status_code == 401
    again = cluster.icbd("token", "revoke", "cli-made", check=False)
    assert again.returncode == 1 and again.stderr.startswith("icbd: no token named") and again.stderr.count("\n") == 1
    denied = cluster.icbd("--token", world.tokens[NODE], "token", "list", check=False)
    assert denied.returncode == 1 and "needs the admin role" in denied.stderr
    bad = cluster.icbd("token", "create", "--role", "root", check=False)
    assert bad.returncode == 2


def test_from_etc_is_refused(world):
    cluster = world.cluster
    result = cluster.icbd("imi", "create", "stolen", "--from", "/etc", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "/etc is not below a source root" in result.stderr and str(cluster.root) in result.stderr
    link = cluster.root / "innocent"
    link.symlink_to("/etc")
    answer = cluster.api("POST", "/v1/imis", json={"name": "stolen", "from": str(link)})
    assert answer.status_code == 403 and "not below a source root" in answer.json()["error"]
    answer = cluster.api("POST", "/v1/imis", json={"name": "stolen", "from": str(cluster.root / "master")})
    assert answer.status_code == 403 and "data folder" in answer.json()["error"]
    assert "stolen" not in {i["name"] for i in cluster.api("GET", "/v1/imis").json()["imis"]}


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:21", "http://127.0.0.1:0", "http://127.0.0.1:70000",
                                 "http://admin:pw@127.0.0.1:80", "http://127.0.0.1:80/v1/imis",
                                 "http://127.0.0.1:80/?x=1", "http://127.0.0.1:80#top", "http://",
                                 "http://169.254.169.254/latest/meta-data"])
def test_node_urls_are_checked_at_registration(world, url):
    registration = {"id": "odd-node", "role": "cache", "site": "a", "url": url}
    answer = requests.post(world.urls["master"] + "/v1/nodes", json=registration, timeout=10,
                           headers={"Authorization": f"Bearer {world.tokens[NODE]}"})
    assert answer.status_code == 400 and answer.json()["error"].startswith("invalid node URL"), answer.text
    assert "odd-node" not in world.cluster.nodes_status()


# --- revocation and cut-off sites -------------------------------------------------------------


def test_revocation_reaches_every_node_and_a_cut_off_site_keeps_admitting(cluster, tmp_path):
    cluster.master()
    r1 = cluster.replica("r1")
    cache = cluster.cache("cache")
    reader = _issue(cluster, READER, "desk")
    doomed = _issue(cluster, READER, "lost-laptop")
    for url in (cluster.master_node.url, r1.url, cache.url):
        wait_for(lambda url=url: _get(url + "/v1/imis", doomed).status_code == 200, timeout=10,
                 what="the new tokens to reach every node")
    cluster.icbd("token", "revoke", "lost-laptop")
    assert _get(cluster.master_node.url + "/v1/imis", doomed).status_code == 401  # at once
    for node in (r1, cache):
        wait_for(lambda node=node: _get(node.url + "/v1/imis", doomed).status_code == 401,
                 timeout=4 * cluster.heartbeat + 3, what=f"{node.id} to refuse the revoked token")
        assert _get(node.url + "/v1/imis", reader).status_code == 200
    # Cut off from the master, and restarted while cut off: the site still
    # admits its mounts, and still refuses what was revoked.
    cluster.master_node.stop()
    cache.stop()
    cache.start()
    for node in (r1, cache):
        assert _get(node.url + "/v1/imis", reader).status_code == 200
        assert _get(node.url + "/v1/imis", doomed).status_code == 401
        assert _get(node.url + "/v1/imis", None).status_code == 401


def test_master_calls_its_nodes_with_a_node_credential(cluster, tmp_path):
    """The master's notify goes to URLs that nodes registered: it carries the
    master's own node credential, never its admin token."""
    cluster.master()
    cluster.icbd("imi", "create", "demo", "--from", str(make_tree(tmp_path / "tree", big=4096)))
    seen: list[str] = []

    class Spy(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            seen.append(self.headers.get("Authorization", ""))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Spy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        node_token = cluster.token("node")
        as_node = {"Authorization": f"Bearer {node_token}"}
        url = f"http://127.0.0.1:{server.server_address[1]}"
        registration = {"id": "spy", "role": "replica", "site": "a", "url": url}
        assert cluster.api("POST", "/v1/nodes", json=registration, headers=as_node).status_code == 201
        assert cluster.api("POST", "/v1/nodes/spy/heartbeat", json={}, headers=as_node).status_code == 200
        cluster.icbd("subscribe", "demo", "--node", "spy")
        wait_for(lambda: seen, timeout=10, what="the master to notify the spy")
    finally:
        server.shutdown()
    presented = seen[0].removeprefix("Bearer ")
    assert presented != TOKEN
    assert _get(cluster.master_node.url + "/v1/auth", presented).json() == {"role": NODE, "name": "master-notify"}


# --- no token in a daemon's command line ---------------------------------------------------------


@pytest.mark.fuse
def test_no_token_in_the_command_line_of_a_running_node_or_mount(cluster, tmp_path):
    """Given `--token T` on the command line, a replica and a mount re-exec
    themselves with T in their environment: same pid, T gone from
    /proc/PID/cmdline, and they work."""
    cluster.master()
    cluster.icbd("imi", "create", "demo", "--from", str(make_tree(tmp_path / "tree", big=4096)))
    cluster.icbd("imi", "publish", "demo")
    node_token = cluster.token("node")
    r1 = cluster.replica("r1", start=False, extra=["--token", node_token])
    r1.credential = None
    r1.env = {k: v for k, v in cluster.env.items() if k != "ICBD_TOKEN"}
    r1.start()
    cluster.icbd("subscribe", "demo", "--node", "r1")
    cluster.wait_held(r1, "demo", [1])
    assert node_token.encode() not in cmdline(r1.pid) and b"replica" in cmdline(r1.pid)

    reader = cluster.token("reader")
    cache = cluster.cache("cache")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    env = {k: v for k, v in cluster.env.items() if k != "ICBD_TOKEN"}
    log = open(tmp_path / "mount.log", "wb")  # noqa: SIM115 - closed below
    mount = subprocess.Popen([*ICBD, "--token", reader, "mount", str(mountpoint), "--foreground",
                              "--cache", cache.url, "--cache-dir", str(tmp_path / "mnt-state"),
                              "--timeout", "5"], env=env, cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (mountpoint / "demo" / "1" / "etc" / "hostname").read_text() == "desktop-1\n",
                 timeout=60, what="the mount to read demo v1")
        assert reader.encode() not in cmdline(mount.pid) and b"mount" in cmdline(mount.pid)
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
        try:
            mount.wait(15)
        except subprocess.TimeoutExpired:
            mount.kill()
            mount.wait(10)
        log.close()
