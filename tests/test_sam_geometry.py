"""Pure functions: coordinate mapping to SAM's frame, tiling, routing, merging, normalisation, polygons."""

from __future__ import annotations

import numpy as np
import pytest

from colabel.apps.provider.annotations import validate_feature_collection
from colabel.errors import InvalidInputError
from colabel.services.sam.normalize import to_uint8_rgb
from colabel.services.sam.polygons import mask_to_features, mask_to_geometry
from colabel.services.sam.tiling import (
    Tile,
    frontier_tiles,
    interior_point,
    merge_into,
    route_prompt,
    tile_grid,
)
from colabel.services.sam.transforms import (
    box_from_model,
    box_to_model,
    points_from_model,
    points_to_model,
    preprocess_shape,
    scale_factors,
)

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------------------------------
# coordinate mapping
# --------------------------------------------------------------------------------------------------


def test_preprocess_shape_exact_numbers():
    assert preprocess_shape(300, 600, 1024) == (512, 1024)
    assert preprocess_shape(600, 300, 1024) == (1024, 512)
    assert preprocess_shape(333, 1000, 1024) == (341, 1024)  # 340.992 rounds to 341
    assert preprocess_shape(300, 600, 256) == (128, 256)
    assert preprocess_shape(1024, 1024, 1024) == (1024, 1024)
    assert preprocess_shape(3, 7, 256) == (110, 256)  # 109.71 -> 110


@pytest.mark.parametrize("h, w", [(300, 600), (333, 1000), (1, 1000), (517, 211), (1024, 1024), (7, 3)])
@pytest.mark.parametrize("long_side", [256, 1024])
def test_preprocess_shape_matches_segment_anything(h, w, long_side):
    from colabel.services.torchvision_compat import install

    install()
    from segment_anything.utils.transforms import ResizeLongestSide

    assert preprocess_shape(h, w, long_side) == ResizeLongestSide.get_preprocess_shape(h, w, long_side)


def test_points_to_model_exact_numbers_non_square():
    # image 300 high x 600 wide, model input 256: input_size (128, 256), sx = 256/600, sy = 128/300
    out = points_to_model([[0, 0], [600, 300], [300, 150], [150, 75]], (300, 600), 256)
    np.testing.assert_allclose(out, [[-0.5, -0.5], [255.5, 127.5], [127.5, 63.5], [63.5, 31.5]])
    # image 333 x 1000 at 1024: h = 341, so sy = 341/333 (not 1024/1000): the per-axis factors matter
    sx, sy = scale_factors((333, 1000), 1024)
    assert sx == pytest.approx(1.024) and sy == pytest.approx(341 / 333)
    np.testing.assert_allclose(points_to_model([[1000, 333]], (333, 1000), 1024), [[1023.5, 340.5]])


def test_points_to_model_equals_sam_apply_coords_minus_half_pixel():
    from colabel.services.torchvision_compat import install

    install()
    from segment_anything.utils.transforms import ResizeLongestSide

    rng = np.random.default_rng(0)
    for size in [(300, 600), (517, 211), (333, 1000)]:
        pts = rng.uniform(0, 1, (20, 2)) * [size[1], size[0]]
        ours = points_to_model(pts, size, 1024)
        sam = ResizeLongestSide(1024).apply_coords(pts, size)
        np.testing.assert_allclose(ours, sam - 0.5, rtol=0, atol=1e-9)


def test_round_trips_and_boxes():
    rng = np.random.default_rng(1)
    pts = rng.uniform(0, 500, (50, 2))
    for size, long_side in [((300, 600), 256), ((517, 211), 1024), ((1000, 10), 1024)]:
        np.testing.assert_allclose(points_from_model(points_to_model(pts, size, long_side), size, long_side), pts)
    box = box_to_model([0, 0, 600, 300], (300, 600), 256)
    # SAM adds 0.5 to box corners: the full image box becomes exactly the 256 x 128 input frame
    np.testing.assert_allclose(box + 0.5, [0, 0, 256, 128])
    np.testing.assert_allclose(box_from_model(box, (300, 600), 256), [0, 0, 600, 300])
    with pytest.raises(InvalidInputError, match="4 numbers"):
        box_to_model([1, 2, 3], (10, 10), 256)
    with pytest.raises(InvalidInputError, match=r"shape \(N, 2\)"):
        points_to_model([[1, 2, 3]], (10, 10), 256)
    with pytest.raises(InvalidInputError, match="positive"):
        preprocess_shape(0, 5, 256)


