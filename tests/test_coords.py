"""colabel.coords: the one place where (row, col), (x, y) and OpenLayers (x, y_up) meet."""

from __future__ import annotations

import numpy as np
import pytest

from colabel.coords import bbox_xy, ol_to_xy, rc_to_xy, xy_to_ol, xy_to_rc
from colabel.errors import InvalidInputError

pytestmark = pytest.mark.unit


def test_rc_to_xy_swaps_row_and_column():
    np.testing.assert_array_equal(rc_to_xy([[1, 2], [3, 4]]), [[2, 1], [4, 3]])


def test_xy_to_rc_swaps_x_and_y():
    np.testing.assert_array_equal(xy_to_rc([[2.5, 1.5]]), [[1.5, 2.5]])


def test_rc_xy_round_trip_is_identity():
    rc = np.random.default_rng(0).uniform(0, 100, size=(50, 2))
    np.testing.assert_array_equal(xy_to_rc(rc_to_xy(rc)), rc)


def test_pixel_centre_is_corner_plus_half_pixel():
    # pixel (row 1, col 2) covers x in [2, 3), y in [1, 2): its centre is (2.5, 1.5)
    np.testing.assert_array_equal(rc_to_xy([[1, 2]]) + 0.5, [[2.5, 1.5]])
    np.testing.assert_array_equal(np.floor(xy_to_rc([[2.5, 1.5]])).astype(int), [[1, 2]])


def test_indexing_a_numpy_image_with_converted_points_hits_the_right_pixel():
    image = np.zeros((5, 7), dtype=np.uint8)
    image[3, 6] = 1  # row 3, col 6 -> x = 6, y = 3
    r, c = np.floor(xy_to_rc([[6.5, 3.5]])).astype(int)[0]
    assert image[r, c] == 1


def test_xy_to_ol_flips_y_about_the_height():
    np.testing.assert_array_equal(xy_to_ol([[3, 0], [3, 10], [1, 2.5]], height=10), [[3, 10], [3, 0], [1, 7.5]])


def test_ol_xy_round_trip_is_identity():
    xy = np.random.default_rng(1).uniform(0, 64, size=(20, 2))
    np.testing.assert_allclose(ol_to_xy(xy_to_ol(xy, height=64), height=64), xy)


def test_height_is_keyword_only():
    with pytest.raises(TypeError):
        xy_to_ol([[0, 0]], 10)  # type: ignore[misc]


@pytest.mark.parametrize("func", [rc_to_xy, xy_to_rc])
def test_output_is_float64_for_integer_input(func):
    assert func(np.array([[1, 2]], dtype=np.int32)).dtype == np.float64


@pytest.mark.parametrize(
    "func", [rc_to_xy, xy_to_rc, lambda p: xy_to_ol(p, height=8), lambda p: ol_to_xy(p, height=8)]
)
def test_input_array_is_never_mutated_nor_aliased(func):
    points = np.array([[1.0, 2.0], [3.0, 4.0]])
    before = points.copy()
    out = func(points)
    out[:] = -1
    np.testing.assert_array_equal(points, before)
    assert not np.shares_memory(out, points)


def test_lists_and_empty_input_are_accepted():
    assert rc_to_xy([[0, 1]]).tolist() == [[1.0, 0.0]]
    assert rc_to_xy([]).shape == (0, 2)


@pytest.mark.parametrize("bad", [[1, 2, 3], [[1, 2, 3]], [["a", "b"]], np.zeros((2, 2, 2))])
def test_points_of_wrong_shape_or_type_are_refused(bad):
    with pytest.raises(InvalidInputError, match="points must"):
        rc_to_xy(bad)


def test_bbox_xy_returns_min_and_max_as_python_floats():
    box = bbox_xy(np.array([[1, 5], [3, 2], [2, 4]]))
    assert box == (1.0, 2.0, 3.0, 5.0)
    assert all(type(v) is float for v in box)


def test_bbox_of_no_points_is_refused():
    with pytest.raises(InvalidInputError, match="no points"):
        bbox_xy([])
