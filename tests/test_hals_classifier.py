"""The HALS head, its ensemble and the online labelling policy, on real features of real cells.

No per-cell class labels exist offline, so they are derived from the stains of the real IHC image
(``tests/data/ihc_ki67.png``, DAB + hematoxylin): nuclei are segmented on the hematoxylin channel
(``skimage.color.rgb2hed``, Otsu, watershed), and a nucleus is "DAB-positive" when the mean DAB optical
density in the 11 x 11 pixels around its centroid is above the Otsu threshold of those means (the brown
epithelium of the glands versus the blue stroma: 377 nuclei, about half each). Features are the real
ImageNet EfficientNet-Lite0 features of 40 px patches. The heads only ever see the features.
"""

from __future__ import annotations

import threading
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import scipy.ndimage as ndi
from skimage import color, filters, measure, morphology, segmentation
from skimage.feature import peak_local_max

from colabel.errors import InvalidInputError
from colabel.services.hals.classifier import (
    Ensemble,
    Head,
    NotReadyError,
    OnlineClassifier,
    Suggestion,
    TrainReport,
    bench_retrain,
    train_head,
)
from colabel.services.hals.features import EfficientNetLite0Features, extract_patches

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data"


def ihc_nuclei(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[x, y] centroids of hematoxylin-stained nuclei and the mean DAB density around each."""
    hed = color.rgb2hed(image)
    hema, dab = hed[..., 0], hed[..., 2]
    smooth = filters.gaussian(hema, 1)
    fg = morphology.opening(smooth > filters.threshold_otsu(smooth), morphology.disk(1))
    fg = morphology.remove_small_objects(fg, max_size=25)
    dist = ndi.distance_transform_edt(fg)
    peaks = peak_local_max(filters.gaussian(dist, 1), min_distance=4, labels=measure.label(fg))
    markers = np.zeros(fg.shape, int)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = segmentation.watershed(-dist, markers, mask=fg)
    rc = np.array([p.centroid for p in measure.regionprops(labels) if p.area >= 20])
    local_dab = ndi.uniform_filter(dab, 11)[rc[:, 0].astype(int), rc[:, 1].astype(int)]
    return rc[:, ::-1] + 0.5, local_dab


@pytest.fixture(scope="module")
def cells():
    """(features (N, 1280), DAB-positive labels (N,), local DAB (N,)) of the real IHC nuclei."""
    image = iio.imread(DATA / "ihc_ki67.png")[..., :3]
    xy, dab = ihc_nuclei(image)
    labels = (dab > filters.threshold_otsu(dab)).astype(np.int64)
    features = EfficientNetLite0Features()(extract_patches(image, xy))
    assert len(labels) > 300 and 0.35 < labels.mean() < 0.65
    return features, labels, dab


def stratified_halves(y: np.ndarray, seed: int) -> np.ndarray:
    """Boolean test mask: half of every class."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: len(idx) // 2]] = True
    return test


# --------------------------------------------------------------------------------------------- heads


def test_ensemble_beats_chance_on_held_out_real_cells(cells):
    x, y, _ = cells
    accuracies = []
    for seed in (0, 1):
        test = stratified_halves(y, seed)
        ens = Ensemble().fit(x[~test], y[~test], n_classes=2, seed=seed)
        classes, confidence = ens.predict(x[test])
        accuracies.append((classes == y[test]).mean())
        assert len(ens.members) == 5 and 0.6 < ens.validation_accuracy <= 1
        assert ((confidence >= 0.5) & (confidence <= 1)).all()
    # Measured 0.86 +- 0.02 over 5 splits (chance 0.5); the margin absorbs split-to-split variation.
    assert min(accuracies) >= 0.75, accuracies


def test_single_head_standardises_with_train_statistics(cells):
    x, y, _ = cells
    head = train_head(x, y, n_classes=2, seed=3)
    assert isinstance(head, Head) and head.dim == 1280 and head.n_classes == 2
    assert head.mean.shape == head.std.shape == (1280,) and (head.std > 0).all()
    # Stored statistics are those of the training split (75 %), not of all rows.
    assert head.n_train + head.n_val == len(y) and abs(head.n_val - round(0.25 * len(y))) <= 2
    assert not np.allclose(head.mean, x.mean(axis=0))
    p = head.predict_proba(x)
    assert p.shape == (len(y), 2) and np.allclose(p.sum(axis=1), 1, atol=1e-5)
    assert head.embed(x).shape == (len(y), 32) and (head.embed(x) >= 0).all()
    assert 0.6 < head.val_accuracy <= 1 and 1 <= head.best_epoch <= head.epochs


def test_oversampling_keeps_the_minority_class_alive(cells):
    x, y, _ = cells
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        neg, pos = rng.permutation(np.flatnonzero(y == 0)), rng.permutation(np.flatnonzero(y == 1))
        train = np.r_[neg[:135], pos[:15]]  # 90 / 10
        ens = Ensemble().fit(x[train], y[train], n_classes=2, seed=seed)
        minority_recall = (ens.predict(x[pos[15:]])[0] == 1).mean()
        majority_recall = (ens.predict(x[neg[135:]])[0] == 0).mean()
        # Measured 0.79-0.92 minority recall over 5 draws; without balancing it collapses towards 0.
        assert minority_recall >= 0.5 and majority_recall >= 0.5, (minority_recall, majority_recall)


def test_early_stopping_stops_before_max_epochs_and_keeps_the_best_weights():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 60)
    x = rng.normal(0, 1, (120, 64)).astype(np.float32)
    x[:, :4] += 4 * y[:, None]  # an easy, separable problem
    head = train_head(x, y, n_classes=2, seed=0, max_epochs=500)
    assert head.stopped_early and head.epochs < 500
    assert head.epochs == head.best_epoch + 10  # patience: 10 epochs without improvement
    assert head.val_accuracy == 1.0
    capped = train_head(x, y, n_classes=2, seed=0, max_epochs=3)
    assert capped.epochs == 3 and not capped.stopped_early


