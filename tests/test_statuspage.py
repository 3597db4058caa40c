"""The master's live status page (`GET /ui`) in a real headless Chromium
(Debian's), against a real cluster: every site with its nodes and states,
the versions each holds against latest with the lag highlighted, transfers,
each cache's hit ratio and fill; it refreshes itself and loads nothing from
elsewhere. A screenshot is kept as the test's artifact (in its tmp folder,
or under ICBD_TEST_ARTIFACTS if set)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests

from harness.cluster import Cluster, wait_for
from replicator.overview import _transfers

MIB = 1 << 20
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars"]


class Dom(HTMLParser):
    """Just enough of a DOM: each element's tag, attributes and text."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[dict] = []
        self._open: list[dict] = []

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, "attrs": dict(attrs), "text": ""}
        self.elements.append(element)
        if tag not in ("meta", "link", "br", "img", "input"):
            self._open.append(element)

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        for element in self._open:
            element["text"] += data

    def find(self, tag: str | None = None, **attrs: str) -> list[dict]:
        def matches(e: dict) -> bool:
            if tag and e["tag"] != tag:
                return False
            for key, want in attrs.items():
                have = e["attrs"].get(key.replace("_", "-"))
                if have is None or (want is not True and not set(want.split()) <= set(have.split())):
                    return False
            return True

        return [e for e in self.elements if matches(e)]


def chromium(url: str, profile: Path, *extra: str, budget_ms: int = 9000) -> subprocess.CompletedProcess:
    tool = shutil.which("chromium")
    if tool is None:
        pytest.skip("needs Debian's chromium (scripts/install-packages installs it)")
    argv = [tool, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *extra, url]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, env={**os.environ, "HOME": str(profile)})


