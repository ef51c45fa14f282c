"""HALS cell features: nucleus measurements, nucleus-scaled patches, block-balanced classifier columns, service.

Real images from ``tests/data`` (the IHC image with classical nuclei, the DSB2018 fluorescence image with
its hand-labelled mask) and the real ImageNet EfficientNet-Lite0 weights; synthetic label images only where
the expected value must be exact (a disc's area, a known stain).
"""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from skimage import color, measure

from colabel.errors import InvalidInputError
from colabel.services.hals.classifier import Ensemble, OnlineClassifier
from colabel.services.hals.measurements import (
    MEASUREMENT_NAMES,
    N_MEASUREMENTS,
    cell_features,
    column_weights,
    median_diameter,
    nucleus_measurements,
    patch_size_for,
)
from colabel.services.hals.simulation import holdout_split, region_means

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data"
COL = {name: i for i, name in enumerate(MEASUREMENT_NAMES)}


@pytest.fixture(scope="module")
def ihc_cells():
    """The IHC image, its classical nuclei (labels, ids, [x, y] centroids)."""
    from colabel.services.nuclei import segment_nuclei

    image = iio.imread(DATA / "ihc_ki67.png")[..., :3]
    result = segment_nuclei(image, backend="classical")
    ids = np.array([n.id for n in result.nuclei], dtype=np.int64)
    xy = np.array([n.centroid for n in result.nuclei], dtype=np.float64)
    return image, result.labels, ids, xy


@pytest.fixture(scope="module")
def dsb_cells():
    image = tifffile.imread(DATA / "dsb2018_nuclei.tif")
    mask = tifffile.imread(DATA / "dsb2018_nuclei_mask.tif")
    props = measure.regionprops(mask)
    ids = np.array([p.label for p in props], dtype=np.int64)
    xy = np.array([p.centroid for p in props])[:, ::-1] + 0.5
    return image, mask, ids, xy


def _discs(shape=(64, 96)):
    """Two discs (radius 8 and 12) on a grey image: the small one bright (200), the large one dim (80)."""
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    labels[(rr - 32) ** 2 + (cc - 24) ** 2 <= 8**2] = 1
    labels[(rr - 32) ** 2 + (cc - 66) ** 2 <= 12**2] = 2
    image = np.full(shape, 10, np.uint8)
    image[labels == 1] = 200
    image[labels == 2] = 80
    return image, labels


# ------------------------------------------------------------------------------------ measurements


def test_grey_measurements_give_intensity_size_and_round_shape():
    image, labels = _discs()
    m = nucleus_measurements(image, labels, [2, 1])
    assert m.shape == (2, N_MEASUREMENTS) and m.dtype == np.float32 and np.isfinite(m).all()
    large, small = m
    assert small[COL["stain1_nucleus_mean"]] > large[COL["stain1_nucleus_mean"]] > large[COL["stain1_ring_mean"]]
    assert small[COL["stain1_nucleus_sd"]] == pytest.approx(0, abs=1e-6)  # a flat disc
    # grey images have one "stain": the others are zero
    assert not m[:, COL["stain2_nucleus_mean"]:COL["stain3_ring_mean"] + 1].any()
    assert large[COL["log_area"]] == pytest.approx(np.log((labels == 2).sum()), rel=1e-6)
    assert large[COL["eccentricity"]] < 0.2 and small[COL["solidity"]] > 0.9


def test_ihc_ring_dab_measurement_is_the_benchmarks_dab_ring_rule(ihc_cells):
    image, labels, ids, _ = ihc_cells
    m = nucleus_measurements(image, labels, ids, ring_px=5)
    ring = region_means(color.rgb2hed(image)[..., 2], labels, ids, ring=5)
    ok = np.isfinite(ring)
    np.testing.assert_allclose(m[ok, COL["stain3_ring_mean"]], ring[ok], rtol=1e-4, atol=1e-6)
    # hematoxylin is the nuclear stain: higher inside the nuclei than in their rings on average
    assert np.mean(m[:, COL["stain1_nucleus_mean"]] > m[:, COL["stain1_ring_mean"]]) > 0.8


def test_measurements_refuse_mismatched_labels_and_unknown_ids():
    image, labels = _discs()
    with pytest.raises(InvalidInputError, match="height and width"):
        nucleus_measurements(image, labels[:10], [1])
    with pytest.raises(InvalidInputError, match=r"not in labels: \[7\]"):
        nucleus_measurements(image, labels, [1, 7])
    with pytest.raises(InvalidInputError, match="integer label image"):
        nucleus_measurements(image, labels.astype(np.float32), [1])


def test_patch_side_follows_the_nucleus_size(dsb_cells, ihc_cells):
    assert median_diameter(dsb_cells[1]) == pytest.approx(23.67, abs=0.05)
    assert patch_size_for(median_diameter(ihc_cells[1], ihc_cells[2])) == 24  # 1.6 x 14.6 px
    assert patch_size_for(median_diameter(dsb_cells[1])) == 38  # 1.6 x 23.7 px
    assert patch_size_for(200.0) == 96 and patch_size_for(2.0) == 16  # clipped
    with pytest.raises(InvalidInputError, match="positive number"):
        patch_size_for(0.0)
    with pytest.raises(InvalidInputError, match="no labelled nucleus"):
        median_diameter(np.zeros((8, 8), np.int32))