def test_three_or_more_classes(cells):
    x, _, dab = cells
    y3 = np.digitize(dab, np.quantile(dab, [1 / 3, 2 / 3]))  # DAB tertiles
    test = stratified_halves(y3, 0)
    ens = Ensemble().fit(x[~test], y3[~test], n_classes=3, n_members=3)
    p = ens.predict_proba(x[test])
    assert p.shape == (test.sum(), 3) and np.allclose(p.sum(axis=1), 1, atol=1e-5)
    assert (ens.predict(x[test])[0] == y3[test]).mean() >= 0.5  # measured 0.63-0.71; chance 0.33
    # Four well-separated synthetic clusters: all classes predicted.
    rng = np.random.default_rng(1)
    y4 = np.repeat(np.arange(4), 30)
    x4 = rng.normal(0, 1, (120, 16)).astype(np.float32) + 5 * np.eye(4, 16)[y4]
    ens4 = Ensemble().fit(x4, y4, n_classes=4, n_members=3)
    assert (ens4.predict(x4)[0] == y4).mean() > 0.95


def test_ensemble_is_the_mean_of_its_members(cells):
    x, y, _ = cells
    ens = Ensemble().fit(x[:200], y[:200], n_classes=2, seeds=[11, 12, 13])
    assert [h.seed for h in ens.members] == [11, 12, 13]
    member = np.stack([h.predict_proba(x[200:]) for h in ens.members])
    np.testing.assert_allclose(ens.predict_proba(x[200:]), member.mean(axis=0), rtol=1e-4, atol=1e-5)
    emb = np.stack([h.embed(x[200:]) for h in ens.members])
    np.testing.assert_allclose(ens.embed(x[200:], how="mean"), emb.mean(axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ens.embed(x[200:]), np.concatenate(list(emb), axis=1), rtol=1e-4, atol=1e-4)
    assert ens.embed(x[200:]).shape == (len(x) - 200, 96)  # concat is the default
    assert ens.validation_accuracy == pytest.approx(np.mean([h.val_accuracy for h in ens.members]))
    u = ens.uncertainty(x[200:])
    d = ens.uncertainty(x[200:], kind="disagreement")
    assert u.shape == d.shape == (len(x) - 200,)
    assert (u >= 0).all() and (u <= 1).all() and (d >= 0).all() and (d <= u + 1e-6).all()
    # The least confident cells are the most uncertain ones.
    _, conf = ens.predict(x[200:])
    assert np.corrcoef(conf, u)[0, 1] < -0.9
    # Same seeds, same data: the same ensemble.
    again = Ensemble().fit(x[:200], y[:200], n_classes=2, seeds=[11, 12, 13])
    np.testing.assert_array_equal(again.predict_proba(x[200:]), ens.predict_proba(x[200:]))


def test_coreset_features_do_not_depend_on_the_order_of_each_members_hidden_units(tmp_path):
    """Permuting a head's hidden units leaves the network's function as it is: the features ClassifierService
    gives Coreset (``predict``'s ``embedding``), their distances and the Coreset selection must not change."""
    import dataclasses

    from colabel.services.hals.coreset import k_center_greedy
    from colabel.services.hals.service import ClassifierService, store_model

    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    x = rng.normal(0, 1, (200, 16)).astype(np.float32)
    x[:, :4] += 1.5 * y[:, None]
    ens = Ensemble().fit(x[:60], y[:60], n_classes=2, n_members=2, seed=0)
    h = ens.members[1]
    p1, p2 = rng.permutation(32), rng.permutation(32)
    permuted = dataclasses.replace(h, w1=h.w1[:, p1], b1=h.b1[p1], w2=h.w2[p1][:, p2], b2=h.b2[p2], w3=h.w3[p2])
    same = Ensemble.from_members([ens.members[0], permuted])
    np.testing.assert_allclose(same.predict_proba(x), ens.predict_proba(x), atol=1e-5)

    service = ClassifierService(str(tmp_path), n_members=2)
    store_model(tmp_path, "original", ens)
    store_model(tmp_path, "permuted", same)
    a, b = (service.predict(m, x)["embedding"] for m in ("original", "permuted"))
    assert a.shape == (200, 64)

    def distances(e):
        return np.linalg.norm(e[:, None] - e[None], axis=-1)

    np.testing.assert_allclose(distances(a), distances(b), atol=1e-4)
    labelled = np.arange(60)
    assert k_center_greedy(a, labelled, 10).tolist() == k_center_greedy(b, labelled, 10).tolist()


def test_mini_batches_work_too(cells):
    x, y, _ = cells
    test = stratified_halves(y, 2)
    ens = Ensemble().fit(x[~test], y[~test], n_classes=2, n_members=3, batch_size=32, lr=0.02)
    assert (ens.predict(x[test])[0] == y[test]).mean() >= 0.75


# ---------------------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error(cells):
    x, y, _ = cells
    x, y = x[:60], y[:60]
    with pytest.raises(InvalidInputError, match=r"labels must lie in 0\.\.1 .*found 2"):
        train_head(x, np.where(np.arange(60) == 5, 2, y), n_classes=2)
    with pytest.raises(InvalidInputError, match="found -1"):
        Ensemble().fit(x, np.where(np.arange(60) == 5, -1, y), n_classes=2)
    with pytest.raises(InvalidInputError, match="at least 2 classes"):
        train_head(x, np.zeros(60, int), n_classes=1)
    with pytest.raises(InvalidInputError, match="class 1 has 0"):
        train_head(x, np.zeros(60, int), n_classes=2)  # only one class present
    bad = x.copy()
    bad[7, 3] = np.nan
    with pytest.raises(InvalidInputError, match="NaN or inf .*row 7"):
        Ensemble().fit(bad, y, n_classes=2)
    with pytest.raises(InvalidInputError, match="59 labels for 60 feature rows"):
        train_head(x, y[:59], n_classes=2)
    with pytest.raises(InvalidInputError, match=r"shape \(N, D\)"):
        train_head(x[None], y, n_classes=2)
    with pytest.raises(InvalidInputError, match="integer class indices"):
        train_head(x, y + 0.5, n_classes=2)
    with pytest.raises(InvalidInputError, match="unknown training options"):
        train_head(x, y, n_classes=2, learning_rate=0.1)
    ens = Ensemble().fit(x, y, n_classes=2, n_members=2)
    with pytest.raises(InvalidInputError, match="1280 columns"):
        ens.predict(x[:, :100])
    with pytest.raises(InvalidInputError, match="NaN"):
        ens.predict_proba(bad)
    with pytest.raises(NotReadyError):
        Ensemble().predict(x)


def small_set(n: int = 40, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, d) float32, labels (n,) of 2 classes) that a 2-head ensemble trains on in milliseconds."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % 2
    return (rng.normal(0, 1, (n, d)) + y[:, None]).astype(np.float32), y