# --------------------------------------------------------------------------------------------------
# tiling
# --------------------------------------------------------------------------------------------------


def test_tile_grid_600x300():
    tiles = tile_grid((300, 600), tile_size=256, overlap=64)
    assert len(tiles) == 6  # 3 across 600 px, 2 down 300 px
    assert [t.box for t in tiles] == [
        (0, 0, 256, 256), (172, 0, 428, 256), (344, 0, 600, 256),
        (0, 44, 256, 300), (172, 44, 428, 300), (344, 44, 600, 300),
    ]
    # cores split the overlaps at their middles and partition the image
    assert [t.core for t in tiles] == [
        (0, 0, 214, 150), (214, 0, 386, 150), (386, 0, 600, 150),
        (0, 150, 214, 300), (214, 150, 386, 300), (386, 150, 600, 300),
    ]
    owners = np.zeros((300, 600), int)
    for t in tiles:
        x0, y0, x1, y1 = t.core
        owners[y0:y1, x0:x1] += 1
    assert np.all(owners == 1)
    # every overlap is at least the requested one
    assert tiles[0].box[2] - tiles[1].box[0] >= 64 and tiles[0].box[3] - tiles[3].box[1] >= 64


def test_tile_grid_small_and_edge_cases():
    assert tile_grid((200, 256), tile_size=256) == (Tile(0, (0, 0, 256, 200), (0, 0, 256, 200)),)
    assert len(tile_grid((257, 100), tile_size=256, overlap=0)) == 2
    assert [t.box for t in tile_grid((100, 1000), tile_size=256, overlap=0)] == [
        (0, 0, 256, 100), (248, 0, 504, 100), (496, 0, 752, 100), (744, 0, 1000, 100)]
    for bad in ({"tile_size": 8}, {"tile_size": 256, "overlap": 256}, {"tile_size": 256, "overlap": -1}):
        with pytest.raises(InvalidInputError):
            tile_grid((300, 300), **bad)


def test_route_prompt():
    shape = (300, 600)
    tiles = tile_grid(shape, tile_size=256, overlap=64)
    one = np.array([1])
    assert route_prompt(tiles, shape, points=np.array([[10.0, 10.0]]), labels=one, box=None) == 0
    assert route_prompt(tiles, shape, points=np.array([[300.0, 100.0]]), labels=one, box=None) == 1
    assert route_prompt(tiles, shape, points=np.array([[590.0, 290.0]]), labels=one, box=None) == 5
    assert route_prompt(tiles, shape, points=np.array([[600.0, 300.0]]), labels=one, box=None) == 5  # far corner
    # a box is routed by its centre, to a tile that contains all of it
    assert route_prompt(tiles, shape, points=None, labels=None, box=np.array([180.0, 160, 420, 250])) == 4
    # a box inside both tiles 0 and 1 goes to the one whose core holds its centre (x = 227.5 > 214)
    assert route_prompt(tiles, shape, points=None, labels=None, box=np.array([200.0, 20, 255, 80])) == 1
    assert route_prompt(tiles, shape, points=None, labels=None, box=np.array([180.0, 20, 240, 80])) == 0
    # a box no tile contains goes to the tile whose core holds its centre
    assert route_prompt(tiles, shape, points=None, labels=None, box=np.array([150.0, 20, 300, 80])) == 1
    # negative points do not move the anchor; a prompt too large for any tile goes by its anchor
    pts = np.array([[500.0, 20.0], [20.0, 20.0]])
    assert route_prompt(tiles, shape, points=pts, labels=np.array([1, 0]), box=None) == 2
    assert route_prompt(tiles[:1], shape, points=pts, labels=np.array([1, 0]), box=None) == 0


