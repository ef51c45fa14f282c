"""Coreset active learning: k-center greedy selection of cells and the grid patch that holds most of them.

HALS (npj Digital Medicine 2021) asks the annotator to label the cells that best *cover* the unlabelled
pool: the Coreset strategy of Sener & Savarese (ICLR 2018), i.e. greedy k-center on classifier features.
Starting from the labelled cells as centres, the greedy step takes the unlabelled candidate whose distance
to its nearest centre is largest, makes it a centre, and repeats ``k`` times. The result is a 2-approximation
of the optimal k-center *coverage radius* ``max_{x in pool} min_{c in centres} ||x - c||``.

Cost and memory
---------------
Every new centre costs one pass over the feature matrix (a BLAS matrix-vector product, squared distances
as ``||x||^2 - 2 x.c + ||c||^2`` with ``||x||^2`` computed once). Nothing of size ``N x N`` or
``N x n_labelled`` is ever built: distances to the labelled set are computed in row x labelled blocks of at
most ``_BLOCK_ELEMENTS`` numbers, and the feature matrix is read in place (views and row blocks, never a
full copy; a ``np.memmap`` works).

Measured with :func:`bench_coreset` on a shared 2-core AMD EPYC VM (OpenBLAS), 1,000,000 x 1280 float32
features (4.77 GiB), 200 labelled, k = 100: at full dimension one pass is memory-bound (~0.13-0.17 s), so
the selection takes 13-17 s with 29 MiB of extra memory. ``reduce_dim=64`` first projects the features
(a seeded Gaussian random projection, one chunked ``(N, D) @ (D, 64)`` GEMM, ~0.9-1.3 s), after which a pass
costs ~7 ms: 2.1-4.7 s in all (spread = load from other tenants), 310 MiB extra (the 256 MB projection).
Quality cost, as the coverage radius *in the original space* relative to the full-dimension selection
(:func:`bench_quality` on :func:`synthetic_features`): random-64 x1.08 at 1M, x1.10-1.18 at 100k x 1280
(3 seeds), x1.11-1.21 at 20k x 256 (8 seeds); random-32 x1.15-1.28; random-128 x1.06-1.10 at twice the
projection cost. PCA (top axes of a 20k-row sample) was much worse on these clustered data (x1.56-1.80 at
64 dims: small clusters' own directions are not among the top axes), hence ``reduce_method="random"`` by
default. :func:`reduce_features` is public so that a service can project once and select many times.

Distances are computed in the dtype of ``features`` (float32 normally) and clipped at 0; ties in the greedy
``argmax`` go to the lowest row index, so a selection is deterministic for a given input and ``seed``.
The rows that take part (candidates and labelled centres) must be finite: a NaN or inf row raises
:class:`~colabel.errors.InvalidInputError` naming it (a NaN distance would win every ``argmax`` and select
labelled or already chosen rows). The check reuses the squared norms the selection computes anyway, so it
costs no extra pass over the features; rows outside the pool are never read.

Patches
-------
:func:`select_patch` lays a regular grid of ``patch_size`` pixels over an image (edge patches are clipped
to the image) and returns the patch holding most selected cells, ties broken in reading order (row-major).
Only the patches holding a selected cell are counted, so its memory does not depend on the size of the grid.
Image sizes and patch sizes are whole pixels (integers, at most :data:`MAX_IMAGE_SIDE`); :func:`grid`, which
lists every patch, refuses more than :data:`MAX_GRID_PATCHES`.
Centroids use colabel's ``xy`` convention (:mod:`colabel.coords`): ``x`` = column, ``y`` = row, origin at
the top-left corner of the top-left pixel, so the image spans ``[0, W] x [0, H]``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from colabel.errors import InvalidInputError

__all__ = [
    "CoresetSelection",
    "Patch",
    "PatchChoice",
    "k_center_greedy",
    "select_coreset",
    "reduce_features",
    "coverage_radius",
    "grid",
    "MAX_GRID_PATCHES",
    "MAX_IMAGE_SIDE",
    "select_patch",
    "select_patch_multi",
    "synthetic_features",
    "bench_coreset",
    "bench_quality",
]

# Upper bound on the elements of any temporary block (row block x labelled block, gathered rows): 4 M
# numbers = 16 MB in float32 (blocks that fit in L3 keep the projection GEMM near peak).
_BLOCK_ELEMENTS = 1 << 22
# Below this fraction of rows, the candidate pool is gathered block by block instead of scanning every row.
_SPARSE_FRACTION = 0.25
#: Largest image side (pixels) of a patch grid: grid positions stay far inside int64.
MAX_IMAGE_SIDE = 1 << 31
#: Most patches :func:`grid` lists (it builds one object per patch); :func:`select_patch` counts only the
#: patches that hold a selected cell, so its memory does not depend on the grid.
MAX_GRID_PATCHES = 1_000_000

FirstCentre = Literal["farthest_from_mean", "random"]
ReduceMethod = Literal["pca", "random"]


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------


def _short(value) -> str:
    """``repr(value)``, at most 80 characters (for error messages)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_features(features: np.ndarray) -> np.ndarray:
    if not isinstance(features, np.ndarray):
        try:
            features = np.asarray(features)  # a list is copied once; an ndarray / memmap never is
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"features must be a numeric (N, D) array: {' '.join(str(exc).split())}") from None
    if features.ndim != 2:
        raise InvalidInputError(f"features must have shape (N, D), got shape {features.shape}")
    if features.dtype.kind != "f":
        raise InvalidInputError(f"features must be floating point, got dtype {features.dtype}")
    return features