def test_n_classes_above_the_limit_is_refused_before_anything_is_allocated(tmp_path):
    """``n_classes=10**12`` used to reach ``np.bincount(minlength=n_classes)``: a 7 TiB MemoryError (or, just
    under the machine's memory, a real allocation that gets the replica OOM-killed)."""
    from colabel.services.hals.classifier import MAX_CLASSES
    from colabel.services.hals.service import ClassifierService

    x, y = small_set()
    assert MAX_CLASSES == 1000
    for n_classes in (10**12, 10**9, MAX_CLASSES + 1):
        with pytest.raises(InvalidInputError, match=f"n_classes must be at most 1000, got {n_classes}"):
            Ensemble().fit(x, y, n_classes=n_classes)
        with pytest.raises(InvalidInputError, match="n_classes must be at most 1000"):
            ClassifierService(str(tmp_path), n_members=2).fit(x, y, n_classes)
    # 1000 itself is allowed: the call goes on to the label checks
    with pytest.raises(InvalidInputError, match="class 2 has 0"):
        Ensemble().fit(x, y, n_classes=MAX_CLASSES)


#: case -> (method, its arguments from (features x, labels y, model id m), the sentence expected)
MALFORMED_CLASSIFIER_CALLS = {
    "fit-features-str": ("fit", lambda x, y, m: ("abc", y, 2), r"features must be a numeric \(N, D\) array: could not"),
    "fit-features-ragged": ("fit", lambda x, y, m: ([[1, 2], [3]], [0, 1], 2), r"\(N, D\) array: .*inhomogeneous"),
    "fit-labels-ragged": ("fit", lambda x, y, m: (x, [[0, 1], [1]], 2), r"labels must be a vector \(N,\)"),
    "fit-labels-1e30": ("fit", lambda x, y, m: (x, np.full(len(y), 1e30), 2), r"lie in 0\.\.1 .*found 1e\+30"),
    "fit-seed-str": ("fit", lambda x, y, m: (x, y, 2, "x"), "seed must be an integer, got 'x'"),
    "fit-seed-2**70": ("fit", lambda x, y, m: (x, y, 2, 2**70), r"seed must lie in 0\.\.281474976710655"),
    "fit-seed-negative": ("fit", lambda x, y, m: (x, y, 2, -1), r"seed must lie in 0\.\."),
    "fit-seed-None": ("fit", lambda x, y, m: (x, y, 2, None), "seed must be an integer, got None"),
    "fit-n_classes-bool": ("fit", lambda x, y, m: (x, y, True), "n_classes must be an integer"),
    "predict-features-str": ("predict", lambda x, y, m: (m, "abc"), r"\(N, D\) array: could not convert"),
    "predict-features-ragged": ("predict", lambda x, y, m: (m, [[1.0] * 8, [2.0]]), "inhomogeneous"),
    "predict-wrong-width": ("predict", lambda x, y, m: (m, np.zeros((2, 5))), "must have 8 columns"),
}