def test_frontier_tiles():
    shape = (300, 600)
    tiles = tile_grid(shape, tile_size=256, overlap=64)
    canvas = np.zeros(shape, bool)
    assert frontier_tiles(tiles, canvas, [1]) == []
    canvas[100:120, 272:292] = True  # inside tile 1 (x 172..428, y 0..256), away from its borders
    assert frontier_tiles(tiles, canvas, [1]) == []
    canvas[100:120, 272:428] = True  # reaches x = 427, tile 1's right border
    # the object may continue at x = 428, rows 99..120: tiles 2 and 5 contain those pixels; 2 has more
    assert frontier_tiles(tiles, canvas, [1]) == [2, 5]
    assert frontier_tiles(tiles, canvas, [1, 2]) == []  # once tile 2 is decoded nothing is left
    top = np.zeros(shape, bool)
    top[0:10, 250:260] = True  # touches the image's top border only
    assert frontier_tiles(tiles, top, [1]) == []
    bottom = np.zeros(shape, bool)
    bottom[240:256, 250:260] = True  # reaches tile 1's bottom border (y = 255)
    # frontier y = 256, x = 249..260: tile 4 (x 172..428) holds 12 of those pixels, tile 3 (x < 256) 7
    assert frontier_tiles(tiles, bottom, [1]) == [4, 3]
    assert frontier_tiles(tiles, bottom, [1, 4]) == []


def test_merge_into_is_a_union_across_the_border():
    shape = (300, 600)
    tiles = tile_grid(shape, tile_size=256, overlap=64)
    truth = np.zeros(shape, bool)
    truth[100:140, 150:300] = True  # an object crossing the core border at x = 214
    left, right = tiles[0], tiles[1]
    canvas = merge_into(np.zeros(shape, bool), truth[left.slices()], left)  # the part tile 0 sees: x < 256
    assert canvas.sum() == 40 * 106
    right_mask = truth[right.slices()].copy()
    right_mask[200:210, 200:210] = True  # a spurious blob not connected to the object
    merged = merge_into(canvas, right_mask, right)
    np.testing.assert_array_equal(merged, truth)  # union of both parts, blob left out
    assert canvas.sum() == 40 * 106  # input not mutated
    # a seed (positive point) keeps an otherwise unconnected component
    seeded = merge_into(canvas, right_mask, right, seeds=np.array([[172 + 205.5, 205.5]]))
    assert seeded.sum() == truth.sum() + 100
    with pytest.raises(InvalidInputError, match="tile mask has shape"):
        merge_into(canvas, np.zeros((5, 5), bool), right)


def test_interior_point():
    m = np.zeros((20, 30), bool)
    m[5:15, 2:12] = True
    x, y = interior_point(m)
    assert 2 < x < 12 and 5 < y < 15 and m[int(y), int(x)]
    assert interior_point(np.zeros((3, 3), bool)) is None


# --------------------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------------------


def test_to_uint8_rgb_rules():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = to_uint8_rgb(grey)
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8 and np.all(out[..., 0] == grey)
    assert not np.shares_memory(out, grey)
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    same = to_uint8_rgb(rgb)
    np.testing.assert_array_equal(same, rgb)
    assert not np.shares_memory(same, rgb)
    rgba = np.concatenate([rgb, np.full((5, 6, 1), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(to_uint8_rgb(rgba), rgb)
    # 16-bit: one hot pixel does not darken the rest (percentiles, not min/max)
    img16 = np.full((100, 100), 1000, np.uint16)
    img16[:50] = 3000
    img16[0, 0] = 65535
    out16 = to_uint8_rgb(img16)
    assert out16[60, 0, 0] == 0 and out16[10, 0, 0] == 255
    # float with NaN and inf, and constant images
    f = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    f[0, 0] = np.nan
    f[0, 1] = np.inf
    assert to_uint8_rgb(f).dtype == np.uint8
    assert np.all(to_uint8_rgb(np.full((4, 4), 5.0)) == 0)
    # multichannel: mean over channels
    multi = np.zeros((4, 4, 6), np.float32)
    multi[..., 0] = 6.0
    multi[:2, :, 0] = 0.0
    m = to_uint8_rgb(multi)
    assert m[3, 0, 0] == 255 and m[0, 0, 0] == 0 and np.all(m[..., 0] == m[..., 2])
    assert np.all(to_uint8_rgb(np.ones((2, 2), bool)) == 255)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 2, 2, 2)), "shape"),
    (np.zeros((0, 5)), "empty"),
    (np.zeros((3, 3), complex), "dtype"),
    (np.array([["a", "b"]]), "dtype"),
])
def test_to_uint8_rgb_errors(bad, match):
    with pytest.raises(InvalidInputError, match=match):
        to_uint8_rgb(bad)


