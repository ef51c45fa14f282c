"""The annotator page's pure geometry modules (web/src/mask2poly.js, web/src/cutter.js, web/src/brush.js) run in
Node.js on real inputs, their output checked by the provider's own GeoJSON validation and by shapely (skipped
without node or web/node_modules: ``npm --prefix web ci``)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from shapely.geometry import LineString, Point, Polygon, shape

from colabel.apps.provider.annotations import validate_feature_collection

pytestmark = pytest.mark.unit

WEB = Path(__file__).resolve().parents[1] / "web"
NODE = shutil.which("node")
if NODE is None or not (WEB / "node_modules" / "polygon-clipping").is_dir():
    pytest.skip("needs node and web/node_modules (npm --prefix web ci)", allow_module_level=True)


def run_node(script: str, data) -> object:
    """Run an ES module snippet in web/ with ``input`` bound to ``data``; returns what it prints (JSON)."""
    code = f"import {{ readFileSync }} from 'node:fs';\nconst input = JSON.parse(readFileSync(0, 'utf8'));\n{script}"
    out = subprocess.run([NODE, "--input-type=module", "-e", code], input=json.dumps(data), cwd=WEB,
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


TRACE = """
import { maskToGeometry } from "./src/mask2poly.js";
const out = input.cases.map(({ mask, w, h, positives, tolerance }) =>
  maskToGeometry(Uint8Array.from(mask), w, h, { positives, tolerance }));
