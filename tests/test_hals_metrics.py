"""HALS workload and effectiveness metrics: ``colabel.services.hals.metrics``."""

from __future__ import annotations

import numpy as np
import pytest

from colabel.errors import InvalidInputError
from colabel.services.hals.metrics import (
    WorkloadEvent,
    WorkloadReport,
    area_under_curve,
    effectiveness_ratio,
    learning_curve,
    workload,
    workload_reduction,
    workload_report,
)

pytestmark = pytest.mark.unit


def ev(kind: str, cell, image=None) -> dict:
    short = {"show": "suggestion_shown", "ok": "suggestion_accepted", "fix": "suggestion_corrected"}
    return {"kind": short.get(kind, kind), "cell_id": cell, "image_id": image}


# -------------------------------------------------------------------------------------------- workload


def test_workload_hand_computed():
    log = [ev("show", c) for c in range(8)]
    log += [ev("ok", c) for c in range(6)] + [ev("fix", 6), ev("fix", 7)]
    assert workload(log) == 2 / 8
    assert workload_reduction(log) == pytest.approx(0.75)
    report = workload_report(log)
    assert report == WorkloadReport(shown=8, accepted=6, corrected=2, unresolved=0, manual=0, unmatched=0)


def test_duplicates_reshows_and_changed_minds():
    log = [
        ev("show", 1), ev("show", 1),            # the same unreviewed suggestion displayed twice: one
        ev("ok", 1), ev("ok", 1),                # accepting twice is still one accepted suggestion
        ev("show", 1), ev("fix", 1),             # shown again after review: a second suggestion, corrected
        ev("show", 2), ev("ok", 2), ev("fix", 2),  # accepted then corrected: corrected (it was changed)
        ev("show", 3), ev("fix", 3), ev("ok", 3),  # corrected then accepted: still corrected
        ev("show", 4),                           # never reviewed: excluded from the ratio
        ev("fix", 5),                            # correction with no suggestion shown: unmatched
    ]
    report = workload_report(log)
    assert report == WorkloadReport(shown=5, accepted=1, corrected=3, unresolved=1, manual=0, unmatched=1)
    assert report.reviewed == 4
    assert workload(log) == 3 / 4
    assert workload(report) == 3 / 4


def test_manual_labels_and_image_ids():
    log = [
        ev("label", 1),                          # manual: no suggestion for cell 1 yet
        ev("label", 1),                          # the same cell relabelled: still one manual cell
        ev("show", 2), ev("ok", 2), ev("label", 2),  # the label stores the accepted value: not manual
        ev("show", 3, image="a"), ev("fix", 3, image="a"),
        ev("show", 3, image="b"), ev("ok", 3, image="b"),  # cell 3 of another image is another cell
        WorkloadEvent("label", 9, image_id="b"),  # dataclass events mix with dicts
    ]
    report = workload_report(log)
    assert (report.shown, report.accepted, report.corrected, report.manual) == (3, 2, 1, 2)
    assert workload(log) == pytest.approx(1 / 3)
    assert workload(log, include_manual=True) == pytest.approx((1 + 2) / (3 + 2))


def test_workload_undefined_and_invalid():
    with pytest.raises(InvalidInputError, match="undefined"):
        workload([])
    with pytest.raises(InvalidInputError, match="undefined"):
        workload([ev("show", 1), ev("label", 2)])  # shown but never reviewed, manual not counted
    assert workload([ev("label", 2)], include_manual=True) == 1.0
    with pytest.raises(InvalidInputError, match="kind"):
        workload([{"kind": "suggestion_rejected", "cell_id": 1}])
    with pytest.raises(InvalidInputError, match="cell_id"):
        workload([{"kind": "label"}])


def test_workload_reduction_baselines():
    ai = [ev("show", c) for c in range(100)] + [ev("ok", c) for c in range(95)] + [ev("fix", c) for c in range(95, 100)]
    assert workload_reduction(ai) == pytest.approx(0.95)
    # against another system's log: 20% corrected there -> 1 - 0.05 / 0.2
    other = [ev("show", c) for c in range(10)] + [ev("ok", c) for c in range(8)] + [ev("fix", 8), ev("fix", 9)]
    assert workload_reduction(ai, baseline=other) == pytest.approx(0.75)
    assert workload_reduction(ai, baseline=0.5) == pytest.approx(0.9)
    with pytest.raises(InvalidInputError):
        workload_reduction(ai, baseline=0.0)


# ----------------------------------------------------------------------------------------- AUC, ratio


def test_area_under_known_piecewise_linear_curve():
    # 0.2 -> 0.6 over [0, 50], then 0.6 -> 0.9 over [50, 200]: (0.4*50 + 0.75*150) / 200
    assert area_under_curve([0, 50, 200], [0.2, 0.6, 0.9]) == pytest.approx((0.4 * 50 + 0.75 * 150) / 200)
    assert area_under_curve(np.arange(0, 201, 10), np.full(21, 0.7)) == pytest.approx(0.7)
    # a linear curve is integrated exactly whatever the sampling
    n = np.array([0, 3, 17, 120, 200])
    assert area_under_curve(n, 0.1 + n / 400) == pytest.approx(0.1 + 100 / 400)
    with pytest.raises(InvalidInputError):
        area_under_curve([0, 100, 50], [0.1, 0.2, 0.3])
    with pytest.raises(InvalidInputError):
        area_under_curve([0], [0.5])
    with pytest.raises(InvalidInputError):
        area_under_curve([0, 1], [0.5])


