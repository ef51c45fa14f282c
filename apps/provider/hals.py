"""The HALS loop for a session (Human-Augmenting AI-based Labeling System, npj Digital Medicine 2021).

Cells come from the nucleus service; their features and the classifier from the classifier service; the
next patch from the Coreset service. This module keeps each session's loop state — labels in annotation
order, suggestions shown and not yet reviewed, the current model — and writes every step to the session's
event log, which is the truth the state is rebuilt from after a restart.

Policy (HALS): suggestions start once every class has ``min_labels_per_class`` labels; the classifier is
retrained in the background after every ``retrain_every`` label changes, never blocking the annotator.
Suggestions pause while relabels take a class below the threshold again, and the classifier retrains as
soon as it is reached again. Stale labels are left out of training and of the class counts (``stale_labels`` in
the status), and their cells show as unlabelled:

* labels on cells that the image's current segmentation no longer has (the image was segmented again, e.g. by
  another segmenter version);
* labels whose cell id the current segmentation still has, but for another nucleus: every label event records
  the labelled cell's centroid ``[x, y]`` (px), and it must lie inside the current cell's box or within 2 px of
  its centroid (:func:`same_nucleus`); events without a centroid (older providers) are trusted;
* labels of an image that the provider can no longer read (deleted, corrupt, gone from the catalog:
  ``get_image`` raises ``NotFoundError``, ``InvalidInputError`` or ``UnreadableImageError``), warned about once;
  training goes on with the other labels, and the image is tried again at every retrain (and at every label
  change while a class lacks labels), so its labels count again once it is back. A model service failing while
  an image is loaded is a failed retrain, never a lost image.

A retrain that fails is retried on the next label change, or after a backoff (``retry_backoff_s``, doubled
after every further failure, at most 5 min) when the annotator asks for suggestions or a patch; the status
tells why it failed, and each distinct failure is logged once.

Concurrency: a session's mutations (a label, a suggestion shown) are serialised by the session's lock and
take effect in memory only once their event is on disk, so a label call returns after its event is written,
a failed write changes nothing, and a cell being labelled is never shown as a suggestion again.

A classifier trained beforehand on pulled labels (``colabel train-classifier``, installed in the classifier
service's store) can start a session whose classes are the same, in the same order: suggestions come from
the first cell; once the session has ``min_labels_per_class`` labels per class, the session's own model,
trained on its labels, takes over and is retrained as usual.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from colabel.errors import InvalidInputError, NotFoundError, UnreadableImageError, shown

from .assist import ModelAssist
from .events import LABEL_KINDS, EventLog
from .models import SessionInfo

logger = logging.getLogger(__name__)

#: Longest wait, in seconds, before a failed retrain is retried without a new label.
_MAX_BACKOFF_S = 300.0

#: Distance in pixels within which a label's recorded centroid names the current cell of the same id whatever
#: that cell's box (see :func:`same_nucleus`).
_CENTROID_TOLERANCE_PX = 2.0

#: ``label_cell`` calls one annotator of a session may make a second, on average, and in one burst (a token bucket):
#: about 4 KB of events a second at most. Accepts of a suggestion (``class_name == suggested_class``) are not counted:
#: an accept is written only for a cell without a live label, so at most once per cell, and "Accept all visible"
#: sends hundreds to thousands of them, one call each, as fast as the provider answers (4 at a time).
LABEL_RATE = 20.0
LABEL_BURST = 200


class TooManyLabelsError(InvalidInputError):
    """An annotator's labels (other than accepts) came faster than :data:`LABEL_RATE` a second, past the burst of
    :data:`LABEL_BURST`: nothing was written."""


@dataclass
class _TokenBucket:
    """Up to ``burst`` tokens, refilled at ``rate`` a second; :meth:`take` spends one or says how long to wait."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, now: float) -> float:
        """Spend a token and return 0, or return the seconds until one is there (nothing spent)."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


#: What ``DataProvider.get_image`` raises for an image it cannot give any more (the file was deleted, is corrupt
#: or unreadable now, or left the catalog); a model service's errors are never among these here.
_IMAGE_UNREADABLE = (NotFoundError, InvalidInputError, UnreadableImageError)


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
    # the labelled cell's centroid [x, y] (px) when its latest label event was written; None: an older event
    centroids: dict[tuple[str, int], tuple[float, float] | None] = field(default_factory=dict)
    shown: dict[tuple[str, int], int] = field(default_factory=dict)  # the latest suggestion shown, per cell
    offered: dict[tuple[str, int], set[int]] = field(default_factory=dict)  # every class ever suggested, per cell
    model_id: str | None = None
    start_model: str | None = None  # the StartModel's name while its model is the one suggesting
    version: int = 0
    changes: int = 0  # label changes ever (a new cell or another class)
    label_events: int = 0  # label events in the log (re-sends of the same class included)
    trained_changes: int | None = None  # ``changes`` at the snapshot the current own model was trained on
    threshold_lost: bool = False  # a class fell below the threshold after the current model's snapshot
    history: list[dict] = field(default_factory=list)
    per_annotator: dict[str, int] = field(default_factory=dict)  # labels given, by annotator id
    # label events by annotator id and kind: {label, suggestion_accepted, suggestion_corrected}
    per_annotator_events: dict[str, dict[str, int]] = field(default_factory=dict)
    labelled_by: dict[tuple[str, int], str | None] = field(default_factory=dict)  # annotator of the latest label
    training: asyncio.Task | None = None
    cells: dict[str, _Cells] = field(default_factory=dict)
    gone: dict[str, str] = field(default_factory=dict)  # labelled images the provider could not read: why
    gone_checked: int = -1  # ``changes`` when the labelled images were last loaded (gone ones tried again)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # serialises the session's logged mutations
    error: str | None = None  # why the last retrain failed; None once one succeeds
    failed_changes: int = 0  # ``changes`` at the snapshot of the last failed retrain
    failures: int = 0  # consecutive failed retrains
    retry_at: float = 0.0  # time.monotonic() after which a failed retrain may run without a new label change
    logged_errors: set[str] = field(default_factory=set)  # failures already logged since the last success
    label_buckets: dict[str, _TokenBucket] = field(default_factory=dict)  # label_cell rate, by annotator id

    @property
    def changes_since_training(self) -> int:
        return self.changes - (self.trained_changes or 0)


def short_error(exc: BaseException, limit: int = 200) -> str:
    """``"<ErrorName>: <first line of its message>"``, at most ``limit`` characters (for a status line).

    Examples
    --------
    >>> short_error(KeyError(120))
    'KeyError: 120'
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def retry_delay(failures: int, base: float) -> float:
    """Seconds to wait before retrying after ``failures`` consecutive failed retrains: ``base * 2 ** (failures
    - 1)``, at most :data:`_MAX_BACKOFF_S`.

    Examples
    --------
    >>> [retry_delay(n, 10.0) for n in (1, 2, 3, 10)]
    [10.0, 20.0, 40.0, 300.0]
    """
    return min(_MAX_BACKOFF_S, base * 2.0 ** max(0, failures - 1))