console.log(JSON.stringify(out));
"""


def test_traced_mask_outlines_are_valid_and_cover_the_object_the_points_select():
    rng = np.random.default_rng(0)
    h, w = 23, 31  # non-square: rows and columns must not swap
    cases, masks = [], []
    for i in range(120):
        mask = rng.random((h, w)) < (0.45 + 0.2 * (i % 3))  # noisy masks touch corner to corner everywhere
        point = [float(rng.uniform(0, w)), float(rng.uniform(0, h))]
        masks.append((mask, point))
        cases.append({"mask": mask.astype(int).ravel().tolist(), "w": w, "h": h, "positives": [point],
                      "tolerance": [0, 0.5][i % 2]})
    geometries = run_node(TRACE, {"cases": cases})

    features = [{"type": "Feature", "geometry": g, "properties": {}} for g in geometries if g]
    validate_feature_collection({"type": "FeatureCollection", "features": features}, image_shape=(h, w))
    for (mask, (x, y)), geometry, case in zip(masks, geometries, cases, strict=True):
        labels, _ = ndimage.label(mask)
        chosen = labels[int(y), int(x)]
        if not chosen:  # the point is on background: the largest part
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            chosen = sizes.argmax()
        part = labels == chosen
        # the part and its holes: background enclosed by the part's (4-connected) pixels, where background
        # is 8-connected (a pocket open to the outside at a corner is not a hole)
        filled = ndimage.binary_fill_holes(part, structure=np.ones((3, 3)))
        outline = shape(geometry)
        assert outline.is_valid
        if case["tolerance"] == 0:  # pixel edges exactly: every pixel of the part, holes filled, nothing else
            assert outline.area == pytest.approx(filled.sum())
        else:
            assert abs(outline.area - filled.sum()) <= 0.5 * outline.length
        rows, cols = np.nonzero(part)
        assert outline.bounds == pytest.approx((cols.min(), rows.min(), cols.max() + 1, rows.max() + 1), abs=0.5)


def test_an_empty_mask_has_no_outline_and_a_full_one_is_the_image_rectangle():
    empty, full = run_node(TRACE, {"cases": [
        {"mask": [0] * 12, "w": 4, "h": 3, "positives": [], "tolerance": 0.5},
        {"mask": [1] * 12, "w": 4, "h": 3, "positives": [], "tolerance": 0.5},
    ]})
    assert empty is None
    assert shape(full).equals(Polygon([(0, 0), (4, 0), (4, 3), (0, 3)]))


CUT = """
import { splitByLine, subtractPolygon } from "./src/cutter.js";
const square = { type: "Polygon", coordinates: [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]] };
console.log(JSON.stringify({
  across: splitByLine(square, [[5, -2], [5, 12]]),
  bent: splitByLine(square, [[-1, 3], [5, 6], [11, 3]]),
  into: splitByLine(square, [[5, -2], [5, 5]]),
  outside: splitByLine(square, [[20, 0], [20, 10]]),
  half: subtractPolygon(square, [[[5, -1], [11, -1], [11, 11], [5, 11], [5, -1]]]),
  all: subtractPolygon(square, [[[-1, -1], [11, -1], [11, 11], [-1, 11], [-1, -1]]]),
  apart: subtractPolygon(square, [[[20, 20], [21, 20], [21, 21], [20, 20]]]),
}));
"""


def test_the_cutter_splits_along_lines_that_cross_and_subtracts_overlapping_polygons():
    out = run_node(CUT, {})
    left, right = sorted((Polygon(p[0]) for p in out["across"]), key=lambda p: p.bounds[0])
    assert left.bounds == pytest.approx((0, 0, 4.95, 10)) and right.bounds == pytest.approx((5.05, 0, 10, 10))
    bent = [Polygon(p[0]) for p in out["bent"]]
    assert len(bent) == 2 and all(p.is_valid for p in bent)
    assert sum(p.area for p in bent) == pytest.approx(100, abs=0.1 * 13)  # a 0.1 wide cut about 13 long
    assert out["into"] is None and out["outside"] is None  # a line ending inside cuts nothing apart
    (half,) = out["half"]
    assert Polygon(half[0]).bounds == pytest.approx((0, 0, 5, 10))
    assert out["all"] == [] and out["apart"] is None


BRUSH = """
import { containsPoint, erase, paint, strokeArea, thinPath } from "./src/brush.js";
const out = {};
for (const [name, path, r] of input.strokes) out[name] = strokeArea(path, r);
const square = { type: "Polygon", coordinates: [[[0, 0], [40, 0], [40, 40], [0, 40], [0, 0]]] };
const across = strokeArea([[-10, 20], [50, 20]], 3);
out.painted = paint(square, strokeArea([[20, 20], [80, 20]], 5));
out.erased = erase(square, across);
out.missed = erase(square, strokeArea([[100, 100], [120, 100]], 3));
out.wiped = erase(square, strokeArea([[20, 20]], 60));
const holed = { type: "MultiPolygon", coordinates: [[[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]],
  [[3, 3], [7, 3], [7, 7], [3, 7], [3, 3]]], [[[20, 0], [30, 0], [30, 10], [20, 10], [20, 0]]]] };
out.inside = [[1, 1], [5, 5], [25, 5], [15, 5]].map((p) => containsPoint(holed, p));
out.thinned = thinPath([[0, 0], [0.5, 0], [1, 0], [3, 0], [3.2, 0]], 2);
out.none = [strokeArea([], 5), strokeArea([[0, 0]], 0)];
const loop = Array.from({ length: 41 }, (_, i) => [20 + 10 * Math.cos(i * Math.PI / 20),
  20 + 10 * Math.sin(i * Math.PI / 20)]);
