"""The HALS loop for a session (Human-Augmenting AI-based Labeling System, npj Digital Medicine 2021).

Cells come from the nucleus service; their features and the classifier from the classifier service; the
next patch from the Coreset service. This module keeps each session's loop state — labels in annotation
order, suggestions shown and not yet reviewed, the current model — and writes every step to the session's
event log, which is the truth the state is rebuilt from after a restart.

Policy (HALS): suggestions start once every class has ``min_labels_per_class`` labels; the classifier is
retrained in the background after every ``retrain_every`` new labels, never blocking the annotator.

A classifier trained beforehand on pulled labels (``colabel train-classifier``, installed in the classifier
service's store) can start a session whose classes are the same, in the same order: suggestions come from
the first cell; once the session has ``min_labels_per_class`` labels per class, the session's own model,
trained on its labels, takes over and is retrained as usual.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from colabel.errors import InvalidInputError, NotFoundError

from .assist import ModelAssist
from .events import EventLog
from .models import SessionInfo

logger = logging.getLogger(__name__)


@dataclass
class _Cells:
    ids: list[int]
    centroids: np.ndarray  # (N, 2) [x, y]
    nuclei: list[dict]
    features: np.ndarray  # (N, D)
    image_shape: tuple[int, int]
    index: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StartModel:
    """A classifier installed in the classifier service's store, to start sessions with these classes."""

    model_id: str
    classes: tuple[str, ...]
    name: str  # what the status shows, e.g. the file it came from


@dataclass
class _Loop:
    labels: dict[tuple[str, int], int] = field(default_factory=dict)
    order: list[tuple[str, int]] = field(default_factory=list)
    shown: dict[tuple[str, int], int] = field(default_factory=dict)  # the latest suggestion shown, per cell
    offered: dict[tuple[str, int], set[int]] = field(default_factory=dict)  # every class ever suggested, per cell
    model_id: str | None = None
    start_model: str | None = None  # the StartModel's name while its model is the one suggesting
    version: int = 0
    changes_since_training: int = 0
    history: list[dict] = field(default_factory=list)
    per_annotator: dict[str, int] = field(default_factory=dict)  # labels given, by annotator id
    training: asyncio.Task | None = None
    cells: dict[str, _Cells] = field(default_factory=dict)


