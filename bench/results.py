"""One measured figure against a baseline measured in the same run."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field


@dataclass
class Result:
    name: str
    value: float
    baseline: float
    unit: str
    detail: dict = field(default_factory=dict)
    # The performance budget (bench/README.md) as a bound on the ratio, and which way is good.
    target: float | None = None
    higher_is_better: bool = False
    # Files the report shows with the row (name -> bytes, e.g. a screenshot as PNG), written beside report.md.
    attachments: dict[str, bytes] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else float("nan")

    @property
    def meets_target(self) -> bool | None:
        if self.target is None:
            return None
        return self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "value": round(self.value, 6),
            "baseline": round(self.baseline, 6),
            "ratio": round(self.ratio, 4),
            "unit": self.unit,
            "target": self.target,
            "target_is": None if self.target is None else ("at least" if self.higher_is_better else "at most"),
            "meets_target": self.meets_target,
            "detail": self.detail,
        }


def median(values: list[float]) -> float:
    return statistics.median(values)


class Stopwatch:
    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
