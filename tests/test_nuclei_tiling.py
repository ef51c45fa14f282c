"""segment_nuclei: tiling and stitching, regions, caching, registry, wire format and input errors."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi
from skimage.draw import disk

from colabel.apps.provider.annotations import validate_feature_collection
from colabel.apps.provider.models import Region
from colabel.errors import InvalidInputError, NotFoundError
from colabel.services.nuclei import (
    ClassicalSegmenter,
    NucleusCache,
    NucleusResult,
    NucleusSegmenter,
    Segmentation,
    aji,
    available_backends,
    get_backend,
    match_instances,
    register_backend,
    segment_nuclei,
    tile_grid,
)

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data"


class ThresholdSegmenter(NucleusSegmenter):
    """Connected components of ``image > 0``, computed tile by tile: cut nuclei show up as pieces."""

    name = "threshold"

    def segment(self, image, *, mpp=None):
        return ndi.label(np.asarray(image) > 0)[0]


class CountingSegmenter(ClassicalSegmenter):
    """The classical backend, counting the tiles it segments."""

    def __init__(self, **options):
        super().__init__(**options)
        self.calls = 0

    def segment_prepared(self, image, *, context):
        self.calls += 1
        return super().segment_prepared(image, context=context)


@pytest.fixture(scope="module")
def dsb():
    return tifffile.imread(DATA / "dsb2018_nuclei.tif")


@pytest.fixture(scope="module")
def dsb_whole(dsb):
    return segment_nuclei(dsb)


def discs(shape, radius, n, seed):
    """Non-touching discs at random positions, many of them across tile borders."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.int32)
    k = 0
    for _ in range(20 * n):
        r, c = rng.integers(radius, shape[0] - radius), rng.integers(radius, shape[1] - radius)
        rr, cc = disk((r, c), radius + 2, shape=shape)
        if labels[rr, cc].any():
            continue
        k += 1
        rr, cc = disk((r, c), radius, shape=shape)
        labels[rr, cc] = k
        if k == n:
            break
    return labels


# --------------------------------------------------------------------------------------------------
# tiling
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, tile, overlap",
    [((512, 512), 128, 48), ((300, 1000), 256, 64), ((100, 90), 128, 32), ((257, 129), 64, 63)],
)
def test_tile_cores_partition_the_image(shape, tile, overlap):
    tiles = tile_grid(shape, tile_size=tile, overlap=overlap)
    owner = np.zeros(shape, dtype=int)
    for t in tiles:
        (r0, r1), (c0, c1) = t["rows"], t["cols"]
        (cr0, cr1), (cc0, cc1) = t["core_rows"], t["core_cols"]
        assert 0 <= r0 < r1 <= shape[0] and 0 <= c0 < c1 <= shape[1]
        assert r1 - r0 == min(tile, shape[0]) and c1 - c0 == min(tile, shape[1])
        assert r0 <= cr0 < cr1 <= r1 and c0 <= cc0 < cc1 <= c1
        # a core stays at least overlap / 2 - 1 pixels away from every tile edge inside the image
        assert cr0 == 0 or cr0 - r0 >= overlap // 2 - 1
        assert cr1 == shape[0] or r1 - cr1 >= overlap // 2 - 1
        owner[cr0:cr1, cc0:cc1] += 1
    assert (owner == 1).all()


def test_stitching_keeps_every_cut_nucleus_once():
    """Discs of radius 10 (< overlap / 2 - 1), many cut by tile edges: each must come out exactly once and
    whole, as in the untiled image."""
    labels = discs((400, 520), 10, 120, seed=3)
    image = (labels > 0).astype(np.uint8) * 200
    whole = segment_nuclei(image, backend=ThresholdSegmenter())
    tiled = segment_nuclei(image, backend=ThresholdSegmenter(), tile_size=128, overlap=48)
    assert len(whole.nuclei) == len(tiled.nuclei) == labels.max()
    assert aji(labels, tiled.labels) == 1.0
    assert np.array_equal(tiled.labels > 0, labels > 0)
    # the pieces at tile edges were there to be dropped: a tile on its own sees cut discs
    assert any(
        np.any(labels[t["rows"][0] : t["rows"][1], t["cols"][0] : t["cols"][1]][[0, -1]] > 0)
        for t in tile_grid(labels.shape, tile_size=128, overlap=48)
    )


