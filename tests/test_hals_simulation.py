"""The simulated HALS annotator (``colabel.services.hals.simulation``) on a small synthetic case.

The case: 160 cells scattered over a 256 x 256 image (a 4 x 4 grid of 64 px patches), two classes whose
8-d features overlap (class 1 is shifted by 1.5 on two dimensions, so a trained head is right about
85-90% of the time and both accepted and corrected suggestions happen), a fixed 25% evaluation set. Every
expectation is recomputed here with plain loops, independently of the module.
"""

from __future__ import annotations

import numpy as np
import pytest

from colabel.errors import InvalidInputError
from colabel.services.hals.classifier import train_head
from colabel.services.hals.coreset import k_center_greedy
from colabel.services.hals.metrics import learning_curve, workload_reduction, workload_report
from colabel.services.hals.simulation import (
    curve_points,
    head_trainer,
    holdout_split,
    patch_of,
    reading_order,
    region_means,
    simulate,
)

pytestmark = pytest.mark.unit

SHAPE = (256, 256)
PATCH = 64
N = 160


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(7)
    xy = rng.uniform(0, 256, (N, 2))
    truth = (rng.random(N) < 0.45).astype(np.int64)
    features = rng.normal(0, 1, (N, 8)).astype(np.float32)
    features[:, :2] += 1.5 * truth[:, None]
    pool, held = holdout_split(N, fraction=0.25, seed=3)
    return {"xy": xy, "truth": truth, "features": features, "pool": pool, "eval": held}


def run(case, policy, **kw):
    kw.setdefault("max_labels", 80)
    return simulate(case["features"], case["truth"], case["xy"], image_shape=SHAPE, policy=policy,
                    pool=case["pool"], patch_size=PATCH, seed=1, **kw)


@pytest.fixture(scope="module")
def hals(case):
    # No random start, so the 10-labels-per-class threshold is reached inside the Coreset loop.
    return run(case, "hals", initial_per_class=0, k=6)


@pytest.fixture(scope="module")
def hals_started(case):
    return run(case, "hals", initial_per_class=4, k=6)