@pytest.mark.parametrize("case", list(MALFORMED_CLASSIFIER_CALLS))
def test_malformed_service_arguments_are_invalid_input_sentences_not_numpy_errors(tmp_path, case):
    """Each of these used to escape as numpy's or int()'s raw ValueError / TypeError, which the provider reports
    as ``ModelServiceUnavailable: classifier.fit failed`` (retry) instead of "fix the input"."""
    from colabel.services.hals.service import ClassifierService

    method, arguments, message = MALFORMED_CLASSIFIER_CALLS[case]
    x, y = small_set()
    service = ClassifierService(str(tmp_path), n_members=2)
    model_id = service.fit(x, y, 2)["model_id"]
    with pytest.raises(InvalidInputError, match=message) as caught:
        getattr(service, method)(*arguments(x, y, model_id))
    assert "\n" not in str(caught.value)  # a remote caller reads the last line only


def test_service_fit_ids_are_unchanged_and_predict_answers_zero_rows(tmp_path):
    """The checks convert exactly as before (model ids are logged by the provider and must stay the same), and
    ``predict`` on no cells returns empty arrays (``embed`` used to fail reshaping 0 rows to ``(0, -1)``)."""
    from colabel.services.hals.service import ClassifierService, _digest

    x, y = small_set()
    service = ClassifierService(str(tmp_path), n_members=2)
    fit = service.fit(x.astype(np.float64).tolist(), y.tolist(), 2, 3)
    assert fit["model_id"] == _digest(x, y.astype(np.int64), extra="2|3|2")
    out = service.predict(fit["model_id"], np.zeros((0, 8)))
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        "classes": ((0,), np.int32), "confidence": ((0,), np.float32), "uncertainty": ((0,), np.float32),
        "embedding": ((0, 64), np.float32)}