def _check_k(k) -> int:
    """``k`` as an int (not a bool, a float, NaN or None), else :class:`InvalidInputError`."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise InvalidInputError(f"k must be an integer number of cells, got {_short(k)}")
    return int(k)


def _check_seed(seed) -> int | None:
    """``seed`` as None or a non-negative int (what ``np.random.default_rng`` takes), else
    :class:`InvalidInputError`."""
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidInputError(f"seed must be a non-negative integer, got {_short(seed)}")
    return int(seed)


def _as_indices(selection: ArrayLike | None, n: int, name: str) -> np.ndarray:
    """A boolean mask (n,) or an index array -> sorted unique int64 indices in ``[0, n)``."""
    if selection is None:
        return np.empty(0, dtype=np.int64)
    array = np.asarray(selection)
    if array.dtype == bool:
        if array.shape != (n,):
            raise InvalidInputError(f"{name} as a boolean mask must have shape ({n},), got {array.shape}")
        return np.flatnonzero(array).astype(np.int64)
    if array.size == 0:
        return np.empty(0, dtype=np.int64)
    if array.dtype.kind not in "iu" or array.ndim != 1:
        raise InvalidInputError(f"{name} must be a boolean mask or a 1-D integer index array, got "
                                f"dtype {array.dtype} and shape {array.shape}")
    if array.min() < 0 or array.max() >= n:
        raise InvalidInputError(f"{name} has indices outside [0, {n})")
    if array.size * 8 < n:  # few indices: sorting them beats an (n,) mask
        return np.unique(array.astype(np.int64))
    mask = np.zeros(n, dtype=bool)
    mask[array] = True
    return np.flatnonzero(mask).astype(np.int64)


def _require_finite(values: np.ndarray, rows: np.ndarray | None, what: str) -> None:
    """Raise if ``values`` (one number per row, e.g. squared norms) has a NaN or inf: that row of the features
    has one (or values whose square overflows the dtype). ``rows`` maps positions to rows of ``features``."""
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        first = int(bad[0] if rows is None else rows[bad[0]])
        raise InvalidInputError(f"features must be finite: {bad.size} {what} row(s) contain NaN or inf (or values "
                                f"too large to square), first at row {first}")


def _block_rows(n_cols: int, cap: int | None) -> int:
    rows = max(1, _BLOCK_ELEMENTS // max(n_cols, 1))
    return max(1, min(rows, cap)) if cap else rows


def _row_blocks(x: np.ndarray, rows: np.ndarray | None, block: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(start, stop, x_block)`` over ``x`` (all rows, as views) or over ``x[rows]`` (gathered)."""
    n = x.shape[0] if rows is None else len(rows)
    for start in range(0, n, block):
        stop = min(start + block, n)
        yield start, stop, (x[start:stop] if rows is None else x[rows[start:stop]])


def _sq_norms(x: np.ndarray, rows: np.ndarray | None, block: int) -> np.ndarray:
    n = x.shape[0] if rows is None else len(rows)
    out = np.empty(n, dtype=x.dtype)
    for start, stop, xb in _row_blocks(x, rows, block):
        np.einsum("ij,ij->i", xb, xb, out=out[start:stop])
    return out


# ----------------------------------------------------------------------------------------------------------
# Dimension reduction
# ----------------------------------------------------------------------------------------------------------


def reduce_features(
    features: np.ndarray,
    dim: int,
    *,
    method: ReduceMethod = "random",
    seed: int | None = 0,
    rows: ArrayLike | None = None,
    sample_rows: int = 20_000,
    batch_rows: int | None = None,
) -> np.ndarray:
    """Project features to ``dim`` dimensions for fast greedy selection.

    Parameters
    ----------
    features : ndarray, shape (N, D), floating
        Read in row blocks; never copied whole.
    dim : int
        Output dimension, ``1 <= dim <= D``.
    method : {"random", "pca"}
        ``"pca"``: the top-``dim`` principal axes of ``sample_rows`` rows drawn with ``seed`` (a
        distance-contracting orthogonal projection: every projected distance is <= the original one).
        ``"random"``: a Gaussian Johnson-Lindenstrauss projection, entries ``N(0, 1/dim)`` drawn with
        ``seed`` (squared distances preserved in expectation, relative spread ~ ``sqrt(2/dim)``).
    seed : int or None
        Seed of the PCA sample or of the random matrix.
    rows : bool mask (N,) or index array, optional
        Project only these rows (in ascending index order). Default: all rows.
    sample_rows : int
        PCA sample size.
    batch_rows : int, optional
        Rows per block; default keeps each block under 16 MB.

    Returns
    -------
    reduced : ndarray, shape (len(rows) or N, dim), float32
        Centred (the projected mean is subtracted, which changes no distance but keeps float32 norms small).

    Examples
    --------
    >>> x = np.random.default_rng(0).standard_normal((1000, 32)).astype(np.float32)
    >>> reduce_features(x, 8).shape
    (1000, 8)
    """
    features = _check_features(features)
    n, d = features.shape
    if not 1 <= int(dim) <= d:
        raise InvalidInputError(f"dim must be in [1, {d}], got {dim}")
    dim = int(dim)
    row_idx = None if rows is None else _as_indices(rows, n, "rows")
    if row_idx is not None and len(row_idx) == n:
        row_idx = None
    n_out = n if row_idx is None else len(row_idx)
    rng = np.random.default_rng(seed)
    if method == "random":
        matrix = (rng.standard_normal((d, dim)) / math.sqrt(dim)).astype(np.float32)
    elif method == "pca":
        pool = np.arange(n) if row_idx is None else row_idx
        take = min(int(sample_rows), len(pool))
        if take < 2:
            raise InvalidInputError("PCA needs at least 2 rows")
        sample_idx = np.sort(rng.choice(pool, size=take, replace=False))
        sample = features[sample_idx].astype(np.float64)
        sample -= sample.mean(axis=0)
        cov = sample.T @ sample / (take - 1)
        from scipy.linalg import eigh  # heavy-ish import only when PCA is used

        _, vectors = eigh(cov, subset_by_index=[d - dim, d - 1])
        matrix = np.ascontiguousarray(vectors[:, ::-1]).astype(np.float32)  # largest variance first
    else:
        raise InvalidInputError(f"method must be 'pca' or 'random', got {method!r}")
    out = np.empty((n_out, dim), dtype=np.float32)
    block = _block_rows(d, batch_rows)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows are refused just below
        for start, stop, xb in _row_blocks(features, row_idx, block):
            if xb.dtype == np.float32:
                np.matmul(xb, matrix, out=out[start:stop])
            else:
                out[start:stop] = xb @ matrix
    # a NaN / inf row projects to a non-finite row, which the centring below would spread to every row
    _require_finite(out.sum(axis=1), row_idx, "projected")
    out -= out.mean(axis=0, dtype=np.float64).astype(np.float32)
    return out


