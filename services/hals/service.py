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

from colabel.errors import InvalidInputError, NotFoundError
from colabel.files import atomic_write

from .classifier import Ensemble
from .coreset import k_center_greedy, select_patch
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
    """

    rpc_functions = ("info", "features", "fit", "predict")

    def __init__(self, cache_dir: str | None = None, n_members: int = 5, input_size: int = 64,
                 max_models: int = 16) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="colabel-hals-"))
        (self.cache_dir / "models").mkdir(parents=True, exist_ok=True)
        self.n_members = n_members
        self.input_size = input_size
        self.max_models = max_models
        self._extractor = None
        self._store = None
        self._models: OrderedDict[str, Ensemble] = OrderedDict()
        self._lock = threading.Lock()

    def info(self) -> dict:
        return {"backbone": "efficientnet_lite0 (ImageNet)", "feature_dim": CNN_DIM + N_MEASUREMENTS,
                "cnn_dim": CNN_DIM, "measurements": list(MEASUREMENT_NAMES), "n_members": self.n_members,
                "patch_diameters": PATCH_DIAMETERS, "patch_size_without_labels": 40, "input_size": self.input_size}

    def features(self, image: np.ndarray, centroids: Any, labels: Any = None, ids: Any = None) -> np.ndarray:
        """Cell features of the nuclei at ``centroids`` (N, 2) ``[x, y]``.

        With ``labels`` (H, W) int (the nucleus service's label image) and ``ids`` (N,) (each nucleus'
        label value): the HALS cell features, ``(N, 1292)`` float32 -- EfficientNet-Lite0 on patches of
        1.6 median nucleus diameters, then 12 nucleus measurements
        (:func:`~colabel.services.hals.measurements.cell_features`). Without them: ``(N, 1280)`` CNN
        features of fixed 40 x 40 px patches (HALS' original features). Use one kind per session:
        :meth:`fit` and :meth:`predict` need the same columns.

        The CNN block is computed once per (image content, nuclei set, patch size) and kept in the
        shared cache.
        """
        from .features import EfficientNetLite0Features, FeatureStore
        from .measurements import cell_features

        with self._lock:
            if self._extractor is None:
                self._extractor = EfficientNetLite0Features(input_size=self.input_size, progress=False)
                self._store = FeatureStore(self.cache_dir / "features")
        centroids = np.asarray(centroids, dtype=np.float64).reshape(-1, 2)
        if labels is None:
            if ids is not None:
                raise InvalidInputError("ids were given without labels: pass the nuclei's label image too")
            return self._store.get_or_compute(image, centroids, self._extractor, progress=False)
        if ids is None:
            raise InvalidInputError("labels were given without ids: pass each nucleus' label value")
        return cell_features(image, labels, ids, centroids, self._extractor, store=self._store, progress=False)

    def _model_path(self, model_id: str) -> Path:
        return _model_file(self.cache_dir, model_id)

    def fit(self, features: np.ndarray, labels: Any, n_classes: int, seed: int = 0) -> dict:
        """Train the ensemble on ``features`` (N, D) with ``labels`` (N,) in ``0..n_classes-1``.

        Features of :meth:`features`; the cell features (D = 1292) train with their CNN and measurement
        blocks balanced (:func:`~colabel.services.hals.measurements.column_weights`).

        Returns ``{model_id, val_accuracy, n_labels, seconds}``; the model is stored for :meth:`predict`.
        """
        features = np.asarray(features, dtype=np.float32)
        labels = np.asarray(labels)
        start = time.perf_counter()
        weights = feature_column_weights(features.shape[1]) if features.ndim == 2 else None
        ensemble = Ensemble().fit(features, labels, n_classes=n_classes, n_members=self.n_members, seed=seed,
                                  column_weights=weights)
        seconds = time.perf_counter() - start
        model_id = _digest(features, labels.astype(np.int64), extra=f"{n_classes}|{seed}|{self.n_members}")
        store_model(self.cache_dir, model_id, ensemble)
        self._remember(model_id, ensemble)
        return {"model_id": model_id, "val_accuracy": float(ensemble.validation_accuracy),
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
        """Suggestions for ``features`` (N, D): ``classes`` (N,) int32, ``confidence`` (N,) float32 in [0, 1],
        ``uncertainty`` (N,) float32 in [0, 1] (normalised entropy of the ensemble mean), and ``embedding``
        (N, 32 * n_members) float32, the heads' penultimate activations side by side
        (:meth:`~colabel.services.hals.classifier.Ensemble.embed`, ``how="concat"``), which Coreset selects on:
        its distances do not depend on the arbitrary order of each head's hidden units."""
        ensemble = self._model(model_id)
        features = np.asarray(features, dtype=np.float32)
        classes, confidence = ensemble.predict(features)
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
        """Indices (k,) of the unlabelled rows that best cover the unlabelled pool given ``labelled`` (N,) bool.

        Unlabelled and labelled rows must be finite (else ``InvalidInputError``). Features are randomly projected
        to ``reduce_dim`` dimensions above ``reduce_above`` cells (the bench measures the cost in coverage
        radius).
        """
        features = np.asarray(features, dtype=np.float32)
        labelled = np.asarray(labelled, dtype=bool)
        if labelled.shape != (len(features),):
            raise InvalidInputError(f"labelled must be a bool vector of length {len(features)}")
        reduce = self.reduce_dim if len(features) > self.reduce_above else None
        k = min(int(k), int((~labelled).sum()))
        if k <= 0:
            return np.empty(0, np.int64)
        return k_center_greedy(features, labelled, k, seed=seed, reduce_dim=reduce)

    def next_patch(self, features: np.ndarray, labelled: Any, centroids: Any, image_shape: Any,
                   patch_size: int = 128, k: int = 10, seed: int = 0) -> dict:
        """The grid patch holding most of the Coreset S of ``k`` cells (defaults: those ``bench/hals.py`` measures,
        a 128 px grid and k = 10).

        Returns ``{row, col, x0, y0, x1, y1, count, selected, selected_in_patch}`` in image pixels; ``None``
        fields when every cell is labelled.
        """
        selected = self.select(features, labelled, k, seed)
        if selected.size == 0:
            return {"count": 0, "selected": [], "selected_in_patch": [], "row": None, "col": None}
        choice = select_patch(np.asarray(centroids, dtype=np.float64), selected,
                              image_shape=tuple(image_shape)[:2], patch_size=patch_size)
        return {"row": choice.row, "col": choice.col, "x0": choice.x0, "y0": choice.y0, "x1": choice.x1,
                "y1": choice.y1, "count": int(choice.count), "selected": selected.tolist(),
                "selected_in_patch": np.asarray(choice.selected_in_patch).tolist()}
