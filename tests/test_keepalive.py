"""Name server and keep-alive: alive -> suspect -> down -> alive."""

import time

from harness.cluster import wait_for
from replicator.nameserver import ALIVE, DOWN, SUSPECT, NameServer


def test_state_follows_silence(tmp_path):
    names = NameServer(tmp_path / "nodes.json", suspect_after=2, down_after=5)
    node = names.register("r1", "replica", "a", "http://127.0.0.1:1")
    seen = node.last_seen
    assert names.state(node, seen + 1) == ALIVE
    assert names.state(node, seen + 3) == SUSPECT
    assert names.state(node, seen + 6) == DOWN
    names.heartbeat("r1", {})
    assert names.state(node) == ALIVE


def test_registrations_and_subscriptions_persist(tmp_path):
    names = NameServer(tmp_path / "nodes.json", 2, 5)
    names.register("r1", "replica", "a", "http://127.0.0.1:1")
    names.subscribe("demo", "r1")
    again = NameServer(tmp_path / "nodes.json", 2, 5)
    again.load()
    assert again.subscriptions_of("r1") == ["demo"]
    # Unheard of since this (re)start: suspect, not alive.
    assert again.state(again.nodes["r1"]) == SUSPECT


def test_live_node_goes_suspect_then_down_then_alive(cluster):
    cluster.master()
    r1 = cluster.replica("r1")

    def state():
        return cluster.nodes_status()["r1"]["state"]

    wait_for(lambda: state() == "alive", what="r1 alive")
    r1.pause()  # a silent node, as if its host froze
    t0 = time.monotonic()
    wait_for(lambda: state() == "suspect", timeout=10, interval=0.05, what="r1 suspect")
    t_suspect = time.monotonic() - t0
    wait_for(lambda: state() == "down", timeout=10, interval=0.05, what="r1 down")
    t_down = time.monotonic() - t0
    assert t_suspect < t_down
    assert t_down >= cluster.down_after - cluster.heartbeat - 0.5
    r1.resume()
    wait_for(lambda: state() == "alive", timeout=10, what="r1 alive again")
    log = (cluster.root / "master.log").read_text()
    assert "r1 (replica, site a): alive -> suspect" in log
    assert "suspect -> down" in log and "down -> alive" in log