def recorded_centroid(value: object) -> tuple[float, float] | None:
    """A label event's ``centroid`` as ``(x, y)`` pixels; None when absent or malformed (an older event).

    Examples
    --------
    >>> recorded_centroid([12, 7.5]), recorded_centroid(None), recorded_centroid(["a", 1])
    ((12.0, 7.5), None, None)
    """
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    return float(value[0]), float(value[1])


def same_nucleus(recorded: tuple[float, float], centroid: Any, bbox: Any) -> bool:
    """Whether a label given to a cell whose centroid was ``recorded`` (``[x, y]`` px) still names the current
    cell of that id: centroid ``centroid`` (``[x, y]`` px), pixel-corner box ``bbox`` (``[xmin, ymin, xmax,
    ymax]`` px, as the nucleus service gives it; None or malformed when unknown).

    The recorded centroid must lie inside the current cell's box (edges included), or within
    :data:`_CENTROID_TOLERANCE_PX` (2 px) of its centroid. Why this tolerance:

    * the same segmenter on the same image gives the very same centroid (distance 0);
    * a nucleus's centroid (the mean of its pixel centres) lies inside its own box, and another segmenter's mask
      of the same nucleus differs from the first along the boundary (a pixel or a few), which moves the centroid
      by a fraction of the nucleus's radius: the old centroid stays well inside the new box, which would have to
      lie entirely on one side of it, i.e. hold another object, to miss it. The box scales the tolerance with
      the nucleus (a large nucleus outlined differently may move its centroid by more than a fixed few pixels);
    * another nucleus's centroid lies among that nucleus's pixels, which the current cell's do not overlap, so it
      falls outside the current cell's box except around a strongly concave or diagonal elongated cell (rare);
    * 2 px covers a cell without a usable box and the tiniest boxes: two different nuclei have centroids at
      least about the radius of either apart, so both would need a radius under 2 px (area under ~13 px²),
      smaller than nucleus segmenters keep.

    Examples
    --------
    >>> same_nucleus((20.5, 30.5), [20.5, 30.5], [14, 25, 27, 36])  # the same segmentation
    True
    >>> same_nucleus((23.0, 27.0), [20.5, 30.5], [14, 25, 27, 36])  # re-segmented: moved 4.3 px, inside the box
    True
    >>> same_nucleus((34.0, 31.0), [20.5, 30.5], [14, 25, 27, 36])  # a neighbour's centroid, outside the box
    False
    >>> same_nucleus((21.5, 31.5), [20.5, 30.5], None), same_nucleus((24.0, 30.5), [20.5, 30.5], None)
    (True, False)
    """
    x, y = recorded
    if math.hypot(x - float(centroid[0]), y - float(centroid[1])) <= _CENTROID_TOLERANCE_PX:
        return True
    box = recorded_centroid(bbox[:2]) if isinstance(bbox, (list, tuple)) and len(bbox) == 4 else None
    end = recorded_centroid(bbox[2:]) if box is not None else None
    return box is not None and end is not None and box[0] <= x <= end[0] and box[1] <= y <= end[1]


