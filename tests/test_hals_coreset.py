"""Coreset (greedy k-center) selection and patch guidance of HALS: ``colabel.services.hals.coreset``.

No timing is asserted here; speed is measured by ``bench_coreset`` (see the module docstring).
"""

from __future__ import annotations

import numpy as np
import pytest

from colabel.errors import InvalidInputError
from colabel.services.hals.coreset import (
    bench_coreset,
    coverage_radius,
    grid,
    k_center_greedy,
    reduce_features,
    select_coreset,
    select_patch,
    select_patch_multi,
    synthetic_features,
)

pytestmark = pytest.mark.unit


def naive_greedy(x: np.ndarray, labelled, k: int, candidates=None) -> list[int]:
    """Textbook k-center greedy in float64 with explicit loops (the reference)."""
    x = np.asarray(x, dtype=np.float64)
    centres = list(labelled)
    pool = [i for i in (range(len(x)) if candidates is None else candidates) if i not in set(labelled)]
    chosen: list[int] = []
    for _ in range(k):
        best, best_i = -1.0, None
        for i in pool:
            if i in chosen:
                continue
            d = min(float(((x[i] - x[c]) ** 2).sum()) for c in centres)
            if d > best:
                best, best_i = d, i
        chosen.append(best_i)
        centres.append(best_i)
    return chosen


# ------------------------------------------------------------------------------------------------ greedy


def test_picks_the_known_farthest_points_in_order():
    x = np.array([[0], [1], [2], [3], [10], [11], [20]], dtype=np.float32)
    # from {0}: 20 is farthest; then 10 (10 from both 0 and 20); then 3 (3 from 0, 7 from 10)
    assert k_center_greedy(x, [0], 3).tolist() == [6, 4, 3]
    # the same with a boolean mask
    mask = np.zeros(7, dtype=bool)
    mask[0] = True
    assert k_center_greedy(x, mask, 3).tolist() == [6, 4, 3]


def test_two_dimensional_hand_case_and_radius():
    x = np.array([[0, 0], [4, 0], [0, 3], [4, 3], [2, 1.5]], dtype=np.float32)
    # labelled = the centre point; the four corners are all 2.5 away -> the tie goes to the lowest index (0);
    # then (4, 0), (0, 3), (4, 3) are still 2.5 from the centre (nearer than to (0, 0)) -> index 1
    sel = select_coreset(x, [4], 2)
    assert sel.indices.tolist() == [0, 1]
    assert sel.coverage_radius == pytest.approx(2.5, rel=1e-6)
    assert sel.radius_space == "original"


@pytest.mark.parametrize("n_cand", [None, 40])  # dense path (all rows) and sparse path (gathered pool)
def test_matches_textbook_greedy(n_cand):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 9)).astype(np.float32)
    labelled = rng.choice(400, 12, replace=False)
    cand = None
    if n_cand:
        cand = np.sort(rng.choice(np.setdiff1d(np.arange(400), labelled), n_cand, replace=False))
    got = k_center_greedy(x, labelled, 15, candidates=cand).tolist()
    assert got == naive_greedy(x, labelled.tolist(), 15, None if cand is None else cand.tolist())


