"""Crash-safe, versioned annotation storage under ``FOLDER/annotations/``.

Layout (every name is made by colabel, never taken from a caller)::

    annotations/
      sessions/<session_id>/session.json                      session manifest
      sessions/<session_id>/images/<image_id>/<annotator_id>/
          v000001.geojson          FeatureCollection (QuPath conventions) + a "colabel" member with the record,
                                   compact JSON with the record on its own last line (:func:`version_bytes`)
          v000001-<random>.tif     instance labels, uint16 or uint32, shape (H, W) of the image
      sessions/<session_id>/version_marks/<image_id>/<annotator_id>.json
                                   {"highest_version": N}: the highest version number ever given out
      sessions/<session_id>/finished/<image_id>/<annotator_id>.json
                                   {"version": N, "at": UTC}: the annotator finished the image at version N
      sessions/<session_id>/returned/<image_id>/<annotator_id>.json
                                   {"version": N, "comment": str, "at": UTC}: the provider returned the image to the
                                   annotator for changes at version N (a finish ends it; a return ends the finish)

A version is *committed* when its ``.geojson`` exists: the label TIFF is written first, the GeoJSON last,
each through :func:`atomic_write` (temporary file, ``fsync``, no-clobber hard link, ``fsync`` of the
folder). A crash at any point leaves every earlier version intact; a version number is never reused and a
label file name is never reused, so a save can never overwrite another annotator's work or an older version.
The version mark, outside the annotator's folder, keeps numbers from being given out again when versions or
the whole annotator (or image) folder are deleted by hand: a new save then continues after the highest number
ever used. The record in the GeoJSON names its label file. One provider process serves a folder
(``colabel serve`` claims it: :func:`colabel.apps.cli.claim_folder`): the in-memory index sees other
processes' versions only after a restart, though their writes can never collide.

Readers (``colabel report``, a local ``colabel pull``) open the store with ``read_only=True``: nothing in the
folder is created, changed or deleted. A writer removes, at start, the temporary files of interrupted writes, and
never one that a write in flight in another process still needs: every write of a save (label TIFF, GeoJSON,
version mark) happens under the annotator folder's ``flock``, so the temporary files of a folder whose lock is free
are orphans and go at once (a provider restarted after a crash leaves none), while those of a folder whose lock is
held, and every other temporary file (a session manifest's), go only once untouched for :data:`STALE_TMP_SECONDS`.

Every version is kept, so the annotations of a session grow with each save. A writer bounds that growth:
``max_session_bytes`` caps the bytes one session's versions take (GeoJSON and label TIFFs, every annotator), and
``min_free_bytes`` keeps that much of the file system free; a save past either is refused (:class:`StorageError`)
before anything is written, so a share link cannot fill the provider's disk.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from colabel.errors import (
    AccessDeniedError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    StorageError,
    shown,
)
from colabel.files import (  # noqa: F401 - atomic_write, file_lock, fsync_dir, make_dirs re-exported
    atomic_write,
    atomic_write_json,
    file_lock,
    fsync_dir,
    lock_descriptor,
    make_dirs,
)

from .models import AnnotationRecord

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_VERSION_FILE = re.compile(r"^v(\d{6})\.geojson$")

#: A temporary file (``.<name>.<hex>.tmp`` of :func:`atomic_write`) that no lock shows to be an orphan is taken for
#: the leftover of an interrupted write once untouched for this long (seconds, by its modification time), and a
#: writer starting up removes it then. A write in flight touches its file within milliseconds to seconds, so
#: another process's write (a second tool, a provider not yet stopped) is never cut short, and a modest clock skew
#: of a network file system is tolerated.
STALE_TMP_SECONDS = 600.0

_MARK_TMP = re.compile(r"^\.(?P<annotator>.+)\.json\.[0-9a-f]+\.tmp$")


def remove_stale_temporary_files(paths, *, now: float | None = None) -> list[Path]:
    """Delete those of ``paths`` (temporary files) untouched for :data:`STALE_TMP_SECONDS`; return them.

    Only regular files are deleted; a file that vanishes meanwhile (its write just finished) is skipped.
    """
    now = time.time() if now is None else now
    removed = []
    for path in paths:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(info.st_mode) and now - info.st_mtime > STALE_TMP_SECONDS:
            Path(path).unlink(missing_ok=True)
            removed.append(Path(path))
    return removed


def read_only_refusal(root: Path, what: str) -> AccessDeniedError:
    """The error of a write asked of a store opened read-only."""
    return AccessDeniedError(f"{root} is open read-only (a reader such as colabel report or pull); cannot {what}")


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string with microseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def check_id(value: object, kind: str) -> str:
    """Return ``value`` if it is a safe id (letters, digits, ``_``, ``-``; no dots or slashes).

    Raises :class:`InvalidInputError` naming ``kind`` otherwise; ids become folder names, so this is what
    keeps ``../`` and absolute paths out of the annotations folder.
    """
    if not isinstance(value, str) or not _ID.match(value):
        raise InvalidInputError(f"{kind} {shown(value)} is not a valid id")
    return value


def encode_tiff(array: np.ndarray, *, axes: str | None = None) -> bytes:
    """Any array as a zlib-compressed TIFF; ``axes`` (e.g. ``"YX"``) is written as tifffile's metadata."""
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, compression="zlib", **({"metadata": {"axes": axes}} if axes else {}))
    return buffer.getvalue()