def test_dsb_whole_and_tiled_give_the_same_nuclei(dsb, dsb_whole):
    tiled = segment_nuclei(dsb, tile_size=128, overlap=48)
    n_whole, n_tiled = len(dsb_whole.nuclei), len(tiled.nuclei)
    assert abs(n_tiled - n_whole) <= 0.02 * n_whole
    tp, fp, fn = match_instances(dsb_whole.labels, tiled.labels, iou=0.5)
    assert tp >= 0.98 * n_whole and fp <= 0.02 * n_whole and fn <= 0.02 * n_whole
    # no duplicates: no nucleus of the whole image overlaps two tiled nuclei by more than a sliver
    pairs = np.stack([dsb_whole.labels.ravel(), tiled.labels.ravel()], axis=1)
    pairs = pairs[(pairs > 0).all(axis=1)]
    uniq, counts = np.unique(pairs, axis=0, return_counts=True)
    big = uniq[counts >= 10]
    assert len(np.unique(big[:, 0])) == len(big)
    centroids = np.array([n.centroid for n in tiled.nuclei])
    gaps = np.linalg.norm(centroids[:, None] - centroids[None], axis=2) + np.eye(len(centroids)) * 1e9
    assert gaps.min() > 3  # two copies of one nucleus would have (almost) the same centroid


def test_progress_is_reported(dsb):
    seen = []
    segment_nuclei(dsb, tile_size=256, overlap=64, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 9) for i in range(1, 10)]


# --------------------------------------------------------------------------------------------------
# regions
# --------------------------------------------------------------------------------------------------


def test_region_coordinates_are_in_the_full_image_frame():
    labels = discs((300, 400), 8, 60, seed=5)
    image = (labels > 0).astype(np.uint8) * 200
    whole = segment_nuclei(image, backend=ThresholdSegmenter())
    region = (150, 60, 200, 180)  # x, y, width, height
    part = segment_nuclei(image, backend=ThresholdSegmenter(), region=region)
    assert part.labels.shape == (180, 200)
    assert part.origin == (150, 60) and part.image_shape == (300, 400)
    by_centroid = {tuple(np.round(n.centroid, 6)): n for n in whole.nuclei}
    inside = 0
    for n in part.nuclei:
        x0, y0, x1, y1 = n.bbox
        assert 150 <= x0 < x1 <= 350 and 60 <= y0 < y1 <= 240
        if x0 > 150 and y0 > 60 and x1 < 350 and y1 < 240:  # not clipped by the region: identical
            twin = by_centroid[tuple(np.round(n.centroid, 6))]
            assert (twin.bbox, twin.area, twin.polygon) == (n.bbox, n.area, n.polygon)
            inside += 1
    assert inside >= 10
    validate_feature_collection(part.to_geojson(), image_shape=image.shape)
    # the label image is the region: pixel (r, c) of it is image pixel (60 + r, 150 + c)
    n = part.nuclei[0]
    rows, cols = np.nonzero(part.labels == n.id)
    assert n.centroid == pytest.approx((cols.mean() + 150.5, rows.mean() + 60.5))


def test_region_with_the_classical_backend_matches_the_whole_image(dsb, dsb_whole):
    region = Region(x=128, y=64, width=256, height=320)
    part = segment_nuclei(dsb, region=region)
    crop = dsb_whole.labels[64:384, 128:384]
    interior = [n for n in part.nuclei if n.bbox[0] > 130 and n.bbox[1] > 66 and n.bbox[2] < 382 and n.bbox[3] < 382]
    keep = np.isin(part.labels, [n.id for n in interior])
    tp, fp, _ = match_instances(crop, np.where(keep, part.labels, 0), iou=0.5)
    assert tp >= 0.9 * len(interior) and len(interior) >= 15


@pytest.mark.parametrize(
    "region, message",
    [
        ((0, 0, 600, 10), "not inside"),
        ((-1, 0, 10, 10), "not inside"),
        ((500, 500, 20, 20), "not inside"),
        ((0, 0, 0, 10), "must be positive"),
        ((0, 0, 10.5, 10), "must be integers"),
        ((0, 0, 10), r"must be \(x, y, width, height\)"),
        ("0,0,10,10", r"must be \(x, y, width, height\)"),
    ],
)
def test_bad_regions(dsb, region, message):
    with pytest.raises(InvalidInputError, match=message):
        segment_nuclei(dsb, region=region)


# --------------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------------


