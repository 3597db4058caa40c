"""Master and replicas moving versions as verified btrfs deltas."""

import os
import shutil
from pathlib import Path

from trees import describe, make_tree

from harness.cluster import wait_for


def _publish(cluster, name, message=""):
    return cluster.icbd_json("imi", "publish", name, "--message", message)


def test_full_then_delta_give_identical_trees(cluster, tmp_path):
    master = cluster.master()
    r1 = cluster.replica("r1")
    tree = make_tree(tmp_path / "tree")
    cluster.icbd("imi", "create", "demo", "--from", str(tree))
    work = Path(cluster.icbd("imi", "path", "demo").stdout.strip())
    assert work == master.data / "work" / "demo"
    assert describe(work) == describe(tree)
    assert _publish(cluster, "demo", "first")["version"] == 1
    cluster.icbd("subscribe", "demo", "--node", "r1")
    cluster.wait_held(r1, "demo", [1])
    assert describe(r1.data / "imis" / "demo" / "1") == describe(master.data / "imis" / "demo" / "1")

    # Change content, metadata and structure, then publish a delta.
    (work / "etc" / "hostname").write_text("renamed desktop\n")
    with open(work / "big.bin", "r+b") as f:
        f.seek(1 << 20)
        f.write(os.urandom(4096))
    (work / "etc" / "empty").unlink()
    os.rename(work / "bin" / "tool", work / "bin" / "tool2")
    (work / "etc" / "secret").chmod(0o640)
    os.chown(work / "bin" / "link-to-tool", 5, 6, follow_symlinks=False)
    (work / "new dir ✓").mkdir()
    (work / "new dir ✓" / "n").write_text("new\n")
    assert _publish(cluster, "demo", "second")["version"] == 2
    status = cluster.wait_held(r1, "demo", [1, 2])
    assert describe(r1.data / "imis" / "demo" / "2") == describe(work)
    assert describe(r1.data / "imis" / "demo" / "1") == describe(tree)
    second = [t for t in status["transfers"] if t["version"] == 2 and t["state"] == "done"]
    assert second and second[-1]["parent"] == 1, status["transfers"]
    # A delta of a few small changes is far smaller than the 3 MiB image.
    assert second[-1]["network_bytes"] < 256 << 10


def test_only_complete_read_only_versions_appear(cluster, tmp_path):
    cluster.master()
    r1 = cluster.replica("r1")
    cluster.icbd("imi", "create", "demo", "--from", str(make_tree(tmp_path / "tree")))
    _publish(cluster, "demo")
    cluster.icbd("subscribe", "demo", "--node", "r1")
    cluster.wait_held(r1, "demo", [1])
    version = r1.data / "imis" / "demo" / "1"
    with __import__("pytest").raises(OSError):
        (version / "etc" / "new").write_text("x")
    show = __import__("subprocess").run(["btrfs", "subvolume", "show", str(version)], capture_output=True, text=True)
    assert "readonly" in show.stdout
    assert "Received UUID" in show.stdout and "Received UUID: \t\t-" not in show.stdout
    assert list((r1.data / "incoming").glob("*/*.recv")) == []


def test_delta_bytes_close_to_changed_bytes(cluster, tmp_path):
    cluster.master()
    r1 = cluster.replica("r1")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "disk.img").write_bytes(os.urandom(32 << 20))
    cluster.icbd("imi", "create", "img", "--from", str(tree))
    _publish(cluster, "img")
    cluster.icbd("subscribe", "img", "--node", "r1")
    cluster.wait_held(r1, "img", [1])
    work = Path(cluster.icbd("imi", "path", "img").stdout.strip())
    changed = 0
    with open(work / "disk.img", "r+b") as f:
        for offset in (1 << 20, 9 << 20, 20 << 20):
            f.seek(offset)
            f.write(os.urandom(1 << 20))
            changed += 1 << 20
    _publish(cluster, "img")
    status = cluster.wait_held(r1, "img", [1, 2])
    delta = [t for t in status["transfers"] if t["version"] == 2 and t["state"] == "done"][-1]
    assert delta["parent"] == 1
    assert changed <= delta["network_bytes"] <= 1.05 * changed + (1 << 20), delta


def test_fan_out_sends_once_to_many_replicas(cluster, tmp_path):
    cluster.master()
    replicas = [cluster.replica(f"r{i}", site="ab"[i % 2]) for i in range(3)]
    cluster.icbd("imi", "create", "demo", "--from", str(make_tree(tmp_path / "tree")))
    for r in replicas:
        cluster.icbd("subscribe", "demo", "--node", r.id)
    _publish(cluster, "demo")
    for r in replicas:
        cluster.wait_held(r, "demo", [1])
    master = cluster.nodes_status()["master"]
    spools = [t for t in master["transfers"] if t["imi"] == "demo" and t["version"] == 1]
    assert len(spools) == 1, master["transfers"]  # one btrfs send served all three


def test_retention_keeps_latest_and_delta_parent(cluster, tmp_path):
    cluster.master()
    r1 = cluster.replica("r1", extra=["--keep", "2"])
    tree = make_tree(tmp_path / "tree", big=64 << 10)
    cluster.icbd("imi", "create", "demo", "--from", str(tree))
    cluster.icbd("subscribe", "demo", "--node", "r1")
    work = Path(cluster.icbd("imi", "path", "demo").stdout.strip())
    for i in range(1, 5):
        (work / "etc" / "hostname").write_text(f"v{i}\n")
        _publish(cluster, "demo")
        cluster.wait_held(r1, "demo", [max(1, i - 1), i] if i > 1 else [1])
    # Rolling back to a pruned version brings it back as latest.
    cluster.icbd("imi", "rollback", "demo", "1")
    cluster.wait_held(r1, "demo", [1, 3, 4])
    assert (r1.data / "imis" / "demo" / "1" / "etc" / "hostname").read_text() == "v1\n"


def test_unsubscribe_and_delete_drop_the_imi_at_replicas(cluster, tmp_path):
    cluster.master()
    r1 = cluster.replica("r1")
    cluster.icbd("imi", "create", "demo", "--from", str(make_tree(tmp_path / "tree", big=1024)))
    _publish(cluster, "demo")
    cluster.icbd("subscribe", "demo", "--node", "r1")
    cluster.wait_held(r1, "demo", [1])
    cluster.icbd("unsubscribe", "demo", "--node", "r1")
    wait_for(lambda: "demo" not in r1.status()["versions"], what="unsubscribed iMI dropped")
    assert not (r1.data / "imis" / "demo" / "1").exists()
    cluster.icbd("subscribe", "demo", "--node", "r1")
    cluster.wait_held(r1, "demo", [1])
    cluster.icbd("imi", "delete", "demo")
    wait_for(lambda: "demo" not in r1.status()["versions"], what="deleted iMI dropped")
    assert cluster.icbd_json("imi", "list")["imis"] == []
    shutil.rmtree(tmp_path / "tree")
