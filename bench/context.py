"""What a benchmark gets: a scratch area, the run's mode, node clusters that
are torn down afterwards, and a way to say what it is doing."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from harness.cluster import Cluster

log = logging.getLogger(__name__)


class BenchContext:
    def __init__(self, scratch: Path, quick: bool, say: Callable[[str], None] = log.info):
        self.scratch = scratch
        self.quick = quick
        self.say = say
        self._clusters: list[Cluster] = []

    def pick(self, *, quick, full):
        return quick if self.quick else full

    def step(self, message: str) -> None:
        self.say(message)

    def cluster(self, name: str, **kwargs) -> Cluster:
        root = self.scratch / name
        root.mkdir(parents=True, exist_ok=True)
        # Benchmarks build their source trees anywhere in the scratch area.
        kwargs.setdefault("source_roots", [self.scratch])
        cluster = Cluster(root, **kwargs)
        self._clusters.append(cluster)
        return cluster

    def close(self) -> None:
        for cluster in reversed(self._clusters):
            cluster.stop_all()
        self._clusters.clear()
        shutil.rmtree(self.scratch, ignore_errors=True)
