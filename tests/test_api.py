"""Bad input: 4xx with a JSON error, never a 5xx (the role of each route is
checked in tests/test_roles.py)."""

import pytest
from trees import make_tree

from harness.cluster import TOKEN


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
    _is_json_error(api("POST", "/v1/imis", json={"name": "ok", "from": str(cluster.root / "does/not/exist")}), 400)
    _is_json_error(api("POST", "/v1/imis", json={"name": "demo", "from": str(cluster.root / "tree")}), 409)
    _is_json_error(api("POST", "/v1/imis", json={"name": "ok", "from": "/tmp"}), 403)  # not a source root
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
    tokens = [TOKEN, cluster.token("node"), cluster.token("reader")]
    for node in cluster.nodes:
        text = (cluster.root / f"{node.id}.log").read_text()
        assert not any(token in text for token in tokens), node.id