# ----------------------------------------------------------------------------------------------------------
# Greedy k-center
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoresetSelection:
    """Result of :func:`select_coreset`.

    Attributes
    ----------
    indices : ndarray, shape (k,), int64
        Selected rows of ``features`` in the order the greedy picked them.
    coverage_radius : float
        ``max`` over the candidate pool of the distance to the nearest centre (labelled + selected), in the
        units of the space the selection ran in (see ``radius_space``). Computed by the greedy loop for free.
    seconds : float
        Wall time of the whole call, projection included.
    radius_space : str
        ``"original"``, or ``"pca-<dim>"`` / ``"random-<dim>"`` when ``reduce_dim`` was used: then the radius
        is measured in the reduced space; call :func:`coverage_radius` for the original-space value.
    labelled_representatives : int
        How many labelled rows were used as initial centres (fewer than labelled when ``max_labelled``
        subsampled them).
    """

    indices: np.ndarray
    coverage_radius: float
    seconds: float
    radius_space: str = "original"
    labelled_representatives: int = 0
    extra: dict = field(default_factory=dict)


def _min_dist_to_set(
    x: np.ndarray, rows: np.ndarray | None, sq_rows: np.ndarray, centre_idx: np.ndarray, block_cap: int | None,
    centres_are: str = "labelled",
) -> np.ndarray:
    """Squared distance of every row of ``x`` (or of ``x[rows]``) to its nearest row of ``x[centre_idx]``.

    Works in (row block x centre block) tiles of at most ``_BLOCK_ELEMENTS`` numbers each.
    """
    n = x.shape[0] if rows is None else len(rows)
    d = x.shape[1]
    best = np.full(n, np.inf, dtype=x.dtype)
    centre_block = max(1, min(len(centre_idx), 2048, _BLOCK_ELEMENTS // max(d, 1)))
    row_block = _block_rows(max(centre_block, d), block_cap)
    for c0 in range(0, len(centre_idx), centre_block):
        centres = x[centre_idx[c0:c0 + centre_block]]
        sq_c = np.einsum("ij,ij->i", centres, centres)
        _require_finite(sq_c, centre_idx[c0:c0 + centre_block], centres_are)
        minus_2c = np.ascontiguousarray((-2 * centres).T)
        for start, stop, xb in _row_blocks(x, rows, row_block):
            # min_c ||x - c||^2 = ||x||^2 + min_c (||c||^2 - 2 x.c): ||x||^2 is added once, after the min
            tile = xb @ minus_2c
            tile += sq_c[None, :]
            np.minimum(best[start:stop], tile.min(axis=1), out=best[start:stop])
    best += sq_rows
    np.maximum(best, 0, out=best)
    return best


def _greedy(
    x: np.ndarray,
    cand: np.ndarray,
    centres0: np.ndarray,
    k: int,
    *,
    first: FirstCentre,
    rng: np.random.Generator,
    block_cap: int | None,
) -> tuple[np.ndarray, float]:
    """Core loop: ``k`` rows of ``x[cand]`` chosen greedily given initial centres ``x[centres0]``.

    Returns the chosen row indices of ``x`` and the final squared coverage radius over ``cand``.
    """
    n, d = x.shape
    sparse = len(cand) < _SPARSE_FRACTION * n
    # "sparse": work on the gathered candidate rows; "dense": scan all rows, non-candidates masked with -inf.
    rows = cand if sparse else None
    block = _block_rows(d, block_cap)
    sq = _sq_norms(x, rows, block)
    if not sparse and not np.isfinite(sq).all() and np.isfinite(sq[cand]).all():
        # a non-finite row outside the pool would turn the masked distances into NaN: work on the pool only
        sparse, rows = True, cand
        sq = sq[cand]
    _require_finite(sq if sparse else sq[cand], cand, "candidate")
    m = len(sq)
    mask_out = None
    if not sparse and len(cand) < n:
        mask_out = np.ones(n, dtype=bool)
        mask_out[cand] = False

    if len(centres0):
        min_d = _min_dist_to_set(x, rows, sq, centres0, block_cap)
    else:
        min_d = np.full(m, np.inf, dtype=x.dtype)
    if mask_out is not None:
        min_d[mask_out] = -np.inf
    position = cand if sparse else np.arange(n)  # local position -> row of x

    def update(row: int) -> None:
        centre = np.array(x[row], copy=True)
        csq = centre @ centre
        if sparse:
            dots = np.empty(m, dtype=x.dtype)
            for start, stop, xb in _row_blocks(x, rows, block):
                np.dot(xb, centre, out=dots[start:stop])
        else:
            dots = x @ centre
        dots *= -2
        dots += sq
        dots += csq
        np.minimum(min_d, dots, out=min_d)

    chosen = np.empty(k, dtype=np.int64)
    start_j = 0
    if not len(centres0) and k > 0:
        if first == "random":
            local = int(rng.integers(len(cand))) if sparse else int(cand[rng.integers(len(cand))])
        elif first == "farthest_from_mean":
            mean = np.zeros(d, dtype=np.float64)
            for _, _, xb in _row_blocks(x, rows if sparse or mask_out is None else cand, block):
                mean += xb.sum(axis=0, dtype=np.float64)
            mean = (mean / len(cand)).astype(x.dtype)
            dm = np.empty(m, dtype=x.dtype)
            for start, stop, xb in _row_blocks(x, rows, block):
                np.dot(xb, mean, out=dm[start:stop])
            dm *= -2
            dm += sq
            if mask_out is not None:
                dm[mask_out] = -np.inf
            local = int(np.argmax(dm))
        else:
            raise InvalidInputError(f"first must be 'farthest_from_mean' or 'random', got {first!r}")
        chosen[0] = position[local]
        min_d[local] = -np.inf
        update(int(position[local]))
        start_j = 1
    for j in range(start_j, k):
        local = int(np.argmax(min_d))
        chosen[j] = position[local]
        min_d[local] = -np.inf  # a centre is never picked twice (its true distance is 0)
        update(int(position[local]))
    remaining = float(min_d.max()) if m else 0.0
    return chosen, max(remaining, 0.0)


def select_coreset(
    features: np.ndarray,
    labelled: ArrayLike | None,
    k: int,
    *,
    candidates: ArrayLike | None = None,
    seed: int | None = 0,
    first: FirstCentre = "farthest_from_mean",
    reduce_dim: int | None = None,
    reduce_method: ReduceMethod = "random",
    max_labelled: int | None = None,
    batch_rows: int | None = None,
) -> CoresetSelection:
    """Greedy k-center (Coreset) selection of ``k`` unlabelled rows, with timing and coverage radius.

    Parameters
    ----------
    features : ndarray, shape (N, D), floating (float32 normally)
        Classifier features of every cell; read in place, never copied whole (a ``np.memmap`` works). The
        candidate and labelled rows must be finite (else :class:`~colabel.errors.InvalidInputError`).
    labelled : bool mask (N,) or index array or None
        Rows already labelled: the initial centres. Never selected.
    k : int
        Number of rows to select, an integer ``0 <= k <= len(pool)``; more than the pool, or not an integer
        (a float, a bool, None), raises :class:`~colabel.errors.InvalidInputError`.
    candidates : bool mask (N,) or index array, optional
        The unlabelled pool to select from and to cover. Default: every row not in ``labelled``. Labelled rows
        in ``candidates`` are removed from it.
    seed : int >= 0 or None
        Seeds ``first="random"`` and the projection of ``reduce_dim``.
    first : {"farthest_from_mean", "random"}
        Only used when nothing is labelled: the first centre is the candidate farthest from the candidates'
        mean (deterministic, default) or a candidate drawn with ``seed``.
    reduce_dim : int, optional
        Select in a ``reduce_dim``-dimensional projection (see :func:`reduce_features`) of the candidate and
        labelled rows. 64 dims: 4-7x faster at 1M x 1280; the coverage radius in the original space grows by
        8-20% (measured, see the module docstring).
    reduce_method : {"random", "pca"}
        Projection used with ``reduce_dim``; ``"random"`` covered far better than PCA in the measurements.
    max_labelled : int, optional
        If more rows than this are labelled, use ``max_labelled`` representatives of them as initial centres,
        chosen by greedy k-center *within* the labelled set. Approximation: with ``r`` the representatives'
        coverage radius of the labelled set, every initial distance is over-estimated by at most ``r``
        (triangle inequality); ``r`` is reported in ``extra["labelled_radius"]``. Default: exact, all labelled
        rows, at a cost of ``N x n_labelled x D`` multiply-adds.
    batch_rows : int, optional
        Cap on rows per block (default: blocks of at most 16 MB).

    Returns
    -------
    CoresetSelection

    Examples
    --------
    >>> x = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [5.0, 0.0]], dtype=np.float32)
    >>> select_coreset(x, [0], 2).indices.tolist()
    [2, 3]
    """
    t0 = time.perf_counter()
    features = _check_features(features)
    n = features.shape[0]
    lab = _as_indices(labelled, n, "labelled")
    if candidates is None:
        keep = np.ones(n, dtype=bool)
        keep[lab] = False
        cand = np.flatnonzero(keep).astype(np.int64)
    else:
        cand = np.setdiff1d(_as_indices(candidates, n, "candidates"), lab, assume_unique=True)
    k = _check_k(k)
    if k < 0:
        raise InvalidInputError(f"k must be >= 0, got {k}")
    if k > len(cand):
        raise InvalidInputError(f"k={k} is larger than the unlabelled pool ({len(cand)} candidates)")
    seed = _check_seed(seed)
    rng = np.random.default_rng(seed)
    extra: dict = {}

    if max_labelled is not None and len(lab) > int(max_labelled):
        # Representatives of the labelled set: greedy k-center within it (the first one farthest from mean).
        sub = features if reduce_dim is None else None
        if sub is None:
            lab_x = reduce_features(features, int(reduce_dim), method=reduce_method, seed=seed, rows=lab,
                                    batch_rows=batch_rows)
            rep_local, r2 = _greedy(lab_x, np.arange(len(lab)), np.empty(0, np.int64), int(max_labelled),
                                    first="farthest_from_mean", rng=rng, block_cap=batch_rows)
        else:
            rep_rows, r2 = _greedy(features, lab, np.empty(0, np.int64), int(max_labelled),
                                   first="farthest_from_mean", rng=rng, block_cap=batch_rows)
            rep_local = np.searchsorted(lab, rep_rows)
        extra["labelled_radius"] = math.sqrt(r2)
        lab_used = np.sort(lab[rep_local])
    else:
        lab_used = lab

    if reduce_dim is None:
        chosen, r2 = _greedy(features, cand, lab_used, k, first=first, rng=rng, block_cap=batch_rows)
        space = "original"
    else:
        in_union = np.zeros(n, dtype=bool)
        in_union[cand] = True
        in_union[lab_used] = True
        union = np.flatnonzero(in_union)
        reduced = reduce_features(features, int(reduce_dim), method=reduce_method, seed=seed,
                                  rows=None if len(union) == n else in_union, batch_rows=batch_rows)
        local, r2 = _greedy(reduced, np.searchsorted(union, cand), np.searchsorted(union, lab_used), k,
                            first=first, rng=rng, block_cap=batch_rows)
        chosen = union[local]
        space = f"{reduce_method}-{int(reduce_dim)}"
    return CoresetSelection(
        indices=chosen,
        coverage_radius=math.sqrt(r2),
        seconds=time.perf_counter() - t0,
        radius_space=space,
        labelled_representatives=len(lab_used),
        extra=extra,
    )


def k_center_greedy(
    features: np.ndarray,
    labelled: ArrayLike | None,
    k: int,
    *,
    candidates: ArrayLike | None = None,
    seed: int | None = 0,
    first: FirstCentre = "farthest_from_mean",
    reduce_dim: int | None = None,
    reduce_method: ReduceMethod = "random",
    max_labelled: int | None = None,
    batch_rows: int | None = None,
) -> np.ndarray:
    """Greedy k-center: the ``k`` candidate rows chosen one by one as farthest from all current centres.

    Same parameters as :func:`select_coreset`, which also returns the coverage radius and timing.

    Returns
    -------
    indices : ndarray, shape (k,), int64
        Rows of ``features`` in pick order.

    Examples
    --------
    >>> x = np.array([[0.0], [1.0], [2.0], [9.0], [10.0]], dtype=np.float32)
    >>> k_center_greedy(x, np.array([True, False, False, False, False]), 2).tolist()
    [4, 2]
    """
    return select_coreset(features, labelled, k, candidates=candidates, seed=seed, first=first,
                          reduce_dim=reduce_dim, reduce_method=reduce_method, max_labelled=max_labelled,
                          batch_rows=batch_rows).indices


def coverage_radius(
    features: np.ndarray,
    centres: ArrayLike,
    *,
    candidates: ArrayLike | None = None,
    batch_rows: int | None = None,
) -> float:
    """Exact coverage radius ``max_{i in candidates} min_{c in centres} ||x_i - x_c||`` in feature space.

    Parameters
    ----------
    features : ndarray, shape (N, D), floating
    centres : bool mask (N,) or index array
        E.g. labelled rows plus a selection.
    candidates : bool mask (N,) or index array, optional
        Rows to cover; default every row not in ``centres``.
    batch_rows : int, optional
        Cap on rows per block.

    Returns
    -------
    radius : float
        In the units of ``features``; ``inf`` if ``centres`` is empty, 0 if there is nothing to cover.

    Examples
    --------
    >>> coverage_radius(np.array([[0.0], [3.0], [4.0]]), [0])
    4.0
    """
    features = _check_features(features)
    n = features.shape[0]
    cen = _as_indices(centres, n, "centres")
    if candidates is None:
        keep = np.ones(n, dtype=bool)
        keep[cen] = False
        cand = np.flatnonzero(keep)
    else:
        cand = _as_indices(candidates, n, "candidates")
    if len(cand) == 0:
        return 0.0
    if len(cen) == 0:
        return math.inf
    rows = None if len(cand) == n else cand
    sq = _sq_norms(features, rows, _block_rows(features.shape[1], batch_rows))
    _require_finite(sq, rows, "candidate")
    return math.sqrt(float(_min_dist_to_set(features, rows, sq, cen, batch_rows, "centre").max()))


# ----------------------------------------------------------------------------------------------------------
# Patches
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    """One cell of the regular grid over an image, in pixels, ``xy`` convention, end-exclusive.

    ``row``, ``col`` index the grid (reading order = row-major); the patch covers ``x0 <= x < x1`` and
    ``y0 <= y < y1``; edge patches are clipped to the image, so they can be smaller than ``patch_size``.
    """

    row: int
    col: int
    x0: int
    y0: int
    x1: int
    y1: int


@dataclass(frozen=True)
class PatchChoice(Patch):
    """The patch holding most selected cells.

    ``count`` selected cells lie in it; ``selected_in_patch`` are their indices (into the centroid array
    of their image), in the order they appear in ``selected``. ``image_id`` is set by
    :func:`select_patch_multi`, ``None`` otherwise.
    """

    count: int = 0
    selected_in_patch: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    image_id: Hashable | None = None


def _pixel_pair(value, name: str, *, scalar: bool) -> tuple[int, int]:
    """The first two entries of ``value`` (``(value, value)`` for a single number when ``scalar``) as whole
    numbers of pixels in ``1 .. MAX_IMAGE_SIDE``; else :class:`InvalidInputError` naming ``name`` and ``value``."""
    item = value[()] if isinstance(value, np.ndarray) and value.ndim == 0 else value
    if scalar and not isinstance(item, (str, bytes, dict)) and not hasattr(item, "__len__"):
        items: tuple = (item, item)
    elif isinstance(item, (str, bytes, dict)) or not hasattr(item, "__len__"):
        items = ()
    else:
        items = tuple(item)
    ok = len(items) == 2 if scalar else len(items) >= 2
    ok = ok and all(not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, np.integer))
                    and 1 <= v <= MAX_IMAGE_SIDE for v in items[:2])
    if not ok:
        form = "an integer or (h, w)" if scalar else "(H, W)"
        raise InvalidInputError(f"{name} must be {form}, whole numbers of pixels from 1 to {MAX_IMAGE_SIDE}, "
                                f"got {_short(value)}")
    return int(items[0]), int(items[1])


