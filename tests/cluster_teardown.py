"""Teardown of a Cluster that a test or a module fixture made itself (not
through the `cluster` fixture): stop it, and remove its folder unless
something is still mounted there or ICBD_KEEP_TMP is set (to look at it)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from harness.cluster import Cluster
from icbdcore.mounts import is_mountpoint


def stop_and_remove(cluster: Cluster, root: Path) -> None:
    cluster.stop_all()
    if os.environ.get("ICBD_KEEP_TMP"):
        return
    if not any(is_mountpoint(p) for p in [*(n.data for n in cluster.nodes), *(m.mountpoint for m in cluster.mounts)]):
        shutil.rmtree(root, ignore_errors=True)
