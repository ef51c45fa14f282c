"""Consensus of several annotators and their agreement, on small cases computed by hand."""

from __future__ import annotations

import builtins
import json

import numpy as np
import pytest

from colabel.errors import InvalidInputError
from colabel.services.training.consensus import (
    ConsensusResult,
    agreement_report,
    cohen_kappa,
    consensus_classes,
    consensus_instances,
    pairwise_f1,
    pairwise_kappa,
)

pytestmark = pytest.mark.unit


def square(shape, rows, cols, label, out=None):
    """Label image with ``label`` on rows[0]..rows[1], cols[0]..cols[1] (inclusive)."""
    out = np.zeros(shape, dtype=np.int32) if out is None else out
    out[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = label
    return out


# 3 annotators on 10 x 10. A and B draw the same cell (IoU 12/20 = 0.6); A also draws a cell nobody else
# draws; C draws only a cell overlapping both (IoU 4/28 with A, 6/26 with B): unmatched, so it never votes.
A3 = square((10, 10), (8, 9), (0, 1), 2, square((10, 10), (2, 5), (2, 5), 1))
B3 = square((10, 10), (2, 5), (3, 6), 7)
C3 = square((10, 10), (4, 7), (4, 7), 3)


# ------------------------------------------------------------------------------------------- instances


def test_two_of_three_keep_one_object_with_pixel_majority_outline():
    before = [m.copy() for m in (A3, B3, C3)]
    result = consensus_instances([A3, B3, C3])
    assert isinstance(result, ConsensusResult)
    expected = square((10, 10), (2, 5), (3, 5), 1)  # pixels inside both A's and B's object: 4 x 3
    np.testing.assert_array_equal(result.labels, expected)
    assert result.labels.dtype == np.uint32
    assert result.support.tolist() == [2]
    assert result.members == ({0: 1, 1: 7},)
    assert result.min_agree == 2 and result.n_objects == 1
    # C covers (4..5, 6) together with B: two votes, but C's object is unmatched, so they are not counted
    assert result.labels[4, 6] == 0 and result.labels[5, 6] == 0
    for m, b in zip((A3, B3, C3), before, strict=True):  # inputs untouched
        np.testing.assert_array_equal(m, b)


def test_three_of_three_outline_is_majority_not_union_or_intersection():
    # A-B IoU 0.6, A-C IoU 0.6, B-C IoU 9/23 < 0.5: one group by single linkage through A
    a = square((7, 7), (1, 4), (1, 4), 1)
    b = square((7, 7), (1, 4), (2, 5), 1)
    c = square((7, 7), (2, 5), (1, 4), 1)
    result = consensus_instances([a, b, c])
    expected = np.array(
        [
            [0, 0, 0, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 0, 0],  # row 1: A and B cover cols 2..4, C nothing
            [0, 1, 1, 1, 1, 0, 0],  # rows 2..4: col 1 by A and C, cols 2..4 by all, col 5 by B only
            [0, 1, 1, 1, 1, 0, 0],
            [0, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 0, 0],  # row 5: C only
            [0, 0, 0, 0, 0, 0, 0],
        ]
    )
    np.testing.assert_array_equal(result.labels, expected)
    assert result.support.tolist() == [3]
    assert result.members == ({0: 1, 1: 1, 2: 1},)
    # all three must agree: the intersection
    strict = consensus_instances([a, b, c], min_agree=3)
    np.testing.assert_array_equal(strict.labels, square((7, 7), (2, 4), (2, 4), 1))


def test_two_annotators_one_against_one_is_a_tie_and_dropped():
    a = square((10, 10), (6, 8), (6, 8), 2, square((10, 10), (0, 3), (0, 3), 1))
    b = square((10, 10), (0, 3), (1, 4), 5)  # IoU with A's 1: 12/20
    result = consensus_instances([a, b])  # default min_agree = 2 of 2
    np.testing.assert_array_equal(result.labels, square((10, 10), (0, 3), (1, 3), 1))  # intersection
    assert result.support.tolist() == [2] and result.members == ({0: 1, 1: 5},)

    lenient = consensus_instances([a, b], min_agree=1)  # every object, outlines are unions
    expected = square((10, 10), (6, 8), (6, 8), 2, square((10, 10), (0, 3), (0, 4), 1))
    np.testing.assert_array_equal(lenient.labels, expected)
    assert lenient.support.tolist() == [2, 1]
    assert lenient.members == ({0: 1, 1: 5}, {0: 2})


def test_objects_are_numbered_in_raster_order():
    a = square((6, 6), (4, 5), (4, 5), 1, square((6, 6), (0, 1), (0, 1), 9))
    b = square((6, 6), (4, 5), (4, 5), 3, square((6, 6), (0, 1), (0, 1), 4))
    result = consensus_instances([a, b])
    assert result.labels[0, 0] == 1 and result.labels[5, 5] == 2
    assert result.members == ({0: 9, 1: 4}, {0: 1, 1: 3})


def test_pixel_claimed_by_two_objects_goes_to_more_votes_then_earlier_member():
    a = square((4, 8), (0, 3), (4, 7), 2, square((4, 8), (0, 3), (0, 3), 1))
    b = square((4, 8), (0, 3), (5, 7), 2, square((4, 8), (0, 3), (0, 4), 1))
    result = consensus_instances([a, b], min_agree=1)
    # col 4: one vote for group (A1, B1) and one for (A2, B2); equal support, A1 < A2 decides
    assert result.labels[:, :5].tolist() == [[1] * 5] * 4
    assert result.labels[:, 5:].tolist() == [[2] * 3] * 4


def test_iou_exactly_half_matches_one_to_one():
    a = np.array([[1, 1, 1, 1], [1, 1, 1, 1]])
    b = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])  # both halves have IoU 4/8 = 0.5 with A's object
    result = consensus_instances([a, b])
    assert result.support.tolist() == [2]
    assert len(result.members[0]) == 2
    assert int(np.count_nonzero(result.labels)) == 4