def tiff_bytes(labels: np.ndarray) -> bytes:
    """Encode an instance-label image (H, W) uint16/uint32 as a zlib-compressed TIFF."""
    if labels.ndim != 2 or labels.dtype not in (np.uint16, np.uint32):
        raise InvalidInputError(f"label image must be 2-D uint16 or uint32, got {labels.shape} {labels.dtype}")
    return encode_tiff(labels, axes="YX")


def _file_lock(folder: Path):
    """An exclusive lock on ``folder/.lock``: serialises writers across processes."""
    return file_lock(folder / ".lock")


class AnnotationStore:
    """Versioned annotations of every session, image and annotator of one mounted folder.

    Parameters
    ----------
    root : Path
        ``FOLDER/annotations``; created if missing (unless ``read_only``).
    read_only : bool
        Open for reading only (``colabel report``, a local ``colabel pull``): nothing is created, changed or
        deleted under ``root``, and :meth:`save` is refused (:class:`AccessDeniedError`). A missing ``root``
        reads as empty.

    Thread-safe and safe across processes sharing the folder. An index of version numbers is kept in
    memory, rebuilt from the files at start (a writer also removes leftover temporary files of interrupted
    writes, never one of a write in flight: :meth:`_remove_interrupted_writes`).
    """

    def __init__(self, root: Path, *, read_only: bool = False, max_session_bytes: int = 0,
                 min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.read_only = read_only
        self.max_session_bytes = int(max_session_bytes)
        self.min_free_bytes = int(min_free_bytes)
        self.sessions_root = self.root / "sessions"
        if not read_only:
            make_dirs(self.sessions_root)
        self._locks: defaultdict[tuple, threading.Lock] = defaultdict(threading.Lock)
        self._index_lock = threading.Lock()
        # (session, image, annotator) -> sorted list of committed versions
        self._index: dict[tuple[str, str, str], list[int]] = {}
        # (session, annotator) -> bytes of that annotator's files in the session (committed and being written)
        self._usage: defaultdict[tuple[str, str], int] = defaultdict(int)
        # (session, image, annotator) -> {"version", "at"} of their finish of the image
        self._finished: dict[tuple[str, str, str], dict] = {}
        # (session, image, annotator) -> {"version", "comment", "at"} of the provider's return of it
        self._returned: dict[tuple[str, str, str], dict] = {}
        self._reconcile()

    # -- paths ------------------------------------------------------------------------------------
    def session_dir(self, session_id: str) -> Path:
        return self.sessions_root / check_id(session_id, "session id")

    def _annotator_dir(self, session_id: str, image_id: str, annotator_id: str) -> Path:
        return (
            self.session_dir(session_id)
            / "images"
            / check_id(image_id, "image id")
            / check_id(annotator_id, "annotator id")
        )

    def _mark_path(self, session_id: str, image_id: str, annotator_id: str) -> Path:
        """The file keeping the highest version number given out for (image, annotator): outside the annotator's
        and the image's folders, so deleting those does not let a number be given out again."""
        return (self.session_dir(session_id) / "version_marks" / check_id(image_id, "image id")
                / f"{check_id(annotator_id, 'annotator id')}.json")

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.root.parent).as_posix()

    # -- start-up ---------------------------------------------------------------------------------
    def _reconcile(self) -> None:
        """Rebuild the version index from disk; a writer also drops the temporary files of interrupted writes
        (:meth:`_remove_interrupted_writes`)."""
        if not self.read_only:
            self._remove_interrupted_writes()
        for geojson in self.sessions_root.glob("*/images/*/*/v*.geojson"):
            match = _VERSION_FILE.match(geojson.name)
            if not match:
                continue
            annotator_dir = geojson.parent
            key = (annotator_dir.parent.parent.parent.name, annotator_dir.parent.name, annotator_dir.name)
            self._index.setdefault(key, []).append(int(match.group(1)))
        for versions in self._index.values():
            versions.sort()
        for path in self.sessions_root.glob("*/images/*/*/*"):
            if path.name.startswith("v") and path.suffix in (".geojson", ".tif"):
                try:
                    size = path.stat().st_size
                except OSError:  # deleted meanwhile
                    continue
                self._usage[(path.parent.parent.parent.parent.name, path.parent.name)] += size
        for kind, marks in (("finished", self._finished), ("returned", self._returned)):
            for path in self.sessions_root.glob(f"*/{kind}/*/*.json"):
                try:
                    mark = json.loads(path.read_text(encoding="utf-8"))
                    version = mark["version"]
                except (OSError, ValueError, TypeError, KeyError):  # unreadable: no mark
                    continue
                if isinstance(version, int) and not isinstance(version, bool):
                    key = (path.parent.parent.parent.name, path.parent.name, path.stem)
                    marks[key] = {"version": version, "at": mark.get("at")}
                    if kind == "returned":
                        marks[key]["comment"] = str(mark.get("comment") or "")
                        if mark.get("seen"):
                            marks[key]["seen"] = str(mark["seen"])
                        ended = mark.get("ended_finish")
                        if isinstance(ended, dict) and isinstance(ended.get("version"), int):
                            marks[key]["ended_finish"] = {"version": ended["version"], "at": ended.get("at")}
                    elif mark.get("answered") is not None:
                        marks[key]["answered"] = str(mark["answered"])

    def _remove_interrupted_writes(self) -> None:
        """Delete the temporary files of interrupted writes, never one a write in flight may still need.

        A save writes its temporary files (label TIFF and GeoJSON in the annotator's folder, the version mark's in
        ``version_marks/<image_id>/``) only while it holds the annotator folder's ``flock``, so where that lock is
        free (taken here, without waiting, while deleting) they are orphans: a crashed process's, or this folder's
        from before a restart. Where it is held, and for every other temporary file (a session manifest's), only
        those untouched for :data:`STALE_TMP_SECONDS` go.
        """
        by_folder: dict[Path, list[Path]] = defaultdict(list)
        others: list[Path] = []
        for tmp in self.sessions_root.rglob(".*.tmp"):
            parts = tmp.relative_to(self.sessions_root).parts
            if len(parts) == 5 and parts[1] == "images":
                by_folder[tmp.parent].append(tmp)
            elif len(parts) == 4 and parts[1] == "version_marks" and (match := _MARK_TMP.match(parts[3])):
                by_folder[self.sessions_root / parts[0] / "images" / parts[2] / match["annotator"]].append(tmp)
            else:
                others.append(tmp)
        for folder, found in by_folder.items():
            fd = lock_descriptor(folder / ".lock", blocking=False) if folder.is_dir() else None
            if fd is None:  # a write may be in flight (or the folder is gone): by age only
                others.extend(found)
                continue
            try:
                for tmp in found:  # no write can start here while the lock is held
                    tmp.unlink(missing_ok=True)
            finally:
                os.close(fd)
        remove_stale_temporary_files(others)

    # -- writes -----------------------------------------------------------------------------------
    def save(
        self,
        feature_collection: dict,
        labels: np.ndarray,
        *,
        session_id: str,
        image_id: str,
        image_name: str,
        annotator_id: str,
        display_name: str,
        still_allowed: Callable[[], object] | None = None,
        base_version: int | None = None,
        writer: str | None = None,
        max_bytes: int | None = None,
    ) -> AnnotationRecord:
        """Commit a new version of an annotator's annotation of an image and return its record.

        ``feature_collection`` must already be validated; ``labels`` is its (H, W) uint16/uint32
        rasterisation. The record is embedded in the GeoJSON as the foreign member ``"colabel"``.
        ``still_allowed``, when given, is called under the lock right before anything is written and aborts
        the save by raising (a session closed or a token revoked while the save was being checked).
        The version is one more than the highest number ever given out for this image and annotator (on disk, or
        in the version mark, which survives deleted versions), and the mark is raised before anything is written.
        ``base_version``, when given, is the version the drawing was made on (0: none): the save is refused with
        :class:`ConflictError` unless it is still the latest, so a save drawn on an older version (another tab or
        client saved meanwhile, or saves sent without waiting arrived out of order) never replaces a newer one. When
        the latest version holds exactly these features (the same save retried after its answer was lost), that
        version's record is returned and nothing is written. ``writer`` (one id per page or client, recorded in the
        version) waives the conflict when every version after ``base_version`` was saved by the same writer: the
        client's own saves whose answers were lost, not another tab's.

        The version is written as compact JSON (:func:`version_bytes`). ``max_bytes``, when given, is the most bytes
        its features may take there: more are refused with :class:`PayloadTooLargeError` before anything is written.
        A version that would take the session past ``max_session_bytes``, or the file system below
        ``min_free_bytes``, is refused with :class:`StorageError`, before anything is written or a number given out.
        """
        if self.read_only:
            raise read_only_refusal(self.root, "save annotations")
        folder = self._annotator_dir(session_id, image_id, annotator_id)
        mark = self._mark_path(session_id, image_id, annotator_id)
        key = (session_id, image_id, annotator_id)
        features_json = _compact(feature_collection["features"])  # once, whatever version number it gets
        if max_bytes is not None and len(features_json) > max_bytes:
            raise PayloadTooLargeError(
                f"the annotation's features would take {len(features_json)} bytes on disk, more than the limit of "
                f"{max_bytes} bytes for one stored version")
        label_data = tiff_bytes(labels)
        # a first save (no retry or conflict can be due): refused before any folder is made, unless only the exact
        # count below (the record's bytes too) passes the limit, which leaves the annotator's empty folder
        if not folder.is_dir():
            self._reserve(session_id, annotator_id, len(label_data) + len(features_json), count=False)
        # checked exactly, and counted, once the version's bytes are known: after a retry's or a conflict's answer
        with self._locks[key]:
            if still_allowed is not None:
                still_allowed()
            make_dirs(folder)
            with _file_lock(folder):
                with self._index_lock:
                    indexed = max(self._index.get(key, []), default=0)
                if base_version is not None and base_version != indexed:
                    # a save retried after its answer was lost (it timed out, the connection dropped) finds its
                    # own commit: the same features as the latest version are that version, not a conflict;
                    # and versions after the base saved by this writer alone are its own, drawn on since
                    same = self._latest_if_same(session_id, image_id, annotator_id, feature_collection)
                    if same is not None:
                        return same
                    if not self._only_writer_since(session_id, image_id, annotator_id, base_version, writer):
                        self.save_conflict(image_id, base_version, indexed)
                version = max(self._next_version(folder), _read_mark(mark) + 1, indexed + 1)
                while True:
                    geojson_path = folder / f"v{version:06d}.geojson"
                    label_path = folder / f"v{version:06d}-{uuid.uuid4().hex[:8]}.tif"
                    record = AnnotationRecord(
                        session_id=session_id,
                        image_id=image_id,
                        annotator_id=annotator_id,
                        display_name=display_name,
                        version=version,
                        saved_at=utc_now(),
                        n_features=len(feature_collection["features"]),
                        geojson_file=self._relative(geojson_path),
                        label_file=self._relative(label_path),
                        writer=writer,
                    )
                    document = version_bytes(features_json,
                                             {**record.model_dump(mode="json"), "image_name": image_name})
                    nbytes = len(label_data) + len(document)
                    self._reserve(session_id, annotator_id, nbytes)  # refused: no number given out
                    try:
                        _write_mark(mark, version)
                        atomic_write(label_path, label_data, exclusive=True)
                    except BaseException:
                        self._release(session_id, annotator_id, nbytes)
                        raise
                    try:
                        atomic_write(geojson_path, document, exclusive=True)
                    except FileExistsError:  # another process took this number: take the next
                        label_path.unlink(missing_ok=True)
                        self._release(session_id, annotator_id, nbytes)
                        version += 1
                        continue
                    except BaseException:  # a full disk, an I/O error: no label file without its version
                        label_path.unlink(missing_ok=True)
                        self._release(session_id, annotator_id, nbytes)
                        raise
                    break
            with self._index_lock:
                versions = self._index.setdefault(key, [])
                versions.append(version)
                versions.sort()
        return record

    def _latest_if_same(self, session_id: str, image_id: str, annotator_id: str,
                        feature_collection: dict) -> AnnotationRecord | None:
        """The record of the latest version when its features are ``feature_collection``'s (their ids aside), else
        None."""
        try:
            latest = self.load(session_id, image_id, annotator_id)
        except NotFoundError:
            return None

        def content(features: list) -> list:  # ids aside: one made up for a feature sent without an id differs
            return [{k: v for k, v in f.items() if k != "id"} if isinstance(f, dict) else f for f in features]

        sent = json.loads(json.dumps(feature_collection["features"], ensure_ascii=False))
        if content(latest.get("features") or []) != content(sent):
            return None
        fields = AnnotationRecord.model_fields
        return AnnotationRecord.model_validate({k: v for k, v in latest["colabel"].items() if k in fields})

    def _only_writer_since(self, session_id: str, image_id: str, annotator_id: str, base_version: int,
                           writer: str | None) -> bool:
        """Whether every version after ``base_version`` was saved by ``writer`` (False without a writer, or when the
        base is not below the latest)."""
        versions = self.versions(session_id, image_id, annotator_id)
        after = [v for v in versions if v > base_version]
        if writer is None or not after or base_version not in versions and base_version != 0:
            return False
        try:
            return all(self.record(session_id, image_id, annotator_id, v).get("writer") == writer for v in after)
        except NotFoundError:
            return False

    @staticmethod
    def save_conflict(image_id: str, base_version: int, latest: int) -> None:
        """Raise the :class:`ConflictError` of a save drawn on ``base_version`` when ``latest`` is the latest."""
        if base_version < latest:
            raise ConflictError(
                f"version {latest} of image {shown(image_id)} was saved after version {base_version}, which this "
                "save was drawn on (by another tab or client of this annotator); load the latest version")
        raise ConflictError(f"this save was drawn on version {base_version} of image {shown(image_id)}, but the "
                            f"latest is {latest}; load the latest version")

    def _mark_file(self, kind: str, session_id: str, image_id: str, annotator_id: str) -> Path:
        """``finished`` or ``returned`` mark of (image, annotator)."""
        return (self.session_dir(session_id) / kind / check_id(image_id, "image id")
                / f"{check_id(annotator_id, 'annotator id')}.json")

    def finish(self, session_id: str, image_id: str, annotator_id: str) -> dict:
        """Record that the annotator finished the image at their latest version; returns ``{"version", "at"}``
        (``at``: UTC, ISO 8601). Runs after the annotator's save of the image in flight, if any. Finishing again
        after more saves moves the finish to the newer version; the same version again changes nothing. A finish
        answers the provider's return of the image (:meth:`return_image`) once the annotator was given it back
        (:meth:`return_seen`): the return mark goes, and the finish keeps its comment as ``answered``. Before that
        (the return came while their page was still on the image) nothing is written and ``{"version", "at":
        None, "returned": comment}`` says so: their next image is this one again, with the comment.
        :class:`NotFoundError` when they have no version of the image."""
        if self.read_only:
            raise read_only_refusal(self.root, "finish an image")
        with self._index_lock:
            pending = self._returned.get((session_id, image_id, annotator_id))
            pending = dict(pending) if pending is not None else None
        if pending is not None and not pending.get("seen"):
            versions = self.versions(session_id, image_id, annotator_id)
            return {"version": versions[-1] if versions else 0, "at": None, "returned": pending["comment"]}
        answered = {"answered": pending["comment"]} if pending is not None else {}
        return self._put_mark("finished", session_id, image_id, annotator_id, answered,
                              "to finish: save it first (empty, if there is nothing to draw)")

    def return_seen(self, session_id: str, image_id: str, annotator_id: str) -> None:
        """Record that the annotator was given back the image returned to them (``next_image``), so that their
        next finish answers the return."""
        key = (session_id, image_id, annotator_id)
        with self._locks[key]:
            with self._index_lock:
                mark = self._returned.get(key)
                if mark is None or mark.get("seen") or self.read_only:
                    return
                mark = {**mark, "seen": utc_now()}
            atomic_write_json(self._mark_file("returned", *key), mark)
            with self._index_lock:
                self._returned[key] = mark

    def withdraw_return(self, session_id: str, image_id: str, annotator_id: str) -> dict:
        """Take back the provider's return of the image (asked by mistake, or the annotator left): the return mark
        goes, and the annotator's finish before it, if any, counts again. Returns the withdrawn mark;
        :class:`NotFoundError` when the image is not returned to them."""
        if self.read_only:
            raise read_only_refusal(self.root, "withdraw a return")
        key = (session_id, image_id, annotator_id)
        with self._locks[key]:
            with self._index_lock:
                mark = self._returned.get(key)
            if mark is None:
                raise NotFoundError(f"image {shown(image_id)} is not returned to annotator {shown(annotator_id)}")
            withdrawn = mark.get("ended_finish")
            if withdrawn is not None and withdrawn["version"] in self.versions(*key):
                path = self._mark_file("finished", *key)
                atomic_write_json(path, withdrawn)
                with self._index_lock:
                    self._finished[key] = withdrawn
            self._drop_mark("returned", key)
            return _public_mark(mark)

    def return_image(self, session_id: str, image_id: str, annotator_id: str, comment: str) -> dict:
        """The provider returns the image to the annotator for changes, saying what to change (``comment``, at
        most 2000 characters): returns ``{"version", "comment", "at"}`` (their latest version then). The image is
        no longer finished by them (its finish mark goes) until they finish it again, which ends the return.
        :class:`NotFoundError` when they have no version of the image."""
        if not isinstance(comment, str) or len(comment.strip()) > 2000:
            raise InvalidInputError(f"comment must be text of at most 2000 characters, got {shown(comment)}")
        return self._put_mark("returned", session_id, image_id, annotator_id, {"comment": comment.strip()},
                              "to return")

    def _put_mark(self, kind: str, session_id: str, image_id: str, annotator_id: str, fields: dict,
                  missing: str) -> dict:
        """Write the ``kind`` mark (``finished`` or ``returned``) of (image, annotator) at the annotator's latest
        version, with ``fields``, and delete the other kind's; a finish of the version already finished (and not
        returned since) changes nothing. ``missing`` ends the :class:`NotFoundError` of an annotator with no
        version of the image."""
        if self.read_only:
            raise read_only_refusal(self.root, f"{'finish' if kind == 'finished' else 'return'} an image")
        key = (session_id, image_id, annotator_id)
        path = self._mark_file(kind, session_id, image_id, annotator_id)
        marks, other = (self._finished, "returned") if kind == "finished" else (self._returned, "finished")
        with self._locks[key]:
            versions = self.versions(session_id, image_id, annotator_id)
            if not versions:
                raise NotFoundError(f"annotator {shown(annotator_id)} has no annotation of image {shown(image_id)} "
                                    f"{missing}")
            with self._index_lock:
                known = marks.get(key)
                undone = key in (self._returned if kind == "finished" else self._finished)
            if kind == "finished" and known is not None and known["version"] == versions[-1] and not undone:
                return dict(known)
            mark = {"version": versions[-1], **fields, "at": utc_now()}
            if kind == "returned":
                with self._index_lock:  # the finish this return ends, or the one an earlier return ended
                    ended = self._finished.get(key) or (self._returned.get(key) or {}).get("ended_finish")
                if ended is not None:  # restored should the provider withdraw the return
                    mark["ended_finish"] = {k: ended[k] for k in ("version", "at")}
            make_dirs(path.parent)
            atomic_write_json(path, mark)
            with self._index_lock:
                marks[key] = mark
            self._drop_mark(other, key)
            return _public_mark(mark)

    def _drop_mark(self, kind: str, key: tuple[str, str, str]) -> None:
        """Delete the ``finished`` or ``returned`` mark of ``key`` (the caller holds the key's lock)."""
        marks = self._finished if kind == "finished" else self._returned
        with self._index_lock:
            had = marks.pop(key, None)
        if had is not None:
            path = self._mark_file(kind, *key)
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)

    def returned(self, session_id: str) -> dict[str, dict[str, dict]]:
        """Image id -> annotator id -> ``{"version", "comment", "at"}``: the images the provider returned to an
        annotator for changes that they have not finished since."""
        out: dict[str, dict[str, dict]] = {}
        with self._index_lock:
            for (s, i, a), mark in self._returned.items():
                if s == session_id and self._index.get((s, i, a)) and not _later((s, i, a), self._finished, mark):
                    out.setdefault(i, {})[a] = _public_mark(mark)
        return out

    def finished(self, session_id: str) -> dict[str, dict[str, dict]]:
        """Image id -> annotator id -> ``{"version", "at"}``: the version each annotator finished the image at,
        where that version still exists (one deleted by hand is no finish)."""
        out: dict[str, dict[str, dict]] = {}
        with self._index_lock:
            for (s, i, a), mark in self._finished.items():
                if (s == session_id and mark["version"] in self._index.get((s, i, a), [])
                        and not _later((s, i, a), self._returned, mark)):
                    out.setdefault(i, {})[a] = dict(mark)
        return out

    def usage(self, session_id: str) -> dict[str, int]:
        """Annotator id -> bytes their versions of this session's images take on disk (GeoJSON and label TIFFs,
        every version), as counted at start and by this process's saves since (files deleted by hand meanwhile
        still count until a restart)."""
        with self._index_lock:
            return {a: n for (s, a), n in self._usage.items() if s == session_id and n}

    def _reserve(self, session_id: str, annotator_id: str, nbytes: int, *, count: bool = True) -> None:
        """Count ``nbytes`` more for the annotator's session, or raise :class:`StorageError` (nothing counted) when
        they would take the session past ``max_session_bytes`` or the file system below ``min_free_bytes``;
        ``count=False`` checks only."""
        with self._index_lock:
            if self.max_session_bytes:
                held = sum(n for (s, _), n in self._usage.items() if s == session_id)
                if held + nbytes > self.max_session_bytes:
                    raise StorageError(
                        f"this session's annotations take {_mib(held)} on the provider's disk, and this save of "
                        f"{_mib(nbytes)} would pass the session's limit of {_mib(self.max_session_bytes)} "
                        "(max_session_bytes); nothing was saved: ask the provider to raise the limit")
            if self.min_free_bytes:
                free = shutil.disk_usage(self.sessions_root).free
                if free - nbytes < self.min_free_bytes:
                    raise StorageError(
                        f"the provider's disk has {_mib(free)} free, and saves keep at least "
                        f"{_mib(self.min_free_bytes)} free (min_free_bytes); nothing was saved: ask the provider to "
                        "free disk space")
            if count:
                self._usage[(session_id, annotator_id)] += nbytes

    def _release(self, session_id: str, annotator_id: str, nbytes: int) -> None:
        """Give back a reservation of :meth:`_reserve` whose files were not kept."""
        with self._index_lock:
            self._usage[(session_id, annotator_id)] -= nbytes

    @staticmethod
    def _next_version(folder: Path) -> int:
        found = [int(m.group(1)) for p in folder.iterdir() if (m := _VERSION_FILE.match(p.name))]
        return max(found, default=0) + 1

    def record(self, session_id: str, image_id: str, annotator_id: str, version: int | None = None) -> dict:
        """The ``colabel`` record (:class:`AnnotationRecord` fields and ``image_name``) of a committed version,
        latest by default, without parsing its features when it can: read from the end of the GeoJSON, where
        :meth:`save` writes it (the whole file is parsed otherwise). Raises as :meth:`load`."""
        versions = self.versions(session_id, image_id, annotator_id)
        if not versions:
            raise NotFoundError(f"annotator {shown(annotator_id)} has no annotation of image {shown(image_id)}")
        asked = version
        if version is None:
            version = versions[-1]
        elif isinstance(version, bool) or not isinstance(version, int) or version not in versions:
            return self.load(session_id, image_id, annotator_id, version)["colabel"]  # raises load's errors
        path = self._annotator_dir(session_id, image_id, annotator_id) / f"v{version:06d}.geojson"
        record = _tail_record(path)
        if record is None or record.get("version") != version:
            record = self.load(session_id, image_id, annotator_id, asked)["colabel"]  # a vanished file: as load
        return record

    def latest_save(self, session_id: str, image_id: str, annotator_id: str) -> dict | None:
        """``{version, saved_at, label_file}`` of the latest version (None when there is none): what tells one
        save from another even if a version number was given out again (by a colabel that kept no version mark),
        as ``colabel pull`` uses it. ``label_file`` is the label TIFF's file name, unique to each save. A latest version
        whose file was deleted by hand while this process runs gives way to the latest one still there (None when
        none is left)."""
        if not self.versions(session_id, image_id, annotator_id):
            return None
        try:
            record = self.record(session_id, image_id, annotator_id)
        except (OSError, ValueError, KeyError):
            return None
        return {"version": record["version"], "saved_at": record.get("saved_at"),
                "label_file": Path(record.get("label_file") or "").name or None}

    # -- reads ------------------------------------------------------------------------------------
    def versions(self, session_id: str, image_id: str, annotator_id: str) -> list[int]:
        """Committed version numbers, oldest first (empty when none)."""
        with self._index_lock:
            return list(self._index.get((session_id, image_id, annotator_id), []))

    def annotators(self, session_id: str, image_id: str) -> dict[str, int]:
        """Annotator id -> number of committed versions for one image of a session."""
        with self._index_lock:
            return {
                a: len(v) for (s, i, a), v in self._index.items() if s == session_id and i == image_id and v
            }

    def counts(self, session_id: str) -> dict[str, dict[str, int]]:
        """Image id -> {annotator id -> number of versions} for a session."""
        out: dict[str, dict[str, int]] = {}
        with self._index_lock:
            for (s, i, a), v in self._index.items():
                if s == session_id and v:
                    out.setdefault(i, {})[a] = len(v)
        return out

    def load(self, session_id: str, image_id: str, annotator_id: str, version: int | None = None) -> dict:
        """The stored FeatureCollection (with its ``colabel`` record) of one version; latest by default.

        Raises :class:`NotFoundError` when the annotator has no annotation of that image or no such version.
        """
        versions = self.versions(session_id, image_id, annotator_id)
        if not versions:
            raise NotFoundError(f"annotator {shown(annotator_id)} has no annotation of image {shown(image_id)}")
        latest = version is None
        if latest:
            version = versions[-1]
        if isinstance(version, bool) or not isinstance(version, int):
            raise InvalidInputError(f"version must be an integer, got {shown(version)}")
        if version not in versions:
            raise NotFoundError(f"version {version} does not exist (versions: {versions[0]}..{versions[-1]})")
        path = self._annotator_dir(session_id, image_id, annotator_id) / f"v{version:06d}.geojson"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self._vanished(session_id, image_id, annotator_id, version)
            if latest:  # the latest that still exists
                return self.load(session_id, image_id, annotator_id)
            raise NotFoundError(f"version {version} no longer exists (its file was deleted)") from None

    def _vanished(self, session_id: str, image_id: str, annotator_id: str, version: int) -> None:
        """Forget a version whose GeoJSON was deleted (by hand) while this process runs."""
        with self._index_lock:
            versions = self._index.get((session_id, image_id, annotator_id), [])
            if version in versions:
                versions.remove(version)

    def label_path(self, session_id: str, image_id: str, annotator_id: str, version: int | None = None) -> Path:
        """Path of the instance-label TIFF of a committed version (latest by default)."""
        record = self.record(session_id, image_id, annotator_id, version)
        return self.root.parent / record["label_file"]