def test_labelled_points_are_never_picked_even_if_listed_as_candidates():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 4)).astype(np.float32)
    labelled = np.arange(0, 200, 2)
    sel = k_center_greedy(x, labelled, 100, candidates=np.arange(200))  # k = the whole unlabelled pool
    assert sorted(sel.tolist()) == list(range(1, 200, 2))
    # duplicates of labelled points (distance 0) are still only picked once everything else is taken
    dup = np.vstack([x, x[:5]])
    sel = k_center_greedy(dup, np.arange(200), 5)
    assert sorted(sel.tolist()) == [200, 201, 202, 203, 204]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_refused_so_labelled_rows_are_never_selected(bad):
    from colabel.services.hals.service import CoresetService

    x = np.array([[0, 0], [1, 0], [2, 0], [5, 0], [3, 0]], dtype=np.float32)
    in_pool = x.copy()
    in_pool[2, 0] = bad
    with pytest.raises(InvalidInputError, match="features must be finite: 1 candidate row.*first at row 2"):
        k_center_greedy(in_pool, [0], 2)
    with pytest.raises(InvalidInputError, match="features must be finite: 1 candidate row"):
        CoresetService().select(in_pool, [True, False, False, False, False], 3)  # the public RPC
    with pytest.raises(InvalidInputError, match="features must be finite: 1 labelled row.*first at row 2"):
        k_center_greedy(in_pool, [2], 2)
    with pytest.raises(InvalidInputError, match="features must be finite"):
        coverage_radius(in_pool, [0])
    # a row outside the pool is never read, on the dense path (most rows are candidates) and the sparse one
    assert k_center_greedy(in_pool, [0], 2, candidates=[1, 3, 4]).tolist() == [3, 4]
    big = np.random.default_rng(0).standard_normal((400, 3)).astype(np.float32)
    big[7] = bad
    pool = np.setdiff1d(np.arange(400), [0, 7])
    expected = k_center_greedy(np.delete(big, 7, axis=0), [0], 5, candidates=np.arange(1, 399))
    got = k_center_greedy(big, [0], 5, candidates=pool)
    assert got.tolist() == [i + (i >= 7) for i in expected.tolist()]
    with pytest.raises(InvalidInputError, match="features must be finite: 1 projected row.*first at row 7"):
        k_center_greedy(big, [0], 5, reduce_dim=2)


def test_k_larger_than_pool_raises_and_k_equal_returns_the_pool():
    x = np.arange(10, dtype=np.float32)[:, None]
    with pytest.raises(InvalidInputError, match="larger than the unlabelled pool"):
        k_center_greedy(x, [0, 1], 9)
    assert sorted(k_center_greedy(x, [0, 1], 8).tolist()) == list(range(2, 10))
    sel = select_coreset(x, [0, 1], 8)
    assert sel.coverage_radius == 0.0
    assert k_center_greedy(x, [0], 0).tolist() == []
    with pytest.raises(InvalidInputError):
        k_center_greedy(x, [0], -1)


def test_nothing_labelled_first_centre():
    x = np.array([[0.0], [1.0], [2.0], [3.0], [-10.0]], dtype=np.float32)
    # mean = -0.8: -10 is farthest from it, then 3 (13 away)
    assert k_center_greedy(x, None, 2).tolist() == [4, 3]
    a = k_center_greedy(x, None, 3, first="random", seed=5)
    b = k_center_greedy(x, None, 3, first="random", seed=5)
    assert a.tolist() == b.tolist()
    firsts = {int(k_center_greedy(x, None, 1, first="random", seed=s)[0]) for s in range(30)}
    assert len(firsts) > 1  # the seed really drives the first pick
    with pytest.raises(InvalidInputError):
        k_center_greedy(x, None, 1, first="middle")


def test_inputs_are_validated_and_not_mutated(tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    before = x.copy()
    k_center_greedy(x, [1, 2], 5, reduce_dim=2)
    np.testing.assert_array_equal(x, before)
    with pytest.raises(InvalidInputError):
        k_center_greedy(x[:, 0], [0], 1)
    with pytest.raises(InvalidInputError):
        k_center_greedy(x.astype(np.int32), [0], 1)
    with pytest.raises(InvalidInputError):
        k_center_greedy(x, np.zeros(49, dtype=bool), 1)
    with pytest.raises(InvalidInputError):
        k_center_greedy(x, [50], 1)
    # a read-only memmap works (the service keeps features on disk)
    np.save(tmp_path / "f.npy", x)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    assert k_center_greedy(mm, [1, 2], 5).tolist() == k_center_greedy(x, [1, 2], 5).tolist()


def test_coverage_radius_matches_brute_force():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 6)).astype(np.float32)
    centres = [3, 50, 77]
    d = np.sqrt(((x[:, None, :].astype(np.float64) - x[centres][None]) ** 2).sum(-1)).min(1)
    d[centres] = 0
    assert coverage_radius(x, centres) == pytest.approx(d.max(), rel=1e-4)
    sel = select_coreset(x, centres, 10)
    assert sel.coverage_radius == pytest.approx(coverage_radius(x, np.r_[centres, sel.indices]), rel=1e-4)
    assert coverage_radius(x, []) == np.inf
    assert coverage_radius(x, np.arange(300)) == 0.0


