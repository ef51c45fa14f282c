"""HALS evaluation: annotator workload from suggestion events, and effectiveness from learning curves.

HALS (npj Digital Medicine 2021) reports two numbers, both implemented here with the exact definitions below.

Workload
--------
The annotator is shown classifier suggestions and accepts or corrects each one. Without AI every label is
manual work (workload 1); with AI only corrections are work. From an event log (:class:`WorkloadEvent` or
dicts with ``kind`` and ``cell_id``, optional ``image_id``), processed in order, per cell key
``(image_id, cell_id)``:

* ``suggestion_shown`` opens a suggestion for the cell, unless one is already open and not yet reviewed
  (then it is the same suggestion displayed again and is not counted twice). A show after the previous
  suggestion was reviewed opens a new one (e.g. a new suggestion after retraining).
* ``suggestion_accepted`` / ``suggestion_corrected`` review the cell's open suggestion. A suggestion that was
  corrected at least once counts as **corrected** (any change is work), otherwise as **accepted**. Review
  events for a cell with no suggestion shown are counted as ``unmatched`` and otherwise ignored.
* ``label`` on a cell that never had a suggestion shown before is a **manual** label (counted once per cell);
  on a cell with a suggestion it is the stored value of the review and is not counted again.

Then ``workload = corrected / (accepted + corrected)`` (reviewed suggestions only: shown-but-never-reviewed
suggestions are excluded), or with ``include_manual=True``
``workload = (corrected + manual) / (accepted + corrected + manual)``, and
``workload_reduction = 1 - workload / baseline_workload`` with ``baseline_workload = 1`` (everything by hand)
by default, so ``reduction = 1 - corrected / (accepted + corrected)``. With nothing reviewed the workload is
undefined and :class:`~colabel.errors.InvalidInputError` is raised (returning 0 would read as "100% less
work"); :func:`workload_report` gives the counts without raising.

Effectiveness
-------------
A learning curve is the validation accuracy of a classifier trained on the first ``N`` labels in annotation
order, for ``N`` = 0..200, each point the mean of ``repeats`` trainings (different training seeds, same
labels). At ``N = 0`` there is no classifier; its accuracy is defined as chance, ``1 / n_classes`` (the
expected accuracy of guessing uniformly, whatever the class balance), or optionally the eval set's majority
class rate. :func:`area_under_curve` is the trapezoid area normalised by the ``N`` range (a mean accuracy),
and :func:`effectiveness_ratio` compares two of them as ``auc_a / auc_b - 1`` (HALS' "+4.34%").
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from colabel.errors import InvalidInputError

__all__ = [
    "EVENT_KINDS",
    "WorkloadEvent",
    "WorkloadReport",
    "workload_report",
    "workload",
    "workload_reduction",
    "learning_curve",
    "area_under_curve",
    "effectiveness_ratio",
]

EVENT_KINDS = ("suggestion_shown", "suggestion_accepted", "suggestion_corrected", "label")


@dataclass(frozen=True)
class WorkloadEvent:
    """One annotation event.

    Attributes
    ----------
    kind : str
        One of :data:`EVENT_KINDS`.
    cell_id : hashable
        The cell (object) id, unique within its image.
    image_id : hashable, optional
        The image; cell ids of different images never collide. ``None`` for single-image logs.
    """

    kind: str
    cell_id: Hashable
    image_id: Hashable | None = None


@dataclass(frozen=True)
class WorkloadReport:
    """Counts from an event log (see the module docstring for the rules).

    Attributes
    ----------
    shown : int
        Suggestions shown (a redisplay of an unreviewed suggestion is not counted again).
    accepted, corrected : int
        Reviewed suggestions; a suggestion corrected at least once is ``corrected``.
    unresolved : int
        Shown suggestions never reviewed (``shown = accepted + corrected + unresolved``).
    manual : int
        Cells labelled by hand without a suggestion shown first.
    unmatched : int
        Accept / correct events for a cell that had no suggestion shown.
    """

    shown: int
    accepted: int
    corrected: int
    unresolved: int
    manual: int
    unmatched: int

    @property
    def reviewed(self) -> int:
        return self.accepted + self.corrected


def _field(event: Any, name: str, default: Any = None) -> Any:
    if isinstance(event, Mapping):
        return event.get(name, default)
    return getattr(event, name, default)


def workload_report(events: Iterable[WorkloadEvent | Mapping]) -> WorkloadReport:
    """Count shown, accepted, corrected, unreviewed, manual and unmatched items in an event log.

    Parameters
    ----------
    events : iterable of WorkloadEvent or mapping
        In the order they happened; each has ``kind`` (one of :data:`EVENT_KINDS`), ``cell_id`` and
        optionally ``image_id``.

    Returns
    -------
    WorkloadReport

    Examples
    --------
    >>> log = [{"kind": "suggestion_shown", "cell_id": 1}, {"kind": "suggestion_shown", "cell_id": 1},
    ...        {"kind": "suggestion_corrected", "cell_id": 1}, {"kind": "label", "cell_id": 2}]
    >>> workload_report(log)
    WorkloadReport(shown=1, accepted=0, corrected=1, unresolved=0, manual=1, unmatched=0)
    """
    open_outcome: dict[tuple, str | None] = {}  # key -> None (unreviewed) / "accepted" / "corrected"
    ever_suggested: set[tuple] = set()
    manual: set[tuple] = set()
    shown = accepted = corrected = unmatched = 0
    for event in events:
        kind = _field(event, "kind")
        if kind not in EVENT_KINDS:
            raise InvalidInputError(f"event kind must be one of {EVENT_KINDS}, got {kind!r}")
        cell_id = _field(event, "cell_id")
        if cell_id is None:
            raise InvalidInputError(f"event {event!r} has no cell_id")
        key = (_field(event, "image_id"), cell_id)
        if kind == "suggestion_shown":
            if key in open_outcome and open_outcome[key] is None:
                continue  # the same unreviewed suggestion shown again
            previous = open_outcome.get(key)
            accepted += previous == "accepted"
            corrected += previous == "corrected"
            open_outcome[key] = None
            ever_suggested.add(key)
            shown += 1
        elif kind in ("suggestion_accepted", "suggestion_corrected"):
            if key not in open_outcome:
                unmatched += 1
            elif kind == "suggestion_corrected":
                open_outcome[key] = "corrected"
            elif open_outcome[key] is None:
                open_outcome[key] = "accepted"
        elif key not in ever_suggested:  # "label"
            manual.add(key)
    outcomes = list(open_outcome.values())
    accepted += outcomes.count("accepted")
    corrected += outcomes.count("corrected")
    return WorkloadReport(shown=shown, accepted=accepted, corrected=corrected, unresolved=outcomes.count(None),
                          manual=len(manual), unmatched=unmatched)


def workload(events: Iterable[WorkloadEvent | Mapping] | WorkloadReport, *, include_manual: bool = False) -> float:
    """Fraction of reviewed suggestions the annotator changed: ``corrected / (accepted + corrected)``.

    Parameters
    ----------
    events : iterable of events, or a WorkloadReport
    include_manual : bool
        Count manual labels as work too: ``(corrected + manual) / (accepted + corrected + manual)``.

    Returns
    -------
    workload : float in [0, 1]

    Raises
    ------
    InvalidInputError
        Nothing was reviewed (and, with ``include_manual``, nothing labelled by hand): undefined.

    Examples
    --------
    >>> log = [WorkloadEvent("suggestion_shown", i) for i in range(4)]
    >>> log += [WorkloadEvent("suggestion_accepted", i) for i in range(3)]
    >>> log += [WorkloadEvent("suggestion_corrected", 3)]
    >>> workload(log)
    0.25
    """
    report = events if isinstance(events, WorkloadReport) else workload_report(events)
    work = report.corrected + (report.manual if include_manual else 0)
    total = report.reviewed + (report.manual if include_manual else 0)
    if total == 0:
        raise InvalidInputError("workload is undefined: no suggestion was accepted or corrected")
    return work / total


def workload_reduction(
    events: Iterable[WorkloadEvent | Mapping] | WorkloadReport,
    *,
    baseline: float | Iterable[WorkloadEvent | Mapping] | WorkloadReport = 1.0,
    include_manual: bool = False,
) -> float:
    """HALS' "less work": ``1 - workload(events) / workload(baseline)``.

    Parameters
    ----------
    events : iterable of events, or a WorkloadReport
    baseline : float or events or WorkloadReport
        Workload without the system; ``1.0`` (default) = every label by hand, giving
        ``1 - corrected / (accepted + corrected)``. An event log is converted with :func:`workload`.
    include_manual : bool
        Passed to :func:`workload` for ``events`` (and a ``baseline`` log).

    Examples
    --------
    >>> log = [WorkloadEvent("suggestion_shown", i) for i in range(10)]
    >>> log += [WorkloadEvent("suggestion_accepted", i) for i in range(9)] + [WorkloadEvent("suggestion_corrected", 9)]
    >>> round(workload_reduction(log), 3)
    0.9
    """
    if isinstance(baseline, (int, float)):
        base = float(baseline)
    else:
        base = workload(baseline, include_manual=include_manual)
    if not 0 < base <= 1:
        raise InvalidInputError(f"baseline workload must be in (0, 1], got {base}")
    return 1.0 - workload(events, include_manual=include_manual) / base


# ----------------------------------------------------------------------------------------------------------
# Learning curves
# ----------------------------------------------------------------------------------------------------------

TrainFn = Callable[[np.ndarray, np.ndarray, int], Callable[[np.ndarray], ArrayLike]]


def learning_curve(
    train_fn: TrainFn,
    labelled_order: ArrayLike,
    labels: ArrayLike,
    eval_set: tuple[ArrayLike, ArrayLike],
    *,
    n_values: Iterable[int] = range(0, 201, 10),
    repeats: int = 10,
    seed: int = 0,
    zero_accuracy: Literal["uniform", "majority"] | float = "uniform",
    n_classes: int | None = None,
    return_all: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validation accuracy after training on the first ``N`` labels, averaged over ``repeats`` trainings.

    Parameters
    ----------
    train_fn : callable ``(train_idx, train_labels, seed) -> predict_fn``
        Trains a fresh classifier on the cells ``train_idx`` (int64, shape (N,)) with ``train_labels``
        (shape (N,)) and an int ``seed`` for its randomness; ``predict_fn(eval_idx)`` returns one predicted
        label per eval cell. Supplied by the caller (e.g. the HALS classifier on cached features).
    labelled_order : array-like of int, shape (M,)
        Cell indices in the order they were labelled.
    labels : array-like, shape (M,)
        Their labels, aligned with ``labelled_order`` (``labels[i]`` is the label of ``labelled_order[i]``).
    eval_set : (eval_idx, eval_labels)
        Held-out cells, shape (E,) each.
    n_values : iterable of int
        Training-set sizes, each ``0 <= N <= M``.
    repeats : int
        Trainings per ``N > 0``; the seeds are ``np.random.SeedSequence(seed).generate_state(repeats)``, the same
        for every ``N`` (common random numbers: curves differ by the labels, not by the seeds).
    seed : int
    zero_accuracy : {"uniform", "majority"} or float
        Accuracy at ``N = 0`` (no classifier): ``"uniform"`` = ``1 / n_classes`` (expected accuracy of a
        uniform guess), ``"majority"`` = the eval set's largest class fraction, or a given number.
    n_classes : int, optional
        For ``"uniform"``; default: distinct values in ``labels`` and ``eval_labels`` together.
    return_all : bool
        Also return every accuracy, shape (len(n_values), repeats) (the ``N = 0`` row repeats its value).

    Returns
    -------
    n_values : ndarray of int64
    mean_accuracy : ndarray of float64
    all_accuracy : ndarray of float64, only with ``return_all``

    Examples
    --------
    >>> feats = np.array([0.0, 0.1, 1.0, 1.1])
    >>> def train(idx, y, seed):
    ...     return lambda q: (feats[q] > 0.5).astype(int) if len(set(y)) > 1 else np.full(len(q), y[0])
    >>> learning_curve(train, [0, 2], [0, 1], ([1, 3], [0, 1]), n_values=[0, 1, 2], repeats=2)[1].tolist()
    [0.5, 0.5, 1.0]
    """
    order = np.asarray(labelled_order)
    y = np.asarray(labels)
    if order.ndim != 1 or (order.size and order.dtype.kind not in "iu"):
        raise InvalidInputError("labelled_order must be a 1-D integer array")
    if y.shape != order.shape:
        raise InvalidInputError(f"labels must align with labelled_order: shapes {y.shape} and {order.shape}")
    try:
        eval_idx, eval_y = (np.asarray(a) for a in eval_set)
    except (TypeError, ValueError):
        raise InvalidInputError("eval_set must be a pair (eval_idx, eval_labels)") from None
    if eval_idx.shape != eval_y.shape or eval_idx.ndim != 1 or eval_idx.size == 0:
        raise InvalidInputError("eval_idx and eval_labels must be non-empty 1-D arrays of the same length")
    ns = np.asarray(list(n_values), dtype=np.int64)
    if ns.size == 0 or ns.min() < 0 or ns.max() > len(order):
        raise InvalidInputError(f"n_values must be non-empty and within [0, {len(order)}] (labels available)")
    if int(repeats) < 1:
        raise InvalidInputError(f"repeats must be >= 1, got {repeats}")
    repeats = int(repeats)

    if isinstance(zero_accuracy, str):
        if zero_accuracy == "uniform":
            classes = n_classes if n_classes is not None else len(np.unique(np.concatenate([y, eval_y])))
            zero = 1.0 / max(int(classes), 1)
        elif zero_accuracy == "majority":
            zero = float(np.unique(eval_y, return_counts=True)[1].max() / eval_y.size)
        else:
            raise InvalidInputError(f"zero_accuracy must be 'uniform', 'majority' or a number, got {zero_accuracy!r}")
    else:
        zero = float(zero_accuracy)

    seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(repeats)]
    accuracy = np.empty((len(ns), repeats), dtype=np.float64)
    for row, n in enumerate(ns):
        if n == 0:
            accuracy[row] = zero
            continue
        for r, s in enumerate(seeds):
            predict = train_fn(order[:n].astype(np.int64), y[:n], s)
            pred = np.asarray(predict(eval_idx))
            if pred.shape != eval_y.shape:
                raise InvalidInputError(f"predict_fn returned shape {pred.shape}, expected {eval_y.shape}")
            accuracy[row, r] = float(np.mean(pred == eval_y))
    mean = accuracy.mean(axis=1)
    return (ns, mean, accuracy) if return_all else (ns, mean)


