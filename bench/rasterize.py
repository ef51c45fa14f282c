"""Benchmark of storing a save: rasterising an annotation's polygons into its instance-label image.

    python bench/rasterize.py [--repeats 5] [--baseline 620a951] [--out bench/results/rasterize.json]

Every save draws its polygons into a label image (``apps/provider/annotations.py: rasterize``). The baseline is
the same module at git commit ``--baseline`` (``skimage.draw.polygon`` per feature in its bounding box: cost
box area x vertices), loaded into this process next to the current code (scanline filling, ``colabel.scanline``:
cost rows crossed + area), and both are timed alternately on the same validated collections; both give the same
label image (checked). Cases:

* **cells**: 20 000 round nuclei (24 vertices, 6 px radius) on a 2048 px image: the everyday save;
* **outline**: one tissue outline of 5000 vertices around a 2048 px image (a brushed region);
* **slivers**: 100 triangles 0.02 px wide from one corner region of a 2048 px image to the opposite one (what a
  hostile client sends: each one's box is nearly the whole image, it fills no pixel).

Medians over ``--repeats`` runs, and the ratio baseline / current.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_package_at, print_table, time_alternating, write_json  # noqa: E402

from colabel.apps.provider.annotations import rasterize, validate_feature_collection  # noqa: E402

SIDE = 2048


def collection(rings: list[np.ndarray]) -> dict:
    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring.tolist()]}} for ring in rings]
    return validate_feature_collection({"type": "FeatureCollection", "features": features}, image_shape=(SIDE, SIDE),
                                       max_features=10**6)


def cases() -> dict[str, dict]:
    rng = np.random.default_rng(0)
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    cells = [np.c_[x + 6 * np.cos(t), y + 6 * np.sin(t)] for x, y in rng.uniform(10, SIDE - 10, (20_000, 2))]
    s = np.linspace(0, 2 * np.pi, 5000, endpoint=False)
    outline = [np.c_[SIDE / 2 + 900 * np.cos(s), SIDE / 2 + 900 * np.sin(s) * (1 + 0.05 * np.sin(40 * s))]]
    slivers = [np.array([[x, 0.0], [SIDE - x, SIDE], [x + 0.02, 0.0]]) for x in np.linspace(1, 100, 100)]
    return {"cells": collection(cells), "outline": collection(outline), "slivers": collection(slivers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case and method (default 5)")
    parser.add_argument("--baseline", default="620a951", help="git commit of the baseline (default 620a951)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "rasterize.json"))
    args = parser.parse_args()
    load_package_at(args.baseline, "apps/provider", "baseline_provider")
    baseline = importlib.import_module("baseline_provider.annotations").rasterize
    rows, results = [], {}
    for name, fc in cases().items():
        assert np.array_equal(baseline(fc, shape=(SIDE, SIDE)), rasterize(fc, shape=(SIDE, SIDE))), name
        timings = time_alternating({"baseline": lambda fc=fc: baseline(fc, shape=(SIDE, SIDE)),
                                    "scanline": lambda fc=fc: rasterize(fc, shape=(SIDE, SIDE))},
                                   args.repeats, warmup=0)
        b, c = timings["baseline"].median, timings["scanline"].median
        results[name] = {"features": len(fc["features"]), "baseline": timings["baseline"].as_dict(),
                         "scanline": timings["scanline"].as_dict(), "ratio": round(b / c, 2)}
        rows.append({"case": name, "features": len(fc["features"]), "baseline median ms": f"{b:.1f}",
                     "scanline median ms": f"{c:.1f}", "baseline / scanline": f"{b / c:.1f}x"})
    print_table(f"rasterising a save on a {SIDE} px image (medians of {args.repeats}; baseline {args.baseline})",
                rows, ["case", "features", "baseline median ms", "scanline median ms", "baseline / scanline"])
    print(f"\nwrote {write_json(Path(args.out), {'side': SIDE, 'baseline_commit': args.baseline, **results})}")


if __name__ == "__main__":
    main()
