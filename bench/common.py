"""Helpers shared by the benchmarks: timing statistics, a table printer and a JSON writer.

Figures are medians and 95th percentiles of repeated runs, reported next to a baseline measured in the
same process (ratios, not absolute claims).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Timing:
    """Latencies in milliseconds."""

    samples_ms: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms) if self.samples_ms else float("nan")

    @property
    def p95(self) -> float:
        return percentile(self.samples_ms, 95)

    def as_dict(self) -> dict:
        return {"n": len(self.samples_ms), "median_ms": round(self.median, 3), "p95_ms": round(self.p95, 3)}


def time_calls(fn, n: int, *, warmup: int = 2) -> Timing:
    """Call ``fn()`` ``warmup + n`` times; return the last ``n`` durations."""
    for _ in range(warmup):
        fn()
    timing = Timing()
    for _ in range(n):
        start = time.perf_counter()
        fn()
        timing.samples_ms.append((time.perf_counter() - start) * 1000)
    return timing


async def time_async_calls(fn, n: int, *, warmup: int = 2) -> Timing:
    """Await ``fn()`` ``warmup + n`` times; return the last ``n`` durations."""
    for _ in range(warmup):
        await fn()
    timing = Timing()
    for _ in range(n):
        start = time.perf_counter()
        await fn()
        timing.samples_ms.append((time.perf_counter() - start) * 1000)
    return timing


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    """Print ``rows`` as an aligned text table."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def write_json(path: Path, results: dict) -> Path:
    """Write results with the machine's description to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": {"python": platform.python_version(), "platform": platform.platform(),
                           "processor": platform.processor(), "cpus": __import__("os").cpu_count()},
               "results": results}
    path.write_text(json.dumps(payload, indent=2))
    return path
