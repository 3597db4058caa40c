"""Bad input and the token: 4xx with a JSON error, never a 5xx."""

import pytest
import requests
from trees import make_tree

from harness.cluster import TOKEN

MASTER_ROUTES = [
    ("GET", "/v1/imis"), ("POST", "/v1/imis"), ("GET", "/v1/imis/demo"), ("DELETE", "/v1/imis/demo"),
    ("POST", "/v1/imis/demo/versions"), ("POST", "/v1/imis/demo/rollback"),
    ("GET", "/v1/imis/demo/versions/1/stream"), ("GET", "/v1/imis/demo/versions/1/manifest"),
    ("GET", "/v1/blocks/" + "0" * 64), ("GET", "/v1/nodes"), ("POST", "/v1/nodes"),
    ("POST", "/v1/nodes/r1/heartbeat"), ("POST", "/v1/subscriptions"), ("DELETE", "/v1/subscriptions"),
    ("PUT", "/v1/imis/demo/versions/1/profile"),
]


@pytest.fixture
def running(cluster, tmp_path):
    cluster.master()
    r1 = cluster.replica("r1")
    cluster.icbd("imi", "create", "demo", "--from", str(make_tree(tmp_path / "tree", big=4096)))
    cluster.icbd("imi", "publish", "demo")
    return cluster, r1


def _is_json_error(response, status):
    assert response.status_code == status, (response.status_code, response.text)
    assert isinstance(response.json()["error"], str) and response.json()["error"]


def test_every_route_needs_the_token(running):
    cluster, r1 = running
    for method, path in MASTER_ROUTES:
        _is_json_error(requests.request(method, cluster.master_node.url + path, timeout=5), 401)
        wrong = {"Authorization": "Bearer not-the-token"}
        _is_json_error(requests.request(method, cluster.master_node.url + path, headers=wrong, timeout=5), 401)
    for method, path in [("POST", "/v1/notify"), ("GET", "/v1/imis"), ("GET", "/v1/blocks/" + "0" * 64)]:
        _is_json_error(requests.request(method, r1.url + path, timeout=5), 401)
    assert requests.get(cluster.master_node.url + "/", timeout=5).status_code == 200


def test_bad_requests_get_4xx_json(running):
    cluster, _ = running
    api = cluster.api
    _is_json_error(api("GET", "/v1/nowhere"), 404)
    _is_json_error(api("PATCH", "/v1/imis"), 405)
    _is_json_error(api("POST", "/v1/imis", data=b"{not json", headers={"Content-Type": "application/json"}), 400)
    _is_json_error(api("POST", "/v1/imis", data=b"\xff\xfe", headers={"Content-Type": "application/json"}), 400)
    _is_json_error(api("POST", "/v1/imis", json=["a list"]), 400)
    _is_json_error(api("POST", "/v1/imis", json={"name": "Bad Name", "from": "/tmp"}), 400)
    _is_json_error(api("POST", "/v1/imis", json={"name": "x" * 65, "from": "/tmp"}), 400)
    _is_json_error(api("POST", "/v1/imis", json={"name": "ok", "from": "relative/path"}), 400)
    _is_json_error(api("POST", "/v1/imis", json={"name": "ok", "from": "/does/not/exist"}), 400)
    _is_json_error(api("POST", "/v1/imis", json={"name": "demo", "from": "/tmp"}), 409)
    _is_json_error(api("POST", "/v1/imis", data=b"x" * (2 << 20)), 413)
    for version in ("0", "-1", "abc", "99999999999", "1.5", "%2e%2e", "１"):
        response = api("GET", f"/v1/imis/demo/versions/{version}")
        assert response.status_code in (400, 404), (version, response.status_code)
    for path in ("/v1/imis/..%2f..%2fetc", "/v1/imis/%2e%2e/versions/1/manifest", "/v1/imis/demo%00/versions",
                 "/v1/blocks/..%2f..%2fetc%2fpasswd", "/v1/imis/demo/versions/1/manifest/../../../../etc/passwd"):
        response = api("GET", path)
        assert 400 <= response.status_code < 500, (path, response.status_code)
        assert "root:" not in response.text
    _is_json_error(api("POST", "/v1/imis/demo/rollback", json={"version": 7}), 404)
    _is_json_error(api("POST", "/v1/imis/demo/rollback", json={"version": True}), 400)
    _is_json_error(api("POST", "/v1/subscriptions", json={"imi": "demo", "node": "nobody"}), 404)


def test_streams_only_for_registered_nodes(running):
    cluster, _ = running
    _is_json_error(cluster.api("GET", "/v1/imis/demo/versions/1/stream"), 403)
    _is_json_error(cluster.api("GET", "/v1/imis/demo/versions/1/stream", headers={"X-Icbd-Node": "stranger"}), 403)
    ok = cluster.api("GET", "/v1/imis/demo/versions/1/stream", headers={"X-Icbd-Node": "r1"})
    assert ok.status_code == 200 and ok.content[:8] == b"btrfs-st"
    _is_json_error(cluster.api("GET", "/v1/imis/demo/versions/1/stream?parent=1", headers={"X-Icbd-Node": "r1"}), 400)


def test_cli_refuses_bad_names_with_one_line(running):
    cluster, _ = running
    for bad in ("Upper", "-lead", "a/b", "..", "x" * 65, "sp ace"):
        result = cluster.icbd("imi", "publish", "--", bad, check=False)
        assert result.returncode != 0
        assert result.stderr.startswith("icbd: invalid iMI name") and result.stderr.count("\n") == 1, result.stderr
    result = cluster.icbd("imi", "versions", "nosuch", check=False)
    assert result.returncode == 1 and result.stderr == "icbd: no iMI named 'nosuch'\n"
    bad_token = cluster.icbd("--token", "wrong-token-123", "imi", "list", check=False)
    assert bad_token.returncode == 1 and "token" in bad_token.stderr


def test_json_shapes(running):
    cluster, r1 = running
    cluster.icbd("subscribe", "demo", "--node", "r1")
    cluster.wait_held(r1, "demo", [1])
    versions = cluster.icbd_json("imi", "versions", "demo")
    assert versions["name"] == "demo" and versions["latest"] == 1
    v = versions["versions"][0]
    assert set(v) >= {"version", "digest", "bytes", "created", "message"} and len(v["digest"]) == 64
    status = cluster.icbd_json("status")
    nodes = {n["id"]: n for n in status["nodes"]}
    assert nodes["r1"]["role"] == "replica" and nodes["r1"]["site"] == "a"
    assert nodes["r1"]["state"] == "alive" and nodes["r1"]["versions"] == {"demo": [1]}
    t = nodes["r1"]["transfers"][-1]
    assert set(t) >= {"imi", "version", "parent", "bytes", "seconds", "state"} and t["state"] == "done"
    assert nodes["master"]["role"] == "master" and nodes["master"]["url"].startswith("http://")
    text = cluster.icbd("status").stdout
    assert "r1" in text and "alive" in text and "demo:1" in text


def test_token_is_never_logged(running):
    cluster, r1 = running
    cluster.icbd("subscribe", "demo", "--node", "r1")
    cluster.wait_held(r1, "demo", [1])
    for node in cluster.nodes:
        assert TOKEN not in (cluster.root / f"{node.id}.log").read_text()
