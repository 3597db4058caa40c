"""Data folders of format 1 (made before the master signed anything: xxh3-128
digests, unsigned records, no format file): a master converts its own in
place, a cache empties its own, a replica refuses to start with one line
saying what to do. Nothing of format 1 is ever read as format 2.

The folders of format 1 are made the way that code left them: a folder
made now is rewritten into the old shapes by `downgrade_*` below (records
without `imi` and signature, manifests of format 1 with xxh3-128 chunk
names, profiles as a bare list of digests, stream records named by xxh3).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lmdb
import pytest
import xxhash
from trees import describe, make_tree

from harness.cluster import wait_for
from icbdcore.layout import DATA_FORMAT, Layout
from icbdcore.signing import PublicKey

pytestmark = [pytest.mark.btrfs]

MIB = 1 << 20


def _old_canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def downgrade_master(data: Path) -> None:
    """Rewrite a stopped master's folder as the code of format 1 left it."""
    layout = Layout(data)
    renames: dict[str, str] = {}
    for meta in sorted(p for p in layout.meta.iterdir() if p.is_dir()):
        name = meta.name
        for path in sorted(meta.glob("*.json")):
            stem = path.name.removesuffix(".json")
            if not stem.isdigit():
                continue
            version = int(stem)
            record = json.loads(path.read_text())
            manifest = json.loads(layout.manifest_file(name, version).read_bytes())
            size = manifest["chunk_size"]
            for entry in manifest["entries"]:
                if entry["type"] != "file":
                    continue
                old = []
                with open(layout.version_dir(name, version) / entry["path"], "rb") as f:
                    for i, digest in enumerate(entry["chunks"]):
                        f.seek(i * size)
                        renames[digest] = xxhash.xxh3_128_hexdigest(f.read(size))
                        old.append(renames[digest])
                entry["chunks"] = old
            manifest["format"] = 1
            raw = _old_canonical(manifest)
            layout.manifest_file(name, version).write_bytes(raw)
            old_record = {k: record[k] for k in ("bytes", "chunk_size", "created", "message", "version")}
            path.write_text(json.dumps({**old_record, "digest": xxhash.xxh3_128_hexdigest(raw)}, indent=1,
                                       sort_keys=True))
        for path in meta.glob("*.profile.json"):
            profile = json.loads(path.read_text())
            path.write_text(json.dumps({"digests": [renames[d] for d in profile["digests"]]}))
    for path in layout.streams.glob("*/*.json"):
        record = json.loads(path.read_text())
        pieces = [xxhash.xxh3_128_hexdigest(p.encode()) for p in record["pieces"]]
        path.write_text(json.dumps({"name": record["imi"], "version": record["version"], "parent": record["parent"],
                                    "stream_id": "0" * 32, "bytes": record["bytes"], "complete": True,
                                    "digest": xxhash.xxh3_128_hexdigest(record["digest"].encode()),
                                    "pieces": pieces}))
    for path in (layout.format_file, layout.serial_file, layout.master_public_key,
                 layout.keys / "master.key"):
        path.unlink()
    layout.keys.rmdir()


