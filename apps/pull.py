"""``colabel pull``: a session's images and labels as a training set, from a provider URL or a local folder.

The pulled set (``--out DIR``) mirrors one session of one source: every pull fetches the versions newer than the
last, and removes what the source no longer has (an image deleted or unreadable, an annotator's labels deleted),
printing one ``dropped ...`` line per removal::

    labels.zarr/                        (zarr format 3, or 2 with ``--zarr-format 2`` for readers that predate zarr v3;
                                        every array in chunks of 512 x 512 pixels, one grid per image)
      images/<image_id>                 (H, W, C) in the file's dtype
      instances/<image_id>/<annotator>  (H, W) uint32 instance labels of the annotator's latest version
      semantic/<image_id>/<annotator>   (H, W) uint16 class index + 1 per pixel (0 = background, 65535 = an object
                                        without a session class: mask it out of a class loss); attrs: classes
      consensus/<image_id>              (H, W) uint32, when two or more annotators labelled the image; attrs:
                                        support, annotators, classes (majority class per object), ties
      consensus_semantic/<image_id>     (H, W) uint16 majority class index + 1 (0 = background, 65535 = a
                                        consensus object whose class is a tie or none); attrs: classes
    agreement.json   per image with several annotators: F1 at IoU 0.5 and Cohen's kappa of the classes per
                     annotator pair, and the consensus's object, classified and tie counts
    consensus_cells.csv  one row per consensus object: image, label, class, tie, support, each annotator's vote
    tiff/<stem>.tif                        the image as stored, (H, W, C)
    tiff/<stem>__<annotator>_mask.tif      the annotator's instance labels (as ``instances/``)
    tiff/<stem>__consensus_mask.tif        the consensus instance labels (as ``consensus/``), where there is one
    geojson/<stem>__<annotator>.geojson    the annotator's latest FeatureCollection as stored (QuPath's
                     conventions, image pixels; its k-th Polygon or MultiPolygon feature is label k of the masks:
                     Point features take no label, and no row in the tables)
    cells.csv        one row per labelled object: image, annotator, version, label, class, area, centroid, bbox
                     (area, centroid and bbox of the polygon), and whether the version is the one the annotator
                     finished the image at (``finished``: True once they said what they drew there is complete;
                     False: work in progress, left midway, or a correction drawn since)
    annotators.csv   one row per annotator whose labels the set holds: id, the display name they joined with, when
                     they joined, their images (and how many of those they finished) and objects in the set
    coco.json        COCO instance annotations of every annotator (``attributes``: annotator_id, version, label)
    coco_consensus.json  COCO instance annotations of the consensus objects (``attributes``: label, support, tie),
                     of the images that have a consensus; written when one has
    pull_state.json  the source and session pulled, the version pulled per image and annotator and its save (the
                     label file's name, unique to each save: ``saves``), and each image file's revision (size and
                     modification time): a later pull fetches only the annotations whose latest save differs (a
                     state without ``saves``, of an earlier colabel, has each fetched again once, as does one of
                     format 2, whose semantic masks made objects without a class background), and the pixels
                     again of an image whose file was rewritten or replaced under the same name

With ``finished_only`` (``colabel pull --finished-only``) the set holds only the labels of images their annotator
finished (``finish_image``; the annotator page finishes an image when its annotator goes to the next one), at the
version they finished, and the consensus of those: work in progress, images left midway and corrections not
finished again stay out. A set is pulled one way or the other: a pull the other way into it is refused.

Labels whose size is not their image's (the file was replaced by one of another size after they were drawn) are
left out, with a ``dropped ...`` line naming both sizes, and so is the image when no annotator's labels are left.
A pull that switches ``--zarr-format`` builds the new store beside the old one and swaps it in only once it has
succeeded. A local pull (:class:`LocalSource`) opens the folder read-only.

``<stem>`` is the image's name in the source with every run of characters other than letters, digits, ``.``,
``_`` and ``-`` replaced by ``_``, extension kept (``sub/cell.png`` -> ``sub_cell.png``); images whose stems would
be equal (ignoring case) get ``@<image_id>`` appended, so no two images share a file.

COCO files: ``file_name`` is the image's TIFF relative to the COCO file (``tiff/<stem>.tif``); every labelled
image is listed, those without objects too (negative examples). Categories: the session's classes, ids 1..n in
session order, and ``object`` (id n + 1; ``object (unclassified)`` when a class is named ``object``) for
unclassified objects and consensus objects without a majority class. ``segmentation`` is uncompressed RLE
(``{"counts": [...], "size": [H, W]}``, runs over the pixels in column-major order, background first) of the
object's pixels in the instance mask, so segmentation, ``area`` (pixels) and ``bbox`` (``[x, y, w, h]`` of those
pixels) agree exactly with ``labels.zarr``; an object that later objects cover entirely has no pixels and no COCO
annotation. The polygons are in ``geojson/``.

Remote pulls use a *trainer token* (read-only: it cannot annotate), issued by the provider.
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from colabel.errors import InvalidInputError, NotFoundError

from .provider.storage import atomic_write, atomic_write_json, encode_tiff

STATE_FORMAT = 3
"""``format`` of ``pull_state.json``. A state without it (written before pulls recorded their source, stems kept
extensions and COCO used RLE) is not trusted: its versions are fetched again and its files renamed, once; a state
of format 2 (whose semantic masks made objects without a class background) has its versions fetched again."""

NO_CLASS = 0xFFFF
"""Semantic mask value of an object without a class of the session (unclassified, a class the session does not
have, or a consensus tie): an object, not background, whose class a class loss should ignore."""

CONSENSUS_FILE = "consensus"
"""The annotator part of the consensus mask's file name (annotator ids are ``a-<hex>``)."""


