"""Desktops booting under qemu from iMIs read through a site cache."""

import concurrent.futures
import subprocess
from pathlib import Path

import pytest

from bench.images.desktop import build_desktop_tree
from harness.cluster import wait_for
from icbd.boot import boot

pytestmark = [pytest.mark.slow, pytest.mark.fuse, pytest.mark.qemu]  # and btrfs (cluster)


@pytest.fixture
def desk(cluster, tmp_path):
    """A desktop iMI (release 1) published, held by a replica, and a cache server."""
    cluster.master()
    replica = cluster.replica("r1")
    tree = build_desktop_tree(tmp_path / "tree1", label="1")
    cluster.icbd("imi", "create", "desk", "--from", str(tree))
    cluster.icbd("imi", "publish", "desk")
    cluster.icbd("subscribe", "desk", "--node", "r1")
    cluster.wait_held(replica, "desk", [1])
    return cluster, replica


def _publish_release(cluster, replica, tmp_path, label: str, held: list[int]) -> None:
    tree = build_desktop_tree(tmp_path / f"tree{label}", label=label)
    work = Path(cluster.icbd("imi", "path", "desk").stdout.strip())
    subprocess.run(["rsync", "-a", "--checksum", "--inplace", "--no-whole-file", "--delete", f"{tree}/", f"{work}/"], check=True)
    cluster.icbd("imi", "publish", "desk")
    cluster.wait_held(replica, "desk", held)


def _boot(mount, target: str, **kwargs):
    name, _, version = target.partition("@")
    result = boot(mount.mountpoint, name, int(version) if version else None, timeout=180, **kwargs)
    assert result.returncode == 0, (result.outcome, result.message, result.console_text[-2000:])
    return result


def _wait_listed(mount, version: int) -> None:
    wait_for(lambda: (mount.mountpoint / "desk" / "latest").exists()
             and int((mount.mountpoint / "desk" / "latest").readlink().name) == version,
             timeout=20, what=f"the mount to show desk latest = {version}")


def test_cold_cache_boot_through_a_cache_server(desk):
    cluster, replica = desk
    cache = cluster.cache("cache")
    mount = cluster.mount("mnt", cache=cache)
    _wait_listed(mount, 1)
    result = _boot(mount, "desk")
    assert "icbd-desktop: up, release 1" in result.console_text
    fetcher = cache.status()["fetcher"]
    assert fetcher["demand_fetches"] > 0  # the cache really started cold
    assert replica.status()["served"]["bytes"] > 0


def test_two_desktops_at_once_with_separate_overlays(desk, tmp_path):
    cluster, replica = desk
    mount = cluster.mount("mnt", cache=cluster.cache("cache"))
    _wait_listed(mount, 1)
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    image = mount.mountpoint / "desk" / "1" / "rootfs.img"
    before = subprocess.run(["sha256sum", str(image)], capture_output=True, text=True, check=True).stdout.split()[0]
    # Each desktop writes to its own disk; none may touch the shared image.
    append = "console=ttyS0 root=/dev/vda rw panic=-1 icbd.scribble"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(
            lambda _: _boot(mount, "desk", overlay_dir=overlays, overrides={"append": append}), range(2)))
    assert all("release 1" in r.console_text for r in results)
    files = sorted(overlays.glob("*.qcow2"))
    assert len(files) == 2 and files[0] != files[1]
    assert all(f.stat().st_size > 1 << 20 for f in files)  # the scribbles went to the overlays
    after = subprocess.run(["sha256sum", str(image)], capture_output=True, text=True, check=True).stdout.split()[0]
    assert before == after


def test_new_version_boots_as_latest_and_rollback_boots_the_old(desk, tmp_path):
    cluster, replica = desk
    mount = cluster.mount("mnt", cache=cluster.cache("cache"))
    _publish_release(cluster, replica, tmp_path, "2", [1, 2])
    _wait_listed(mount, 2)
    assert "release 2" in _boot(mount, "desk").console_text
    assert "release 1" in _boot(mount, "desk@1").console_text
    cluster.icbd("imi", "rollback", "desk", "1")
    _wait_listed(mount, 1)
    assert "release 1" in _boot(mount, "desk").console_text


def test_boot_profile_recorded_then_replayed_on_a_fresh_cache(desk):
    cluster, replica = desk
    first = cluster.cache("cache1")
    mount = cluster.mount("mnt1", cache=first, extra=["--profile-quiet", "2"])
    _wait_listed(mount, 1)
    _boot(mount, "desk")
    cold_demand = first.status()["fetcher"]["demand_fetches"]
    profile = wait_for(lambda: cluster.api("GET", "/v1/imis/desk/versions/1/profile").status_code == 200
                       and cluster.api("GET", "/v1/imis/desk/versions/1/profile").json(),
                       timeout=30, what="the boot profile at the master")
    assert profile["recorded_on"] == 1 and len(profile["digests"]) > 5

    # Another site's first desktop: a fresh cache and a fresh mount.
    second = cluster.cache("cache2", site="b")
    mount2 = cluster.mount("mnt2", cache=second)
    _wait_listed(mount2, 1)
    _boot(mount2, "desk")
    stats = second.status()["fetcher"]
    assert stats["prefetched"] >= len(profile["digests"]) // 2
    assert stats["demand_fetches"] < cold_demand, (stats["demand_fetches"], cold_demand)


def test_prestaged_site_boots_without_a_demand_fetch(desk):
    cluster, replica = desk
    cache = cluster.cache("cache")
    result = cluster.icbd("prefetch", "desk", "--cache", cache.url)
    assert "blocks staged" in result.stdout
    mount = cluster.mount("mnt", cache=cache)
    _wait_listed(mount, 1)
    _boot(mount, "desk")
    assert cache.status()["fetcher"]["demand_fetches"] == 0


def test_the_profile_recording_follows_the_boot_to_its_session(desk):
    """The mount records while the desktop's disk is open and ends the
    recording when `icbd boot` sees the session line, however long the guest
    spends on the CPU between two reads; then the profile is at the master."""
    from icbd.boot import Screen

    cluster, replica = desk
    mount = cluster.mount("mnt", cache=cluster.cache("cache"), extra=["--profile-quiet", "1"])
    _wait_listed(mount, 1)
    result = _boot(mount, "desk", screen=Screen(stop_when_ready=True),
                   overrides={"append": "console=ttyS0 root=/dev/vda ro quiet panic=-1 icbd.stay"})
    assert result.outcome == "ready"
    recording = wait_for(lambda: mount.status()["profile_recordings"].get("desk@1"), timeout=30,
                         what="the mount's recording of desk@1")
    assert recording["state"] == "ended" and recording["ended_by"] == "session", recording
    profile = wait_for(lambda: cluster.api("GET", "/v1/imis/desk/versions/1/profile").status_code == 200
                       and cluster.api("GET", "/v1/imis/desk/versions/1/profile").json(),
                       timeout=30, what="the boot profile at the master")
    assert len(profile["digests"]) == recording["blocks"] > 5