@pytest.mark.btrfs
def test_the_status_page_shows_the_system_and_keeps_itself_current(tmp_path):
    cluster = Cluster(tmp_path / "c")
    try:
        master = cluster.master()
        r1 = cluster.replica("r1", site="paris")
        r2 = cluster.replica("r2", site="lyon")
        cache = cluster.cache("c1", site="paris")
        tree = tmp_path / "c" / "tree"
        tree.mkdir()
        (tree / "disk.img").write_bytes(os.urandom(4 * MIB))
        cluster.icbd("imi", "create", "desktop", "--from", str(tree))
        cluster.icbd("imi", "publish", "desktop")
        for replica in (r1, r2):
            cluster.icbd("subscribe", "desktop", "--node", replica.id)
            cluster.wait_held(replica, "desktop", [1])
        # The cache serves some blocks twice: a hit ratio to show.
        reader = cluster.token("reader")
        manifest = wait_for(lambda: requests.get(cache.url + "/v1/imis/desktop/versions/1/manifest", timeout=30,
                                                 headers={"Authorization": f"Bearer {reader}"}).json()["entries"],
                            timeout=30, what="the manifest through the cache")
        manifest = {"entries": manifest}
        blocks = [c for entry in manifest["entries"] for c in entry.get("chunks", [])][:2]
        for _ in range(2):
            for block in blocks:
                answer = requests.get(f"{cache.url}/v1/blocks/{block}", timeout=30,
                                      headers={"Authorization": f"Bearer {reader}"})
                assert answer.status_code == 200
        wait_for(lambda: cluster.nodes_status()["c1"]["fetcher"]["hits"] >= 2, timeout=20, what="the cache's hits")
        # r2 goes away and version 2 is published: lyon is behind.
        r2.stop()
        (tree / "disk.img").write_bytes(os.urandom(4 * MIB))
        cluster.icbd("imi", "update", "desktop", "--from", str(tree))
        cluster.icbd("imi", "publish", "desktop")
        cluster.wait_held(r1, "desktop", [1, 2])
        time.sleep(cluster.down_after + 1)

        page = requests.get(master.url + "/ui", timeout=10)
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        policy = page.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "script-src 'sha256-" in policy and "connect-src 'self'" in policy
        # Nothing from elsewhere: no URL in the page at all, no CDN, no web font.
        assert not re.search(r"(src|href)=|https?://|@import|url\(", page.text)
        facts = requests.get(master.url + "/ui/status", timeout=10)
        assert facts.status_code == 200 and "Authorization" not in facts.request.headers
        assert {s["name"] for s in facts.json()["sites"]} == {"central", "paris", "lyon"}

        profile = tmp_path / "chromium"
        profile.mkdir()
        result = chromium(master.url + "/ui", profile, "--dump-dom")
        assert result.returncode == 0, result.stderr[-2000:]
        dom = Dom()
        dom.feed(result.stdout)
        body = dom.find("body")[0]
        # It refreshed itself several times within the (virtual) 9 s.
        assert int(body["attrs"].get("data-refreshes", "0")) >= 3, body["attrs"]
        assert not dom.find(id="problem", **{"class": "shown"})
        assert "master http://" in dom.find("header")[0]["text"]
        # Every site, each with its nodes and their state.
        sites = {s["attrs"]["data-site"]: s for s in dom.find("section", **{"class": "site"})}
        assert set(sites) == {"central", "paris", "lyon"}
        rows = {r["attrs"]["data-node"]: r for r in dom.find("tr", **{"class": "node"})}
        assert set(rows) == {"master", "r1", "r2", "c1"}
        assert rows["r1"]["attrs"]["data-state"] == "alive" and rows["c1"]["attrs"]["data-state"] == "alive"
        assert rows["r2"]["attrs"]["data-state"] == "down"
        assert "down" in rows["r2"]["text"] and "lyon" not in rows["r1"]["text"]
        # Versions against latest: r2 behind, highlighted; r1 not.
        lagging = dom.find("span", **{"class": "versions lag"})
        assert [(s["attrs"]["data-imi"], s["attrs"]["data-lag"]) for s in lagging] == [("desktop", "1")]
        assert "desktop: 1 (latest 2, 1 behind" in lagging[0]["text"]
        r1_versions = [s for s in dom.find("span", **{"class": "versions"}) if "r1" in rows and s["text"].startswith(
            "desktop: 1–2")]
        assert r1_versions and "lag" not in r1_versions[0]["attrs"]["class"]
        # Transfers: r1's two, done.
        transfers = dom.find("div", **{"class": "transfer"})
        assert {(t["attrs"]["data-version"], t["attrs"]["data-state"]) for t in transfers} >= {("1", "done"),
                                                                                               ("2", "done")}
        # The cache: hit ratio and fill.
        cell = dom.find("td", **{"class": "cache", "data-hit-ratio-blocks": True})
        assert len(cell) == 1 and float(cell[0]["attrs"]["data-hit-ratio-blocks"]) == pytest.approx(0.5)
        assert 0 < float(cell[0]["attrs"]["data-fill"]) < 1 and "of blocks" in cell[0]["text"]
        imis = dom.find("tr", **{"class": "imi"})
        assert [(i["attrs"]["data-imi"], i["attrs"]["data-latest"]) for i in imis] == [("desktop", "2")]

        # A screenshot, kept.
        folder = Path(os.environ.get("ICBD_TEST_ARTIFACTS") or tmp_path)
        folder.mkdir(parents=True, exist_ok=True)
        shot = folder / "status-page.png"
        result = chromium(master.url + "/ui", profile, f"--screenshot={shot}", "--window-size=1400,1000")
        assert result.returncode == 0 and shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
        print(f"\nscreenshot of the status page: {shot}")

        # The master goes away: the page says so and keeps what it showed.
        served = master.stop()
        assert served == 0
    finally:
        cluster.stop_all()


def test_a_running_transfer_shows_its_progress_once_the_stream_s_size_is_known():
    status = {"transfers": [
        {"imi": "desktop", "version": 1, "parent": None, "state": "done", "bytes": 10, "seconds": 1.0},
        {"imi": "desktop", "version": 3, "parent": 2, "state": "running", "bytes": 250, "seconds": 2.0},
        {"imi": "desktop", "version": 2, "parent": 1, "state": "failed", "bytes": 5, "seconds": 1.0,
         "error": "cut off"},
    ]}
    shown = _transfers(status, {("desktop", 3, 2): 1000})
    assert [t["version"] for t in shown] == [3, 2, 1]  # running first, then the most recent
    assert shown[0]["progress"] == 0.25 and shown[0]["total"] == 1000
    assert "progress" not in shown[1] and shown[1]["error"] == "cut off"
    assert "progress" not in _transfers(status, {})[0]  # size unknown: no fraction to show
