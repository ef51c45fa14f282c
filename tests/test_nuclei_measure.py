"""Per-nucleus measurements (outlines, boxes, centroids, areas) and the filters of the classical backend,
checked against independent references: shapely and scipy on the same label images."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from scipy import ndimage as ndi

from colabel.services.nuclei import measure_nuclei
from colabel.services.nuclei.classical import _watershed_components
from colabel.services.nuclei.filters import gaussian, maximum
from colabel.services.nuclei.measure import outline_rings

pytestmark = pytest.mark.unit


def random_labels(seed: int) -> np.ndarray:
    """Blobs of random labels: diagonal contacts, holes, labels in several pieces, labels at the border."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(1, 60, 2))
    labels = rng.integers(0, int(rng.integers(2, 30)), shape)
    labels[rng.random(shape) < rng.random()] = 0
    return labels


def pixel_centres_inside(ring: list, box: tuple) -> np.ndarray:
    """Which pixel centres of the box ``(xmin, ymin, xmax, ymax)`` lie inside ``ring``, shape (h, w)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    ys, xs = np.mgrid[y0:y1, x0:x1] + 0.5
    return shapely.contains_xy(shapely.Polygon(ring), xs, ys)


@pytest.mark.parametrize("seed", range(30))
def test_every_outline_is_a_simple_ring_around_its_filled_largest_piece(seed):
    labels = random_labels(seed)
    out, nuclei = measure_nuclei(labels, origin=(7, 3))
    assert out.dtype == np.uint32 and len(nuclei) == int(out.max())
    for nucleus in nuclei:
        mask = out == nucleus.id
        pieces, n_pieces = ndi.label(mask, structure=np.ones((3, 3)))
        assert n_pieces == 1  # one 8-connected piece: the largest one of the input label
        original = labels == np.unique(labels[mask])[0]
        sizes = np.bincount(ndi.label(original, structure=np.ones((3, 3)))[0].ravel())[1:]
        assert mask.sum() == sizes.max() == nucleus.area
        rows, cols = np.nonzero(mask)
        assert nucleus.bbox == (cols.min() + 7, rows.min() + 3, cols.max() + 1 + 7, rows.max() + 1 + 3)
        assert nucleus.centroid == pytest.approx((cols.mean() + 0.5 + 7, rows.mean() + 0.5 + 3))
        ring = nucleus.polygon["coordinates"][0]
        assert nucleus.polygon["type"] == "Polygon" and len(nucleus.polygon["coordinates"]) == 1
        assert ring[0] == ring[-1] and len(ring) >= 5
        polygon = shapely.Polygon(ring)
        assert polygon.is_valid and shapely.is_ccw(polygon.exterior)  # clockwise on screen (y down)
        # a pixel centre is inside exactly when the pixel is the nucleus's or in one of its holes
        filled = ndi.binary_fill_holes(mask)
        r0, c0 = rows.min(), cols.min()
        box = filled[r0 : rows.max() + 1, c0 : cols.max() + 1]
        assert np.array_equal(pixel_centres_inside(ring, nucleus.bbox), box)


def test_rings_have_no_vertex_on_a_straight_line():
    labels = np.zeros((12, 12), np.int32)
    labels[2:9, 3:10] = 1  # a square: 8 vertices, the corners cut by half a pixel
    labels[9, 5] = 1  # a one-pixel bump on the bottom side: (6.5, 9) -> (5.5, 10) -> (4.5, 9), 3 more
    coords, lengths, complete = outline_rings(labels, 1)
    assert complete and lengths.tolist() == [11]
    assert [5.5, 10.0] in coords.tolist() and [6.0, 9.5] not in coords.tolist()
    ring = np.vstack([coords, coords[:2]])
    a, b = ring[1:-1] - ring[:-2], ring[2:] - ring[1:-1]
    turns = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    assert np.all(turns != 0)


def test_holes_and_second_pieces_are_reported_as_incomplete_rings():
    labels = np.zeros((9, 9), np.int32)
    labels[1:6, 1:6] = 1
    labels[3, 3] = 0  # a hole
    assert not outline_rings(labels, 1).complete
    labels[3, 3] = 1
    assert outline_rings(labels, 1).complete
    labels[7:9, 7:9] = 1  # a second piece, not touching the first
    assert not outline_rings(labels, 1).complete
    _, (nucleus,) = measure_nuclei(labels)
    assert nucleus.area == 25


def test_types_come_from_each_nucleus_first_pixel():
    labels = np.array([[0, 5, 5], [2, 2, 5]])
    types = np.array([[9, 3, 4], [1, 7, 4]])
    probs = types / 10.0
    out, nuclei = measure_nuclei(labels, types=types, type_probs=probs)
    assert out.tolist() == [[0, 2, 2], [1, 1, 2]]  # renumbered in input order
    assert [(n.type, n.type_prob) for n in nuclei] == [(1, 0.1), (3, 0.3)]


@pytest.mark.parametrize("shape", [(512, 512), (37, 50), (5, 300), (3, 3)])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 11, 12])
def test_maximum_equals_scipy_maximum_filter(shape, size):
    image = np.random.default_rng(size).random(shape).astype(np.float32)
    assert np.array_equal(maximum(image, size), ndi.maximum_filter(image, size=size, mode="reflect"))


@pytest.mark.parametrize("shape", [(512, 512), (37, 50), (5, 300)])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 5.0])
def test_gaussian_equals_scipy_gaussian_filter(shape, sigma):
    image = np.random.default_rng(0).random(shape).astype(np.float32) * 100
    ours = gaussian(image, sigma, truncate=3.0)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(
        ours, ndi.gaussian_filter(image, sigma, mode="reflect", truncate=3.0), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("seed", range(8))
def test_watershed_of_crowded_components_only_equals_the_whole_image_watershed(seed):
    from skimage.segmentation import watershed

    rng = np.random.default_rng(seed)
    surface = ndi.gaussian_filter(rng.random((120, 140)), 3).astype(np.float32)
    foreground = surface > np.quantile(surface, 0.4)
    components, n = ndi.label(foreground)
    markers, _ = ndi.label((surface == ndi.maximum_filter(surface, size=7)) & foreground, structure=np.ones((3, 3)))
    lonely = np.setdiff1d(np.arange(1, n + 1), components[markers > 0])
    for k, label in enumerate(lonely):  # every component gets a marker
        first = np.argmax((components == label).ravel())
        markers.ravel()[first] = markers.max() + 1 + k
    expected = watershed(-surface, markers, mask=foreground)
    ours = _watershed_components(surface, markers, components, n)
    assert ours.dtype == np.uint32 and np.array_equal(ours, expected)