class HalsAssist:
    """Suggestions, labels and next-patch guidance for every session of a provider."""

    def __init__(self, assist: ModelAssist, *, min_labels_per_class: int = 10, retrain_every: int = 5,
                 patch_size: int = 256, coreset_k: int = 20, start_model: StartModel | None = None) -> None:
        self.assist = assist
        self.start_model = start_model
        self.provider = assist.provider
        self.min_labels_per_class = min_labels_per_class
        self.retrain_every = retrain_every
        self.patch_size = patch_size
        self.coreset_k = coreset_k
        self._loops: dict[str, _Loop] = {}
        self._cell_locks: dict[tuple[str, str], asyncio.Lock] = {}

    # -- state ------------------------------------------------------------------------------------
    def log(self, session: SessionInfo) -> EventLog:
        return EventLog(self.provider.store.session_dir(session.session_id) / "events.jsonl")

    def _class_index(self, session: SessionInfo, name: object) -> int:
        names = [c.name for c in session.classes]
        if name not in names:
            raise InvalidInputError(f"class {name!r} is not a class of this session (allowed: {names})")
        return names.index(name)

    def _loop(self, session: SessionInfo) -> _Loop:
        loop = self._loops.get(session.session_id)
        if loop is None:  # rebuild from the event log
            loop = _Loop()
            names = [c.name for c in session.classes]
            for event in self.log(session).read():
                key = (event.get("image_id"), event.get("cell_id"))
                if event["kind"] in ("label", "suggestion_accepted", "suggestion_corrected"):
                    if event.get("class") in names:
                        if key not in loop.labels:
                            loop.order.append(key)
                        loop.labels[key] = names.index(event["class"])
                        loop.shown.pop(key, None)
                        loop.changes_since_training += 1
                        who = event.get("annotator_id")
                        loop.per_annotator[who] = loop.per_annotator.get(who, 0) + 1
                elif event["kind"] == "suggestion_shown":
                    loop.shown[key] = names.index(event["class"]) if event.get("class") in names else -1
                    loop.offered.setdefault(key, set()).add(loop.shown[key])
                elif event["kind"] == "retrain":
                    loop.history.append({k: event[k] for k in ("n_labels", "val_accuracy", "version") if k in event})
                    loop.version = event.get("version", loop.version)
            start = self.start_model
            if start is not None and start.classes == tuple(names):
                loop.model_id, loop.start_model = start.model_id, start.name
            self._loops[session.session_id] = loop
        return loop

    async def _cells(self, session: SessionInfo, image_id: str) -> _Cells:
        loop = self._loop(session)
        if image_id in loop.cells:
            return loop.cells[image_id]
        lock = self._cell_locks.setdefault((session.session_id, image_id), asyncio.Lock())
        async with lock:
            if image_id not in loop.cells:
                pixels = await asyncio.to_thread(self.provider.get_image, image_id, session=session)
                result = await self.assist.call("nuclei", "segment", pixels, None, None, None, True)
                nuclei = result["nuclei"]
                centroids = np.asarray([n["centroid"] for n in nuclei], dtype=np.float64).reshape(-1, 2)
                ids = [int(n["id"]) for n in nuclei]
                # HALS cell features: CNN on nucleus-scaled patches + per-nucleus stain and shape measurements.
                features = (await self.assist.call("classifier", "features", pixels, centroids,
                                                   np.asarray(result["labels"]), np.asarray(ids, np.int64))
                            if len(nuclei) else np.zeros((0, 1292), np.float32))
                loop.cells[image_id] = _Cells(ids, centroids, nuclei, np.asarray(features, np.float32),
                                              tuple(pixels.shape[:2]), {c: i for i, c in enumerate(ids)})
        return loop.cells[image_id]

    def _counts(self, session: SessionInfo, loop: _Loop) -> dict[str, int]:
        names = [c.name for c in session.classes]
        counts = dict.fromkeys(names, 0)
        for cls in loop.labels.values():
            counts[names[cls]] += 1
        return counts

    def _threshold_reached(self, session: SessionInfo, loop: _Loop) -> bool:
        return min(self._counts(session, loop).values()) >= self.min_labels_per_class

    # -- training ---------------------------------------------------------------------------------
    def _maybe_retrain(self, session: SessionInfo, loop: _Loop) -> bool:
        own = loop.model_id is not None and loop.start_model is None  # a model trained on this session
        due = self._threshold_reached(session, loop) and (
            not own or loop.changes_since_training >= self.retrain_every)
        if due and (loop.training is None or loop.training.done()):
            loop.training = asyncio.ensure_future(self._retrain(session, loop))
            return True
        return False

    async def _retrain(self, session: SessionInfo, loop: _Loop) -> None:
        try:
            keys = list(loop.order)
            images = sorted({image_id for image_id, _ in keys})
            for image_id in images:
                await self._cells(session, image_id)
            features = np.stack([loop.cells[i].features[loop.cells[i].index[c]] for i, c in keys])
            labels = np.asarray([loop.labels[k] for k in keys])
            loop.changes_since_training = 0
            report = await self.assist.call("classifier", "fit", features, labels, len(session.classes), 0)
            loop.model_id, loop.start_model = report["model_id"], None
            loop.version += 1
            entry = {"n_labels": len(keys), "val_accuracy": report["val_accuracy"], "version": loop.version}
            loop.history.append(entry)
            await asyncio.to_thread(self.log(session).append, "retrain", seconds=report["seconds"], **entry)
        except Exception:  # noqa: BLE001 - the loop goes on; the next label retries
            logger.exception("retraining the HALS classifier of session %s failed", session.session_id)
            loop.changes_since_training = max(loop.changes_since_training, self.retrain_every)
        finally:
            loop.training = None
        self._maybe_retrain(session, loop)  # labels that came in meanwhile

    async def wait_for_training(self, session: SessionInfo) -> None:
        """Until no retraining of the session is running (for tests and benchmarks)."""
        loop = self._loop(session)
        while loop.training is not None:
            await asyncio.shield(loop.training)

    # -- annotator functions ----------------------------------------------------------------------
    async def cells(self, session: SessionInfo, image_id: str, region: Any = None) -> dict:
        """Cells of an image (or of a region ``{x, y, width, height}``, by centroid) with their labels, and the
        whole image's ``n_cells`` and ``n_labelled``."""
        self.provider._check_in_session(session, image_id)
        cells = await self._cells(session, image_id)
        loop = self._loop(session)
        names = [c.name for c in session.classes]
        keep = self._in_region(cells, region)
        out = []
        for i in keep:
            nucleus = cells.nuclei[i]
            label = loop.labels.get((image_id, cells.ids[i]))
            out.append({"cell_id": cells.ids[i], "centroid": nucleus["centroid"], "bbox": nucleus["bbox"],
                        "polygon": nucleus["polygon"], "label": None if label is None else names[label]})
        n_labelled = sum((image_id, c) in loop.labels for c in cells.ids)
        return {"image_id": image_id, "image_shape": list(cells.image_shape), "cells": out,
                "n_cells": len(cells.ids), "n_labelled": n_labelled}  # whole image, for progress

    @staticmethod
    def _in_region(cells: _Cells, region: Any) -> list[int]:
        if region is None:
            return list(range(len(cells.ids)))
        if not isinstance(region, dict) or not {"x", "y", "width", "height"} <= set(region):
            raise InvalidInputError("region must be an object {x, y, width, height} in image pixels")
        values = [region[k] for k in ("x", "y", "width", "height")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values) \
                or values[2] <= 0 or values[3] <= 0:
            raise InvalidInputError(f"region x, y, width, height must be finite numbers with a positive width and "
                                    f"height, got {str(values)[:120]}")
        x0, y0 = float(values[0]), float(values[1])
        x1, y1 = x0 + float(values[2]), y0 + float(values[3])
        c = cells.centroids
        return np.flatnonzero((c[:, 0] >= x0) & (c[:, 0] < x1) & (c[:, 1] >= y0) & (c[:, 1] < y1)).tolist()

    async def suggestions(self, session: SessionInfo, annotator_id: str, image_id: str, region: Any = None) -> dict:
        """Class suggestions for the unlabelled cells of an image or region, once the classifier is ready.

        Each one shown is recorded as a ``suggestion_shown`` event. Returns ``{ready, version,
        labels_needed, suggestions: [{cell_id, class, confidence, uncertainty}]}``.
        """
        self.provider._check_in_session(session, image_id)
        loop = self._loop(session)
        counts = self._counts(session, loop)
        needed = {k: max(0, self.min_labels_per_class - v) for k, v in counts.items()}
        self._maybe_retrain(session, loop)
        if loop.model_id is None:
            return {"ready": False, "version": 0, "labels_needed": needed, "suggestions": []}
        cells = await self._cells(session, image_id)
        rows = [i for i in self._in_region(cells, region) if (image_id, cells.ids[i]) not in loop.labels]
        if not rows:
            return {"ready": True, "version": loop.version, "labels_needed": needed, "suggestions": []}
        prediction = await self.assist.call("classifier", "predict", loop.model_id, cells.features[rows])
        names = [c.name for c in session.classes]
        out = []
        log = self.log(session)
        for j, i in enumerate(rows):
            cls = int(prediction["classes"][j])
            key = (image_id, cells.ids[i])
            if loop.shown.get(key) != cls:
                await asyncio.to_thread(log.append, "suggestion_shown", annotator_id=annotator_id,
                                        image_id=image_id, cell_id=cells.ids[i], **{"class": names[cls]},
                                        confidence=float(prediction["confidence"][j]), version=loop.version)
                loop.shown[key] = cls
                loop.offered.setdefault(key, set()).add(cls)
            out.append({"cell_id": cells.ids[i], "class": names[cls],
                        "confidence": float(prediction["confidence"][j]),
                        "uncertainty": float(prediction["uncertainty"][j])})
        return {"ready": True, "version": loop.version, "labels_needed": needed, "suggestions": out}

    async def label(self, session: SessionInfo, annotator_id: str, image_id: str, cell_id: Any,
                    class_name: str, suggested_class: str | None = None) -> dict:
        """Label a cell: an accepted or corrected suggestion when one was shown for it, else a manual label.

        ``suggested_class`` is the suggestion the annotator saw for the cell, when the client knows it (the
        browser does): the label is recorded as accepting or correcting that one, even if the classifier has
        retrained and suggested something else since (an "accept all" of 100 cells spans several retrainings).
        It must be a class the provider has suggested for this cell (to any annotator, at any time: another
        annotator may have labelled the cell since). Without it, the latest suggestion shown for the cell
        counts.

        Returns ``{event, n_labels, retraining, version}``; retraining runs in the background.
        """
        self.provider._check_in_session(session, image_id)
        cls = self._class_index(session, class_name)
        cells = await self._cells(session, image_id)
        if isinstance(cell_id, bool) or not isinstance(cell_id, int) or cell_id not in cells.index:
            raise NotFoundError(f"unknown cell id {cell_id!r} in image {image_id!r}")
        loop = self._loop(session)
        key = (image_id, cell_id)
        if suggested_class is not None:
            suggested = self._class_index(session, suggested_class)
            if suggested not in loop.offered.get(key, ()):
                raise InvalidInputError(f"no {suggested_class!r} suggestion was ever shown for cell {cell_id} of "
                                        f"image {image_id!r}")
        else:
            suggested = loop.shown.get(key)
        loop.shown.pop(key, None)
        kind = "label" if suggested is None else (
            "suggestion_accepted" if suggested == cls else "suggestion_corrected")
        names = [c.name for c in session.classes]
        fields = {"annotator_id": annotator_id, "image_id": image_id, "cell_id": cell_id, "class": class_name}
        if suggested is not None and suggested >= 0:
            fields["suggested"] = names[suggested]
        await asyncio.to_thread(self.log(session).append, kind, **fields)
        loop.per_annotator[annotator_id] = loop.per_annotator.get(annotator_id, 0) + 1
        if key not in loop.labels:
            loop.order.append(key)
        if loop.labels.get(key) != cls:
            loop.labels[key] = cls
            loop.changes_since_training += 1
        retraining = self._maybe_retrain(session, loop) or loop.training is not None
        return {"event": kind, "n_labels": len(loop.labels), "retraining": retraining, "version": loop.version}

    async def next_patch(self, session: SessionInfo, image_id: str, patch_size: int | None = None,
                         k: int | None = None) -> dict:
        """The patch holding most of the Coreset S of unlabelled cells (k-center greedy on the classifier's
        features once trained, else on the backbone's)."""
        self.provider._check_in_session(session, image_id)
        cells = await self._cells(session, image_id)
        loop = self._loop(session)
        if not cells.ids:
            return {"count": 0, "selected_cells": [], "cells_in_patch": [], "row": None, "col": None}
        features = cells.features
        if loop.model_id is not None:
            features = (await self.assist.call("classifier", "predict", loop.model_id, features))["embedding"]
        labelled = np.asarray([(image_id, c) in loop.labels for c in cells.ids])
        choice = await self.assist.call("coreset", "next_patch", features, labelled, cells.centroids,
                                        list(cells.image_shape), patch_size or self.patch_size, k or self.coreset_k, 0)
        choice["selected_cells"] = [cells.ids[i] for i in choice.pop("selected")]
        choice["cells_in_patch"] = [cells.ids[i] for i in choice.pop("selected_in_patch")]
        return choice

    def status(self, session: SessionInfo) -> dict:
        """Live classifier state: ready, version, labels per class, validation accuracy history."""
        loop = self._loop(session)
        return {"ready": loop.model_id is not None, "version": loop.version, "n_labels": len(loop.labels),
                "start_model": loop.start_model,
                "per_class": self._counts(session, loop), "training": loop.training is not None,
                "val_accuracy": loop.history[-1]["val_accuracy"] if loop.history else None,
                "history": list(loop.history), "per_annotator": dict(loop.per_annotator),
                "min_labels_per_class": self.min_labels_per_class,
                "retrain_every": self.retrain_every}
