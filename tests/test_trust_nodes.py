"""The signed chain on real nodes: replicas, a cache server and mounts believe
only what the master's key signed, never go back to an older catalogue
(also after a restart), pin the master's key at first contact without
--master-key, and refuse forged manifests, stream records, profiles and
blocks. Forgeries come from tests/forgingproxy.py, placed between a node and
its upstream."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time

import pytest
import requests
from forgingproxy import ForgingProxy
from trees import make_tree

from harness.cluster import ICBD, REPO, Cluster, wait_for
from icbdcore.layout import Layout
from icbdcore.signing import SigningKey

pytestmark = [pytest.mark.btrfs]

MIB = 1 << 20


def _json(cluster: Cluster, path: str, node=None) -> dict:
    response = cluster.api("GET", path, node=node)
    assert response.status_code == 200, (path, response.status_code, response.text)
    return response.json()


def _log(cluster: Cluster, name: str) -> str:
    return (cluster.root / f"{name}.log").read_text(errors="replace")


def _publish(cluster: Cluster, work, name: str = "demo", content: str = "x") -> int:
    (work / "etc" / "hostname").write_text(content + "\n")
    return cluster.icbd_json("imi", "publish", name)["version"]


@pytest.fixture
def proxies():
    made: list[ForgingProxy] = []

    def make(upstream: str) -> ForgingProxy:
        proxy = ForgingProxy(upstream)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


def _replay(old: bytes):
    return lambda answer: (200, old) if answer[0] == 200 else None


def _replay_in_heartbeat(old: dict):
    def forge(answer):
        status, body = answer
        if status != 200:
            return None
        reply = json.loads(body)
        reply["catalog"] = old
        return 200, json.dumps(reply).encode()

    return forge


@pytest.mark.fuse
def test_a_replayed_older_catalogue_is_refused_by_every_tier_also_after_a_restart(cluster, tmp_path, proxies):
    master = cluster.master()
    to_master_r, to_master_c = proxies(master.url), proxies(master.url)
    r1 = cluster.replica("r1", extra=["--master", to_master_r.url])
    cache = cluster.cache("cache", extra=["--master", to_master_c.url])
    cluster.icbd("imi", "create", "demo", "--from", str(make_tree(tmp_path / "tree", big=2 * MIB)))
    work = master.data / "work" / "demo"
    _publish(cluster, work, content="one")
    cluster.icbd("subscribe", "demo", "--node", "r1")
    cluster.wait_held(r1, "demo", [1])
    old_doc = _json(cluster, "/v1/imis")
    old = json.dumps(old_doc).encode()
    _publish(cluster, work, content="two")
    cluster.wait_held(r1, "demo", [1, 2])
    new_serial = _json(cluster, "/v1/imis")["serial"]
    assert new_serial > old_doc["serial"]
    wait_for(lambda: cache.status()["catalog_serial"] >= new_serial, what="the cache to take the new catalogue")
    to_cache = proxies(cache.url)
    mount = cluster.mount("mnt", cache=to_cache.url)
    demo = mount.mountpoint / "demo"
    wait_for(lambda: "2" in os.listdir(demo), what="the mount to show version 2")
    assert (demo / "2" / "etc" / "hostname").read_text() == "two\n"

    # Every upstream now replays the catalogue of before version 2.
    to_master_r.forge("POST", r"/v1/nodes/r1/heartbeat", _replay_in_heartbeat(old_doc))
    to_master_c.forge("GET", "/v1/imis", _replay(old))
    to_cache.forge("GET", "/v1/imis", _replay(old))
    wait_for(lambda: to_master_r.forged >= 4 and to_master_c.forged >= 3 and to_cache.forged >= 3,
             what="the replays to be served a few times")
    for line, name in (("refusing the master's heartbeat reply", "r1"), ("refusing what the master sent", "cache"),
                       ("refusing the catalogue from", "mnt")):
        wait_for(lambda line=line, name=name: line in _log(cluster, name) and "older than serial" in _log(cluster, name),
                 what=f"{name} to log the refusal")
    # Had the replica believed it, it would have pruned version 2 (not in that catalogue).
    assert r1.status()["versions"] == {"demo": [1, 2]} and r1.status()["catalog_serial"] >= new_serial
    assert _json(cluster, "/v1/imis", node=cache)["serial"] >= new_serial
    assert cache.status()["catalogs_refused"] >= 1
    assert sorted(os.listdir(demo)) == ["1", "2", "latest"]
    status = mount.status()
    assert status["catalog_serial"] >= new_serial and status["catalogs_refused"] >= 1

    # After a restart, the high-water mark still refuses it.
    mount.stop()
    r1.stop()
    cache.stop()
    r1.start()
    cache.start()
    time.sleep(3)  # several heartbeats and polls, each answered with the replay
    assert r1.status()["versions"] == {"demo": [1, 2]} and r1.status()["catalog_serial"] >= new_serial
    assert _json(cluster, "/v1/imis", node=cache)["serial"] >= new_serial
    result = subprocess.run([*ICBD, "mount", str(mount.mountpoint), "--foreground", "--cache", to_cache.url,
                             "--cache-dir", str(cluster.root / "mnt-cache"), "--timeout", "5"],
                            capture_output=True, text=True, env=cluster.env, cwd=REPO, timeout=60)
    last = result.stderr.strip().splitlines()[-1]  # in the foreground, the log goes to stderr too
    assert result.returncode == 1 and last.startswith("icbd: ") and "older than serial" in last, result.stderr
    # Once the replays stop, all is well.
    for proxy in (to_master_r, to_master_c, to_cache):
        proxy.clear()
    mount = cluster.mount("mnt", cache=to_cache.url)
    assert (demo / "2" / "etc" / "hostname").read_text() == "two\n"


def test_a_site_cut_off_keeps_serving_and_says_how_old_its_catalogue_is(cluster, tmp_path):
    master = cluster.master()
    r1 = cluster.replica("r1")
    cluster.icbd("imi", "create", "demo", "--from", str(make_tree(tmp_path / "tree", big=2 * MIB)))
    _publish(cluster, master.data / "work" / "demo")
    cluster.icbd("subscribe", "demo", "--node", "r1")
    cluster.wait_held(r1, "demo", [1])
    cache = cluster.cache("cache")
    serial = _json(cluster, "/v1/imis")["serial"]
    wait_for(lambda: cache.status()["catalog_serial"] == serial, what="the cache to take the catalogue")
    master.stop()
    wait_for(lambda: not cache.status()["master_reachable"], what="the cache to notice")
    first = cache.status()["catalog_age_s"]
    time.sleep(2.5)
    status = cache.status()
    assert status["catalog_serial"] == serial and status["catalog_age_s"] >= first + 2
    assert r1.status()["catalog_serial"] == serial and r1.status()["catalog_age_s"] >= 2
    assert cluster.api("GET", "/v1/imis/demo/versions/1/manifest", node=cache).status_code == 200
    assert _json(cluster, "/v1/imis", node=cache)["serial"] == serial


def test_trust_on_first_use_pins_the_key_and_refuses_another(cluster, tmp_path):
    master = cluster.master()
    first_key = cluster.learn_master_key()
    r1 = cluster.replica("r1", tofu=True)
    cache = cluster.cache("cache", tofu=True)
    cluster.icbd("imi", "create", "demo", "--from", str(make_tree(tmp_path / "tree", big=2 * MIB)))
    work = master.data / "work" / "demo"
    _publish(cluster, work)
    cluster.icbd("subscribe", "demo", "--node", "r1")
    cluster.wait_held(r1, "demo", [1])
    for node in (r1, cache):
        wait_for(lambda node=node: node.status().get("master_key") == first_key, what=f"{node.id} to pin the key")
        trust = json.loads(Layout(node.data).trust_file.read_text())
        assert trust["key"] == first_key and trust["how"] == "first contact"
        assert "trusting the master key" in _log(cluster, node.id)
    wait_for(lambda: [len(i["versions"]) for i in _json(cluster, "/v1/imis", node=cache)["imis"]] == [1],
             what="the cache to take version 1")

    # The master's key is replaced (its keys/ lost): what it signs now is refused.
    master.stop()
    subprocess.run(["rm", "-rf", str(Layout(master.data).keys)], check=True)
    master.start()
    second_key = cluster.learn_master_key()
    assert second_key != first_key
    assert "signing the record of version 1" in _log(cluster, "master")
    _publish(cluster, work, content="two")
    for node in (r1, cache):
        wait_for(lambda node=node: f"presents the master key {second_key}" in _log(cluster, node.id),
                 what=f"{node.id} to refuse the new key")
    assert r1.status()["versions"] == {"demo": [1]} and r1.status()["master_key"] == first_key
    assert [len(i["versions"]) for i in _json(cluster, "/v1/imis", node=cache)["imis"]] == [1]

    # The admin says the new key is the right one: taken, and the history starts again.
    r1.stop()
    r1.argv += ["--master-key", second_key]
    r1.start()
    cluster.wait_held(r1, "demo", [1, 2])
    assert json.loads(Layout(r1.data).trust_file.read_text())["how"] == "given"


def test_nodes_first_started_while_the_master_is_away_admit_credentials_once_it_answers(cluster):
    """No --master-key and no token table yet, the master away at their first
    start: a replica and a cache server answer 503 to credentials, saying
    why. Once the master answers, each pins its key and believes the token
    table it signed within a few heartbeats (the key is taken from the reply
    before the table in it is checked). Restarted while the master is away
    again, both admit credentials at once: the table on disk is checked with
    the key pinned."""
    master = cluster.master()
    cluster.token("node")  # issued now: the nodes start while the master is down
    master.stop()
    r1 = cluster.replica("r1", tofu=True, start=False)
    cache = cluster.cache("cache", tofu=True, start=False)
    for node in (r1, cache):
        node.start(wait=False)
    for node in (r1, cache):
        wait_for(node.ready, timeout=60, what=f"{node.id} to serve")
        answer = cluster.api("GET", "/v1/auth", node=node)
        assert answer.status_code == 503 and "no token table" in answer.json()["error"], answer.text
    master.start()
    key = cluster.learn_master_key()
    for node in (r1, cache):
        wait_for(lambda node=node: cluster.api("GET", "/v1/auth", node=node).status_code == 200, timeout=20,
                 what=f"{node.id} to admit credentials once the master answers")
        assert json.loads(Layout(node.data).trust_file.read_text())["key"] == key
        assert "refusing the master's token table" not in _log(cluster, node.id)
    master.stop()
    for node in (r1, cache):
        node.stop()
        node.start()
        assert cluster.api("GET", "/v1/auth", node=node).json()["role"] == "admin"


@pytest.mark.fuse
def test_a_wrong_master_key_is_refused(cluster, tmp_path):
    master = cluster.master()
    wrong = SigningKey.load_or_create(tmp_path / "wrong").public.text
    r1 = cluster.replica("r1", extra=["--master-key", wrong])
    cache = cluster.cache("cache", extra=["--master-key", wrong])
    good_cache = cluster.cache("good")
    cluster.icbd("imi", "create", "demo", "--from", str(make_tree(tmp_path / "tree", big=2 * MIB)))
    _publish(cluster, master.data / "work" / "demo")
    cluster.icbd("subscribe", "demo", "--node", "r1")
    wait_for(lambda: "not signed by the master's key" in _log(cluster, "r1"), what="the replica to refuse")
    wait_for(lambda: "not signed by the master's key" in _log(cluster, "cache"), what="the cache to refuse")
    assert r1.status()["versions"] == {}
    # Nor can it believe the master's token table: it admits no credential,
    # and says why (not "retry shortly": no retry helps).
    for node in (cache, r1):
        answer = cluster.api("GET", "/v1/imis", node=node)
        assert answer.status_code == 503 and "not signed by the master's key" in answer.json()["error"], answer.text
    assert cluster.api("GET", "/v1/imis", node=good_cache).status_code == 200
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = cluster.icbd("mount", str(mountpoint), "--cache", good_cache.url, "--master-key", wrong,
                          "--cache-dir", str(tmp_path / "mnt-state"), "--log", str(tmp_path / "mnt.log"),
                          "--timeout", "3", check=False)
    assert result.returncode == 1 and "not signed by the master's key" in result.stderr, result.stderr
    result = cluster.icbd("mount", str(mountpoint), "--cache", good_cache.url, "--master-key", "ed25519:nonsense",
                          check=False)
    assert result.returncode == 1 and result.stderr.startswith("icbd: not a valid Ed25519 public key")


@pytest.mark.fuse
def test_forged_manifests_stream_records_profiles_and_blocks_are_refused(cluster, tmp_path, proxies):
    master = cluster.master()
    other = SigningKey.load_or_create(tmp_path / "other")
    to_master = proxies(master.url)
    r1 = cluster.replica("r1", extra=["--master", to_master.url])
    cluster.icbd("imi", "create", "demo", "--from", str(make_tree(tmp_path / "tree", big=3 * MIB)))
    work = master.data / "work" / "demo"
    _publish(cluster, work, content="one")
    _publish(cluster, work, content="two")
    v1_manifest = cluster.api("GET", "/v1/imis/demo/versions/1/manifest").content

    # A replica: the manifest of version 1 served for version 2, then a stream record signed by another key.
    v2_digest = cluster.api("GET", "/v1/imis/demo/versions/2").json()["digest"]
    to_master.forge("GET", rf"/v1/manifests/{v2_digest}", lambda answer: (200, v1_manifest))

    def foreign_record(answer):
        status, body = answer
        if status != 200:
            return None
        doc = json.loads(body)
        return 200, json.dumps(other.sign(doc)).encode()

    cluster.icbd("subscribe", "demo", "--node", "r1")
    wait_for(lambda: "manifest does not match its digest" in _log(cluster, "r1"), what="the forged manifest refused")
    to_master.clear()
    to_master.forge("GET", r"/v1/imis/demo/versions/2/stream/digest", foreign_record)
    wait_for(lambda: "refusing the stream record" in _log(cluster, "r1"), timeout=60,
             what="the foreign stream record refused")
    assert r1.status()["versions"] == {"demo": [1]}
    assert not (r1.data / "imis" / "demo" / "2").exists(), "nothing of a refused version is kept"
    to_master.clear()
    cluster.wait_held(r1, "demo", [1, 2], timeout=120)

    # A cache and a mount: a profile nobody signed, then blocks with other bytes.
    digests = sorted({d for e in json.loads(v1_manifest)["entries"] for d in e.get("chunks", [])})
    stored = cluster.api("PUT", "/v1/imis/demo/versions/2/profile", json={"digests": digests})
    assert stored.status_code == 201
    to_master_c = proxies(master.url)
    cache = cluster.cache("cache", extra=["--master", to_master_c.url])

    def unsigned(answer):
        status, body = answer
        if status != 200:
            return None
        doc = json.loads(body)
        doc.pop("signature")
        return 200, json.dumps(doc).encode()

    to_master_c.forge("GET", r"/v1/imis/demo/versions/\d+/profile", unsigned)
    answer = cluster.api("GET", "/v1/imis/demo/versions/2/profile", node=cache)
    assert answer.status_code == 504 and "not signed" in answer.json()["error"]
    to_master_c.clear()
    signed = cluster.api("GET", "/v1/imis/demo/versions/2/profile", node=cache)
    assert signed.status_code == 200 and signed.json()["digests"] == digests and "signature" in signed.json()

    to_cache = proxies(cache.url)
    to_cache.forge("GET", r"/v1/blocks/[0-9a-f]{64}", lambda answer: (200, b"\0" * len(answer[1])))
    # Through that cache alone, the replicas not asked: nothing to read but forgeries, so EIO.
    mount = cluster.mount("mnt", cache=to_cache.url, extra=["--no-profiles", "--no-replica-fallback"], timeout=3)
    with pytest.raises(OSError) as raised:
        (mount.mountpoint / "demo" / "2" / "big.bin").read_bytes()
    assert raised.value.errno == errno.EIO
    assert "do not match the digest" in _log(cluster, "mnt")
    # With the replicas as the last resort, the forgeries are refused and the
    # true bytes come from a replica.
    fallback = cluster.mount("mnt2", cache=to_cache.url, extra=["--no-profiles"], timeout=3)
    wait_for(lambda: fallback.status()["source"]["replicas_known"] > 0, what="the mount to learn the replicas")
    big = (tmp_path / "tree" / "big.bin").read_bytes()
    assert (fallback.mountpoint / "demo" / "2" / "big.bin").read_bytes() == big
    assert "do not match the digest" in _log(cluster, "mnt2")
    assert fallback.status()["source"]["fallback_blocks"] > 0
    to_cache.clear()
    time.sleep(2.5)  # a block that failed is refused at once for 2 s
    assert (mount.mountpoint / "demo" / "2" / "big.bin").read_bytes() == big


def test_key_show(cluster, tmp_path):
    master = cluster.master()
    key = Layout(master.data).master_public_key.read_text().strip()
    assert key.startswith("ed25519:") and key == cluster.learn_master_key()
    assert cluster.icbd("key", "show").stdout == key + "\n"
    assert cluster.icbd_json("key", "show") == {"key": key}
    assert cluster.icbd("key", "show", "--data", str(master.data)).stdout == key + "\n"
    master.stop()  # the data folder is enough on the master host
    assert json.loads(cluster.icbd("--json", "key", "show", "--data", str(master.data)).stdout) == {"key": key}
    missing = cluster.icbd("key", "show", "--data", str(tmp_path), check=False)
    assert missing.returncode == 1 and missing.stderr.startswith("icbd: ") and "master.pub" in missing.stderr
    served = _json_key(cluster)
    assert served is None  # the master is stopped


def _json_key(cluster: Cluster) -> dict | None:
    try:
        return cluster.api("GET", "/v1/key").json()
    except requests.RequestException:
        return None
