"""Helpers shared by the benchmarks: timing statistics, a table printer and a JSON writer.

Figures are medians and 95th percentiles of repeated runs, reported next to a baseline measured in the
same process (ratios, not absolute claims).
"""

from __future__ import annotations

import importlib
import inspect
import json
import platform
import statistics
import subprocess
import sys
import tempfile
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


def load_package_at(ref: str, folder: str, name: str):
    """Import the Python package in ``folder`` (e.g. ``services/nuclei``) as it is at git commit ``ref``.

    The files are read with ``git show`` (the working tree and git state are left alone) into a temporary
    folder and imported as the top-level package ``name``; relative imports resolve inside it, absolute
    ones (``colabel.*``) to the installed code. Used to time a baseline and the current code in one process.
    """
    root = Path(__file__).resolve().parent.parent
    listed = subprocess.run(["git", "ls-tree", "--name-only", f"{ref}:{folder}"], cwd=root, check=True,
                            capture_output=True, text=True).stdout.split()
    target = Path(tempfile.mkdtemp(prefix="bench-baseline-")) / name
    target.mkdir()
    for file in (f for f in listed if f.endswith(".py")):
        text = subprocess.run(["git", "show", f"{ref}:{folder}/{file}"], cwd=root, check=True,
                              capture_output=True, text=True).stdout
        (target / file).write_text(text)
    sys.path.insert(0, str(target.parent))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(target.parent))


def time_alternating(fns: dict, n: int, *, warmup: int = 1) -> dict[str, Timing]:
    """Call each of ``fns`` (name -> callable) in turn, ``n`` rounds, alternating which goes first, so
    that load from other processes falls on all alike; returns name -> :class:`Timing`."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    timings = {name: Timing() for name in fns}
    names = list(fns)
    for k in range(n):
        for name in names if k % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            timings[name].samples_ms.append((time.perf_counter() - start) * 1000)
    return timings


async def time_alternating_async(fns: dict, n: int, *, warmup: int = 2) -> dict[str, Timing]:
    """Like :func:`time_alternating` for calls made from an event loop: ``fns`` maps a name to
    ``fn(k)`` (``k`` = round), whose result is awaited when it is awaitable. The order of the calls rotates
    every round, so that load from other processes falls on all alike."""
    names = list(fns)
    timings = {name: Timing() for name in names}
    for k in range(warmup + n):
        shift = k % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            result = fns[name](k)
            if inspect.isawaitable(result):
                await result
            if k >= warmup:
                timings[name].samples_ms.append((time.perf_counter() - start) * 1000)
    return timings