out.ring = erase(square, strokeArea(loop, 2)); // a ring erased: the square with a hole, and the island inside
// what floating-point sweep-line unions fail on: evenly spaced points on a line, a scrub back and forth (on the
// pixel lattice of a zoomed view), painted and erased in turn onto one polygon
out.straight = strokeArea([[0, 0], [10, 0], [20, 0], [30, 0], [40, 0]], 20);
out.scrubbed = [];
let painted = { type: "Polygon", coordinates: [[[100, 100], [140, 100], [140, 140], [100, 140], [100, 100]]] };
for (const [k, scrub] of input.scrubs.entries()) {
  const area = strokeArea(scrub, 4 + k);
  const parts = k % 3 === 2 ? erase(painted, area) || painted.coordinates : paint(painted, area);
  painted = { type: "MultiPolygon", coordinates: parts };
  out.scrubbed.push(area, parts);
}
console.log(JSON.stringify(out));
"""


def test_the_brush_paints_the_area_a_disc_sweeps_adds_to_a_polygon_and_erases_from_it():
    rng = np.random.default_rng(1)
    walk = np.cumsum(rng.normal(0, 4, (60, 2)), axis=0) + 100  # a wandering hand-drawn stroke, crossing itself
    strokes = [["dot", [[50, 50]], 6], ["line", [[10, 10], [90, 40]], 4], ["walk", walk.tolist(), 5],
               ["back", [[0, 0], [30, 0], [0, 0.5]], 2]]  # doubles back on itself
    scrubs = []
    for _ in range(12):  # a hand scrubbing to fill a region: back and forth along a row, drifting down
        x = np.cumsum(np.where(np.arange(300) // 25 % 2, -1, 1) * rng.integers(8, 14, 300)) * 0.405
        y = 100 + np.cumsum(rng.integers(0, 2, 300)) * 0.405
        scrubs.append(np.stack([120 + x, y], axis=1).tolist())
    out = run_node(BRUSH, {"strokes": strokes, "scrubs": scrubs})
    for name, path, radius in strokes:  # the area of a true round brush: the path buffered by its radius
        area = shape({"type": "MultiPolygon", "coordinates": out[name]})
        assert area.is_valid and len(area.geoms) == 1, name
        swept = _buffered(path, radius)
        assert area.symmetric_difference(swept).area < 0.03 * swept.area, name
    features = [{"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": out[n]}, "properties": {}}
                for n in ("line", "walk", "painted")]
    validate_feature_collection({"type": "FeatureCollection", "features": features}, image_shape=(300, 300))

    painted = shape({"type": "MultiPolygon", "coordinates": out["painted"]})
    assert painted.area == pytest.approx(1600 + 40 * 10 + np.pi * 25 / 2, rel=0.01)  # the square, a bar, a cap
    top, bottom = sorted((Polygon(p[0]) for p in out["erased"]), key=lambda p: p.bounds[1])
    assert top.bounds == pytest.approx((0, 0, 40, 17), abs=0.01)  # cut apart by the 6 px wide stroke
    assert bottom.bounds == pytest.approx((0, 23, 40, 40), abs=0.01)
    assert out["missed"] is None and out["wiped"] == []  # no overlap: nothing to do; covered: nothing left
    assert out["inside"] == [True, False, True, False]  # in the hole and between the parts: outside
    assert out["thinned"] == [[0, 0], [3, 0], [3.2, 0]]
    holed, island = (Polygon(p[0], p[1:]) for p in out["ring"])  # the polygon first: it keeps the erased one's id
    assert len(out["ring"]) == 2 and len(holed.interiors) == 1 and not island.interiors
    assert holed.bounds == pytest.approx((0, 0, 40, 40)) and island.bounds == pytest.approx((12, 12, 28, 28), abs=0.2)
    straight = shape({"type": "MultiPolygon", "coordinates": out["straight"]})
    assert straight.area == pytest.approx(40 * 40 + np.pi * 20**2, rel=0.01)
    features = [{"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [
        [[[x + 200, y + 200] for x, y in ring] for ring in polygon] for polygon in parts]}, "properties": {}}
        for parts in out["scrubbed"]]
    assert len(features) == 24 and all(f["geometry"]["coordinates"] for f in features)
    validate_feature_collection({"type": "FeatureCollection", "features": features}, image_shape=(800, 800))
    assert out["none"] == [[], []]


def _buffered(path, radius):
    """The area a true round brush of ``radius`` sweeps along ``path``."""
    return Point(path[0]).buffer(radius, 64) if len(path) == 1 else LineString(path).buffer(radius, 64)