def test_max_labelled_uses_representatives():
    x, _ = synthetic_features(3000, 32, seed=2)
    labelled = np.arange(0, 3000, 3)  # 1000 labelled
    exact = select_coreset(x, labelled, 20)
    same = select_coreset(x, labelled, 20, max_labelled=1000)
    assert same.indices.tolist() == exact.indices.tolist()
    approx = select_coreset(x, labelled, 20, max_labelled=100)
    assert approx.labelled_representatives == 100
    assert not set(approx.indices.tolist()) & set(labelled.tolist())
    r = approx.extra["labelled_radius"]
    reps = _representatives(x, labelled, 100)
    assert r == pytest.approx(coverage_radius(x, reps, candidates=labelled), rel=1e-3)
    # the documented bound: distances to representatives over-estimate the true ones by at most r
    true = coverage_radius(x, np.r_[labelled, approx.indices])
    assert true <= approx.coverage_radius + 1e-4
    assert approx.coverage_radius <= true + r + 1e-4
    reduced = select_coreset(x, labelled, 20, max_labelled=100, reduce_dim=8)
    assert reduced.labelled_representatives == 100 and reduced.radius_space == "random-8"
    assert not set(reduced.indices.tolist()) & set(labelled.tolist())


def _representatives(x, labelled, m):
    """The representatives select_coreset uses: greedy k-center inside the labelled set."""
    return k_center_greedy(x, None, m, candidates=labelled).tolist()


# ------------------------------------------------------------------------------------------ reduction


def test_reduce_dim_keeps_coverage_within_measured_factor():
    """Measured on 8 seeds of this 20k x 256 set (k=50, 50 labelled): random-64 / full radius 1.11..1.21
    (mean 1.16), random-32 1.11..1.29; a random subset of 50 gives 1.35. Bound: 1.3."""
    x, _ = synthetic_features(20_000, 256, seed=0)
    labelled = np.random.default_rng(1).choice(20_000, 50, replace=False)
    full = k_center_greedy(x, labelled, 50)
    base = coverage_radius(x, np.r_[labelled, full])
    reduced = select_coreset(x, labelled, 50, reduce_dim=64, seed=0)
    assert reduced.radius_space == "random-64"
    ratio = coverage_radius(x, np.r_[labelled, reduced.indices]) / base
    assert 0.8 < ratio <= 1.3
    pool = np.setdiff1d(np.arange(20_000), labelled)
    random_pick = np.random.default_rng(2).choice(pool, 50, replace=False)
    random_ratio = coverage_radius(x, np.r_[labelled, random_pick]) / base  # measured 1.35
    assert random_ratio > ratio + 0.1
    # deterministic for a seed, different projection for another seed
    again = select_coreset(x, labelled, 50, reduce_dim=64, seed=0)
    assert again.indices.tolist() == reduced.indices.tolist()
    other = select_coreset(x, labelled, 50, reduce_dim=64, seed=1)
    assert other.indices.tolist() != reduced.indices.tolist()


def test_reduce_features_properties():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2000, 128)).astype(np.float32)
    i, j = rng.integers(0, 2000, 500), rng.integers(0, 2000, 500)
    keep = i != j
    i, j = i[keep], j[keep]
    d0 = np.linalg.norm(x[i] - x[j], axis=1)
    pca = reduce_features(x, 16, method="pca")
    assert pca.shape == (2000, 16) and pca.dtype == np.float32
    assert np.all(np.linalg.norm(pca[i] - pca[j], axis=1) <= d0 * (1 + 1e-4))  # orthogonal projection contracts
    rp = reduce_features(x, 96, method="random", seed=0)
    ratio = np.linalg.norm(rp[i] - rp[j], axis=1) / d0
    assert abs(np.median(ratio) - 1) < 0.05 and ratio.min() > 0.6 and ratio.max() < 1.4  # JL: ~sqrt(2/96) spread
    assert np.allclose(rp.mean(axis=0), 0, atol=1e-4)
    rows = np.arange(0, 2000, 7)
    sub = reduce_features(x, 96, method="random", seed=0, rows=rows)
    # the same projection, only a different centring shift
    np.testing.assert_allclose(sub - sub[0], rp[rows] - rp[rows[0]], atol=1e-4)
    with pytest.raises(InvalidInputError):
        reduce_features(x, 0)
    with pytest.raises(InvalidInputError):
        reduce_features(x, 16, method="umap")


