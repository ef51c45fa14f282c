"""The data provider: one mounted folder's images, sessions and annotations, with no transport.

:class:`DataProvider` is what the Hypha services in :mod:`colabel.apps.provider.rpc` call. Provider
functions take a session id; annotator functions take the :class:`SessionInfo` that a share token opened
(:meth:`SessionStore.authorize`), so nothing here can reach outside that session. Every method validates
its input before it writes anything.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from colabel.config import ColabelConfig, annotations_dir
from colabel.errors import InvalidInputError, NotFoundError, PayloadTooLargeError, SessionClosedError, shown

from .annotations import rasterize, validate_feature_collection
from .images import ImageCatalog
from .models import AnnotationRecord, Assignment, ImageInfo, Progress, Region, SessionInfo
from .sessions import SessionStore
from .storage import AnnotationStore

#: A save's writer id: one per page or client (the annotator page makes a random one per tab).
_WRITER = re.compile(r"[A-Za-z0-9_-]{1,64}")

#: A stored version's features (compact JSON) may take at most this many times ``max_annotation_bytes``. Validation
#: adds what the stored form needs (ids, ``objectType``, floats, closed rings): at most about 2.4 times the compact
#: JSON sent, for a collection of minimal features; the check bounds the disk a save can take whatever it holds.
STORED_BYTES_FACTOR = 4


def _region(region: object) -> Region | None:
    if region is None:
        return None
    if isinstance(region, Region):
        return region
    if not isinstance(region, dict):
        raise InvalidInputError(f"region must be an object {{x, y, width, height}}, got {type(region).__name__}")
    try:
        return Region.model_validate(region)
    except ValidationError as exc:
        raise InvalidInputError(f"invalid region {shown(region)}: {exc.errors()[0]['msg']}") from None


def _level(level: object) -> int:
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise InvalidInputError(f"level must be a non-negative integer, got {shown(level)}")
    return level


class DataProvider:
    """Images, sessions and annotations of one mounted folder.

    Parameters
    ----------
    folder : str or Path
        The mounted folder. Its images are only ever read; annotations go to ``folder/annotations``.
    config : ColabelConfig, optional
        Size limits (``max_annotation_bytes``, ``max_features``, ``max_image_bytes``, ``max_session_bytes``,
        ``min_free_bytes``).
    read_only : bool
        Open the folder for reading only (``colabel report``, a local ``colabel pull``, possibly while a
        ``colabel serve`` of the same folder runs): nothing in the folder is created, changed or deleted, and
        saves, joins, assignments and session changes are refused (:class:`AccessDeniedError`).
    """

    def __init__(self, folder: str | Path, config: ColabelConfig | None = None, *, read_only: bool = False) -> None:
        self.config = config or ColabelConfig()
        self.folder = Path(folder)
        self.read_only = read_only
        self.catalog = ImageCatalog(self.folder, pixel_cache_bytes=self.config.pixel_cache_bytes)
        root = annotations_dir(self.folder)
        self.store = AnnotationStore(root, read_only=read_only, max_session_bytes=self.config.max_session_bytes,
                                     min_free_bytes=self.config.min_free_bytes)
        self.sessions = SessionStore(root, assignment_lease=self.config.assignment_lease, read_only=read_only)

    # -- images -----------------------------------------------------------------------------------
    def session_image_ids(self, session: SessionInfo) -> list[str]:
        """The session's images in folder order (all images when the session names none)."""
        ids = [r.image_id for r in self.catalog.records()]
        if session.image_ids is None:
            return ids
        wanted = set(session.image_ids)
        return [i for i in ids if i in wanted]

    def readable_image_ids(self, session: SessionInfo) -> list[str]:
        """The session's images that can be read, in folder order (what annotators are assigned)."""
        return [i for i in self.session_image_ids(session) if self.catalog.get(i).error is None]

    def _check_in_session(self, session: SessionInfo, image_id: object) -> str:
        record = self.catalog.get(image_id)  # NotFoundError / InvalidInputError for unknown ids
        if session.image_ids is not None and record.image_id not in session.image_ids:
            raise NotFoundError(f"unknown image id {shown(image_id)} in this session")
        return record.image_id

    def image_info(self, image_id: str, session: SessionInfo | None = None) -> ImageInfo:
        """An image's :class:`ImageInfo`, with status and counts for ``session`` when given."""
        return self._image_info(image_id, session, self._session_state(session) if session is not None else None)

    def _session_state(self, session: SessionInfo) -> tuple[dict, dict, dict, dict]:
        """What :meth:`_image_info` reads of a session, read once for every image of a listing: versions per image
        and annotator, assignments, finishes and returns."""
        sid = session.session_id
        return (self.store.counts(sid), self.sessions.assignments(sid), self.store.finished(sid),
                self.store.returned(sid))

    def _image_info(self, image_id: str, session: SessionInfo | None, state: tuple | None) -> ImageInfo:
        info = self.catalog.get(image_id).info()
        if session is None or info.error:
            return info
        counts, assignments, finished, returned = state
        info.annotations = dict(counts.get(info.image_id, {}))
        info.finished = {a: f["version"] for a, f in finished.get(info.image_id, {}).items()}
        info.returned = {a: r["comment"] for a, r in returned.get(info.image_id, {}).items()}
        if len(info.annotations) >= session.annotators_per_image:
            info.status = "annotated"
        elif info.annotations or assignments.get(info.image_id):
            info.status = "in_progress"
        return info

    def list_images(self, session: SessionInfo | None = None) -> list[ImageInfo]:
        """Every image (of the session, when given), in folder order, unreadable ones included."""
        ids = self.session_image_ids(session) if session else [r.image_id for r in self.catalog.records()]
        state = self._session_state(session) if session is not None else None
        return [self._image_info(i, session, state) for i in ids]

    def get_image(self, image_id: str, *, region: object = None, level: object = 0,
                  session: SessionInfo | None = None) -> np.ndarray:
        """Pixels ``(height, width, channels)`` in the file's dtype: whole, a region, or a level."""
        if session is not None:
            self._check_in_session(session, image_id)
        return self.catalog.read(
            image_id, region=_region(region), level=_level(level), max_bytes=self.config.max_image_bytes
        )

    # -- annotations ------------------------------------------------------------------------------
    def save_annotation(self, session: SessionInfo, image_id: str, annotator_id: str,
                        feature_collection: object, *,
                        still_allowed: Callable[[], object] | None = None,
                        base_version: int | None = None, writer: str | None = None) -> AnnotationRecord:
        """Validate, rasterise and commit a new version; nothing is written when any check fails.

        ``still_allowed`` is called right before the commit and may refuse it by raising (see
        :meth:`AnnotationStore.save`): the session's state and the caller's token are checked again there.
        ``base_version`` (optional): the version the drawing was made on, 0 for none; the save is refused with
        :class:`ConflictError` unless it is still the annotator's latest, or the latest holds exactly these features
        (a save retried after its answer was lost: that version's record is returned, no new version is made), or
        every version since was saved with the same ``writer`` (an id of the sending page or client, 1-64 letters,
        digits, ``-``, ``_``): its own saves whose answers were lost, drawn on since.

        Sizes: the payload is at most ``max_annotation_bytes`` (:class:`PayloadTooLargeError`), each feature's
        properties nest at most 8 levels and hold at most 10,000 values (:class:`InvalidInputError`, see
        :func:`validate_feature_collection`), and the stored version (compact JSON) may take at most
        :data:`STORED_BYTES_FACTOR` times ``max_annotation_bytes`` (:class:`PayloadTooLargeError`).
        """
        image_id = self._check_in_session(session, image_id)
        annotator = self.sessions.annotator(session.session_id, annotator_id)
        if base_version is not None:
            if isinstance(base_version, bool) or not isinstance(base_version, int) or base_version < 0:
                raise InvalidInputError(f"base_version must be a version number (0: none), got {shown(base_version)}")
        if writer is not None and not (isinstance(writer, str) and _WRITER.fullmatch(writer)):
            raise InvalidInputError(f"writer must be 1-64 letters, digits, '-' or '_', got {shown(writer)}")
        record = self.catalog.check_unchanged(image_id)
        if record.error or record.shape is None:
            raise InvalidInputError(f"image {shown(image_id)} is unreadable and cannot be annotated: {record.error}")
        if isinstance(feature_collection, (bytes, bytearray)):
            size = len(feature_collection)
        elif isinstance(feature_collection, str):
            size = len(feature_collection.encode("utf-8"))
        else:
            try:
                size = len(json.dumps(feature_collection, default=str, ensure_ascii=False).encode("utf-8"))
            except (TypeError, ValueError, RecursionError) as exc:  # non-string keys, huge ints, deep nesting
                raise InvalidInputError(f"annotations are not a JSON object: {str(exc)[:200]}") from None
        if size > self.config.max_annotation_bytes:
            raise PayloadTooLargeError(
                f"annotation of {size} bytes exceeds the limit of {self.config.max_annotation_bytes} bytes"
            )
        height, width = record.shape[:2]
        fc = validate_feature_collection(
            feature_collection, image_shape=(height, width), classes=session.classes,
            max_features=self.config.max_features,
        )
        labels = rasterize(fc, shape=(height, width))
        return self.store.save(
            fc, labels, session_id=session.session_id, image_id=image_id, image_name=record.name,
            annotator_id=annotator.annotator_id, display_name=annotator.display_name, still_allowed=still_allowed,
            base_version=base_version, writer=writer,
            max_bytes=STORED_BYTES_FACTOR * self.config.max_annotation_bytes,
        )

    def get_annotations(self, session: SessionInfo, image_id: str, *, annotator_id: str | None = None,
                        version: int | None = None) -> dict:
        """Stored annotations of an image.

        With ``annotator_id``: that annotator's FeatureCollection (latest, or ``version``). Without: the
        latest FeatureCollection of every annotator, keyed by annotator id.
        """
        image_id = self._check_in_session(session, image_id)
        if annotator_id is not None:
            return self.store.load(session.session_id, image_id, annotator_id, version)
        if version is not None:
            raise InvalidInputError("a version needs an annotator id")
        return {a: self.store.load(session.session_id, image_id, a) for a in
                self.store.annotators(session.session_id, image_id)}

    def list_versions(self, session: SessionInfo, image_id: str, annotator_id: str) -> list[int]:
        """Version numbers of one annotator's annotation of one image, oldest first."""
        image_id = self._check_in_session(session, image_id)
        self.sessions.annotator(session.session_id, annotator_id)  # NotFoundError for one who never joined
        return self.store.versions(session.session_id, image_id, annotator_id)

    def finish_image(self, session: SessionInfo, image_id: str, annotator_id: str) -> dict:
        """Record that the annotator finished the image (what they drew is complete), at their latest version:
        returns ``{image_id, version, at}`` (``at``: UTC). A later save is a correction in progress: trainers who
        ask for finished labels get the finished version until the annotator finishes again. Refused
        (:class:`NotFoundError`) before they saved the image: an image with nothing to draw on is saved empty
        first (the page does)."""
        image_id = self._check_in_session(session, image_id)
        self.sessions.annotator(session.session_id, annotator_id)  # NotFoundError for one who never joined
        return {"image_id": image_id, **self.store.finish(session.session_id, image_id, annotator_id)}

    def return_image(self, session: SessionInfo, image_id: str, annotator_id: str, comment: str = "") -> dict:
        """The provider returns an image an annotator saved to them for changes, saying what to change: their
        next ``next_image`` gives it back first, with the comment; it is no longer finished by them until they
        finish it again. Returns ``{image_id, annotator_id, version, comment, at}``; refused in a closed session."""
        if session.state != "open":
            raise SessionClosedError(f"session {session.name!r} is closed: reopen it to return an image")
        image_id = self._check_in_session(session, image_id)
        annotator = self.sessions.annotator(session.session_id, annotator_id)  # NotFoundError: never joined
        record = self.catalog.get(image_id)
        if record.error:
            raise InvalidInputError(f"image {record.name!r} is unreadable now: {annotator.display_name} could not "
                                    "open it to change it")
        link = self.sessions.revoked_link(session.session_id, annotator_id)
        if link is not None:
            raise InvalidInputError(f"{annotator.display_name} joined through the link {link!r}, which is revoked: "
                                    "they could not open the image to change it")
        mark = self.store.return_image(session.session_id, image_id, annotator_id, comment)
        return {"image_id": image_id, "annotator_id": annotator_id, **mark}

    def withdraw_return(self, session: SessionInfo, image_id: str, annotator_id: str) -> dict:
        """Take back a return of :meth:`return_image`: the image is no longer offered to the annotator first, and
        their finish the return ended, if any, counts again. Returns ``{image_id, annotator_id, version, comment,
        at}`` of the withdrawn return."""
        image_id = self._check_in_session(session, image_id)
        self.sessions.annotator(session.session_id, annotator_id)
        mark = self.store.withdraw_return(session.session_id, image_id, annotator_id)
        return {"image_id": image_id, "annotator_id": annotator_id, **mark}

    def trainer_images(self, session: SessionInfo) -> list[dict]:
        """What a trainer is told of the session's images (``trainer_session``, a local ``colabel pull``): every
        image's :class:`ImageInfo` fields, ``versions`` (annotator id -> version numbers, oldest first) and
        ``latest`` (annotator id -> ``{version, saved_at, label_file}`` of the latest version: ``label_file``, the
        label TIFF's name, is unique to each save, so a pull tells a new save from the one it has even where a
        version number was given out again)."""
        images = []
        for image in self.list_images(session):
            versions = {a: self.store.versions(session.session_id, image.image_id, a) for a in image.annotations}
            latest = {a: self.store.latest_save(session.session_id, image.image_id, a) for a, v in versions.items()
                      if v}
            images.append({**image.model_dump(mode="json"), "versions": versions, "latest": latest})
        return images

    # -- assignment and progress ------------------------------------------------------------------
    def next_image(self, session: SessionInfo, annotator_id: str) -> Assignment:
        """Assign the annotator their next image: first an image the provider returned to them for changes (in
        folder order), with the provider's comment; else :meth:`SessionStore.assign_next`'s."""
        readable = self.readable_image_ids(session)
        self.sessions.annotator(session.session_id, annotator_id)  # NotFoundError for one who never joined
        returned = self.store.returned(session.session_id)
        image_id = next((i for i in readable if annotator_id in returned.get(i, {})), None)
        if image_id is not None:  # given back: their next finish answers the return
            self.store.return_seen(session.session_id, image_id, annotator_id)
        else:
            image_id = self.sessions.assign_next(
                session.session_id, annotator_id, image_ids=readable, saved=self.store.counts(session.session_id)
            )
        if image_id is None:
            return Assignment(image=None, position=0, total=len(readable))
        return Assignment(image=self.image_info(image_id, session), position=readable.index(image_id) + 1,
                          total=len(readable), returned=returned.get(image_id, {}).get(annotator_id))

    def open_image(self, session: SessionInfo, annotator_id: str, image_id: str) -> Assignment:
        """The assignment of an image the annotator is already on (their page reloaded): where it is in the session
        and the provider's comment if it is returned to them now (then seen, as :meth:`next_image` marks it, in an
        open session); a withdrawn return is no longer said. ``position`` is 0 for an image that became unreadable."""
        image_id = self._check_in_session(session, image_id)
        self.sessions.annotator(session.session_id, annotator_id)  # NotFoundError for one who never joined
        readable = self.readable_image_ids(session)
        returned = self.store.returned(session.session_id).get(image_id, {}).get(annotator_id)
        if returned is not None and session.state == "open":  # a closed session is read-only
            self.store.return_seen(session.session_id, image_id, annotator_id)
        position = readable.index(image_id) + 1 if image_id in readable else 0
        return Assignment(image=self.image_info(image_id, session), position=position, total=len(readable),
                          returned=returned)

    def progress(self, session: SessionInfo) -> Progress:
        """Images done (all their annotators saved), in progress (assigned or partly saved), work per annotator."""
        ids = self.readable_image_ids(session)
        counts = self.store.counts(session.session_id)
        stored = self.store.usage(session.session_id)
        assignments = self.sessions.assignments(session.session_id)
        annotators = self.sessions.annotators(session.session_id)
        finished = self.store.finished(session.session_id)

        def entry(a: str, name: str) -> dict:
            return {"display_name": name, "images": 0, "finished": 0, "versions": 0, "stored_bytes": stored.get(a, 0)}

        per: dict[str, dict] = {a: entry(a, ann.display_name) for a, ann in annotators.items()}
        done = in_progress = complete = 0
        for image_id in ids:
            by = counts.get(image_id, {})
            if len(by) >= session.annotators_per_image:
                done += 1
            elif by or assignments.get(image_id):
                in_progress += 1
            for a, n in by.items():
                row = per.setdefault(a, entry(a, a))
                row["images"] += 1
                row["versions"] += n
            ended = [a for a in finished.get(image_id, {}) if a in by]
            complete += len(ended) >= session.annotators_per_image
            for a in ended:
                per[a]["finished"] += 1
        return Progress(session_id=session.session_id, n_images=len(ids), images_done=done,
                        images_in_progress=in_progress, images_finished=complete, per_annotator=per,
                        stored_bytes=sum(stored.values()), max_session_bytes=self.store.max_session_bytes)

    def create_session(self, *, name: str, classes: Sequence[dict], mode: str = "segmentation",
                       annotators_per_image: int = 1, image_ids: Sequence[str] | None = None):
        """Create a session over all images or the given ones; returns ``(SessionInfo, token secret)``."""
        if image_ids is not None:
            if not isinstance(image_ids, (list, tuple)) or not image_ids:
                raise InvalidInputError("image_ids must be a non-empty list of image ids, or None for all")
            for image_id in image_ids:
                self.catalog.get(image_id)
        if mode not in ("segmentation", "classification"):
            raise InvalidInputError(f"mode must be 'segmentation' or 'classification', got {shown(mode)}")
        k = annotators_per_image
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidInputError(f"annotators_per_image must be a positive integer, "
                                    f"got {shown(annotators_per_image)}")
        if not isinstance(classes, (list, tuple)):
            raise InvalidInputError("classes must be a list of {name, color}")
        if mode == "classification" and len(classes) < 2:  # the classifier tells 2 to 1000 classes apart
            raise InvalidInputError(f"a classification session needs at least 2 classes (its classifier tells "
                                    f"classes apart), got {len(classes)}")
        try:
            return self.sessions.create(name=name, classes=classes, mode=mode,
                                        annotators_per_image=annotators_per_image, image_ids=image_ids)
        except ValidationError as exc:
            raise InvalidInputError(f"invalid label class: {exc.errors()[0]['msg']}") from None
