"""`btrfs receive` is confined to its folder (replicator/btrfs.py,
`receive_argv`): a hostile stream cannot write outside it.

A send stream is a list of commands naming paths, carried out by btrfs
receive as root. Each hostile stream here (tests/sendstream.py,
`escape_streams`) tries to leave a file in a folder outside the receive's
target: through a symlink to an absolute path, through a symlink to
../../.., or with `..` in a path. Fed straight to the replica's
`btrfs.start_receive`, each must fail and leave no file anywhere outside the
target. A real stream, full and incremental (its parent lies outside the
confinement), still arrives whole. (The same streams served by a man in the
middle to a real replica: tests/test_faults_transfer.py.)
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from sendstream import escape_streams
from trees import describe, make_tree

from replicator import btrfs

pytestmark = pytest.mark.btrfs


def _listing(root: Path, skip: Path) -> dict[str, tuple]:
    """Every path under `root` but `skip`, with its type, size and mtime."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip.parent:
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            found[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return found


def _receive(target: Path, data: bytes) -> tuple[int, str]:
    process = btrfs.start_receive(target)
    try:
        process.stdin.write(data)
        process.stdin.close()
    except BrokenPipeError:
        pass  # receive stopped at a refused command before reading it all
    code = process.wait(30)
    return code, process.stderr.read().decode(errors="replace").strip()


@pytest.mark.parametrize("kind", ["absolute-symlink", "relative-symlink", "dotdot-mkfile", "dotdot-rename"])
def test_a_hostile_stream_writes_nothing_outside_its_folder(btrfs_dir, tmp_path, kind):
    # Beside the btrfs, as /etc/cron.d is beside DATA; a rename cannot cross
    # filesystems, so its target is elsewhere on the same btrfs.
    outside = btrfs_dir / "elsewhere" if kind == "dotdot-rename" else tmp_path / "outside"
    outside.mkdir()
    target = btrfs_dir / "incoming" / "demo" / "1.recv"
    target.mkdir(parents=True)
    (btrfs_dir / "imis").mkdir()
    (btrfs_dir / "imis" / "keep").write_text("a version\n")
    around = _listing(btrfs_dir, target)
    forged = escape_streams("1", str(outside), os.path.relpath(outside, target / "1"))[kind]

    code, stderr = _receive(target, forged)

    print(f"\n{kind}: btrfs receive exit {code}: {stderr.splitlines()[-1] if stderr else ''}")
    assert sorted(p.name for p in outside.iterdir()) == [], f"{kind}: the stream wrote outside its folder"
    assert _listing(btrfs_dir, target) == around, f"{kind}: something outside {target} changed"
    assert code != 0, f"{kind}: btrfs receive accepted the stream"
    leaked = [str(p) for p in tmp_path.rglob("by-*") if target not in p.parents]
    assert leaked == [], leaked


def test_full_and_incremental_streams_still_arrive_whole(btrfs_dir, tmp_path):
    """The confinement costs nothing: a delta's parent lies outside the
    receive's folder (in imis/), and receive still finds it."""
    source = btrfs_dir / "work"
    subprocess.run(["btrfs", "subvolume", "create", str(source)], check=True, capture_output=True)
    make_tree(source / "tree", big=3 << 20)
    sent = btrfs_dir / "sent"
    sent.mkdir()
    imis = btrfs_dir / "imis" / "demo"
    imis.mkdir(parents=True)
    parent = None
    for version in (1, 2):
        if version == 2:
            (source / "tree" / "etc" / "hostname").write_text("two\n")
            (source / "tree" / "new").write_bytes(os.urandom(1 << 20))
        snapshot = sent / str(version)
        subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(source), str(snapshot)], check=True,
                       capture_output=True)
        data = subprocess.run(btrfs.send_argv(snapshot, parent), check=True, capture_output=True).stdout
        target = btrfs_dir / "incoming" / "demo" / f"{version}.recv"
        target.mkdir(parents=True)
        code, stderr = _receive(target, data)
        assert code == 0, stderr
        btrfs.move_readonly_subvolume(target / str(version), imis / str(version))
        assert describe(imis / str(version) / "tree") == describe(snapshot / "tree")
        parent = snapshot
