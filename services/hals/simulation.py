"""A simulated annotator for the HALS benchmark: label order, suggestion events and learning curves.

HALS (van der Wal et al., npj Digital Medicine 2021) measures two things on real annotators: how much work
the suggestions save and how much faster the classifier learns when Coreset active learning guides the
annotator to a patch. Here the annotator is simulated with a known ground truth per cell (a perfect
annotator: every label it gives is the true class), so both numbers can be measured on any image with
segmented nuclei. Everything is a pure function of its inputs and ``seed``; nothing is read or written.

Policies of :func:`simulate`
----------------------------
``"hals"`` (AI on)
    1. *Start*: ``initial_per_class`` cells of each class (default 20), drawn at random from the pool,
       labelled in random order (the paper starts from a small random set).
    2. *Loop*: Coreset picks ``k`` cells S by greedy k-center (:func:`~colabel.services.hals.coreset.k_center_greedy`)
       over the unlabelled pool, on the classifier's penultimate features (:meth:`Ensemble.embed`, the
       members' activations concatenated, as the live service) once a classifier exists, else on the
       backbone ``features``; the guidance picks the grid patch
       (``patch_size`` pixels) holding most of S (:func:`~colabel.services.hals.coreset.select_patch`);
       the annotator labels the unlabelled pool cells of that patch (at most ``max_per_patch``): first
       the cells of S in the patch in Coreset order, then the others by image distance to the nearest of
       them.
    3. *Suggestions*: an :class:`~colabel.services.hals.classifier.OnlineClassifier` (10 labels per class
       to start, retrain every 5 label changes) learns from every label. Once it is trained, each cell's
       suggestion is shown before the annotator labels it, and is accepted when it equals the truth,
       corrected otherwise. Retraining is synchronous (the real service retrains in the background).
``"control"`` (AI off)
    The patches of the grid in reading order (row-major), each cell of a patch in reading order of its
    centroid (by ``y``, then ``x``), every cell labelled by hand: no classifier, no suggestions, no Coreset.
    ``initial_per_class`` (default 0) prepends the same random start as ``"hals"`` (an ablation).
``"random"`` (AI off)
    Pool cells in a random order, by hand (passive learning, the usual active-learning baseline).

``suggestions=True`` turns the classifier and its suggestions on for ``"control"`` or ``"random"`` too
(the label order does not change), to measure the workload of suggestions without Coreset guidance.

All policies stop at ``max_labels`` labels or when the pool is exhausted. Events are
:class:`~colabel.services.hals.metrics.WorkloadEvent`: for a cell with a suggestion
``suggestion_shown``, then ``suggestion_accepted`` or ``suggestion_corrected``, then ``label``; for a
cell without one, ``label`` only. :func:`~colabel.services.hals.metrics.workload_reduction` of a HALS log is
the paper's "less work".

Learning curves
---------------
:func:`head_trainer` gives :func:`~colabel.services.hals.metrics.learning_curve` a ``train_fn`` that trains
the HALS head (:func:`~colabel.services.hals.classifier.train_head` settings) on the first ``N`` labels. The
``repeats`` trainings of one ``N`` are trained together as one batched network
(:meth:`Ensemble.fit` with the learning curve's seeds), the same heads as ``repeats`` separate trainings
up to float rounding, about 3x cheaper.

Coordinates: centroids are ``(x, y)`` pixels of :mod:`colabel.coords` (``x`` = column).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from colabel.errors import InvalidInputError

from .coreset import grid, k_center_greedy, select_patch
from .metrics import WorkloadEvent

__all__ = [
    "POLICIES",
    "PatchVisit",
    "SimulationResult",
    "simulate",
    "patch_of",
    "reading_order",
    "holdout_split",
    "region_means",
    "head_trainer",
    "curve_points",
]

Policy = Literal["hals", "control", "random"]
POLICIES: tuple[str, ...] = ("hals", "control", "random")

#: HALS' start: cells labelled per class before Coreset guidance begins.
INITIAL_PER_CLASS = 20


@dataclass(frozen=True)
class PatchVisit:
    """One patch the annotator was sent to.

    Attributes
    ----------
    row, col : int
        Grid position (reading order = row-major).
    box : (x0, y0, x1, y1)
        Pixels, end-exclusive, ``xy`` convention.
    selected : ndarray of int64
        The Coreset selection S when the patch was chosen (empty for ``"control"``).
    selected_in_patch : int
        How many cells of S lie in the patch.
    cells : ndarray of int64
        The cells labelled there, in labelling order (the visit may be cut short by ``max_labels``).
    """

    row: int
    col: int
    box: tuple[int, int, int, int]
    selected: np.ndarray
    selected_in_patch: int
    cells: np.ndarray


@dataclass(frozen=True)
class SimulationResult:
    """What a simulated annotator did.

    Attributes
    ----------
    policy : str
    label_order : ndarray (M,) int64
        Cells (indices into the inputs) in the order they were labelled.
    labels : ndarray (M,) int64
        The label each got (the truth: the simulated annotator makes no mistakes).
    suggested : ndarray (M,) int64
        The suggestion shown before each label, ``-1`` where none was shown.
    events : list of WorkloadEvent
        The event log, in order (``cell_id`` = cell index, ``image_id`` as given).
    retrain_at : list of int
        Number of labels at each retrain (HALS only).
    retrain_seconds : list of float
        Wall time of each retrain.
    n_initial : int
        Labels of the random start (the first ``n_initial`` of ``label_order``).
    patches : list of PatchVisit
    """

    policy: str
    label_order: np.ndarray
    labels: np.ndarray
    suggested: np.ndarray
    events: list[WorkloadEvent]
    retrain_at: list[int] = field(default_factory=list)
    retrain_seconds: list[float] = field(default_factory=list)
    n_initial: int = 0
    patches: list[PatchVisit] = field(default_factory=list)

    def __iter__(self):
        """``label_order, events = result``."""
        return iter((self.label_order, self.events))


# ----------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------


def _grid_geometry(image_shape: tuple[int, int], patch_size: int) -> tuple[int, int, int, int]:
    height, width = (int(v) for v in tuple(image_shape)[:2])
    ps = int(patch_size)
    if height <= 0 or width <= 0 or ps <= 0:
        raise InvalidInputError(f"image_shape and patch_size must be positive, got {(height, width)} and {ps}")
    return height, width, -(-height // ps), -(-width // ps)


def patch_of(centroids_xy: ArrayLike, *, image_shape: tuple[int, int], patch_size: int) -> np.ndarray:
    """Flat grid index (``row * n_cols + col``) of the patch holding each centroid.

    The binning of :func:`~colabel.services.hals.coreset.select_patch`: ``x`` in ``[c * s, (c + 1) * s)``
    is column ``c``; a centroid on the right / bottom border counts in the last patch.

    Examples
    --------
    >>> patch_of([[10, 10], [130, 5], [5, 200]], image_shape=(256, 256), patch_size=128).tolist()
    [0, 1, 2]
    """
    _, _, n_rows, n_cols = _grid_geometry(image_shape, patch_size)
    xy = np.asarray(centroids_xy, dtype=np.float64).reshape(-1, 2)
    col = np.minimum((xy[:, 0] // int(patch_size)).astype(np.int64), n_cols - 1)
    row = np.minimum((xy[:, 1] // int(patch_size)).astype(np.int64), n_rows - 1)
    return row * n_cols + col


def reading_order(centroids_xy: ArrayLike, cells: ArrayLike) -> np.ndarray:
    """*cells* sorted by centroid ``y``, then ``x``, then index (reading order inside a patch)."""
    cells = np.asarray(cells, dtype=np.int64)
    xy = np.asarray(centroids_xy, dtype=np.float64).reshape(-1, 2)[cells]
    return cells[np.lexsort((cells, xy[:, 0], xy[:, 1]))]


# ----------------------------------------------------------------------------------------------------------
# Ground truth helpers
# ----------------------------------------------------------------------------------------------------------


def holdout_split(n: int, *, fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random split of ``n`` cells into ``(pool, eval)`` index arrays (both sorted).

    ``round(fraction * n)`` cells go to the evaluation set, which the annotator never labels.

    Examples
    --------
    >>> pool, held = holdout_split(8, fraction=0.25, seed=0)
    >>> len(pool), len(held), sorted(np.r_[pool, held].tolist()) == list(range(8))
    (6, 2, True)
    """
    if not 0 < fraction < 1:
        raise InvalidInputError(f"fraction must lie in (0, 1), got {fraction}")
    perm = np.random.default_rng(seed).permutation(int(n))
    n_eval = int(round(fraction * n))
    return np.sort(perm[n_eval:]).astype(np.int64), np.sort(perm[:n_eval]).astype(np.int64)


