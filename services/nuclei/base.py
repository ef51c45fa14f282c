"""The nucleus-segmentation backend interface, its registry, and :func:`segment_nuclei`.

A backend (:class:`NucleusSegmenter`) turns pixels into an instance-label image. Everything that does
not depend on the model lives here, once: input checks, regions, tiling of large images with stitching
across tile borders, per-nucleus measurements (id, bbox, centroid, polygon, area, type; in
:mod:`.measure`) and caching.

Tiling and stitching
--------------------
An image larger than ``tile_size`` is cut into ``tile_size`` tiles that overlap their neighbours by at
least ``overlap`` pixels (the last row/column of tiles is shifted back to end at the image edge). The
overlap strip between two neighbours is split in its middle: each tile owns a *core* (the part of the
image closer to it than to its neighbours), and a tile's nucleus is kept only if its centroid lies in
that tile's core. A centroid in a core is at least ``overlap // 2`` pixels away from the tile's edges
inside the image, so **as long as every nucleus reaches less than ``overlap // 2 - 1`` pixels from its
centroid (overlap larger than the largest nucleus diameter, plus the context the backend needs)**, it is
whole in the tile that keeps it, and the neighbour that cut it at its edge discards its piece because the piece's
centroid lies outside the neighbour's core. Where two tiles segment the same nucleus slightly differently
and both centroids fall in their own cores (a nucleus straddling the middle line), the second copy is
recognised by its overlap with pixels already claimed (more than half of its pixels) and dropped; pixels
are never claimed twice. Ids are renumbered ``1..N``.

Whole-image statistics (stain detection, thresholds, intensity scaling) are computed once by the
backend's :meth:`NucleusSegmenter.prepare` before tiling, so tiles are treated alike.
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np

from colabel.cache_folder import CacheFolder, check_budget
from colabel.errors import InvalidInputError, NotFoundError

from .measure import measure_nuclei
from .types import NucleusResult

__all__ = [
    "Segmentation",
    "NucleusSegmenter",
    "register_backend",
    "get_backend",
    "available_backends",
    "backend_needs_weights",
    "validate_image",
    "parse_region",
    "tile_grid",
    "segment_nuclei",
    "measure_nuclei",
    "NucleusCache",
]

log = logging.getLogger(__name__)


class Segmentation(NamedTuple):
    """What a backend returns for one image or tile.

    ``labels`` (H, W) unsigned/signed integers, 0 = background; ``types`` (H, W) int, the type of the
    instance each pixel belongs to (constant within an instance), and ``type_probs`` (H, W) float, the
    instance's type probability, or None when the backend does not classify.
    """

    labels: np.ndarray
    types: np.ndarray | None = None
    type_probs: np.ndarray | None = None


class NucleusSegmenter:
    """A nucleus instance-segmentation backend.

    A subclass sets :attr:`name` and implements either

    * :meth:`segment` only -- then every tile of a large image is segmented on its own; or
    * :meth:`prepare` (whole-image conversion and statistics, run once) and :meth:`segment_prepared`
      (one tile of the prepared image), which :func:`segment_nuclei` uses so that tiles share one
      normalisation; :meth:`segment` then needs no override.

    :meth:`options` returns the JSON-able settings that change the output (part of the cache key).
    """

    name: ClassVar[str] = "base"
    #: ``{type: name}`` when the backend classifies nuclei.
    type_names: dict[int, str] | None = None
    #: True when the backend is meaningless without weights given in its options (e.g. HoVer-Net's
    #: ``checkpoint``): a service then refuses it unless it was configured with them.
    needs_weights: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.segment is NucleusSegmenter.segment and cls.segment_prepared is NucleusSegmenter.segment_prepared:
            raise TypeError(f"{cls.__name__} must implement segment() or segment_prepared()")

    def __new__(cls, *args, **kwargs):
        if cls is NucleusSegmenter:
            raise TypeError("NucleusSegmenter is an interface; instantiate a backend")
        return super().__new__(cls)

    def options(self) -> dict:
        """Settings that change the output, JSON-able (used in cache keys)."""
        return {}

    def info(self) -> dict:
        """Name, description and options, for listings and the wire."""
        return {"name": self.name, "options": self.options(), "type_names": self.type_names}

    def prepare(self, image: np.ndarray, *, mpp: float | None = None) -> tuple[np.ndarray, dict]:
        """Whole-image step run once before tiling: returns ``(prepared image, context)``.

        The prepared image must have the input's height and width. The default passes the image through.
        """
        return image, {"mpp": mpp}

    def segment_prepared(self, image: np.ndarray, *, context: dict) -> Segmentation:
        """Segment one tile of the prepared image (default: :meth:`segment` on the tile)."""
        return _as_segmentation(self.segment(image, mpp=context.get("mpp")), image.shape[:2])

    def segment(self, image: np.ndarray, *, mpp: float | None = None) -> Segmentation:
        """Segment a whole image (no tiling).

        Parameters
        ----------
        image : ndarray (H, W) or (H, W, C)
            Grey or channels-last; integer or float dtype. Not mutated.
        mpp : float, optional
            Microns per pixel, when known.

        Returns
        -------
        segmentation : Segmentation
            ``labels`` (H, W), plus per-pixel types when the backend classifies.
        """
        image = validate_image(image)
        prepared, context = self.prepare(image, mpp=_check_mpp(mpp))
        return _as_segmentation(self.segment_prepared(prepared, context=context), image.shape[:2])


def _as_segmentation(value: Any, shape: tuple[int, ...]) -> Segmentation:
    if isinstance(value, np.ndarray):
        value = Segmentation(value)
    elif isinstance(value, tuple) and not isinstance(value, Segmentation):
        value = Segmentation(*value)
    if not isinstance(value, Segmentation):
        raise TypeError(f"a backend must return labels or a Segmentation, got {type(value).__name__}")
    if value.labels.shape != tuple(shape) or value.labels.dtype.kind not in "iu":
        raise TypeError(
            f"a backend returned labels {value.labels.shape} {value.labels.dtype}, expected {tuple(shape)} ints"
        )
    return value


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------

# name -> factory, or "module:attribute" imported on first use (keeps torch out of `import nuclei`)
_BACKENDS: dict[str, Callable[..., NucleusSegmenter] | str] = {
    "classical": "colabel.services.nuclei.classical:ClassicalSegmenter",
    "hovernet": "colabel.services.nuclei.hovernet:HoVerNetSegmenter",
}
_BACKENDS_LOCK = threading.Lock()


def register_backend(name: str, factory: Callable[..., NucleusSegmenter] | str) -> None:
    """Register a backend factory (a class or callable, or ``"module:attribute"``) under *name*.

    Re-registering a name replaces the previous factory.
    """
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"backend name must be a non-empty string, got {name!r}")
    with _BACKENDS_LOCK:
        _BACKENDS[name] = factory


def available_backends() -> list[str]:
    """Names of the registered backends."""
    with _BACKENDS_LOCK:
        return sorted(_BACKENDS)


def backend_needs_weights(name: str) -> bool:
    """Whether the registered backend *name* needs weights in its options (its ``needs_weights``), read from
    its class without building it. False for an unknown name or a factory that does not say."""
    with _BACKENDS_LOCK:
        factory = _BACKENDS.get(name)
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    return bool(getattr(factory, "needs_weights", False))


def get_backend(name: str, **options) -> NucleusSegmenter:
    """A new backend instance: ``get_backend("classical", stain="he")``.

    Raises
    ------
    NotFoundError
        If no backend has that name.
    """
    with _BACKENDS_LOCK:
        factory = _BACKENDS.get(name)
    if factory is None:
        raise NotFoundError(f"unknown nucleus backend {name!r} (available: {', '.join(available_backends())})")
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    backend = factory(**options)
    if not isinstance(backend, NucleusSegmenter):
        raise TypeError(f"backend factory {name!r} returned {type(backend).__name__}, not a NucleusSegmenter")
    return backend


# --------------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------------


def validate_image(image: Any) -> np.ndarray:
    """Check an image and return it as an ndarray (no copy when it already is one).

    Accepted: (H, W) or (H, W, C) with C in 1..4, H and W >= 1, dtype unsigned/signed integer or float,
    all values finite.

    Raises
    ------
    InvalidInputError
        With one sentence naming the problem.
    """
    if not isinstance(image, np.ndarray):
        try:
            image = np.asarray(image)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"image must be an array of numbers: {exc}") from None
    if image.dtype.kind not in "iuf":
        raise InvalidInputError(f"image dtype must be an integer or float type, got {image.dtype}")
    if image.ndim not in (2, 3):
        raise InvalidInputError(f"image must have shape (H, W) or (H, W, C), got shape {image.shape}")
    if image.size == 0 or image.shape[0] == 0 or image.shape[1] == 0:
        raise InvalidInputError(f"image is empty (shape {image.shape})")
    if image.ndim == 3 and not 1 <= image.shape[2] <= 4:
        raise InvalidInputError(f"image must have 1 to 4 channels last, got shape {image.shape}")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise InvalidInputError("image contains NaN or infinite values")
    return image


def parse_region(region: Any, image_shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Check ``region`` = ``(x, y, width, height)`` in full-image pixels against ``(height, width)``.

    Accepts a 4-sequence, a dict or an object with ``x``, ``y``, ``width``, ``height`` (e.g.
    :class:`colabel.apps.provider.models.Region`).

    Raises
    ------
    InvalidInputError
        If it is malformed, empty or not inside the image.
    """
    if isinstance(region, dict):
        missing = [k for k in ("x", "y", "width", "height") if k not in region]
        if missing:
            raise InvalidInputError(
                f"region is missing {', '.join(repr(k) for k in missing)}; give x, y, width and height"
            )
        values = [region.get(k) for k in ("x", "y", "width", "height")]
    elif all(hasattr(region, k) for k in ("x", "y", "width", "height")):
        values = [getattr(region, k) for k in ("x", "y", "width", "height")]
    elif isinstance(region, Sequence) and not isinstance(region, (str, bytes)) and len(region) == 4:
        values = list(region)
    else:
        raise InvalidInputError(f"region must be (x, y, width, height), got {region!r}")
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        raise InvalidInputError(f"region values must be integers, got {values!r}")
    x, y, w, h = (int(v) for v in values)
    height, width = image_shape
    if w <= 0 or h <= 0:
        raise InvalidInputError(f"region width and height must be positive, got {w} x {h}")
    if x < 0 or y < 0 or x + w > width or y + h > height:
        raise InvalidInputError(
            f"region (x={x}, y={y}, width={w}, height={h}) is not inside the {width} x {height} image"
        )
    return x, y, w, h