def test_effectiveness_ratio():
    assert effectiveness_ratio(0.8, 0.8) == 0.0
    assert effectiveness_ratio(0.9, 0.75) == pytest.approx(0.2)
    assert effectiveness_ratio(0.6, 0.75) == pytest.approx(-0.2)
    with pytest.raises(InvalidInputError):
        effectiveness_ratio(0.5, 0.0)


# ------------------------------------------------------------------------------------- learning curve


def blobs(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three overlapping 2-D Gaussian classes: a nearest-centroid classifier gets ~90% with enough labels."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    x = np.concatenate([rng.normal(c, 1.0, size=(n_per_class, 2)) for c in centres])
    y = np.repeat(np.arange(3), n_per_class)
    return x, y


def make_train_fn(x: np.ndarray, calls: list | None = None):
    """A real nearest-centroid classifier; its seed draws a bootstrap sample of the training labels (the
    randomness a real training has), so repeats differ."""

    def train(idx, labels, seed):
        if calls is not None:
            calls.append((len(idx), seed))
        rng = np.random.default_rng(seed)
        pick = rng.integers(0, len(idx), size=len(idx))
        idx, labels = np.asarray(idx)[pick], np.asarray(labels)[pick]
        classes = np.unique(labels)
        centroids = np.stack([x[idx[labels == c]].mean(axis=0) for c in classes])

        def predict(query):
            d = ((x[np.asarray(query)][:, None, :] - centroids[None]) ** 2).sum(-1)
            return classes[d.argmin(axis=1)]

        return predict

    return train


def test_learning_curve_rises_and_averages_repeats():
    x, y = blobs(400, seed=0)
    rng = np.random.default_rng(1)
    perm = rng.permutation(len(y))
    pool, held = perm[:600], perm[600:]
    order, labels = pool, y[pool]
    eval_set = (held, y[held])
    calls: list = []
    n_values = [0, 1, 3, 6, 12, 25, 50, 100, 200]
    ns, mean, every = learning_curve(make_train_fn(x, calls), order, labels, eval_set, n_values=n_values,
                                     repeats=10, seed=3, return_all=True)
    assert ns.tolist() == n_values
    assert every.shape == (9, 10)
    assert mean[0] == pytest.approx(1 / 3)  # N = 0: chance, 1 / n_classes
    assert len(calls) == 8 * 10  # no training at N = 0
    assert {n for n, _ in calls} == set(n_values[1:])
    # the accuracy rises with N (averaged over repeats, so small dips are allowed only at tiny N)
    assert mean[1] < 0.75 and mean[-1] > 0.85
    assert np.all(np.diff(mean[3:]) > -0.02)
    assert mean[-3:].mean() > mean[1:4].mean() + 0.2
    # the mean is the mean of 10 trainings with the documented seeds, checked against a manual loop
    seeds = [int(s) for s in np.random.SeedSequence(3).generate_state(10)]
    assert sorted({s for _, s in calls}) == sorted(seeds)
    train = make_train_fn(x)
    for row, n in enumerate(n_values[1:], start=1):
        accs = [np.mean(train(order[:n], labels[:n], s)(held) == y[held]) for s in seeds]
        np.testing.assert_allclose(every[row], accs)
        assert mean[row] == pytest.approx(np.mean(accs))
    # with the seed, repeats really differ at small N
    assert every[3:6].std(axis=1).min() > 0


def test_learning_curve_options_and_errors():
    x, y = blobs(50, seed=2)
    train = make_train_fn(x)
    order, labels = np.arange(0, 150, 2), y[0:150:2]
    held = np.arange(1, 150, 2)
    eval_set = (held, y[held])
    ns, mean = learning_curve(train, order, labels, eval_set, n_values=[0, 10], repeats=2)
    assert mean[0] == pytest.approx(1 / 3)
    _, mean = learning_curve(train, order, labels, (held[:30], y[held][:30]), n_values=[0], zero_accuracy="majority")
    assert mean[0] == pytest.approx(np.bincount(y[held][:30]).max() / 30)
    _, mean = learning_curve(train, order, labels, eval_set, n_values=[0], zero_accuracy=0.25)
    assert mean[0] == 0.25
    _, mean = learning_curve(train, order, labels, eval_set, n_values=[0], n_classes=4)
    assert mean[0] == 0.25
    auc = area_under_curve(*learning_curve(train, order, labels, eval_set, n_values=[0, 25, 75], repeats=3))
    assert 1 / 3 < auc < 1
    with pytest.raises(InvalidInputError, match="within"):
        learning_curve(train, order, labels, eval_set, n_values=[0, 76])
    with pytest.raises(InvalidInputError, match="align"):
        learning_curve(train, order, labels[:-1], eval_set)
    with pytest.raises(InvalidInputError):
        learning_curve(train, order, labels, eval_set, repeats=0)
    with pytest.raises(InvalidInputError, match="shape"):
        learning_curve(lambda idx, lab, seed: (lambda q: np.zeros(3)), order, labels, eval_set, n_values=[5])