def replay(events: list[dict], names: list[str], min_labels_per_class: int) -> _Loop:
    """The loop state an event log describes (what a restarted provider starts from).

    Labels, suggestions shown, per-annotator counts and the retrain history are replayed in order. The last
    ``retrain`` event names the session's current model (``model_id``, trained on the labels of the first
    ``label_events`` label events of the log). Logs written before retrain events carried ``model_id`` still
    load: their model is unknown, so the next suggestions call retrains. Each label keeps the centroid its latest
    label event recorded (None for events without one). Cells are not checked here: the segmentation is only
    known once an image's cells are loaded.
    """
    loop = _Loop()
    counts = [0] * len(names)  # labels per class
    changes_after: list[int] = [0]  # changes after the first i label events
    lost_after = -1  # the last label-event count after which a class was below the threshold
    trained_at = 0  # label events the current model was trained on
    for event in events:
        key = (event.get("image_id"), event.get("cell_id"))
        if event["kind"] in LABEL_KINDS:
            if event.get("class") in names:
                cls = names.index(event["class"])
                if key not in loop.labels:
                    loop.order.append(key)
                centroid = recorded_centroid(event.get("centroid"))
                moved = _moved(loop.centroids.get(key), centroid)
                loop.centroids[key] = centroid
                if loop.labels.get(key) != cls or moved:
                    if key in loop.labels:
                        counts[loop.labels[key]] -= 1
                    counts[cls] += 1
                    loop.labels[key] = cls
                    loop.changes += 1
                loop.shown.pop(key, None)
                who = event.get("annotator_id")
                _count_label(loop, who, event["kind"])
                loop.labelled_by[key] = who
            loop.label_events += 1
            changes_after.append(loop.changes)
            if min(counts) < min_labels_per_class:
                lost_after = loop.label_events
        elif event["kind"] == "suggestion_shown":
            loop.shown[key] = names.index(event["class"]) if event.get("class") in names else -1
            loop.offered.setdefault(key, set()).add(loop.shown[key])
        elif event["kind"] == "retrain":
            loop.history.append({k: event[k] for k in ("n_labels", "val_accuracy", "val_labels", "version")
                                 if k in event})
            loop.version = event.get("version", loop.version)
            seen = event.get("label_events")
            seen = loop.label_events if not isinstance(seen, int) or not 0 <= seen <= loop.label_events else seen
            loop.model_id = event.get("model_id") if isinstance(event.get("model_id"), str) else None
            loop.trained_changes = changes_after[seen] if loop.model_id else None
            trained_at = seen
    loop.threshold_lost = lost_after > trained_at
    return loop


def _count_label(loop: _Loop, annotator_id: str | None, kind: str) -> None:
    """Count a label event of ``kind`` (one of :data:`LABEL_KINDS`) given by ``annotator_id``."""
    loop.per_annotator[annotator_id] = loop.per_annotator.get(annotator_id, 0) + 1
    counts = loop.per_annotator_events.setdefault(annotator_id, dict.fromkeys(LABEL_KINDS, 0))
    counts[kind] = counts.get(kind, 0) + 1


def _moved(before: tuple[float, float] | None, after: tuple[float, float] | None) -> bool:
    """A label event on a cell whose recorded centroid differs from its previous label event's: the cell id of
    another segmentation, so the label may name another nucleus now (a label change, as another class is)."""
    return before is not None and after is not None and before != after