class LocalSource:
    """A session of a mounted folder, read directly (no server). ``location``: the folder's absolute path.

    The folder is opened read-only (``DataProvider(folder, read_only=True)``): a pull, refused or not, creates,
    changes or deletes nothing in it, so it may run beside the folder's ``colabel serve``.

    Raises
    ------
    InvalidInputError
        ``folder`` holds no colabel sessions (no ``annotations/sessions``), or ``session_id`` is not an id.
    NotFoundError
        ``folder`` has no session ``session_id``.
    """

    def __init__(self, folder: Path, session_id: str) -> None:
        from colabel.config import annotations_dir

        from .provider.provider import DataProvider
        from .provider.storage import check_id

        folder = Path(folder)
        sessions = annotations_dir(folder) / "sessions"
        if not sessions.is_dir():
            raise InvalidInputError(f"{folder} is not a colabel folder (it has no annotations/sessions): pull from the "
                                    "folder a colabel serve saves annotations in")
        if not isinstance(session_id, str) or not session_id:
            check_id(session_id, "session id")
        self.location = str(folder.resolve())
        self.provider = DataProvider(folder, read_only=True)
        if session_id in self.provider.sessions.load_errors:
            raise InvalidInputError(f"session {session_id} of {folder} cannot be read: "
                                    f"{self.provider.sessions.load_errors[session_id]}")
        try:
            session_id = self.provider.sessions.resolve(session_id)  # its id, or its name on the manage page
        except NotFoundError as exc:
            raise NotFoundError(f"{exc} (in {folder})") from None
        self.info = self.provider.sessions.get(session_id)

    async def session(self) -> dict:
        p, info = self.provider, self.info
        images = p.trainer_images(info)
        annotators = {k: v.model_dump(mode="json") for k, v in p.sessions.annotators(info.session_id).items()}
        return {"session": {"session_id": info.session_id, "name": info.name, "mode": info.mode,
                            "classes": [c.model_dump() for c in info.classes]},
                "annotators": annotators, "images": images, "max_image_bytes": p.config.max_image_bytes}

    async def image(self, image_id: str, region: dict | None = None) -> np.ndarray:
        return self.provider.get_image(image_id, region=region, session=self.info)

    async def annotation(self, image_id: str, annotator_id: str, version: int) -> dict:
        return self.provider.get_annotations(self.info, image_id, annotator_id=annotator_id, version=version)

    async def labels(self, image_id: str, annotator_id: str, version: int) -> np.ndarray:
        import tifffile

        return tifffile.imread(self.provider.store.label_path(self.info.session_id, image_id, annotator_id, version))

    async def close(self) -> None:
        return None


class RemoteSource:
    """A session of a running provider, through its annotator service with a trainer token. ``location``: the
    provider's web URL (``<scheme>://<host>[/<prefix>]/<workspace>/apps/<name>-web``, no token; ``<prefix>``: the
    path of a Hypha server behind a proxy, as ``colabel serve --public-url https://host/prefix`` prints it)."""

    URL = re.compile(r"^(?P<prefix>(?:/[^/]+)*)/(?P<workspace>[^/]+)/apps/(?P<name>[a-z0-9][a-z0-9-]*)-web(?:/.*)?$")

    def __init__(self, client: Any, service: Any, token: str, location: str) -> None:
        self.client, self.service, self.token, self.location = client, service, token, location

    @classmethod
    def address(cls, url: str, token: str | None = None) -> tuple[str, str, str, str]:
        """What a trainer URL names: ``(server_url, annotator service id, token, location)``.

        ``url``: the trainer URL the provider printed (``.../<workspace>/apps/<name>-web/#trainer=TOKEN``); ``token``,
        when given, instead of the URL's. Raises :class:`InvalidInputError` for another URL, or without a token.
        """
        parts = urlsplit(url)
        match = cls.URL.match(parts.path or "")
        if parts.scheme not in ("http", "https") or not match:
            raise InvalidInputError(f"{url!r} is not a colabel provider URL (…/<workspace>/apps/<name>-web/…)")
        fragment = dict(p.split("=", 1) for p in parts.fragment.split("&") if "=" in p)
        token = token or fragment.get("trainer")
        if not token:
            raise InvalidInputError("a trainer token is needed: pass --token or a URL ending in #trainer=TOKEN")
        server = f"{parts.scheme}://{parts.netloc}{match['prefix']}"
        return (server, f"{match['workspace']}/{match['name']}-annotate", token,
                f"{server}/{match['workspace']}/apps/{match['name']}-web")

    @classmethod
    async def connect(cls, url: str, token: str | None = None) -> "RemoteSource":
        """Connect to the provider of a trainer URL (:meth:`address`)."""
        from hypha_rpc import connect_to_server

        server, service_id, token, location = cls.address(url, token)
        client = await connect_to_server({"server_url": server})
        service = await client.get_service(service_id)
        return cls(client, service, token, location)

    async def session(self) -> dict:
        return await self.service.trainer_session(self.token)

    async def image(self, image_id: str, region: dict | None = None) -> np.ndarray:
        return await self.service.trainer_image(self.token, image_id, 0, region)

    async def annotation(self, image_id: str, annotator_id: str, version: int) -> dict:
        return await self.service.trainer_annotation(self.token, image_id, annotator_id, version)

    async def labels(self, image_id: str, annotator_id: str, version: int) -> np.ndarray:
        return await self.service.trainer_labels(self.token, image_id, annotator_id, version)

    async def close(self) -> None:
        await self.client.disconnect()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def label_classes(fc: dict) -> dict[int, str | None]:
    """Label id -> class name (``None``: unclassified) of a stored FeatureCollection's objects, in the label
    image's numbering (label k = the k-th polygon feature)."""
    return {o["label"]: o["class"] for o in _objects(fc, [])}


def _objects(fc: dict, classes: list[str]) -> list[dict]:
    """Polygon features in rasterisation order (label k = k-th polygon feature), with class and geometry."""
    from shapely.geometry import shape

    out = []
    for feature in fc.get("features", []):
        geometry = feature.get("geometry") or {}
        if geometry.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        name = ((feature.get("properties") or {}).get("classification") or {}).get("name")
        poly = shape(geometry)
        xmin, ymin, xmax, ymax = poly.bounds
        out.append({"label": len(out) + 1, "class": name, "class_index": classes.index(name) if name in classes else -1,
                    "area": float(poly.area), "centroid": [poly.centroid.x, poly.centroid.y],
                    "bbox": [xmin, ymin, xmax, ymax], "geometry": geometry})
    return out