def region_means(channel: ArrayLike, labels: ArrayLike, ids: ArrayLike, *, ring: int = 0) -> np.ndarray:
    """Mean of *channel* inside each labelled object, or in a ring around it.

    Parameters
    ----------
    channel : ndarray (H, W), float
        E.g. the DAB optical density of :func:`skimage.color.rgb2hed`.
    labels : ndarray (H, W), int
        Instance labels, 0 = background.
    ids : array-like of int, shape (N,)
        The objects, in the order of the output.
    ring : int
        0: the object's own pixels. ``r > 0``: the background pixels (label 0) that
        :func:`skimage.segmentation.expand_labels` gives to the object when growing every object by ``r``
        pixels, i.e. a ring of width ``r`` that never covers another object and, between two close
        objects, is split halfway. An object whose ring is empty gets NaN.

    Returns
    -------
    ndarray (N,), float64
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import expand_labels

    channel = np.asarray(channel, dtype=np.float64)
    labels = np.asarray(labels)
    if channel.shape != labels.shape:
        raise InvalidInputError(f"channel {channel.shape} and labels {labels.shape} must have the same shape")
    ids = np.asarray(ids, dtype=np.int64)
    if ring < 0:
        raise InvalidInputError(f"ring must be >= 0, got {ring}")
    region = labels if ring == 0 else np.where(labels == 0, expand_labels(labels, int(ring)), 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        sums = ndi.sum_labels(channel, region, ids)
        counts = ndi.sum_labels(np.ones_like(channel), region, ids)
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


# ----------------------------------------------------------------------------------------------------------
# The simulated annotator
# ----------------------------------------------------------------------------------------------------------


def _initial_cells(truth: np.ndarray, pool: np.ndarray, per_class: int, n_classes: int,
                   rng: np.random.Generator) -> np.ndarray:
    picks = []
    for c in range(n_classes):
        members = pool[truth[pool] == c]
        take = min(int(per_class), len(members))
        picks.append(rng.choice(members, size=take, replace=False) if take else np.empty(0, np.int64))
    start = np.concatenate(picks).astype(np.int64) if picks else np.empty(0, np.int64)
    return rng.permutation(start)


def simulate(
    features: ArrayLike,
    truth: ArrayLike,
    centroids_xy: ArrayLike,
    *,
    image_shape: tuple[int, int],
    policy: Policy = "hals",
    pool: ArrayLike | None = None,
    patch_size: int = 128,
    k: int = 10,
    initial_per_class: int | None = None,
    max_labels: int = 200,
    max_per_patch: int | None = None,
    n_classes: int | None = None,
    seed: int = 0,
    suggestions: bool | None = None,
    classifier_options: Mapping[str, Any] | None = None,
    image_id: Any = None,
    callback: Callable[[int], None] | None = None,
) -> SimulationResult:
    """Run one simulated annotation session (see the module docstring for the policies).

    Parameters
    ----------
    features : array-like, shape (N, D), float
        Backbone features of every cell (e.g. EfficientNet-Lite0, from a FeatureStore).
    truth : array-like, shape (N,), int
        Ground-truth class of every cell, ``0 .. n_classes - 1``.
    centroids_xy : array-like, shape (N, 2)
        ``(x, y)`` pixels.
    image_shape : (H, W)
    policy : {"hals", "control", "random"}
    pool : array-like of int, optional
        Cells the annotator may label (default: all); the rest (an evaluation set) is never labelled,
        never selected and never suggested.
    patch_size : int
        Side of the square grid patches in pixels.
    k : int
        Coreset selection size per patch choice (``"hals"``).
    initial_per_class : int, optional
        Random start per class; default 20 for ``"hals"``, 0 otherwise.
    max_labels : int
        Stop after this many labels (or when the pool is exhausted).
    max_per_patch : int, optional
        Label at most this many cells per visited patch (``"hals"``; default: all unlabelled ones).
    n_classes : int, optional
        Default ``truth.max() + 1`` (at least 2).
    seed : int
        Seeds the random start, the ``"random"`` order and the classifier.
    suggestions : bool, optional
        Train the online classifier and show its suggestions; default: only for ``"hals"``. ``True`` with
        ``"random"`` or ``"control"`` measures the workload of suggestions without Coreset guidance (same
        label order as with ``False``).
    classifier_options : mapping, optional
        Passed to :class:`~colabel.services.hals.classifier.OnlineClassifier` (e.g. ``n_members``,
        ``min_labels_per_class``, ``retrain_every``).
    image_id : hashable, optional
        Stored in every event.
    callback : callable(n_labels), optional
        Called after each label.

    Returns
    -------
    SimulationResult
        Unpacks as ``label_order, events``.
    """
    if policy not in POLICIES:
        raise InvalidInputError(f"policy must be one of {POLICIES}, got {policy!r}")
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(truth).astype(np.int64)
    xy = np.asarray(centroids_xy, dtype=np.float64).reshape(-1, 2)
    if x.ndim != 2 or len(x) != len(y) or len(y) != len(xy):
        raise InvalidInputError(f"features {x.shape}, truth {y.shape} and centroids {xy.shape} must describe "
                                "the same N cells")
    n = len(y)
    n_classes = int(n_classes) if n_classes is not None else max(2, int(y.max()) + 1 if n else 2)
    if n and (y.min() < 0 or y.max() >= n_classes):
        raise InvalidInputError(f"truth must lie in 0..{n_classes - 1}")
    pool_idx = np.arange(n, dtype=np.int64) if pool is None else np.unique(np.asarray(pool, dtype=np.int64))
    if pool_idx.size and (pool_idx.min() < 0 or pool_idx.max() >= n):
        raise InvalidInputError(f"pool has indices outside [0, {n})")
    if int(max_labels) < 0 or int(k) < 1 or (max_per_patch is not None and int(max_per_patch) < 1):
        raise InvalidInputError("max_labels must be >= 0, k and max_per_patch >= 1")
    max_labels = min(int(max_labels), len(pool_idx))
    if initial_per_class is None:
        initial_per_class = INITIAL_PER_CLASS if policy == "hals" else 0
    cell_patch = patch_of(xy, image_shape=image_shape, patch_size=patch_size)

    ai = policy == "hals" if suggestions is None else bool(suggestions)
    clf = None
    if ai:
        from .classifier import OnlineClassifier

        clf = OnlineClassifier(n_classes, features=x, seed=int(seed), **dict(classifier_options or {}))

    unlabelled = np.zeros(n, dtype=bool)
    unlabelled[pool_idx] = True
    order: list[int] = []
    suggested: list[int] = []
    events: list[WorkloadEvent] = []
    retrain_at: list[int] = []
    retrain_seconds: list[float] = []
    visits: list[PatchVisit] = []

    def label(cell: int) -> None:
        cell = int(cell)
        shown = -1
        if clf is not None and clf.ready:
            shown = clf.suggest([cell])[0].cls
            events.append(WorkloadEvent("suggestion_shown", cell, image_id))
            kind = "suggestion_accepted" if shown == y[cell] else "suggestion_corrected"
            events.append(WorkloadEvent(kind, cell, image_id))
        events.append(WorkloadEvent("label", cell, image_id))
        order.append(cell)
        suggested.append(shown)
        unlabelled[cell] = False
        if clf is not None:
            clf.add_label(cell, int(y[cell]))
            if clf.should_retrain():
                report = clf.retrain()
                retrain_at.append(len(order))
                retrain_seconds.append(report.seconds)
        if callback is not None:
            callback(len(order))

    def done() -> bool:
        return len(order) >= max_labels

    # The random start draws from its own stream, so "hals" and "control" with the same seed and
    # initial_per_class start from the same cells.
    start = _initial_cells(y, pool_idx, int(initial_per_class), n_classes,
                           np.random.default_rng([int(seed), 0]))
    for cell in start:
        if done():
            break
        label(cell)
    n_initial = len(order)

    def visit(patch_index: int, cells: np.ndarray, selected: np.ndarray, in_patch: int, geometry) -> None:
        height, width, _, n_cols = geometry
        r, c = divmod(int(patch_index), n_cols)
        ps = int(patch_size)
        done_cells = []
        for cell in cells:
            if done():
                break
            label(cell)
            done_cells.append(int(cell))
        box = (c * ps, r * ps, min((c + 1) * ps, width), min((r + 1) * ps, height))
        visits.append(PatchVisit(row=r, col=c, box=box, selected=np.asarray(selected, np.int64),
                                 selected_in_patch=int(in_patch), cells=np.asarray(done_cells, np.int64)))

    geometry = _grid_geometry(image_shape, patch_size)
    if policy == "control":
        for p_index, _patch in enumerate(grid(image_shape, patch_size)):
            if done():
                break
            cells = np.flatnonzero(unlabelled & (cell_patch == p_index))
            if len(cells):
                visit(p_index, reading_order(xy, cells), np.empty(0, np.int64), 0, geometry)
    elif policy == "random":
        rest = np.flatnonzero(unlabelled)
        for cell in np.random.default_rng([int(seed), 1]).permutation(rest):
            if done():
                break
            label(cell)
    else:
        while not done():
            candidates = np.flatnonzero(unlabelled)
            if not len(candidates):
                break
            space = clf.model.embed(x, how="concat") if clf is not None and clf.ready else x
            labelled = np.asarray(order, dtype=np.int64)
            selected = k_center_greedy(space, labelled, min(int(k), len(candidates)), candidates=candidates)
            choice = select_patch(xy, selected, image_shape=image_shape, patch_size=patch_size)
            p_index = choice.row * geometry[3] + choice.col
            in_patch = np.asarray(choice.selected_in_patch, dtype=np.int64)
            others = np.flatnonzero(unlabelled & (cell_patch == p_index))
            others = others[~np.isin(others, in_patch)]
            if len(others):
                dist = np.sqrt(((xy[others, None, :] - xy[None, in_patch, :]) ** 2).sum(-1)).min(axis=1)
                others = others[np.lexsort((others, dist))]
            cells = np.concatenate([in_patch, others])
            if max_per_patch is not None:
                cells = cells[: int(max_per_patch)]
            visit(p_index, cells, selected, choice.count, geometry)

    return SimulationResult(
        policy=policy, label_order=np.asarray(order, np.int64), labels=y[np.asarray(order, np.int64)],
        suggested=np.asarray(suggested, np.int64), events=events, retrain_at=retrain_at,
        retrain_seconds=retrain_seconds, n_initial=n_initial, patches=visits,
    )


# ----------------------------------------------------------------------------------------------------------
# Learning curves
# ----------------------------------------------------------------------------------------------------------


def head_trainer(
    features: ArrayLike,
    *,
    n_classes: int,
    repeats: int = 10,
    seed: int = 0,
    **train_options: Any,
) -> Callable[[np.ndarray, np.ndarray, int], Callable[[np.ndarray], np.ndarray]]:
    """A ``train_fn`` for :func:`~colabel.services.hals.metrics.learning_curve`: the HALS head on *features*.

    ``train_fn(idx, y, s)`` returns ``predict(eval_idx)``: the class predicted by the head trained with seed
    ``s`` on ``features[idx]`` and ``y``. The first call for a training set trains the heads of all the
    learning curve's seeds, ``np.random.SeedSequence(seed).generate_state(repeats)`` (pass the learning
    curve's ``seed`` and ``repeats``), at once as one batched :class:`Ensemble`; later calls for the same
    set reuse them. Another seed trains a head of its own.

    When a class has fewer than 2 of the labels (a head needs one to train and one to validate) there is
    no head: every cell is predicted as the most common class among the labels (ties: the lowest).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> f = np.r_[rng.normal(0, 1, (20, 4)), rng.normal(4, 1, (20, 4))].astype(np.float32)
    >>> train = head_trainer(f, n_classes=2, repeats=2)
    >>> s = int(np.random.SeedSequence(0).generate_state(2)[0])
    >>> predict = train(np.arange(40), np.repeat([0, 1], 20), s)
    >>> predict(np.array([0, 39])).tolist()
    [0, 1]
    >>> train(np.arange(3), np.array([1, 1, 0]), s)(np.array([0, 39])).tolist()   # too few of class 0
    [1, 1]
    """
    from .classifier import Ensemble

    x = np.asarray(features, dtype=np.float32)
    seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(int(repeats))]
    cache: dict[bytes, dict[int, Any]] = {}

    def train(idx: np.ndarray, labels: np.ndarray, s: int) -> Callable[[np.ndarray], np.ndarray]:
        idx = np.asarray(idx, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        counts = np.bincount(labels, minlength=n_classes)
        if (counts < 2).any():
            majority = int(np.argmax(counts))
            return lambda q: np.full(len(q), majority, dtype=np.int64)
        key = idx.tobytes() + b"|" + labels.tobytes()
        heads = cache.get(key)
        if heads is None:
            cache.clear()  # one training set at a time: learning_curve visits each N once
            heads = cache[key] = {}
        if int(s) not in heads:
            batch = seeds if int(s) in seeds else [int(s)]
            members = Ensemble().fit(x[idx], labels, n_classes=n_classes, seeds=batch, **train_options).members
            heads.update({h.seed: h for h in members})
        head = heads[int(s)]
        return lambda q: head.predict_proba(x[np.asarray(q, dtype=np.int64)]).argmax(axis=1)

    return train


def curve_points(n_max: int, step: int) -> np.ndarray:
    """``0, step, 2 step, ...`` up to *n_max*, with *n_max* itself always included.

    Examples
    --------
    >>> curve_points(23, 10).tolist()
    [0, 10, 20, 23]
    """
    if n_max < 1 or step < 1:
        raise InvalidInputError(f"n_max and step must be >= 1, got {n_max} and {step}")
    points = list(range(0, int(n_max) + 1, int(step)))
    if points[-1] != n_max:
        points.append(int(n_max))
    return np.asarray(points, dtype=np.int64)