def test_synthetic_features_deterministic_and_in_place():
    a, ca = synthetic_features(1000, 48, seed=3)
    out = np.empty((1000, 48), dtype=np.float32)
    b, cb = synthetic_features(1000, 48, seed=3, out=out, batch_rows=128)
    assert b is out
    np.testing.assert_array_equal(ca, cb)
    # same clusters; the block size changes the draw order, so compare cluster-level structure
    assert len(np.unique(ca)) > 10
    within = np.mean([a[ca == c].std(axis=0).sum() for c in np.unique(ca) if (ca == c).sum() > 5])
    between = a.std(axis=0).sum()
    assert within < between
    c2, _ = synthetic_features(1000, 48, seed=3)
    np.testing.assert_array_equal(a, c2)


def test_bench_coreset_small_run():
    out = bench_coreset(n=4000, d=32, k=10, reduce_dim=8, n_labelled=20, verbose=False)
    assert len(out["indices"]) == 10 and len(set(out["indices"])) == 10
    assert out["features_bytes"] == 4000 * 32 * 4
    assert out["seconds"] > 0 and out["selection_peak_bytes"] > 0 and out["peak_rss_bytes"] > 0
    assert out["radius_space"] == "random-8"


# --------------------------------------------------------------------------------------------- patches


def test_grid_covers_non_square_image_with_clipped_edges():
    patches = grid((300, 500), (128, 200))  # H=300, W=500
    assert len(patches) == 3 * 3
    assert [(p.row, p.col) for p in patches[:4]] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    last = patches[-1]
    assert (last.x0, last.y0, last.x1, last.y1) == (400, 256, 500, 300)
    area = sum((p.x1 - p.x0) * (p.y1 - p.y0) for p in patches)
    assert area == 300 * 500
    with pytest.raises(InvalidInputError):
        grid((0, 10), 4)
    with pytest.raises(InvalidInputError):
        grid((10, 10), 0)


def test_select_patch_picks_the_densest_cell():
    xy = np.array([
        [10, 10],     # (0, 0)
        [300, 50],    # (0, 1) with W=400, patch 256: x 256..400 is the clipped second column
        [399, 255],   # (0, 1)
        [260, 100],   # (0, 1)
        [20, 290],    # (1, 0)
        [30, 280],    # (1, 0)
    ])
    choice = select_patch(xy, [0, 1, 2, 3, 4, 5], image_shape=(300, 400), patch_size=256)
    assert (choice.row, choice.col, choice.count) == (0, 1, 3)
    assert (choice.x0, choice.y0, choice.x1, choice.y1) == (256, 0, 400, 256)
    assert choice.selected_in_patch.tolist() == [1, 2, 3]
    assert choice.image_id is None
    # only the selected cells count, in the order of the selection
    choice = select_patch(xy, [5, 4, 1], image_shape=(300, 400), patch_size=256)
    assert (choice.row, choice.col, choice.count) == (1, 0, 2)
    assert choice.selected_in_patch.tolist() == [5, 4]


