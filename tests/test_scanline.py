"""colabel/scanline.py: scanline polygon filling, the same pixels as skimage.draw.polygon at a fraction of the cost."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from skimage.draw import polygon as skimage_polygon

from colabel.scanline import edge_rows, polygon_pixels, ring_areas, rings_pixels

pytestmark = pytest.mark.unit


def mask_of(rr, cc, shape):
    mask = np.zeros(shape, dtype=bool)
    mask[rr, cc] = True
    return mask


def random_simple_polygons(seed: int, n: int):
    """Valid polygons of 3-9 vertices: random, on integer and half-integer grids (vertices and edges through
    pixel centres: the boundary cases), closed or open, partly outside the image."""
    rng = np.random.default_rng(seed)
    found = 0
    while found < n:
        k = int(rng.integers(3, 10))
        height, width = (int(v) for v in rng.integers(1, 30, size=2))
        kind = found % 3
        if kind == 0:
            rows, cols = rng.uniform(-5, height + 5, k), rng.uniform(-5, width + 5, k)
        elif kind == 1:
            rows, cols = rng.integers(-3, height + 3, k).astype(float), rng.integers(-3, width + 3, k).astype(float)
        else:
            rows, cols = rng.integers(-6, 2 * height + 6, k) / 2, rng.integers(-6, 2 * width + 6, k) / 2
        outline = shapely.Polygon(np.c_[cols, rows])
        if not outline.is_valid or outline.area == 0:
            continue
        found += 1
        if found % 2:
            rows, cols = np.append(rows, rows[0]), np.append(cols, cols[0])
        yield rows, cols, (height, width)


def test_the_pixels_are_exactly_skimages_for_valid_polygons_boundaries_included():
    for rows, cols, shape in random_simple_polygons(seed=1, n=3000):
        expected = mask_of(*skimage_polygon(rows, cols, shape), shape)
        np.testing.assert_array_equal(mask_of(*polygon_pixels(rows, cols, shape), shape), expected)


def test_many_rings_at_once_give_each_ring_its_own_pixels():
    polygons = list(random_simple_polygons(seed=2, n=50))
    shape = (30, 30)
    rows = np.concatenate([r for r, _, _ in polygons])
    cols = np.concatenate([c for _, c, _ in polygons])
    starts = np.cumsum([0] + [len(r) for r, _, _ in polygons[:-1]])
    ring, index = rings_pixels(rows, cols, starts, shape)
    for k, (r, c, _) in enumerate(polygons):
        expected = np.flatnonzero(mask_of(*skimage_polygon(r, c, shape), shape))
        np.testing.assert_array_equal(index[ring == k], expected)


def test_a_square_on_pixel_centres_includes_its_boundary():
    rr, cc = polygon_pixels([0, 0, 2, 2], [0, 2, 2, 0], (5, 5))
    assert mask_of(rr, cc, (5, 5))[:3, :3].all() and len(rr) == 9


def test_cost_counts_edge_rows_and_areas_are_signed():
    assert edge_rows([0, 0, 2, 2]) == 3 + 1 + 3 + 1  # the vertical edges cross rows 0, 1, 2; horizontal ones 1 each
    assert edge_rows([0, 0, 2, 2]) - edge_rows([0, 0, 2, 2], starts=[0]) == 0
    areas = ring_areas([0, 0, 2, 2, 0, 1, 0], [0, 2, 2, 0, 0, 0, 1], starts=[0, 4])
    np.testing.assert_allclose(np.abs(areas), [4.0, 0.5])
    assert areas[0] * ring_areas([0, 2, 2, 0], [0, 0, 2, 2])[0] < 0  # the reversed ring has the other sign


def test_a_long_outline_over_a_large_image_fills_in_proportion_to_its_rows_not_its_box():
    # 20 000 vertices around a 4096 px image: skimage visits 16.7 M pixels x 20 000 edges; the scanline fill
    # visits the rows each edge crosses (its cost) and the pixels it fills
    t = np.linspace(0, 2 * np.pi, 20_000, endpoint=False)
    rows, cols = 2048 + 2000 * np.sin(t), 2048 + 2000 * np.cos(t)
    assert edge_rows(rows) < 3 * 4096 + 20_000
    rr, cc = polygon_pixels(rows, cols, (4096, 4096))
    assert abs(len(rr) - np.pi * 2000**2) / (np.pi * 2000**2) < 1e-3