def test_cache_hit_returns_the_same_result_without_recomputing(dsb):
    backend = CountingSegmenter()
    cache = NucleusCache(max_items=4)
    first = segment_nuclei(dsb, backend=backend, cache=cache)
    assert backend.calls == 1 and (cache.hits, cache.misses) == (0, 1)
    second = segment_nuclei(dsb, backend=backend, cache=cache)
    assert backend.calls == 1 and cache.hits == 1
    assert np.array_equal(first.labels, second.labels) and first.nuclei == second.nuclei
    second.labels[:] = 0  # callers get their own arrays
    assert segment_nuclei(dsb, backend=backend, cache=cache).labels.any()
    # region, options, tiling and pixels are part of the key
    segment_nuclei(dsb, backend=backend, cache=cache, region=(0, 0, 100, 100))
    segment_nuclei(dsb, backend=CountingSegmenter(radius=8), cache=cache)
    segment_nuclei(dsb, backend=backend, cache=cache, tile_size=256, overlap=64)
    changed = dsb.copy()
    changed[0, 0] += 1
    calls = backend.calls
    segment_nuclei(changed, backend=backend, cache=cache)
    assert backend.calls == calls + 1
    assert len(cache) == 4  # bounded: the oldest entries went


def test_disk_cache_survives_a_new_process_view(dsb, tmp_path):
    folder = tmp_path / "cache"
    backend = CountingSegmenter()
    first = segment_nuclei(dsb, backend=backend, cache=NucleusCache(directory=folder), region=(10, 20, 300, 200))
    files = sorted(os.listdir(folder))
    assert len(files) == 1 and files[0].endswith(".npz")  # no temporary file left behind
    fresh = NucleusCache(directory=folder)  # an empty memory, the same folder
    again = segment_nuclei(dsb, backend=backend, cache=fresh, region=(10, 20, 300, 200))
    assert backend.calls == 1 and fresh.hits == 1
    assert np.array_equal(first.labels, again.labels) and first.nuclei == again.nuclei
    assert (again.origin, again.image_shape, again.backend) == ((10, 20), (512, 512), "classical")
    # a damaged file is a miss, not an error
    (folder / files[0]).write_bytes(b"not an npz")
    broken = NucleusCache(directory=folder)
    segment_nuclei(dsb, backend=backend, cache=broken, region=(10, 20, 300, 200))
    assert backend.calls == 2 and broken.misses == 1


# --------------------------------------------------------------------------------------------------
# registry, wire format
# --------------------------------------------------------------------------------------------------


def test_registry():
    assert {"classical", "hovernet"} <= set(available_backends())
    register_backend("threshold-test", ThresholdSegmenter)
    backend = get_backend("threshold-test")
    assert isinstance(backend, ThresholdSegmenter)
    image = np.zeros((20, 20), np.uint8)
    image[5:9, 5:9] = 1
    assert len(segment_nuclei(image, backend="threshold-test").nuclei) == 1
    assert get_backend("classical", stain="he").options()["stain"] == "he"
    with pytest.raises(NotFoundError, match="unknown nucleus backend 'nope'"):
        get_backend("nope")
    with pytest.raises(TypeError, match="must implement segment"):

        class Empty(NucleusSegmenter):  # noqa: F841
            name = "empty"