def test_select_patch_ties_go_to_reading_order_and_borders():
    xy = np.array([[150, 10], [10, 150], [199.99, 0], [0, 199.99]], dtype=float)
    # (0, 1) and (1, 0) tie with one cell each: (0, 1) comes first in row-major order
    choice = select_patch(xy, [1, 0], image_shape=(200, 200), patch_size=100)
    assert (choice.row, choice.col) == (0, 1)
    # centroids exactly on the right / bottom border belong to the last patch
    edge = np.array([[200.0, 200.0], [200.0, 199.0]])
    choice = select_patch(edge, [0, 1], image_shape=(200, 200), patch_size=(64, 96))
    assert (choice.row, choice.col, choice.count) == (3, 2, 2)
    assert (choice.x1, choice.y1) == (200, 200)
    with pytest.raises(InvalidInputError, match="inside the image"):
        select_patch(np.array([[201.0, 5.0]]), [0], image_shape=(200, 200), patch_size=100)
    with pytest.raises(InvalidInputError, match="empty"):
        select_patch(xy, [], image_shape=(200, 200), patch_size=100)
    with pytest.raises(InvalidInputError):
        select_patch(xy, [7], image_shape=(200, 200), patch_size=100)


def test_select_patch_multi_over_a_slide():
    centroids = {
        "tile-a": np.array([[10, 10], [20, 20], [500, 500]]),
        "tile-b": np.array([[5, 5], [6, 6], [7, 7], [900, 10]]),
        "tile-c": np.array([[1, 1]]),
    }
    shapes = {"tile-a": (600, 600), "tile-b": (512, 1024), "tile-c": (64, 64)}
    choice = select_patch_multi(centroids, {"tile-a": [0, 1, 2], "tile-b": [0, 1, 2, 3]},
                                image_shapes=shapes, patch_size=256)
    assert choice.image_id == "tile-b"
    assert (choice.row, choice.col, choice.count) == (0, 0, 3)
    assert choice.selected_in_patch.tolist() == [0, 1, 2]
    # tie between images: the first in the mapping's order wins
    tie = select_patch_multi(centroids, {"tile-c": [0], "tile-a": [2]}, image_shapes=shapes, patch_size=256)
    assert tie.image_id == "tile-a"
    with pytest.raises(InvalidInputError):
        select_patch_multi(centroids, {"tile-z": [0]}, image_shapes=shapes, patch_size=256)
    with pytest.raises(InvalidInputError):
        select_patch_multi(centroids, {}, image_shapes=shapes, patch_size=256)
    with pytest.raises(InvalidInputError):
        select_patch_multi(centroids, {"tile-a": [0]}, image_shapes={}, patch_size=256)


def test_coreset_then_patch_end_to_end():
    """Cells in one dense corner and a few far-off outliers: the coreset covers the outliers first, and the
    patch guidance then goes to where most of the selection lies."""
    rng = np.random.default_rng(7)
    n = 500
    xy = rng.uniform(0, 1000, size=(n, 2))
    features = rng.normal(0, 0.1, size=(n, 8)).astype(np.float32)
    odd = np.flatnonzero((xy[:, 0] > 750) & (xy[:, 1] < 250))[:6]  # cells in patch (0, 3)
    features[odd] += rng.normal(0, 5, size=(len(odd), 8)).astype(np.float32)
    sel = k_center_greedy(features, [0], 6)
    assert set(sel.tolist()) == set(odd.tolist())
    choice = select_patch(xy, sel, image_shape=(1000, 1000), patch_size=250)
    assert (choice.row, choice.col, choice.count) == (0, 3, 6)


# ------------------------------------------------------------------------------------------- bounds and input


def test_select_patch_memory_does_not_depend_on_the_number_of_patches():
    """1 px patches over a 10^6 x 10^6 (or 10^9 x 10^9) image used to allocate a count per patch: numpy's
    MemoryError for 7.28 TiB (6.94 EiB); just under the machine's memory, a real allocation and an OOM kill."""
    import tracemalloc

    xy = np.array([[10.5, 10.5], [10.2, 10.9], [999_999.5, 3.5], [20.5, 999_999.0]])
    tracemalloc.start()
    try:
        for side in (10**6, 10**9):
            choice = select_patch(xy, [0, 1, 2, 3], image_shape=(side, side), patch_size=1)
            assert (choice.row, choice.col, choice.count) == (10, 10, 2)
            assert (choice.x0, choice.y0, choice.x1, choice.y1) == (10, 10, 11, 11)
            assert choice.selected_in_patch.tolist() == [0, 1]
            tie = select_patch(xy, [3, 2], image_shape=(side, side), patch_size=1)
            assert (tie.row, tie.col) == (3, 999_999)  # ties: first in reading order, as before
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # under 1 MiB: counts grow with the selection, not the grid
    multi = select_patch_multi({"a": xy}, {"a": [0, 1, 2]}, image_shapes={"a": (10**6, 10**6)}, patch_size=1)
    assert (multi.image_id, multi.row, multi.col, multi.count) == ("a", 10, 10, 2)