class HalsAssist:
    """Suggestions, labels and next-patch guidance for every session of a provider.

    Parameters
    ----------
    assist : ModelAssist
        Reaches the nuclei, classifier and coreset model services.
    min_labels_per_class : int
        Labels every class needs before suggestions start (HALS: 10).
    retrain_every : int
        Label changes between retrains (HALS: 5).
    patch_size : int
        Side of the guidance grid's patches in pixels (``next_patch``'s default; ``bench/hals.py --grid``).
    coreset_k : int
        Cells in the Coreset selection of ``next_patch`` (``bench/hals.py --k``).
    start_model : StartModel, optional
        A classifier to start sessions with these classes from.
    retry_backoff_s : float
        Seconds before a failed retrain is retried without a new label change (doubled after every further
        consecutive failure, at most 300 s). A label change retries at once.
    label_rate, label_burst : float, int
        ``label_cell`` calls (accepts of a suggestion aside) one annotator may make a second, and in one burst
        (:data:`LABEL_RATE`, :data:`LABEL_BURST`); more are refused with :class:`TooManyLabelsError`.
    """

    def __init__(self, assist: ModelAssist, *, min_labels_per_class: int = 10, retrain_every: int = 5,
                 patch_size: int = 128, coreset_k: int = 10, start_model: StartModel | None = None,
                 retry_backoff_s: float = 10.0, label_rate: float = LABEL_RATE,
                 label_burst: int = LABEL_BURST) -> None:
        self.assist = assist
        self.start_model = start_model
        self.provider = assist.provider
        self.min_labels_per_class = min_labels_per_class
        self.retrain_every = retrain_every
        self.patch_size = patch_size
        self.coreset_k = coreset_k
        self.retry_backoff_s = float(retry_backoff_s)
        self.label_rate = float(label_rate)
        self.label_burst = int(label_burst)
        self.clock: Callable[[], float] = time.monotonic  # the label rate's clock (tests move it by hand)
        self._loops: dict[str, _Loop] = {}
        self._cell_locks: dict[tuple[str, str], asyncio.Lock] = {}

    # -- state ------------------------------------------------------------------------------------
    def log(self, session: SessionInfo) -> EventLog:
        return EventLog(self.provider.store.session_dir(session.session_id) / "events.jsonl")

    def _class_index(self, session: SessionInfo, name: object) -> int:
        names = [c.name for c in session.classes]
        if name not in names:
            raise InvalidInputError(f"class {shown(name)} is not a class of this session (allowed: {names})")
        return names.index(name)

    def _loop(self, session: SessionInfo) -> _Loop:
        loop = self._loops.get(session.session_id)
        if loop is None:  # rebuild from the event log
            names = [c.name for c in session.classes]
            loop = replay(self.log(session).read(), names, self.min_labels_per_class)
            start = self.start_model
            if loop.model_id is None and start is not None and start.classes == tuple(names):
                loop.model_id, loop.start_model = start.model_id, start.name
            self._loops[session.session_id] = loop
        return loop

    async def _cells(self, session: SessionInfo, image_id: str, *, skip_unreadable: bool = False) -> _Cells | None:
        """An image's cells: segmented and their features computed on first use, then cached for the session.

        With ``skip_unreadable`` (training), an image that the provider cannot give any more (``get_image`` raises
        one of :data:`_IMAGE_UNREADABLE`) is recorded as gone, its labels stale, and None is returned; the model
        services' errors raise whatever the flag. Without it (annotator calls), the provider's error raises.
        """
        loop = self._loop(session)
        if image_id in loop.cells:
            return loop.cells[image_id]
        lock = self._cell_locks.setdefault((session.session_id, image_id), asyncio.Lock())
        async with lock:
            if image_id not in loop.cells:
                try:
                    pixels = await asyncio.to_thread(self.provider.get_image, image_id, session=session)
                except _IMAGE_UNREADABLE as exc:
                    if not skip_unreadable:
                        raise
                    self._image_gone(session, loop, image_id, exc)
                    return None
                result = await self.assist.call("nuclei", "segment", pixels, None, None, None, True)
                nuclei = result["nuclei"]
                centroids = np.asarray([n["centroid"] for n in nuclei], dtype=np.float64).reshape(-1, 2)
                ids = [int(n["id"]) for n in nuclei]
                # HALS cell features: CNN on nucleus-scaled patches + per-nucleus stain and shape measurements.
                features = (await self.assist.call("classifier", "features", pixels, centroids,
                                                   np.asarray(result["labels"]), np.asarray(ids, np.int64))
                            if len(nuclei) else np.zeros((0, 1292), np.float32))
                cells = _Cells(ids, centroids, nuclei, np.asarray(features, np.float32),
                               tuple(pixels.shape[:2]), {c: i for i, c in enumerate(ids)})
                reached = self._threshold_reached(session, loop)
                loop.cells[image_id] = cells
                if loop.gone.pop(image_id, None) is not None:
                    logger.info("session %s: image %s can be read again; its labels count again",
                                session.session_id, image_id)
                keys = [k for k in loop.labels if k[0] == image_id]
                missing = sum(1 for k in keys if k[1] not in cells.index)
                moved = sum(1 for k in keys if k[1] in cells.index and self._is_stale(loop, k))
                if missing or moved:
                    logger.warning("session %s: %d labelled cell(s) of image %s are stale (%d not in its current "
                                   "segmentation, %d another nucleus there now: centroid moved); they are left out "
                                   "of training", session.session_id, missing + moved, image_id, missing, moved)
                if reached and not self._threshold_reached(session, loop):
                    loop.threshold_lost = True
        return loop.cells[image_id]

    def _image_gone(self, session: SessionInfo, loop: _Loop, image_id: str, exc: Exception) -> None:
        """Leave the labels of an image the provider could not read out (stale) until it can be read again;
        warns once per disappearance."""
        reached = self._threshold_reached(session, loop)
        if image_id not in loop.gone:
            n = sum(1 for i, _ in loop.labels if i == image_id)
            logger.warning("session %s: labelled image %s cannot be read any more (%s); its %d label(s) are left "
                           "out of training until it can be read again (tried again at every retrain)",
                           session.session_id, image_id, short_error(exc), n)
        loop.gone[image_id] = short_error(exc)
        if reached and not self._threshold_reached(session, loop):
            loop.threshold_lost = True

    @staticmethod
    def _is_stale(loop: _Loop, key: tuple[str, int]) -> bool:
        """A label left out of training: its image could not be read at the last try; or the image's current
        segmentation lacks the cell, or has a cell of that id that is another nucleus than the one labelled (see
        :func:`same_nucleus`; a label without a recorded centroid is trusted). False while the image is not
        loaded (not known yet)."""
        cells = loop.cells.get(key[0])
        if cells is None:
            return key[0] in loop.gone
        row = cells.index.get(key[1])
        if row is None:
            return True
        recorded = loop.centroids.get(key)
        return recorded is not None and not same_nucleus(recorded, cells.centroids[row],
                                                         cells.nuclei[row].get("bbox"))

    def _labelled(self, loop: _Loop, key: tuple[str, int]) -> bool:
        """The cell has a label that counts (a stale label's cell is unlabelled to annotators and suggestions)."""
        return key in loop.labels and not self._is_stale(loop, key)

    def _live(self, loop: _Loop) -> list[tuple[str, int]]:
        """Labelled cells in annotation order, without the stale ones."""
        return [k for k in loop.order if k in loop.labels and not self._is_stale(loop, k)]

    def _counts(self, session: SessionInfo, loop: _Loop) -> dict[str, int]:
        names = [c.name for c in session.classes]
        counts = dict.fromkeys(names, 0)
        for key in self._live(loop):
            counts[names[loop.labels[key]]] += 1
        return counts

    def _threshold_reached(self, session: SessionInfo, loop: _Loop) -> bool:
        return min(self._counts(session, loop).values()) >= self.min_labels_per_class

    def _suggesting(self, session: SessionInfo, loop: _Loop) -> bool:
        """Suggestions are on: a start model, or the session's own model while every class has enough labels."""
        return loop.model_id is not None and (loop.start_model is not None or self._threshold_reached(session, loop))

    async def _logged(self, session: SessionInfo, kind: str, fields: dict, apply: Callable[[], None]) -> None:
        """Append an event, then ``apply`` its effect on the in-memory state: the state never holds what the log
        lacks, and a failed write changes nothing. Cancelled while writing, the state follows once the write
        lands."""
        write = asyncio.ensure_future(asyncio.to_thread(self.log(session).append, kind, **fields))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            write.add_done_callback(lambda t: None if t.cancelled() or t.exception() is not None else apply())
            raise
        apply()

    # -- training ---------------------------------------------------------------------------------
    def _retrain_due(self, session: SessionInfo, loop: _Loop) -> bool:
        if not self._threshold_reached(session, loop):
            # the labels of an image that could not be read may be what a class lacks: a label change tries it
            # again (the retrain fits only if the threshold is reached then)
            return bool(loop.gone) and loop.changes != loop.gone_checked
        if loop.error is not None and loop.changes == loop.failed_changes and time.monotonic() < loop.retry_at:
            return False  # failed on these very labels: wait for a label change or the backoff
        own = loop.model_id is not None and loop.start_model is None  # a model trained on this session
        return (not own or loop.trained_changes is None or loop.threshold_lost
                or loop.changes_since_training >= self.retrain_every)

    def _maybe_retrain(self, session: SessionInfo, loop: _Loop) -> bool:
        if (loop.training is None or loop.training.done()) and self._retrain_due(session, loop):
            loop.training = asyncio.ensure_future(self._retrain(session, loop))
            return True
        return False

    async def _load_labelled_images(self, session: SessionInfo, loop: _Loop) -> None:
        """Until the cells of every image with a label are loaded (labels may arrive meanwhile), or the provider
        could not read the image this time (its labels stay stale; tried again at the next retrain)."""
        loop.gone_checked = loop.changes
        tried: set[str] = set()
        while True:
            missing = sorted({image_id for image_id, _ in loop.order} - set(loop.cells) - tried)
            if not missing:
                return
            for image_id in missing:
                tried.add(image_id)
                await self._cells(session, image_id, skip_unreadable=True)

    async def _retrain(self, session: SessionInfo, loop: _Loop) -> None:
        snapshot_changes, lost = loop.changes, loop.threshold_lost
        try:
            await self._load_labelled_images(session, loop)
            # the snapshot, synchronously: labels that arrive during fit count towards the next retrain
            snapshot_changes, lost = loop.changes, loop.threshold_lost
            if self._threshold_reached(session, loop):  # else stale labels keep a class below it: wait for labels
                await self._fit(session, loop, self._live(loop))
        except Exception as exc:  # noqa: BLE001 - the loop goes on; a label change or the backoff retries
            loop.threshold_lost = loop.threshold_lost or lost
            self._failed(session, loop, exc, snapshot_changes)
        finally:
            loop.training = None
        self._maybe_retrain(session, loop)  # labels that came in meanwhile

    async def _fit(self, session: SessionInfo, loop: _Loop, keys: list[tuple[str, int]]) -> None:
        """Train on the labels of ``keys`` (loaded, live cells), log the ``retrain`` event (with the model id and
        the label events it learnt from, so a restart restores the model), then make the model current."""
        snapshot_changes, label_events = loop.changes, loop.label_events
        loop.threshold_lost = False
        features = np.stack([loop.cells[i].features[loop.cells[i].index[c]] for i, c in keys])
        labels = np.asarray([loop.labels[k] for k in keys])
        report = await self.assist.call("classifier", "fit", features, labels, len(session.classes), 0)
        entry = {"n_labels": len(keys), "val_accuracy": report["val_accuracy"], "version": loop.version + 1}
        if isinstance(report.get("n_val"), int) and report["n_val"] > 0:  # older classifier services lack it
            entry["val_labels"] = report["n_val"]  # the held-out labels the accuracy was measured on

        def apply() -> None:
            if loop.error is not None:
                logger.info("retraining the HALS classifier of session %s works again", session.session_id)
            loop.model_id, loop.start_model = report["model_id"], None
            loop.version = entry["version"]
            loop.trained_changes = snapshot_changes
            loop.history.append(entry)
            loop.error, loop.failures = None, 0
            loop.logged_errors.clear()

        await self._logged(session, "retrain", {"seconds": report["seconds"], **entry,
                                                "model_id": report["model_id"], "label_events": label_events}, apply)

    def _failed(self, session: SessionInfo, loop: _Loop, exc: Exception, snapshot_changes: int) -> None:
        message = short_error(exc)
        loop.error, loop.failed_changes = message, snapshot_changes
        loop.failures += 1
        loop.retry_at = time.monotonic() + retry_delay(loop.failures, self.retry_backoff_s)
        if message not in loop.logged_errors:  # each distinct failure once, with its traceback
            loop.logged_errors.add(message)
            logger.error("retraining the HALS classifier of session %s failed (retried on the next label change "
                         "or after a backoff): %s", session.session_id, message, exc_info=exc)

    async def wait_for_training(self, session: SessionInfo) -> None:
        """Until no retraining of the session is running (for tests and benchmarks)."""
        loop = self._loop(session)
        while loop.training is not None:
            await asyncio.shield(loop.training)

    async def _predict(self, session: SessionInfo, loop: _Loop, features: np.ndarray) -> dict | None:
        """The current model's ``predict``; None (and a retrain when due) when the classifier service no longer
        has the model, e.g. one restored from the event log after a restart whose store was cleared."""
        model_id = loop.model_id
        try:
            return await self.assist.call("classifier", "predict", model_id, features)
        except NotFoundError:
            if loop.model_id == model_id:
                logger.warning("session %s: the classifier service has no model %s any more; retraining",
                               session.session_id, model_id)
                loop.model_id, loop.start_model, loop.trained_changes = None, None, None
                self._maybe_retrain(session, loop)
            return None

    # -- annotator functions ----------------------------------------------------------------------
    async def cells(self, session: SessionInfo, image_id: str, region: Any = None) -> dict:
        """Cells of an image (or of a region ``{x, y, width, height}``, by centroid) with their labels (None for a
        stale one: the cell of that id is another nucleus now), and the whole image's ``n_cells`` and
        ``n_labelled``."""
        self.provider._check_in_session(session, image_id)
        cells = await self._cells(session, image_id)
        loop = self._loop(session)
        names = [c.name for c in session.classes]
        keep = self._in_region(cells, region)
        out = []
        for i in keep:
            nucleus = cells.nuclei[i]
            key = (image_id, cells.ids[i])
            label = loop.labels[key] if self._labelled(loop, key) else None
            out.append({"cell_id": cells.ids[i], "centroid": nucleus["centroid"], "bbox": nucleus["bbox"],
                        "polygon": nucleus["polygon"], "label": None if label is None else names[label]})
        n_labelled = sum(self._labelled(loop, (image_id, c)) for c in cells.ids)
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
        """Class suggestions for the unlabelled cells of an image or region, while the classifier is ready.

        Each one shown is recorded as a ``suggestion_shown`` event. Returns ``{ready, version,
        labels_needed, suggestions: [{cell_id, class, confidence, uncertainty}]}``.
        """
        self.provider._check_in_session(session, image_id)
        cells = await self._cells(session, image_id)
        loop = self._loop(session)
        self._maybe_retrain(session, loop)

        def needed() -> dict[str, int]:
            return {k: max(0, self.min_labels_per_class - v) for k, v in self._counts(session, loop).items()}

        if not self._suggesting(session, loop):
            return {"ready": False, "version": loop.version, "labels_needed": needed(), "suggestions": []}
        rows = [i for i in self._in_region(cells, region) if not self._labelled(loop, (image_id, cells.ids[i]))]
        if not rows:
            return {"ready": True, "version": loop.version, "labels_needed": needed(), "suggestions": []}
        prediction = await self._predict(session, loop, cells.features[rows])
        if prediction is None:
            return {"ready": False, "version": loop.version, "labels_needed": needed(), "suggestions": []}
        names = [c.name for c in session.classes]
        out = []
        for j, i in enumerate(rows):
            cls = int(prediction["classes"][j])
            key = (image_id, cells.ids[i])
            async with loop.lock:  # a label of this cell in flight is written (and applied) first
                if self._labelled(loop, key):
                    continue  # labelled since the rows were chosen: no suggestion for it

                def show(key=key, cls=cls) -> None:
                    loop.shown[key] = cls
                    loop.offered.setdefault(key, set()).add(cls)

                if loop.shown.get(key) != cls:
                    await self._logged(session, "suggestion_shown", {
                        "annotator_id": annotator_id, "image_id": image_id, "cell_id": cells.ids[i],
                        "class": names[cls], "confidence": float(prediction["confidence"][j]),
                        "version": loop.version}, show)
            out.append({"cell_id": cells.ids[i], "class": names[cls],
                        "confidence": float(prediction["confidence"][j]),
                        "uncertainty": float(prediction["uncertainty"][j])})
        return {"ready": True, "version": loop.version, "labels_needed": needed(), "suggestions": out}

    async def label(self, session: SessionInfo, annotator_id: str, image_id: str, cell_id: Any,
                    class_name: str, suggested_class: str | None = None) -> dict:
        """Label a cell: an accepted or corrected suggestion when one was shown for it, else a manual label.

        ``suggested_class`` is the suggestion the annotator saw for the cell, when the client knows it (the
        browser does): the label is recorded as accepting or correcting that one, even if the classifier has
        retrained and suggested something else since (an "accept all" of 100 cells spans several retrainings).
        It must be a class the provider has suggested for this cell (to any annotator, at any time: another
        annotator may have labelled the cell since). Without it, the latest suggestion shown for the cell
        counts.

        An accept (``class_name == suggested_class``) of a cell that has a live label already is stale: the
        annotator saw a suggestion for a cell that someone labelled since (their page had not caught up). It
        is not written, so a machine suggestion never replaces a human label; the answer has ``event`` None and
        ``already_labelled``: ``{class, annotator_id, display_name}`` of the cell's current label. A correction
        (another class than the suggestion) is the annotator's own choice and is written as usual.

        While suggestions are paused (relabels took a class below ``min_labels_per_class``; not while a start
        model suggests), a label reviews no suggestion: it is a plain ``label`` event, whatever was shown.

        A label the cell has already, given by the same annotator (a key pressed again, a call retried), changes
        nothing and is not written: the answer has ``event`` None and ``unchanged`` True, with the current state.

        Returns ``{event, n_labels, retraining, version}`` (and ``already_labelled`` or ``unchanged``, see above) once
        the event is on disk; retraining runs in the background. ``n_labels`` leaves out stale labels (cells the
        current segmentation lacks).

        Rate: each annotator may make ``label_rate`` calls a second (20), ``label_burst`` (200) at once; more are
        refused with :class:`TooManyLabelsError` (nothing written) until the bucket refills. Accepts of a suggestion
        (``class_name == suggested_class``) are not counted: each cell takes at most one, and "Accept all visible"
        sends one call per cell in view.
        """
        self.provider._check_in_session(session, image_id)
        cls = self._class_index(session, class_name)
        if suggested_class is not None:
            suggested_index = self._class_index(session, suggested_class)
        if suggested_class is None or suggested_class != class_name:
            self._take_label_token(session, annotator_id)
        cells = await self._cells(session, image_id)
        if isinstance(cell_id, bool) or not isinstance(cell_id, int) or cell_id not in cells.index:
            raise NotFoundError(f"unknown cell id {shown(cell_id)} in image {shown(image_id)}")
        loop = self._loop(session)
        key = (image_id, cell_id)
        names = [c.name for c in session.classes]
        async with loop.lock:  # decided and applied against the state no other mutation is changing
            if suggested_class is not None:
                suggested = suggested_index
                if suggested not in loop.offered.get(key, ()):
                    raise InvalidInputError(f"no {shown(suggested_class)} suggestion was ever shown for cell {cell_id} "
                                            f"of image {shown(image_id)}")
                if suggested == cls and self._labelled(loop, key):  # a stale accept: the human label stays
                    return {"event": None, "already_labelled": self._current_label(session, loop, key, names),
                            "n_labels": len(self._live(loop)), "retraining": loop.training is not None,
                            "version": loop.version}
            else:
                suggested = loop.shown.get(key)
            # the cell's centroid (px) as labelled: a later segmentation's cell of this id must match it
            x, y = cells.centroids[cells.index[cell_id]]
            centroid = (float(x), float(y))
            if (self._labelled(loop, key) and loop.labels[key] == cls and loop.labelled_by.get(key) == annotator_id
                    and not _moved(loop.centroids.get(key), centroid)):  # the same label again: nothing changes
                return {"event": None, "unchanged": True, "n_labels": len(self._live(loop)),
                        "retraining": loop.training is not None, "version": loop.version}
            if suggested is not None and self._paused(session, loop):
                suggested = None  # the loop withdrew its suggestions: nothing is reviewed
            kind = "label" if suggested is None else (
                "suggestion_accepted" if suggested == cls else "suggestion_corrected")
            fields = {"annotator_id": annotator_id, "image_id": image_id, "cell_id": cell_id, "class": class_name,
                      "centroid": list(centroid)}
            if suggested is not None and suggested >= 0:
                fields["suggested"] = names[suggested]

            def apply() -> None:
                loop.shown.pop(key, None)
                loop.label_events += 1
                _count_label(loop, annotator_id, kind)
                loop.labelled_by[key] = annotator_id
                if key not in loop.labels:
                    loop.order.append(key)
                moved = _moved(loop.centroids.get(key), centroid)
                loop.centroids[key] = centroid
                if loop.labels.get(key) != cls or moved:
                    loop.labels[key] = cls
                    loop.changes += 1
                    if not self._threshold_reached(session, loop):
                        loop.threshold_lost = True  # suggestions pause; the next training is due on reaching it

            await self._logged(session, kind, fields, apply)
        retraining = self._maybe_retrain(session, loop) or loop.training is not None
        return {"event": kind, "n_labels": len(self._live(loop)), "retraining": retraining, "version": loop.version}

    def _take_label_token(self, session: SessionInfo, annotator_id: str) -> None:
        """Spend one of the annotator's label tokens, or refuse the label with :class:`TooManyLabelsError`."""
        loop = self._loop(session)
        now = self.clock()
        bucket = loop.label_buckets.get(annotator_id)
        if bucket is None:
            bucket = loop.label_buckets[annotator_id] = _TokenBucket(self.label_rate, self.label_burst,
                                                                     float(self.label_burst), now)
        wait = bucket.take(now)
        if wait > 0:
            raise TooManyLabelsError(
                f"too many labels at once: an annotator may label at most {self.label_rate:g} cells a second "
                f"({self.label_burst} in a burst; accepted suggestions are not counted); this label was not saved, "
                f"try again in {max(wait, 0.1):.1f} s")

    def _paused(self, session: SessionInfo, loop: _Loop) -> bool:
        """Suggestions are withdrawn by the policy: no start model suggests and a class lacks labels."""
        return loop.start_model is None and not self._threshold_reached(session, loop)

    def _current_label(self, session: SessionInfo, loop: _Loop, key: tuple[str, int], names: list[str]) -> dict:
        """A labelled cell's ``{class, annotator_id, display_name}`` (the display name: the id when unknown)."""
        who = loop.labelled_by.get(key)
        try:
            annotator = self.provider.sessions.annotators(session.session_id).get(who)
        except NotFoundError:
            annotator = None
        name = annotator.display_name if annotator is not None else who
        return {"class": names[loop.labels[key]], "annotator_id": who, "display_name": name}

    async def next_patch(self, session: SessionInfo, image_id: str, patch_size: int | None = None,
                         k: int | None = None) -> dict:
        """The patch holding most of the Coreset S of unlabelled cells of this image (k-center greedy on the
        classifier's features while suggestions are on, else on the cell features). Only this image's labelled
        cells are Coreset's initial centres."""
        self.provider._check_in_session(session, image_id)
        cells = await self._cells(session, image_id)
        loop = self._loop(session)
        if not cells.ids:
            return {"count": 0, "selected_cells": [], "cells_in_patch": [], "row": None, "col": None,
                    "x0": None, "y0": None, "x1": None, "y1": None}
        self._maybe_retrain(session, loop)
        features = cells.features
        if self._suggesting(session, loop):
            prediction = await self._predict(session, loop, features)
            if prediction is not None:
                features = prediction["embedding"]
        labelled = np.asarray([self._labelled(loop, (image_id, c)) for c in cells.ids], dtype=bool)
        choice = await self.assist.call("coreset", "next_patch", features, labelled, cells.centroids,
                                        list(cells.image_shape), patch_size or self.patch_size, k or self.coreset_k, 0)
        choice["selected_cells"] = [cells.ids[i] for i in choice.pop("selected")]
        choice["cells_in_patch"] = [cells.ids[i] for i in choice.pop("selected_in_patch")]
        return choice

    def status(self, session: SessionInfo) -> dict:
        """Live classifier state: ready, version, labels per class, self-validation accuracy (and on how many
        held-out labels) with its history, the last retrain's failure, stale labels, label events per annotator
        (in all and by kind)."""
        loop = self._loop(session)
        live = self._live(loop)
        return {"ready": self._suggesting(session, loop), "version": loop.version, "n_labels": len(live),
                "stale_labels": len(loop.labels) - len(live),
                "start_model": loop.start_model,
                "per_class": self._counts(session, loop), "training": loop.training is not None,
                "retrain_error": loop.error,
                "val_accuracy": loop.history[-1]["val_accuracy"] if loop.history else None,
                "val_labels": loop.history[-1].get("val_labels") if loop.history else None,
                "history": list(loop.history), "per_annotator": dict(loop.per_annotator),
                "per_annotator_events": {a: dict(c) for a, c in loop.per_annotator_events.items()},
                "min_labels_per_class": self.min_labels_per_class,
                "retrain_every": self.retrain_every}