def test_backend_returning_a_segmentation_with_types():
    class Typed(NucleusSegmenter):
        name = "typed"
        type_names = {0: "background", 1: "round", 2: "big"}

        def segment(self, image, *, mpp=None):
            labels = ndi.label(image > 0)[0]
            sizes = np.bincount(labels.ravel())
            kinds = np.where(sizes[labels] > 50, 2, 1) * (labels > 0)
            return Segmentation(labels, kinds, np.where(labels > 0, 0.75, 0.0))

    image = np.zeros((40, 60), np.uint8)
    image[5:10, 5:10] = 1
    image[20:35, 30:50] = 1
    result = segment_nuclei(image, backend=Typed(), tile_size=32, overlap=20)
    assert [(n.type, n.type_prob) for n in result.nuclei] == [(1, 0.75), (2, 0.75)]
    fc = validate_feature_collection(result.to_geojson(), image_shape=image.shape)
    assert [f["properties"]["classification"]["name"] for f in fc["features"]] == ["round", "big"]
    wire = result.to_dict()
    assert wire["type_names"] == {"0": "background", "1": "round", "2": "big"} and wire["count"] == 2
    back = NucleusResult.from_dict(wire)
    assert back.nuclei == result.nuclei and back.type_names == result.type_names
    assert np.array_equal(back.labels, result.labels)
    assert "labels" not in result.to_dict(include_labels=False)


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros(10), r"must have shape \(H, W\) or \(H, W, C\)"),
        (np.zeros((2, 10, 10, 3)), r"must have shape \(H, W\) or \(H, W, C\)"),
        (np.zeros((0, 10)), "image is empty"),
        (np.zeros((10, 10, 5)), "1 to 4 channels"),
        (np.zeros((10, 10), dtype=bool), "dtype must be an integer or float type, got bool"),
        (np.zeros((10, 10), dtype=np.complex64), "dtype must be an integer or float type, got complex64"),
        (np.full((10, 10), np.nan), "NaN or infinite"),
        (np.full((10, 10), np.inf, dtype=np.float32), "NaN or infinite"),
        ("not an image", "dtype must be an integer or float type"),
    ],
)
def test_bad_images(image, message):
    with pytest.raises(InvalidInputError, match=message):
        segment_nuclei(image)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tile_size": 8}, "tile_size must be at least 16"),
        ({"tile_size": 64, "overlap": 64}, r"overlap must be in \[0, tile_size\)"),
        ({"overlap": -1}, r"overlap must be in \[0, tile_size\)"),
        ({"tile_size": 100.0}, "tile_size must be an integer"),
        ({"mpp": -0.5}, "mpp must be a positive number"),
        ({"mpp": float("nan")}, "mpp must be a positive number"),
        ({"backend": 3}, "backend must be a name or a NucleusSegmenter"),
        ({"backend": ClassicalSegmenter(), "backend_options": {"radius": 3}}, "backend_options only apply"),
    ],
)
def test_bad_arguments(dsb, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        segment_nuclei(dsb, **kwargs)


def test_a_region_missing_a_key_names_the_key():
    from colabel.services.nuclei.base import parse_region

    with pytest.raises(InvalidInputError, match="region is missing 'height'; give x, y, width and height"):
        parse_region({"x": 0, "y": 0, "width": 10}, (100, 100))
    with pytest.raises(InvalidInputError, match="region is missing 'x', 'y'"):
        parse_region({"width": 10, "height": 10}, (100, 100))
    assert parse_region({"x": 1, "y": 2, "width": 10, "height": 20}, (100, 100)) == (1, 2, 10, 20)


def test_the_nuclei_service_wants_include_labels_as_a_bool():
    from colabel.services.nuclei.service import NucleiService

    service = NucleiService()
    image = np.zeros((32, 32), np.uint8)
    for value in ("no", 0, None):
        with pytest.raises(InvalidInputError, match="include_labels must be true or false"):
            service.segment(image, None, None, None, value)
    assert "labels" not in service.segment(image, None, None, None, False)
    assert service.segment(image, None, None, None, np.bool_(True))["labels"].shape == (32, 32)


def test_disk_cache_keeps_the_recently_used_results_within_its_budget(dsb, tmp_path):
    folder = tmp_path / "cache"
    backend = CountingSegmenter()
    regions = [(0, 0, 200, 200), (200, 0, 200, 200), (0, 200, 200, 200), (200, 200, 200, 200)]
    probe = NucleusCache(directory=tmp_path / "probe", max_disk_bytes=None)
    segment_nuclei(dsb, backend=CountingSegmenter(), cache=probe, region=regions[0])
    size = max(p.stat().st_size for p in (tmp_path / "probe").glob("*.npz"))
    cache = NucleusCache(max_items=1, directory=folder, max_disk_bytes=int(2.5 * size))
    segment_nuclei(dsb, backend=backend, cache=cache, region=regions[0])
    segment_nuclei(dsb, backend=backend, cache=cache, region=regions[1])
    old = time.time() - 3600
    for i, path in enumerate(sorted(folder.glob("*.npz"), key=os.path.getmtime)):
        os.utime(path, (old + i, old + i))
    fresh = NucleusCache(max_items=1, directory=folder, max_disk_bytes=int(2.5 * size))  # another replica
    segment_nuclei(dsb, backend=backend, cache=fresh, region=regions[0])  # a disk hit marks the file used
    assert backend.calls == 2
    segment_nuclei(dsb, backend=backend, cache=fresh, region=regions[2])  # over budget: the least recent goes
    assert len(list(folder.glob("*.npz"))) == 2 and not list(folder.glob("*.lock"))
    segment_nuclei(dsb, backend=backend, cache=NucleusCache(directory=folder), region=regions[0])
    assert backend.calls == 3  # region 0 was kept
    segment_nuclei(dsb, backend=backend, cache=NucleusCache(directory=folder), region=regions[1])
    assert backend.calls == 4  # region 1, unused for an hour, was deleted and is segmented again
    with pytest.raises(InvalidInputError, match="max_disk_bytes"):
        NucleusCache(directory=folder, max_disk_bytes=-1)