def test_grid_refuses_more_than_a_million_patches():
    from colabel.services.hals.coreset import MAX_GRID_PATCHES

    assert MAX_GRID_PATCHES == 1_000_000
    assert len(grid((1000, 1000), 1)) == 1_000_000
    with pytest.raises(InvalidInputError, match=r"a grid of 1002001 patches is more than 1000000: use a larger "
                                                r"patch_size than \(1, 1\) for a 1001 x 1001 image"):
        grid((1001, 1001), 1)
    with pytest.raises(InvalidInputError, match="more than 1000000"):
        grid((10**9, 10**9), 1)


@pytest.mark.parametrize("image_shape", [None, "ab", "12", 100, (100,), (0, 10), (-5, 10), (100.0, 100), (100, 12.5),
                                         (True, 100), (2**31 + 1, 10), (10**12, 10**12), (None, 100), {"h": 1, "w": 2}])
def test_image_shape_must_be_positive_whole_pixels(image_shape):
    xy = np.array([[1.0, 1.0]])
    with pytest.raises(InvalidInputError, match=r"image_shape must be \(H, W\), whole numbers of pixels from 1 to "
                                                r"2147483648, got "):
        select_patch(xy, [0], image_shape=image_shape, patch_size=8)
    with pytest.raises(InvalidInputError, match=r"image_shape must be \(H, W\)"):
        grid(image_shape, 8)


@pytest.mark.parametrize("patch_size", [None, "x", "8", 0, -1, 12.5, float("nan"), True, (8,), (8, 8, 8), (8, 0),
                                        (8.0, 8), 2**31 + 1])
def test_patch_size_must_be_positive_whole_pixels(patch_size):
    xy = np.array([[1.0, 1.0]])
    with pytest.raises(InvalidInputError, match=r"patch_size must be an integer or \(h, w\), whole numbers of "
                                                r"pixels from 1 to 2147483648, got "):
        select_patch(xy, [0], image_shape=(100, 100), patch_size=patch_size)


def test_valid_shapes_and_patch_sizes_of_every_integer_kind_still_work():
    xy = np.array([[50.0, 20.0]])
    for image_shape, patch_size in [((100, 100, 3), 32), (np.array([100, 100]), np.int64(32)),
                                    ([np.int32(100), 100], (np.int16(32), 32)), ((100, 100), np.array(32)),
                                    ((100, 100), np.array([32, 32]))]:
        choice = select_patch(xy, [0], image_shape=image_shape, patch_size=patch_size)
        assert (choice.row, choice.col, choice.x0, choice.y0, choice.x1, choice.y1) == (0, 1, 32, 0, 64, 32)