def _public_mark(mark: dict) -> dict:
    """A finish or return mark as callers get it: without the bookkeeping (``seen``, ``ended_finish``)."""
    return {k: v for k, v in mark.items() if k not in ("seen", "ended_finish")}


def _later(key: tuple, marks: dict, mark: dict) -> bool:
    """Whether ``marks`` holds a mark of ``key`` made after ``mark`` (a finish and a return of the same image: the
    later one counts, should a crash have left both files)."""
    other = marks.get(key)
    return other is not None and str(other.get("at") or "") >= str(mark.get("at") or "")


def _mib(nbytes: int) -> str:
    """A byte count for a message: ``12.3 MiB`` (powers of 1024, as the manage page shows), ``850 bytes`` under
    1 KiB."""
    for unit, power in (("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if abs(nbytes) >= 2 ** (10 * power):
            return f"{nbytes / 2 ** (10 * power):.1f} {unit}"
    return f"{nbytes} bytes"


def _read_mark(path: Path) -> int:
    """The highest version number a mark file records (0 when there is none or it cannot be read)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("highest_version", 0)
    except (OSError, ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _write_mark(path: Path, version: int) -> None:
    """Raise the mark to ``version`` (never lowers it); written atomically before the version's files."""
    if _read_mark(path) >= version:
        return
    make_dirs(path.parent)
    atomic_write_json(path, {"highest_version": version})


#: How much of a GeoJSON's end :func:`_tail_record` reads to find the record (records are a few hundred bytes).
_TAIL_BYTES = 16384

#: Where the record begins in a version written by :func:`version_bytes` (the file's only newline before its last),
#: and in one written by colabel before it, indented by one space (``json.dumps(..., indent=1)``).
_RECORD_KEY = b'\n"colabel":'
_RECORD_KEY_INDENTED = b'\n "colabel": '


def _compact(obj: object) -> bytes:
    """``obj`` as compact UTF-8 JSON: no indent, no spaces (the C encoder; no newline anywhere, as JSON strings
    escape theirs)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def version_bytes(features_json: bytes, record: dict) -> bytes:
    """A version's GeoJSON: ``{"type":"FeatureCollection","features":[...],`` then, on a line of its own, the
    ``"colabel"`` record and the closing brace.

    ``features_json`` is the features' compact JSON (:func:`_compact`). Compact JSON has no newline (JSON strings
    escape theirs), so the one before ``"colabel":`` is where :func:`_tail_record` finds the record without parsing
    the features, and the file is about as large as the JSON the annotator sent.
    """
    return b'{"type":"FeatureCollection","features":' + features_json + b"," + _RECORD_KEY + _compact(record) + b"}\n"


def _tail_record(path: Path) -> dict | None:
    """The ``colabel`` member of a GeoJSON written by :meth:`AnnotationStore.save`, read from the file's end.

    The record is the document's last member. :func:`version_bytes` writes it on a line of its own after compact JSON
    that has no newline, so ``\\n"colabel":`` occurs once. Versions written by earlier colabels are indented by one
    space (``json.dumps(..., indent=1)``): there the key is the only ``"colabel":`` at the start of a line indented
    by one space (nested keys are indented further, and inside JSON strings a newline is escaped); neither form
    occurs in a file of the other. None when it is not found in the last :data:`_TAIL_BYTES` or does not parse: the
    caller parses the whole file then.
    """
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - _TAIL_BYTES))
            tail = handle.read()
    except OSError:
        return None
    at = max(tail.rfind(_RECORD_KEY), tail.rfind(_RECORD_KEY_INDENTED))
    if at < 0:
        return None
    try:
        record = json.loads(b"{" + tail[at:])["colabel"]
    except (ValueError, KeyError, TypeError):
        return None
    return record if isinstance(record, dict) and "version" in record else None

