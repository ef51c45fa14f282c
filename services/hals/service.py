"""The HALS model services: cell features + classifier, and Coreset. Plain classes; no transport here.

Both are stateless towards sessions: the provider keeps each session's labels (its event log is the truth)
and sends what a call needs, so any replica can answer. Trained models are kept in a store shared by
replicas (memory LRU + files), addressed by a content id.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from colabel.cache_folder import check_budget
from colabel.errors import InvalidInputError, NotFoundError
from colabel.files import atomic_write

from .classifier import Ensemble, _check_features, _check_labels, _check_n_classes, _check_seed, _one_line
from .coreset import _check_k, _shape_and_patch, k_center_greedy, select_patch
from .coreset import _check_seed as _check_coreset_seed
from .measurements import MEASUREMENT_NAMES, N_MEASUREMENTS, PATCH_DIAMETERS, column_weights

#: Width of the backbone's features (EfficientNet-Lite0).
CNN_DIM = 1280


def _digest(*arrays: np.ndarray, extra: str = "") -> str:
    h = hashlib.blake2b(digest_size=12)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype.str}".encode())
        h.update(memoryview(a).cast("B"))
    h.update(extra.encode())
    return h.hexdigest()


def _array(value: Any, name: str, what: str) -> np.ndarray:
    """``np.asarray(value)``, or :class:`InvalidInputError` ``"<name> must be <what>: <numpy's reason>"`` for a
    ragged or otherwise unconvertible value."""
    try:
        return np.asarray(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInputError(f"{name} must be {what}: {_one_line(exc)}") from None


def _check_ids(ids: Any, n: int) -> np.ndarray:
    """``ids`` as ``(n,)`` int64 nucleus label values (integers, one per centroid)."""
    array = _array(ids, "ids", "a vector (N,) of integer nucleus label values")
    if array.size == 0:
        array = array.astype(np.int64)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise InvalidInputError(f"ids must be a vector (N,) of integer nucleus label values, got dtype "
                                f"{array.dtype} and shape {array.shape}")
    if len(array) != n:
        raise InvalidInputError(f"{len(array)} nucleus ids for {n} centroids: one id per centroid")
    return array.astype(np.int64)


def _check_labelled(labelled: Any, n: int) -> np.ndarray:
    """``labelled`` as an ``(n,)`` bool mask: bools, or integers 0 / 1 (not indices, not strings)."""
    array = _array(labelled, "labelled", f"a bool vector of length {n}")
    if array.size == 0 and n == 0:
        array = array.astype(bool)
    zero_one = array.dtype.kind in "iu" and bool(((array == 0) | (array == 1)).all())
    if array.shape != (n,) or not (array.dtype == bool or zero_one):
        raise InvalidInputError(f"labelled must be a bool vector of length {n} (True = labelled), got dtype "
                                f"{array.dtype} and shape {array.shape}")
    return array.astype(bool, copy=False)


def feature_column_weights(dim: int) -> np.ndarray | None:
    """Column weights for training on ``dim``-wide features: for the HALS cell features (``CNN_DIM +
    N_MEASUREMENTS`` columns) the CNN and measurement blocks balanced
    (:func:`~colabel.services.hals.measurements.column_weights`); ``None`` (all 1) for any other width."""
    return column_weights(CNN_DIM) if dim == CNN_DIM + N_MEASUREMENTS else None


def _model_file(cache_dir: str | os.PathLike, model_id: str) -> Path:
    if not isinstance(model_id, str) or not model_id.isalnum():
        raise InvalidInputError(f"model id {model_id!r} is not valid")
    return Path(cache_dir) / "models" / f"{model_id}.pkl"


def store_model(cache_dir: str | os.PathLike, model_id: str, ensemble: Ensemble) -> Path:
    """Write ``ensemble`` into the model store of a :class:`ClassifierService` whose cache folder is
    ``cache_dir`` (``models/<model_id>.pkl``, atomically), where its ``predict(model_id, ...)`` finds it."""
    path = _model_file(cache_dir, model_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, pickle.dumps(ensemble))
    return path


class ClassifierService:
    """Cell features from a frozen ImageNet backbone, and the HALS classifier head ensemble.

    Parameters
    ----------
    cache_dir : str, optional
        Folder shared by replicas: ``features/`` (per image and nuclei set) and ``models/`` (trained
        ensembles). Memory only when None.
    n_members : int
        Ensemble members (Segebarth et al. 2020: ensembles make results reliable).
    input_size : int
        Backbone input in pixels (the 40 px HALS patch is resized to it).
    max_models : int
        Trained ensembles kept in memory (all stay on disk, small: a start model installed with
        ``colabel train-classifier --install`` must never go).
    feature_disk_bytes : int or None, default 10 GiB
        Budget of ``features/`` in bytes, least recently used deleted first (None or 0: unbounded; see
        :class:`~colabel.services.hals.features.FeatureStore`).
    """

    rpc_functions = ("info", "features", "fit", "predict")

    def __init__(self, cache_dir: str | None = None, n_members: int = 5, input_size: int = 64,
                 max_models: int = 16, feature_disk_bytes: int | None = 10 << 30) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="colabel-hals-"))
        (self.cache_dir / "models").mkdir(parents=True, exist_ok=True)
        self.n_members = n_members
        self.input_size = input_size
        self.max_models = max_models
        self.feature_disk_bytes = check_budget("feature_disk_bytes", feature_disk_bytes)
        self._extractor = None
        self._store = None
        self._models: OrderedDict[str, Ensemble] = OrderedDict()
        self._lock = threading.Lock()

    def info(self) -> dict:
        return {"backbone": "efficientnet_lite0 (ImageNet)", "feature_dim": CNN_DIM + N_MEASUREMENTS,
                "cnn_dim": CNN_DIM, "measurements": list(MEASUREMENT_NAMES), "n_members": self.n_members,
                "patch_diameters": PATCH_DIAMETERS, "patch_size_without_labels": 40, "input_size": self.input_size}

    def features(self, image: np.ndarray, centroids: Any, labels: Any = None, ids: Any = None) -> np.ndarray:
        """Cell features of the nuclei at ``centroids``.

        With ``labels`` and ``ids``: the HALS cell features -- EfficientNet-Lite0 on patches of 1.6 median
        nucleus diameters, then 12 nucleus measurements
        (:func:`~colabel.services.hals.measurements.cell_features`). Without them: CNN features of fixed
        40 x 40 px patches (HALS' original features). Use one kind per session: :meth:`fit` and :meth:`predict`
        need the same columns. The CNN block is computed once per (image content, nuclei set, patch size) and
        kept in the shared cache.

        Parameters
        ----------
        image : array (H, W) or (H, W, C), numeric
        centroids : array-like (N, 2), float
            ``[x, y]`` pixels inside ``[0, W] x [0, H]``, exactly this shape: nothing is reshaped, so ``(N, 3)``
            or ``(3,)`` is refused. ``N = 0`` (``[]``) returns an empty ``(0, dim)`` array without running the
            backbone.
        labels : array (H, W) of int, optional
            The nucleus service's label image.
        ids : array-like (N,) of int, optional
            Each nucleus' label value, in the order of ``centroids``; given together with ``labels``.

        Returns
        -------
        ndarray (N, 1292) float32 with ``labels`` and ``ids``, else (N, 1280) float32

        Raises
        ------
        InvalidInputError
            One sentence for a non-numeric or badly shaped image, centroids not ``(N, 2)``, non-finite or outside
            the image, ``labels`` without ``ids`` (or the converse), ids that are not N integers.
        """
        from .features import EfficientNetLite0Features, FeatureStore, _as_hwc, _centroids
        from .measurements import cell_features

        image = _array(image, "image", "a numeric (H, W) or (H, W, C) array")
        hwc = _as_hwc(image)
        # checked as given, never reshaped: (2, 3) is an error, not 3 made-up centroids
        xy = _centroids(centroids, hwc.shape[0], hwc.shape[1])
        if labels is None and ids is not None:
            raise InvalidInputError("ids were given without labels: pass the nuclei's label image too")
        if labels is not None and ids is None:
            raise InvalidInputError("labels were given without ids: pass each nucleus' label value")
        if ids is not None:
            ids = _check_ids(ids, len(xy))
            labels = _array(labels, "labels", "an (H, W) integer label image")
        if len(xy) == 0:
            return np.zeros((0, CNN_DIM if labels is None else CNN_DIM + N_MEASUREMENTS), np.float32)
        with self._lock:
            if self._extractor is None:
                self._extractor = EfficientNetLite0Features(input_size=self.input_size, progress=False)
                self._store = FeatureStore(self.cache_dir / "features", max_disk_bytes=self.feature_disk_bytes)
        if labels is None:
            return self._store.get_or_compute(image, xy, self._extractor, progress=False)
        return cell_features(image, labels, ids, xy, self._extractor, store=self._store, progress=False)

    def _model_path(self, model_id: str) -> Path:
        return _model_file(self.cache_dir, model_id)

    def fit(self, features: np.ndarray, labels: Any, n_classes: int, seed: int = 0) -> dict:
        """Train the ensemble; the model is stored for :meth:`predict`.

        Parameters
        ----------
        features : array-like (N, D), numeric, finite
            Features of :meth:`features`; the cell features (D = 1292) train with their CNN and measurement
            blocks balanced (:func:`~colabel.services.hals.measurements.column_weights`).
        labels : array-like (N,) of int
            Class indices in ``0 .. n_classes - 1``, every class at least twice.
        n_classes : int
            ``2 .. 1000`` (:data:`~colabel.services.hals.classifier.MAX_CLASSES`).
        seed : int
            ``0 .. 2**48 - 1``; member ``i`` trains from ``seed + i``.

        Returns
        -------
        dict
            ``{model_id: str, val_accuracy: float, n_val: int, n_labels: int, seconds: float}``: ``val_accuracy``
            is the members' mean accuracy on their held-out validation split of the labels, ``n_val`` labels each.

        Raises
        ------
        InvalidInputError
            One sentence for any argument that is malformed (not numeric, ragged, of the wrong shape, NaN / inf,
            out of range), before any training.
        """
        # every argument checked before any work: a malformed one is an InvalidInputError sentence, never numpy's
        n_classes = _check_n_classes(n_classes)
        seed = _check_seed(seed)
        features = _check_features(features)
        labels = _check_labels(labels, len(features), n_classes)
        start = time.perf_counter()
        ensemble = Ensemble().fit(features, labels, n_classes=n_classes, n_members=self.n_members, seed=seed,
                                  column_weights=feature_column_weights(features.shape[1]))
        seconds = time.perf_counter() - start
        model_id = _digest(features, labels, extra=f"{n_classes}|{seed}|{self.n_members}")
        store_model(self.cache_dir, model_id, ensemble)
        self._remember(model_id, ensemble)
        return {"model_id": model_id, "val_accuracy": float(ensemble.validation_accuracy),
                "n_val": int(min(h.n_val for h in ensemble.members)),
                "n_labels": int(len(labels)), "seconds": round(seconds, 4)}

    def _remember(self, model_id: str, ensemble: Ensemble) -> None:
        with self._lock:
            self._models[model_id] = ensemble
            self._models.move_to_end(model_id)
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)

    def _model(self, model_id: str) -> Ensemble:
        with self._lock:
            if model_id in self._models:
                self._models.move_to_end(model_id)
                return self._models[model_id]
        path = self._model_path(model_id)
        if not path.is_file():
            raise NotFoundError(f"unknown classifier model {model_id!r}; train it with fit first")
        with open(path, "rb") as handle:  # written by this service into its own cache folder
            ensemble = pickle.load(handle)
        self._remember(model_id, ensemble)
        return ensemble

    def predict(self, model_id: str, features: np.ndarray) -> dict:
        """Suggestions for ``features`` (N, D) numeric, finite, D = the training width (N = 0 allowed).

        Returns ``classes`` (N,) int32, ``confidence`` (N,) float32 in [0, 1], ``uncertainty`` (N,) float32 in
        [0, 1] (normalised entropy of the ensemble mean), and ``embedding`` (N, 32 * n_members) float32, the heads'
        penultimate activations side by side (:meth:`~colabel.services.hals.classifier.Ensemble.embed`,
        ``how="concat"``), which Coreset selects on: its distances do not depend on the arbitrary order of each
        head's hidden units. ``NotFoundError`` for an unknown ``model_id``; ``InvalidInputError`` for malformed
        features."""
        ensemble = self._model(model_id)
        classes, confidence = ensemble.predict(features)  # checks the features first (one clear sentence)
        return {"classes": classes.astype(np.int32), "confidence": confidence.astype(np.float32),
                "uncertainty": ensemble.uncertainty(features).astype(np.float32),
                "embedding": ensemble.embed(features, how="concat").astype(np.float32)}


class CoresetService:
    """Coreset active learning: k-center greedy over labelled ∪ unlabelled features, and the next patch."""

    rpc_functions = ("info", "select", "next_patch")

    def __init__(self, reduce_dim: int | None = 64, reduce_above: int = 200_000) -> None:
        self.reduce_dim = reduce_dim
        self.reduce_above = reduce_above

    def info(self) -> dict:
        return {"method": "k-center greedy (Sener & Savarese 2018)", "reduce_dim": self.reduce_dim,
                "reduce_above_cells": self.reduce_above}

    def select(self, features: np.ndarray, labelled: Any, k: int, seed: int = 0) -> np.ndarray:
        """The unlabelled rows that best cover the unlabelled pool (k-center greedy), in pick order.

        Parameters
        ----------
        features : array-like (N, D), numeric
            Used as float32. Unlabelled and labelled rows must be finite. Randomly projected to ``reduce_dim``
            dimensions above ``reduce_above`` rows (the bench measures the cost in coverage radius).
        labelled : array-like (N,) of bool
            True for a labelled row (integers 0 / 1 are read as bools; an index list is refused).
        k : int
            Rows to pick; ``min(k, unlabelled rows)`` are returned, none for ``k <= 0``.
        seed : int >= 0 or None

        Returns
        -------
        ndarray (k',) int64

        Raises
        ------
        InvalidInputError
            One sentence for a malformed argument (non-numeric or ragged features, a ``labelled`` that is not N
            bools, a ``k`` that is not an integer -- None, NaN, a float, a bool --, a negative or non-integer
            seed) or non-finite features in the rows that take part.
        """
        features = _array(features, "features", "a numeric (N, D) array")
        if features.ndim != 2 or features.dtype.kind not in "biuf":
            raise InvalidInputError(f"features must be a numeric (N, D) array, got dtype {features.dtype} and "
                                    f"shape {features.shape}")
        features = features.astype(np.float32, copy=False)  # a float32 array (or memmap) is not copied
        labelled = _check_labelled(labelled, len(features))
        k = _check_k(k)
        seed = _check_coreset_seed(seed)
        reduce = self.reduce_dim if len(features) > self.reduce_above else None
        k = min(k, int((~labelled).sum()))
        if k <= 0:
            return np.empty(0, np.int64)
        return k_center_greedy(features, labelled, k, seed=seed, reduce_dim=reduce)

    def next_patch(self, features: np.ndarray, labelled: Any, centroids: Any, image_shape: Any,
                   patch_size: int = 128, k: int = 10, seed: int = 0) -> dict:
        """The grid patch holding most of the Coreset S of ``k`` cells (defaults: those ``bench/hals.py`` measures,
        a 128 px grid and k = 10).

        ``features``, ``labelled``, ``k`` and ``seed`` as for :meth:`select`; ``centroids`` (N, 2) ``[x, y]``
        pixels; ``image_shape`` ``(H, W)`` and ``patch_size`` (``h`` or ``(h, w)``) whole pixels (integers,
        1 .. 2**31), checked first, even when every cell is labelled. Only the patches holding a selected cell
        are counted, so memory does not depend on the number of patches in the grid.

        Returns ``{row, col, x0, y0, x1, y1, count, selected, selected_in_patch}`` in image pixels; ``None``
        fields when every cell is labelled. Malformed arguments raise ``InvalidInputError``.
        """
        _shape_and_patch(image_shape, patch_size)  # checked even when every cell is labelled
        selected = self.select(features, labelled, k, seed)
        if selected.size == 0:
            return {"count": 0, "selected": [], "selected_in_patch": [], "row": None, "col": None}
        choice = select_patch(centroids, selected, image_shape=image_shape, patch_size=patch_size)
        return {"row": choice.row, "col": choice.col, "x0": choice.x0, "y0": choice.y0, "x1": choice.x1,
                "y1": choice.y1, "count": int(choice.count), "selected": selected.tolist(),
                "selected_in_patch": np.asarray(choice.selected_in_patch).tolist()}