def grid_cell(x: float, y: float) -> tuple[int, int]:
    return int(y // PATCH), int(x // PATCH)


# --------------------------------------------------------------------------------------------- control


def test_control_takes_patches_in_reading_order_and_cells_in_reading_order(case):
    result = run(case, "control", max_labels=70)
    in_pool = set(case["pool"].tolist())
    expected = []
    for r in range(4):
        for c in range(4):
            cells = [i for i in range(N) if i in in_pool and grid_cell(*case["xy"][i]) == (r, c)]
            expected += sorted(cells, key=lambda i: (case["xy"][i][1], case["xy"][i][0]))
    assert result.label_order.tolist() == expected[:70]
    visited = [(p.row, p.col) for p in result.patches]
    assert visited == sorted(visited)  # row-major
    assert [int(c) for p in result.patches for c in p.cells] == expected[:70]
    assert np.array_equal(result.labels, case["truth"][result.label_order])
    # AI off: labels only, no suggestions, no Coreset, no retraining
    assert {e.kind for e in result.events} == {"label"}
    assert (result.suggested == -1).all() and result.retrain_at == []
    assert all(p.selected.size == 0 for p in result.patches)


def test_control_start_shares_the_random_start_of_hals(case, hals_started):
    result = run(case, "control", initial_per_class=4)
    assert result.n_initial == hals_started.n_initial == 8
    assert np.array_equal(result.label_order[:8], hals_started.label_order[:8])
    assert np.bincount(case["truth"][result.label_order[:8]]).tolist() == [4, 4]


def test_control_runs_until_the_pool_is_exhausted(case):
    result = run(case, "control", max_labels=1000)
    assert sorted(result.label_order.tolist()) == case["pool"].tolist()


# ------------------------------------------------------------------------------------------------ HALS


def test_suggestions_only_after_ten_labels_per_class(case, hals):
    counts = np.zeros(2, int)
    threshold_at = None
    labelled = 0
    for event in hals.events:
        if event.kind == "suggestion_shown":
            assert (counts >= 10).all(), f"suggestion shown with only {counts.tolist()} labels per class"
        if event.kind == "label":
            counts[case["truth"][event.cell_id]] += 1
            labelled += 1
            if threshold_at is None and (counts >= 10).all():
                threshold_at = labelled
    assert threshold_at is not None and threshold_at > 20  # the threshold is crossed inside the loop
    shown = hals.suggested >= 0
    # every label before the threshold was manual, every label after it had a suggestion
    assert not shown[:threshold_at].any()
    assert shown[threshold_at:].all()


def test_retrains_exactly_every_five_labels(case, hals):
    counts = np.cumsum(np.eye(2, dtype=int)[case["truth"][hals.label_order]], axis=0)
    threshold_at = int(np.flatnonzero((counts >= 10).all(axis=1))[0]) + 1
    assert hals.retrain_at == list(range(threshold_at, len(hals.label_order) + 1, 5))
    assert len(hals.retrain_seconds) == len(hals.retrain_at)


def test_events_are_recorded_per_cell_in_order(case, hals):
    events = iter(hals.events)
    for cell, suggestion in zip(hals.label_order, hals.suggested, strict=True):
        if suggestion >= 0:
            shown, review = next(events), next(events)
            assert (shown.kind, shown.cell_id) == ("suggestion_shown", cell)
            expected = "suggestion_accepted" if suggestion == case["truth"][cell] else "suggestion_corrected"
            assert (review.kind, review.cell_id) == (expected, cell)
        label = next(events)
        assert (label.kind, label.cell_id) == ("label", cell)
    assert next(events, None) is None
    report = workload_report(hals.events)
    wrong = int(((hals.suggested >= 0) & (hals.suggested != case["truth"][hals.label_order])).sum())
    assert report.shown == int((hals.suggested >= 0).sum())
    assert (report.corrected, report.accepted) == (wrong, report.shown - wrong)
    assert report.manual == int((hals.suggested < 0).sum())
    assert 0 < wrong < report.shown  # a non-trivial case: some suggestions are corrected
    assert workload_reduction(hals.events) == pytest.approx(1 - wrong / report.shown)


def test_chosen_patch_holds_most_of_the_coreset_selection(case, hals):
    assert len(hals.patches) >= 4
    labelled_before = 0
    for visit in hals.patches:
        per_patch = np.zeros((4, 4), int)
        for i in visit.selected:
            per_patch[grid_cell(*case["xy"][i])] += 1
        assert per_patch[visit.row, visit.col] == per_patch.max() == visit.selected_in_patch
        # ties go to reading order
        assert (visit.row, visit.col) == tuple(int(v) for v in np.argwhere(per_patch == per_patch.max())[0])
        assert visit.box == (visit.col * PATCH, visit.row * PATCH, (visit.col + 1) * PATCH, (visit.row + 1) * PATCH)
        # the selected cells of the patch come first, then the other cells of the patch
        in_patch = [int(i) for i in visit.selected if grid_cell(*case["xy"][i]) == (visit.row, visit.col)]
        assert visit.cells[: len(in_patch)].tolist() == in_patch[: len(visit.cells)]
        assert all(grid_cell(*case["xy"][c]) == (visit.row, visit.col) for c in visit.cells)
        labelled_before += len(visit.cells)
    assert labelled_before == len(hals.label_order)


def test_first_selection_uses_backbone_features_before_a_classifier_exists(case, hals):
    candidates = case["pool"]
    expected = k_center_greedy(case["features"], np.empty(0, np.int64), 6, candidates=candidates)
    assert hals.patches[0].selected.tolist() == expected.tolist()


def test_coreset_selects_on_the_members_concatenated_activations_once_a_classifier_exists(case, hals):
    """Each visit's selection, recomputed: the same online classifier fed the same labels (retrained at the same
    points), k-center greedy on ``Ensemble.embed(how="concat")``, which does not depend on the order of each
    member's hidden units (the mean of the members' activations does)."""
    from colabel.services.hals.classifier import OnlineClassifier

    x, truth, pool = case["features"], case["truth"], case["pool"]
    clf = OnlineClassifier(2, features=x, seed=1)
    order = hals.label_order.tolist()
    done, checked = 0, 0
    for visit in hals.patches:
        first = order.index(int(visit.cells[0]))
        for cell in order[done:first]:
            clf.add_label(cell, int(truth[cell]))
            if clf.should_retrain():
                clf.retrain()
        done = first
        if not clf.ready:
            continue
        unlabelled = np.setdiff1d(pool, order[:first])
        expected = k_center_greedy(clf.model.embed(x, how="concat"), np.asarray(order[:first]),
                                   min(6, len(unlabelled)), candidates=unlabelled)
        assert visit.selected.tolist() == expected.tolist()
        checked += 1
    assert checked >= 3


def test_hals_visits_a_patch_once_and_labels_all_its_pool_cells(case, hals):
    in_pool = set(case["pool"].tolist())
    for visit in hals.patches[:-1]:  # the last visit may be cut short by max_labels
        cells = {i for i in range(N) if i in in_pool and grid_cell(*case["xy"][i]) == (visit.row, visit.col)}
        earlier = set(hals.label_order.tolist()[: hals.label_order.tolist().index(int(visit.cells[0]))])
        assert set(visit.cells.tolist()) == cells - earlier
    assert len(set(hals.label_order.tolist())) == len(hals.label_order) == 80


def test_pool_and_limits(case, hals_started):
    held = set(case["eval"].tolist())
    assert not held & set(hals_started.label_order.tolist())
    assert len(hals_started.label_order) == 80
    assert np.bincount(case["truth"][hals_started.label_order[:8]]).tolist() == [4, 4]
    capped = run(case, "hals", initial_per_class=4, k=6, max_per_patch=3, max_labels=30)
    assert all(len(p.cells) <= 3 for p in capped.patches)


def test_random_policy_is_a_seeded_permutation_of_the_pool(case):
    a = run(case, "random", max_labels=1000)
    b = run(case, "random", max_labels=1000)
    assert np.array_equal(a.label_order, b.label_order)
    assert sorted(a.label_order.tolist()) == case["pool"].tolist()
    assert not np.array_equal(a.label_order, np.sort(a.label_order))
    assert {e.kind for e in a.events} == {"label"}


def test_suggestions_without_coreset_keep_the_label_order(case):
    plain = run(case, "random", initial_per_class=4)
    with_ai = run(case, "random", initial_per_class=4, suggestions=True)
    assert np.array_equal(plain.label_order, with_ai.label_order)
    assert (plain.suggested == -1).all() and (with_ai.suggested[-20:] >= 0).all()
    assert with_ai.retrain_at and not plain.retrain_at


def test_result_unpacks_as_order_and_events(hals):
    order, events = hals
    assert order is hals.label_order and events is hals.events


def test_bad_input(case):
    with pytest.raises(InvalidInputError):
        run(case, "magic")
    with pytest.raises(InvalidInputError):
        simulate(case["features"][:5], case["truth"], case["xy"], image_shape=SHAPE)


# ------------------------------------------------------------------------------------------- helpers


def test_patch_of_and_reading_order():
    xy = np.array([[10, 70], [70, 10], [5, 5], [256, 256], [64, 0]])
    assert patch_of(xy, image_shape=SHAPE, patch_size=PATCH).tolist() == [4, 1, 0, 15, 1]
    assert reading_order(xy, [0, 1, 2, 4]).tolist() == [4, 2, 1, 0]


def test_holdout_split_is_fixed_and_disjoint():
    a = holdout_split(100, fraction=0.3, seed=5)
    b = holdout_split(100, fraction=0.3, seed=5)
    assert np.array_equal(a[0], b[0]) and len(a[1]) == 30
    assert sorted(np.r_[a[0], a[1]].tolist()) == list(range(100))
    with pytest.raises(InvalidInputError):
        holdout_split(10, fraction=1.0)


def test_region_means_inside_and_ring():
    labels = np.zeros((9, 12), np.int32)
    labels[3:6, 2:5] = 1
    labels[3:6, 8:11] = 2
    channel = np.zeros(labels.shape)
    channel[labels == 1] = 5.0
    channel[2, 1:6] = 1.0  # the row above nucleus 1 (its ring)
    assert region_means(channel, labels, [1, 2]).tolist() == [5.0, 0.0]
    ring = region_means(channel, labels, [1, 2], ring=1)
    # nucleus 1's 1 px ring: the pixels at Euclidean distance <= 1, i.e. 3 on each side and no corners
    # (12 pixels); 3 of them, in the row above, are 1.0
    assert ring[0] == pytest.approx(3 / 12) and ring[1] == 0.0
    assert np.isnan(region_means(channel, labels, [3], ring=1)[0])


def test_head_trainer_matches_separate_trainings(case):
    idx = case["pool"][:60]
    y = case["truth"][idx]
    seeds = [int(s) for s in np.random.SeedSequence(4).generate_state(3)]
    train = head_trainer(case["features"], n_classes=2, repeats=3, seed=4)
    query = case["eval"]
    for s in seeds:
        batched = train(idx, y, s)(query)
        alone = train_head(case["features"][idx], y, n_classes=2, seed=s).predict_proba(
            case["features"][query]).argmax(axis=1)
        assert np.mean(batched == alone) >= 0.97
    # too few labels of a class: the majority class everywhere
    assert train(idx[:3], np.array([0, 0, 1]), seeds[0])(query).tolist() == [0] * len(query)


def test_learning_curve_with_head_trainer(case, hals):
    points = curve_points(len(hals.label_order), 40)
    assert points.tolist() == [0, 40, 80]
    train = head_trainer(case["features"], n_classes=2, repeats=3, seed=0)
    _, acc = learning_curve(train, hals.label_order, hals.labels, (case["eval"], case["truth"][case["eval"]]),
                            n_values=points, repeats=3, seed=0, n_classes=2)
    assert acc[0] == 0.5 and acc[-1] > 0.75