@pytest.mark.parametrize(("centroids", "shape"), [
    ([[10, 10, 1], [30, 40, 1]], r"\(2, 3\)"),  # 2 cells, 3 numbers each: used to become 3 made-up cells
    ([10, 10, 1], r"\(3,\)"),  # used to be numpy's "cannot reshape array of size 3"
    ([[10, 10, 20, 20]], r"\(1, 4\)"),  # used to become 2 cells
    (np.zeros((2, 0)), r"\(2, 0\)"),
    (np.zeros((0, 3)), r"\(0, 3\)"),
])
def test_service_features_refuses_centroids_not_n_by_2_instead_of_reshaping_them(tmp_path, centroids, shape):
    from colabel.services.hals.service import ClassifierService

    image = np.zeros((64, 64), np.uint8)
    expected = r"centroids_xy must have shape \(N, 2\) as \[x, y\], got shape " + shape
    with pytest.raises(InvalidInputError, match=expected):
        ClassifierService(str(tmp_path)).features(image, centroids)


def test_service_features_of_no_centroids_is_an_empty_array_without_the_backbone(tmp_path):
    """N = 0 used to fail inside the cache key (``memoryview: cannot cast view with zeros in shape``)."""
    from colabel.services.hals.service import CNN_DIM, ClassifierService

    service = ClassifierService(str(tmp_path))
    image = np.zeros((64, 48, 3), np.uint8)
    labels = np.zeros((64, 48), np.int32)
    for centroids in ([], np.zeros((0, 2)), np.zeros(0)):
        out = service.features(image, centroids)
        assert out.shape == (0, CNN_DIM) and out.dtype == np.float32
        cell = service.features(image, centroids, labels, [])
        assert cell.shape == (0, CNN_DIM + 12) and cell.dtype == np.float32
    assert service._extractor is None  # nothing to compute, so no backbone was loaded
    with pytest.raises(InvalidInputError, match="1 nucleus ids for 0 centroids"):
        service.features(image, [], labels, [3])
    with pytest.raises(InvalidInputError, match="ids were given without labels"):
        service.features(image, [], None, [])


