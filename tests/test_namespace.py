"""The names and inodes of a mount (icbdfs/namespace.py), without FUSE:
plain objects, no kernel, no root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from icbdcore.catalog import Catalog, ImiInfo
from icbdcore.manifest import DIR, FILE, Entry, Manifest, VersionRecord
from icbdcore.wire import content_digest
from icbdfs.namespace import (
    CONTROL_DIR,
    CONTROL_NAME,
    INDEX_MASK,
    LATEST,
    ROOT,
    SLOT_SHIFT,
    STATUS_FILE,
    STATUS_NAME,
    Change,
    Namespace,
    NotFound,
    VersionTree,
    inode_of,
    is_content,
)

REPO = Path(__file__).resolve().parent.parent


def record(number: int, content: str = "") -> VersionRecord:
    return VersionRecord(number, content_digest(f"{number}{content}".encode()), 1000 * number)


def imi(name: str, latest: int | None, *versions: VersionRecord) -> ImiInfo:
    return ImiInfo(name, latest, {r.version: r for r in versions})


def catalog(*imis: ImiInfo) -> Catalog:
    return Catalog({i.name: i for i in imis})


@pytest.fixture
def ns() -> Namespace:
    ns = Namespace()
    assert ns.apply(catalog(imi("demo", 2, record(1), record(2)))) == [], "nothing to forget yet"
    return ns


def test_no_fuse_nor_trio_here():
    check = "import sys, icbdfs.namespace; assert not {'pyfuse3', 'trio'} & set(sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", check], check=True, env=env, cwd=REPO)


# --- catalogue diffs: what the kernel must forget ------------------------------------

def test_publish_invalidates_latest_and_the_folder(ns):
    demo = ns.imis["demo"]
    changes = ns.apply(catalog(imi("demo", 3, record(1), record(2), record(3))))
    assert changes == [
        Change("entry", demo.dir_inode, LATEST),
        Change("inode", demo.latest_inode, ""),
        Change("inode", demo.dir_inode, ""),
    ]
    assert ns.imis["demo"] is demo and demo.info.latest == 3
    assert is_content(ns.lookup(demo.dir_inode, "3"))


def test_rollback_invalidates_latest_only(ns):
    demo = ns.imis["demo"]
    before = demo.mtime_ns
    changes = ns.apply(catalog(imi("demo", 1, record(1), record(2))))
    assert changes == [
        Change("entry", demo.dir_inode, LATEST),
        Change("inode", demo.latest_inode, ""),
        Change("inode", demo.dir_inode, ""),
    ]
    assert demo.mtime_ns >= before
    assert ns.apply(catalog(imi("demo", 1, record(1), record(2)))) == [], "the same catalogue again"


def test_changes_are_plain_tuples(ns):
    changes = ns.apply(catalog(imi("demo", 1, record(1), record(2))))
    assert ("entry", ns.imis["demo"].dir_inode, "latest") in changes


def test_deleted_version_and_changed_content_invalidate_their_names(ns):
    demo = ns.imis["demo"]
    changes = ns.apply(catalog(imi("demo", 2, record(2, "new content"))))
    assert Change("entry", demo.dir_inode, "1") in changes, "version 1 deleted"
    assert Change("entry", demo.dir_inode, "2") in changes, "version 2 has other content"
    assert Change("entry", demo.dir_inode, LATEST) not in changes, "latest is still 2"
    with pytest.raises(NotFound):
        ns.lookup(demo.dir_inode, "1")


def test_deleted_imi_disappears_and_comes_back_with_its_inodes(ns):
    demo = ns.imis["demo"]
    one = ns.lookup(demo.dir_inode, "1")
    assert ns.apply(catalog()) == [Change("entry", ROOT, "demo")]
    with pytest.raises(NotFound):
        ns.lookup(ROOT, "demo")
    with pytest.raises(NotFound):
        ns.imi_of(demo.dir_inode)
    assert ns.resolve(one)[0].number == 1, "an open file of a deleted iMI still resolves"

    # Created again: the same folder inodes (nothing to invalidate: a failed
    # lookup is not cached), the same version inode for the same content, a
    # fresh one for other content under the same number.
    assert ns.apply(catalog(imi("demo", 2, record(1), record(2, "other")))) == []
    again = ns.imis["demo"]
    assert (again.dir_inode, again.latest_inode) == (demo.dir_inode, demo.latest_inode)
    assert ns.lookup(again.dir_inode, "1") == one
    old_two = inode_of(ns.version("demo", record(2)), 0)
    new_two = ns.lookup(again.dir_inode, "2")
    assert new_two != old_two and new_two >> SLOT_SHIFT != old_two >> SLOT_SHIFT


def test_invalid_names_are_skipped():
    ns = Namespace()
    ns.apply(catalog(imi(".icbd", None), imi("Bad Name", None), imi("../x", None), imi("ok", None)))
    assert set(ns.imis) == {"ok"}
    assert ns.lookup(ROOT, CONTROL_NAME) == CONTROL_DIR, "the control folder wins"
    assert [name for name, _ in ns.listing(ROOT)] == ["ok"]


# --- inodes ----------------------------------------------------------------------------

def test_catalogue_level_inodes_are_stable():
    ns = Namespace()
    ns.apply(catalog(imi("a", None), imi("b", None)))
    a, b = ns.imis["a"], ns.imis["b"]
    assert (a.dir_inode, a.latest_inode, b.dir_inode, b.latest_inode) == (16, 17, 18, 19)
    ns.apply(catalog(imi("b", None)))
    ns.apply(catalog(imi("c", None), imi("b", None)))
    assert ns.imis["b"].dir_inode == 18, "a deleted iMI does not shift the others"
    assert ns.imis["c"].dir_inode == 20
    ns.apply(catalog(imi("a", None), imi("b", None), imi("c", None)))
    assert ns.imis["a"].dir_inode == 16
    for inode in (ROOT, CONTROL_DIR, STATUS_FILE, 16, 17, 18, 19, 20, 21):
        assert not is_content(inode)


def test_inode_encoding_round_trip(ns):
    demo = ns.imis["demo"]
    one = ns.resolve(ns.lookup(demo.dir_inode, "1"))[0]
    two = ns.resolve(ns.lookup(demo.dir_inode, "2"))[0]
    assert one.slot != two.slot and one.slot >= 1 and two.slot >= 1
    for version in (one, two):
        for index in (0, 1, 12345, INDEX_MASK):
            inode = inode_of(version, index)
            assert is_content(inode)
            assert inode >> SLOT_SHIFT == version.slot and inode & INDEX_MASK == index
            assert ns.resolve(inode) == (version, index)
    assert ns.version("demo", record(1)) is one, "one slot per (iMI, version, digest)"
    with pytest.raises(NotFound):
        ns.resolve(99 << SLOT_SHIFT)
    with pytest.raises(NotFound):
        ns.imi_of(99)


def test_version_slots_are_handed_out_once():
    ns = Namespace()
    slots = [ns.version("x", record(n)).slot for n in (1, 2, 3)]
    assert slots == [1, 2, 3]
    assert ns.version("y", record(1)).slot == 4, "another iMI, another version"
    assert ns.version("x", record(2)).slot == 2


# --- names -----------------------------------------------------------------------------

def test_lookup_at_the_catalogue_level(ns):
    demo = ns.imis["demo"]
    assert ns.lookup(ROOT, "demo") == demo.dir_inode
    assert ns.lookup(ROOT, CONTROL_NAME) == CONTROL_DIR
    assert ns.lookup(CONTROL_DIR, STATUS_NAME) == STATUS_FILE
    assert ns.lookup(demo.dir_inode, LATEST) == demo.latest_inode
    two = ns.lookup(demo.dir_inode, "2")
    assert is_content(two) and two & INDEX_MASK == 0
    assert ns.resolve(two)[0].number == 2
    for parent, name in [(ROOT, "nope"), (CONTROL_DIR, "other"), (demo.dir_inode, "7"), (12345, "x")]:
        with pytest.raises(NotFound):
            ns.lookup(parent, name)
    with pytest.raises(NotADirectoryError):
        ns.lookup(demo.latest_inode, "1")


@pytest.mark.parametrize("name", ["02", "+2", " 2", "2 ", "2.0", "0", "", "two", "\u0662", "99999999999"])
def test_only_the_canonical_version_spelling(ns, name):
    with pytest.raises(NotFound):
        ns.lookup(ns.imis["demo"].dir_inode, name)


def test_listings(ns):
    demo = ns.imis["demo"]
    assert ns.listing(ROOT) == [("demo", demo.dir_inode)], "the control folder stays hidden"
    assert ns.listing(CONTROL_DIR) == [(STATUS_NAME, STATUS_FILE)]
    listed = ns.listing(demo.dir_inode)
    assert [name for name, _ in listed] == ["1", "2", LATEST]
    assert listed[0][1] == ns.lookup(demo.dir_inode, "1")
    with pytest.raises(NotADirectoryError):
        ns.listing(demo.latest_inode)
    ns.apply(catalog(imi("demo", None, record(1))))
    assert [name for name, _ in ns.listing(demo.dir_inode)] == ["1"], "no latest, no link"


def test_parents(ns):
    demo = ns.imis["demo"]
    folder = ns.lookup(demo.dir_inode, "1")
    version = ns.resolve(folder)[0]
    version.tree = VersionTree(Manifest(4096, [
        Entry("", DIR, 0o755, 0, 0, 0, 1),
        Entry("etc", DIR, 0o755, 0, 0, 0, 1),
        Entry("etc/motd", FILE, 0o644, 0, 0, 0, 1),
    ]))
    assert ns.parent(inode_of(version, 2)) == inode_of(version, 1)
    assert ns.parent(inode_of(version, 1)) == folder
    assert ns.parent(folder) == demo.dir_inode
    assert ns.parent(demo.dir_inode) == ROOT and ns.parent(CONTROL_DIR) == ROOT
    assert list(ns.loaded()) == [version]
    ns.apply(catalog())
    with pytest.raises(NotFound):
        ns.parent(folder)