# --------------------------------------------------------------------------------------------------
# polygons
# --------------------------------------------------------------------------------------------------


def test_polygon_with_hole_exact():
    m = np.zeros((6, 6), bool)
    m[1:5, 1:5] = True
    m[2:4, 2:4] = False
    [f] = mask_to_features(m, simplify_tolerance=0, properties={"source": "sam"})
    assert f["geometry"]["type"] == "Polygon" and f["properties"] == {"source": "sam"}
    shell, hole = f["geometry"]["coordinates"]
    xs, ys = np.array(shell)[:, 0], np.array(shell)[:, 1]
    # the outline runs half a pixel outside the pixel centres: along the pixel edges x = 1 and x = 5
    assert xs.min() == 1.0 and xs.max() == 5.0 and ys.min() == 1.0 and ys.max() == 5.0
    g = mask_to_geometry(m, simplify_tolerance=0)
    # shell 16 - 4 corner cuts of 1/8, hole 4 - 4 cuts of 1/8: the area is exactly the 12 pixels
    assert g.area == pytest.approx(12.0)
    assert len(g.interiors) == 1


def test_nested_islands_and_multipolygon():
    m = np.zeros((12, 12), bool)
    m[1:11, 1:11] = True
    m[2:10, 2:10] = False
    m[4:8, 4:8] = True
    m[5:7, 5:7] = False
    g = mask_to_geometry(m, simplify_tolerance=0)
    assert g.geom_type == "MultiPolygon" and sorted(len(p.interiors) for p in g.geoms) == [1, 1]
    split = mask_to_features(m, split=True)
    assert len(split) == 2 and all(f["geometry"]["type"] == "Polygon" for f in split)
    assert mask_to_features(np.zeros((4, 4), bool)) == []


@pytest.mark.parametrize("seed", range(6))
def test_random_masks_give_valid_geojson(seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(5, 60)), int(rng.integers(5, 60)))
    mask = rng.random(shape) > rng.uniform(0.2, 0.8)
    features = mask_to_features(mask)
    fc = validate_feature_collection({"type": "FeatureCollection", "features": features}, image_shape=shape)
    assert len(fc["features"]) == (1 if mask.any() else 0)
    # the polygons cover the mask's pixel centres (up to the light simplification)
    from shapely import contains_xy

    g = mask_to_geometry(mask)
    r, c = np.nonzero(mask)
    assert contains_xy(g, c + 0.5, r + 0.5).mean() > 0.97


def test_polygon_coordinates_are_xy_not_rc():
    m = np.zeros((10, 40), bool)  # wide image
    m[2:4, 30:36] = True  # rows 2-3, columns 30-35
    [f] = mask_to_features(m, simplify_tolerance=0)
    ring = np.array(f["geometry"]["coordinates"][0])
    assert ring[:, 0].min() == 30.0 and ring[:, 0].max() == 36.0  # x = columns
    assert ring[:, 1].min() == 2.0 and ring[:, 1].max() == 4.0  # y = rows


def test_keep_object_keeps_the_clicked_part_and_fills_small_holes():
    from colabel.services.sam.segmenter import keep_object

    mask = np.zeros((40, 40), bool)
    mask[2:12, 2:12] = True  # clicked object
    mask[6, 6] = False  # a one-pixel hole
    mask[20:38, 20:38] = True  # a larger, unclicked part
    mask[0, 39] = True  # a speck
    kept = keep_object(mask, np.array([[5.5, 4.5]]))
    assert kept[2:12, 2:12].all() and kept.sum() == 100
    largest = keep_object(mask, None)  # no positive point: the largest part
    assert largest[20:38, 20:38].all() and largest.sum() == 18 * 18
    assert not keep_object(np.zeros((5, 5), bool), None).any()