def _shape_and_patch(image_shape, patch_size) -> tuple[int, int, int, int]:
    """``(H, W, h, w)`` from ``image_shape`` ``(H, W, ...)`` and ``patch_size`` ``h`` or ``(h, w)``: positive
    whole pixels, else :class:`InvalidInputError` naming the argument."""
    height, width = _pixel_pair(image_shape, "image_shape", scalar=False)
    ph, pw = _pixel_pair(patch_size, "patch_size", scalar=True)
    return height, width, ph, pw


def grid(image_shape: tuple[int, int], patch_size: int | tuple[int, int]) -> list[Patch]:
    """The regular grid of patches over an image, in reading order (row-major).

    Parameters
    ----------
    image_shape : (H, W)
        Image height and width in pixels (extra trailing dimensions, e.g. channels, are ignored).
    patch_size : int or (h, w)
        Patch height and width in pixels; the last row / column of patches is clipped to the image.

    Returns
    -------
    patches : list of Patch
        ``ceil(H / h) * ceil(W / w)`` patches, at most :data:`MAX_GRID_PATCHES` (one million; more raises
        :class:`~colabel.errors.InvalidInputError`).

    Examples
    --------
    >>> [(p.row, p.col, p.x1, p.y1) for p in grid((3, 5), 3)]
    [(0, 0, 3, 3), (0, 1, 5, 3)]
    """
    height, width, ph, pw = _shape_and_patch(image_shape, patch_size)
    n = -(-height // ph) * -(-width // pw)
    if n > MAX_GRID_PATCHES:
        raise InvalidInputError(f"a grid of {n} patches is more than {MAX_GRID_PATCHES}: use a larger patch_size "
                                f"than {(ph, pw)} for a {height} x {width} image")
    return [
        Patch(row=r, col=c, x0=c * pw, y0=r * ph, x1=min((c + 1) * pw, width), y1=min((r + 1) * ph, height))
        for r in range(-(-height // ph))
        for c in range(-(-width // pw))
    ]


def _patch_counts(centroids_xy, selected, image_shape, patch_size):
    """The occupied patches: ``(cells, counts, flat, sel, geometry)`` with ``cells`` the sorted reading-order
    indices of the patches holding a selected cell and ``counts`` their counts (``np.unique``: memory grows with
    the selection, not with the grid), ``flat`` each selected cell's patch."""
    height, width, ph, pw = _shape_and_patch(image_shape, patch_size)
    try:
        xy = np.asarray(centroids_xy, dtype=np.float64)
        sel = np.asarray(selected if selected is not None else [])
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"centroids_xy must be numbers of shape (N, 2) and selected integer indices: "
                                f"{' '.join(str(exc).split())}") from None
    if xy.size == 0 and xy.ndim == 1:
        xy = xy.reshape(0, 2)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise InvalidInputError(f"centroids_xy must have shape (N, 2), got {xy.shape}")
    if sel.size == 0:
        sel = sel.astype(np.int64)
    if sel.dtype.kind not in "iu":
        raise InvalidInputError(f"selected must be integer indices, got dtype {sel.dtype}")
    sel = sel.astype(np.int64).ravel()
    if sel.size and (sel.min() < 0 or sel.max() >= len(xy)):
        raise InvalidInputError(f"selected has indices outside [0, {len(xy)})")
    pts = xy[sel]
    if pts.size and (not np.isfinite(pts).all() or (pts < 0).any() or (pts[:, 0] > width).any()
                     or (pts[:, 1] > height).any()):
        raise InvalidInputError(f"selected centroids must lie inside the image [0, {width}] x [0, {height}]")
    n_rows, n_cols = -(-height // ph), -(-width // pw)
    # x == W (a centroid on the right/bottom border) belongs to the last patch.
    col = np.minimum((pts[:, 0] // pw).astype(np.int64), n_cols - 1)
    row = np.minimum((pts[:, 1] // ph).astype(np.int64), n_rows - 1)
    flat = row * n_cols + col
    cells, counts = np.unique(flat, return_counts=True)
    return cells, counts, flat, sel, (height, width, ph, pw, n_cols)


def _choice(cells, counts, flat, sel, geometry, image_id=None) -> PatchChoice:
    """The occupied patch with most selected cells; ties: first in reading order (``cells`` is sorted)."""
    height, width, ph, pw, n_cols = geometry
    top = int(np.argmax(counts))
    best = int(cells[top])
    r, c = divmod(best, n_cols)
    return PatchChoice(
        row=r, col=c, x0=c * pw, y0=r * ph, x1=min((c + 1) * pw, width), y1=min((r + 1) * ph, height),
        count=int(counts[top]), selected_in_patch=sel[flat == best], image_id=image_id,
    )


def select_patch(
    centroids_xy: ArrayLike,
    selected: ArrayLike,
    *,
    image_shape: tuple[int, int],
    patch_size: int | tuple[int, int],
) -> PatchChoice:
    """The grid patch holding most of the selected cells (ties: first in reading order).

    Parameters
    ----------
    centroids_xy : array-like, shape (N, 2)
        Cell centroids in pixels, ``(x, y)`` = (column, row), origin at the image's top-left corner
        (colabel's ``xy`` convention). A centroid ``x`` in ``[c*w, (c+1)*w)`` is in grid column ``c``; one
        exactly on the right/bottom border (``x == W``) counts in the last patch.
    selected : array-like of int
        Indices into ``centroids_xy`` (e.g. a Coreset selection restricted to this image). Must be non-empty.
    image_shape : (H, W)
        Image size in pixels: integers in ``1 .. MAX_IMAGE_SIDE`` (extra trailing entries are ignored).
    patch_size : int or (h, w)
        Patch size in pixels (integers, at least 1); edge patches are clipped to the image.

    Returns
    -------
    PatchChoice
        Grid position, pixel box (end-exclusive), count and the selected indices inside it.

    Notes
    -----
    Only the patches that hold a selected cell are counted (``np.unique`` of their grid positions), so time and
    memory grow with ``selected``, whatever the number of patches in the grid (1 px patches over a
    40,000 x 40,000 image cost as little as 128 px ones).

    Examples
    --------
    >>> xy = np.array([[10, 10], [150, 20], [160, 30], [20, 150]])
    >>> p = select_patch(xy, [0, 1, 2, 3], image_shape=(200, 300), patch_size=128)
    >>> (p.row, p.col, p.count, p.selected_in_patch.tolist())
    (0, 1, 2, [1, 2])
    """
    cells, counts, flat, sel, geometry = _patch_counts(centroids_xy, selected, image_shape, patch_size)
    if sel.size == 0:
        raise InvalidInputError("selected is empty: there is no patch to guide the annotator to")
    return _choice(cells, counts, flat, sel, geometry)


def select_patch_multi(
    centroids_by_image: Mapping[Hashable, ArrayLike],
    selected_by_image: Mapping[Hashable, ArrayLike],
    *,
    image_shapes: Mapping[Hashable, tuple[int, int]],
    patch_size: int | tuple[int, int],
) -> PatchChoice:
    """:func:`select_patch` over several images (e.g. the tiles or fields of one slide).

    Parameters
    ----------
    centroids_by_image : mapping image_id -> array (N_i, 2)
        Centroids per image, ``xy`` pixels of that image.
    selected_by_image : mapping image_id -> int indices
        Selected cells per image (indices into that image's centroids); missing ids mean none selected.
    image_shapes : mapping image_id -> (H, W)
    patch_size : int or (h, w)

    Returns
    -------
    PatchChoice
        With ``image_id`` set. Ties between images go to the image that comes first in
        ``centroids_by_image``'s iteration order, then to reading order within it.

    Examples
    --------
    >>> c = {"a": np.array([[5, 5]]), "b": np.array([[5, 5], [6, 6]])}
    >>> select_patch_multi(c, {"a": [0], "b": [0, 1]}, image_shapes={"a": (64, 64), "b": (64, 64)},
    ...                    patch_size=32).image_id
    'b'
    """
    best: PatchChoice | None = None
    for image_id, xy in centroids_by_image.items():
        sel = selected_by_image.get(image_id)
        if sel is None or np.size(sel) == 0:
            continue
        if image_id not in image_shapes:
            raise InvalidInputError(f"image_shapes has no entry for image {image_id!r}")
        cells, counts, flat, sel_idx, geometry = _patch_counts(xy, sel, image_shapes[image_id], patch_size)
        if best is None or int(counts.max()) > best.count:
            best = _choice(cells, counts, flat, sel_idx, geometry, image_id=image_id)
    unknown = set(selected_by_image) - set(centroids_by_image)
    if unknown:
        raise InvalidInputError(f"selected_by_image names images without centroids: {sorted(map(str, unknown))}")
    if best is None:
        raise InvalidInputError("no image has a selected cell: there is no patch to guide the annotator to")
    return best


# ----------------------------------------------------------------------------------------------------------
# Synthetic features and benchmarks
# ----------------------------------------------------------------------------------------------------------


def synthetic_features(
    n: int,
    d: int,
    *,
    n_clusters: int = 40,
    intrinsic_dim: int = 16,
    centre_scale: float = 3.0,
    spread: float = 1.0,
    noise: float = 0.3,
    seed: int = 0,
    out: np.ndarray | None = None,
    batch_rows: int = 65_536,
) -> tuple[np.ndarray, np.ndarray]:
    """Clustered float32 features that mimic CNN embeddings of cells, generated block by block.

    Generator (all draws from ``np.random.default_rng(seed)``):

    * ``n_clusters`` cluster weights ~ Dirichlet(1, ..., 1) (imbalanced cell types);
    * centre ``mu_k ~ N(0, centre_scale^2 / d * I_d)`` (so ``||mu_k - mu_l|| ~ sqrt(2) * centre_scale``);
    * within cluster ``k``: a ``intrinsic_dim``-dimensional manifold, ``z ~ N(0, diag(s_j^2))`` with a
      decaying spectrum ``s_j = spread / sqrt(j + 1)``, mapped by a random ``B_k ~ N(0, 1/d)``
      (``intrinsic_dim x d``), plus isotropic noise ``N(0, noise^2 / d * I_d)`` (norm ~ ``noise``).

    Parameters
    ----------
    n, d : int
        Rows and dimensions.
    out : ndarray (n, d) float32, optional
        Preallocated destination (e.g. for the 5 GB benchmark matrix); written in place.
    batch_rows : int
        Rows generated per block (bounds temporaries to ``batch_rows x d``).

    Returns
    -------
    features : ndarray, shape (n, d), float32
    cluster : ndarray, shape (n,), int32
        The generating cluster of each row.
    """
    rng = np.random.default_rng(seed)
    if out is None:
        out = np.empty((n, d), dtype=np.float32)
    elif out.shape != (n, d) or out.dtype != np.float32:
        raise InvalidInputError(f"out must be float32 of shape {(n, d)}, got {out.dtype} {out.shape}")
    weights = rng.dirichlet(np.ones(n_clusters))
    centres = (rng.standard_normal((n_clusters, d)) * centre_scale / math.sqrt(d)).astype(np.float32)
    scales = spread / np.sqrt(np.arange(1, intrinsic_dim + 1))
    bases = (rng.standard_normal((n_clusters, intrinsic_dim, d)) / math.sqrt(d)).astype(np.float32)
    cluster = rng.choice(n_clusters, size=n, p=weights).astype(np.int32)
    noise_scale = np.float32(noise / math.sqrt(d))
    for start in range(0, n, batch_rows):
        stop = min(start + batch_rows, n)
        block = out[start:stop]
        rng.standard_normal(out=block, dtype=np.float32)
        block *= noise_scale
        z = (rng.standard_normal((stop - start, intrinsic_dim)) * scales).astype(np.float32)
        lab = cluster[start:stop]
        for c in np.unique(lab):
            rows = np.flatnonzero(lab == c)
            block[rows] += centres[c] + z[rows] @ bases[c]
    return out, cluster


def _peak_rss_bytes() -> int:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def bench_coreset(
    n: int = 1_000_000,
    d: int = 1280,
    k: int = 100,
    reduce_dim: int | None = 64,
    seed: int = 0,
    *,
    n_labelled: int = 200,
    reduce_method: ReduceMethod = "random",
    features: np.ndarray | None = None,
    verbose: bool = True,
) -> dict:
    """Time and memory of one selection of ``k`` out of ``n`` synthetic ``d``-dim float32 features.

    The features (``n * d * 4`` bytes, 5.1 GB at the default) are generated block by block into one
    preallocated array by :func:`synthetic_features` (not timed); pass ``features`` to reuse a matrix across
    calls. ``n_labelled`` random rows are labelled. Reported: wall seconds of :func:`select_coreset`
    (projection included), the peak of Python/numpy allocations during the selection (``tracemalloc``; BLAS
    scratch is not counted) and the process' peak RSS (``ru_maxrss``, includes the feature matrix).

    Returns
    -------
    result : dict
        ``n, d, k, reduce_dim, seconds, selection_peak_bytes, peak_rss_bytes, features_bytes,
        coverage_radius, radius_space, indices``.
    """
    import tracemalloc

    if features is None:
        features = np.empty((n, d), dtype=np.float32)
        synthetic_features(n, d, seed=seed, out=features)
    n, d = features.shape
    labelled = np.random.default_rng(seed + 1).choice(n, size=min(n_labelled, n - k), replace=False)
    tracemalloc.start()
    tracemalloc.reset_peak()
    selection = select_coreset(features, labelled, k, seed=seed, reduce_dim=reduce_dim,
                               reduce_method=reduce_method)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    result = {
        "n": n, "d": d, "k": k, "reduce_dim": reduce_dim, "reduce_method": reduce_method if reduce_dim else None,
        "n_labelled": len(labelled), "seconds": selection.seconds, "selection_peak_bytes": int(traced_peak),
        "peak_rss_bytes": _peak_rss_bytes(), "features_bytes": int(features.nbytes),
        "coverage_radius": selection.coverage_radius, "radius_space": selection.radius_space,
        "indices": selection.indices.tolist(),
    }
    if verbose:
        print(f"coreset n={n} d={d} k={k} reduce_dim={reduce_dim} ({result['reduce_method']}): "
              f"{selection.seconds:.2f} s, selection peak {traced_peak / 2**20:.0f} MiB, "
              f"process peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB "
              f"(features {features.nbytes / 2**30:.2f} GiB), radius {selection.coverage_radius:.3f} "
              f"[{selection.radius_space}]")
    return result


def bench_quality(
    n: int = 100_000,
    d: int = 1280,
    k: int = 100,
    dims: tuple[int, ...] = (16, 32, 64, 128),
    methods: tuple[str, ...] = ("pca", "random"),
    seed: int = 0,
    *,
    n_labelled: int = 200,
    features: np.ndarray | None = None,
    verbose: bool = True,
) -> list[dict]:
    """Coverage radius in the ORIGINAL space of reduced-dimension selections vs the full-dimension one.

    Runs on :func:`synthetic_features` (or ``features``) with ``n_labelled`` random labelled rows; each row
    of the result has ``method, dim, seconds, radius`` (original space) and ``ratio`` = radius / full-dim
    radius (1.0 = no loss; greedy k-center is only a 2-approximation, so a ratio slightly below 1 can occur).
    """
    if features is None:
        features, _ = synthetic_features(n, d, seed=seed)
    n = features.shape[0]
    labelled = np.random.default_rng(seed + 1).choice(n, size=min(n_labelled, n - k), replace=False)
    rows = []
    full = select_coreset(features, labelled, k, seed=seed)
    base = coverage_radius(features, np.concatenate([labelled, full.indices]))
    rows.append({"method": "full", "dim": features.shape[1], "seconds": full.seconds, "radius": base, "ratio": 1.0})
    for method in methods:
        for dim in dims:
            sel = select_coreset(features, labelled, k, seed=seed, reduce_dim=dim, reduce_method=method)
            radius = coverage_radius(features, np.concatenate([labelled, sel.indices]))
            rows.append({"method": method, "dim": dim, "seconds": sel.seconds, "radius": radius,
                         "ratio": radius / base})
    if verbose:
        for row in rows:
            print(f"{row['method']:>6} dim={row['dim']:>5}: {row['seconds']:.2f} s, radius {row['radius']:.4f}, "
                  f"x{row['ratio']:.3f} of full")
    return rows


if __name__ == "__main__":  # pragma: no cover - manual benchmark
    import argparse

    parser = argparse.ArgumentParser(description="Coreset k-center greedy benchmark")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=1280)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--reduce-dim", type=int, default=64, help="0 = full dimension")
    parser.add_argument("--quality", action="store_true", help="run bench_quality instead")
    args = parser.parse_args()
    if args.quality:
        bench_quality(n=args.n, d=args.d, k=args.k)
    else:
        bench_coreset(args.n, args.d, args.k, args.reduce_dim or None)