def test_a_master_converts_a_folder_of_format_1_in_place(cluster, tmp_path):
    master = cluster.master()
    tree = make_tree(tmp_path / "tree", big=3 * MIB + 17)
    cluster.icbd("imi", "create", "demo", "--from", str(tree))
    cluster.icbd("imi", "publish", "demo", "--message", "first")
    work = master.data / "work" / "demo"
    (work / "etc" / "hostname").write_text("second\n")
    with open(work / "big.bin", "r+b") as f:
        f.seek(MIB + 5)
        f.write(b"changed")
    cluster.icbd("imi", "publish", "demo", "--message", "second")
    layout = Layout(master.data)
    manifests = {v: layout.manifest_file("demo", v).read_bytes() for v in (1, 2)}
    records = {v: json.loads(layout.version_record("demo", v).read_text()) for v in (1, 2)}
    digests = sorted({d for e in json.loads(manifests[1])["entries"] for d in e.get("chunks", [])})[:5]
    assert cluster.api("PUT", "/v1/imis/demo/versions/1/profile", json={"digests": digests}).status_code == 201
    registration = {"id": "someone", "role": "replica", "site": "a", "url": "http://127.0.0.1:9"}
    assert cluster.api("POST", "/v1/nodes", json=registration).status_code == 201
    stream = cluster.api("GET", "/v1/imis/demo/versions/2/stream?parent=1", headers={"X-Icbd-Node": "someone"})
    assert stream.status_code == 200 and stream.url.split("/v1/")[1].startswith("streams/")
    master.stop()
    downgrade_master(master.data)
    assert layout.data_format() == 1
    assert len(json.loads(layout.version_record("demo", 1).read_text())["digest"]) == 32

    master.start()
    key = PublicKey.parse(cluster.learn_master_key())
    log = (cluster.root / "master.log").read_text()
    assert "data of format 1" in log and "converted 2 versions of 1 iMIs" in log
    assert layout.data_format() == DATA_FORMAT
    for version in (1, 2):
        record = key.verify(json.loads(layout.version_record("demo", version).read_text()))
        # Built again from the same snapshot: the very manifest (and digest) it had.
        assert layout.manifest_file("demo", version).read_bytes() == manifests[version]
        assert {k: record[k] for k in ("version", "digest", "bytes", "created", "message", "chunk_size")} == \
            {k: records[version][k] for k in ("version", "digest", "bytes", "created", "message", "chunk_size")}
    profile = key.verify(json.loads(layout.profile_file("demo", 1).read_text()))
    assert profile == {**profile, "imi": "demo", "recorded_on": 1, "digests": digests}
    assert list(layout.streams.iterdir()) == []
    versions = cluster.icbd_json("imi", "versions", "demo")["versions"]
    assert [v["version"] for v in versions] == [1, 2] and [v["message"] for v in versions] == ["first", "second"]

    r1 = cluster.replica("r1")
    cluster.icbd("subscribe", "demo", "--node", "r1")
    cluster.wait_held(r1, "demo", [1, 2])
    assert describe(r1.data / "imis" / "demo" / "2") == describe(master.data / "imis" / "demo" / "2")
    master.stop()
    master.start()  # converted once: a later start finds format 2 and converts nothing
    assert (cluster.root / "master.log").read_text().count("data of format 1") == 1


def test_a_replica_of_format_1_refuses_to_start_saying_what_to_do(cluster, tmp_path):
    master = cluster.master()
    r1 = cluster.replica("r1")
    cluster.icbd("imi", "create", "demo", "--from", str(make_tree(tmp_path / "tree", big=MIB)))
    cluster.icbd("imi", "publish", "demo")
    cluster.icbd("subscribe", "demo", "--node", "r1")
    cluster.wait_held(r1, "demo", [1])
    r1.stop()
    Layout(r1.data).format_file.unlink()  # as a replica of format 1 left its folder: versions, no mark
    r1.start(wait=False)
    assert r1.process.wait(60) != 0
    last = (cluster.root / "r1.log").read_text().strip().splitlines()[-1]
    assert last.startswith("icbd: ") and "old data format 1" in last and "start it again" in last
    assert (r1.data / "imis" / "demo" / "1").is_dir(), "nothing is touched"
    assert master.alive()


def test_a_cache_of_format_1_empties_itself_and_fills_again(cluster, tmp_path):
    cluster.master()
    r1 = cluster.replica("r1")
    cluster.icbd("imi", "create", "demo", "--from", str(make_tree(tmp_path / "tree", big=2 * MIB)))
    cluster.icbd("imi", "publish", "demo")
    cluster.icbd("subscribe", "demo", "--node", "r1")
    cluster.wait_held(r1, "demo", [1])
    cache = cluster.cache("cache")
    manifest = json.loads(cluster.api("GET", "/v1/imis/demo/versions/1/manifest", node=cache).content)
    digest = next(e["chunks"][0] for e in manifest["entries"] if e.get("chunks"))
    assert cluster.api("GET", f"/v1/blocks/{digest}", node=cache).status_code == 200
    assert cache.status()["store"]["blocks"] == 1
    cache.stop()
    layout = Layout(cache.data)
    layout.format_file.unlink()
    env = lmdb.open(str(layout.blocks / "index"), max_dbs=3)
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:
        txn.put(b"format", b"1")
    env.close()
    old_manifest = layout.cached_manifest("demo", 1)
    old_manifest.write_bytes(b'{"chunk_size":1048576,"entries":[],"format":1}')
    os.utime(old_manifest)

    cache.start()
    log = (cluster.root / "cache.log").read_text()
    assert "cache of the old data format 1" in log and "is of format 1" in log
    assert layout.data_format() == DATA_FORMAT
    wait_for(lambda: cache.status()["catalog_serial"], what="the cache to take the catalogue")
    assert cache.status()["store"]["blocks"] == 0
    assert cluster.api("GET", f"/v1/blocks/{digest}", node=cache).status_code == 200
    assert cluster.api("GET", "/v1/imis/demo/versions/1/manifest", node=cache).status_code == 200
    assert cache.status()["store"]["blocks"] == 1
