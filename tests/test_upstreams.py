"""Upstreams: which nodes are candidates, in what order, the failure memory,
round-trip probes, and the saved list a restarted cache starts from."""

from __future__ import annotations

import json

import hypercorn.config
import hypercorn.trio
import trio
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from cache.blockclient import BlockClient, CorruptBlock, HostFailure, NotHeld
from cache.upstreams import BACKOFF_CAP, Upstreams
from icbdcore.clients import Credentials


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def node(node_id: str, site: str = "a", role: str = "replica", state: str = "alive", **versions) -> dict:
    return {"id": node_id, "role": role, "site": site, "url": f"http://{node_id}.example:7401",
            "state": state, "versions": versions}


NODES = [
    node("far", site="b", demo=[1, 2]),
    node("near-old", site="a", demo=[1]),
    node("near", site="a", demo=[1, 2]),
    node("sick", state="suspect", demo=[1, 2]),
    node("dead", state="down", demo=[1, 2]),
    node("cache1", role="cache"),
    node("hq", site="c", role="master"),
    {"id": "junk", "role": "replica", "url": "ftp://nope", "state": "alive"},
    "not even a node",
]


def ids(ups) -> list[str]:
    return [u.id for u in ups]


def test_only_live_replicas_and_the_master_last():
    ups = Upstreams("a")
    ups.update(NODES)
    assert ids(ups.candidates("demo", 2)) == ["near", "far", "near-old", "hq"]
    assert ids(ups.candidates("demo", 1)) == ["near-old", "near", "far", "hq"]
    assert ups.nearest("demo", 2).id == "near"
    assert ids(ups.candidates()) == ["near-old", "near", "far", "hq"]  # no hint: site, then RTT


def test_master_from_the_command_line_when_not_listed():
    ups = Upstreams("a", master_url="http://hq.example:7400/")
    ups.update([node("r1")])
    assert [(u.id, u.url) for u in ups.candidates()] == [
        ("r1", "http://r1.example:7401"), ("master", "http://hq.example:7400")]


def test_round_trip_time_orders_within_a_site():
    ups = Upstreams("a")
    ups.update([node("slow"), node("fast"), node("unmeasured")])
    by_id = {u.id: u for u in ups.all()}
    ups.measured(by_id["slow"], 0.020)
    ups.measured(by_id["fast"], 0.002)
    assert ids(ups.candidates()) == ["fast", "slow", "unmeasured"]
    for _ in range(10):  # the EWMA follows a host that got slow
        ups.measured(by_id["fast"], 0.050)
    assert ids(ups.candidates()) == ["slow", "fast", "unmeasured"]
    ups.succeeded(by_id["slow"], 5.0, 1 << 20)  # a big block measures bandwidth, not RTT
    assert by_id["slow"].rtt < 0.05


def test_failures_back_off_exponentially_and_success_resets():
    clock = Clock()
    ups = Upstreams("a", clock=clock)
    ups.update([node("r1"), node("r2", site="b")])
    r1 = next(u for u in ups.all() if u.id == "r1")
    url = r1.url

    ups.failed(r1, NotHeld(url, "404"))
    assert r1.failures == 0 and ids(ups.candidates()) == ["r1", "r2"]  # 404 is no failure

    backoffs = []
    for _ in range(8):
        ups.failed(r1, HostFailure(url, "refused"))
        backoffs.append(r1.retry_at - clock.now)
        assert ids(ups.candidates()) == ["r2", "r1"]  # skipped while backing off, kept as last resort
    assert backoffs[:4] == [1, 2, 4, 8] and backoffs[-1] == BACKOFF_CAP

    clock.now += BACKOFF_CAP
    assert ids(ups.candidates()) == ["r1", "r2"]  # backoff over: nearest again
    ups.succeeded(r1, 0.01, 100)
    assert r1.failures == 0 and r1.retry_at == 0

    ups.failed(r1, CorruptBlock(url, "bad bytes"))
    assert r1.failures == 3 and r1.retry_at - clock.now == 4  # corrupt weighs as three failures
    assert r1.corrupt == 1


def test_known_hosts_keep_their_memory_across_updates():
    clock = Clock()
    ups = Upstreams("a", clock=clock)
    ups.update([node("r1"), node("r2")])
    r1 = next(u for u in ups.all() if u.id == "r1")
    ups.failed(r1, HostFailure(r1.url, "reset"))
    ups.measured(r1, 0.003)
    ups.update([node("r1", demo=[3]), node("r3")])
    same = next(u for u in ups.all() if u.id == "r1")
    assert same is r1 and r1.failures == 1 and r1.rtt == 0.003 and r1.versions == {"demo": [3]}
    assert sorted(ids(ups.all())) == ["r1", "r3"]


def test_list_is_saved_and_a_restart_starts_from_it(tmp_path):
    path = tmp_path / "upstreams.json"
    ups = Upstreams("a", path)
    assert len(ups) == 0
    ups.update(NODES)
    saved = json.loads(path.read_text())
    assert sorted(n["id"] for n in saved["nodes"]) == ["far", "hq", "near", "near-old"]
    assert [p.name for p in tmp_path.iterdir()] == ["upstreams.json"]  # no tmp file left
    mtime = path.stat().st_mtime_ns
    ups.update(NODES)  # nothing changed: nothing written
    assert path.stat().st_mtime_ns == mtime

    restarted = Upstreams("a", path)  # the master is unreachable: no update() ever comes
    assert ids(restarted.candidates("demo", 2)) == ["near", "far", "near-old", "hq"]


def test_unreadable_saved_list_starts_empty(tmp_path, caplog):
    path = tmp_path / "upstreams.json"
    path.write_text("{ not json")
    ups = Upstreams("a", path)
    assert len(ups) == 0 and "unreadable" in caplog.text
    ups.update([node("r1")])
    assert json.loads(path.read_text())["nodes"][0]["id"] == "r1"


async def test_probe_measures_live_hosts_and_backs_off_dead_ones(nursery):
    app = Starlette(routes=[Route("/", lambda request: JSONResponse({"role": "replica"}))])
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    shutdown = trio.Event()
    binds = await nursery.start(
        lambda task_status: hypercorn.trio.serve(app, config, shutdown_trigger=shutdown.wait,
                                                 task_status=task_status))
    ups = Upstreams("a")
    live = {"id": "live", "role": "replica", "site": "b", "url": binds[0], "state": "alive"}
    dead = {"id": "dead", "role": "replica", "site": "a", "url": "http://127.0.0.1:9", "state": "alive"}
    ups.update([dead, live])
    client = BlockClient(Credentials("token-1234"), connect_timeout=1.0)
    try:
        await ups.probe(client, timeout=2.0)
    finally:
        client.close()
        shutdown.set()
    by_id = {u.id: u for u in ups.all()}
    assert by_id["live"].rtt is not None and 0 < by_id["live"].rtt < 2.0
    assert by_id["dead"].rtt is None and by_id["dead"].failures == 1
    assert ids(ups.candidates()) == ["live", "dead"]  # same site, but backing off