@pytest.mark.parametrize(("image", "labels", "ids", "message"), [
    ("abc", None, None, "image must be a numeric array"),
    ([[1, 2], [3]], None, None, r"image must be a numeric \(H, W\) or \(H, W, C\) array: .*inhomogeneous"),
    (np.zeros((64, 64)), np.zeros((64, 64), np.int32), "ab", r"ids must be a vector \(N,\) of integer nucleus"),
    (np.zeros((64, 64)), np.zeros((64, 64), np.int32), [[1], [2, 3]], "ids must be a vector"),
    (np.zeros((64, 64)), np.zeros((64, 64), np.int32), [1.5], "ids must be a vector"),
    (np.zeros((64, 64)), [[1, 2], [3]], [1], r"labels must be an \(H, W\) integer label image: .*inhomogeneous"),
])
def test_service_features_malformed_image_labels_or_ids_are_invalid_input(tmp_path, image, labels, ids, message):
    from colabel.services.hals.service import ClassifierService

    with pytest.raises(InvalidInputError, match=message):
        ClassifierService(str(tmp_path)).features(image, [[10.0, 10.0]], labels, ids)


async def test_malformed_hals_arguments_reach_model_assist_as_invalid_input(tmp_path):
    """Through the provider's ModelAssist, directly on the in-process backend and over the (simulated) Hypha
    path, a malformed argument is ``InvalidInputError`` with the service's sentence (``fix the input``), not
    ``ModelServiceUnavailable: classifier.fit failed`` (``retry``)."""
    import types

    from colabel.apps.provider.assist import ModelAssist
    from colabel.services.gateway import LocalBackend, register_model_services
    from colabel.services.hals.service import ClassifierService, CoresetService

    class Server:
        """What register_model_services and ModelAssist use of a Hypha connection: a registered function
        raises as hypha-rpc delivers a remote error (its text, ``<Kind>: <sentence>``)."""

        def __init__(self) -> None:
            self.services: dict[str, dict] = {}

        async def register_service(self, spec: dict) -> dict:
            self.services[f"ws/gateway:{spec['id']}"] = spec
            return {"id": f"ws/gateway:{spec['id']}"}

        async def get_service(self, service_id: str):
            return types.SimpleNamespace(**self.services[service_id])

    server = Server()
    backends = {"classifier": LocalBackend("classifier", ClassifierService(str(tmp_path), n_members=2)),
                "coreset": LocalBackend("coreset", CoresetService())}
    ids = await register_model_services(server, backends, prefix="t")
    x, y = small_set()
    rng = np.random.default_rng(1)
    centroids = rng.uniform(0, 100, (len(x), 2))
    labelled = np.zeros(len(x), bool)
    calls = [
        ("classifier", "fit", ("abc", y, 2), "features must be a numeric"),
        ("classifier", "fit", ([[1, 2], [3]], [0, 1], 2), "inhomogeneous"),
        ("classifier", "fit", (x, y, 2, "x"), "seed must be an integer"),
        ("classifier", "fit", (x, y, 2, 2**70), "seed must lie in"),
        ("classifier", "fit", (x, y, 10**12), "n_classes must be at most 1000"),
        ("classifier", "features", (np.zeros((64, 64), np.uint8), [[10, 10, 1], [30, 40, 1]]), r"got shape \(2, 3\)"),
        ("coreset", "select", (x, labelled, None), "k must be an integer"),
        ("coreset", "select", (x, labelled, float("nan")), "k must be an integer"),
        ("coreset", "select", (x, labelled, True), "k must be an integer"),
        ("coreset", "select", ("abc", labelled, 3), "features must be a numeric"),
        ("coreset", "next_patch", (x, labelled, centroids, None, 64, 3), "image_shape must be"),
        ("coreset", "next_patch", (x, labelled, centroids, [100, 100], "x", 3), "patch_size must be"),
    ]
    for direct in (True, False):
        assist = ModelAssist(None, server, ids, direct=direct)
        for name, method, args, message in calls:
            with pytest.raises(InvalidInputError, match=message):
                await assist.call(name, method, *args)
    del backends  # the registration's backends live as long as this test


