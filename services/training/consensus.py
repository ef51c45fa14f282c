"""Consensus of several annotators and inter-annotator agreement.

Following Segebarth et al., "On the objectivity, reliability, and validity of deep learning enabled
bioimage analyses" (eLife 2020), training labels are taken from the *consensus* of several experts rather
than from one of them, and the experts' agreement is reported next to it:

- :func:`consensus_instances` merges k instance label images into one (objects kept where a majority of
  annotators drew a matching object, outlines by pixel majority);
- :func:`consensus_classes` takes the majority class per cell and reports ties;
- :func:`pairwise_f1`, :func:`cohen_kappa`, :func:`pairwise_kappa`, :func:`matched_class_kappa` and
  :func:`agreement_report` measure how much the annotators agree (object F1 at an IoU threshold, Cohen's kappa
  on cell classes);
- :func:`image_consensus` does all of it for one image: consensus objects, their majority classes (from each
  annotator's class of the object matched into them) with ties, and the agreement with class kappa per pair
  over the objects that pair matched one-to-one.

Label images are integer arrays, ``0`` = background, every other value one object (ids need not be
contiguous); all images of one call have the same shape, (H, W) in (row, col) order (any N-D shape works).
Only numpy is needed; scipy's Hungarian solver is imported lazily for ambiguous matches (IoU <= 0.5).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from colabel.errors import InvalidInputError
from colabel.services.nuclei.metrics import f1_at, overlaps

__all__ = [
    "ConsensusResult",
    "consensus_instances",
    "consensus_classes",
    "pairwise_f1",
    "cohen_kappa",
    "pairwise_kappa",
    "matched_class_kappa",
    "agreement_report",
    "ImageConsensus",
    "image_consensus",
]


@dataclass(frozen=True)
class ConsensusResult:
    """Consensus label image of several annotators.

    Attributes
    ----------
    labels : ndarray of uint32, shape (H, W)
        Consensus objects ``1..n`` (numbered in raster order of their first pixel), ``0`` = background.
    support : ndarray of int64, shape (n,)
        ``support[i]`` is how many annotators drew an object matched into consensus object ``i + 1``.
    members : tuple of dict[int, int], length n
        ``members[i]`` maps annotator index (position in the input sequence) to that annotator's label id
        of the object matched into consensus object ``i + 1``, annotators in increasing order.
    min_agree : int
        Number of annotators an object (and a pixel) needed to be kept.
    """

    labels: np.ndarray
    support: np.ndarray
    members: tuple[dict[int, int], ...]
    min_agree: int

    @property
    def n_objects(self) -> int:
        """Number of consensus objects."""
        return len(self.members)


# ----------------------------------------------------------------------------------------------- checks


def _check_masks(masks: Sequence[np.ndarray], *, minimum: int) -> list[np.ndarray]:
    if isinstance(masks, np.ndarray) or not isinstance(masks, Sequence):
        raise InvalidInputError("masks must be a sequence (list or tuple) of label images, one per annotator")
    if len(masks) < minimum:
        raise InvalidInputError(f"at least {minimum} annotators' label images are needed, got {len(masks)}")
    arrays = [np.asarray(m) for m in masks]
    for index, array in enumerate(arrays):
        if array.dtype.kind not in "iu":
            raise InvalidInputError(f"masks[{index}] must be an integer label image, got dtype {array.dtype}")
        if array.ndim < 1:
            raise InvalidInputError(f"masks[{index}] must be an image, got a scalar")
        if array.size and array.min() < 0:
            raise InvalidInputError(f"masks[{index}] has negative labels; labels must be >= 0")
        if array.shape != arrays[0].shape:
            raise InvalidInputError(
                f"all label images must have the same shape, got {arrays[0].shape} for masks[0] and "
                f"{array.shape} for masks[{index}]"
            )
    return arrays


def _check_iou(iou: float) -> float:
    if isinstance(iou, bool) or not isinstance(iou, (int, float)) or not 0 < float(iou) <= 1:
        raise InvalidInputError(f"iou must be a number in (0, 1], got {iou!r}")
    return float(iou)


# ------------------------------------------------------------------------------------------- consensus


def _one_to_one(a: np.ndarray, b: np.ndarray, iou: float) -> list[tuple[float, int, int]]:
    """Matched object pairs ``(iou, label_a, label_b)`` of two label images, each object at most once.

    Pairs with IoU ``>= iou`` are unique for ``iou > 0.5``; otherwise the one-to-one assignment with the
    largest summed IoU is taken (Hungarian algorithm), as in :func:`~colabel.services.nuclei.metrics.
    match_instances`.
    """
    t = overlaps(a, b)
    ok = t["pair_iou"] >= iou
    pa, pb, score = t["pair_gt"][ok], t["pair_pred"][ok], t["pair_iou"][ok]
    if len(np.unique(pa)) != len(pa) or len(np.unique(pb)) != len(pb):
        from scipy.optimize import linear_sum_assignment

        ua, ia = np.unique(pa, return_inverse=True)
        ub, ib = np.unique(pb, return_inverse=True)
        cost = np.zeros((len(ua), len(ub)))
        cost[ia, ib] = -score
        rows, cols = linear_sum_assignment(cost)
        keep = cost[rows, cols] < 0
        pa, pb, score = ua[rows[keep]], ub[cols[keep]], -cost[rows[keep], cols[keep]]
    return [(float(s), int(t["gt_ids"][i]), int(t["pred_ids"][j])) for s, i, j in zip(score, pa, pb, strict=True)]


def _object_pixels(mask: np.ndarray) -> dict[int, np.ndarray]:
    """Flat pixel indices of every object of a label image: ``{label: int64 indices}``."""
    flat = mask.ravel()
    order = np.argsort(flat, kind="stable")
    values = flat[order]
    ids, starts = np.unique(values, return_index=True)
    ends = np.append(starts[1:], len(values))
    return {int(i): order[s:e] for i, s, e in zip(ids, starts, ends, strict=True) if i != 0}


def consensus_instances(
    masks: Sequence[np.ndarray], *, iou: float = 0.5, min_agree: int | None = None
) -> ConsensusResult:
    """Consensus instance segmentation of ``k >= 2`` annotators.

    1. **Matching.** For every pair of annotators, objects with IoU ``>= iou`` are matched one-to-one
       (for ``iou > 0.5`` such pairs are unique; for lower thresholds the assignment with the largest
       summed IoU, Hungarian algorithm). All matched pairs of all annotator pairs are then merged greedily,
       highest IoU first (ties by annotator index, then label id), into groups holding at most one object
       per annotator: a pair whose two groups already share an annotator is skipped. A group is linked by
       single linkage, so two of its objects need not match each other directly.
    2. **Objects.** A group becomes a consensus object when at least ``min_agree`` annotators are in it
       (default ``k // 2 + 1``, a strict majority: 2 of 2, 2 of 3, 3 of 4, 3 of 5).
    3. **Outline.** A pixel belongs to the consensus object when at least ``min_agree`` of the group's
       objects cover it, i.e. when a majority of *all* k annotators put it inside their matched object
       (2 of 2 annotators: the intersection; 2 of 3: pixels inside at least two of the three). Unmatched
       objects never vote. A pixel claimed by two consensus objects goes to the one with more votes there;
       on equal votes to the one with larger support, then to the one whose smallest (annotator, label)
       member comes first. Objects left without pixels are dropped; an outline may be disconnected.

    Parameters
    ----------
    masks : sequence of ndarray of int, each shape (H, W)
        One instance label image per annotator, ``0`` = background. Not modified.
    iou : float, default 0.5
        Matching threshold in ``(0, 1]``.
    min_agree : int, optional
        Annotators needed per object and per pixel, ``1 <= min_agree <= k``. ``1`` keeps every object
        (outlines become unions of the matched objects).

    Returns
    -------
    ConsensusResult
        ``labels`` (H, W) uint32, ``support`` and ``members`` per consensus object.

    Raises
    ------
    InvalidInputError
        Fewer than two annotators (a consensus of one is not a consensus; use its labels directly),
        non-integer or negative labels, different shapes, bad ``iou`` or ``min_agree``.

    Examples
    --------
    >>> a = np.array([[1, 1, 1, 0]])
    >>> b = np.array([[0, 2, 2, 0]])
    >>> c = np.array([[0, 0, 0, 5]])
    >>> r = consensus_instances([a, b, c])
    >>> r.labels.tolist(), r.support.tolist(), r.members
    ([[0, 1, 1, 0]], [2], ({0: 1, 1: 2},))
    """
    arrays = _check_masks(masks, minimum=2)
    iou = _check_iou(iou)
    k = len(arrays)
    if min_agree is None:
        min_agree = k // 2 + 1
    if isinstance(min_agree, bool) or not isinstance(min_agree, (int, np.integer)) or not 1 <= min_agree <= k:
        raise InvalidInputError(f"min_agree must be an integer between 1 and {k} (the annotators), got {min_agree!r}")
    min_agree = int(min_agree)

    pixels = [_object_pixels(a) for a in arrays]
    nodes = [(i, label) for i in range(k) for label in pixels[i]]
    index = {node: n for n, node in enumerate(nodes)}

    edges = []
    for i in range(k):
        for j in range(i + 1, k):
            edges.extend((-s, i, la, j, lb) for s, la, lb in _one_to_one(arrays[i], arrays[j], iou))
    edges.sort()

    # union-find over objects; each root keeps the set of annotators in its group
    parent = list(range(len(nodes)))
    annotators = [{i} for i, _ in nodes]

    def find(n: int) -> int:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for _, i, la, j, lb in edges:
        ra, rb = find(index[(i, la)]), find(index[(j, lb)])
        if ra == rb or annotators[ra] & annotators[rb]:
            continue
        ra, rb = min(ra, rb), max(ra, rb)
        parent[rb] = ra
        annotators[ra] |= annotators[rb]

    groups: dict[int, list[tuple[int, int]]] = {}
    for n, node in enumerate(nodes):
        groups.setdefault(find(n), []).append(node)
    kept = [sorted(g) for g in groups.values() if len(g) >= min_agree]
    kept.sort(key=lambda g: (-len(g), g[0]))  # paint order = priority on equal votes

    size = arrays[0].size
    owner = np.full(size, -1, dtype=np.int64)
    best = np.zeros(size, dtype=np.int64)
    for g, group in enumerate(kept):
        where, votes = np.unique(np.concatenate([pixels[i][label] for i, label in group]), return_counts=True)
        agreed = votes >= min_agree
        where, votes = where[agreed], votes[agreed]
        wins = votes > best[where]
        owner[where[wins]] = g
        best[where[wins]] = votes[wins]

    # number the surviving objects in raster order of their first pixel
    present, first = np.unique(owner, return_index=True)
    first, present = first[present >= 0], present[present >= 0]
    order = present[np.argsort(first)]
    relabel = np.zeros(len(kept) + 1, dtype=np.uint32)
    relabel[order + 1] = np.arange(1, len(order) + 1, dtype=np.uint32)
    labels = relabel[owner + 1].reshape(arrays[0].shape)
    final = [kept[g] for g in order]
    return ConsensusResult(
        labels=labels,
        support=np.array([len(g) for g in final], dtype=np.int64),
        members=tuple({i: label for i, label in g} for g in final),
        min_agree=min_agree,
    )


def consensus_classes(
    votes: Mapping[Hashable, Sequence[str | None]],
) -> tuple[dict[Hashable, str | None], list[Hashable]]:
    """Majority class per cell from several annotators' votes.

    ``None`` votes (annotator did not label the cell) are ignored. The class with the most votes wins
    (plurality, so ``["a", "a", "b", "c"]`` gives ``"a"``); when two or more classes share the most votes
    the cell is a tie: its class is ``None`` and its id is listed in ``ties``. A cell with no votes at all
    gets ``None`` and is not a tie.

    Parameters
    ----------
    votes : mapping cell id -> sequence of str or None
        One entry per annotator (order irrelevant). Not modified.

    Returns
    -------
    classes : dict cell id -> str or None
        In the order of ``votes``.
    ties : list of cell ids
        Cells whose top count is shared, in the order of ``votes``.

    Examples
    --------
    >>> consensus_classes({1: ["tumor", "tumor", "stroma"], 2: ["tumor", "stroma", None]})
    ({1: 'tumor', 2: None}, [2])
    """
    if not isinstance(votes, Mapping):
        raise InvalidInputError("votes must be a mapping from cell id to the annotators' class names")
    classes: dict[Hashable, str | None] = {}
    ties: list[Hashable] = []
    for cell, cell_votes in votes.items():
        if isinstance(cell_votes, (str, bytes)) or not isinstance(cell_votes, Sequence):
            raise InvalidInputError(f"votes for cell {cell!r} must be a list of class names, got {cell_votes!r}")
        bad = [v for v in cell_votes if v is not None and not isinstance(v, str)]
        if bad:
            raise InvalidInputError(f"votes for cell {cell!r} must be class names (str) or None, got {bad[0]!r}")
        counts = Counter(v for v in cell_votes if v is not None).most_common()
        if not counts:
            classes[cell] = None
        elif len(counts) > 1 and counts[1][1] == counts[0][1]:
            classes[cell] = None
            ties.append(cell)
        else:
            classes[cell] = counts[0][0]
    return classes, ties


# ------------------------------------------------------------------------------------------- agreement


def pairwise_f1(masks: Sequence[np.ndarray], *, iou: float = 0.5) -> np.ndarray:
    """Object F1 at an IoU threshold for every pair of annotators.

    Parameters
    ----------
    masks : sequence of ndarray of int, each shape (H, W)
        One instance label image per annotator (k >= 1), ``0`` = background.
    iou : float, default 0.5
        Matching threshold in ``(0, 1]`` (see :func:`~colabel.services.nuclei.metrics.f1_at`).

    Returns
    -------
    f1 : ndarray of float64, shape (k, k)
        Symmetric, diagonal 1.0. Two empty images agree perfectly (1.0).

    Examples
    --------
    >>> pairwise_f1([np.array([[1, 1, 0, 2]]), np.array([[3, 3, 0, 0]])]).tolist()
    [[1.0, 0.6666666666666666], [0.6666666666666666, 1.0]]
    """
    arrays = _check_masks(masks, minimum=1)
    iou = _check_iou(iou)
    k = len(arrays)
    out = np.eye(k)
    for i in range(k):
        for j in range(i + 1, k):
            out[i, j] = out[j, i] = f1_at(arrays[i], arrays[j], iou)
    return out


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable], labels: Sequence[Hashable] | None = None) -> float:
    """Cohen's kappa of two raters over the same items.

    ``kappa = (p_o - p_e) / (1 - p_e)`` with ``p_o`` the observed agreement and ``p_e`` the agreement
    expected from the raters' marginal class frequencies; computed exactly from integer counts as
    ``(n * agree - S) / (n**2 - S)``, ``S = sum_c n_a(c) n_b(c)``.

    Degenerate case: ``p_e = 1`` happens only when both raters give every item the same single class;
    the raters then agree perfectly and kappa is defined as **1.0** (scikit-learn returns NaN there).

    Parameters
    ----------
    a, b : sequence of hashable, same length >= 1
        Class of each item by rater a and rater b (``None`` is not allowed: drop unlabelled items first).
    labels : sequence of hashable, optional
        The allowed classes; a value outside them raises. Unused classes do not change kappa.

    Returns
    -------
    kappa : float
        In ``[-1, 1]``; 0 is chance agreement.

    Examples
    --------
    >>> cohen_kappa(["y", "y", "n", "n"], ["y", "n", "n", "n"])
    0.5
    """
    for name, values in (("a", a), ("b", b)):
        if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
            raise InvalidInputError(f"{name} must be a sequence of class labels, got {type(values).__name__}")
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise InvalidInputError(f"a and b must rate the same items, got {len(a)} and {len(b)} labels")
    if not a:
        raise InvalidInputError("cohen_kappa needs at least one item rated by both raters")
    if any(v is None for v in a + b):
        raise InvalidInputError("a and b contain None; drop the items one of the raters did not label")
    if labels is not None:
        allowed = set(labels)
        outside = [v for v in a + b if v not in allowed]
        if outside:
            raise InvalidInputError(f"class {outside[0]!r} is not one of labels {list(labels)!r}")
    n = len(a)
    agree = sum(x == y for x, y in zip(a, b, strict=True))
    count_a, count_b = Counter(a), Counter(b)
    expected = sum(count_a[c] * count_b[c] for c in count_a)
    if expected == n * n:  # p_e == 1: both raters used one and the same class for everything
        return 1.0
    return (n * agree - expected) / (n * n - expected)


def pairwise_kappa(
    class_table: Mapping[Hashable, Mapping[Hashable, str | None]],
) -> dict[tuple[Hashable, Hashable], float | None]:
    """Cohen's kappa of every pair of annotators, over the cells both of them labelled.

    Parameters
    ----------
    class_table : mapping annotator -> (mapping cell id -> class or None)
        Cells missing from an annotator's mapping, or mapped to ``None``, are unlabelled by them.

    Returns
    -------
    kappa : dict (a, b) -> float or None
        One entry per unordered pair, ``a`` before ``b`` in the order of ``class_table``; ``None`` when
        the two annotators share no labelled cell.

    Examples
    --------
    >>> pairwise_kappa({"ann": {1: "a", 2: "b"}, "bob": {1: "a", 2: "b", 3: "a"}})
    {('ann', 'bob'): 1.0}
    """
    if not isinstance(class_table, Mapping) or not all(isinstance(v, Mapping) for v in class_table.values()):
        raise InvalidInputError("class_table must map each annotator to a mapping from cell id to class")
    names = list(class_table)
    out: dict[tuple[Hashable, Hashable], float | None] = {}
    for x, a in enumerate(names):
        for b in names[x + 1 :]:
            ta, tb = class_table[a], class_table[b]
            shared = [c for c in ta if ta[c] is not None and tb.get(c) is not None]
            out[(a, b)] = cohen_kappa([ta[c] for c in shared], [tb[c] for c in shared]) if shared else None
    return out


def _per_annotator(value, masks_by_annotator: Mapping, name: str, what: str) -> Mapping:
    """``value`` (``None``: empty) checked to be a mapping whose keys are annotators of ``masks_by_annotator``."""
    value = {} if value is None else value
    if not isinstance(value, Mapping):
        raise InvalidInputError(f"{name} must map annotator names to {what}")
    unknown = [n for n in value if n not in masks_by_annotator]
    if unknown:
        raise InvalidInputError(f"{name} names annotator {unknown[0]!r}, who has no label image")
    return value


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return math.fsum(kept) / len(kept) if kept else None


def agreement_report(
    masks_by_annotator: Mapping[str, np.ndarray],
    classes_by_annotator: Mapping[str, Mapping[Hashable, str | None]] | None = None,
    *,
    iou: float = 0.5,
) -> dict:
    """Inter-annotator agreement as a JSON-able dict: object F1 and class kappa per pair, means per annotator.

    Parameters
    ----------
    masks_by_annotator : mapping annotator name -> ndarray of int, shape (H, W)
        At least two annotators' instance label images, all the same shape.
    classes_by_annotator : mapping annotator name -> (mapping cell id -> class or None), optional
        Cell classes; its annotators must be among ``masks_by_annotator``'s. Kappa is ``None`` for a pair
        where either annotator has no classes or they share no labelled cell.
    iou : float, default 0.5
        Object matching threshold of the F1.

    Returns
    -------
    report : dict
        ``{"iou": float, "annotators": [name, ...],
        "pairs": [{"a", "b", "f1", "kappa", "n_cells"}, ...],
        "per_annotator": {name: {"mean_f1", "mean_kappa"}}, "mean_f1", "mean_kappa"}``; means are over
        the pairs where the value is defined, ``None`` where none is; ``n_cells`` is the number of cells
        both annotators classified (0 without classes).

    Examples
    --------
    >>> r = agreement_report({"ann": np.array([[1, 1, 0]]), "bob": np.array([[2, 2, 0]])})
    >>> r["pairs"]
    [{'a': 'ann', 'b': 'bob', 'f1': 1.0, 'kappa': None, 'n_cells': 0}]
    """
    if not isinstance(masks_by_annotator, Mapping):
        raise InvalidInputError("masks_by_annotator must map annotator names to label images")
    names = list(masks_by_annotator)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise InvalidInputError(f"annotator names must be strings, got {bad[0]!r}")
    if len(names) < 2:
        raise InvalidInputError(f"agreement needs at least two annotators, got {len(names)}")
    f1 = pairwise_f1([masks_by_annotator[n] for n in names], iou=iou)
    classes = _per_annotator(classes_by_annotator, masks_by_annotator, "classes_by_annotator", "{cell id: class}")
    kappa = pairwise_kappa({n: classes[n] for n in names if n in classes})
    cells = {}
    for x, a in enumerate(names):
        for b in names[x + 1 :]:
            ca, cb = classes.get(a, {}), classes.get(b, {})
            cells[(a, b)] = (kappa.get((a, b)), sum(1 for c in ca if ca[c] is not None and cb.get(c) is not None))
    return _report(names, f1, cells, iou)


def _report(names: list[str], f1: np.ndarray, kappa: Mapping[tuple[str, str], tuple[float | None, int]],
            iou: float) -> dict:
    """:func:`agreement_report`'s dict from the pairwise F1 ``(k, k)`` and ``(a, b) -> (kappa, n_cells)``."""
    pairs = []
    per: dict[str, dict[str, list[float | None]]] = {n: {"f1": [], "kappa": []} for n in names}
    for x, a in enumerate(names):
        for y in range(x + 1, len(names)):
            b = names[y]
            k, n_cells = kappa.get((a, b), (None, 0))
            pairs.append({"a": a, "b": b, "f1": float(f1[x, y]), "kappa": k, "n_cells": n_cells})
            for name in (a, b):
                per[name]["f1"].append(float(f1[x, y]))
                per[name]["kappa"].append(k)
    return {
        "iou": _check_iou(iou),
        "annotators": names,
        "pairs": pairs,
        "per_annotator": {n: {"mean_f1": _mean(v["f1"]), "mean_kappa": _mean(v["kappa"])} for n, v in per.items()},
        "mean_f1": _mean([p["f1"] for p in pairs]),
        "mean_kappa": _mean([p["kappa"] for p in pairs]),
    }


def _classed_pairs(pairs, classes_a: dict, classes_b: dict) -> list[tuple[str, str]]:
    """``(class by a, class by b)`` of the matched objects (``_one_to_one``'s pairs) that both annotators classed."""
    items = [(classes_a.get(la), classes_b.get(lb)) for _, la, lb in pairs]
    return [(x, y) for x, y in items if x is not None and y is not None]


def matched_class_kappa(
    mask_a: np.ndarray,
    mask_b: np.ndarray,
    classes_a: Mapping[int, str | None],
    classes_b: Mapping[int, str | None],
    *,
    iou: float = 0.5,
) -> tuple[float | None, int]:
    """Cohen's kappa of two annotators' classes over the objects they both drew, matched one-to-one.

    The objects of ``mask_a`` and ``mask_b`` are matched one-to-one at IoU ``>= iou`` (as in
    :func:`consensus_instances`'s step 1, for this pair alone: what the other annotators drew plays no part);
    every matched pair both annotators classed is one item rated by both.

    Parameters
    ----------
    mask_a, mask_b : ndarray of int, shape (H, W)
        The two annotators' instance label images, ``0`` = background.
    classes_a, classes_b : mapping label id -> class name or None
        Each annotator's class of their objects; labels left out (or ``None``) are unclassed.
    iou : float, default 0.5

    Returns
    -------
    kappa : float or None
        :func:`cohen_kappa` over those items; ``None`` when there is none.
    n_cells : int
        The number of items: matched objects both annotators classed.

    Examples
    --------
    >>> a = np.array([[1, 1, 0, 2, 2]]); b = np.array([[7, 7, 0, 8, 8]])
    >>> matched_class_kappa(a, b, {1: "x", 2: "y"}, {7: "x", 8: "x"})
    (0.0, 2)
    """
    arrays = _check_masks([mask_a, mask_b], minimum=2)
    items = _classed_pairs(_one_to_one(*arrays, _check_iou(iou)), classes_a, classes_b)
    if not items:
        return None, 0
    return cohen_kappa([x for x, _ in items], [y for _, y in items]), len(items)


def pooled_pair_agreement(
    images: Sequence[tuple[np.ndarray, np.ndarray, Mapping[int, str | None], Mapping[int, str | None]]],
    *,
    iou: float = 0.5,
) -> dict:
    """Agreement of one annotator pair over every image both labelled: object counts pooled, not averaged.

    Parameters
    ----------
    images : sequence of ``(mask_a, mask_b, classes_a, classes_b)``
        Per image, the two annotators' instance label images (int, shape (H, W), ``0`` = background) and
        their classes (label id -> class name or None).
    iou : float, default 0.5

    Returns
    -------
    dict
        ``images`` (how many), ``matched`` (objects matched one-to-one at IoU ``>= iou``), ``only_a``,
        ``only_b`` (objects of one annotator without a match), ``f1`` = 2 matched / (2 matched + only_a +
        only_b), 1.0 when neither drew anything; ``kappa``: :func:`cohen_kappa` over every matched object
        both classed (None when there is none) and ``n_cells``, their number.

    Examples
    --------
    >>> a, b = np.array([[1, 1, 0, 2, 2]]), np.array([[7, 7, 0, 0, 0]])
    >>> pooled_pair_agreement([(a, b, {1: "x", 2: "y"}, {7: "x"}), (a, a, {1: "x", 2: "y"}, {1: "y", 2: "y"})])
    {'images': 2, 'matched': 3, 'only_a': 1, 'only_b': 0, 'f1': 0.8571428571428571, 'kappa': 0.4, 'n_cells': 3}
    """
    iou = _check_iou(iou)
    matched = only_a = only_b = 0
    rated: list[tuple[str, str]] = []
    for mask_a, mask_b, classes_a, classes_b in images:
        a, b = _check_masks([mask_a, mask_b], minimum=2)
        pairs = _one_to_one(a, b, iou)
        n_a, n_b = len(np.setdiff1d(np.unique(a), [0])), len(np.setdiff1d(np.unique(b), [0]))
        matched += len(pairs)
        only_a += n_a - len(pairs)
        only_b += n_b - len(pairs)
        rated += _classed_pairs(pairs, classes_a, classes_b)
    total = 2 * matched + only_a + only_b
    kappa = cohen_kappa([x for x, _ in rated], [y for _, y in rated]) if rated else None
    return {"images": len(images), "matched": matched, "only_a": only_a, "only_b": only_b,
            "f1": 1.0 if total == 0 else 2 * matched / total, "kappa": kappa, "n_cells": len(rated)}


# ------------------------------------------------------------------------------------------- one image

@dataclass(frozen=True)
class ImageConsensus:
    """Consensus objects, classes and agreement of one image (see :func:`image_consensus`).

    Attributes
    ----------
    result : ConsensusResult
        The consensus objects ``1..n``.
    classes : dict int -> str or None
        Consensus object id -> majority class; ``None`` where nobody classed it or on a tie.
    ties : list of int
        Consensus object ids whose top class count is shared.
    votes : dict int -> dict str -> str or None
        Consensus object id -> {annotator: the class they gave their object matched into it}.
    agreement : dict
        :func:`agreement_report`'s dict, class kappa and ``n_cells`` per annotator pair from
        :func:`matched_class_kappa` (over the pair's own matched objects both classed), plus
        ``"consensus": {"objects", "classified", "ties"}``.
    """

    result: ConsensusResult
    classes: dict[int, str | None]
    ties: list[int]
    votes: dict[int, dict[str, str | None]]
    agreement: dict


def image_consensus(
    masks_by_annotator: Mapping[str, np.ndarray],
    label_classes: Mapping[str, Mapping[int, str | None]] | None = None,
    *,
    iou: float = 0.5,
) -> ImageConsensus:
    """Consensus instances, consensus classes and agreement of ``k >= 2`` annotators on one image.

    The consensus objects are :func:`consensus_instances`'s (annotators in the mapping's order). Each
    annotator whose object was matched into consensus object ``i`` votes that object's class
    (``label_classes[annotator][label]``); :func:`consensus_classes` takes the majority and reports ties.
    Cohen's kappa per annotator pair is computed over the objects *that pair* drew and matched one-to-one
    (:func:`matched_class_kappa`, IoU ``>= iou``) and both classed, whether or not the object became a consensus
    object: with 4 annotators (3 needed for a consensus object) two who drew the same cells that the other two
    did not still disagree or agree on them. ``n_cells`` is the number of those objects. Object F1 as in
    :func:`agreement_report`.

    Parameters
    ----------
    masks_by_annotator : mapping annotator -> ndarray of int, shape (H, W)
        Instance label images, ``0`` = background.
    label_classes : mapping annotator -> (mapping label id -> class name or None), optional
        The class of each annotator's objects; annotators (or labels) left out vote no class.
    iou : float, default 0.5

    Examples
    --------
    >>> a = np.array([[1, 1, 0, 2, 2]]); b = np.array([[3, 3, 0, 4, 4]])
    >>> c = image_consensus({"ann": a, "bob": b}, {"ann": {1: "tumor", 2: "stroma"}, "bob": {3: "tumor", 4: "tumor"}})
    >>> c.classes, c.ties
    ({1: 'tumor', 2: None}, [2])
    """
    if not isinstance(masks_by_annotator, Mapping):
        raise InvalidInputError("masks_by_annotator must map annotator names to label images")
    names = list(masks_by_annotator)
    if len(names) < 2:
        raise InvalidInputError(f"consensus needs at least two annotators, got {len(names)}")
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise InvalidInputError(f"annotator names must be strings, got {bad[0]!r}")
    label_classes = _per_annotator(label_classes, masks_by_annotator, "label_classes", "{label id: class}")
    bad = [n for n, v in label_classes.items() if not isinstance(v, Mapping)]
    if bad:
        raise InvalidInputError(f"label_classes[{bad[0]!r}] must map label ids to class names")
    result = consensus_instances([masks_by_annotator[n] for n in names], iou=iou)
    votes = {i: {names[a]: label_classes.get(names[a], {}).get(label) for a, label in members.items()}
             for i, members in enumerate(result.members, start=1)}
    classes, ties = consensus_classes({i: list(v.values()) for i, v in votes.items()})
    f1 = pairwise_f1([masks_by_annotator[n] for n in names], iou=iou)
    kappa = {(a, b): matched_class_kappa(masks_by_annotator[a], masks_by_annotator[b], label_classes[a],
                                         label_classes[b], iou=iou)
             for x, a in enumerate(names) for b in names[x + 1:] if a in label_classes and b in label_classes}
    agreement = _report(names, f1, kappa, iou)
    agreement["consensus"] = {"objects": result.n_objects,
                              "classified": sum(c is not None for c in classes.values()), "ties": ties}
    return ImageConsensus(result=result, classes=classes, ties=ties, votes=votes, agreement=agreement)