def _stems(names: dict[str, str]) -> dict[str, str]:
    """Image id -> file stem of the pulled files (see the module docstring): ``_safe(name)`` with its extension,
    ``@<image_id>`` appended to every stem that two images would share, ignoring case (``_safe`` never writes
    ``@``, so the stems are unique by construction)."""
    safe = {image_id: _safe(name) for image_id, name in names.items()}
    counts: dict[str, int] = {}
    for stem in safe.values():
        counts[stem.casefold()] = counts.get(stem.casefold(), 0) + 1
    return {image_id: stem if counts[stem.casefold()] == 1 else f"{stem}@{image_id}" for image_id, stem in safe.items()}


CHUNK = 512
"""Side in pixels of the zarr chunks: an image and its masks share one chunk grid, so a crop reads the same chunks
of each."""


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Zarr chunks of ``CHUNK`` x ``CHUNK`` pixels (fewer at a smaller image), every channel in one chunk."""
    return (min(shape[0], CHUNK), min(shape[1], CHUNK), *shape[2:])


def instance_rle(labels: np.ndarray) -> dict[int, dict]:
    """The pixels of every object of an instance-label image, as COCO uncompressed run-length encoding.

    Parameters
    ----------
    labels : ndarray, shape (H, W), integer
        0 is background, every other value one object.

    Returns
    -------
    dict
        label -> ``{"counts": [int, ...], "area": int, "bbox": [x, y, w, h]}``: ``counts`` are the lengths of
        the alternating runs of background and object over the pixels in column-major order (COCO's
        convention), starting with background (possibly 0) and summing to ``H * W``; ``area`` the object's
        pixel count; ``bbox`` the column, row, width and height in pixels of the box around its pixels (as
        ``pycocotools.mask.toBbox``). Labels absent from ``labels`` are absent here.

    Examples
    --------
    >>> instance_rle(np.array([[0, 1], [0, 1]]))
    {1: {'counts': [2, 2], 'area': 2, 'bbox': [1.0, 0.0, 1.0, 2.0]}}
    """
    labels = np.asarray(labels)
    height, width = labels.shape
    flat = labels.ravel(order="F")
    positions = np.flatnonzero(flat)
    values = flat[positions]
    order = np.argsort(values, kind="stable")  # by label; each label's positions stay ascending
    positions, values = positions[order], values[order]
    splits = np.flatnonzero(np.diff(values)) + 1
    out = {}
    for pixels in np.split(positions, splits) if positions.size else []:
        breaks = np.flatnonzero(np.diff(pixels) != 1) + 1
        starts, ends = pixels[np.r_[0, breaks]], pixels[np.r_[breaks - 1, -1]] + 1
        counts = np.empty(2 * starts.size, np.int64)
        counts[0::2] = starts - np.r_[0, ends[:-1]]
        counts[1::2] = ends - starts
        tail = height * width - int(ends[-1])
        cols, rows = pixels // height, pixels % height
        x, y = int(cols.min()), int(rows.min())
        out[int(flat[pixels[0]])] = {
            "counts": counts.tolist() + ([tail] if tail else []), "area": int(pixels.size),
            "bbox": [float(x), float(y), float(cols.max() - x + 1), float(rows.max() - y + 1)]}
    return out


def _check_origin(out: Path, state: dict, origin: dict) -> None:
    """Refuse to pull ``origin`` (``{source, session_id}``) into ``out`` when it holds a pull of another session
    or source (recorded in ``state``, or for sets pulled before colabel recorded it, the session id in
    ``labels.zarr``'s attributes)."""
    if state and bool(state.get("finished_only")) != bool(origin.get("finished_only")):
        held = "finished images only (--finished-only)" if state.get("finished_only") else "every saved annotation"
        raise InvalidInputError(
            f"{out} holds a pull of {held}: pull {'without' if state.get('finished_only') else 'with'} "
            "--finished-only into another --out")
    recorded = {k: state.get(k) for k in ("source", "session_id")}
    if recorded["session_id"] is None and (out / "labels.zarr").is_dir():
        import zarr

        session = zarr.open_group(str(out / "labels.zarr"), mode="r").attrs.get("session") or {}
        recorded["session_id"] = session.get("session_id")
    if recorded["session_id"] is None:
        return
    if recorded["session_id"] != origin["session_id"] or recorded["source"] not in (None, origin["source"]):
        was = recorded["source"] or "an unrecorded source"
        raise InvalidInputError(
            f"{out} holds a pull of session {recorded['session_id']} from {was}, not of session "
            f"{origin['session_id']} from {origin['source']}: a pulled set mirrors one session of one source, "
            "pull into another --out")


def _previous_files(state: dict, names: dict[str, str]) -> set[str]:
    """The tiff/ and geojson/ files a previous pull wrote: recorded in its state, or for a state of colabel before
    ``STATE_FORMAT`` named as it named them then (image names from its rows, else ``names``)."""
    if "files" in state:
        return set(state["files"])
    files = set()
    for key in state.get("versions", {}):
        image_id, annotator_id = key.split("/", 1)
        name = next((r["image_name"] for r in state.get("objects", {}).get(key, [])), names.get(image_id))
        if name is not None:
            stem, who = _safe(Path(name).with_suffix("").as_posix()), _safe(annotator_id)
            files |= {f"tiff/{stem}.tif", f"tiff/{stem}__{who}_mask.tif", f"geojson/{stem}__{who}.geojson"}
    return files


def _dropped(old: dict, state: dict, listed: dict[str, dict], annotators: dict[str, dict],
             explained: set[str] = frozenset()) -> list[str]:
    """One line per image, annotator's labels or consensus of the ``old`` state that ``state`` no longer has; not
    for the images and ``image/annotator`` keys in ``explained`` (the caller said why they were dropped)."""
    names = {i: info["name"] for i, info in listed.items()}
    for key, rows in old.get("objects", {}).items():
        names.setdefault(key.split("/", 1)[0], next((r["image_name"] for r in rows), key.split("/", 1)[0]))
    names.update({i: info["name"] for i, info in old.get("images", {}).items()})
    by_image: dict[str, list[str]] = {}
    for key in old.get("versions", {}):
        image_id, annotator_id = key.split("/", 1)
        by_image.setdefault(image_id, []).append(annotator_id)
    lines = []
    for image_id in sorted(set(by_image) | set(old.get("images", {})), key=lambda i: names.get(i, i)):
        name = names.get(image_id, image_id)
        if image_id not in state["images"]:
            if image_id in explained:
                continue
            info = listed.get(image_id)
            why = ("no longer in the source" if info is None else f"unreadable in the source ({info['error']})"
                   if info.get("error") else "no longer labelled in the source")
            n = len(by_image.get(image_id, []))
            lines.append(f"dropped image {name}: {why}; its labels by {n} annotator{'s' * (n != 1)} removed")
            continue
        for annotator_id in sorted(by_image.get(image_id, [])):
            if f"{image_id}/{annotator_id}" not in state["versions"] and f"{image_id}/{annotator_id}" not in explained:
                lines.append(f"dropped the labels of annotator {_who(annotators, annotator_id)} on {name}: no longer "
                             "in the source")
        if image_id in old.get("consensus", {}) and image_id not in state["consensus"]:
            lines.append(f"dropped the consensus of {name}: fewer than 2 annotators left")
    return lines


def _prune(root, state: dict) -> None:
    """Delete from the zarr group every image, annotator's masks and consensus that ``state`` does not hold."""
    if "images" in root:
        for image_id in list(root["images"].array_keys()):
            if image_id not in state["images"]:
                del root[f"images/{image_id}"]
    for group in ("instances", "semantic"):
        for image_id in list(root[group].group_keys()) if group in root else []:
            for annotator_id in list(root[f"{group}/{image_id}"].array_keys()):
                if f"{image_id}/{annotator_id}" not in state["versions"]:
                    del root[f"{group}/{image_id}/{annotator_id}"]
            if not list(root[f"{group}/{image_id}"].keys()):
                del root[f"{group}/{image_id}"]
    for group in ("consensus", "consensus_semantic"):
        for image_id in list(root[group].array_keys()) if group in root else []:
            if image_id not in state["consensus"]:
                del root[f"{group}/{image_id}"]


class _Labels:
    """``out/labels.zarr`` opened for a pull: ``root`` (the zarr group to write), ``lines`` (its ``dropped ...``
    lines). When the pull asks for the other format than the existing store's, ``root`` is a new store built in
    a sibling temporary folder, ``.labels.zarr.<hex>.tmp``: :meth:`commit` swaps it in (two renames, the old store
    put back if the second fails) once the pull has succeeded, :meth:`discard` removes it when the pull
    failed, so a failed pull leaves the previous store as it was."""

    def __init__(self, out: Path, zarr_format: int | None) -> None:
        import uuid

        import zarr

        self.store, self.lines, self.building = out / "labels.zarr", [], None
        existing = None
        if (self.store / "zarr.json").is_file():
            existing = 3
        elif (self.store / ".zgroup").is_file():
            existing = 2
        where = self.store
        if existing is not None and zarr_format is not None and existing != zarr_format:
            _remove_stale_builds(out)
            self.building = where = out / f".labels.zarr.{uuid.uuid4().hex}.tmp"
            self.lines.append(f"dropped labels.zarr in zarr format {existing}: rewriting it in format {zarr_format}")
            existing = None
        try:
            self.root = zarr.open_group(str(where), mode="a" if self.building is None else "w-",
                                        zarr_format=zarr_format or existing or 3)
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        """Put the store built in the temporary folder in place of ``labels.zarr`` (nothing to do otherwise)."""
        import shutil

        if self.building is None:
            return
        old = self.building.with_name(self.building.name[:-len(".tmp")] + ".old.tmp")
        self.store.rename(old)  # labels.zarr is missing for the moment between the two renames
        try:
            self.building.rename(self.store)
        except BaseException:
            old.rename(self.store)
            raise
        shutil.rmtree(old, ignore_errors=True)
        self.building = None

    def discard(self) -> None:
        """Remove the store being built (after a failed pull); ``labels.zarr`` is left as it was."""
        import shutil

        if self.building is not None:
            shutil.rmtree(self.building, ignore_errors=True)
            self.building = None


def _remove_stale_builds(out: Path) -> None:
    """Remove temporary stores (``.labels.zarr.*.tmp``) of format switches that were killed (a failed pull removes
    its own), once untouched for :data:`~colabel.apps.provider.storage.STALE_TMP_SECONDS` (a pulled set takes one
    pull at a time)."""
    import shutil
    import time

    from .provider.storage import STALE_TMP_SECONDS

    for path in out.glob(".labels.zarr.*.tmp"):
        try:
            if path.is_dir() and not path.is_symlink() and time.time() - path.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except FileNotFoundError:
            continue


async def pull(source, out: Path, *, progress: bool = True, zarr_format: int | None = None,
               finished_only: bool = False) -> dict:
    """Mirror ``source``'s session in ``out``: fetch the versions newer than the last pull's, remove what the source
    no longer has (images deleted, unreadable or no longer labelled, annotators' labels deleted, consensus of
    images left with fewer than 2 annotators), rewrite the tables and COCO files (layout: module docstring).

    Parameters
    ----------
    source : LocalSource or RemoteSource
    out : path
        The pulled set; created when missing.
    progress : bool
        Show a progress bar.
    zarr_format : {2, 3} or None
        Format of ``labels.zarr``; None keeps an existing store's format (3 for a new one). Asking for the other
        format than the existing store's rewrites it whole, in a temporary folder beside it that takes its place
        once the pull has succeeded (a failed pull leaves the previous store as it was).
    finished_only : bool
        Pull only the labels of images their annotator finished (and their consensus); a set is pulled one way.

    Returns
    -------
    dict
        ``images`` (labelled images of the source), ``pulled`` (annotation versions fetched), ``skipped`` (up to
        date), ``cells`` (rows of ``cells.csv``), ``dropped`` (one line per removal, ``dropped ...``); with
        ``finished_only``, ``unfinished`` (annotators' labels of an image left out: not finished) and ``corrected``
        (finished labels pulled at the finished version while a later one exists), else 0.

    Raises
    ------
    InvalidInputError
        ``out`` holds a pull of another session or source, or a ``pull_state.json`` that is not a JSON object, or
        is a file, or (from a :class:`LocalSource`) lies inside the folder pulled from, whose catalog would take
        the pulled TIFFs for images, or was pulled the other way than ``finished_only``; or ``zarr_format`` is not
        2, 3 or None; nothing is written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"{out} is not a folder: pull into a new folder, or one an earlier pull wrote")
    if isinstance(source, LocalSource) and out.resolve().is_relative_to(source.location):
        raise InvalidInputError(f"{out} is inside {source.location}, the folder pulled from: its TIFFs would become "
                                "images of that folder; pull into a folder outside it")
    state_path = out / "pull_state.json"
    old = _read_state(state_path)
    meta = await source.session()
    origin = {"source": source.location, "session_id": meta["session"]["session_id"],
              "finished_only": bool(finished_only)}
    _check_origin(out, old, origin)
    if zarr_format not in (None, 2, 3):
        raise InvalidInputError(f"zarr format must be 2 or 3, got {zarr_format!r}")
    # a state of format 2 keeps its images (their pixels are not fetched again), not its labels
    reusable = old if old.get("format") == STATE_FORMAT else (
        {"images": old.get("images", {})} if old.get("format") == 2 else {})
    out.mkdir(parents=True, exist_ok=True)
    store = _Labels(out, zarr_format)
    try:
        result = await _pull_into(source, out, store.root, meta, old, reusable, origin, store.lines, progress,
                                  commit=store.commit)
    except BaseException:
        store.discard()
        raise
    return result


async def _pull_into(source, out: Path, root, meta: dict, old: dict, reusable: dict, origin: dict,
                     rewritten: list[str], progress: bool, *, commit: Callable[[], None]) -> dict:
    """The body of :func:`pull`, writing the zarr group ``root``; ``commit`` puts it in place (a format switch)
    once everything else is written, just before ``pull_state.json``."""
    from tqdm import tqdm

    classes = [c["name"] for c in meta["session"]["classes"]]
    root.attrs.update({"session": meta["session"], "classes": classes, "format": "colabel.pull/1"})
    (out / "tiff").mkdir(exist_ok=True)
    (out / "geojson").mkdir(exist_ok=True)
    state: dict[str, Any] = {"format": STATE_FORMAT, **origin, "images": {}, "versions": {}, "saves": {},
                             "objects": {}, "consensus": {}, "consensus_basis": {}, "agreement": {},
                             "finished": {}}
    files: set[str] = set()
    listed = {i["image_id"]: i for i in meta["images"]}
    who_is = meta.get("annotators", {})
    mismatched: list[str] = []  # dropped lines the loop below explains itself (labels whose size is not the image's)
    explained: set[str] = set()  # keys and image ids whose removal a line of mismatched explains
    unfinished = corrected = 0
    if origin["finished_only"]:  # only the annotators who finished the image, at the version they finished
        cut = []
        for image in meta["images"]:
            kept = _finished_versions(image)
            cut.append({**image, "versions": kept})
            for annotator_id, versions in (image.get("versions") or {}).items():
                if not versions or image.get("error"):
                    continue
                unfinished += annotator_id not in kept
                corrected += annotator_id in kept and kept[annotator_id][-1] < versions[-1]
                key = f"{image['image_id']}/{annotator_id}"
                if annotator_id not in kept and key in old.get("versions", {}):  # finished at the last pull
                    why = ("returned to them for changes" if annotator_id in (image.get("returned") or {})
                           else "no longer finished")
                    mismatched.append(f"dropped the labels of annotator {_who(who_is, annotator_id)} on "
                                      f"{image['name']}: {why}")
                    explained.add(key)
                    if not kept:  # the image goes with them: these lines say why
                        explained.add(image["image_id"])
        meta = {**meta, "images": cut}
    images = [i for i in meta["images"] if not i.get("error") and any(i.get("versions", {}).values())]
    stems = _stems({i["image_id"]: i["name"] for i in images})
    pulled = skipped = 0
    strip_bytes = min(STRIP_BYTES, meta.get("max_image_bytes") or STRIP_BYTES)  # each read under the provider's limit
    for image in tqdm(images, desc="pull", unit="image", disable=not progress):
        image_id, stem = image["image_id"], stems[image["image_id"]]
        image_file = f"tiff/{stem}.tif"
        files.add(image_file)
        replaced = image.get("revision") != reusable.get("images", {}).get(image_id, {}).get("revision")
        if f"images/{image_id}" not in root or replaced:
            pixels = await read_image(source, image, strip_bytes=strip_bytes)
            root.create_array(f"images/{image_id}", data=pixels, chunks=_chunks(pixels.shape), overwrite=True)
            atomic_write(out / image_file, encode_tiff(pixels))
        elif not (out / image_file).is_file():
            atomic_write(out / image_file, encode_tiff(np.asarray(root[f"images/{image_id}"][...])))
        height, width = root[f"images/{image_id}"].shape[:2]
        state["images"][image_id] = {"name": image["name"], "stem": stem, "height": height, "width": width,
                                     "revision": image.get("revision")}
        fetched = False
        for annotator_id, versions in sorted(image["versions"].items()):
            if not versions:
                continue
            latest, key, who = versions[-1], f"{image_id}/{annotator_id}", _safe(annotator_id)
            # finished: the version pulled is the one the annotator finished (not work drawn since)
            state["finished"][key] = (image.get("finished") or {}).get(annotator_id) == latest
            save = _save_id(image, annotator_id, latest)
            mask_file, geojson_file = f"tiff/{stem}__{who}_mask.tif", f"geojson/{stem}__{who}.geojson"
            if (reusable.get("versions", {}).get(key) == latest
                    and (save is None or reusable.get("saves", {}).get(key) == save)
                    and f"instances/{key}" in root and root[f"instances/{key}"].shape == (height, width)
                    and f"semantic/{key}" in root and (out / mask_file).is_file() and (out / geojson_file).is_file()):
                files |= {mask_file, geojson_file}
                state["versions"][key], state["saves"][key] = latest, save
                skipped += 1
                state["objects"][key] = reusable["objects"][key]
                continue
            labels = np.asarray(await source.labels(image_id, annotator_id, latest)).astype(np.uint32)
            if labels.shape != (height, width):  # the image file was replaced by one of another size
                mismatched.append(
                    f"dropped the labels of annotator {_who(who_is, annotator_id)} on "
                    f"{image['name']}: they were drawn on an image {_size(labels.shape)}, and the file is now "
                    f"{_size((height, width))}")
                explained.add(key)
                continue
            collection = await source.annotation(image_id, annotator_id, latest)
            objects = _objects(collection, classes)
            # a label without an object (a label file edited by hand) is an object of no class, not background
            lut = np.full(labels.max() + 1 if labels.size else 1, NO_CLASS, np.uint16)
            lut[0] = 0
            for obj in objects:
                if obj["label"] < len(lut):
                    lut[obj["label"]] = obj["class_index"] + 1 if obj["class_index"] >= 0 else NO_CLASS
            root.create_array(f"instances/{key}", data=labels, chunks=_chunks(labels.shape), overwrite=True)
            root.create_array(f"semantic/{key}", data=lut[labels], chunks=_chunks(labels.shape), overwrite=True)
            root[f"semantic/{key}"].attrs.update({"classes": classes, "no_class": NO_CLASS})
            atomic_write(out / mask_file, encode_tiff(labels))
            atomic_write_json(out / geojson_file, collection)
            files |= {mask_file, geojson_file}
            state["versions"][key], state["saves"][key] = latest, save
            masks = instance_rle(labels)
            state["objects"][key] = [{**{k: v for k, v in o.items() if k != "class_index"},
                                      "image_id": image_id, "image_name": image["name"], "annotator_id": annotator_id,
                                      "version": latest, "mask": masks.get(o["label"])} for o in objects]
            pulled += 1
            fetched = True
        names = sorted(a for a in image["versions"] if f"{image_id}/{a}" in state["versions"])
        if not names:  # every annotator's labels were dropped: the image is no labelled image of the set
            del state["images"][image_id]
            files.discard(image_file)
            (out / image_file).unlink(missing_ok=True)
            explained.add(image_id)
            continue
        if len(names) >= 2:
            consensus_file = f"tiff/{stem}__{CONSENSUS_FILE}_mask.tif"
            files.add(consensus_file)
            basis = {a: state["versions"][f"{image_id}/{a}"] for a in names}
            if (not fetched and reusable.get("consensus_basis", {}).get(image_id) == basis
                    and image_id in reusable.get("consensus", {})
                    and f"consensus/{image_id}" in root and f"consensus_semantic/{image_id}" in root
                    and (out / consensus_file).is_file()):
                for part in ("consensus", "consensus_basis", "agreement"):
                    state[part][image_id] = reusable[part][image_id]
                continue
            _consensus(root, out, state, image, classes, basis, consensus_file)
    dropped = rewritten + mismatched + _dropped(old, state, listed, who_is, explained)
    _prune(root, state)
    for path in sorted(_previous_files(old, {i: info["name"] for i, info in listed.items()}) - files):
        if Path(path).parent.as_posix() in ("tiff", "geojson"):
            (out / path).unlink(missing_ok=True)
    state["files"] = sorted(files)
    rows = [o for objects in state["objects"].values() for o in objects]
    state["finished"] = {k: v for k, v in state["finished"].items() if k in state["versions"]}
    _write_cells(out / "cells.csv", rows, state["finished"])
    _write_rows(out / "annotators.csv", _annotator_rows(who_is, state), list(ANNOTATOR_COLUMNS))
    _write_rows(out / "consensus_cells.csv", [r for image_rows in state["consensus"].values() for r in image_rows],
                ["image_id", "image_name", "label", "class", "tie", "support", "votes"])
    atomic_write_json(out / "coco.json", _coco(meta["session"], state))
    if state["consensus"]:
        atomic_write_json(out / "coco_consensus.json", _coco(meta["session"], state, consensus=True))
    else:
        (out / "coco_consensus.json").unlink(missing_ok=True)
    atomic_write_json(out / "agreement.json", state["agreement"])
    commit()
    atomic_write_json(out / "pull_state.json", state)
    return {"images": len(images), "pulled": pulled, "skipped": skipped, "cells": len(rows), "dropped": dropped,
            "unfinished": unfinished, "corrected": corrected}


#: Most bytes of pixels a pull asks for at once: a larger image is read in strips of whole rows, so that no answer
#: is refused by the provider's ``max_image_bytes`` (256 MiB by default; a smaller one, from the session's
#: ``max_image_bytes``, makes the strips smaller), nor takes one message of that size.
STRIP_BYTES = 32 * 2**20


async def read_image(source, image: dict, *, strip_bytes: int = STRIP_BYTES) -> np.ndarray:
    """The level-0 pixels ``(H, W, C)`` of ``image`` (an entry of the session's images: ``shape``, ``dtype``) from
    ``source``: in one read, or in strips of whole rows of at most ``strip_bytes`` each (at least one row) when the
    image is larger."""
    shape, dtype = image.get("shape"), image.get("dtype")
    if not shape or not dtype:
        return np.asarray(await source.image(image["image_id"]))
    height, width = int(shape[0]), int(shape[1])
    channels = int(shape[2]) if len(shape) > 2 else 1
    rows = max(1, strip_bytes // max(1, width * channels * np.dtype(dtype).itemsize))
    if rows >= height:
        return np.asarray(await source.image(image["image_id"]))
    strips = [np.asarray(await source.image(image["image_id"], {"x": 0, "y": y, "width": width,
                                                                 "height": min(rows, height - y)}))
              for y in range(0, height, rows)]
    return np.concatenate(strips, axis=0)


def _read_state(path: Path) -> dict:
    """The ``pull_state.json`` of an earlier pull ({} when there is none); one that is not a JSON object is refused
    (:class:`InvalidInputError`), as the set's record of what it holds is lost."""
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        state = exc
    if not isinstance(state, dict):
        why = f": {state}" if isinstance(state, Exception) else ""
        raise InvalidInputError(f"{path} cannot be read as the record of an earlier pull{why}; pull into another "
                                "--out")
    return state


def _who(annotators: dict, annotator_id: str) -> str:
    """``Name (a-...)`` of an annotator, or the id alone when the source names nobody."""
    name = (annotators.get(annotator_id) or {}).get("display_name")
    return f"{name} ({annotator_id})" if name else annotator_id


def _finished_versions(image: dict) -> dict[str, list[int]]:
    """An image's ``versions`` (annotator id -> version numbers) cut to the annotators who finished it, each up to
    the version they finished (later ones are a correction in progress)."""
    finished = image.get("finished") or {}
    return {a: [v for v in versions if v <= finished[a]] for a, versions in (image.get("versions") or {}).items()
            if a in finished and finished[a] in versions}


def _save_id(image: dict, annotator_id: str, version: int) -> str | None:
    """What tells the source's latest save of an annotator's labels of an image from any other: its label file's
    name (unique to each save), as the source lists it in ``latest``; None from a source that does not (a provider
    of an earlier colabel), whose saves are then told apart by version number alone."""
    latest = (image.get("latest") or {}).get(annotator_id) or {}
    if latest.get("version") != version:
        return None
    return latest.get("label_file") or latest.get("saved_at")


def _size(shape: tuple[int, ...]) -> str:
    """``(H, W, ...)`` as ``"W pixels wide and H high"``."""
    return f"{shape[1]} pixels wide and {shape[0]} high"


def _consensus(root, out: Path, state: dict, image: dict, classes: list[str], basis: dict[str, int],
               consensus_file: str) -> None:
    """Compute the consensus of an image's annotators (``basis``: annotator -> version pulled) from their pulled
    instance masks; write it to the zarr group and ``consensus_file``, and its rows, agreement and basis to
    ``state``."""
    from colabel.services.training.consensus import image_consensus

    image_id, names = image["image_id"], sorted(basis)
    found = image_consensus({a: np.asarray(root[f"instances/{image_id}/{a}"][...]) for a in names},
                            {a: {o["label"]: o["class"] for o in state["objects"][f"{image_id}/{a}"]} for a in names})
    result, n = found.result, found.result.n_objects
    labels = result.labels.astype(np.uint32)
    root.create_array(f"consensus/{image_id}", data=labels, chunks=_chunks(labels.shape), overwrite=True)
    root[f"consensus/{image_id}"].attrs.update({
        "support": result.support.tolist(), "annotators": names,
        "classes": [found.classes[i] for i in range(1, n + 1)], "ties": found.ties})
    lut = np.zeros(n + 1, np.uint16)
    for i, name in found.classes.items():
        lut[i] = classes.index(name) + 1 if name in classes else NO_CLASS
    root.create_array(f"consensus_semantic/{image_id}", data=lut[result.labels], chunks=_chunks(labels.shape),
                      overwrite=True)
    root[f"consensus_semantic/{image_id}"].attrs.update({"classes": classes, "no_class": NO_CLASS})
    atomic_write(out / consensus_file, encode_tiff(labels))
    masks = instance_rle(labels)
    state["agreement"][image_id] = found.agreement
    state["consensus_basis"][image_id] = basis
    state["consensus"][image_id] = [
        {"image_id": image_id, "image_name": image["name"], "label": i, "class": found.classes[i] or "",
         "tie": i in found.ties, "support": int(result.support[i - 1]),
         "votes": ";".join(f"{a}={c or ''}" for a, c in found.votes[i].items()), "mask": masks.get(i)}
        for i in range(1, n + 1)]


#: Columns of ``annotators.csv``.
ANNOTATOR_COLUMNS = ("annotator_id", "display_name", "joined", "images", "finished", "objects")


def _annotator_rows(who_is: dict, state: dict) -> list[dict]:
    """One row per annotator whose labels the set holds, in id order: the name they joined the session with, when
    (UTC, ISO 8601), and how many of the set's images (``finished``: of those, the ones they finished) and objects are
    theirs."""
    images: dict[str, int] = {}
    finished: dict[str, int] = {}
    objects: dict[str, int] = {}
    for key, found in state["objects"].items():
        annotator_id = key.split("/", 1)[1]
        images[annotator_id] = images.get(annotator_id, 0) + 1
        finished[annotator_id] = finished.get(annotator_id, 0) + bool(state.get("finished", {}).get(key))
        objects[annotator_id] = objects.get(annotator_id, 0) + len(found)
    return [{"annotator_id": a, "display_name": (who_is.get(a) or {}).get("display_name", ""),
             "joined": (who_is.get(a) or {}).get("joined", ""), "images": images[a], "finished": finished[a],
             "objects": objects[a]} for a in sorted(images)]


def _write_cells(path: Path, rows: list[dict], finished: dict[str, bool]) -> None:
    """``cells.csv``; ``finished``: ``image_id/annotator_id`` -> whether the version pulled is the one the annotator
    finished."""
    columns = ["image_id", "image_name", "annotator_id", "version", "label", "class", "area", "centroid_x",
               "centroid_y", "xmin", "ymin", "xmax", "ymax", "finished"]
    _write_rows(path, [dict(zip(columns, [r["image_id"], r["image_name"], r["annotator_id"], r["version"], r["label"],
                                          r["class"] or "", round(r["area"], 3),
                                          *(round(v, 3) for v in r["centroid"]), *(round(v, 3) for v in r["bbox"]),
                                          bool(finished.get(f"{r['image_id']}/{r['annotator_id']}"))],
                                strict=True)) for r in rows], columns)


def _write_rows(path: Path, rows: list[dict], columns: list[str]) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue().encode("utf-8"))


def _coco(session: dict, state: dict, *, consensus: bool = False) -> dict:
    """COCO instance segmentation of a pull's ``state``: every annotator's objects, or with ``consensus`` the
    consensus objects of the images that have one (categories, file names, RLE: the module docstring)."""
    classes = [c["name"] for c in session["classes"]]
    unclassified = "object" if "object" not in classes else "object (unclassified)"
    categories = {name: n for n, name in enumerate(classes, start=1)}
    index = {image_id: n for n, image_id in enumerate(sorted(state["images"]), start=1)}
    listed = sorted(state["consensus"]) if consensus else sorted(state["images"])
    rows = ([r for image_id in listed for r in state["consensus"][image_id]] if consensus
            else sorted((r for rows in state["objects"].values() for r in rows),
                        key=lambda r: (index[r["image_id"]], r["annotator_id"], r["label"])))
    annotations = []
    for r in rows:
        if r["mask"] is None:
            continue
        image = state["images"][r["image_id"]]
        attributes = ({"label": r["label"], "support": r["support"], "tie": r["tie"]} if consensus else
                      {"annotator_id": r["annotator_id"], "version": r["version"], "label": r["label"]})
        annotations.append({
            "id": len(annotations) + 1, "image_id": index[r["image_id"]],
            "category_id": categories.get(r["class"], len(classes) + 1),
            "segmentation": {"counts": r["mask"]["counts"], "size": [image["height"], image["width"]]},
            "area": r["mask"]["area"], "bbox": r["mask"]["bbox"], "iscrowd": 0, "attributes": attributes})
    which = "consensus" if consensus else "every annotator's objects"
    return {
        "info": {"description": f"colabel session {session['name']} ({which})", "version": "1"},
        "categories": [{"id": n, "name": name} for name, n in categories.items()]
        + [{"id": len(classes) + 1, "name": unclassified}],
        "images": [{"id": index[image_id], "file_name": f"tiff/{state['images'][image_id]['stem']}.tif",
                    "height": state["images"][image_id]["height"], "width": state["images"][image_id]["width"],
                    "colabel_image_id": image_id, "colabel_image_name": state["images"][image_id]["name"]}
                   for image_id in listed],
        "annotations": annotations,
    }


def run_pull(source: str, out: Path, *, session: str | None = None, token: str | None = None,
             echo: Callable[[str], object] | None = print, zarr_format: int | None = None,
             finished_only: bool = False) -> dict:
    """Pull from a provider URL or a local folder (``session`` needed for a folder); ``echo`` gets each
    ``dropped ...`` line of :func:`pull` (default: printed); ``zarr_format`` and ``finished_only`` as :func:`pull`'s."""

    async def main():
        if source.startswith(("http://", "https://")):
            if session:
                raise InvalidInputError("--session is for a local folder: a trainer URL names its session itself "
                                        "(leave --session out)")
            src = await RemoteSource.connect(source, token)
        else:
            if token:
                raise InvalidInputError("--token is for a trainer URL: a local folder is read directly (leave --token "
                                        "out)")
            if not session:
                raise InvalidInputError("pulling from a local folder needs --session SESSION (its id or name)")
            src = LocalSource(Path(source), session)
        try:
            return await pull(src, out, zarr_format=zarr_format, finished_only=finished_only)
        finally:
            await src.close()

    result = asyncio.run(main())
    for line in result["dropped"] if echo is not None else []:
        echo(line)
    return result


def labelled_pairs(folder: str | Path, annotator: str | None = None, masks: str = "instances",
                   ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(image_id, image (H, W, C) as stored, mask (H, W))`` of every labelled image of a pulled set, in image-id
    order: ``annotator``'s masks (images they did not label are left out; ``"consensus"``: the consensus masks of
    the images that have one), or by default the consensus where an image has one, else its first annotator's in
    sorted order. ``masks``: ``"instances"`` (uint32 instance labels) or ``"semantic"`` (uint16 class index + 1,
    0 background, :data:`NO_CLASS` for an object without a class).

    Raises
    ------
    InvalidInputError
        ``folder`` holds no ``labels.zarr`` (not a pulled set), or its ``labels.zarr`` holds no instance masks
        (no ``instances`` group: a session pulled before anything was labelled); ``masks`` not one of the two.
    """
    import zarr

    if masks not in ("instances", "semantic"):
        raise InvalidInputError(f"masks must be 'instances' or 'semantic', got {masks!r}")

    store = Path(folder) / "labels.zarr"
    if not store.is_dir():
        raise InvalidInputError(f"{folder} is not a pulled set (no labels.zarr): run `colabel pull` first")
    root = zarr.open_group(str(store), mode="r")
    if "instances" not in root:
        raise InvalidInputError(f"{folder} holds no labelled images (its labels.zarr has no instances group): pull "
                                "the session again once annotators have saved labels")
    pairs = []
    for image_id in sorted(root["instances"].group_keys()):
        source = mask_source(root, image_id, annotator)
        if source is None:
            continue
        if source == CONSENSUS_FILE:
            array = root[f"consensus/{image_id}" if masks == "instances" else f"consensus_semantic/{image_id}"]
        else:
            array = root[f"{masks}/{image_id}/{source}"]
        if masks == "semantic" and "no_class" not in array.attrs:
            raise InvalidInputError(f"{folder} was pulled by an earlier colabel, whose semantic masks made objects "
                                    "without a class background: pull it again (the same command) to mend them")
        mask = array[...]
        pairs.append((image_id, np.asarray(root[f"images/{image_id}"][...]), np.asarray(mask)))
    return pairs


def mask_source(root, image_id: str, annotator: str | None = None) -> str | None:
    """Whose mask of an image a pulled set's ``labels.zarr`` group ``root`` trains on: ``annotator``'s (None when
    they did not label it; ``annotator="consensus"``: the consensus, None where the image has none), else
    ``"consensus"`` where the image has one, else its first annotator in sorted order."""
    names = sorted(root[f"instances/{image_id}"].array_keys())
    if annotator == CONSENSUS_FILE:
        return CONSENSUS_FILE if f"consensus/{image_id}" in root else None
    if annotator is not None:
        return annotator if annotator in names else None
    return CONSENSUS_FILE if f"consensus/{image_id}" in root else names[0]


def __getattr__(name: str):
    """``PulledDataset`` lives in :mod:`colabel.apps.pulled_dataset` (it imports torch; ``pull`` does not)."""
    if name == "PulledDataset":
        from .pulled_dataset import PulledDataset

        return PulledDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