# ------------------------------------------------------------------------------------- online policy


def test_online_policy_thresholds_hand_computed(cells):
    x, y, _ = cells
    clf = OnlineClassifier(2, features=x)
    order = np.r_[np.flatnonzero(y == 0)[:40], np.flatnonzero(y == 1)[:40]].reshape(2, 40).T.ravel()  # 0,1,0,1..
    due = []
    for cell in order[:19]:  # labels 1..19
        clf.add_label(int(cell), int(y[cell]))
        due.append(clf.should_retrain())
        assert not clf.ready
    assert due == [False] * 19  # labels 1..19: one class still below 10
    with pytest.raises(NotReadyError, match="10 labels per class"):
        clf.suggest([0])
    with pytest.raises(InvalidInputError, match="class 1 has 9"):
        clf.retrain()

    clf.add_label(int(order[19]), int(y[order[19]]))  # label 20: 10 + 10
    assert clf.should_retrain() and not clf.ready
    report = clf.retrain()
    assert isinstance(report, TrainReport) and report.version == 1 == clf.version and report.n_labels == 20
    assert clf.ready and not clf.should_retrain() and report.seconds > 0 and 0 <= report.val_accuracy <= 1

    due = []
    for cell in order[20:26]:  # labels 21..26
        clf.add_label(int(cell), int(y[cell]))
        due.append(clf.should_retrain())
    assert due == [False, False, False, False, True, True]  # due at 25 (5 new), still due at 26
    assert clf.retrain().version == 2 and not clf.should_retrain()

    # Re-sending a label is not a change; relabelling and removing are.
    cell = int(order[0])
    clf.add_label(cell, int(y[cell]))
    assert clf.changes_since_training == 0
    clf.add_label(cell, 1 - int(y[cell]))
    clf.remove_label(int(order[1]))
    clf.remove_label(10_000)  # unknown: ignored
    assert clf.changes_since_training == 2
    for extra in order[26:29]:
        clf.add_label(int(extra), int(y[extra]))
    assert clf.should_retrain()  # 2 + 3 = 5 changes


def test_suggestions_pause_below_the_threshold_after_relabels_and_a_retrain_is_due_once_it_is_back(cells):
    x, y, _ = cells
    clf = OnlineClassifier(2, features=x, n_members=2)
    zeros, ones = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    for cell in [*zeros[:10], *ones[:10]]:
        clf.add_label(int(cell), int(y[cell]))
    clf.retrain()
    assert clf.ready and not clf.should_retrain()

    clf.add_label(int(zeros[0]), 1)  # relabelled: class 0 has 9
    assert not clf.ready and not clf.should_retrain() and clf.class_counts().tolist() == [9, 11]
    with pytest.raises(NotReadyError, match="paused"):
        clf.suggest([int(zeros[20])])
    clf.remove_label(int(zeros[1]))  # 8
    assert not clf.ready and not clf.should_retrain()

    clf.add_label(int(zeros[10]), 0)
    clf.add_label(int(zeros[11]), 0)  # 10 again after 4 changes: due at once, not after 5
    assert clf.threshold_reached and clf.should_retrain()
    clf.retrain()
    assert clf.ready and not clf.should_retrain() and clf.suggest([int(zeros[20])])[0].cls in (0, 1)
    for cell in ones[10:14]:  # then every 5 changes, as usual
        clf.add_label(int(cell), 1)
    assert not clf.should_retrain()
    clf.add_label(int(ones[14]), 1)
    assert clf.should_retrain()