def test_empty_images_give_an_empty_consensus():
    result = consensus_instances([np.zeros((3, 3), np.uint16)] * 3)
    assert result.n_objects == 0 and result.support.shape == (0,)
    assert result.labels.shape == (3, 3) and not result.labels.any()


@pytest.mark.parametrize(
    ("masks", "kwargs", "message"),
    [
        ([A3], {}, "at least 2 annotators"),
        ([A3, B3[:5]], {}, "same shape"),
        ([A3, B3.astype(float)], {}, "integer label image"),
        ([A3, B3 > 0], {}, "integer label image"),
        ([A3, -B3], {}, "negative"),
        ([A3, B3, C3], {"min_agree": 0}, "min_agree"),
        ([A3, B3, C3], {"min_agree": 4}, "min_agree"),
        ([A3, B3], {"iou": 0.0}, "iou"),
        (np.stack([A3, B3]), {}, "sequence"),
    ],
)
def test_bad_consensus_input_is_refused(masks, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        consensus_instances(masks, **kwargs)


# --------------------------------------------------------------------------------------------- classes


def test_classes_majority_and_ties():
    votes = {
        "c1": ["tumor", "tumor", "stroma"],
        "c2": ["tumor", "stroma"],  # 1 : 1
        "c3": [None, None],  # nobody labelled it: None, not a tie
        "c4": ["tumor", None, "stroma", "stroma"],
        "c5": ["tumor", "tumor", "stroma", "immune"],  # plurality, not a strict majority
        "c6": ["a", "b", "c"],
    }
    classes, ties = consensus_classes(votes)
    assert classes == {"c1": "tumor", "c2": None, "c3": None, "c4": "stroma", "c5": "tumor", "c6": None}
    assert ties == ["c2", "c6"]


@pytest.mark.parametrize("votes", [{1: "tumor"}, {1: ["tumor", 3]}, ["tumor"]])
def test_bad_votes_are_refused(votes):
    with pytest.raises(InvalidInputError):
        consensus_classes(votes)


# ------------------------------------------------------------------------------------------- agreement


def classic_table():
    """Wikipedia's 2 x 2 example: 50 items, yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> kappa 0.4.

    p_o = 35/50 = 0.7; rater a says yes 25 times, b 30 times: p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5;
    kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4.
    """
    pairs = [("yes", "yes")] * 20 + [("yes", "no")] * 5 + [("no", "yes")] * 10 + [("no", "no")] * 15
    return [p[0] for p in pairs], [p[1] for p in pairs]


def test_kappa_matches_the_hand_computation():
    a, b = classic_table()
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(b, a) == pytest.approx(0.4)
    assert cohen_kappa(a, b, labels=["yes", "no", "maybe"]) == pytest.approx(0.4)  # unused class: no change
    assert cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
    assert cohen_kappa(["x", "x"], ["x", "y"]) == pytest.approx(0.0)  # p_o = p_e = 0.5
    assert cohen_kappa([1, 2, 3], [1, 2, 3]) == 1.0


def test_kappa_degenerate_single_class_is_one():
    assert cohen_kappa(["tumor"] * 5, ["tumor"] * 5) == 1.0
    assert cohen_kappa(["tumor"], ["tumor"]) == 1.0


def test_kappa_needs_no_scipy(monkeypatch):
    """Hand-written: no scipy or scikit-learn is imported while kappa is computed."""
    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name.split(".")[0] in {"scipy", "sklearn"}:
            raise AssertionError(f"kappa imported {name}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    a, b = classic_table()
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert pairwise_kappa({"a": dict(enumerate(a)), "b": dict(enumerate(b))})[("a", "b")] == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "message"),
    [
        (["a"], ["a", "b"], {}, "same items"),
        ([], [], {}, "at least one item"),
        (["a", None], ["a", "b"], {}, "None"),
        (["a", "c"], ["a", "b"], {"labels": ["a", "b"]}, "not one of labels"),
        ("ab", "ab", {}, "sequence"),
    ],
)
def test_bad_kappa_input_is_refused(a, b, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        cohen_kappa(a, b, **kwargs)


def test_pairwise_kappa_over_cells_both_labelled():
    table = {
        "ann": {1: "a", 2: "b", 3: "a", 4: None},
        "bob": {1: "a", 2: "b", 3: "b", 4: "a", 5: "a"},
        "cat": {6: "a"},
    }
    kappa = pairwise_kappa(table)
    assert list(kappa) == [("ann", "bob"), ("ann", "cat"), ("bob", "cat")]
    # cells 1..3: a,b,a vs a,b,b -> n 3, agree 2, S = 2*1 + 1*2 = 4 -> (6 - 4) / (9 - 4)
    assert kappa[("ann", "bob")] == pytest.approx(0.4)
    assert kappa[("ann", "cat")] is None and kappa[("bob", "cat")] is None


def test_pairwise_f1_symmetric_with_unit_diagonal():
    f1 = pairwise_f1([A3, B3, C3])
    assert f1.shape == (3, 3)
    np.testing.assert_array_equal(f1, f1.T)
    np.testing.assert_array_equal(np.diag(f1), 1.0)
    assert f1[0, 1] == pytest.approx(2 / 3)  # A: 2 objects, B: 1, one match -> 2 / (2 + 1 + 0)
    assert f1[0, 2] == 0.0 and f1[1, 2] == 0.0
    with pytest.raises(InvalidInputError, match="same shape"):
        pairwise_f1([A3, B3[:, :4]])


def test_agreement_report_is_json_and_hand_checked():
    classes = {"ann": {1: "a", 2: "b", 3: "a"}, "bob": {1: "a", 2: "b", 3: "b"}}
    report = agreement_report({"ann": A3, "bob": B3, "cat": C3}, classes)
    assert json.loads(json.dumps(report)) == report
    assert report["annotators"] == ["ann", "bob", "cat"]
    pairs = {(p["a"], p["b"]): p for p in report["pairs"]}
    assert pairs[("ann", "bob")]["f1"] == pytest.approx(2 / 3)
    assert pairs[("ann", "bob")]["kappa"] == pytest.approx(0.4)
    assert pairs[("ann", "bob")]["n_cells"] == 3
    assert pairs[("ann", "cat")] == {"a": "ann", "b": "cat", "f1": 0.0, "kappa": None, "n_cells": 0}
    assert report["per_annotator"]["ann"]["mean_f1"] == pytest.approx(1 / 3)
    assert report["per_annotator"]["ann"]["mean_kappa"] == pytest.approx(0.4)
    assert report["per_annotator"]["cat"]["mean_kappa"] is None
    assert report["mean_f1"] == pytest.approx(2 / 9)
    assert report["mean_kappa"] == pytest.approx(0.4)


def test_agreement_report_refuses_bad_input():
    with pytest.raises(InvalidInputError, match="at least two"):
        agreement_report({"ann": A3})
    with pytest.raises(InvalidInputError, match="no label image"):
        agreement_report({"ann": A3, "bob": B3}, {"zed": {1: "a"}})
    with pytest.raises(InvalidInputError, match="same shape"):
        agreement_report({"ann": A3, "bob": B3[:5]})


def test_image_consensus_classes_ties_and_kappa_computed_by_hand():
    """Three annotators, four objects in a row: X (all three), Y (a and b), W (all three), Z (c only).

    Classes: X tumor/tumor/stroma -> tumor; Y tumor/stroma -> a tie; W stroma x3 -> stroma; Z is no consensus
    object (1 of 3). Kappa a/b over X, Y, W: a = (t, t, s), b = (t, s, s): p_o = 2/3, p_e = 2/3 * 1/3 + 1/3 * 2/3
    = 4/9, kappa = (2/3 - 4/9) / (5/9) = 0.4; a/c and b/c over X and W: p_o = 1/2 = p_e, kappa 0.
    """
    from colabel.services.training.consensus import image_consensus

    a, b, c = (np.zeros((4, 20), np.int32) for _ in range(3))
    a[:, 0:4], a[:, 5:9], a[:, 10:14] = 1, 2, 3
    b[:, 0:4], b[:, 5:9], b[:, 10:14] = 5, 6, 7
    c[:, 0:4], c[:, 10:14], c[:, 15:19] = 2, 1, 9
    found = image_consensus({"a": a, "b": b, "c": c}, {
        "a": {1: "tumor", 2: "tumor", 3: "stroma"},
        "b": {5: "tumor", 6: "stroma", 7: "stroma"},
        "c": {2: "stroma", 1: "stroma", 9: "tumor"}})
    assert found.result.n_objects == 3 and found.result.labels[0, 16] == 0  # Z: one annotator only
    assert found.classes == {1: "tumor", 2: None, 3: "stroma"} and found.ties == [2]
    assert found.votes[2] == {"a": "tumor", "b": "stroma"}
    kappa = {(p["a"], p["b"]): p["kappa"] for p in found.agreement["pairs"]}
    assert kappa[("a", "b")] == pytest.approx(0.4)
    assert kappa[("a", "c")] == pytest.approx(0.0) and kappa[("b", "c")] == pytest.approx(0.0)
    assert found.agreement["consensus"] == {"objects": 3, "classified": 2, "ties": [2]}
    with pytest.raises(InvalidInputError, match="who has no label image"):
        image_consensus({"a": a, "b": b}, {"mallory": {1: "tumor"}})
    with pytest.raises(InvalidInputError, match="at least two annotators"):
        image_consensus({"a": a})


def four_annotators():
    """Label images (4 x 20) and classes of four annotators. A and B draw the same 4 objects (columns 0-3, 5-8,
    10-13, 15-18); C and D draw only the first two. A and B class the first two "tumor" and disagree on the
    other two (A "stroma", B "tumor"); C and D class theirs "tumor"."""
    masks = {n: np.zeros((4, 20), np.int32) for n in "ABCD"}
    for n, labels in (("A", (1, 2, 3, 4)), ("B", (5, 6, 7, 8))):
        for k, label in enumerate(labels):
            masks[n][:, 5 * k : 5 * k + 4] = label
    for n in "CD":
        masks[n][:, 0:4], masks[n][:, 5:9] = 9, 3
    classes = {"A": {1: "tumor", 2: "tumor", 3: "stroma", 4: "stroma"},
               "B": {5: "tumor", 6: "tumor", 7: "tumor", 8: "tumor"},
               "C": {9: "tumor", 3: "tumor"}, "D": {9: "tumor", 3: "tumor"}}
    return masks, classes


def test_kappa_of_a_pair_counts_the_cells_they_both_drew_outside_the_consensus():
    """Four annotators (a consensus object needs 3 of them), :func:`four_annotators`: only the first two objects
    become consensus objects. Kappa of A/B is over their own 4 matched cells, not the 2 consensus ones:
    a = (t, t, s, s), b = (t, t, t, t): p_o = 2/4, p_e = 2/4 * 4/4 + 2/4 * 0/4 = 1/2, kappa = (1/2 - 1/2) / (1/2)
    = 0 (over the 2 consensus cells alone both said "tumor" for everything: 1.0). A/C: 2 matched cells, t/t each:
    1.0, F1 2 * 2 / (4 + 2).
    """
    from colabel.services.training.consensus import image_consensus

    masks, classes = four_annotators()
    found = image_consensus(masks, classes)
    assert found.result.n_objects == 2 and found.result.support.tolist() == [4, 4]
    pairs = {(p["a"], p["b"]): p for p in found.agreement["pairs"]}
    assert pairs[("A", "B")] == {"a": "A", "b": "B", "f1": 1.0, "kappa": 0.0, "n_cells": 4}
    assert pairs[("A", "C")]["kappa"] == 1.0 and pairs[("A", "C")]["n_cells"] == 2
    assert pairs[("A", "C")]["f1"] == pytest.approx(2 / 3)
    assert pairs[("C", "D")] == {"a": "C", "b": "D", "f1": 1.0, "kappa": 1.0, "n_cells": 2}
    assert found.agreement["per_annotator"]["A"]["mean_kappa"] == pytest.approx(2 / 3)  # (0 + 1 + 1) / 3
    assert json.loads(json.dumps(found.agreement)) == found.agreement


def test_matched_class_kappa_skips_unclassed_objects_and_is_none_without_matches():
    """A / B of :func:`four_annotators` with A's objects 2 and 4 unclassed: items (t, t) and (s, t) -> p_o = 1/2,
    p_e = 1/2 * 1 = 1/2, kappa 0 over 2 cells."""
    from colabel.services.training.consensus import matched_class_kappa

    masks, classes = four_annotators()
    assert matched_class_kappa(masks["A"], masks["B"], {1: "tumor", 3: "stroma"}, classes["B"]) == (0.0, 2)
    assert matched_class_kappa(masks["A"], np.zeros_like(masks["A"]), classes["A"], {}) == (None, 0)
    with pytest.raises(InvalidInputError, match="same shape"):
        matched_class_kappa(masks["A"], masks["B"][:2], classes["A"], classes["B"])


def test_pooled_pair_agreement_counts_objects_over_images_by_hand():
    """Image 1: A draws objects 1, 2; B draws one matching A's 1 (classes x / x). Image 2: both draw the same two
    objects, classed (x, y) by A and (y, y) by B. Pooled: 3 matched, 1 by A only, 0 by B only:
    F1 = 6 / 7. Kappa over 3 rated cells, A = (x, x, y), B = (x, y, y): p_o = 2/3, p_e = 4/9, kappa = 0.4."""
    from colabel.services.training.consensus import pooled_pair_agreement

    a, b = np.array([[1, 1, 0, 2, 2]]), np.array([[7, 7, 0, 0, 0]])
    result = pooled_pair_agreement([(a, b, {1: "x", 2: "y"}, {7: "x"}),
                                    (a, a, {1: "x", 2: "y"}, {1: "y", 2: "y"})])
    assert result == {"images": 2, "matched": 3, "only_a": 1, "only_b": 0, "f1": pytest.approx(6 / 7),
                      "kappa": pytest.approx(0.4), "n_cells": 3}
    empty = np.zeros((1, 5), int)
    assert pooled_pair_agreement([(empty, empty, {}, {})])["f1"] == 1.0  # nothing to disagree on
    assert pooled_pair_agreement([(a, b, {}, {})])["kappa"] is None  # nobody classed anything