def area_under_curve(n_values: Sequence[float] | np.ndarray, accuracy: Sequence[float] | np.ndarray) -> float:
    """Trapezoid area under ``accuracy(N)`` divided by the ``N`` range: the curve's mean accuracy.

    Parameters
    ----------
    n_values : array-like, shape (P,), strictly increasing, P >= 2
    accuracy : array-like, shape (P,)

    Returns
    -------
    auc : float
        In accuracy units (a constant curve at ``a`` gives ``a``).

    Examples
    --------
    >>> area_under_curve([0, 100, 200], [0.5, 1.0, 1.0])
    0.875
    """
    n = np.asarray(n_values, dtype=np.float64)
    a = np.asarray(accuracy, dtype=np.float64)
    if n.ndim != 1 or n.shape != a.shape or n.size < 2:
        raise InvalidInputError("n_values and accuracy must be 1-D of the same length >= 2")
    if not np.all(np.diff(n) > 0):
        raise InvalidInputError("n_values must be strictly increasing")
    return float(np.sum((a[1:] + a[:-1]) * np.diff(n)) / 2 / (n[-1] - n[0]))


def effectiveness_ratio(auc_a: float, auc_b: float) -> float:
    """Relative gain of curve ``a`` over curve ``b``: ``auc_a / auc_b - 1`` (``0.0434`` = "+4.34%").

    Examples
    --------
    >>> round(effectiveness_ratio(0.8347, 0.8), 4)
    0.0434
    """
    if not auc_b > 0:
        raise InvalidInputError(f"auc_b must be positive, got {auc_b}")
    return float(auc_a) / float(auc_b) - 1.0
