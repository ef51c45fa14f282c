"""Crash-safe, versioned annotation storage under ``FOLDER/annotations/``.

Layout (every name is made by colabel, never taken from a caller)::

    annotations/
      sessions/<session_id>/session.json                      session manifest
      sessions/<session_id>/images/<image_id>/<annotator_id>/
          v000001.geojson          FeatureCollection (QuPath conventions) + a "colabel" member with the record
          v000001-<random>.tif     instance labels, uint16 or uint32, shape (H, W) of the image

A version is *committed* when its ``.geojson`` exists: the label TIFF is written first, the GeoJSON last,
each through :func:`atomic_write` (temporary file, ``fsync``, no-clobber hard link, ``fsync`` of the
folder). A crash at any point leaves every earlier version intact; a version number is never reused and a
label file name is never reused, so a save can never overwrite another annotator's work or an older version.
The record in the GeoJSON names its label file. One provider process serves a folder (``colabel serve``
claims it: :func:`colabel.apps.cli.claim_folder`): the in-memory index sees other processes' versions only
after a restart, though their writes can never collide.
"""

from __future__ import annotations

import io
import json
import re
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from colabel.errors import InvalidInputError, NotFoundError
from colabel.files import atomic_write, atomic_write_json, file_lock, fsync_dir  # noqa: F401 - re-exported

from .models import AnnotationRecord

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_VERSION_FILE = re.compile(r"^v(\d{6})\.geojson$")


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string with microseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def check_id(value: object, kind: str) -> str:
    """Return ``value`` if it is a safe id (letters, digits, ``_``, ``-``; no dots or slashes).

    Raises :class:`InvalidInputError` naming ``kind`` otherwise; ids become folder names, so this is what
    keeps ``../`` and absolute paths out of the annotations folder.
    """
    if not isinstance(value, str) or not _ID.match(value):
        raise InvalidInputError(f"{kind} {value!r} is not a valid id")
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
        ``FOLDER/annotations``; created if missing.

    Thread-safe and safe across processes sharing the folder. An index of version numbers is kept in
    memory, rebuilt from the files at start (leftover temporary files of an interrupted write are removed).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.sessions_root = self.root / "sessions"
        self.sessions_root.mkdir(parents=True, exist_ok=True)
        self._locks: defaultdict[tuple, threading.Lock] = defaultdict(threading.Lock)
        self._index_lock = threading.Lock()
        # (session, image, annotator) -> sorted list of committed versions
        self._index: dict[tuple[str, str, str], list[int]] = {}
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

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.root.parent).as_posix()

    # -- start-up ---------------------------------------------------------------------------------
    def _reconcile(self) -> None:
        """Rebuild the version index from disk and drop temporary files of interrupted writes."""
        for tmp in self.sessions_root.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        for geojson in self.sessions_root.glob("*/images/*/*/v*.geojson"):
            match = _VERSION_FILE.match(geojson.name)
            if not match:
                continue
            annotator_dir = geojson.parent
            key = (annotator_dir.parent.parent.parent.name, annotator_dir.parent.name, annotator_dir.name)
            self._index.setdefault(key, []).append(int(match.group(1)))
        for versions in self._index.values():
            versions.sort()

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
    ) -> AnnotationRecord:
        """Commit a new version of an annotator's annotation of an image and return its record.

        ``feature_collection`` must already be validated; ``labels`` is its (H, W) uint16/uint32
        rasterisation. The record is embedded in the GeoJSON as the foreign member ``"colabel"``.
        ``still_allowed``, when given, is called under the lock right before anything is written and aborts
        the save by raising (a session closed or a token revoked while the save was being checked).
        """
        folder = self._annotator_dir(session_id, image_id, annotator_id)
        key = (session_id, image_id, annotator_id)
        label_data = tiff_bytes(labels)
        with self._locks[key]:
            if still_allowed is not None:
                still_allowed()
            folder.mkdir(parents=True, exist_ok=True)
            with _file_lock(folder):
                version = self._next_version(folder)
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
                    )
                    document = {
                        "type": "FeatureCollection",
                        "features": feature_collection["features"],
                        "colabel": {**record.model_dump(mode="json"), "image_name": image_name},
                    }
                    atomic_write(label_path, label_data, exclusive=True)
                    try:
                        atomic_write_json(geojson_path, document, exclusive=True)
                    except FileExistsError:  # another process took this number: take the next
                        label_path.unlink(missing_ok=True)
                        version += 1
                        continue
                    break
            with self._index_lock:
                versions = self._index.setdefault(key, [])
                versions.append(version)
                versions.sort()
        return record

    @staticmethod
    def _next_version(folder: Path) -> int:
        found = [int(m.group(1)) for p in folder.iterdir() if (m := _VERSION_FILE.match(p.name))]
        return max(found, default=0) + 1

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
            raise NotFoundError(f"annotator {annotator_id!r} has no annotation of image {image_id!r}")
        if version is None:
            version = versions[-1]
        if isinstance(version, bool) or not isinstance(version, int):
            raise InvalidInputError(f"version must be an integer, got {version!r}")
        if version not in versions:
            raise NotFoundError(f"version {version} does not exist (versions: {versions[0]}..{versions[-1]})")
        path = self._annotator_dir(session_id, image_id, annotator_id) / f"v{version:06d}.geojson"
        return json.loads(path.read_text(encoding="utf-8"))

    def label_path(self, session_id: str, image_id: str, annotator_id: str, version: int | None = None) -> Path:
        """Path of the instance-label TIFF of a committed version (latest by default)."""
        record = self.load(session_id, image_id, annotator_id, version)["colabel"]
        return self.root.parent / record["label_file"]

