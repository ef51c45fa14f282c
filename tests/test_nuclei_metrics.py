"""Instance metrics on small label images whose answers were computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from colabel.errors import InvalidInputError
from colabel.services.nuclei.metrics import aji, f1_at, match_instances, overlaps

pytestmark = pytest.mark.unit

# gt: object 1 has 6 px, object 2 has 4 px, object 3 has 2 px
GT = np.array(
    [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 2, 2],
        [0, 0, 0, 0, 2, 2],
        [3, 3, 0, 0, 0, 0],
    ]
)
# pred 5 (5 px) inside gt 1: IoU 5/6; pred 7 (2 px) inside gt 2: IoU 2/4; pred 9 (2 px) shares 1 px
# with gt 3: IoU 1/3
PRED = np.array(
    [
        [5, 5, 5, 0, 0, 0],
        [5, 5, 0, 0, 7, 7],
        [0, 0, 0, 0, 0, 0],
        [0, 9, 9, 0, 0, 0],
    ]
)


def test_overlap_table_by_hand():
    t = overlaps(GT, PRED)
    assert t["gt_ids"].tolist() == [1, 2, 3]
    assert t["pred_ids"].tolist() == [5, 7, 9]
    assert t["gt_area"].tolist() == [6, 4, 2]
    assert t["pred_area"].tolist() == [5, 2, 2]
    pairs = {
        (int(t["gt_ids"][g]), int(t["pred_ids"][p])): i
        for g, p, i in zip(t["pair_gt"], t["pair_pred"], t["pair_iou"], strict=True)
    }
    assert pairs == pytest.approx({(1, 5): 5 / 6, (2, 7): 0.5, (3, 9): 1 / 3})


@pytest.mark.parametrize(
    "threshold, expected",
    [
        (0.3, (3, 0, 0)),
        (0.5, (2, 1, 1)),  # IoU exactly 0.5 matches (>=)
        (0.51, (1, 2, 2)),
        (0.9, (0, 3, 3)),
    ],
)
def test_match_instances_by_hand(threshold, expected):
    assert match_instances(GT, PRED, iou=threshold) == expected


def test_f1_by_hand():
    assert f1_at(GT, PRED, 0.5) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert f1_at(GT, PRED, 0.3) == 1.0
    assert f1_at(GT, PRED, 0.9) == 0.0


def test_aji_by_hand():
    # sum of intersections 5 + 2 + 1 over sum of unions 6 + 4 + 3, every prediction used
    assert aji(GT, PRED) == pytest.approx(8 / 13)
    # gt 1 <-> pred 3 (inter 1, union 2); gt 2 overlaps nothing (+1); pred 4 unused (+1)
    assert aji(np.array([[1, 1, 0, 0, 2]]), np.array([[3, 0, 0, 4, 0]])) == pytest.approx(1 / 4)


def test_aji_counts_a_prediction_taken_twice_in_both_unions():
    gt = np.array([[1, 1, 2, 2]])
    pred = np.array([[7, 7, 7, 7]])
    # each gt: inter 2, union 4 -> 4 / 8
    assert aji(gt, pred) == pytest.approx(0.5)


def test_ambiguous_low_threshold_matches_one_to_one():
    gt = np.array([[1, 1, 1, 1]])
    pred = np.array([[2, 2, 3, 3]])  # both predictions have IoU 0.5 with the one object
    assert match_instances(gt, pred, iou=0.3) == (1, 1, 0)


def test_identical_and_relabelled_images_score_perfectly():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=(20, 20))
    permuted = np.array([0, 40, 3, 17, 2, 99])[labels]
    assert f1_at(labels, permuted) == 1.0
    assert aji(labels, permuted) == 1.0
    assert match_instances(labels, permuted) == (5, 0, 0)


def test_empty_images():
    empty = np.zeros((4, 4), dtype=np.int32)
    one = empty.copy()
    one[1:3, 1:3] = 1
    assert f1_at(empty, empty) == 1.0 and aji(empty, empty) == 1.0
    assert match_instances(empty, one) == (0, 1, 0)
    assert match_instances(one, empty) == (0, 0, 1)
    assert f1_at(one, empty) == 0.0 and aji(one, empty) == 0.0


@pytest.mark.parametrize(
    "gt, pred, iou, message",
    [
        (np.zeros((2, 2), int), np.zeros((2, 3), int), 0.5, "same shape"),
        (np.zeros((2, 2), float), np.zeros((2, 2), int), 0.5, "integer label image"),
        (np.full((2, 2), -1), np.zeros((2, 2), int), 0.5, "negative labels"),
        (np.zeros((2, 2), int), np.zeros((2, 2), int), 0.0, r"iou must be in \(0, 1\]"),
    ],
)
def test_bad_inputs(gt, pred, iou, message):
    with pytest.raises(InvalidInputError, match=message):
        match_instances(gt, pred, iou=iou)