def test_suggestions_carry_class_confidence_and_uncertainty(cells):
    x, y, _ = cells
    clf = OnlineClassifier(2, n_members=3)
    cells_in_random_order = [int(c) for c in np.random.default_rng(0).permutation(len(y))]
    for cell in cells_in_random_order[:120]:  # (cell ids are in raster order: the first 120 are the top rows)
        clf.add_label(cell, int(y[cell]))
    clf.retrain(x)  # an (n_cells, D) array indexed by cell id; remembered for suggest
    unlabeled = cells_in_random_order[120:]
    suggestions = clf.suggest(unlabeled)
    assert len(suggestions) == len(unlabeled) and all(isinstance(s, Suggestion) for s in suggestions)
    for s in suggestions:
        assert s.cls in (0, 1) and 0.5 <= s.confidence <= 1 and 0 <= s.uncertainty <= 1
        cls, conf, unc = s  # a plain tuple too
    accuracy = np.mean([s.cls == y[c] for s, c in zip(suggestions, unlabeled, strict=True)])
    assert accuracy >= 0.75
    assert clf.suggest([]) == []
    # Features from a callable or a mapping work the same way.
    a, b = unlabeled[10:12]
    by_call = clf.suggest([a, b], lambda ids: x[ids])
    by_map = clf.suggest([a, b], {a: x[a], b: x[b]})
    for s1, s2, s3 in zip(by_call, by_map, suggestions[10:12], strict=True):
        assert s1.cls == s2.cls == s3.cls
        assert s1.confidence == pytest.approx(s2.confidence) == pytest.approx(s3.confidence, abs=1e-5)
    with pytest.raises(InvalidInputError, match="no features for cell 999"):
        clf.suggest([999], {a: x[a]})
    with pytest.raises(InvalidInputError, match="out of range"):
        clf.suggest([len(x)])
    with pytest.raises(InvalidInputError, match=r"class must be an integer in 0\.\.1"):
        clf.add_label(5, 2)


def test_three_class_online_classifier_with_string_cell_ids(cells):
    x, _, dab = cells
    y3 = np.digitize(dab, np.quantile(dab, [1 / 3, 2 / 3]))
    table = {f"cell-{i}": x[i] for i in range(len(x))}
    clf = OnlineClassifier(3, features=table, n_members=3)
    for i in range(45):
        clf.add_label(f"cell-{i}", int(y3[i]))
    assert clf.threshold_reached == (np.bincount(y3[:45], minlength=3) >= 10).all()
    i = 45
    while not clf.should_retrain():
        clf.add_label(f"cell-{i}", int(y3[i]))
        i += 1
    clf.retrain()
    out = clf.suggest([f"cell-{j}" for j in range(300, 310)])
    assert {s.cls for s in out} <= {0, 1, 2} and all(1 / 3 <= s.confidence <= 1 for s in out)


def test_suggest_runs_concurrently_with_retrain(cells):
    x, y, _ = cells
    clf = OnlineClassifier(2, features=x, n_members=3)
    for cell in range(100):
        clf.add_label(cell, int(y[cell]))
    clf.retrain()
    errors, results = [], []

    def suggest_loop():
        try:
            for _ in range(30):
                results.append(clf.suggest(range(200, 260)))
        except Exception as exc:  # surfaced by the assert below
            errors.append(exc)

    worker = threading.Thread(target=suggest_loop)
    worker.start()
    for cell in range(100, 140):  # labelling continues while retraining
        clf.add_label(cell, int(y[cell]))
        if clf.should_retrain():
            clf.retrain()
    worker.join()
    assert not errors and len(results) == 30 and all(len(r) == 60 for r in results)
    assert clf.version >= 2


def test_bench_retrain_reports_timings():
    result = bench_retrain(n_labels=200, dim=1280, repeats=3)
    assert set(result) >= {"median_ms", "p95_ms"} and result["n_members"] == 5 and result["n_labels"] == 200
    # The target is <= 200 ms (measured median ~65 ms); this generous bound only catches gross regressions
    # on a loaded CI machine.
    assert 0 < result["median_ms"] <= result["p95_ms"] < 2000