# ------------------------------------------------------------------------------------ column weights


def test_column_weights_give_both_blocks_the_same_total_variance():
    w = column_weights(1280)
    assert w.shape == (1280 + N_MEASUREMENTS,)
    assert np.sum(w[:1280] ** 2) == pytest.approx(np.sum(w[1280:] ** 2))
    assert column_weights(1280, 0).tolist() == [1.0] * 1280


def test_weighting_a_few_informative_columns_lets_the_head_learn_them_from_few_labels():
    # 1280 uninformative columns and 4 that carry the class: with 40 labels the unweighted head drowns the
    # 4 in noise; balancing the blocks recovers them.
    rng = np.random.default_rng(3)
    n = 400
    y = rng.integers(0, 2, n)
    x = np.hstack([np.maximum(rng.normal(0, 1, (n, 1280)), 0), y[:, None] * 1.5 + rng.normal(0, 1, (n, 4))])
    x = x.astype(np.float32)
    train, test = np.arange(40), np.arange(40, n)
    accuracy = {}
    for name, w in (("plain", None), ("balanced", column_weights(1280, 4))):
        ens = Ensemble().fit(x[train], y[train], n_classes=2, n_members=5, column_weights=w)
        accuracy[name] = float(np.mean(ens.predict(x[test])[0] == y[test]))
    assert accuracy["balanced"] > 0.8 and accuracy["balanced"] > accuracy["plain"] + 0.1, accuracy


def test_column_weights_of_the_wrong_length_are_refused_before_training():
    x = np.random.default_rng(0).normal(size=(20, 6)).astype(np.float32)
    y = np.repeat([0, 1], 10)
    with pytest.raises(InvalidInputError, match=r"shape \(6,\)"):
        Ensemble().fit(x, y, n_classes=2, column_weights=np.ones(5))
    with pytest.raises(InvalidInputError, match="> 0"):
        Ensemble().fit(x, y, n_classes=2, column_weights=np.r_[np.ones(5), 0.0])
    clf = OnlineClassifier(2, features=x, min_labels_per_class=5, column_weights=np.ones(3))
    for i, c in enumerate(y):
        clf.add_label(i, int(c))
    with pytest.raises(InvalidInputError, match="column_weights"):
        clf.retrain()
    assert not clf.ready


# ------------------------------------------------------------------------------------ cell features


def test_cell_features_make_the_dsb_bright_vs_dim_rule_learnable(dsb_cells):
    """The DSB 'bright vs dim' class (mean intensity > median) that CNN patches barely express."""
    from colabel.services.hals.features import EfficientNetLite0Features

    image, mask, ids, xy = dsb_cells
    extractor = EfficientNetLite0Features()
    feats = cell_features(image, mask, ids, xy, extractor)
    assert feats.shape == (len(ids), 1280 + N_MEASUREMENTS) and feats.dtype == np.float32
    truth = (region_means(image.astype(np.float64), mask, ids) > np.median(region_means(image, mask, ids)))
    accuracy = {"cnn": [], "cell": []}
    for split in range(3):  # 94 / 31 cells per split: average three to see past one split's luck
        pool, held = holdout_split(len(ids), seed=100 + split)
        for name, x, w in (("cnn", feats[:, :1280], None), ("cell", feats, column_weights(1280))):
            ens = Ensemble().fit(x[pool], truth[pool].astype(int), n_classes=2, n_members=5, seed=split,
                                 column_weights=w)
            accuracy[name].append(float(np.mean(ens.predict(x[held])[0] == truth[held])))
    cell, cnn = np.mean(accuracy["cell"]), np.mean(accuracy["cnn"])
    assert cell >= 0.8 and cell >= cnn + 0.1, accuracy


def test_cell_features_refuse_ids_that_do_not_match_the_centroids(dsb_cells):
    from colabel.services.hals.features import EfficientNetLite0Features

    image, mask, ids, xy = dsb_cells
    with pytest.raises(InvalidInputError, match="one id per centroid"):
        cell_features(image, mask, ids[:3], xy[:4], EfficientNetLite0Features())


def test_the_classifier_service_serves_cell_features_and_trains_on_them(tmp_path, ihc_cells):
    from colabel.services.hals.service import ClassifierService

    image, labels, ids, xy = ihc_cells
    service = ClassifierService(str(tmp_path))
    assert service.info()["feature_dim"] == 1280 + N_MEASUREMENTS
    feats = service.features(image, xy, labels, ids)
    assert feats.shape == (len(ids), 1280 + N_MEASUREMENTS)
    assert service.features(image, xy).shape == (len(ids), 1280)  # without labels: HALS' 40 px CNN features
    dab = region_means(color.rgb2hed(image)[..., 2], labels, ids, ring=5)
    truth = (np.nan_to_num(dab) > np.nanmedian(dab)).astype(np.int64)
    report = service.fit(feats[::2], truth[::2], 2)
    predicted = service.predict(report["model_id"], feats[1::2])["classes"]
    assert np.mean(predicted == truth[1::2]) > 0.85
    with pytest.raises(InvalidInputError, match="without ids"):
        service.features(image, xy, labels)
    with pytest.raises(InvalidInputError, match="without labels"):
        service.features(image, xy, None, ids)