#: Plausible resolutions in microns per pixel: from beyond super-resolution microscopy (0.01) to far below
#: any whole-slide scan thumbnail in which nuclei are still visible (100). Backends scale their filters
#: with ``1 / mpp``, so a value far outside costs minutes of CPU for nothing.
MPP_RANGE = (0.01, 100.0)


def _check_mpp(mpp: Any) -> float | None:
    """*mpp* as a float in :data:`MPP_RANGE` microns per pixel, or None; else InvalidInputError."""
    if mpp is None:
        return None
    number = isinstance(mpp, (int, float, np.floating, np.integer)) and not isinstance(mpp, bool)
    if not number or not np.isfinite(mpp) or mpp <= 0:
        raise InvalidInputError(f"mpp must be a positive number of microns per pixel, got {mpp!r}")
    lo, hi = MPP_RANGE
    if not lo <= mpp <= hi:
        raise InvalidInputError(
            f"mpp must be between {lo:g} and {hi:g} microns per pixel, got {mpp:g}; "
            f"pass None when the resolution is unknown"
        )
    return float(mpp)


# --------------------------------------------------------------------------------------------------
# tiling
# --------------------------------------------------------------------------------------------------


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def _cores(starts: list[int], tile: int, length: int) -> list[tuple[int, int]]:
    """Half-open core ``[lo, hi)`` of each tile: overlaps split in their middle."""
    bounds = [0] + [(starts[i + 1] + starts[i] + tile) // 2 for i in range(len(starts) - 1)] + [length]
    return [(bounds[i], bounds[i + 1]) for i in range(len(starts))]


def tile_grid(shape: tuple[int, int], *, tile_size: int, overlap: int) -> list[dict]:
    """The tiles :func:`segment_nuclei` uses for an image of ``(height, width)``.

    Returns
    -------
    tiles : list of dict
        Row-major; each has ``rows`` / ``cols`` (half-open pixel ranges of the tile) and ``core_rows`` /
        ``core_cols`` (the part of the image it owns). The cores partition the image.
    """
    height, width = shape
    rs, cs = _starts(height, tile_size, overlap), _starts(width, tile_size, overlap)
    rc, cc = _cores(rs, tile_size, height), _cores(cs, tile_size, width)
    return [
        {
            "rows": (r, min(r + tile_size, height)),
            "cols": (c, min(c + tile_size, width)),
            "core_rows": rcore,
            "core_cols": ccore,
        }
        for r, rcore in zip(rs, rc, strict=True)
        for c, ccore in zip(cs, cc, strict=True)
    ]


def _stitch(
    backend: NucleusSegmenter,
    prepared: np.ndarray,
    context: dict,
    *,
    tile_size: int,
    overlap: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    height, width = prepared.shape[:2]
    tiles = tile_grid((height, width), tile_size=tile_size, overlap=overlap)
    out = np.zeros((height, width), dtype=np.uint32)
    out_types = out_probs = None
    has_probs = False
    next_id = 1
    for done, tile in enumerate(tiles):
        (r0, r1), (c0, c1) = tile["rows"], tile["cols"]
        seg = _as_segmentation(backend.segment_prepared(prepared[r0:r1, c0:c1], context=context), (r1 - r0, c1 - c0))
        lab = seg.labels
        if lab.size and lab.dtype.kind == "i" and lab.min() < 0:
            raise TypeError("a backend returned negative labels")
        n = int(lab.max()) if lab.size else 0
        if n > 0:
            pixels = np.flatnonzero(lab)  # sums over the nucleus pixels only: background adds nothing
            values = lab.ravel()[pixels].astype(np.int64)
            pixel_rows, pixel_cols = np.divmod(pixels, c1 - c0)
            counts = np.bincount(values, minlength=n + 1).astype(np.float64)
            rows = np.bincount(values, weights=pixel_rows, minlength=n + 1)
            cols = np.bincount(values, weights=pixel_cols, minlength=n + 1)
            with np.errstate(invalid="ignore", divide="ignore"):
                cy = rows / counts + 0.5 + r0  # centroid, pixel-centre convention, tile -> image rows
                cx = cols / counts + 0.5 + c0
            (cr0, cr1), (cc0, cc1) = tile["core_rows"], tile["core_cols"]
            keep = (counts > 0) & (cy >= cr0) & (cy < cr1) & (cx >= cc0) & (cx < cc1)
            keep[0] = False
            view = out[r0:r1, c0:c1]
            candidate = keep[lab]
            claimed = candidate & (view > 0)
            if claimed.any():  # the same nucleus already taken from a previous tile
                shared = np.bincount(lab[claimed], minlength=n + 1)
                keep &= ~(shared > 0.5 * counts)
            ids = np.flatnonzero(keep)
            lut = np.zeros(n + 1, dtype=np.uint32)
            lut[ids] = np.arange(next_id, next_id + len(ids), dtype=np.uint32)
            next_id += len(ids)
            new = lut[lab]
            write = (new > 0) & (view == 0)
            view[write] = new[write]
            if seg.types is not None:
                if out_types is None:
                    out_types = np.zeros((height, width), dtype=np.int32)
                    out_probs = np.zeros((height, width), dtype=np.float32)
                out_types[r0:r1, c0:c1][write] = np.asarray(seg.types)[write]
                if seg.type_probs is not None:
                    has_probs = True
                    out_probs[r0:r1, c0:c1][write] = np.asarray(seg.type_probs)[write]
        if progress is not None:
            progress(done + 1, len(tiles))
    return out, out_types, (out_probs if has_probs else None)


# --------------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------------


#: Default byte budget of :class:`NucleusCache`'s files on disk (2 GiB: a compressed label image of a 1024 px
#: tile is about 20-200 KB, so tens of thousands of results; an evicted one is segmented again).
DEFAULT_MAX_DISK_BYTES = 2 << 30


class NucleusCache:
    """Results of :func:`segment_nuclei` by key: a bounded in-memory LRU, optionally backed by a folder.

    Parameters
    ----------
    max_items : int, default 32
        Results kept in memory (least recently used evicted first).
    directory : path-like, optional
        When given, results are also written there as ``<key>.npz`` (temporary file, fsync,
        ``os.replace``: a reader never sees a partial file) and read back on a memory miss. Unreadable
        files count as misses.
    max_disk_bytes : int or None, default :data:`DEFAULT_MAX_DISK_BYTES` (2 GiB)
        Budget of the folder's ``.npz`` files in bytes; after each write the least recently used ones (any
        process's use: a hit touches the file) are deleted until they fit (:class:`colabel.cache_folder.CacheFolder`).
        None or 0: unbounded.

    Attributes
    ----------
    hits, misses : int
    """

    def __init__(self, max_items: int = 32, *, directory: str | os.PathLike | None = None,
                 max_disk_bytes: int | None = DEFAULT_MAX_DISK_BYTES):
        if not isinstance(max_items, int) or max_items < 1:
            raise InvalidInputError(f"max_items must be a positive integer, got {max_items!r}")
        self.max_items = max_items
        self.directory = None if directory is None else Path(directory)
        max_disk_bytes = check_budget("max_disk_bytes", max_disk_bytes)
        self.disk = None if self.directory is None else CacheFolder(self.directory, ".npz", max_disk_bytes)
        self._items: collections.OrderedDict[str, NucleusResult] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.npz"

    def get(self, key: str) -> NucleusResult | None:
        with self._lock:
            result = self._items.get(key)
            if result is not None:
                self._items.move_to_end(key)
                self.hits += 1
        if result is not None:
            if self.disk is not None:
                self.disk.touch(self._path(key))  # a use here keeps the file from other processes' pruning too
            return _copy_result(result)
        if self.directory is not None:
            result = self._read(key)
            if result is not None:
                self._remember(key, result)
                with self._lock:
                    self.hits += 1
                return _copy_result(result)
        with self._lock:
            self.misses += 1
        return None

    def put(self, key: str, result: NucleusResult) -> None:
        stored = _copy_result(result)
        self._remember(key, stored)
        if self.disk is not None:
            self._write(key, stored)
            self.disk.prune(keep=key)

    def clear(self) -> None:
        """Forget the in-memory results (files stay)."""
        with self._lock:
            self._items.clear()

    def _remember(self, key: str, result: NucleusResult) -> None:
        with self._lock:
            self._items[key] = result
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def _write(self, key: str, result: NucleusResult) -> None:
        meta = result.to_dict(include_labels=False)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez_compressed(handle, labels=result.labels, meta=np.array(json.dumps(meta)))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self._path(key))
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _read(self, key: str) -> NucleusResult | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                meta["labels"] = data["labels"]
            result = NucleusResult.from_dict(meta)
        except FileNotFoundError:  # pruned by another process since the check
            return None
        except Exception as exc:  # noqa: BLE001 - a broken cache file is a miss, never an error
            log.warning("ignoring unreadable nucleus cache file %s: %s", path, exc)
            return None
        self.disk.touch(path)
        return result


def _copy_result(result: NucleusResult) -> NucleusResult:
    """A result sharing no array with *result* (nuclei are frozen and shared)."""
    return NucleusResult(
        labels=result.labels.copy(),
        nuclei=list(result.nuclei),
        backend=result.backend,
        type_names=None if result.type_names is None else dict(result.type_names),
        origin=tuple(result.origin),
        image_shape=None if result.image_shape is None else tuple(result.image_shape),
    )


def _cache_key(crop: np.ndarray, **parts: Any) -> str:
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{crop.shape}|{crop.dtype.str}|".encode())
    digest.update(memoryview(np.ascontiguousarray(crop)).cast("B"))
    digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------------------


def segment_nuclei(
    image: np.ndarray,
    *,
    backend: str | NucleusSegmenter = "classical",
    region: Any = None,
    tile_size: int = 1024,
    overlap: int = 128,
    mpp: float | None = None,
    cache: NucleusCache | None = None,
    backend_options: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> NucleusResult:
    """Segment the nuclei of an image or of a region of it.

    Parameters
    ----------
    image : ndarray (H, W) or (H, W, C)
        The full image, grey or channels-last (C in 1..4), integer or finite float. Not mutated.
    backend : str or NucleusSegmenter, default "classical"
        A registered name (:func:`available_backends`) or an instance; pass an instance to reuse a
        loaded model.
    region : (x, y, width, height), optional
        Full-image pixels; only this rectangle is segmented (nuclei cut by its edge are clipped).
        Coordinates of the result stay in the full-image frame.
    tile_size : int, default 1024
        Images (regions) larger than this are segmented in overlapping tiles of this size.
    overlap : int, default 128
        Minimum overlap of neighbouring tiles; must exceed the largest nucleus diameter (see the module
        docstring). ``0 <= overlap < tile_size``.
    mpp : float, optional
        Microns per pixel; backends use it to set their scale.
    cache : NucleusCache, optional
        Results are looked up and stored under a key of the region's pixels, its position, the backend
        name and options, the tiling and *mpp*.
    backend_options : dict, optional
        Keyword arguments for :func:`get_backend` when *backend* is a name.
    progress : callable, optional
        Called as ``progress(tiles_done, tiles_total)`` after each tile.

    Returns
    -------
    result : NucleusResult
        ``labels`` cover the region (uint32, ids ``1..N``), nuclei in the full-image frame.

    Raises
    ------
    InvalidInputError
        Bad image (dimensions, empty, dtype such as bool or complex, NaN), region, tiling or mpp.
    NotFoundError
        Unknown backend name.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.zeros((64, 64), np.uint8); image[20:30, 20:30] = 200
    >>> result = segment_nuclei(image, backend="classical", backend_options={"radius": 5})
    >>> len(result.nuclei), result.nuclei[0].bbox
    (1, (20.0, 20.0, 30.0, 30.0))
    """
    image = validate_image(image)
    height, width = image.shape[:2]
    if region is None:
        x, y, w, h = 0, 0, width, height
    else:
        x, y, w, h = parse_region(region, (height, width))
    for name, value in (("tile_size", tile_size), ("overlap", overlap)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InvalidInputError(f"{name} must be an integer, got {value!r}")
    if tile_size < 16:
        raise InvalidInputError(f"tile_size must be at least 16 pixels, got {tile_size}")
    if not 0 <= overlap < tile_size:
        raise InvalidInputError(f"overlap must be in [0, tile_size), got {overlap} with tile_size {tile_size}")
    mpp = _check_mpp(mpp)
    if isinstance(backend, str):
        backend = get_backend(backend, **(backend_options or {}))
    elif not isinstance(backend, NucleusSegmenter):
        raise InvalidInputError(f"backend must be a name or a NucleusSegmenter, got {type(backend).__name__}")
    elif backend_options:
        raise InvalidInputError("backend_options only apply when backend is given by name")

    crop = image[y : y + h, x : x + w]
    key = None
    if cache is not None:
        key = _cache_key(
            crop,
            origin=[x, y],
            image_shape=[height, width],
            backend=backend.name,
            options=backend.options(),
            tile_size=int(tile_size),
            overlap=int(overlap),
            mpp=mpp,
        )
        cached = cache.get(key)
        if cached is not None:
            return cached

    prepared, context = backend.prepare(crop, mpp=mpp)
    if prepared.shape[:2] != crop.shape[:2]:
        raise TypeError(f"{type(backend).__name__}.prepare changed the image size")
    if h <= tile_size and w <= tile_size:  # one tile: no stitching needed
        seg = _as_segmentation(backend.segment_prepared(prepared, context=context), (h, w))
        labels, types, probs = seg
        if progress is not None:
            progress(1, 1)
    else:
        labels, types, probs = _stitch(
            backend, prepared, context, tile_size=int(tile_size), overlap=int(overlap), progress=progress
        )
    labels, nuclei = measure_nuclei(labels, origin=(x, y), types=types, type_probs=probs)
    result = NucleusResult(
        labels=labels,
        nuclei=nuclei,
        backend=backend.name,
        type_names=backend.type_names,
        origin=(x, y),
        image_shape=(height, width),
    )
    if cache is not None:
        cache.put(key, result)
    return result
