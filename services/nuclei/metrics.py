"""Instance-segmentation metrics on label images: matching at an IoU threshold, F1 and AJI.

Both inputs are integer label images of the same shape: ``0`` is background and every other value is one
object (labels need not be contiguous). Only numpy is needed; scipy's Hungarian solver is imported for
IoU thresholds below 0.5, where one object can overlap two others by more than the threshold.
"""

from __future__ import annotations

import numpy as np

from colabel.errors import InvalidInputError

__all__ = ["overlaps", "match_instances", "f1_at", "aji"]


def _check_pair(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    for name, array in (("gt", gt), ("pred", pred)):
        if array.dtype.kind not in "iu":
            raise InvalidInputError(f"{name} must be an integer label image, got dtype {array.dtype}")
        if array.size and array.min() < 0:
            raise InvalidInputError(f"{name} has negative labels; labels must be >= 0")
    if gt.shape != pred.shape:
        raise InvalidInputError(f"gt and pred must have the same shape, got {gt.shape} and {pred.shape}")
    return gt.ravel().astype(np.int64, copy=False), pred.ravel().astype(np.int64, copy=False)


def overlaps(gt: np.ndarray, pred: np.ndarray) -> dict:
    """Sparse overlap table of two label images.

    Parameters
    ----------
    gt, pred : ndarray of int, same shape
        Label images, ``0`` = background.

    Returns
    -------
    table : dict
        ``gt_ids``, ``pred_ids`` (1-D int64, the non-zero labels present), ``gt_area``, ``pred_area``
        (pixel counts aligned with the ids), and the overlapping pairs ``pair_gt``, ``pair_pred``
        (indices into ``gt_ids`` / ``pred_ids``), ``pair_inter`` (shared pixels) and ``pair_iou``.

    Examples
    --------
    >>> t = overlaps(np.array([[1, 1, 0]]), np.array([[0, 2, 2]]))
    >>> t["pair_inter"].tolist(), t["pair_iou"].tolist()
    ([1], [0.3333333333333333])
    """
    g, p = _check_pair(gt, pred)
    gt_ids, gt_area = np.unique(g[g > 0], return_counts=True)
    pred_ids, pred_area = np.unique(p[p > 0], return_counts=True)
    both = (g > 0) & (p > 0)
    gi = np.searchsorted(gt_ids, g[both])
    pi = np.searchsorted(pred_ids, p[both])
    key = gi * max(len(pred_ids), 1) + pi
    pairs, inter = np.unique(key, return_counts=True)
    pair_gt = pairs // max(len(pred_ids), 1)
    pair_pred = pairs % max(len(pred_ids), 1)
    union = gt_area[pair_gt] + pred_area[pair_pred] - inter
    return {
        "gt_ids": gt_ids,
        "pred_ids": pred_ids,
        "gt_area": gt_area,
        "pred_area": pred_area,
        "pair_gt": pair_gt,
        "pair_pred": pair_pred,
        "pair_inter": inter,
        "pair_iou": inter / union,
    }


def match_instances(gt: np.ndarray, pred: np.ndarray, iou: float = 0.5) -> tuple[int, int, int]:
    """Count matched, spurious and missed objects at an IoU threshold.

    A ground-truth object and a predicted object match when their IoU is ``>= iou``; each object matches
    at most once. For ``iou > 0.5`` such pairs are unique by construction; for lower thresholds the
    one-to-one assignment that maximises the summed IoU is used (Hungarian algorithm).

    Parameters
    ----------
    gt, pred : ndarray of int, same shape
        Label images, ``0`` = background.
    iou : float, default 0.5
        Threshold in ``(0, 1]``.

    Returns
    -------
    tp, fp, fn : int
        Matched pairs, unmatched predictions, unmatched ground-truth objects.

    Examples
    --------
    >>> gt = np.array([[1, 1, 0, 2]])
    >>> pred = np.array([[3, 3, 0, 0]])
    >>> match_instances(gt, pred)
    (1, 0, 1)
    """
    if not (0 < float(iou) <= 1):
        raise InvalidInputError(f"iou must be in (0, 1], got {iou}")
    t = overlaps(gt, pred)
    ok = t["pair_iou"] >= iou
    pg, pp, score = t["pair_gt"][ok], t["pair_pred"][ok], t["pair_iou"][ok]
    if len(np.unique(pg)) == len(pg) and len(np.unique(pp)) == len(pp):
        tp = len(pg)
    else:  # ambiguous (only possible for iou <= 0.5): optimal one-to-one assignment
        from scipy.optimize import linear_sum_assignment

        ug, ig = np.unique(pg, return_inverse=True)
        up, ip = np.unique(pp, return_inverse=True)
        cost = np.zeros((len(ug), len(up)))
        cost[ig, ip] = -score
        rows, cols = linear_sum_assignment(cost)
        tp = int(np.count_nonzero(cost[rows, cols] < 0))
    n_gt, n_pred = len(t["gt_ids"]), len(t["pred_ids"])
    return int(tp), int(n_pred - tp), int(n_gt - tp)


def f1_at(gt: np.ndarray, pred: np.ndarray, iou: float = 0.5) -> float:
    """Object-level F1 score ``2 tp / (2 tp + fp + fn)`` at an IoU threshold (1.0 when both are empty).

    Examples
    --------
    >>> f1_at(np.array([[1, 1, 0, 2]]), np.array([[3, 3, 0, 0]]))
    0.6666666666666666
    """
    tp, fp, fn = match_instances(gt, pred, iou)
    denominator = 2 * tp + fp + fn
    return 1.0 if denominator == 0 else 2 * tp / denominator


def aji(gt: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017).

    For every ground-truth object ``G`` the prediction ``S`` with the highest IoU is taken; ``|G ∩ S|`` is
    added to the numerator and ``|G ∪ S|`` to the denominator (just ``|G|`` when nothing overlaps ``G``).
    Finally the areas of the predictions never taken are added to the denominator. As in the original
    definition, a prediction taken by two ground-truth objects is counted in both unions.

    Parameters
    ----------
    gt, pred : ndarray of int, same shape
        Label images, ``0`` = background.

    Returns
    -------
    aji : float
        In ``[0, 1]``; 1.0 when both images are empty, 0.0 when exactly one is.

    Examples
    --------
    >>> aji(np.array([[1, 1, 0, 0]]), np.array([[1, 1, 1, 0]]))
    0.6666666666666666
    """
    t = overlaps(gt, pred)
    n_gt, n_pred = len(t["gt_ids"]), len(t["pred_ids"])
    if n_gt == 0 and n_pred == 0:
        return 1.0
    if n_gt == 0 or n_pred == 0:
        return 0.0
    pg, pp, inter, iou = t["pair_gt"], t["pair_pred"], t["pair_inter"], t["pair_iou"]
    # best prediction per ground-truth object: sort by (gt, -iou) and take the first row of each gt
    order = np.lexsort((-iou, pg))
    first = np.ones(len(order), dtype=bool)
    first[1:] = pg[order][1:] != pg[order][:-1]
    best = order[first]
    bg, bp, bi = pg[best], pp[best], inter[best]
    numerator = float(bi.sum())
    union = t["gt_area"][bg] + t["pred_area"][bp] - bi
    unmatched_gt = np.ones(n_gt, dtype=bool)
    unmatched_gt[bg] = False
    used = np.zeros(n_pred, dtype=bool)
    used[bp] = True
    denominator = float(union.sum() + t["gt_area"][unmatched_gt].sum() + t["pred_area"][~used].sum())
    return numerator / denominator
