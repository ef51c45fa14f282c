"""SamSegmenter on a tiny random-weight SAM loaded through the registry from a real checkpoint.

Random weights give arbitrary masks: these tests check shapes, coordinates, routing, tiling, merging,
caching, errors and output validity, not segmentation quality.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from sam_fixtures import (
    segmenter_fixture,  # noqa: F401
    tiny_checkpoint_fixture,  # noqa: F401
    tiny_checkpoints_fixture,  # noqa: F401
    tiny_sam_fixture,  # noqa: F401
    torch_one_thread_fixture,  # noqa: F401
)

from colabel.apps.provider.annotations import validate_feature_collection
from colabel.errors import InvalidInputError
from colabel.services.sam.segmenter import (
    ImageEmbedding,
    SamSegmenter,
    _remove_small_regions,
    paint_labels,
    validate_prompts,
)

pytestmark = pytest.mark.unit

RNG = np.random.default_rng(42)
WIDE = RNG.integers(0, 65535, (150, 240), dtype=np.uint16)  # non-square, 16-bit, fits one 256 tile
LARGE = RNG.integers(0, 255, (300, 600, 3), dtype=np.uint8)  # 600 wide x 300 high: 6 tiles of 256


def assert_valid_polygons(result, shape):
    fc = validate_feature_collection({"type": "FeatureCollection", "features": result.polygons}, image_shape=shape)
    assert len(fc["features"]) == (1 if result.mask.any() else 0)


def test_embed_single_tile_non_square(segmenter):
    emb = segmenter.embed(WIDE)
    assert isinstance(emb, ImageEmbedding)
    assert emb.image_shape == (150, 240) and emb.n_tiles == 1
    assert emb.features.shape == (1, 256, 16, 16)
    # SAM's input_size for a 150 x 240 image at long side 256: (160, 256)
    assert emb.input_sizes.tolist() == [[160, 256]]


def test_box_prompt_on_non_square_image(segmenter):
    emb = segmenter.embed(WIDE)
    result = segmenter.segment(emb, box=[20, 10, 200, 140])
    assert result.mask.shape == (150, 240) and result.mask.dtype == bool
    assert isinstance(result.score, float) and np.isfinite(result.score)
    assert result.tiles_used == [0]
    assert result.low_res_logits.shape == (1, 64, 64)
    assert_valid_polygons(result, (150, 240))
    # a refinement round with the low-res logits as mask_input and points
    again = segmenter.segment(emb, points=[[100.5, 70.5], [10, 10]], point_labels=[1, 0],
                              mask_input=result.low_res_logits, multimask=True)
    assert again.mask.shape == (150, 240)
    assert_valid_polygons(again, (150, 240))


def test_segment_matches_segment_anything_predictor(segmenter):
    """Decoding a stored embedding equals SamPredictor on the same image with the same prompt, with
    colabel's [x, y] -> SAM convention (SAM's pixel-index input = scaled position - 0.5)."""
    from segment_anything import SamPredictor

    from colabel.services.sam.normalize import to_uint8_rgb
    from colabel.services.sam.transforms import scale_factors

    image = WIDE
    emb = segmenter.embed(image)
    box = np.array([30.0, 20.0, 180.0, 120.0])
    ours = segmenter.segment(emb, box=box)
    predictor = SamPredictor(segmenter.sam)
    predictor.set_image(to_uint8_rgb(image))
    # SamPredictor applies apply_boxes itself, so give it coordinates already shifted by -0.5 / scale
    sx, sy = scale_factors(image.shape, 256)
    shifted = box - np.array([0.5 / sx, 0.5 / sy, 0.5 / sx, 0.5 / sy])
    masks, scores, _ = predictor.predict(box=shifted, multimask_output=False)
    np.testing.assert_allclose(predictor.features.numpy()[0], emb.features[0], rtol=1e-5, atol=1e-5)
    assert ours.score == pytest.approx(float(scores[0]), abs=1e-5)
    assert (ours.mask != masks[0]).mean() < 1e-3


def test_tiled_image_routing_and_merge(segmenter):
    emb = segmenter.embed(LARGE)
    assert emb.n_tiles == 6 and emb.features.shape == (6, 256, 16, 16)
    assert [t.box for t in emb.tiles][:3] == [(0, 0, 256, 256), (172, 0, 428, 256), (344, 0, 600, 256)]
    assert emb.input_sizes.tolist() == [[256, 256]] * 3 + [[256, 256]] * 3  # 256 x 256 tiles: no resize
    for point, tile in [((10, 10), 0), ((300, 100), 1), ((590, 290), 5), ((300, 250), 4)]:
        result = segmenter.segment(emb, points=[point], point_labels=[1])
        assert result.tiles_used[0] == tile
        assert result.mask.shape == (300, 600)
        assert len(set(result.tiles_used)) == len(result.tiles_used)
        assert_valid_polygons(result, (300, 600))
    box = segmenter.segment(emb, box=[380, 160, 590, 290])
    assert box.tiles_used[0] == 5
    capped = segmenter.segment(emb, box=[100, 100, 500, 200], max_tiles=1)
    assert len(capped.tiles_used) == 1


def test_neighbour_tiles_are_decoded_when_the_mask_reaches_a_border(segmenter):
    """Force the routed tile's mask to cross its right border and check that the neighbour is decoded
    with the prompt translated into its own coordinates, and that the result is the union."""
    emb = segmenter.embed(LARGE)
    calls = []
    real = segmenter.decode_tile

    def fake_decode(embedding, index, *, points=None, labels=None, box=None, mask_input=None, multimask=False):
        calls.append((index, None if points is None else points.copy(), None if box is None else box.copy()))
        tile = embedding.tiles[index]
        h, w = tile.shape
        full = np.zeros(embedding.image_shape, bool)
        full[100:140, 150:300] = True  # the "object": crosses x = 256 (tile 0's right border)
        mask = full[tile.slices()].copy()
        return mask, 0.5, np.zeros((1, 64, 64), np.float32)

    segmenter.decode_tile = fake_decode
    try:
        result = segmenter.segment(emb, points=[[160.5, 120.5]], point_labels=[1])
    finally:
        segmenter.decode_tile = real
    # tile 0 reaches x = 255; the object may go on at x = 256, which tiles 1 and 4 cover; once tile 1 is
    # decoded the whole object is inside decoded tiles: tile 4 (or 3) is not decoded for nothing
    assert [c[0] for c in calls] == [0, 1]
    # tile 0 gets the point as is; tile 1 (x0 = 172) gets the object's interior point in its coordinates
    np.testing.assert_allclose(calls[0][1], [[160.5, 120.5]])
    interior = calls[1][1][0] + [172, 0]
    assert 172 <= interior[0] < 256 and 100 <= interior[1] < 140
    expected = np.zeros((300, 600), bool)
    expected[100:140, 150:300] = True
    np.testing.assert_array_equal(result.mask, expected)
    assert_valid_polygons(result, (300, 600))


@pytest.mark.parametrize("kwargs, match", [
    ({}, "at least one prompt"),
    ({"points": [], "point_labels": []}, "must not be empty"),
    ({"points": [[10, 10]]}, "point_labels are required"),
    ({"points": [[10, 10], [20, 20]], "point_labels": [1]}, "2 points but 1 point_labels"),
    ({"points": [[10, 10]], "point_labels": [2]}, "1 \\(positive\\) or 0"),
    ({"points": [[np.nan, 10]], "point_labels": [1]}, "finite"),
    ({"points": [[np.inf, 10]], "point_labels": [1]}, "finite"),
    ({"points": [[10, 10, 10]], "point_labels": [1]}, "shape \\(N, 2\\)"),
    ({"points": [[241, 10]], "point_labels": [1]}, "outside the image of width 240 and height 150"),
    ({"points": [[10, -1]], "point_labels": [1]}, "outside the image"),
    ({"points": "abc", "point_labels": [1]}, "numbers"),
    ({"point_labels": [1]}, "without points"),
    ({"box": [10, 10, 5, 20]}, "x1 > x0"),
    ({"box": [10, 10, 20, 10]}, "y1 > y0"),
    ({"box": [10, 10, 20]}, "4 numbers"),
    ({"box": [0, 0, 300, 100]}, "outside the image"),
    ({"box": [0, 0, 10, 10], "mask_input": np.zeros((1, 32, 32))}, "mask_input must have shape \\(1, 64, 64\\)"),
])
def test_bad_prompts_give_clear_errors(segmenter, kwargs, match):
    emb = segmenter.embed(WIDE)
    with pytest.raises(InvalidInputError, match=match):
        segmenter.segment(emb, **kwargs)


def test_validate_prompts_normalises():
    pts, labels, box, mask = validate_prompts((10, 20), points=[5, 5], point_labels=[True], box=(0, 0, 20, 10))
    assert pts.shape == (1, 2) and labels.tolist() == [1] and box.tolist() == [0, 0, 20, 10] and mask is None
    assert labels.dtype == np.int64 and pts.dtype == np.float64


def test_multimask_must_be_bool(segmenter):
    with pytest.raises(InvalidInputError, match="multimask must be true or false"):
        segmenter.segment(segmenter.embed(WIDE), box=[0, 0, 10, 10], multimask="yes")


def test_embed_rejects_bad_images(segmenter):
    with pytest.raises(InvalidInputError, match="shape"):
        segmenter.embed(np.zeros((2, 2, 2, 2)))
    with pytest.raises(InvalidInputError, match="empty"):
        segmenter.embed(np.zeros((0, 10)))


def test_threads_share_one_segmenter(segmenter):
    emb = segmenter.embed(WIDE)
    expected = segmenter.segment(emb, box=[20, 10, 200, 140]).mask
    results, errors = [], []

    def work():
        try:
            results.append(segmenter.segment(emb, box=[20, 10, 200, 140]).mask)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(np.array_equal(r, expected) for r in results)


def test_generate_label_image(segmenter):
    labels = segmenter.generate(WIDE, points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert labels.shape == (150, 240) and labels.dtype == np.uint32
    ids = np.unique(labels[labels > 0])
    assert ids.tolist() == list(range(1, len(ids) + 1))  # sequential ids
    # min_mask_region_area needs OpenCV in segment_anything; colabel's scikit-image version runs without it
    cleaned = segmenter.generate(WIDE, points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                 min_mask_region_area=30)
    assert cleaned.shape == (150, 240) and cleaned.dtype == np.uint32
    tiled = segmenter.generate(LARGE, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert tiled.shape == (300, 600) and tiled.dtype == np.uint32
    with pytest.raises(InvalidInputError, match="points_per_side"):
        segmenter.generate(WIDE, points_per_side=0)
    with pytest.raises(InvalidInputError, match="pred_iou_thresh"):
        segmenter.generate(WIDE, pred_iou_thresh=float("nan"))


def test_paint_labels_resolves_overlaps_by_score():
    a = np.zeros((4, 4), bool)
    a[0:3, 0:3] = True
    b = np.zeros((2, 2), bool)
    b[:] = True
    hidden = np.zeros((1, 1), bool)
    hidden[0, 0] = True
    labels = paint_labels((5, 6), [(0.5, (0, 0), a), (0.9, (2, 2), b), (0.1, (1, 1), hidden)])
    # b (score 0.9) is label 1 and wins the overlap at (2, 2); a is 2; hidden is fully covered: dropped
    assert labels.dtype == np.uint32
    assert labels[2, 2] == 1 and labels[3, 3] == 1 and labels[0, 0] == 2 and labels[1, 1] == 2
    assert set(np.unique(labels).tolist()) == {0, 1, 2}
    assert paint_labels((3, 3), []).sum() == 0


def test_remove_small_regions_like_segment_anything():
    mask = np.zeros((12, 12), bool)
    mask[1:9, 1:9] = True
    mask[4, 4] = False  # a one-pixel hole
    mask[11, 11] = True  # a one-pixel island
    filled, changed = _remove_small_regions(mask, 3, "holes")
    assert changed and filled[4, 4] and filled[11, 11]
    cleaned, changed = _remove_small_regions(filled, 3, "islands")
    assert changed and not cleaned[11, 11] and cleaned[1:9, 1:9].all()
    same, changed = _remove_small_regions(cleaned, 3, "islands")
    assert not changed and same is cleaned
    tiny = np.zeros((5, 5), bool)
    tiny[0, 0] = tiny[4, 4] = True
    tiny[3, 4] = True  # islands of 1 and 2 pixels, both below 5: the largest is kept
    kept, _ = _remove_small_regions(tiny, 5, "islands")
    assert kept.sum() == 2 and kept[4, 4]


def test_timings_tiny_model(segmenter, record_property):
    """Record embed / decode times of the tiny model (reported, loosely bounded)."""
    image = RNG.integers(0, 255, (256, 256), dtype=np.uint8)
    t0 = time.perf_counter()
    emb = segmenter.embed(image)
    embed_s = time.perf_counter() - t0
    segmenter.decode_tile(emb, 0, box=np.array([10.0, 10.0, 100.0, 100.0]))
    t0 = time.perf_counter()
    for _ in range(5):
        segmenter.decode_tile(emb, 0, box=np.array([10.0, 10.0, 100.0, 100.0]))
    decode_s = (time.perf_counter() - t0) / 5
    record_property("tiny_embed_s", embed_s)
    record_property("tiny_decode_s", decode_s)
    print(f"tiny SAM: embed {embed_s * 1000:.1f} ms, decode {decode_s * 1000:.1f} ms")
    assert embed_s < 5 and decode_s < 2


def test_from_sam_wraps_a_built_model(tiny_sam, tmp_path):
    seg = SamSegmenter.from_sam(tiny_sam, model_id="wrapped", embedding_dir=tmp_path)
    info = seg.info()
    assert info["image_size"] == 256 and info["embedding_shape"] == [256, 16, 16] and info["tile_size"] == 256
    assert seg.segment(WIDE, box=[0, 0, 50, 50]).mask.shape == (150, 240)  # an image array is embedded first
    with pytest.raises(InvalidInputError, match="overlap"):
        SamSegmenter.from_sam(tiny_sam, model_id="w", embedding_dir=tmp_path, overlap=300)


# -- limits (review D1, D2, D17) -----------------------------------------------------------------------

def test_a_prompt_with_more_than_max_points_is_refused_naming_the_limit(segmenter):
    from colabel.services.sam.segmenter import MAX_POINTS

    emb = segmenter.embed(WIDE)
    many = np.tile([[100.5, 70.5]], (MAX_POINTS + 1, 1))
    with pytest.raises(InvalidInputError, match=f"at most {MAX_POINTS} points, got {MAX_POINTS + 1}"):
        segmenter.segment(emb, points=many, point_labels=np.ones(MAX_POINTS + 1))
    pts, labels, _, _ = validate_prompts((150, 240), points=many[:MAX_POINTS], point_labels=np.ones(MAX_POINTS))
    assert pts.shape == (MAX_POINTS, 2) and labels.shape == (MAX_POINTS,)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"points_per_side": 65}, "points_per_side must be an int from 1 to 64, got 65"),
    ({"points_per_side": 10**6}, "points_per_side must be an int from 1 to 64"),
    ({"points_per_batch": 257}, "points_per_batch must be an int from 1 to 256"),
    ({"points_per_side": True}, "points_per_side must be an int"),
])
def test_generate_grid_parameters_have_an_upper_bound(segmenter, kwargs, match):
    encoded = segmenter.store.stats()["computed"]
    with pytest.raises(InvalidInputError, match=match):
        segmenter.generate(WIDE, **kwargs)
    assert segmenter.store.stats()["computed"] == encoded  # refused before any encoder pass


def test_a_click_during_generate_is_decoded_between_its_decoder_batches(segmenter):
    """generate takes the lock per decoder batch: a segment call made while generate runs is decoded before
    generate's later batches (order of decoder calls, not timings)."""
    emb = segmenter.embed(WIDE)
    segmenter.embed(WIDE)  # generate finds the embedding stored
    calls: list[str] = []
    generating = threading.Event()

    def record(module, args, output):
        name = threading.current_thread().name
        calls.append(name)
        if name == "generate":
            generating.set()

    handle = segmenter.sam.mask_decoder.register_forward_hook(record)
    errors: list[BaseException] = []

    def run_generate():
        try:  # 16 x 16 prompts in batches of 4: 64 decoder batches
            segmenter.generate(WIDE, points_per_side=16, points_per_batch=4, pred_iou_thresh=0.0,
                               stability_score_thresh=0.0)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    worker = threading.Thread(target=run_generate, name="generate")
    try:
        worker.start()
        assert generating.wait(60), "generate never reached its decoder"
        segmenter.segment(emb, points=[[100.5, 70.5]], point_labels=[1])
        clicked_at = calls.index("MainThread")
        worker.join(120)
    finally:
        handle.remove()
    assert not errors and not worker.is_alive()
    assert calls.count("generate") == 64
    later = calls[clicked_at + 1:]
    assert later.count("generate") > 0, "the click waited for the whole generate"


def test_a_channels_first_stack_is_refused_with_a_hint(segmenter):
    with pytest.raises(InvalidInputError, match=r"64 channels last, more than 16.*np\.moveaxis\(image, 0, -1\)"):
        segmenter.embed(np.zeros((3, 64, 64), np.uint8))
    assert segmenter.embed(np.zeros((64, 64, 16), np.uint16)).image_shape == (64, 64)  # 16 markers: averaged


def test_a_flat_point_counts_as_one_point_for_the_ambiguity_rule():
    from colabel.services.sam.segmenter import ambiguous_prompt

    assert ambiguous_prompt([10, 20], None) == ambiguous_prompt([[10, 20]], None) is True
    assert ambiguous_prompt([[10, 20], [30, 40]], None) is False
    assert ambiguous_prompt(None, [0, 0, 5, 5]) is True