#: case -> (method, its arguments from (features f, labelled mask b, centroids c), the sentence expected)
MALFORMED_CORESET_CALLS = {
    "select-k-None": ("select", lambda f, b, c: (f, b, None), "k must be an integer number of cells, got None"),
    "select-k-nan": ("select", lambda f, b, c: (f, b, float("nan")), "k must be an integer number of cells, got nan"),
    "select-k-bool": ("select", lambda f, b, c: (f, b, True), "k must be an integer number of cells, got True"),
    "select-k-str": ("select", lambda f, b, c: (f, b, "x"), "k must be an integer number of cells, got 'x'"),
    "select-k-float": ("select", lambda f, b, c: (f, b, 2.5), "k must be an integer number of cells, got 2.5"),
    "select-seed-str": ("select", lambda f, b, c: (f, b, 3, "x"), "seed must be a non-negative integer, got 'x'"),
    "select-seed-negative": ("select", lambda f, b, c: (f, b, 3, -1), "seed must be a non-negative integer"),
    "select-features-str": ("select", lambda f, b, c: ("abc", b, 3), r"features must be a numeric \(N, D\) array"),
    "select-features-ragged": ("select", lambda f, b, c: ([[1.0, 2.0], [3.0]], [False, False], 1), "inhomogeneous"),
    "select-labelled-indices": ("select", lambda f, b, c: (f, [0, 1, 2], 3), "labelled must be a bool vector of len"),
    "select-labelled-strings": ("select", lambda f, b, c: (f, ["a"] * len(f), 3), "labelled must be a bool vector"),
    "select-labelled-ragged": ("select", lambda f, b, c: (f, [[True], [False, True]], 3), "labelled must be a bool"),
    "select-labelled-None": ("select", lambda f, b, c: (f, None, 3), "labelled must be a bool vector"),
    "next_patch-image_shape-None": ("next_patch", lambda f, b, c: (f, b, c, None, 64, 3), r"image_shape must be \("),
    "next_patch-patch_size-str": ("next_patch", lambda f, b, c: (f, b, c, [100, 100], "x", 3), "patch_size must be"),
    "next_patch-patch_size-float": ("next_patch", lambda f, b, c: (f, b, c, [100, 100], 12.5, 3), "patch_size must"),
    "next_patch-centroids-str": ("next_patch", lambda f, b, c: (f, b, "ab", [100, 100], 64, 3), "centroids_xy must"),
    "next_patch-k-None": ("next_patch", lambda f, b, c: (f, b, c, [100, 100], 64, None), "k must be an integer"),
    # checked even when every cell is labelled (nothing to select, so nothing else would look at them)
    "next_patch-all-labelled-bad-shape": ("next_patch", lambda f, b, c: (f, np.ones(len(f), bool), c, None, 64, 3),
                                          r"image_shape must be \("),
}


@pytest.mark.parametrize("case", list(MALFORMED_CORESET_CALLS))
def test_malformed_coreset_service_arguments_are_invalid_input_sentences(case):
    """Each of these used to escape as numpy's or int()'s raw ValueError / TypeError (or, for a float k or patch
    size, a bool k, an index list or strings as ``labelled``, to be silently reinterpreted)."""
    from colabel.services.hals.service import CoresetService

    method, arguments, message = MALFORMED_CORESET_CALLS[case]
    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 4)).astype(np.float32)
    labelled = np.zeros(50, bool)
    labelled[:5] = True
    centroids = rng.uniform(0, 100, (50, 2))
    with pytest.raises(InvalidInputError, match=message) as caught:
        getattr(CoresetService(), method)(*arguments(features, labelled, centroids))
    assert "\n" not in str(caught.value)  # a remote caller reads the last line only


def test_coreset_service_still_takes_what_the_provider_sends():
    """The provider's own call (bool mask, list image shape, int patch size, k, seed) and 0 / 1 integers as the
    mask, float64 or integer features (used as float32, as before), and k <= 0 or k above the pool."""
    from colabel.services.hals.service import CoresetService

    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 4))
    labelled = np.zeros(50, bool)
    labelled[:5] = True
    centroids = rng.uniform(0, 100, (50, 2))
    service = CoresetService()
    expected = k_center_greedy(features.astype(np.float32), labelled, 3)
    assert service.select(features, labelled, 3).tolist() == expected.tolist()
    assert service.select(features.astype(np.float32), labelled.astype(int), np.int64(3)).tolist() == expected.tolist()
    assert service.select(features, labelled.tolist(), 3, None).tolist() == expected.tolist()
    assert service.select((features * 100).astype(np.int32), labelled, 3).shape == (3,)
    assert service.select(features, labelled, 0).tolist() == [] and service.select(features, labelled, -2).size == 0
    assert len(service.select(features, labelled, 10**30)) == 45
    patch = service.next_patch(features, labelled, centroids, [100, 100], 64, 3, 0)
    assert patch["selected"] == expected.tolist() and patch["count"] >= 1
    assert service.next_patch(features, np.ones(50, bool), centroids, (100, 100, 3))["row"] is None
